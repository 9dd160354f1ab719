"""Smoke test of the demo path: the tiny_cpu bundle, `bash out/launch.sh` under torchrun
(4 gloo processes), launched from another directory with the recipe's env set-up line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.dist


def test_tiny_cpu_bundle_trains_via_launch_sh(tmp_path):
    from compiler.bundle import write_bundle
    from compiler.pipeline import compile_recipe

    venv = Path(sys.executable).parent
    b = compile_recipe((ROOT / "recipes/tiny_cpu.yaml").read_text(), source="tiny_cpu",
                       overrides=("train.steps=12", "checkpoint.every_steps=6",
                                  f"cluster.env_setup='export PATH={venv}:$PATH'"))
    assert hasattr(b, "files"), b
    write_bundle(b.files, tmp_path / "bundle" / "out")
    work = tmp_path / "work"                 # launched from elsewhere; data/ relative to it
    work.mkdir()
    (work / "data").symlink_to(ROOT / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHBAKE")}
    env["PATH"] = "/usr/bin:/bin"            # no venv on PATH: the env_setup line provides it
    p = subprocess.run(["bash", str(tmp_path / "bundle/out/launch.sh")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    run = work / "runs/tiny_cpu"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_bytes"} <= set(recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5           # ln(4096) = 8.3 at start
    assert "step 12/12 100%" in p.stdout                        # the console line (the last step always)
    assert (run / "checkpoints/step-12/COMMITTED").is_file()


def test_missing_data_is_one_clear_line_not_a_traceback(tmp_path):
    from compiler.bundle import write_bundle
    from compiler.pipeline import compile_recipe

    b = compile_recipe((ROOT / "recipes/tiny_cpu.yaml").read_text(), source="tiny_cpu")
    write_bundle(b.files, tmp_path / "out")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    p = subprocess.run(["bash", str(tmp_path / "out/launch.sh")], cwd=tmp_path, env=env,   # no data/ here
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "meshbake: data.path: 'data/shakespeare.txt' not found" in p.stderr
    assert "Traceback" not in p.stderr
