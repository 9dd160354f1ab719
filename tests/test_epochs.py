"""train.epochs end to end: the recipe keys (schema + validate), and two real torchrun launches
(world 2, dp_shard 2, tiny-llama fp32) over a few prepared windows for 2 epochs: the step count
resolved from the windows, the warmup_ratio warmup and the cosine end at min_lr, the per-epoch
checkpoints and evaluations, the fractional epoch in metrics.jsonl, and a run stopped mid-epoch
(rank 1 dies at the start of a step, torchrun restarts the group) that resumes to the same
losses as the uninterrupted run."""
from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from meshbake.compiler.validate import validate_fields
from meshbake.runtime import plan as P

from tests.helpers import BASE, ROOT, cli, compiled, launch_env, tiny_recipe, write_bundle_of

G, EPOCHS, EVERY, LR, MIN_LR, RATIO = 4, 2, 2, 2e-3, 2e-4, 0.25


# ----------------------------------------------------------------------- recipe: schema + validate
TEXT = {"format": "text", "path": "x.txt", "tokenizer": "tok"}


def check(train: dict, **sections):
    """validate's answer (schema + cross-field rules) for BASE with this train section."""
    d = {**BASE, "train": {"seq_len": 4096, "global_batch_size": 8, **train}, **sections}
    return validate_fields(d)


def test_steps_or_epochs_one_of_them():
    """Both: one error at train.epochs with the fix; neither: 1000 steps, as before epochs existed."""
    both = check({"steps": 10, "epochs": 2}, data=TEXT)
    assert [e.path for e in both.errors] == ["train.epochs"]
    assert "train.steps=null" in both.errors[0].hint
    neither = check({}, data=TEXT)
    assert not neither.errors and (neither.recipe.train.steps, neither.recipe.train.epochs) == (1000, None)
    assert [e.path for e in check({"epochs": 0}, data=TEXT).errors] == ["train.epochs"]   # exclusiveMinimum 0


def test_epochs_need_windows_and_evals_need_an_eval_split():
    syn = check({"epochs": 1, "evals_per_epoch": 2}, checkpoint={"per_epoch": 1})
    assert sorted(e.path for e in syn.errors) == ["checkpoint.per_epoch", "train.epochs", "train.evals_per_epoch"]
    ok = check({"epochs": 1, "evals_per_epoch": 2}, checkpoint={"per_epoch": 1}, data={**TEXT, "eval_fraction": 0.1})
    assert not ok.errors


def test_epochs_recipe_keeps_the_ratio_and_steps_resolve_from_windows():
    """Compile never reads the prepared data: steps null, warmup_ratio kept; resolve_steps is the
    runtime's one rule, ceil(ceil(epochs x W) / G), with the warmup from the resolved steps."""
    r = check({"epochs": 2.5, "warmup_ratio": 0.1}, data=TEXT)
    t = r.recipe.train
    assert not r.errors and (t.steps, t.epochs, t.warmup_ratio, t.warmup_steps) == (None, 2.5, 0.1, 0)
    plan = P.from_dict(json.loads(compiled(recipe("u", Path("x.jsonl"), 0)).files["plan.json"]))
    assert (plan.train.steps, plan.train.epochs, plan.train.warmup_ratio) == (None, EPOCHS, RATIO)
    got = P.resolve_steps(replace(plan, train=replace(plan.train, epochs=2.5, global_batch_size=8)), 37).train
    assert (got.steps, got.warmup_steps, got.warmup_ratio) == (12, 3, None)   # 92.5 -> 93 samples / 8; 0.25 x 12
    # 0.1 x 30 windows = 3 samples = 1 step of 3, not 3.0000000000000004 -> 4 samples -> 2 steps
    assert P.epoch_steps(replace(plan.train, epochs=0.1, global_batch_size=3), 30) == 1
    s = check({"steps": 40, "warmup_ratio": 0.1}, data=TEXT).recipe.train
    assert (s.steps, s.warmup_steps, s.warmup_ratio) == (40, 4, None)   # as before: resolved at compile time
    assert P.resolve_steps(replace(plan, train=replace(plan.train, steps=40, epochs=None, warmup_ratio=None)),
                           37).train.steps == 40


