"""Nothing is lost: export never deletes what it did not write (issue 9, finding 2), and a
checkpoint is verified against the digests written at save (finding 3).

One real checkpoint, made once per module: a 1-process gloo group saves the tiny-llama of a
compiled plan through runtime.checkpoint.save (the same code the ranks run), so export reads
real DCP shards.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

SAVE = r"""
import sys, torch, torch.distributed as dist
from pathlib import Path
from transformers import AutoModelForCausalLM
from runtime import checkpoint as ck
from runtime.parallel import hf_config
from runtime.plan import load_plan
run = Path(sys.argv[1])
plan = load_plan(str(run / "plan.json"))
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(hf_config(plan.model.config), dtype=torch.float32)
opt = torch.optim.AdamW(m.parameters())
for step in (1, 2, 3):
    m(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    opt.step()
    ck.save(run / "checkpoints", step, m, opt, {"step": step, "scheduler": {}}, keep=int(sys.argv[2]))
"""


def make_run(run: Path, keep: int = 3) -> Path:
    from compiler.pipeline import compile_recipe

    recipe = {"name": "integrity", "model": {"config": "tiny-llama", "dtype": "float32"},
              "cluster": {"nodes": 1, "gpus_per_node": 1, "device": "cpu", "gpu_memory_gb": 8},
              "train": {"seq_len": 32, "micro_batch_size": 1, "global_batch_size": 1, "steps": 3,
                        "mixed_precision": {"param_dtype": "float32", "reduce_dtype": "float32"}},
              "data": {"source": "synthetic"}}
    b = compile_recipe(yaml.safe_dump(recipe), source="integrity")
    assert hasattr(b, "files"), b
    run.mkdir(parents=True)
    (run / "plan.json").write_bytes(b.files["plan.json"])
    p = subprocess.run([sys.executable, "-c", SAVE, str(run), str(keep)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """runs/runA with step-1..3 committed, a sibling run and a notes file beside it."""
    base = tmp_path_factory.mktemp("integrity")
    make_run(base / "runs/runA")
    (base / "runs/runB").mkdir()
    (base / "runs/runB/notes.txt").write_text("a sibling run\n")
    (base / "runs/notes.md").write_text("my notes\n")
    return base


def fresh(saved: Path, tmp: Path) -> Path:
    """A private copy of the saved tree (tests delete and corrupt things)."""
    shutil.copytree(saved, tmp / "w", symlinks=True)
    return tmp / "w"


class Ran:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def export(*args: str, cwd: Path) -> Ran:
    """`meshbake export ARGS` run in this process from cwd (a subprocess costs seconds of imports)."""
    import contextlib
    import io
    import os

    from compiler.cli import main

    err, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["export", *args])
    finally:
        os.chdir(here)
    return Ran(rc, err.getvalue())


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ------------------------------------------------------------------- finding 2: export
def test_export_force_onto_the_runs_parent_or_itself_deletes_nothing(saved, tmp_path):
    """The issue's cases: `export runs/runA -o runs --force` deleted runA, a sibling run and a
    notes file; `-o runs/runA --force` its own source; -o inside the run or through a symlink
    to it is the same thing."""
    w = fresh(saved, tmp_path)
    (w / "link").symlink_to(w / "runs")
    before = tree(w / "runs")
    for out in ("runs", "runs/runA", "runs/runA/checkpoints/hf", "link", "link/runA", "."):
        r = export("runs/runA", "-o", out, "--force", cwd=w)
        assert r.returncode == 3 and "Traceback" not in r.stderr, (out, r.stderr)
        assert "the run dir" in r.stderr and "give an -o outside the run" in r.stderr, (out, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert tree(w / "runs") == before, out


def test_export_force_replaces_only_a_previous_export(saved, tmp_path):
    w = fresh(saved, tmp_path)
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 0, r.stderr[-3000:]
    marker = json.loads((w / "hf/meshbake-export.json").read_text())
    assert "config.json" in marker["files"] and marker["step"] == 3
    assert export("runs/runA", "-o", "hf", "--step", "2", "--force", cwd=w).returncode == 0
    assert json.loads((w / "hf/meshbake-export.json").read_text())["step"] == 2
    (w / "hf/notes.txt").write_text("mine\n")           # a user file: no longer only the export's
    (w / "mine").mkdir()
    (w / "mine/data.bin").write_text("x")
    for out, words in (("hf", "not a previous meshbake export"), ("mine", "not a previous meshbake export"),
                       ("mine/data.bin", "not a directory")):
        r = export("runs/runA", "-o", out, "--force", cwd=w)
        assert r.returncode == 3 and words in r.stderr and "Traceback" not in r.stderr, (out, r.stderr)
    assert (w / "hf/notes.txt").is_file() and (w / "mine/data.bin").is_file()
    r = export("runs/runA", "-o", "mine", cwd=w)         # without --force: not empty
    assert r.returncode == 3 and "pass --force" in r.stderr


def test_a_stale_tmp_with_user_files_is_never_deleted(saved, tmp_path):
    w = fresh(saved, tmp_path)
    (w / "hf.tmp").mkdir()
    (w / "hf.tmp/thesis.tex").write_text("years of work\n")
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 3 and "hf.tmp" in r.stderr and "did not write" in r.stderr, r.stderr
    assert (w / "hf.tmp/thesis.tex").read_text() == "years of work\n" and not (w / "hf").exists()
    # a killed export's tmp (the marker is written first) is removed and replaced
    shutil.rmtree(w / "hf.tmp")
    (w / "hf.tmp").mkdir()
    (w / "hf.tmp/meshbake-export.json").write_text('{"files": [], "step": 3}\n')
    (w / "hf.tmp/model.safetensors").write_bytes(b"half")
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 0 and not (w / "hf.tmp").exists() and (w / "hf/config.json").is_file(), r.stderr
