"""LoRA on grouped MoE experts and on fused projections (issue #24 item 3).

Experts (lora.targets "experts.gate_up_proj", "experts.down_proj", PEFT's target_parameters
names): per-expert pairs A (E, r, in), B (E, out, r) beside the grouped W (E, out, in), computed
unmerged in the MoE loop (runtime/lora.py); Mixtral and Qwen3-MoE (with a dense
mlp_only_layers block) at world 1. Fused projections (GLM gate_up_proj in pairs order,
GPT-NeoX query_key_value per head, Phi-3 qkv_proj per kv group): an ordinary LoraLinear whose B
rows are in the fused weight's runtime order. Each is checked against the merged math (W + s B A
in HF's order, by a parametrization) and against PEFT (target_parameters / target_modules) on
the same weights and adapter values: fp32, the loss and every adapter gradient within REL;
at world 1 here and in one world-4 torchrun launch over four meshes: Mixtral experts over
tp (dp_shard 2 x tp 2 + SP + LP), Mixtral experts over ep (dp_shard 4, ep 2), GLM and GPT-NeoX
at dp_shard 2 x tp 2 + SP + LP.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from meshbake.runtime import plan as P
from meshbake.runtime.fused import to_hf
from meshbake.runtime.roles import EXPERT_PARAMS, is_expert_target, plan_roles
from torch.nn.utils import parametrize

from tests.dist.lora_worker import INPUT, adapter_value, loss_and_grads
from tests.helpers import ROOT, one_process_group, plan_of, tiny_recipe, torchrun
from tests.test_lora_math import base_hf

RANK, ALPHA = 4, 8.0
S = ALPHA / RANK
REL = 1e-5
MODELS = ROOT / "tests" / "models"
EXPERTS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"]
FUSED = {"glm": ["gate_up_proj", "down_proj", "q_proj", "o_proj"],
         "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
         "phi3": ["qkv_proj", "gate_up_proj"]}


def plan_dict(name: str, model_type: str, targets: list[str], world: int, mesh: dict | None = None,
              sp: bool = False, lp: bool = False) -> dict:
    r = tiny_recipe(name, world, mesh=mesh, sp=sp, lp=lp, model=str(MODELS / model_type / "config.json"),
                    lora={"rank": RANK, "alpha": ALPHA, "targets": targets})
    return plan_of(r)


# ----------------------------------------------------------------------- references
def _hf_b(plan: P.Plan, module: str, leaf: str, b: torch.Tensor) -> torch.Tensor:
    """A B in runtime row order -> HF's (fused rows: runtime/fused.py)."""
    kind = plan.model.layouts.get(module)
    if kind == "experts":
        return to_hf("experts", b, base_cfg(plan)) if leaf == "gate_up_proj" else b
    return to_hf(kind, b, base_cfg(plan)) if kind in ("qkv", "gate_up") else b


def base_cfg(plan: P.Plan):
    from meshbake.runtime.parallel import hf_config

    return hf_config(plan.model.config)


