"""Parity: the runtime on a device mesh reproduces a single-process run of the same model,
weights and global batch (the way the PyTorch team tests DTensor). Real torchrun, gloo, CPU.

Two torchrun launches (world 4 and world 2, at the same time) run every case in one process
group each; the per-step losses of 6 optimizer steps are compared with tests/dist/reference.py.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from meshbake.runtime import plan as P
from meshbake.runtime.checkpoint import list_checkpoints

from tests.dist.reference import reference_losses
from tests.helpers import ROOT, plan_of, tiny_recipe
from tests.helpers import torchrun as launch

pytestmark = pytest.mark.dist
RTOL = 1e-4          # the bar for fp32; Adam amplifies rounding differences step by step
STEPS = 6


def plan_dict(name: str, world: int, *, dp_replicate=1, dp_shard=1, tp=1, cp=1, sp=False, lp=False,
              model="tiny-llama", mbs=2, gbs=8, ac="none", compile_=False, param_dtype="float32",
              lora=0) -> dict:
    return plan_of(tiny_recipe(
        name, world, mesh={"dp_replicate": dp_replicate, "dp_shard": dp_shard, "cp": cp, "tp": tp}, sp=sp, lp=lp,
        model=model,
        train={"micro_batch_size": mbs, "global_batch_size": gbs, "steps": STEPS, "lr": 2e-3, "min_lr": 2e-4,
               "warmup_steps": 2, "grad_clip": 1.0, "activation_checkpointing": ac, "compile": compile_,
               "mixed_precision": {"param_dtype": param_dtype, "reduce_dtype": "float32"}},
        lora={"rank": lora, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]}))


def cases_world4(weights: str) -> list[dict]:
    mha = str(ROOT / "tests/dist/configs/tiny-llama-mha.json")    # 4 kv heads: tp 4 divides them
    c = [("dp_shard4", dict(dp_shard=4)),
         ("tp4_sp_lp", dict(tp=4, sp=True, lp=True, model=mha)), ("tp4", dict(tp=4, model=mha)),
         ("dp_shard2_tp2_sp_lp", dict(dp_shard=2, tp=2, sp=True, lp=True)), ("dp_shard2_tp2", dict(dp_shard=2, tp=2)),
         ("hsdp2x2", dict(dp_replicate=2, dp_shard=2)),
         ("dp_rep2_tp2_sp_lp", dict(dp_replicate=2, tp=2, sp=True, lp=True)), ("dp_rep2_tp2", dict(dp_replicate=2, tp=2)),
         ("tied_dp_shard2_tp2_sp_lp", dict(dp_shard=2, tp=2, sp=True, lp=True, model="tiny-qwen")),
         ("tied_tp4", dict(tp=4, model=str(ROOT / "tests/dist/configs/tiny-qwen-mha.json"))),
         ("accum1_dp_shard2_tp2", dict(dp_shard=2, tp=2, sp=True, lp=True, mbs=4)),
         ("ac_full", dict(dp_shard=2, tp=2, sp=True, lp=True, ac="full")),
         ("ac_selective", dict(dp_shard=2, tp=2, sp=True, lp=True, ac="selective")),
         ("bf16_params", dict(dp_shard=2, tp=2, sp=True, lp=True, param_dtype="bfloat16")),
         ("lora_dp_shard2_tp2_sp_lp", dict(dp_shard=2, tp=2, sp=True, lp=True, lora=4)),
         ("lora_dp_shard4", dict(dp_shard=4, lora=4)),
         ("cp2_dp_shard2", dict(dp_shard=2, cp=2)), ("cp2_tp2_sp_lp", dict(cp=2, tp=2, sp=True, lp=True)),
         ("hsdp_cp2", dict(dp_replicate=2, cp=2))]
    out = [{"name": n, "kind": "train", "plan": plan_dict(n, 4, **kw)} for n, kw in c]
    logits = plan_dict("logits4", 4, dp_shard=2, tp=2, sp=True, lp=True)
    logits["model"]["weights"] = weights
    out.append({"name": "logits4", "kind": "logits", "plan": logits, "input": INPUT})
    return out


def cases_world2(weights: str) -> list[dict]:
    c = [("tp2_sp_lp", dict(tp=2, sp=True, lp=True)), ("tp2", dict(tp=2)),
         ("compile_tp2_sp_lp", dict(tp=2, sp=True, lp=True, compile_=True))]
    out = [{"name": n, "kind": "train", "plan": plan_dict(n, 2, **kw)} for n, kw in c]
    exp = plan_dict("export_tp2", 2, tp=2, sp=True, lp=True, model="tiny-qwen")   # tied: the hard case
    exp["checkpoint"].update(every_steps=STEPS, keep=1)
    out.append({"name": "export_tp2", "kind": "train", "plan": exp, "keep_run": True, "input": INPUT})
    exp_lora = plan_dict("export_lora_tp2", 2, tp=2, sp=True, lp=True, lora=4)   # adapters must be merged
    exp_lora["checkpoint"].update(every_steps=STEPS, keep=1)
    out.append({"name": "export_lora_tp2", "kind": "train", "plan": exp_lora, "keep_run": True, "input": INPUT})
    logits = plan_dict("logits2", 2, tp=2)
    logits["model"]["weights"] = weights
    out.append({"name": "logits2", "kind": "logits", "plan": logits, "input": INPUT})
    out.append({"name": "shared_dir", "kind": "shared_dir", "plan": logits})
    # lr 1e30: AdamW moves every weight by ~1e30 at step 1, the step-2 forward overflows
    boom = plan_dict("diverge_tp2", 2, tp=2, sp=True, lp=True)
    boom["train"].update(lr=1e30, min_lr=1e30)
    boom["checkpoint"].update(every_steps=1, keep=2)
    out.append({"name": "diverge_tp2", "kind": "diverge", "plan": boom})
    return out


INPUT = [[(7 * i + 3 * j) % 4096 for i in range(32)] for j in range(2)]


def torchrun(world: int, cases: list[dict], tmp: Path) -> dict:
    (tmp / "cases.json").write_text(json.dumps(cases))
    launch(world, ROOT / "tests/dist/worker.py", str(tmp / "cases.json"), str(tmp / "out.json"), cwd=tmp)
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A tiny Llama written by save_pretrained (safetensors), as a user's checkpoint would be."""
    from meshbake.runtime.parallel import hf_config
    from transformers import AutoModelForCausalLM

    cfg = hf_config(json.loads((ROOT / "compiler/catalog/tiny-llama.json").read_text()))
    torch.manual_seed(1234)
    folder = tmp_path_factory.mktemp("weights")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def results(tmp_path_factory, weights) -> dict:
    """Both launches at once, and the single-process references computed here meanwhile: a
    launch leaves cores idle while ranks wait for each other (start-up, the compile case)."""
    runs = [(cases, tmp_path_factory.mktemp(f"world{world}"), world)
            for world, cases in ((4, cases_world4(weights)), (2, cases_world2(weights)))]
    plans = {c["name"]: c["plan"] for cases, _, _ in runs for c in cases}
    with ThreadPoolExecutor(2) as pool:
        launched = [pool.submit(torchrun, world, cases, tmp) for cases, tmp, world in runs]
        refs = {name: _reference(plans[name]) for name in PARITY}
        res = [f.result() for f in launched]
    out = {}
    for (cases, _, _), r in zip(runs, res):
        for case in cases:
            out[case["name"]] = dict(r[case["name"]], plan=case["plan"], reference=refs.get(case["name"]))
    return out


