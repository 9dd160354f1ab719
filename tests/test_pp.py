"""Pipeline parallelism (mesh.pp, runtime/pp.py): parity with a single process, per mesh and
schedule, fp32, rel 1e-4 (tests/dist/reference.py: plain HF model, the whole global batch in
one forward); checkpoints (DCP by fully qualified names) saved under one layout and resumed
under another: pp 2 -> pp 1 (in this process), pp 1 -> pp 2, pp 2 x dp_shard 2 -> pp 2 x tp 2,
pp 2 x tp 2 -> pp 1 x dp_shard 4, Interleaved1F1B (2 stages per rank) -> 1F1B, each within
rel 1e-6 of the uninterrupted run (measured: 0 to 2.9e-8).
Composed with sequence + loss parallel (1F1B, ZBV), LoRA (parity, and the pp run's checkpoint
exported), Mistral-family types (a Qwen2 with a sliding-window block, a Qwen3), cp (1F1B, ZBV),
packed real text with eval (vs the runtime in one process on the same prepared data), and MoE
stages: Qwen3-MoE and Mixtral (with the router aux loss, exact: runtime/pp.aux_carry), each also
with ep 2 inside the stage groups (pp 2 x dp_shard 2 x ep 2, world 4).
Tied embeddings (the last stage's copy of the table, gradients summed over the first / last pair):
1F1B, Interleaved1F1B, ZBV (one parameter on rank 0), x tp 2, x dp_shard 2, pp 4 (measured 0.9e-7 to
1.7e-7; without the sum 1.4e-3), resumed under pp 1 from pp 2 and from pp 2 x tp 2: exact.

Two torchrun launches (world 2 and world 4, at the same time), every case of a world in one
process group (tests/dist/worker.py, cases in order: a resuming case follows the case that
saved), 6 optimizer steps each, losses compared per step.
"""
from __future__ import annotations

import json
import os
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
# tied embeddings (tie_word_embeddings: true): a 2-block Qwen2 and a 4-block Llama (2 stages per rank)
TIED = str(ROOT / "tests/dist/configs/tiny-qwen-mha.json")
TIED4 = str(ROOT / "tests/dist/configs/tiny-llama-4l-tied.json")
# untied variants of tests/models' Qwen fixtures; the Qwen2 has
# a full-attention block 0 and a sliding-window (8 < seq_len 32) block 1, so stage 1 must read
# layer_types[1], not [0] (without runtime/pp.py's per-stage slice: rel 1.9e-3, measured)
QWEN2_SLIDING = str(ROOT / "tests/dist/configs/tiny-qwen2-sliding.json")
QWEN3 = str(ROOT / "tests/dist/configs/tiny-qwen3-untied.json")
# MoE (4 experts, top 2): the tiny Qwen3-MoE's block 0 is MoE and block 1 dense (mlp_only_layers
# [1]), so stage 1 holds no MoE block; both of the tiny Mixtral's blocks are MoE, so with the router
# aux loss each stage's routers get a gradient from the other stage's counts (runtime/pp.aux_carry)
QWEN3_MOE, MIXTRAL = str(ROOT / "tests/models/qwen3_moe/config.json"), str(ROOT / "tests/models/mixtral/config.json")
AUX = 0.1
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def recipe(name: str, world: int, *, pp=2, dp_replicate=1, dp_shard=1, tp=1, cp=1, ep=1, schedule="1F1B", spr=1,
           model="tiny-llama", mbs=2, gbs=8, ac="none", split=None, sp=False, lp=False, lora=False, aux=None) -> dict:
    return tiny_recipe(
        name, world, mesh={"pp": pp, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp, "cp": cp,
                           **({"ep": ep} if ep > 1 else {})},
        model=model, sp=sp, lp=lp, **({"lora": LORA} if lora else {}),
        train={"micro_batch_size": mbs, "global_batch_size": gbs, "steps": STEPS, "lr": 2e-3, "min_lr": 2e-4,
               "warmup_steps": 2, "grad_clip": 1.0, "activation_checkpointing": ac,
               **({"router_aux_loss_coef": aux} if aux is not None else {})},
        **({"pp": {"schedule": schedule, "stages_per_rank": spr, "split": split}} if pp > 1 else {}))


