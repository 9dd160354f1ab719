"""Pipeline parallelism (mesh.pp, runtime/pp.py): parity with a single process, per mesh and
schedule, fp32, rel 1e-4 (tests/dist/reference.py: plain HF model, the whole global batch in
one forward); checkpoints (DCP by fully qualified names) saved under one layout and resumed
under another: pp 2 -> pp 1 (in this process), pp 1 -> pp 2, pp 2 x dp_shard 2 -> pp 2 x tp 2,
pp 2 x tp 2 -> pp 1 x dp_shard 4, Interleaved1F1B (2 stages per rank) -> 1F1B, each within
rel 1e-6 of the uninterrupted run (measured: 0 to 2.9e-8).

Two torchrun launches (world 2 and world 4, at the same time), every case of a world in one
process group (tests/dist/worker.py, cases in order: a resuming case follows the case that
saved), 6 optimizer steps each, losses compared per step.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from meshbake.runtime import plan as P

from tests.dist.reference import reference_losses
from tests.helpers import ROOT, one_process_group, plan_of, tiny_recipe
from tests.test_parity import torchrun

pytestmark = pytest.mark.dist
RTOL = 1e-4
STEPS = 6
FOUR = str(ROOT / "tests/dist/configs/tiny-llama-4l.json")     # 4 blocks: pp 2 x 2 stages per rank


def recipe(name: str, world: int, *, pp=2, dp_shard=1, tp=1, schedule="1F1B", spr=1, model="tiny-llama",
           mbs=2, gbs=8, ac="none", split=None) -> dict:
    return tiny_recipe(
        name, world, mesh={"pp": pp, "dp_shard": dp_shard, "tp": tp}, model=model,
        train={"micro_batch_size": mbs, "global_batch_size": gbs, "steps": STEPS, "lr": 2e-3, "min_lr": 2e-4,
               "warmup_steps": 2, "grad_clip": 1.0, "activation_checkpointing": ac},
        **({"pp": {"schedule": schedule, "stages_per_rank": spr, "split": split}} if pp > 1 else {}))


WORLD2 = {"pp2_1f1b": dict(), "pp2_gpipe": dict(schedule="GPipe"),
          "pp2_interleaved": dict(schedule="Interleaved1F1B", spr=2, model=FOUR),
          "pp2_zbv": dict(schedule="ZBVZeroBubble", spr=2, model=FOUR),
          "pp2_uneven_ac": dict(model=FOUR, split=[3, 1], ac="full")}
WORLD4 = {"pp2_dp_shard2": dict(dp_shard=2), "pp2_dp_shard2_gpipe": dict(dp_shard=2, schedule="GPipe"),
          "pp2_tp2": dict(tp=2), "pp2_tp2_interleaved": dict(tp=2, schedule="Interleaved1F1B", spr=2, model=FOUR)}


# checkpoints saved under one layout and resumed under another (DCP by fully qualified names): the
# saving run is a parity case of the same launch that also saves at steps 3 and 6; the resuming
# case, later in the same launch (cases run in order), loads step 3 and trains steps 4-6
SAVES = {"pp2_interleaved", "pp2_dp_shard2", "pp2_tp2", "pp1_dp_shard2"}
RESUMES = {   # name: (world, saving case, layout it resumes under)
    "resume_interleaved_to_1f1b": (2, "pp2_interleaved", dict(model=FOUR)),
    "resume_pp1_to_pp2": (2, "pp1_dp_shard2", dict()),
    "resume_pp2_dp2_to_pp2_tp2": (4, "pp2_dp_shard2", dict(tp=2)),
    "resume_pp2_tp2_to_pp1_dp4": (4, "pp2_tp2", dict(pp=1, dp_shard=4)),
}
WORLD2["pp1_dp_shard2"] = dict(pp=1, dp_shard=2)      # the pp 1 side of pp 1 -> pp 2


def cases(world: int, spec: dict, tmp) -> list[dict]:
    out = []
    for n, kw in spec.items():
        plan = plan_of(recipe(n, world, **kw))
        if n in SAVES:
            plan["checkpoint"].update(every_steps=3, keep=2)
        out.append({"name": n, "kind": "train", "plan": plan, **({"keep_run": True} if n in SAVES else {})})
    for n, (w, src, kw) in RESUMES.items():
        if w == world:
            rec = recipe(n, world, **kw)
            rec["checkpoint"] = {"every_steps": 0, "save_on_exit": False,
                                 "resume": str(tmp / src / "checkpoints" / "step-3")}
            out.append({"name": n, "kind": "train", "plan": plan_of(rec)})
    return out


def ckpt_case() -> dict:
    """pp 2 saving at steps 3 and 6 (kept: resumed under pp 1 below)."""
    plan = plan_of(recipe("pp2_ckpt", 2))
    plan["checkpoint"].update(every_steps=3, keep=2)
    return {"name": "pp2_ckpt", "kind": "train", "plan": plan, "keep_run": True}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp2, tmp4 = tmp_path_factory.mktemp("pp_world2"), tmp_path_factory.mktemp("pp_world4")
    runs = [(cases(2, WORLD2, tmp2) + [ckpt_case()], tmp2, 2), (cases(4, WORLD4, tmp4), tmp4, 4)]
    with ThreadPoolExecutor(2) as pool:
        launched = [pool.submit(torchrun, world, cs, tmp) for cs, tmp, world in runs]
        plans = {c["name"]: c["plan"] for cs, _, _ in runs for c in cs}
        # the reference depends on the model, the train section and the data only (not the mesh, the
        # schedule, AC or checkpoints): 2 distinct single-process runs serve all cases
        key = {n: json.dumps([d["model"]["config"], d["train"], d["data"]], sort_keys=True) for n, d in plans.items()}
        by_key = {k: reference_losses(P.from_dict(plans[n])) for n, k in reversed(key.items())}
        refs = {n: by_key[key[n]] for n in plans}
        res = [f.result() for f in launched]
    out = {}
    for (cs, tmp, _), r in zip(runs, res):
        for c in cs:
            out[c["name"]] = dict(r[c["name"]], plan=c["plan"], reference=refs[c["name"]], dir=tmp / c["name"])
    return out


def max_rel(a: dict, ref: dict, steps=range(1, STEPS + 1)) -> float:
    return max(abs(a[str(k)] - ref[k]) / abs(ref[k]) for k in steps)


@pytest.mark.parametrize("name", [*WORLD2, *WORLD4, "pp2_ckpt"])
def test_pp_loss_parity_with_single_process(results, name):
    r = results[name]
    losses, norms = r["reference"]
    assert sorted(map(int, r["losses"])) == list(range(1, STEPS + 1))
    rel = max_rel(r["losses"], losses)
    print(f"{name}: max rel loss diff {rel:.2e}, grad norm {max_rel(r['grad_norms'], norms):.2e}")
    assert rel < RTOL, (name, r["losses"], losses)
    assert max_rel(r["grad_norms"], norms) < 10 * RTOL
    # not a comparison of constants: synthetic tokens keep the loss near ln(4096) = 8.32, but every
    # step's loss differs (new batch, updated weights) and the gradients are not zero
    assert len({round(v, 5) for v in losses.values()}) == STEPS and min(norms.values()) > 0.1


def test_pp_split_is_the_plans(results):
    """The uneven split [3, 1] is what ran (plan.json pp.stages), not an even one."""
    assert results["pp2_uneven_ac"]["plan"]["pp"]["stages"] == [[0, 3], [3, 4]]
    assert results["pp2_zbv"]["plan"]["pp"]["schedule"] == "ZBVZeroBubble"


def test_checkpoint_saved_under_pp2_resumes_under_pp1(results, tmp_path):
    """DCP by fully qualified names: pp 2 saved step 3 (rank 0: embedding + block 0, rank 1:
    block 1 + norm + lm_head); one process without a pipeline loads it all and trains steps 4-6
    to the same losses as the pp 2 run (and the reference)."""
    from meshbake.runtime.checkpoint import list_checkpoints
    from meshbake.runtime.train import run

    ckpts = dict(list_checkpoints(results["pp2_ckpt"]["dir"] / "checkpoints"))
    assert sorted(ckpts) == [3, 6], ckpts
    rec = recipe("pp1_resume", 1, pp=1)
    rec["checkpoint"] = {"every_steps": 0, "save_on_exit": False, "resume": str(ckpts[3])}
    plan = P.from_dict(plan_of(rec))
    with one_process_group():
        res = run(plan, tmp_path / "run")
    pp2 = results["pp2_ckpt"]["losses"]
    assert sorted(res.losses) == [4, 5, 6]
    diff = max(abs(res.losses[k] - pp2[str(k)]) / pp2[str(k)] for k in (4, 5, 6))
    print(f"resume pp2 -> pp1: max rel loss diff vs the pp 2 run, steps 4-6: {diff:.2e}")
    assert diff < RTOL
    assert max_rel({str(k): v for k, v in res.losses.items()}, results["pp2_ckpt"]["reference"][0], (4, 5, 6)) < RTOL


def test_metrics_jsonl_holds_the_global_loss(results):
    """Only the last stage computes the loss; rank 0 (stage 0) logs it: the step's all-reduce
    gives it the global mean, so metrics.jsonl holds the single-process loss per step."""
    rows = [json.loads(line) for line in (results["pp2_ckpt"]["dir"] / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert max_rel({str(k): v for k, v in logged.items()}, results["pp2_ckpt"]["reference"][0]) < RTOL


@pytest.mark.parametrize("name", list(RESUMES))
def test_checkpoint_resumes_under_another_layout(results, name):
    """A checkpoint saved at step 3 under one pp / tp / dp layout (and schedule: Interleaved1F1B,
    2 stages per rank -> 1F1B, 1 stage per rank, other blocks per stage) resumed under another:
    steps 4-6 give the saving run's own losses (the uninterrupted run), fp32, rel 1e-6 (the
    layouts differ only in reduction order: no state is lost or misplaced in the reload)."""
    _, src, _ = RESUMES[name]
    got, ran = results[name]["losses"], results[src]["losses"]
    assert sorted(map(int, got)) == [4, 5, 6], got       # it resumed: steps 1-3 were not trained again
    diff = max_rel(got, {k: ran[str(k)] for k in (4, 5, 6)}, (4, 5, 6))
    print(f"{name}: max rel loss diff vs the uninterrupted {src} run, steps 4-6: {diff:.2e}")
    assert diff < 1e-6, (name, got, ran)
    assert max_rel(got, results[name]["reference"][0], (4, 5, 6)) < RTOL
