"""QLoRA (lora.quantize_base: nf4, runtime/quant.py): the LoRA targets' frozen base weights stored
4-bit NF4 by torchao's NF4Tensor, the adapters as in runtime/lora.py.

(a) world 1, in this process: loss and adapter gradients equal LoRA's on the dequantized weights
    (W_deq = the NF4 round trip of W, fp32 compute), relative 1e-5: the same math.
(b) one torchrun launch, dp_shard 2 (FSDP2 shards and all-gathers the NF4 storage): the same
    loss and gradients as world 1, and 3 trained steps' losses within 1e-4 of world 1's; so are
    cp 2's (FSDP over the flattened dp_shard x cp mesh).
(c) `meshbake export` of that run: a plain HF folder (dequantized base + merged adapters) giving
    the trained logits.
(d) refused at compile time where torchao cannot shard NF4 (tp, HSDP), with the reason.
(e) memory: the estimate's NF4 storage equals what the job's own build allocates (dry run)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchao  # noqa: F401 -- `make install` installs the qlora extra: missing it fails loudly, never skips
import yaml
from meshbake.compiler.pipeline import compile_recipe
from meshbake.runtime import plan as P

from tests.dist.lora_worker import INPUT, adapter_value
from tests.helpers import ROOT, compile_, one_process_group, paths, plan_of, recipe_text, resolve, tiny_recipe, torchrun

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"rank": 4, "alpha": 8.0, "targets": TARGETS}
CFG256 = str(ROOT / "tests/dist/configs/tiny-llama-256.json")   # every target splits into 256-scaler blocks on 2 ranks
REL = 1e-5


def qlora_plan(name: str, world: int, quantize: str = "nf4", **kw) -> dict:
    return plan_of(tiny_recipe(name, world, lora={**LORA, "quantize_base": quantize}, **kw))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def world1(plan: P.Plan, dequantize: bool = False) -> tuple[float, dict[str, torch.Tensor], torch.nn.Module]:
    """One forward + backward of the runtime's model at world 1, adapters set non-zero;
    dequantize: a plain LoRA plan whose targets' W are replaced by their NF4 round trip."""
    from meshbake.runtime.lora import lora_targets
    from meshbake.runtime.parallel import build, set_full
    from meshbake.runtime.quant import dequantized
    from meshbake.runtime.train import forward_loss_sum, world_mesh

    with one_process_group():
        model = build(plan, world_mesh(plan), torch.device("cpu"))
        for name, p in model.named_parameters():
            if ".lora_" in name:
                set_full(p, adapter_value(name, p.shape))
        if dequantize:
            with torch.no_grad():
                for _, m in lora_targets(model, plan):
                    m.weight.copy_(dequantized(m.weight, 1))
        ids = torch.tensor(INPUT)
        loss = forward_loss_sum(model, ids[:, :-1], ids[:, 1:], False) / ids[:, 1:].numel()
        loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}, model


def _compare(got, want) -> float:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert sorted(grads) == sorted(ref_grads) and grads
    worst = abs(loss - ref_loss) / abs(ref_loss)
    for n, g in ref_grads.items():
        assert float(g.norm()) > 0, n
        worst = max(worst, _rel(grads[n], g))
    return worst


# ------------------------------------------------------------------- (a) world 1
def test_world1_qlora_is_lora_on_the_dequantized_weights():
    from torchao.quantization import NF4Tensor

    q = P.from_dict(qlora_plan("qlora_w1", 1))
    loss, grads, model = world1(q)
    ref_loss, ref_grads, _ = world1(P.from_dict(qlora_plan("lora_deq_w1", 1, quantize="none")), dequantize=True)
    worst = _compare((loss, grads), (ref_loss, ref_grads))
    print(f"world 1 QLoRA vs LoRA on W_deq: max rel {worst:.2e} (loss {loss:.6f})")
    assert worst < REL
    # and NF4 changed the weights (vs plain LoRA on W): the test is not of two equal models
    _, plain_grads, _ = world1(P.from_dict(qlora_plan("lora_w1", 1, quantize="none")))
    off = max(_rel(grads[n], g) for n, g in plain_grads.items())
    print(f"QLoRA vs LoRA on the unquantized W: adapter gradients differ by up to {off:.2e}")
    assert off > 1e-2
    for name, p in model.named_parameters():
        is_target = name.rsplit(".", 2)[-2] in TARGETS and name.endswith(".weight")
        assert isinstance(p, NF4Tensor) == is_target, name
        assert p.requires_grad == (".lora_" in name), name
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32


