"""LoRA's unmerged form (runtime/lora.py: y = x W^T + s dropout(x) A^T B^T): the same loss and
adapter gradients as the merged math F.linear(x, W + s B A) and as PEFT's own LoRA on the same
weights (fp32, relative 1e-5), at world 1 in this process and at dp_shard 2 x tp 2 + sequence
parallel + loss parallel (one torchrun launch); the frozen W gets no gradient and no out x in
temporary; the adapters are float32 over a bf16 base; lora.dropout reaches the adapter input;
the adapter adds no collective under TP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from meshbake.runtime import plan as P
from meshbake.runtime.lora import add_adapters
from torch.utils._python_dispatch import TorchDispatchMode

from tests.dist.lora_worker import INPUT, adapter_value
from tests.helpers import ROOT, one_process_group, plan_of, tiny_recipe, torchrun

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
S = ALPHA / RANK
REL = 1e-5


def lora_plan(name: str, world: int, *, dtype: str = "float32", dropout: float = 0.0, **kw) -> dict:
    r = tiny_recipe(name, world, lora={"rank": RANK, "alpha": ALPHA, "dropout": dropout, "targets": TARGETS}, **kw)
    r["model"]["dtype"] = dtype
    return plan_of(r)


# ------------------------------------------------------------------------ one Linear
class Shapes(TorchDispatchMode):
    """The shape of every tensor an op produces (forward and backward), but views of `frozen`
    (W transposed for the matmuls is W, not a temporary)."""

    def __init__(self, frozen: torch.Tensor):
        super().__init__()
        self.frozen = frozen.untyped_storage().data_ptr()
        self.seen: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.frozen:
                self.seen.add(tuple(sorted(t.shape)))
        return out


def _linear(bias: bool = True, dropout: float = 0.0) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=bias)          # out != in: an (12, 16) tensor can only be W-sized
    lin.requires_grad_(False)
    add_adapters(lin, RANK, S, dropout, "replicate")
    with torch.no_grad():
        lin.lora_A.copy_(torch.randn(RANK, 16))
        lin.lora_B.copy_(torch.randn(12, RANK))
    return lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_adapted_linear_is_the_merged_math_without_a_weight_sized_tensor():
    lin = _linear()
    x = torch.randn(3, 5, 16, requires_grad=True)
    with Shapes(lin.weight) as seen:
        y = lin(x)
        (y * torch.arange(12.0)).sum().backward()
    assert (12, 16) not in seen.seen, "a full out x in temporary (W + s B A, or W's gradient) was formed"
    assert lin.weight.grad is None and lin.bias.grad is None
    a, b = lin.lora_A.detach().clone().requires_grad_(), lin.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    want = F.linear(x2, lin.weight + S * (b @ a), lin.bias)
    (want * torch.arange(12.0)).sum().backward()
    assert _rel(y, want) < REL
    assert _rel(lin.lora_A.grad, a.grad) < REL and _rel(lin.lora_B.grad, b.grad) < REL
    assert _rel(x.grad, x2.grad) < REL
    assert lin.lora_A.dtype == lin.lora_B.dtype == torch.float32


def test_dropout_drops_the_adapter_input_only_and_only_in_training():
    lin = _linear(dropout=0.5)
    x = torch.randn(4, 16)
    torch.manual_seed(7)
    y = lin(x)
    torch.manual_seed(7)
    h = F.dropout(x, 0.5, True)
    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias) + S * F.linear(F.linear(h, lin.lora_A), lin.lora_B)
        merged = F.linear(x, lin.weight + S * lin.lora_B @ lin.lora_A, lin.bias)
    assert _rel(y, want) < REL and _rel(y, merged) > 1e-3
    lin.eval()
    assert _rel(lin(x), merged) < REL


def test_adapters_compute_in_a_bf16_input_dtype_and_stay_fp32():
    lin = _linear().to(torch.bfloat16)
    lin.lora_A.data, lin.lora_B.data = lin.lora_A.data.float(), lin.lora_B.data.float()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.lora_A.grad.dtype == lin.lora_B.grad.dtype == torch.float32


# --------------------------------------------------------------- a whole model, world 1
def base_hf(plan: P.Plan) -> nn.Module:
    """The plain HF model with the runtime's initial values (as tests/dist/reference.py)."""
    from meshbake.runtime.parallel import hf_config, init_tensor
    from transformers import AutoModelForCausalLM

    cfg = hf_config(plan.model.config)
    cfg._attn_implementation = plan.model.attn_implementation
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name, p.shape, plan.train.seed, cfg.initializer_range))
    model.requires_grad_(False)
    return model


def _loss(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor(INPUT)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(0, 1))


def merged_reference(plan: P.Plan) -> tuple[float, dict[str, torch.Tensor]]:
    """The old form: every target computes F.linear(x, W + s B A)."""
    from meshbake.runtime.roles import plan_roles

    model = base_hf(plan)
    params = {}
    for fqn in plan_roles(plan).lora_targets:
        mod = model.get_submodule(fqn)
        for part in ("lora_A", "lora_B"):
            shape = (RANK, mod.in_features) if part == "lora_A" else (mod.out_features, RANK)
            p = nn.Parameter(adapter_value(f"{fqn}.{part}", shape))
            setattr(mod, part, p)
            params[f"{fqn}.{part}"] = p
        mod.register_forward_hook(lambda m, args, out: F.linear(args[0], m.weight + S * (m.lora_B @ m.lora_A), m.bias))
    loss = _loss(model)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in params.items()}