def test_crossed_marks_each_share_of_an_epoch():
    w = 10          # 4 per epoch: marks at 2.5, 5, 7.5, 10, 12.5 samples
    hits = [a for a in range(0, 14) if P.crossed(a, a + 1, w, 4)]
    assert hits == [2, 4, 7, 9, 12]
    assert not P.crossed(0, 100, None, 1) and not P.crossed(0, 100, 10, 0)


# ----------------------------------------------------------------------- torchrun, 2 epochs
def corpus(tmp: Path) -> Path:
    """Documents of Shakespeare lines, packed by prepare into a few 32-token windows."""
    lines = [ln for ln in (ROOT / "data/shakespeare.txt").read_text().splitlines() if len(ln.split()) > 4][:33]
    docs = [" ".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]
    p = tmp / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return p


def recipe(name: str, docs: Path, max_restarts: int) -> dict:
    return tiny_recipe(
        name, 2, cluster={"max_restarts": max_restarts},
        train={"seq_len": 32, "micro_batch_size": 2, "global_batch_size": G, "steps": None, "epochs": EPOCHS,
               "lr": LR, "min_lr": MIN_LR, "warmup_ratio": RATIO, "evals_per_epoch": 1},
        data={"format": "text", "sources": [{"path": str(docs)}], "tokenizer": str(ROOT / "data/tokenizer"),
              "eval_fraction": 0.1},
        checkpoint={"every_steps": EVERY, "per_epoch": 1, "keep": 20})


