"""Smoke test of the demo path: the tiny_chat bundle (make demo), `bash out/launch.sh`: prepare
(tokenize + pack the chat data, once, before torchrun) then torchrun (4 gloo processes), launched
from another directory with the recipe's env set-up line; train and eval loss fall."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import ROOT, VENV_BIN, launch_env

pytestmark = pytest.mark.dist


def test_tiny_chat_bundle_prepares_and_trains_via_launch_sh(tmp_path):
    from meshbake.compiler.bundle import write_bundle
    from meshbake.compiler.pipeline import compile_recipe

    b = compile_recipe((ROOT / "recipes/tiny_chat.yaml").read_text(), source="tiny_chat",
                       overrides=("train.steps=12", "checkpoint.every_steps=6", "train.eval_every=6",
                                  f"cluster.env_setup='export PATH={VENV_BIN}:$PATH'"))
    assert hasattr(b, "files"), b
    write_bundle(b.files, tmp_path / "bundle" / "out")
    work = tmp_path / "work"                 # launched from elsewhere; data/ relative to it
    work.mkdir()
    (work / "data").symlink_to(ROOT / "data")
    env = launch_env(PATH="/usr/bin:/bin")  # no venv on PATH: the env_setup line provides it
    p = subprocess.run(["bash", str(tmp_path / "bundle/out/launch.sh")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    run = work / "runs/tiny_chat"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_bytes"} <= set(recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5           # ln(4096) = 8.3 at start
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < 8.4       # steps 6 and 12, falling
    assert "step 12/12 100%" in p.stdout and "eval 12/12  loss" in p.stdout     # the console lines
    assert "prepared prepared/tiny_chat-" in p.stderr and "packing efficiency" in p.stderr
    assert (run / "checkpoints/step-12/COMMITTED").is_file()
    state = json.loads((run / "checkpoints/step-12/train_state.json").read_text())
    assert state["data"]["samples_consumed"] == 12 * 16 and len(state["data"]["fingerprint"]) == 64


def test_missing_data_is_one_clear_line_not_a_traceback(tmp_path):
    from meshbake.compiler.bundle import write_bundle
    from meshbake.compiler.pipeline import compile_recipe

    b = compile_recipe((ROOT / "recipes/tiny_cpu.yaml").read_text(), source="tiny_cpu")
    write_bundle(b.files, tmp_path / "out")
    p = subprocess.run(["bash", str(tmp_path / "out/launch.sh")], cwd=tmp_path, env=launch_env(),   # no data/ here
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "meshbake: data.path: 'data/shakespeare.txt' not found" in p.stderr
    assert "Traceback" not in p.stderr