WORLD2 = {"pp2_1f1b": dict(), "pp2_gpipe": dict(schedule="GPipe"),
          "pp2_interleaved": dict(schedule="Interleaved1F1B", spr=2, model=FOUR),
          "pp2_zbv": dict(schedule="ZBVZeroBubble", spr=2, model=FOUR),
          "pp2_uneven_ac": dict(model=FOUR, split=[3, 1], ac="full"),
          "pp2_qwen2_sliding": dict(model=QWEN2_SLIDING), "pp2_qwen3": dict(model=QWEN3),
          # tied embeddings: the last stage's rank holds a copy of the table as lm_head's weight, the
          # two gradients summed over the pair each step (without the sum: rel 1.4e-3, measured);
          # Interleaved1F1B: stage 0 on pp rank 0, stage 3 on pp rank 1; ZBV: both on rank 0, one parameter
          "pp2_tied": dict(model=TIED), "pp2_tied_interleaved": dict(model=TIED4, schedule="Interleaved1F1B", spr=2),
          "pp2_tied_zbv": dict(model=TIED4, schedule="ZBVZeroBubble", spr=2),
          # MoE stages, the experts whole on each stage (ep 1); Mixtral with the router aux loss
          "pp2_qwen3_moe": dict(model=QWEN3_MOE), "pp2_mixtral_aux": dict(model=MIXTRAL, aux=AUX)}
WORLD4 = {"pp2_dp_shard2": dict(dp_shard=2), "pp2_dp_shard2_gpipe": dict(dp_shard=2, schedule="GPipe"),
          # HSDP inside each stage group: params replicated over dp_replicate 2 (no FSDP sharding,
          # dp_shard 1), gradients all-reduced across the replicas
          "pp2_hsdp": dict(dp_replicate=2),
          "pp2_tp2": dict(tp=2), "pp2_tp2_interleaved": dict(tp=2, schedule="Interleaved1F1B", spr=2, model=FOUR),
          # sequence parallel (Shard(1) hidden states sent as their local shard, re-wrapped on receipt) and
          # loss parallel (vocab-sharded logits into the loss on the last stage); ZBV: two stages per rank
          # and its split backward (input grads, then weight grads) through the re-wrapped DTensors
          "pp2_tp2_sp_lp": dict(tp=2, sp=True, lp=True),
          "pp2_tp2_sp_lp_zbv": dict(tp=2, sp=True, lp=True, schedule="ZBVZeroBubble", spr=2, model=FOUR),
          # LoRA: each rank adapts its stages' targets (after TP: A / B follow W's layout), FSDP'd with them
          "pp2_tp2_sp_lora": dict(tp=2, sp=True, lp=True, lora=True),
          # context parallel: each stage's blocks attend over the all-gathered K/V of the cp pair
          "pp2_cp2": dict(cp=2), "pp2_cp2_zbv": dict(cp=2, schedule="ZBVZeroBubble", spr=2, model=FOUR),
          # tied under tp (table and copy Shard(0) over the vocab) and under FSDP (+ Shard(0) over dp)
          "pp2_tied_tp2": dict(model=TIED, tp=2),
          "pp2_tied_dp_shard2_interleaved": dict(model=TIED4, dp_shard=2, schedule="Interleaved1F1B", spr=2),
          # pp 4: the pair (pp ranks 0 and 3) is a group of its own, the middle stages take no part
          "pp4_tied": dict(pp=4, model=TIED4),
          # expert parallel inside each stage group: ep 2 carved from its dp_shard 2 (2 of the 4 experts
          # per rank, all-to-all dispatch within the stage group); Mixtral also with the aux loss
          "pp2_ep2_qwen3_moe": dict(model=QWEN3_MOE, dp_shard=2, ep=2),
          "pp2_ep2_mixtral_aux": dict(model=MIXTRAL, dp_shard=2, ep=2, aux=AUX)}