def records(run: Path) -> dict[int, dict]:
    """step -> its record merged (eval records and a re-run step's last record win)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], {}).update(r)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """`meshbake prepare` once (its printed length checked), then both launches at once: the
    uninterrupted run and one whose rank 1 dies at the start of a mid-epoch step."""
    tmp = tmp_path_factory.mktemp("epochs")
    docs = corpus(tmp)
    # one name: both runs read the one prepared copy (prepared/<name>-<fp>), each its own run dir
    bundles = {k: write_bundle_of(recipe("ep", docs, r), tmp / f"b-{k}") for k, r in (("ref", 0), ("cut", 1))}
    t0 = time.perf_counter()
    prep = cli("prepare", str(tmp / "b-ref/recipe.yaml"), "--quiet", cwd=tmp)
    assert prep.returncode == 0, prep.stderr
    index = json.loads(next((tmp / "prepared").glob("ep-*/index.json")).read_text())
    w = index["splits"]["train"]["windows"]
    steps = -(-EPOCHS * w // G)
    # the mid-epoch stop: the last every_steps checkpoint before a step that is not an epoch end
    cut = next(s for s in range(EVERY, steps, EVERY) if (s * G) % w)
    procs = {k: subprocess.Popen(["bash", str(bundles[k] / "launch.sh")], cwd=tmp, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=launch_env(tmp / f"run-{k}", **({"MESHBAKE_FAULT": f"step:1:{cut + 1}"}
                                                                    if k == "cut" else {})))
             for k in bundles}
    t1 = time.perf_counter()
    outs = {k: p.communicate(timeout=600) for k, p in procs.items()}
    print(f"epochs: prepare {t1 - t0:.1f} s, both launches {time.perf_counter() - t1:.1f} s")
    for k, p in procs.items():
        assert p.returncode == 0, outs[k][1][-5000:]
    return {"tmp": tmp, "w": w, "steps": steps, "cut": cut, "prepare": prep.stdout,
            "ref": tmp / "run-ref", "cut_run": tmp / "run-cut"}


@pytest.mark.dist
def test_prepare_prints_the_resolved_steps(runs):
    w, steps = runs["w"], runs["steps"]
    assert w >= 2 * G, f"{w} windows: too few for a mid-epoch stop"
    assert f"{w:,} training windows" in runs["prepare"]
    assert f"train.epochs {EPOCHS} -> {steps:,} steps" in runs["prepare"]
    chk = cli("check", str(runs["tmp"] / "b-ref/recipe.yaml"), cwd=runs["tmp"])      # finds the prepared data
    assert chk.returncode == 0 and f"prepared data: {w:,} training windows" in chk.stdout, chk.stdout
    assert f"-> {steps:,} steps" in chk.stdout


@pytest.mark.dist
def test_steps_and_schedule_come_from_the_windows(runs):
    w, steps = runs["w"], runs["steps"]
    recs = records(runs["ref"])
    assert max(recs) == steps and sorted(recs) == list(range(1, steps + 1))
    warm = round(RATIO * steps)
    assert recs[1]["lr"] == pytest.approx(LR / warm, rel=1e-9)          # linear warmup, first step
    assert recs[warm]["lr"] == pytest.approx(LR, rel=1e-9)              # peak at the end of warmup
    assert recs[steps]["lr"] == pytest.approx(MIN_LR, rel=1e-9)         # cosine ends at min_lr
    for n, r in recs.items():
        assert r["epoch"] == round(n * G / w, 4)
    assert recs[steps]["epoch"] >= EPOCHS
    log = (runs["ref"] / "train.log").read_text()
    assert f"{steps} steps x" in log and f"{EPOCHS} epochs of {w} windows" in log
    assert f"epoch {recs[1]['epoch']:.2f}" in log                      # the console line shows it
    rep = cli("report", str(runs["ref"]), "-o", str(runs["tmp"] / "report.html"))    # plan.json: steps null
    assert rep.returncode == 0 and f"steps {steps} (epoch {steps * G / w:.2f} of {EPOCHS}) done" in rep.stdout, \
        rep.stdout + rep.stderr


@pytest.mark.dist
def test_checkpoints_and_evals_per_epoch(runs):
    w, steps = runs["w"], runs["steps"]
    ends = {n for n in range(1, steps + 1) if n * G // w > (n - 1) * G // w}      # steps that complete an epoch
    assert len(ends) == EPOCHS
    want = ends | set(range(EVERY, steps + 1, EVERY)) | {steps}
    got = {int(p.name.removeprefix("step-")) for p in (runs["ref"] / "checkpoints").glob("step-*")}
    assert got == want
    evals = {n for n, r in records(runs["ref"]).items() if "eval_loss" in r}
    assert evals == ends | {steps}


@pytest.mark.dist
def test_a_mid_epoch_stop_resumes_to_the_same_losses(runs):
    cut, steps, w = runs["cut"], runs["steps"], runs["w"]
    assert (cut * G) % w, "the stop is mid-epoch"
    log = (runs["cut_run"] / "train.log").read_text()
    assert f"resumed from step-{cut}" in log
    ref, got = records(runs["ref"]), records(runs["cut_run"])
    assert sorted(got) == list(range(1, steps + 1))
    diff = max(abs(got[n]["loss"] - ref[n]["loss"]) for n in range(cut + 1, steps + 1))
    print(f"epochs: {w} windows, {steps} steps, stop after step {cut} (epoch {cut * G / w:.2f}): "
          f"max |loss diff| steps {cut + 1}-{steps} = {diff:.1e}")
    assert diff <= 1e-6
    assert all(got[n]["epoch"] == ref[n]["epoch"] for n in range(cut + 1, steps + 1))
    assert all(got[n]["lr"] == pytest.approx(ref[n]["lr"], rel=1e-12) for n in range(cut + 1, steps + 1))


def test_recipe_yaml_keys_round_trip(tmp_path):
    """The normalized recipe of an epochs run compiles again to itself (meshbake verify's rule)."""
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "a"}\n')
    b = write_bundle_of(recipe("rt", docs, 0), tmp_path / "b")
    norm = yaml.safe_load((b / "recipe.yaml").read_text())
    assert norm["train"]["steps"] is None and norm["train"]["epochs"] == EPOCHS
    assert norm["checkpoint"]["per_epoch"] == 1 and norm["train"]["evals_per_epoch"] == 1
    assert cli("verify", str(b), cwd=tmp_path).returncode == 0
    chk = cli("check", str(b / "recipe.yaml"), cwd=tmp_path)                   # nothing prepared here
    assert chk.returncode == 0 and f"train.epochs {EPOCHS}: steps known after `meshbake prepare`" in chk.stdout
    assert math.isclose(norm["train"]["warmup_ratio"], RATIO)