# ------------------------------------------------------------ (b), (c) dp_shard 2
@pytest.fixture(scope="module")
def dist2(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("qlora")
    grads_plan = qlora_plan("qlora_fsdp2", 2, model=CFG256)
    train_plan = qlora_plan("qlora_fsdp2_train", 2, model=CFG256,
                            train={"steps": 3, "warmup_steps": 1, "lr": 1e-2},
                            checkpoint={"every_steps": 3, "keep": 1, "save_on_exit": False})
    cp_plan = qlora_plan("qlora_cp2_train", 2, model=CFG256, mesh={"dp_shard": 1, "cp": 2},
                         train={"steps": 3, "warmup_steps": 1, "lr": 1e-2})
    for name, d in (("plan", grads_plan), ("train", train_plan), ("cp", cp_plan)):
        (tmp / f"{name}.json").write_text(json.dumps(d))
    torchrun(2, ROOT / "tests/dist/qlora_worker.py", str(tmp / "plan.json"), str(tmp / "out.pt"),
             str(tmp / "train.json"), str(tmp / "cp.json"), cwd=tmp)
    return dict(torch.load(tmp / "out.pt"), grads_plan=grads_plan, train_plan=train_plan, tmp=tmp)


@pytest.mark.dist
def test_fsdp2_shards_nf4_and_matches_world1(dist2):
    """dp_shard 2: each rank holds half of every NF4 weight's packed storage (rows / 2), and the
    gathered NF4 gives world 1's loss and adapter gradients; 3 trained steps match world 1's."""
    from meshbake.runtime.quant import nf4_bytes

    held = dist2["held"]
    q = held["model.layers.0.self_attn.q_proj.weight"]
    assert q[0] == "NF4Tensor" and q[1] == (128, 256), q
    assert q[2] == nf4_bytes(128 * 256, 256, 4), q       # 0.5 + 1/64 byte per element + factors, fp32
    assert held["model.embed_tokens.weight"][0] == "Tensor"
    plan = P.from_dict(dist2["grads_plan"])
    w1 = world1(P.from_dict({**dist2["grads_plan"], "mesh": {**dist2["grads_plan"]["mesh"], "dp_shard": 1}}))
    worst = _compare((dist2["loss"], dist2["grads"]), w1[:2])
    print(f"dp_shard 2 QLoRA vs world 1 QLoRA: max rel {worst:.2e}")
    assert plan.mesh.fsdp_enabled and worst < 1e-5
    # training: 3 steps at world 1 in this process vs the launch
    from meshbake.runtime.train import run

    tp = dist2["train_plan"]
    one = P.from_dict({**tp, "mesh": {**tp["mesh"], "dp_shard": 1},
                       "train": {**tp["train"], "grad_accum": tp["train"]["grad_accum"] * 2},
                       "checkpoint": {**tp["checkpoint"], "every_steps": 0}})
    with one_process_group():
        losses = run(one, dist2["tmp"] / "world1_run").losses
    got = dist2["losses"]
    worst = max(abs(got[s] - losses[s]) / abs(losses[s]) for s in (1, 2, 3))
    print(f"3 steps, dp_shard 2 vs world 1: losses {got} vs {losses}, max rel {worst:.2e}")
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    assert worst < 1e-4
    assert abs(got[3] - got[1]) > 1e-3            # it trained
    # cp 2 (FSDP2 over the flattened dp_shard x cp mesh, each rank half of every sequence)
    cp = dist2["cp_losses"]
    worst = max(abs(cp[s] - losses[s]) / abs(losses[s]) for s in (1, 2, 3))
    print(f"3 steps, cp 2 vs world 1: losses {cp}, max rel {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.dist
def test_export_merges_adapters_into_the_dequantized_base(dist2, tmp_path):
    """The checkpoint holds the adapters only; export rebuilds the NF4 base, dequantizes, merges:
    from_pretrained gives the logits the sharded QLoRA model computed after training."""
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    run_dir = Path(dist2["run_dir"])
    assert export_main([str(run_dir), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(INPUT)).logits
    torch.testing.assert_close(got, dist2["logits"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ (d) compile-time refusals
@pytest.mark.parametrize("mesh,path_word", [({"tp": 2, "dp_shard": 1}, "mesh.tp 2"),
                                            ({"dp_replicate": 2, "dp_shard": 1}, "mesh.dp_replicate 2")])
def test_meshes_torchao_cannot_shard_are_refused(mesh, path_word):
    rec = tiny_recipe("q", 2, mesh=mesh, lora={**LORA, "quantize_base": "nf4"})
    err = compile_recipe(yaml.safe_dump(rec), source="q")
    assert not hasattr(err, "files")
    assert "lora.quantize_base" in paths(err)
    msg = next(e for e in err.errors if e.path == "lora.quantize_base")
    assert path_word in msg.message and "torchao" in msg.message, msg


def test_nf4_without_lora_and_rows_that_do_not_split_are_refused():
    err = compile_(recipe_text(lora={"rank": 0, "quantize_base": "nf4"}))
    assert "lora.quantize_base" in paths(err)
    # tiny-llama k_proj has 32 rows x 64: 64 ranks cannot each hold whole 64-element blocks
    rec = tiny_recipe("q", 64, lora={**LORA, "quantize_base": "nf4"},
                      train={"global_batch_size": 128, "micro_batch_size": 2})
    err = compile_recipe(yaml.safe_dump(rec), source="q")
    assert "lora.quantize_base" in paths(err), err


# ----------------------------------------------------------------- (e) memory
def test_estimate_counts_nf4_storage_as_the_build_allocates():
    """The job's own build (dry run, meta tensors, fake process group of 2) holds exactly the
    estimate's parameter bytes: NF4 targets at 0.5 + 1/64 byte per element + factors, the rest fp32."""
    from meshbake.runtime.dryrun import build_rank

    rec = tiny_recipe("qlora_mem", 2, model=CFG256, lora={**LORA, "quantize_base": "nf4"})
    res = resolve(yaml.safe_dump(rec))
    r0 = build_rank(res.plan, 0)
    assert r0["ok"], r0
    est = res.estimate
    lora_res = resolve(yaml.safe_dump(tiny_recipe("lora_mem", 2, model=CFG256, lora=LORA)))
    print(f"params per rank: QLoRA {est.params_bytes:,} B (built {r0['param_bytes']:,}) vs LoRA "
          f"{lora_res.estimate.params_bytes:,} B; peak {est.total_bytes:,} vs {lora_res.estimate.total_bytes:,}")
    assert r0["param_bytes"] == est.params_bytes
    assert est.params_bytes < lora_res.estimate.params_bytes


# ------------------------------------------------- resume and export of a bf16 QLoRA run
def test_bf16_qlora_resumes_from_adapters_only_and_exports_bf16(tmp_path):
    """A bf16 base (the usual QLoRA): the checkpoint holds the adapters (and their AdamW state)
    only; a resumed run rebuilds the NF4 base and continues exactly; the export is bf16 safetensors."""
    from meshbake.runtime.export import main as export_main
    from meshbake.runtime.train import run
    from safetensors import safe_open

    rec = tiny_recipe("qlora_bf16", 1, lora={**LORA, "quantize_base": "nf4"},
                      train={"steps": 3, "warmup_steps": 1, "lr": 1e-2,
                             "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}},
                      checkpoint={"every_steps": 2, "keep": 2, "save_on_exit": False})
    rec["model"]["dtype"] = "bfloat16"
    plan = P.from_dict(plan_of(rec))
    with one_process_group():
        straight = run(plan, tmp_path / "a").losses
    saved = tmp_path / "a/checkpoints/step-2"
    with one_process_group():
        names = set(torch.distributed.checkpoint.FileSystemReader(str(saved)).read_metadata().state_dict_metadata)
    model_keys = {k for k in names if k.startswith("model.")}
    assert model_keys and all(".lora_" in k for k in model_keys), sorted(model_keys)[:4]
    # resume: a copy of the run holding step 2 only
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("step-3*", "metrics.jsonl"))
    with one_process_group():
        resumed = run(plan, tmp_path / "b").losses
    print(f"bf16 QLoRA: straight {straight}, resumed from step 2 {resumed}")
    assert resumed[3] == pytest.approx(straight[3], rel=1e-6)
    (tmp_path / "a/plan.json").write_text(P.dumps(plan))
    assert export_main([str(tmp_path / "a"), "-o", str(tmp_path / "hf")]) == 0
    with safe_open(str(tmp_path / "hf/model.safetensors"), framework="pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}


def test_preflight_names_a_missing_torchao(monkeypatch):
    """launch.sh's preflight: a QLoRA bundle on an environment without torchao fails in one line."""
    import importlib.util

    from meshbake.runtime import preflight

    plan = P.from_dict(qlora_plan("qlora_pre", 1))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert any("torchao" in p and "meshbake[qlora]" in p for p in preflight.problems(plan))
    assert not any("torchao" in p for p in preflight.problems(P.from_dict(qlora_plan("lora_pre", 1, quantize="none"))))


def test_block_by_block_weight_load_is_a_phase_and_70b_fits_on_80gb():
    """runtime/parallel.build_quantized allocates one block (then the root) whole in model.dtype
    beside the NF4 shards: an estimate phase (params + the larger of one block and the root +
    to_nf4's transient), below training's peak for a 70B QLoRA on 8 x 80 GB."""
    text = (ROOT / "recipes/70b_lora_fsdp_tp.yaml").read_text()
    res = resolve(text, "mesh.tp=1", "mesh.dp_shard=8", "train.global_batch_size=64", "lora.quantize_base=nf4")
    est = res.estimate
    load = dict(est.phases)["weight load (QLoRA)"]
    root = 2 * 128256 * 8192 * 2                        # embed_tokens + lm_head, bf16, whole
    assert est.params_bytes + root < load < est.params_bytes + root + 2e9
    assert est.peak_phase == "loss backward" and load < est.total_bytes


def test_weights_from_disk_are_quantized_block_by_block(tmp_path):
    """model.weights: build_quantized reads each block's tensors (load_weights only=) before its
    NF4 quantization; the result is LoRA on the dequantized disk weights, exactly."""
    from meshbake.runtime.parallel import hf_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    m = AutoModelForCausalLM.from_config(hf_config(P.from_dict(qlora_plan("x", 1)).model.config), dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    m.save_pretrained(tmp_path / "w")
    q, lo = qlora_plan("qw", 1), qlora_plan("lw", 1, quantize="none")
    q["model"]["weights"] = lo["model"]["weights"] = str(tmp_path / "w")
    got = world1(P.from_dict(q))
    assert _compare(got[:2], world1(P.from_dict(lo), dequantize=True)[:2]) < REL
    assert _compare(got[:2], world1(P.from_dict(lo))[:2]) > 1e-2        # NF4 is not W
