"""Experiment tracking: a real 2-process run with `tracking: {tensorboard: true, wandb: offline}`;
the event files are read back with tensorboard's own reader and hold exactly metrics.jsonl's
values; a W&B offline run directory is written (and holds those values); with tracking off the
runtime never imports tensorboard or wandb."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from meshbake.compiler.errors import Err

from tests.helpers import ROOT, launch_env


def _tiny(steps: int, **extra) -> str:
    d = yaml.safe_load((ROOT / "recipes/tiny_chat.yaml").read_text())      # chat data with an eval split
    d["cluster"]["gpus_per_node"] = 2
    d["train"].update(steps=steps, warmup_steps=2, eval_every=3)
    d["checkpoint"] = {"every_steps": 0, "keep": 1}
    d.update(extra)
    return yaml.safe_dump(d, sort_keys=False)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    from meshbake.compiler.bundle import write_bundle
    from meshbake.compiler.pipeline import compile_recipe

    tmp = tmp_path_factory.mktemp("tracked")
    b = compile_recipe(_tiny(6, tracking={"tensorboard": True, "wandb": {"project": "meshbake-test",
                                                                          "tags": ["ci"]}}), source="t")
    assert not isinstance(b, Err), b
    write_bundle(b.files, tmp / "out")
    (tmp / "data").symlink_to(ROOT / "data")
    env = {k: v for k, v in launch_env().items() if not k.startswith("WANDB")}
    env["WANDB_SILENT"] = "true"
    p = subprocess.run(["bash", str(tmp / "out/launch.sh")], cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp / "runs/tiny_chat", p.stdout


@pytest.mark.dist
def test_tensorboard_event_files_read_back_with_tensorboards_reader(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked_run
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s"} <= tags
    for key in ("loss", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in ea.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [r["step"] for r in recs] == list(range(1, 7))
        assert [v for _, v in got] == pytest.approx([r[key] for r in recs], rel=1e-6)   # float32 in events
    assert "train/mfu" not in tags and "train/peak_mem_bytes" not in tags   # None on CPU: not logged
    ev = [(e.step, e.value) for e in ea.Scalars("eval/loss")]
    want = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    assert [s for s, _ in ev] == [s for s, _ in want] == [3, 6]
    assert [v for _, v in ev] == pytest.approx([v for _, v in want], rel=1e-6)
    plan_text = ea.Tensors("plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "world 2" in plan_text and "tiny-llama" in plan_text


@pytest.mark.dist
def test_wandb_offline_run_directory_is_written_with_the_metrics(tracked_run):
    run, out = tracked_run
    rid = (run / "wandb-run-id").read_text().strip()
    runs = list((run / "wandb").glob(f"offline-run-*-{rid}"))
    assert len(runs) == 1, list((run / "wandb").iterdir())
    blob = (runs[0] / f"run-{rid}.wandb").read_bytes()
    # the transaction log holds the history rows and the config: look for the keys and the plan
    for needle in (b"train/loss", b"train/grad_norm", b"eval/loss", b"meshbake-test", b"dp_shard", b"tiny_chat"):
        assert needle in blob, needle
    assert f"wandb: offline run {rid}" in out


def test_runtime_with_tracking_off_never_imports_tensorboard_or_wandb(tmp_path):
    """A bundle runs with torch + transformers alone: with tracking off MetricsLog must not
    import the trackers (they are made unimportable here), and preflight names a missing one."""
    from meshbake.compiler.pipeline import compile_recipe

    for name, tracking in (("off", {}), ("on", {"tensorboard": True})):
        b = compile_recipe(_tiny(2, tracking=tracking), source="t")
        (tmp_path / f"{name}.json").write_bytes(b.files["plan.json"])
    code = f"""
import sys
for m in ("tensorboard", "wandb", "torch.utils.tensorboard"):
    sys.modules[m] = None                      # import of any of them raises ImportError
from pathlib import Path
from meshbake.runtime.plan import load_plan
from meshbake.runtime.metrics import MetricsLog
from meshbake.runtime import preflight
d = Path({str(tmp_path)!r})
log = MetricsLog(d, True, load_plan(str(d / "off.json")))
log.step({{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0,
          "tokens_per_s_per_device": 5.0, "mfu": None, "peak_mem_bytes": 1}})
log.close()
print("PROBLEMS", preflight.problems(load_plan(str(d / "on.json"))))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "metrics.jsonl").is_file()
    assert "PROBLEMS" in p.stdout and "cannot import tensorboard" in p.stdout