def max_rel(a: dict, b: dict) -> float:
    assert sorted(map(int, a)) == sorted(map(int, b)) == list(range(1, STEPS + 1))
    return max(abs(a[str(k)] - b[k]) / abs(b[k]) for k in b)


def _reference(plan_d: dict):
    return reference_losses(P.from_dict(plan_d))


PARITY = ["dp_shard4", "tp4_sp_lp", "tp4", "dp_shard2_tp2_sp_lp", "dp_shard2_tp2", "hsdp2x2", "dp_rep2_tp2_sp_lp",
          "dp_rep2_tp2", "tp2_sp_lp", "tp2", "tied_dp_shard2_tp2_sp_lp", "tied_tp4", "accum1_dp_shard2_tp2",
          "ac_full", "ac_selective", "compile_tp2_sp_lp", "lora_dp_shard2_tp2_sp_lp", "lora_dp_shard4",
          "cp2_dp_shard2", "cp2_tp2_sp_lp", "hsdp_cp2"]


@pytest.mark.parametrize("name", PARITY)
def test_loss_parity_with_single_process(results, name):
    r = results[name]
    ref_losses, ref_norms = r["reference"]
    rel = max_rel(r["losses"], ref_losses)
    print(f"{name}: max rel loss diff {rel:.2e}")
    assert rel < RTOL, (name, r["losses"], ref_losses)
    # DTensor-aware clipping gives the same total norm as plain clip_grad_norm_
    assert max_rel(r["grad_norms"], ref_norms) < 1e-3
    if not r["plan"]["lora"]["rank"]:
        assert ref_losses[STEPS] < ref_losses[1]     # and it trains