def peft_reference(plan: P.Plan) -> tuple[float, dict[str, torch.Tensor]]:
    """PEFT's own LoRA (lora_dropout 0) on the same base weights and adapter values."""
    import peft  # a test dependency (pyproject [test]): missing it fails loudly, never skips
    model = peft.get_peft_model(base_hf(plan), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                                target_modules=TARGETS))
    params = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:       # base_model.model.{fqn}.lora_A.default.weight
            ours = name.removeprefix("base_model.model.").replace(".default.weight", "")
            with torch.no_grad():
                p.copy_(adapter_value(ours, p.shape))
            params[ours] = p
    assert params and all(p.dtype == torch.float32 for p in params.values())
    loss = _loss(model)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in params.items()}


def _compare(got: tuple[float, dict], want: tuple[float, dict]) -> float:
    """The worst relative difference: loss, then each adapter gradient (as a whole tensor)."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert sorted(grads) == sorted(ref_grads)
    worst = abs(loss - ref_loss) / abs(ref_loss)
    for n in ref_grads:
        assert float(ref_grads[n].norm()) > 0, n           # non-zero B: dA is tested too
        worst = max(worst, _rel(grads[n], ref_grads[n]))
    return worst


def runtime_world1(plan: P.Plan) -> tuple[float, dict[str, torch.Tensor], nn.Module]:
    from meshbake.runtime.parallel import build, set_full
    from meshbake.runtime.train import forward_loss_sum, world_mesh

    with one_process_group():
        model = build(plan, world_mesh(plan), torch.device("cpu"))
        for name, p in model.named_parameters():
            if ".lora_" in name:
                set_full(p, adapter_value(name, p.shape))
        ids = torch.tensor(INPUT)
        loss = forward_loss_sum(model, ids[:, :-1], ids[:, 1:], False) / ids[:, 1:].numel()
        loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}, model


def test_world1_model_matches_the_merged_math_and_peft():
    plan = P.from_dict(lora_plan("lora_w1", 1))
    loss, grads, _ = runtime_world1(plan)
    merged = _compare((loss, grads), merged_reference(plan))
    print(f"world 1 vs merged: max rel {merged:.2e}")
    assert merged < REL
    vs_peft = _compare((loss, grads), peft_reference(plan))
    print(f"world 1 vs PEFT: max rel {vs_peft:.2e}")
    assert vs_peft < REL


def test_bf16_base_gets_fp32_adapters_and_the_recipe_dropout():
    plan = P.from_dict(lora_plan("lora_bf16", 1, dtype="bfloat16", dropout=0.1,
                                 train={"mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}))
    assert plan.lora.dropout == 0.1
    _, grads, model = runtime_world1(plan)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == q.lora_B.dtype == torch.float32
    assert q.lora_dropout == 0.1
    assert all(g.dtype == torch.float32 for g in grads.values())


# ------------------------------------------------- dp_shard 2 x tp 2 + SP + LP, one launch
@pytest.mark.dist
def test_fsdp_tp_sp_lp_matches_the_merged_math_and_peft_with_no_new_collective(tmp_path: Path):
    plan_d = lora_plan("lora_fsdp_tp", 4, mesh={"dp_shard": 2, "tp": 2}, sp=True, lp=True)
    (tmp_path / "plan.json").write_text(json.dumps(plan_d))
    # and, in the same launch, a bf16 base trained by the runtime: fp32 adapters under FSDP2's bf16
    # policy, dropout on the adapter input, recomputed by activation checkpointing
    bf16 = lora_plan("lora_bf16_train", 4, mesh={"dp_shard": 2, "tp": 2}, sp=True, lp=True, dtype="bfloat16",
                     dropout=0.1, train={"steps": 3, "warmup_steps": 1, "activation_checkpointing": "full",
                                         "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}})
    (tmp_path / "train.json").write_text(json.dumps(bf16))
    torchrun(4, ROOT / "tests/dist/lora_worker.py", str(tmp_path / "plan.json"), str(tmp_path / "out.pt"),
             str(tmp_path / "train.json"), cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    plan = P.from_dict(plan_d)
    assert plan.tp.sequence_parallel and plan.tp.loss_parallel and plan.mesh.fsdp_enabled
    got = (out["loss"], out["grads"])
    merged = _compare(got, merged_reference(plan))
    print(f"dp_shard 2 x tp 2 + SP + LP vs merged: max rel {merged:.2e}")
    assert merged < REL
    vs_peft = _compare(got, peft_reference(plan))
    print(f"dp_shard 2 x tp 2 + SP + LP vs PEFT: max rel {vs_peft:.2e}")
    assert vs_peft < REL
    assert out["adapter_dtypes"] == ["torch.float32"]
    print("collectives per forward + backward of one Linear:", out["comms"])
    for style, counts in out["comms"].items():
        assert counts["lora"] == counts["base"], (style, counts)
    assert out["comms"]["rowwise"]["base"] >= 1       # the one reduction the adapter's partial sum joins
    t = out["trained"]
    print("bf16 base + dropout + AC full, losses:", t["losses"])
    assert t["adapter_dtypes"] == ["torch.float32"] and t["base_dtypes"] == ["torch.bfloat16"], t
    assert t["dropout"] == [0.1], t
    assert sorted(t["losses"]) == [1, 2, 3] and all(math.isfinite(v) for v in t["losses"].values()), t
    assert all(math.isfinite(v) and v > 0 for v in t["grad_norms"].values()), t
