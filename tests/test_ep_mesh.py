"""Expert parallelism on the general mesh (runtime/ep.py, docs/EXPERT_PARALLEL.md): ep carved from
the flattened (dp_shard, cp, tp) index, tp innermost (torchtitan's etp = 1): an ep group is ep
consecutive ranks, the experts whole on their ep rank (E / ep each), FSDP-sharded over efsdp =
dp_shard x cp x tp / ep, each tp rank dispatching 1/tp of its tokens, the experts' gradients
scaled by tp / ep. Parity with one process (fp32, 3 steps, loss AND gradient norm of every step,
rel 1e-4: the gradient norm is what catches a wrong tp / ep scale, since Adam's first steps are
scale-invariant) in ONE world-4 torchrun launch of 8 cases:
  ep x tp (dp_shard 2 x tp 2, SP + LP unless said; scale tp / ep):
  - qwen3_moe ep 2 (ep = the tp pair; efsdp 2; scale 1);
  - qwen2_moe ep 2 with the router's aux loss (a sigmoid-gated shared expert, tp-split);
  - llama4_text ep 2 (score-scaled expert inputs on this tp rank's rows, its shared expert on its
    own TP styles);
  - gpt_oss ep 2 without SP / LP, with the aux loss (biased experts; the block output all-reduced);
  - mixtral ep 2 with LoRA on q/o and on the experts (adapters Shard(0) over ep with them);
  ep x cp (dp_shard 2 x cp 2, tp 1; scale 1 / ep):
  - qwen2_moe ep 2 with the aux loss (the cp pair of a sequence; efsdp 2);
  - qwen3_moe ep 4 (every rank: one expert each, efsdp 1);
  composed (dp_shard 1 x cp 2 x tp 2, SP + LP):
  - qwen3_moe ep 4 (all four ranks: ep / tp = 2 cp coordinates x both tp ranks; efsdp 1; scale
    1/2), checkpointed (DCP) and exported to HF by one process: every trained tensor equals the
    single-process run's.
Cases of the two branches this file replaced (tests/test_ep_tp.py, tests/test_ep_cp.py), dropped to
keep the launch short, and what still covers their code path:
  - deepseek_v3 ep 2 x tp 2 (ungated shared experts, MLA under tp): deepseek_v3 under ep in
    tests/test_models.py EP_VARIANTS, MLA under tp in its model matrix; the tp-split shared
    expert's partial sum here by qwen2_moe (the ungated branch only skips the gate);
  - mixtral ep 4 x tp 2 with full AC: ep 4 spanning tp by the composed case, the all-to-alls in
    AC's recompute by EP_VARIANTS' ep2-hsdp-mixtral (ac full);
  - qwen3_moe ep 2 x cp 2, qwen2_moe ep 4 x cp 2: the same code paths as the two ep x cp cases kept
    (the model families swapped);
  - the ep x tp logits export (the worker's logits forward runs outside cp's context, so not on
    the composed case) and the ep x cp weights export: one weights export, of the composed case.
Plus the compile-time side (no launch): the rules' messages, PLAN.md, the estimate's rows and the
dry run's layout and params on the composed mesh.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from meshbake.runtime import plan as P

from tests.dist.reference import reference_run
from tests.test_models import AUX_COEF, RTOL, STEPS, recipe


def mesh_recipe(name: str, model_type: str, ep: int, *, dp_shard=2, cp=1, tp=2, sp=True, aux=False, ac="none",
                lora=False) -> dict:
    r = recipe(name, model_type)
    r["mesh"] = {"dp_shard": dp_shard, "cp": cp, "tp": tp, "ep": ep}
    r["tp"] = {"sequence_parallel": sp and tp > 1, "loss_parallel": sp and tp > 1}
    r["cluster"]["gpus_per_node"] = dp_shard * cp * tp
    if cp > 1:      # micro-batch 2 per dp rank, one micro-step (the ep x tp cases keep the recipe's 2)
        r["train"]["global_batch_size"] = 2 * dp_shard
    r["train"]["activation_checkpointing"] = ac
    if aux:
        r["train"]["router_aux_loss_coef"] = AUX_COEF
    if lora:
        r["lora"] = {"rank": 4, "alpha": 8, "targets": ["q_proj", "o_proj", "experts.gate_up_proj",
                                                        "experts.down_proj"]}
    return r


# (name, model type, mesh_recipe's keywords)
CASES = [("eptp-qwen3_moe", "qwen3_moe", dict(ep=2)),
         ("eptp-qwen2_moe", "qwen2_moe", dict(ep=2, aux=True)),
         ("eptp-llama4_text", "llama4_text", dict(ep=2)),
         ("eptp-nosp-gpt_oss", "gpt_oss", dict(ep=2, aux=True, sp=False)),
         ("eptp-lora-mixtral", "mixtral", dict(ep=2, lora=True)),
         ("epcp-qwen2_moe", "qwen2_moe", dict(ep=2, cp=2, tp=1, aux=True)),
         ("ep4cp-qwen3_moe", "qwen3_moe", dict(ep=4, cp=2, tp=1)),
         ("ep4-cp2-tp2-qwen3_moe", "qwen3_moe", dict(ep=4, dp_shard=1, cp=2, tp=2))]
EXPORTED = "ep4-cp2-tp2-qwen3_moe"      # also checkpointed (DCP) after its last step and exported to HF


def compiled(r: dict):
    from meshbake.compiler.pipeline import compile_recipe

    return compile_recipe(yaml.safe_dump(r), source=r.get("name", "epmesh"))


def plan_of(name: str, model_type: str, kw: dict) -> dict:
    b = compiled(mesh_recipe(name, model_type, **kw))
    assert hasattr(b, "files"), [(e.path, e.message) for e in b.errors]
    return json.loads(b.files["plan.json"])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from tests.test_parity import torchrun

    cases = [{"name": n, "kind": "train", "plan": plan_of(n, t, kw)} for n, t, kw in CASES]
    exported = next(c for c in cases if c["name"] == EXPORTED)
    # a DCP checkpoint of the experts on the (efsdp, ep) mesh, attention split over cp x tp, kept
    # (the worker's logits-after-training forward runs outside the cp context: not asked for here)
    exported.update(keep_run=True)
    exported["plan"]["checkpoint"].update(every_steps=STEPS, keep=1)
    tmp = tmp_path_factory.mktemp("epmesh")
    with ThreadPoolExecutor(1) as pool:           # the references run while the ranks wait on each other
        launched = pool.submit(torchrun, 4, cases, tmp)
        refs, states = {}, {}
        for c in cases:
            *refs[c["name"]], model = reference_run(P.from_dict(c["plan"]))
            if c["name"] == EXPORTED:
                states[c["name"]] = model.state_dict()
        out = launched.result()
    # the plan beside the checkpoint, as a job's run dir has it (the worker writes it only with logits)
    (tmp / EXPORTED / "plan.json").write_text(P.dumps(P.from_dict(exported["plan"])))
    return {c["name"]: dict(out[c["name"]], plan=c["plan"], reference=refs[c["name"]],
                            run_dir=tmp / c["name"], reference_state=states.get(c["name"])) for c in cases}


@pytest.mark.dist
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ep_on_the_mesh_matches_one_process(results, name):
    r = results[name]
    (ref, ref_norms), plan = r["reference"], r["plan"]
    kw = dict(dp_shard=2, cp=1, tp=2) | next(c[2] for c in CASES if c[0] == name)
    m = plan["mesh"]
    assert (m["dp_shard"], m["cp"], m["tp"], m["ep"]) == (kw["dp_shard"], kw["cp"], kw["tp"], kw["ep"])
    assert plan["tp"]["sequence_parallel"] == plan["tp"]["loss_parallel"] == (m["tp"] > 1 and "nosp" not in name)
    got = {int(k): v for k, v in r["losses"].items()}
    norms = {int(k): v for k, v in r["grad_norms"].items()}
    assert sorted(got) == sorted(norms) == list(range(1, STEPS + 1))
    rel = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    rel_norm = max(abs(norms[k] - ref_norms[k]) / ref_norms[k] for k in ref_norms)
    print(f"{name}: max rel loss diff {rel:.2e}, grad norm {rel_norm:.2e} (experts' grad scale tp / ep = "
          f"{m['tp']}/{m['ep']})")
    assert rel < RTOL, (name, got, ref)
    assert rel_norm < RTOL, (name, norms, ref_norms)
    assert min(ref[k] for k in range(2, STEPS + 1)) < ref[1]          # it learns something
    if "lora" in name:
        assert plan["lora"]["rank"] == 4 and "experts.gate_up_proj" in plan["lora"]["targets"]
    # really split: E / ep whole experts on each rank (4 experts in every fixture), attention really cp
    assert r["ep_local_experts"] == 4 // m["ep"]
    assert (r["cp_attention_calls"] > 0) == (m["cp"] > 1), r["cp_attention_calls"]


@pytest.mark.dist
def test_export_of_the_composed_checkpoint(results, tmp_path):
    """meshbake export of the dp_shard 1 x cp 2 x tp 2, ep 4 run's DCP checkpoint (experts Shard(0)
    over ep, the rest split over tp), by one process to HF's layout: every trained tensor equals the
    single-process run's after the same steps (the bound of tests/test_models.py's export test, 1e-3
    relative)."""
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    r = results[EXPORTED]
    assert export_main([str(r["run_dir"]), "-o", str(tmp_path / "hf")]) == 0
    sd, ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict(), r["reference_state"]
    assert any(".experts." in n for n in ref)
    # not the k_proj biases (as there): their exact gradient is 0, AdamW turns round-off into +-lr moves
    worst = max((((sd[n].double() - t.double()).norm() / t.double().norm().clamp(min=1e-12)).item(), n)
                for n, t in ref.items() if not n.endswith("k_proj.bias"))
    print(f"{EXPORTED}: exported weights max rel diff {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-3, worst


# --- compile time (no launch) ---------------------------------------------------------------------

def errors(b) -> list[tuple[str, str]]:
    assert not hasattr(b, "files"), "compiled"
    assert all(e.hint for e in b.errors)
    return [(e.path, f"{e.message} {e.hint}") for e in b.errors]


def test_ep_must_divide_dp_shard_x_cp_x_tp_and_span_tp():
    """ep | dp_shard x cp x tp and tp | ep: ep 4 over dp_shard 2 x cp 2 and over cp 2 x tp 2
    compiles; ep 4 over dp_shard 1 x cp 2 (x tp 1) is refused at mesh.ep with the sizes that fit,
    and so is ep 2 over ... x tp 4 (not a multiple of tp)."""
    assert hasattr(compiled(mesh_recipe("ok", "qwen3_moe", 4, cp=2, tp=1)), "files")
    assert hasattr(compiled(mesh_recipe("ok", "qwen3_moe", 4, dp_shard=1, cp=2, tp=2)), "files")
    errs = errors(compiled(mesh_recipe("bad", "qwen3_moe", 4, dp_shard=1, cp=2, tp=1)))
    assert errs == [("mesh.ep", "ep=4 does not divide dp_shard x cp x tp = 1 x 2 x 1 = 2: ep is carved from "
                     "dp_shard x cp x tp (ep ranks see different tokens and hold different experts; FSDP shards "
                     "each expert over dp_shard x cp x tp / ep) use mesh.ep in [2], or a dp_shard x cp that ep "
                     "divides")], errs
    errs = errors(compiled(mesh_recipe("bad", "qwen3_moe", 2, dp_shard=1, cp=1, tp=4)))
    ep_errs = [text for p, text in errs if p == "mesh.ep"]      # (tp 4 is refused too: the tiny model's heads)
    assert len(ep_errs) == 1 and "ep=2 with tp=4" in ep_errs[0] and "use mesh.ep in [4]" in ep_errs[0], errs


def _rows(p: dict) -> dict:
    out: dict = {}
    for c in p["estimate"]["traffic"]:
        out.setdefault((c["axis"], c["op"]), []).append((c["ranks"], c["count"], c["bytes"]))
    return out


def test_plan_md_and_estimate_of_the_composed_meshes():
    """PLAN.md names only the axes > 1 ep is carved from; the ep group is ep consecutive ranks.
    dp_shard 2 x cp 2, ep 2: ranks 0, 1 (the cp pair), experts FSDP over efsdp = 2 x 2 / 2 = 2;
    ep 4: ranks 0-3, efsdp 1 (no experts' FSDP rows). cp 2 x tp 2, ep 4: ranks 0-3, efsdp 1, each tp
    rank dispatching half its cp chunk. The token rows per rank: micro_batch_size x seq_len / cp
    (/ tp) tokens (2 x 32 / 2 = 32; / 2 = 16 under tp) x k 2 x hidden 64 x 4 B x 4 all-to-alls per
    MoE layer; the blocks' FSDP stays over dp_shard x cp; params at rest equal ep 1's under cp (the
    experts 1/4 per rank either way)."""
    def plan(ep, **kw):
        b = compiled(mesh_recipe("p", "qwen3_moe", ep, **kw))
        assert hasattr(b, "files"), b.errors
        return json.loads(b.files["plan.json"]), b.files["PLAN.md"].decode()

    (p2, md2), (p4, md4), (p1, _) = plan(2, cp=2, tp=1), plan(4, cp=2, tp=1), plan(1, cp=2, tp=1)
    (pc, mdc), (pt, mdt) = plan(4, dp_shard=1, cp=2, tp=2), plan(2)
    assert "ep 2 carved from dp_shard x cp (2 x 2)" in md2 and "| ep (within dp_shard x cp) | 2 | 0, 1 |" in md2
    assert "FSDP-sharded over dp_shard x cp / ep = 2" in md2 and "(2 consecutive ranks)" in md2
    assert "ep 4 carved from dp_shard x cp (1 x 4)" in md4 and "| ep (within dp_shard x cp) | 4 | 0, 1, 2, 3 |" in md4
    assert "ep 4 carved from dp_shard x cp x tp (1 x 4)" in mdc and "| ep (within cp x tp) | 4 | 0, 1, 2, 3 |" in mdc
    assert "FSDP-sharded over dp_shard x cp x tp / ep = 1" in mdc and "experts whole" in mdc
    assert "| ep (within dp_shard x tp) | 2 | 0, 1 |" in mdt and "whole on each tp rank" in mdt
    assert p2["mesh"]["ep"] == 2 and "each rank holds 2 of 4 experts" in md2 and "each rank holds 1 of 4 experts" in md4
    r2, r4, rc = _rows(p2), _rows(p4), _rows(pc)
    moe = 1                                  # the tiny Qwen3-MoE's MoE layers (the rows' counts say it)
    tokens = 2 * 32 // 2
    assert (2, 4 * moe, 4 * moe * tokens * 2 * 64 * 4) in r2["ep", "all_to_all"]
    assert (4, 4 * moe, 4 * moe * tokens * 2 * 64 * 4) in r4["ep", "all_to_all"]
    assert (4, 4 * moe, 4 * moe * tokens // 2 * 2 * 64 * 4) in rc["ep", "all_to_all"]
    # dp_shard 2 x tp 2, ep 2 (2 micro-steps: gbs 8 over dp 2 x mbs 2): each tp rank sends 64 / 2 tokens
    assert (2, 2 * 4 * moe, 2 * 4 * moe * (2 * 32 // 2) * 2 * 64 * 4) in _rows(pt)["ep", "all_to_all"]
    experts = 2 * (128 * 64 + 64 * 64) * 4      # 2 local experts' gate_up (128 x 64) + down (64 x 64), fp32
    assert r2["efsdp", "all_gather"] == [(2, 2 * moe, 2 * moe * experts)]
    assert ("efsdp", "all_gather") not in r4 and ("efsdp", "all_gather") not in rc
    assert all(c[0] == 4 for k, v in r2.items() if k[0] == "dp_shard_cp" for c in v)
    assert p2["estimate"]["params_bytes"] == p4["estimate"]["params_bytes"] == p1["estimate"]["params_bytes"]


@pytest.mark.parametrize("mesh, want", [
    (dict(ep=2, cp=2, tp=1), [[0, 1], [2, 3]]),                 # ep 2 = the cp pair of one dp_shard rank
    (dict(ep=4, cp=2, tp=1), [[0, 1, 2, 3]]),
    (dict(ep=2, dp_shard=1, cp=2, tp=2), [[0, 1], [2, 3]]),     # ep 2 = the tp pair of one cp rank
    (dict(ep=4, dp_shard=1, cp=2, tp=2), [[0, 1, 2, 3]]),
])
def test_dry_run_places_the_ep_group_and_holds_the_estimate(mesh, want):
    """The job's own build on fake ranks (runtime/dryrun.py), rank 3 of world 4: the experts' mesh
    (efsdp, ep) is ep consecutive ranks of the flattened dp_shard x cp x tp, Shard(0) over ep (E / ep
    experts, whole), Shard(1) over efsdp; every other weight FSDP over dp_shard_cp; the rank holds
    exactly the estimated parameters and bytes."""
    from meshbake.runtime.dryrun import build_rank
    from torch.distributed.tensor import Shard

    from tests.helpers import resolve
    from tests.test_dryrun import _layout

    res = resolve(yaml.safe_dump(mesh_recipe("dr", "qwen3_moe", **mesh)))
    layout = _layout(res.plan, 3, False)
    experts = [x for x in layout if ".mlp.experts." in x[0]]
    assert experts and all(x[1:4] == (("efsdp", "ep"), want, (Shard(1), Shard(0))) for x in experts), experts
    assert all(x[4][0] == 4 // mesh["ep"] for x in experts)
    r3 = build_rank(res.plan, 3)
    assert r3["ok"], r3
    assert (r3["params"], r3["param_bytes"]) == (res.estimate.params_per_rank, res.estimate.params_bytes)


@pytest.mark.parametrize("model_type,mesh", [("gpt_oss", {"ep": 2}), ("mixtral", {"dp_replicate": 2, "ep": 4})])
def test_dry_run_holds_the_estimated_params_under_ep_and_tp(model_type, mesh):
    """The dry run accepts dp_shard 2 x tp 2 x ep (x dp_replicate 2: world 8, the experts FSDP over
    efsdp 1 x dp_replicate 2) and its first rank holds exactly the parameters and bytes the
    estimate counts (the last as many bytes): E / ep whole experts (GPT-OSS's biases with them)
    FSDP-sharded over dp_shard x tp / ep, the rest TP- then FSDP-split as without ep."""
    from meshbake.runtime.dryrun import build_rank

    from tests.helpers import resolve

    r = mesh_recipe(f"dry-{model_type}", model_type, mesh["ep"])
    r["mesh"].update(mesh)
    world = 4 * mesh.get("dp_replicate", 1)
    r["cluster"]["gpus_per_node"] = world
    res = resolve(yaml.safe_dump(r))
    first, last = build_rank(res.plan, 0), build_rank(res.plan, world - 1)
    assert first["ok"] and last["ok"], (first, last)
    assert (first["params"], first["param_bytes"]) == (res.estimate.params_per_rank, res.estimate.params_bytes), first
    # FSDP2 pads uneven shards: the last rank may hold fewer rows, never fewer bytes
    assert last["param_bytes"] == first["param_bytes"] and last["params"] <= first["params"], last
