"""meshbake dryrun: the job's own model build for the real world size on a fake process group."""
from __future__ import annotations

import json

import torch.distributed as dist

from tests.helpers import cli


def dryrun(*args: str) -> tuple[int, dict]:
    """`meshbake dryrun ARGS --json` in this process; the fake process group is gone after it."""
    p = cli("dryrun", *args, "--json")
    assert not dist.is_initialized()
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {"stderr": p.stderr})


def test_70b_hsdp_tp_builds_on_64_ranks_as_estimated():
    """Rank 0 and rank 63 build (TP 8, HSDP 2 x 4, full AC) and rank 0 holds exactly the
    estimated parameters and bytes: 70.55e9 / (tp 8 x dp_shard 4) = 2,205,091,840 each."""
    code, out = dryrun("70b_hsdp_tp")
    assert code == 0, out
    assert out["world"] == 64 and [r["rank"] for r in out["ranks"]] == [0, 63]
    r0, last = out["ranks"]
    assert r0["matches_estimate"], r0
    assert r0["params"] == last["params"] == 2_205_091_840
    print(f"dry run of 70b_hsdp_tp at world 64: {out['seconds']} s")


def test_uneven_shards_pad_every_rank_to_rank_0():
    """dp_shard 6 does not divide 8192 rows: FSDP2 gives the last rank fewer rows but allocates
    every shard padded, so it holds fewer parameters in as many bytes as rank 0."""
    code, out = dryrun("70b_hsdp_tp", "--set", "cluster.nodes=6", "--set", "mesh.dp_replicate=1",
                       "--set", "train.global_batch_size=48")
    assert code == 0, out
    r0, last = out["ranks"]
    assert r0["matches_estimate"], r0
    assert last["params"] < r0["params"] and last["param_bytes"] == r0["param_bytes"], (r0, last)