# checkpoints saved under one layout and resumed under another (DCP by fully qualified names): the
# saving run is a parity case of the same launch that also saves at steps 3 and 6; the resuming
# case, later in the same launch (cases run in order), loads step 3 and trains steps 4-6
SAVES = {"pp2_interleaved", "pp2_dp_shard2", "pp2_tp2", "pp1_dp_shard2", "pp2_tied", "pp2_tied_tp2"}
RESUMES = {   # name: (world, saving case, layout it resumes under)
    "resume_interleaved_to_1f1b": (2, "pp2_interleaved", dict(model=FOUR)),
    "resume_pp1_to_pp2": (2, "pp1_dp_shard2", dict()),
    "resume_pp2_dp2_to_pp2_tp2": (4, "pp2_dp_shard2", dict(tp=2)),
    "resume_pp2_tp2_to_pp1_dp4": (4, "pp2_tp2", dict(pp=1, dp_shard=4)),
    # tied: the table saved once under model.embed_tokens.weight (by both ranks: DCP writes it once),
    # loaded into the one parameter of pp 1; from tp 2 shards into dp 4 shards
    "resume_tied_pp2_to_pp1_dp2": (2, "pp2_tied", dict(pp=1, dp_shard=2, model=TIED)),
    "resume_tied_pp2_tp2_to_pp1_dp4": (4, "pp2_tied_tp2", dict(pp=1, dp_shard=4, model=TIED)),
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


def ckpt_case(name="pp2_ckpt", every=3, **kw) -> dict:
    """pp 2 saving at steps 3 and 6 (kept: resumed under pp 1 below; the LoRA run's exported)."""
    plan = plan_of(recipe(name, 2, **kw))
    plan["checkpoint"].update(every_steps=every, keep=2)
    return {"name": name, "kind": "train", "plan": plan, "keep_run": True}


def text_recipe(name: str, world: int, tmp, **kw) -> dict:
    """Packed real text (Shakespeare lines, 3 per document, several documents per 32-token
    window: position_ids restart inside a window) with an eval split, evaluated at steps 3 and 6."""
    lines = [ln for ln in (ROOT / "data/shakespeare.txt").read_text().splitlines() if len(ln.split()) > 4][:120]
    docs = tmp / "docs.jsonl"
    if not docs.exists():              # written once: prepare's index records its size and mtime
        docs.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3])}) + "\n" for i in range(0, len(lines), 3)))
    rec = recipe(name, world, **kw)
    rec["train"]["eval_every"] = 3
    # prepared into <launch dir>/prepared (data.prepared_dir's default): tmp is the launch's cwd
    rec["data"] = {"format": "text", "sources": [{"path": str(docs)}], "tokenizer": str(ROOT / "data/tokenizer"),
                   "eval_fraction": 0.2}
    return rec


# packed real text under pp (Interleaved1F1B, 4 stages: micro-batches interleaved over the stages
# the most): name -> (world, mesh). pp 2 x cp 2: every stage forward makes its own micro-batch's
# document mask (runtime/pp.Stage -> cp.masks) and hands it to cp_attention as a kwarg, through
# AC's recompute (full AC here: the recompute must get that micro-batch's mask, not the last set;
# measured: a mask kept in cp._STATE per stage forward instead of the kwarg gives rel 7.7e-4; the
# kwarg, 5.7e-8)
TEXT = {"pp_text": (2, dict()), "pp_text_cp2": (4, dict(cp=2, ac="full"))}


def text_case(tmp, name="pp_text") -> dict:
    """A TEXT case on the packed text, its data prepared here (one process) first."""
    from meshbake.runtime.prepare import prepare

    world, kw = TEXT[name]
    plan = plan_of(text_recipe(name, world, tmp, schedule="Interleaved1F1B", spr=2, model=FOUR, **kw))
    here = os.getcwd()
    os.chdir(tmp)                      # before any thread starts: the launch runs in tmp
    try:
        prepare(P.from_dict(plan), quiet=True, log=lambda s: None)
    finally:
        os.chdir(here)
    return {"name": name, "kind": "train", "plan": plan, "keep_run": True}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp2, tmp4 = tmp_path_factory.mktemp("pp_world2"), tmp_path_factory.mktemp("pp_world4")
    runs = [(cases(2, WORLD2, tmp2) + [ckpt_case(), ckpt_case("pp2_lora", 6, lora=True), text_case(tmp2)], tmp2, 2),
            (cases(4, WORLD4, tmp4) + [text_case(tmp4, "pp_text_cp2")], tmp4, 4)]
    with ThreadPoolExecutor(2) as pool:
        launched = [pool.submit(torchrun, world, cs, tmp) for cs, tmp, world in runs]
        plans = {c["name"]: c["plan"] for cs, _, _ in runs for c in cs if c["plan"]["data"]["format"] == "synthetic"}
        # the reference depends on the model, the train section, the data and LoRA only (not the mesh,
        # the schedule, AC or checkpoints): a few distinct single-process runs serve all cases
        key = {n: json.dumps([d["model"]["config"], d["train"], d["data"], d["lora"]], sort_keys=True)
               for n, d in plans.items()}
        by_key = {k: reference_losses(P.from_dict(plans[n])) for n, k in reversed(key.items())}
        refs = {n: by_key[key[n]] for n in plans}
        res = [f.result() for f in launched]
    out = {}
    for (cs, tmp, _), r in zip(runs, res):
        for c in cs:
            out[c["name"]] = dict(r[c["name"]], plan=c["plan"], reference=refs.get(c["name"]), dir=tmp / c["name"])
    out["tmp2"] = tmp2
    return out