def adapters_hf(plan: P.Plan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{target fqn: (A, B) in HF's layout} from the runtime names' adapter_value."""
    out = {}
    for fqn in plan_roles(plan).lora_targets:
        if is_expert_target(fqn):
            mod, _, leaf = fqn.rpartition(".")
            a_name, b_name = f"{mod}.lora_A_{leaf}", f"{mod}.lora_B_{leaf}"
        else:
            mod, leaf, a_name, b_name = fqn, "", f"{fqn}.lora_A", f"{fqn}.lora_B"
        out[fqn] = (a_name, b_name, mod, leaf)
    return out


class _Delta(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, w: torch.Tensor) -> torch.Tensor:          # W_e + s B_e A_e, every expert
        return w + S * torch.einsum("eor,eri->eoi", self.b, self.a)


def _to_ours(plan, shapes, grads_hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-layout adapter gradients keyed by runtime name -> runtime layout (B rows reordered)."""
    from meshbake.runtime.fused import to_runtime

    out = {}
    for a_name, b_name, mod, leaf in adapters_hf(plan).values():
        out[a_name] = grads_hf[a_name]
        kind = plan.model.layouts.get(mod)
        g = grads_hf[b_name]
        if kind == "experts" and leaf == "gate_up_proj":
            g = to_runtime("experts", g, base_cfg(plan))
        elif kind in ("qkv", "gate_up"):
            g = to_runtime(kind, g, base_cfg(plan))
        out[b_name] = g
    return out


def merged_reference(plan: P.Plan, shapes: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain HF: every Linear target F.linear(x, W + s B A), every expert target W_e + s B_e A_e."""
    model = base_hf(plan)
    params = {}
    for a_name, b_name, mod, leaf in adapters_hf(plan).values():
        a = nn.Parameter(adapter_value(a_name, shapes[a_name]))
        b = nn.Parameter(_hf_b(plan, mod, leaf, adapter_value(b_name, shapes[b_name])))
        params[a_name], params[b_name] = a, b
        m = model.get_submodule(mod)
        if leaf:
            parametrize.register_parametrization(m, leaf, _Delta(a, b))
        else:
            m.lora_A, m.lora_B = a, b
            m.register_forward_hook(lambda m, args, out: F.linear(args[0], m.weight + S * (m.lora_B @ m.lora_A), m.bias))
    loss = _loss(model, plan)
    loss.backward()
    return loss.item(), _to_ours(plan, shapes, {n: p.grad for n, p in params.items()})


def peft_reference(plan: P.Plan, shapes: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """PEFT 0.21's LoRA: target_modules for the Linears, target_parameters (ParamWrapper: A as
    (E r, in), B as (out, r E)) for the experts; same base weights and adapter values."""
    import peft

    targets = adapters_hf(plan)
    linear = sorted({fqn.rpartition(".")[2] for fqn in targets if not is_expert_target(fqn)})
    params_t = [f"experts.{p}" for p in EXPERT_PARAMS if any(f.endswith(f"experts.{p}") for f in targets)]
    model = peft.get_peft_model(base_hf(plan), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                                target_modules=linear or None,
                                                                target_parameters=params_t or None))
    named = dict(model.named_parameters())
    ours_of = {}
    for a_name, b_name, mod, leaf in targets.values():
        a, b = adapter_value(a_name, shapes[a_name]), _hf_b(plan, mod, leaf, adapter_value(b_name, shapes[b_name]))
        if leaf:        # the wrapper of this parameter: the one whose B has W's out rows
            e, out_f = b.shape[0], b.shape[1]
            wrappers = [p for p in (f"{mod}.base_layer", mod) if f"base_model.model.{p}.lora_B.default.weight" in named]
            pre = next(p for p in wrappers if named[f"base_model.model.{p}.lora_B.default.weight"].shape[0] == out_f)
            pa, pb = a.reshape(e * RANK, -1), b.permute(1, 2, 0).reshape(out_f, RANK * e)
        else:
            pre, pa, pb = mod, a, b
        for ours, val, part in ((a_name, pa, "lora_A"), (b_name, pb, "lora_B")):
            p = named[f"base_model.model.{pre}.{part}.default.weight"]
            with torch.no_grad():
                p.copy_(val)
            ours_of[ours] = (p, leaf, shapes[ours])
    loss = _loss(model, plan)
    loss.backward()
    grads = {}
    for ours, (p, leaf, shape) in ours_of.items():
        g = p.grad
        if leaf and ".lora_A_" in ours:
            g = g.reshape(shape)                                         # (E r, in) -> (E, r, in)
        elif leaf:
            g = g.reshape(shape[1], RANK, shape[0]).permute(2, 0, 1)      # (out, r E) -> (E, out, r)
        grads[ours] = g
    return loss.item(), _to_ours(plan, shapes, grads)


def _loss(model: nn.Module, plan: P.Plan) -> torch.Tensor:
    ids = torch.tensor(INPUT) % plan.model.config["vocab_size"]
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(0, 1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(got: tuple[float, dict], want: tuple[float, dict]) -> float:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert sorted(grads) == sorted(ref_grads)
    worst = abs(loss - ref_loss) / abs(ref_loss)
    for n in ref_grads:
        assert float(ref_grads[n].norm()) > 0, n
        assert grads[n].shape == ref_grads[n].shape, n
        worst = max(worst, _rel(grads[n], ref_grads[n]))
    return worst


def world1(plan: P.Plan) -> tuple[float, dict[str, torch.Tensor]]:
    from meshbake.runtime.train import world_mesh

    with one_process_group():
        loss, grads, _ = loss_and_grads(plan, world_mesh(plan))
    return loss.item(), grads


def _shapes(grads: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(g.shape) for n, g in grads.items()}


# ----------------------------------------------------------------------------- world 1
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_experts_world1_match_merged_math_and_peft(model_type):
    plan = P.from_dict(plan_dict(f"lx_w1_{model_type}", model_type, EXPERTS, 1))
    assert "model.layers.0.mlp.experts.gate_up_proj" in plan_roles(plan).lora_targets
    got = world1(plan)
    shapes = _shapes(got[1])
    c = plan.model.config        # E 4, H 64; I: Qwen3-MoE's moe_intermediate_size, else intermediate_size
    e, h = c.get("num_local_experts") or c["num_experts"], c["hidden_size"]
    two_i = 2 * (c.get("moe_intermediate_size") or c["intermediate_size"])
    assert shapes["model.layers.0.mlp.experts.lora_A_gate_up_proj"] == (e, RANK, h)
    assert shapes["model.layers.0.mlp.experts.lora_B_gate_up_proj"] == (e, two_i, RANK)
    assert shapes["model.layers.0.mlp.experts.lora_A_down_proj"] == (e, RANK, two_i // 2)
    merged = compare(got, merged_reference(plan, shapes))
    vs_peft = compare(got, peft_reference(plan, shapes))
    print(f"{model_type} experts world 1: vs merged {merged:.2e}, vs PEFT {vs_peft:.2e}")
    assert merged < REL and vs_peft < REL


@pytest.mark.parametrize("model_type", sorted(FUSED))
def test_fused_projection_world1_matches_merged_math_and_peft(model_type):
    plan = P.from_dict(plan_dict(f"lf_{model_type}", model_type, FUSED[model_type], 1))
    got = world1(plan)
    shapes = _shapes(got[1])
    merged = compare(got, merged_reference(plan, shapes))
    vs_peft = compare(got, peft_reference(plan, shapes))
    print(f"{model_type} fused world 1: vs merged {merged:.2e}, vs PEFT {vs_peft:.2e}")
    assert merged < REL and vs_peft < REL


# ------------------------------------------------------------ four meshes, one launch
MESHES = {  # name: (model, targets, mesh, sp + lp)
    "lx_tp": ("mixtral", EXPERTS, {"dp_shard": 2, "tp": 2}, True),
    "lx_ep": ("mixtral", EXPERTS, {"dp_shard": 4, "tp": 1, "ep": 2}, False),
    "lf_glm_tp": ("glm", FUSED["glm"], {"dp_shard": 2, "tp": 2}, True),
    "lf_gpt_neox_tp": ("gpt_neox", FUSED["gpt_neox"], {"dp_shard": 2, "tp": 2}, True),
}


@pytest.mark.dist
def test_experts_over_tp_and_ep_and_fused_over_tp_match_one_process(tmp_path: Path):
    paths = []
    for name, (model_type, targets, mesh, splp) in MESHES.items():
        d = plan_dict(name, model_type, targets, 4, mesh, sp=splp, lp=splp)
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        paths.append(str(tmp_path / f"{name}.json"))
    # and, in the same launch, the ep mesh trained 3 steps and checkpointed, for the export below
    exp = plan_dict("lx_ep_export", "mixtral", EXPERTS, 4, MESHES["lx_ep"][2])
    exp["train"].update(steps=3, lr=2e-3, warmup_steps=1)
    exp["checkpoint"].update(every_steps=3, keep=1)
    (tmp_path / "export.json").write_text(json.dumps(exp))
    torchrun(4, ROOT / "tests/dist/lora_worker.py", "--many", str(tmp_path / "out.pt"), *paths,
             str(tmp_path / "export.json"), cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    _export_matches_the_trained_model(Path(out["lx_ep_export"]["run_dir"]), tmp_path / "hf")
    # its 3 AdamW steps (grad clipping, per-mesh groups) vs plain HF with the adapters merged by a
    # parametrization (tests/dist/reference.py), the whole global batch in one process
    from tests.dist.reference import reference_losses

    ref, _ = reference_losses(P.from_dict(exp))
    got = {int(k): v for k, v in out["lx_ep_export"]["losses"].items()}
    rel = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    print(f"ep 2 LoRA on experts, 3 steps: losses {got}, max rel vs reference {rel:.2e}")
    assert sorted(got) == [1, 2, 3] and rel < 1e-5 and ref[3] < ref[1], (got, ref)
    for name, (model_type, targets, mesh, _) in MESHES.items():
        plan = P.from_dict(json.loads((tmp_path / f"{name}.json").read_text()))
        assert plan.mesh.ep == mesh.get("ep", 1) and plan.mesh.tp == mesh["tp"]
        got = (out[name]["loss"], out[name]["grads"])
        one = world1(P.from_dict(plan_dict(name + "_w1", model_type, targets, 1)))
        shapes = _shapes(one[1])
        vs_one, vs_merged = compare(got, one), compare(got, merged_reference(plan, shapes))
        vs_peft = compare(got, peft_reference(plan, shapes))
        print(f"{name} {mesh}: vs world 1 {vs_one:.2e}, vs merged {vs_merged:.2e}, vs PEFT {vs_peft:.2e}")
        assert vs_one < REL and vs_merged < REL and vs_peft < REL, name


def _export_matches_the_trained_model(run_dir: Path, out: Path) -> None:
    """meshbake export of the ep run (experts and their adapters Shard(0) over ep in DCP): one
    process merges W_e + s B_e A_e per expert, writes HF's layout; from_pretrained gives the
    logits the sharded model computed after training."""
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    assert export_main([str(run_dir), "-o", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor(INPUT)[:, :-1] % hf.config.vocab_size
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    want = torch.load(run_dir / "logits.pt")
    print(f"export of the ep 2 run: max abs logits diff {float((got - want).abs().max()):.2e}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ compile time
def _resolved(model_type: str, targets: list[str], world: int, mesh: dict, **lora):
    import yaml

    from tests.helpers import resolve

    r = tiny_recipe("lx_c", world, mesh=mesh, model=str(MODELS / model_type / "config.json"),
                    lora={"rank": RANK, "alpha": ALPHA, "targets": targets, **lora})
    return resolve(yaml.safe_dump(r))


@pytest.mark.parametrize("mesh", [{"dp_shard": 2, "tp": 2}, {"dp_shard": 4, "tp": 1, "ep": 2}, {"dp_shard": 4}])
def test_expert_adapters_per_rank_are_what_the_runtime_allocates(mesh):
    """The estimate's adapter params (fp32 params, grads, AdamW) are the job's own build on fake
    ranks (runtime/dryrun.py). Tiny Mixtral, E 4, H = I = 64, 4 heads / 2 kv of 16, r 4, per layer:
    experts gate_up A 4x4x64 + B 4x128x4, down A 4x4x64 + B 4x64x4 = 5,120; q,k,v,o 1,792.
    tp 2: gate_up's B and down's A halved -> 3,584; q,k,v,o 1,408 (A whole beside colwise, B
    whole beside rowwise); 2 layers / dp_shard 2 = 4,992. dp_shard 4: 2 x 6,912 / 4 = 3,456.
    ep 2: 2 of 4 experts' adapters, FSDP over dp_shard / ep = 2 (2 x 2,560 / 2), attention
    over dp_shard 4 (2 x 1,792 / 4): 3,456."""
    from meshbake.runtime.dryrun import build_rank

    res = _resolved("mixtral", EXPERTS, 4, mesh)
    assert not hasattr(res, "errors"), res
    r0 = build_rank(res.plan, 0)
    assert r0["ok"], r0
    print(f"{mesh}: trainable per rank {r0['trainable']}, estimate grads {res.estimate.grads_bytes} bytes")
    assert res.estimate.grads_bytes == r0["trainable"] * 4                  # fp32 adapter gradients
    assert res.estimate.params_per_rank == r0["params"]
    want = {"dp_shard": 3456, "tp": 4992, "ep": 3456}
    key = "ep" if "ep" in mesh else "tp" if mesh.get("tp", 1) > 1 else "dp_shard"
    assert r0["trainable"] == want[key], (r0, want)
    assert res.estimate.trainable_total == 2 * (5120 + 1792)
    rows = [c for c in res.estimate.traffic if c.what.startswith("LoRA on experts")]
    if key == "tp":     # gate_up's A and down's B (E r H = 1,024 fp32 each), 2 layers x grad_accum 2
        assert [(c.count, c.bytes) for c in rows] == [(8, 8 * 1024 * 4)], rows
    else:
        assert rows == []
    if key == "ep":     # the experts' FSDP unit reduce-scatters the adapters' gradients: 2 layers x 2,560 fp32
        (rs,) = [c for c in res.estimate.traffic if c.what.startswith("experts' gradients")]
        assert (rs.count, rs.bytes) == (2, 2 * 2560 * 4), rs


def test_expert_flops_count_the_routed_experts_adapters():
    """6 per adapter parameter a token passes through: k = 2 of E = 4 experts per MoE layer."""
    with_e = _resolved("mixtral", EXPERTS, 1, {"dp_shard": 1})
    without = _resolved("mixtral", EXPERTS[:4], 1, {"dp_shard": 1})
    per_layer_expert = RANK * (128 + 64) + RANK * (64 + 64)       # gate_up r (2I + H) + down r (H + I)
    assert (with_e.estimate.flops_per_token - without.estimate.flops_per_token
            == 6 * 2 * 2 * per_layer_expert)                      # 6 x layers x k x params


def test_expert_targets_named_wrong_or_quantized_are_refused_with_a_fix():
    err = _resolved("mixtral", ["q_proj", "gate_up_proj"], 1, {"dp_shard": 1})
    (e,) = err.errors
    assert e.path == "lora.targets[1]" and "experts.gate_up_proj" in e.hint, e
    err = _resolved("mixtral", EXPERTS, 1, {"dp_shard": 1}, quantize_base="nf4")
    msgs = {x.path: x for x in err.errors}
    e = msgs["lora.quantize_base"]
    assert "experts.gate_up_proj" in e.message and "NF4" in e.message and "lora.targets" in e.hint, e


def test_expert_dropout_drops_the_adapter_input_only_and_only_in_training():
    """lora.dropout on the experts' rows (PEFT refuses dropout on target_parameters: it merges;
    this path is unmerged, so dropout(x_e) A_e^T B_e^T is defined): p = 1 drops the whole adapter
    term in training and leaves x W_e^T; in eval the adapter is back."""
    from meshbake.runtime.lora import expert_factors, expert_linear

    torch.manual_seed(0)
    ex = nn.Module()
    w = torch.randn(2, 6, 5)
    ex.register_parameter("lora_A_down_proj", nn.Parameter(torch.randn(2, RANK, 5)))
    ex.register_parameter("lora_B_down_proj", nn.Parameter(torch.randn(2, 6, RANK)))
    ex.lora_scale, ex.lora_dropout = S, 1.0
    x = torch.randn(3, 5)
    base = F.linear(x, w[1])
    torch.testing.assert_close(expert_linear(ex.train(), x, w[1], expert_factors(ex), "down_proj", 1), base)
    got = expert_linear(ex.eval(), x, w[1], expert_factors(ex), "down_proj", 1)
    torch.testing.assert_close(got, base + S * x @ ex.lora_A_down_proj[1].T @ ex.lora_B_down_proj[1].T)
    assert float((got - base).abs().max()) > 1e-3


def test_plan_md_says_how_the_expert_adapters_are_split():
    from tests.helpers import compiled

    def plan_md(mesh: dict, targets: list[str]) -> str:
        r = tiny_recipe("lx_md", 4, mesh=mesh, model=str(MODELS / "mixtral" / "config.json"),
                        lora={"rank": RANK, "alpha": ALPHA, "targets": targets})
        return compiled(r).files["PLAN.md"].decode()

    assert "split over ep with the experts" in plan_md({"dp_shard": 4, "tp": 1, "ep": 2}, EXPERTS)
    assert "split over tp with each expert's intermediate dim" in plan_md({"dp_shard": 2, "tp": 2}, EXPERTS)
    assert "MoE experts:" not in plan_md({"dp_shard": 4}, EXPERTS[:4])
