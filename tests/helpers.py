"""Small builders shared by the tests: a valid recipe as text, compiled in memory; the tiny CPU
recipe every torchrun test starts from; the CLI run in this process; a launch environment."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent          # meshbake, torchrun and this python

BASE = {
    "name": "t",
    "model": {"config": "llama-3.1-8b"},
    "mesh": {"tp": 8},
    "cluster": {"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80},
    "train": {"seq_len": 4096, "global_batch_size": 8},
}


def recipe_text(**sections) -> str:
    """BASE with whole sections replaced/added, e.g. recipe_text(mesh={"tp": 4, "dp_shard": 2})."""
    d = {**BASE, **sections}
    return yaml.safe_dump(d, sort_keys=False)


def compile_(text: str, *overrides: str):
    from meshbake.compiler.pipeline import compile_recipe

    return compile_recipe(text, overrides=tuple(overrides))


def resolve(text: str, *overrides: str):
    """-> Resolved or Err (no rendering), through the CLI's own load chain."""
    from meshbake.compiler.pipeline import resolve_text

    return resolve_text(text, overrides, source="<test>")


def paths(err) -> list[str]:
    return [e.path for e in err.errors]


# ------------------------------------------------------------------ the tiny CPU recipe
FP32 = {"param_dtype": "float32", "reduce_dtype": "float32"}


def tiny_recipe(name: str, world: int, *, mesh: dict | None = None, sp: bool = False, lp: bool = False,
                model: str = "tiny-llama", cluster: dict | None = None, train: dict | None = None,
                **sections) -> dict:
    """tiny-llama (or another small config) in fp32 on `world` CPU gloo ranks of one node:
    synthetic data, no checkpoints, 6 steps of 8 x 32 tokens. `mesh` replaces the mesh (default
    dp_shard = world); `cluster` and `train` are merged into theirs; any other keyword replaces
    that whole section (data=, checkpoint=, lora=, tracking=...), None drops it."""
    d = {
        "name": name,
        "model": {"config": model, "dtype": "float32"},
        "mesh": mesh if mesh is not None else {"dp_shard": world},
        "tp": {"sequence_parallel": sp, "loss_parallel": lp},
        "cluster": {"nodes": 1, "gpus_per_node": world, "device": "cpu", "gpu_memory_gb": 8, **(cluster or {})},
        "train": {"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 8, "steps": 6,
                  "mixed_precision": FP32, **(train or {})},
        "data": {"source": "synthetic"},
        "checkpoint": {"every_steps": 0, "save_on_exit": False},
    }
    d.update(sections)
    return {k: v for k, v in d.items() if v is not None}


def compiled(recipe: dict, source: str | None = None):
    """The Bundle of a recipe dict; a compile error fails the test with the errors."""
    from meshbake.compiler.pipeline import compile_recipe

    b = compile_recipe(yaml.safe_dump(recipe), source=source or recipe.get("name", "<test>"))
    assert hasattr(b, "files"), b
    return b


def plan_of(recipe: dict) -> dict:
    """plan.json of a recipe dict, as the runtime reads it."""
    import json

    return json.loads(compiled(recipe).files["plan.json"])


def write_bundle_of(recipe: dict, out: Path) -> Path:
    from meshbake.compiler.bundle import write_bundle

    write_bundle(compiled(recipe).files, out)
    return out


# ------------------------------------------------------------ processes the tests start
def launch_env(run_dir: Path | str | None = None, **extra: str) -> dict[str, str]:
    """The environment `bash launch.sh` runs in: this venv first on PATH, one OMP thread per
    rank, no MESHBAKE_* variable from the caller's shell (a stray MESHBAKE_FAULT or
    MESHBAKE_RUN_DIR would change the run); MESHBAKE_RUN_DIR=run_dir when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHBAKE")}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", OMP_NUM_THREADS="1")
    if run_dir is not None:
        env["MESHBAKE_RUN_DIR"] = str(run_dir)
    return {**env, **extra}


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path | str = ROOT) -> Ran:
    """`meshbake ARGS` run in this process from cwd: meshbake.compiler.cli.main, the function the
    console script calls (a subprocess costs ~4 s of imports; three smoke tests in test_cli.py
    still go through `python -m meshbake.compiler`). A traceback out of main fails the test."""
    from meshbake.compiler.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:        # argparse's usage errors, a SystemExit(message): as Python exits
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(here)
    return Ran(rc, out.getvalue(), err.getvalue())


def torchrun(world: int, script: Path, *args: str, cwd: Path, timeout: int = 900) -> None:
    """`torchrun --standalone --nproc-per-node WORLD script ARGS` (gloo, CPU): the test workers of
    tests/dist, which import tests.*; a failed launch fails the test with the ranks' stderr."""
    import subprocess

    env = launch_env(PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(script),
           *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert p.returncode == 0, p.stderr[-6000:]


@contextlib.contextmanager
def one_process_group():
    """A 1-rank gloo process group in this process (DCP save/load needs one), destroyed after:
    later tests see no process group, as in a fresh interpreter."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def no_hang(seconds: int):
    """Fail (TimeoutError) instead of blocking forever, e.g. in open() of a FIFO: a hang fails the
    test (SIGALRM raises in the main thread) instead of stalling the suite."""
    import signal

    def boom(*_):
        raise TimeoutError(f"still blocked after {seconds} s (a FIFO opened?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