@pytest.fixture(scope="module")
def text_reference(results, tmp_path_factory):
    """The packed-text cases' reference: the runtime in one process without a pipeline (its own
    packed path, tests/test_packing.py checks it against documents run alone) on the pp_text
    run's prepared data (same documents, tokenizer, seq_len, dp 1: the same windows in the same
    order for every TEXT case). Returns (RunResult, metrics)."""
    from meshbake.runtime.train import run

    plan = P.from_dict(plan_of(text_recipe("pp_text", 1, results["tmp2"], pp=1, model=FOUR)))
    here = os.getcwd()
    os.chdir(results["tmp2"])          # the pp run's prepared data (same name, options: same pointer)
    try:
        with one_process_group():
            return run(plan, tmp_path_factory.mktemp("text_ref") / "run")
    finally:
        os.chdir(here)


def max_rel(a: dict, ref: dict, steps=range(1, STEPS + 1)) -> float:
    return max(abs(a[str(k)] - ref[k]) / abs(ref[k]) for k in steps)


@pytest.mark.parametrize("name", [*WORLD2, *WORLD4, "pp2_ckpt", "pp2_lora"])
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


def test_sp_lp_cases_ran_sequence_and_loss_parallel(results):
    """The two cases above are what they say: the compiler kept both flags on under pp."""
    for name in ("pp2_tp2_sp_lp", "pp2_tp2_sp_lp_zbv"):
        tp = results[name]["plan"]["tp"]
        assert (tp["sequence_parallel"], tp["loss_parallel"], results[name]["plan"]["mesh"]["pp"]) == (True, True, 2)


def test_cp_cases_ran_cp_attention(results):
    """The cp cases went through runtime/cp.py's attention (rank 0's blocks: 6 steps x 4
    micro-batches, + 1 shape-inference probe, per block it holds)."""
    assert results["pp2_cp2"]["cp_attention_calls"] == 25
    assert results["pp2_cp2_zbv"]["cp_attention_calls"] == 50


def test_moe_cases_ran_ep_and_the_aux_loss(results):
    """The MoE cases above are what they say: ep 2 holds 2 of the 4 experts per rank (rank 0,
    stage 0); with the aux loss on, the logged loss is CE + 0.1 x aux (the reference's
    transformers loss, matched per step above), about 0.1 x 2 above the same model without it
    (aux = E sum_e f_e P_e is ~k = 2 for near-uniform routing at init)."""
    assert results["pp2_ep2_qwen3_moe"]["ep_local_experts"] == results["pp2_ep2_mixtral_aux"]["ep_local_experts"] == 2
    assert results["pp2_mixtral_aux"]["plan"]["train"]["router_aux_loss_coef"] == AUX
    assert results["pp2_qwen3_moe"]["ep_local_experts"] is None
    ref = reference_losses(P.from_dict(plan_of(recipe("no_aux", 2, pp=1, dp_shard=2, model=MIXTRAL))))[0]
    gap = results["pp2_mixtral_aux"]["losses"]["1"] - ref[1]
    assert 0.5 * AUX * 2 < gap < 2 * AUX * 2, gap


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


