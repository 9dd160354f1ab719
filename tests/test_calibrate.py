"""`meshbake calibrate` (issue #25 item 3): the command measures this machine into a profile that
compiles (no timing asserted: the closed loop, predicted vs measured step time, is `make bench`'s
bench/calibrate.py, since a shared 2-core machine's speed swings 3-4x within minutes), and the
measured step-time model's arithmetic on round numbers."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import compiled, launch_env, tiny_recipe


def _synthetic(tmp_path: Path, cores: int) -> Path:
    """A measured profile with round numbers: every GEMM shape 10 GFLOP/s, copy 5 GB/s, each
    collective exactly 1 ms + wire bytes / 0.1 GB/s at 4 ranks."""
    def line(op: str) -> list:
        f = (2 if op == "all_reduce" else 1) * 3 / 4
        return [[b, 1e-3 + b * f / 0.1e9] for b in (4096, 65536, 1048576, 8388608)]
    m = {"ranks": 4, "cores": cores, "gemm_gflops": [[512, 64, 64, 10.0], [512, 4096, 64, 10.0]], "copy_gbps": 5.0,
         **{op: line(op) for op in ("all_reduce", "all_gather", "reduce_scatter")}}
    p = tmp_path / "synthetic.yaml"
    p.write_text(yaml.safe_dump({"measured": m}))
    return p


def test_measured_model_terms(tmp_path):
    """The arithmetic of _measured_step on round numbers: the least-squares fit recovers the
    collective's 1 ms + 0.1 GB/s exactly; 4 ranks on 2 cores double the per-rank compute (dp 4
    splits the tokens by 4: compute w4 / w1 = 2 / 4); PLAN.md names the measured numbers."""
    from meshbake.compiler.estimate import _coll_fit

    prof = _synthetic(tmp_path, cores=2)
    m = yaml.safe_load(prof.read_text())["measured"]
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        lat, gbps = _coll_fit(m[op], op, 4)
        assert lat == pytest.approx(1e-3, rel=1e-6) and gbps == pytest.approx(0.1, rel=1e-6)
    train = {"seq_len": 128, "micro_batch_size": 4, "global_batch_size": 16}
    times, plans = {}, {}
    for world in (1, 4):
        b = compiled(tiny_recipe(f"syn{world}", world, cluster={"profile": str(prof)}, train=train))
        times[world] = json.loads(b.files["plan.json"])["estimate"]["time"]
        plans[world] = b.files["PLAN.md"].decode()
    assert times[4]["compute_s"] / times[1]["compute_s"] == pytest.approx(2 / 4, rel=1e-9)
    assert times[1]["fsdp_s"] == 0 and times[4]["fsdp_s"] > 0 and times[4]["tp_s"] == 0
    assert "Profile numbers used: measured by meshbake calibrate (cluster.measured: 4 ranks, 2 cores" in plans[4]
    assert "4 ranks on 2 cores: x 2" in plans[4]
    # the same profile with 4 cores: no oversubscription, compute w4 / w1 = 1 / 4
    b = compiled(tiny_recipe("syn4c", 4, cluster={"profile": str(_synthetic(tmp_path, cores=4))}, train=train))
    assert json.loads(b.files["plan.json"])["estimate"]["time"]["compute_s"] / times[1]["compute_s"] == \
        pytest.approx(1 / 4, rel=1e-9)


@pytest.mark.dist
def test_calibrate_writes_a_profile_that_compiles(tmp_path):
    """`meshbake calibrate --nproc 2 -o P` on this machine: P holds every measured fact, positive,
    and a recipe naming P compiles with the measured step-time model (PLAN.md says so)."""
    out = tmp_path / "here.yaml"
    p = subprocess.run(["meshbake", "calibrate", "--nproc", "2", "--cluster", "local-cpu", "-o", str(out)],
                       env=launch_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    m = yaml.safe_load(out.read_text())["measured"]
    assert m["ranks"] == 2 and m["cores"] >= 1 and m["copy_gbps"] > 0
    assert m["gemm_gflops"] and all(g > 0 for *_, g in m["gemm_gflops"])
    assert all(len(m[op]) == 4 and all(s > 0 for _, s in m[op]) for op in ("all_reduce", "all_gather", "reduce_scatter"))
    b = compiled(tiny_recipe("cal", 2, cluster={"profile": str(out)}))
    assert "Profile numbers used: measured by meshbake calibrate" in b.files["PLAN.md"].decode()
