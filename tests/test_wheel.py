"""The wheel works on its own: `pip install` of the built wheel (not editable) into a fresh venv,
then `meshbake bundle tiny_cpu` and `bash out/launch.sh` from a directory that is not the checkout.

The fresh venv gets the heavy dependencies (torch, transformers, ...) from this project's venv
through a plain .pth path line: a path added that way is not a site dir, so the editable install's
finder in that venv is not loaded and `meshbake` can only come from the wheel (asserted below)."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli

pytestmark = pytest.mark.dist


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def test_wheel_installs_bundles_and_trains_from_another_directory(tmp_path):
    # build from a copy of the tracked files: `pip wheel .` would leave build/ and egg-info in the checkout
    src = tmp_path / "src"
    files = _run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("meshbake-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)])

    work = tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    for name in ("shakespeare.txt", "tokenizer"):
        subprocess.run(["cp", "-r", str(ROOT / "data" / name), str(work / "data" / name)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}", OMP_NUM_THREADS="1")
    where = _run([str(py), "-c", "import meshbake.compiler, meshbake.runtime; print(meshbake.compiler.__file__)"],
                 cwd=work, env=env).stdout
    assert where.startswith(purelib), where           # the wheel's copy, not the checkout
    meshbake = str(env_dir / "bin" / "meshbake")
    assert Path(meshbake).exists()
    sets = ["--set", "train.steps=3", "--set", "train.warmup_steps=1", "--set", "checkpoint.every_steps=0"]
    _run([meshbake, "bundle", "tiny_cpu", "-o", "out", *sets], cwd=work, env=env)
    # the wheel's bundle is the checkout's bundle (templates, runtime, catalog all came along)
    ref = cli("plan", "tiny_cpu", "--json", *sets)
    assert ref.returncode == 0, ref.stderr
    assert (work / "out" / "plan.json").read_text() == ref.stdout
    _run(["bash", "out/launch.sh"], cwd=work, env={**env, "MESHBAKE_PYTHON": str(py)}, timeout=600)
    metrics = list(work.glob("runs/*/metrics.jsonl"))
    assert metrics and len(metrics[0].read_text().splitlines()) >= 3, metrics
