"""meshbake dryrun: the job's own model build for the real world size on a fake process group."""
from __future__ import annotations

import json

import torch.distributed as dist

from tests.helpers import ROOT, cli


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


def _built(recipe: str, *overrides: str) -> tuple[dict, object]:
    """Rank 0 of the job's own build (runtime/dryrun.py, fake process group, meta tensors) and
    the compiler's estimate of the same plan, in this process."""
    from meshbake.runtime.dryrun import build_rank

    from tests.helpers import resolve

    res = resolve((ROOT / "recipes" / f"{recipe}.yaml").read_text(), *overrides)
    r0 = build_rank(res.plan, 0)
    assert r0["ok"], r0
    return r0, res.estimate


def test_lora_adapters_per_rank_are_what_the_runtime_allocates():
    """At tp 8 one adapter factor is split and the other stays whole (runtime/roles.py
    lora_dims): colwise q_proj 8192 x 8192, r 16: A 16 x 8192 whole + B 1024 x 16; k/v
    (1024 x 8192): A whole + B 128 x 16; rowwise o_proj: A 16 x 1024 + B 8192 x 16 whole.
    (147,456 + 2 x 133,120 + 147,456) x 80 blocks = 44,892,160 trainable per rank; dividing
    both factors by tp (the bug issue 10 names) gives 4.5x fewer on q and o."""
    r0, est = _built("70b_lora_fsdp_tp", "mesh.tp=8", "mesh.dp_shard=1")
    assert r0["trainable"] == 44_892_160
    assert est.grads_bytes == r0["trainable"] * 4              # fp32 gradients of exactly those (bf16 base)
    assert (r0["params"], r0["param_bytes"]) == (est.params_per_rank, est.params_bytes)


def test_tied_embedding_counted_once_per_rank():
    """qwen2.5-0.5b ties lm_head to the embedding: the rank holds that table once (the
    estimate counted 151,936 x 896 = 136M parameters a second time)."""
    r0, est = _built("8b_tp", "model.config=qwen2.5-0.5b", "mesh.tp=2", "mesh.dp_shard=2", "cluster.gpus_per_node=4")
    assert (r0["params"], r0["param_bytes"]) == (est.params_per_rank, est.params_bytes)


def _layout(plan, rank: int, shared: bool) -> list[tuple]:
    """Every parameter of rank `rank`'s build as FSDP2 leaves it: its mesh (dims and ranks),
    placements and local shape; with or without runtime/dryrun.py's shared sub-meshes."""
    from contextlib import nullcontext

    from meshbake.runtime.dims import DIMS
    from meshbake.runtime.dryrun import shared_submeshes
    from meshbake.runtime.parallel import parallelize
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=plan.mesh.world)
    try:
        mesh = init_device_mesh("cpu", plan.mesh.shape, mesh_dim_names=DIMS)
        with shared_submeshes() if shared else nullcontext():
            model = parallelize(plan, mesh)
        return [(n, p.device_mesh.mesh_dim_names, p.device_mesh.mesh.tolist(), p.placements,
                 tuple(p._local_tensor.shape)) for n, p in model.named_parameters()]
    finally:
        dist.destroy_process_group()


def test_shared_submeshes_build_the_same_layout():
    """The dry run derives FSDP2's per-parameter dp x tp mesh once per build (its CPU time);
    every parameter must still get the mesh, placements and shard the job's build gives it:
    HSDP 2 x dp_shard 3 x tp 2 (no TP-local row count divides by 3: uneven shards), the last rank."""
    from meshbake.runtime import plan as P

    from tests.helpers import plan_of, tiny_recipe

    plan = P.from_dict(plan_of(tiny_recipe("t", 12, mesh={"dp_replicate": 2, "dp_shard": 3, "tp": 2}, sp=True,
                                           lp=True, train={"global_batch_size": 12})))
    shared, own = _layout(plan, 11, True), _layout(plan, 11, False)
    assert shared == own
    assert {m for _, m, *_ in own} == {("dp_replicate", "dp_shard", "tp")}, own[:3]