def test_grad_accum_matches_one_large_micro_batch(results):
    assert results["dp_shard2_tp2_sp_lp"]["plan"]["train"]["grad_accum"] == 2
    assert results["accum1_dp_shard2_tp2"]["plan"]["train"]["grad_accum"] == 1
    a, b = results["dp_shard2_tp2_sp_lp"]["losses"], results["accum1_dp_shard2_tp2"]["losses"]
    assert max(abs(a[k] - b[k]) / abs(b[k]) for k in b) < RTOL


def test_tied_embeddings_stay_one_parameter(results):
    for name in ("tied_dp_shard2_tp2_sp_lp", "tied_tp4"):
        tied = results[name]["tied"]
        assert tied["same_param"] and not tied["lm_head_listed"], tied


def test_lora_starts_from_the_base_model_and_adapts(results):
    """B = 0 at init: step 1 is the base model's loss; then only adapters move (frozen base)."""
    base, lora = results["dp_shard2_tp2_sp_lp"]["losses"], results["lora_dp_shard2_tp2_sp_lp"]["losses"]
    assert abs(lora["1"] - base["1"]) < 1e-6
    assert abs(lora[str(STEPS)] - base[str(STEPS)]) > 1e-3


def test_context_parallel_attention_really_ran(results):
    # 6 steps x grad_accum x 2 layers, forward (+ recompute none): the all-gather attention ran
    for name in ("cp2_dp_shard2", "cp2_tp2_sp_lp", "hsdp_cp2"):
        r = results[name]
        assert r["cp_attention_calls"] == STEPS * r["plan"]["train"]["grad_accum"] * 2, (name, r["cp_attention_calls"])
    assert results["dp_shard4"]["cp_attention_calls"] == 0


def test_compile_really_compiled(results):
    assert results["compile_tp2_sp_lp"]["compiled"] and not results["tp2_sp_lp"]["compiled"]


def test_activation_checkpointing_same_loss(results):
    base = results["dp_shard2_tp2_sp_lp"]["losses"]
    for name in ("ac_full", "ac_selective"):
        other = results[name]["losses"]
        assert max(abs(other[k] - base[k]) / abs(base[k]) for k in base) < 1e-5, name


def test_bf16_mixed_precision_trains_close_to_fp32(results):
    """param_dtype bf16 (8 mantissa bits), reduce fp32: same trajectory within bf16 rounding."""
    assert results["bf16_params"]["plan"]["train"]["mixed_precision"]["param_dtype"] == "bfloat16"
    bf, fp = results["bf16_params"]["losses"], results["dp_shard2_tp2_sp_lp"]["losses"]
    rel = max(abs(bf[k] - fp[k]) / abs(fp[k]) for k in fp)
    assert 0 < rel < 2e-2, rel     # > 0: bf16 really was used


@pytest.mark.parametrize("name", ["logits4", "logits2"])
def test_weights_from_disk_match_hf_forward(results, weights, name):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(weights).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(INPUT)).logits
    got = torch.load(results[name]["logits"])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not math.isnan(float(got.abs().max()))
    # every tensor was read as this rank's block of the file, none in full
    assert results[name]["load"]["full"] == 0 and results[name]["load"]["block"] > 0, results[name]["load"]


@pytest.mark.parametrize("name", ["export_tp2", "export_lora_tp2"])
def test_export_gives_hf_folder_with_the_trained_logits(results, tmp_path, name):
    """meshbake export: DCP shards of a TP run -> one HF folder; from_pretrained gives the
    logits the sharded model computed after training (tied embeddings; LoRA adapters merged)."""
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    run_dir = Path(results[name]["run_dir"])
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "COMMITTED").is_file()
    assert export_main([str(run_dir), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    if name == "export_tp2":
        assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert not any("lora" in k for k in hf.state_dict())      # a plain HF model
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(INPUT)).logits
    torch.testing.assert_close(got, torch.load(run_dir / "logits.pt"), rtol=1e-5, atol=1e-5)


def test_run_dir_on_node_local_disks_is_refused_at_start(results):
    """Checkpoints need one run dir seen by every rank; per-rank dirs (node-local disks) are
    an error before training, not a failed resume hours later."""
    r = results["shared_dir"]
    assert r["shared_error"] is None, r
    assert r["unshared_error"] and "is not shared" in r["unshared_error"], r
    assert "MESHBAKE_RUN_DIR" in r["unshared_error"]


def test_divergence_stops_before_saving_nan_weights(results):
    """A non-finite loss stops every rank before the step's checkpoint: the last committed
    checkpoint is the good one, not NaN weights that would prune it."""
    r = results["diverge_tp2"]
    assert r["stopped"] and "non-finite" in r["stopped"], r
    step = int(r["stopped"].rsplit(" ", 1)[1])
    run_dir = Path(r["run_dir"])
    kept = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    assert kept and max(kept) == step - 1, (kept, step)
    assert "not finite; stopping without a checkpoint" in (run_dir / "train.log").read_text()