def test_lora_under_pp_exports_the_trained_model(results, tmp_path):
    """The pp 2 LoRA run's step-6 checkpoint (rank 0: block 0's adapters, rank 1: block 1's, by
    their fully qualified names) exported by one process, W + s B A merged: from_pretrained gives
    the logits of the single-process LoRA reference after the same 6 steps."""
    import torch
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    from tests.dist.reference import hf_model, reference_run

    r = results["pp2_lora"]
    (r["dir"] / "plan.json").write_text(json.dumps(r["plan"]))     # what launch.sh's train.py copies there
    assert export_main([str(r["dir"]), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    plan = P.from_dict(r["plan"])
    *_, ref = reference_run(plan)
    ids = torch.arange(64).reshape(2, 32) * 37 % hf.config.vocab_size
    with torch.no_grad():
        got, want = hf(input_ids=ids).logits, ref.eval()(input_ids=ids).logits
        base = hf_model(plan).eval()(input_ids=ids).logits          # B = 0: the untrained base
    diff, moved = float((got - want).abs().max()), float((want - base).abs().max())
    print(f"export of the pp 2 LoRA run vs the reference: max abs logits diff {diff:.2e} (training moved them {moved:.2e})")
    assert not any("lora" in k for k in hf.state_dict())        # merged: a plain HF model
    assert moved > 100 * max(diff, 1e-7)                        # the adapters carry the 6 steps
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(TEXT))
def test_packed_text_with_eval_under_pp_matches_one_process(results, text_reference, name):
    """Real packed data under pp 2 (Interleaved1F1B, 4 stages; pp_text_cp2: x cp 2, full AC):
    every stage gets the windows' per-document position_ids, and eval runs the schedule forward
    only over the eval split (padded to whole groups of micro-batches with all-ignored filler).
    One process without a pipeline on the same prepared data: train losses and eval losses per
    step, rel 1e-4."""
    r, res = results[name], text_reference
    rows = [json.loads(line) for line in (r["dir"] / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}
    rel = max_rel(r["losses"], res.losses)
    erel = max(abs(evals[k] - res.evals[k]) / res.evals[k] for k in (3, 6))
    print(f"{name}: max rel loss diff vs one process {rel:.2e}, eval loss (steps 3, 6) {erel:.2e}")
    assert sorted(evals) == sorted(res.evals) == [3, 6]
    assert rel < RTOL and erel < RTOL, (r["losses"], res.losses, evals, res.evals)
    assert max_rel(r["grad_norms"], res.grad_norms) < 10 * RTOL
    assert len({round(v, 5) for v in res.losses.values()}) == STEPS and res.evals[3] != res.evals[6]
    if TEXT[name][1].get("cp", 1) > 1:   # it went through cp's attention (rank 0: 2 blocks of 4)
        assert r["cp_attention_calls"] > 0 and r["plan"]["mesh"]["cp"] == 2


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


def test_tied_embeddings_under_pp_one_table_the_one_process_checkpoint_keys(results):
    """Tied embeddings under pp: rank 0 (first stage) holds the table, not lm_head; under ZBV
    rank 0 runs the first and the last stage, one parameter for both. The checkpoints the pp 2
    runs saved (first and last stage on two ranks, each with its copy) hold the model keys one
    process saves (the HF model's state_dict: model.embed_tokens.weight, and lm_head.weight, the
    same tensor under its alias, as without pp) and the table's AdamW state once, under
    model.embed_tokens.weight (the resume cases above load them into pp 1's one parameter: exact)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoConfig, AutoModelForCausalLM

    first, zbv = results["pp2_tied"]["tied"], results["pp2_tied_zbv"]["tied"]
    assert first["held"] == [True, False] and not first["lm_head_listed"], first
    assert zbv["held"] == [True, True] and zbv["same_param"] and not zbv["lm_head_listed"], zbv
    with torch.device("meta"):
        one = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TIED))
    for run in ("pp2_tied", "pp2_tied_tp2"):
        md = FileSystemReader(str(results[run]["dir"] / "checkpoints" / "step-3")).read_metadata()
        model_keys = {k for k in md.state_dict_metadata if k.startswith("model.")}
        want = {f"model.{k}" for k in one.state_dict()}
        assert model_keys == want, (run, model_keys ^ want)
        table = sorted(k for k in md.state_dict_metadata if k.startswith("optim.state.")
                       and ("embed_tokens" in k or "lm_head" in k))
        assert table == [f"optim.state.model.embed_tokens.weight.{k}" for k in ("exp_avg", "exp_avg_sq", "step")], table
        assert tuple(md.state_dict_metadata["model.model.embed_tokens.weight"].size) == (4096, 64)
