"""Expert parallelism composed with tensor parallelism (torchtitan's etp = 1; runtime/ep.py,
docs/EXPERT_PARALLEL.md): ep carved from dp_shard x tp, the experts whole on their ep rank, the
attention, dense and shared-expert Linears tp-split, each tp rank dispatching 1/tp of the block's
tokens. Parity with one process (fp32, 3 steps, loss and gradient norm every step, rel 1e-4) in
ONE world-4 torchrun launch, dp_shard 2 x tp 2 with sequence and loss parallel:
  - qwen3_moe ep 2 (ep = the tp pair; efsdp 2);
  - qwen2_moe ep 2 with the router's aux loss (a sigmoid-gated shared expert, tp-split);
  - deepseek_v3 ep 2 (MLA under tp, ungated shared experts, the group-limited router);
  - mixtral ep 4 (ep over dp_shard x tp: one expert per rank, efsdp 1) with full activation
    checkpointing (the all-to-alls again in the recompute);
  - llama4_text ep 2 (score-scaled expert inputs, its shared expert on its own TP styles);
  - gpt_oss ep 2 without SP / LP, with the aux loss (biased experts; the block output all-reduced);
  - mixtral ep 2 with LoRA on q/o and on the experts (adapters Shard(0) over ep with them).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from meshbake.runtime import plan as P

from tests.dist.reference import reference_run
from tests.test_models import AUX_COEF, INPUT, RTOL, STEPS, recipe


def _eptp(ep, aux=False, ac="none", sp=True, lora=False):
    def edit(r):
        r["mesh"] = {"dp_shard": 2, "tp": 2, "ep": ep}
        r["tp"] = {"sequence_parallel": sp, "loss_parallel": sp}
        r["train"]["activation_checkpointing"] = ac
        if aux:
            r["train"]["router_aux_loss_coef"] = AUX_COEF
        if lora:
            r["lora"] = {"rank": 4, "alpha": 8, "targets": ["q_proj", "o_proj", "experts.gate_up_proj",
                                                            "experts.down_proj"]}
    return edit


CASES = [("eptp-qwen3_moe", "qwen3_moe", _eptp(2)), ("eptp-qwen2_moe", "qwen2_moe", _eptp(2, aux=True)),
         ("eptp-deepseek_v3", "deepseek_v3", _eptp(2)), ("eptp4-mixtral", "mixtral", _eptp(4, ac="full")),
         ("eptp-llama4_text", "llama4_text", _eptp(2)),
         # without sequence / loss parallel (the block's input replicated, its output all-reduced),
         # GPT-OSS's biased experts (the down bias Shard(0) over ep, added once per token row)
         ("eptp-nosp-gpt_oss", "gpt_oss", _eptp(2, aux=True, sp=False)),
         # LoRA on the experts (their factors Shard(0) over ep with them, the same tp / ep scale)
         ("eptp-lora-mixtral", "mixtral", _eptp(2, lora=True))]


def compiled(name: str, model_type: str, edit) -> dict:
    from meshbake.compiler.pipeline import compile_recipe

    r = recipe(name, model_type)
    edit(r)
    b = compile_recipe(yaml.safe_dump(r), source=name)
    assert hasattr(b, "files"), [(e.path, e.message) for e in b.errors]
    return json.loads(b.files["plan.json"])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_parity import torchrun

    cases = [{"name": n, "kind": "train", "plan": compiled(n, t, e)} for n, t, e in CASES]
    # the first case also checkpoints (DCP: experts Shard(0) over ep, attention split over tp) and
    # keeps its trained model's logits, for the export test below
    cases[0].update(keep_run=True, input=INPUT)
    cases[0]["plan"]["checkpoint"].update(every_steps=STEPS, keep=1)
    with ThreadPoolExecutor(1) as pool:      # the references while the launch runs
        launched = pool.submit(torchrun, 4, cases, tmp_path_factory.mktemp("eptp"))
        refs = {c["name"]: reference_run(P.from_dict(c["plan"]))[:2] for c in cases}
        out = launched.result()
    return {c["name"]: dict(out[c["name"]], plan=c["plan"], reference=refs[c["name"]]) for c in cases}


@pytest.mark.dist
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ep_with_tp_matches_one_process(results, name):
    r = results[name]
    (ref, ref_norms), plan = r["reference"], r["plan"]
    assert plan["mesh"]["tp"] == 2 and plan["tp"]["sequence_parallel"] == plan["tp"]["loss_parallel"] == ("nosp" not in name)
    got = {int(k): v for k, v in r["losses"].items()}
    norms = {int(k): v for k, v in r["grad_norms"].items()}
    assert sorted(got) == list(range(1, STEPS + 1))
    rel = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    rel_norm = max(abs(norms[k] - ref_norms[k]) / ref_norms[k] for k in ref_norms)
    print(f"{name}: max rel loss diff {rel:.2e}, grad norm {rel_norm:.2e}")
    assert rel < RTOL, (name, got, ref)
    assert rel_norm < RTOL, (name, norms, ref_norms)
    assert min(ref[k] for k in range(2, STEPS + 1)) < ref[1]          # it learns something
    if "lora" in name:
        assert plan["lora"]["rank"] == 4 and "experts.gate_up_proj" in plan["lora"]["targets"]
    # each rank holds E / ep experts, whole (not split over tp)
    ep = plan["mesh"]["ep"]
    assert r["ep_local_experts"] == 4 // ep


@pytest.mark.dist
def test_export_of_an_ep_x_tp_checkpoint_gives_the_trained_logits(results, tmp_path):
    """meshbake export of the dp_shard 2 x tp 2 x ep 2 run's DCP checkpoint (one process): HF's
    from_pretrained of it gives the logits the sharded model computed after its 3 steps."""
    import torch
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    run_dir = Path(results[CASES[0][0]]["run_dir"])
    assert export_main([str(run_dir), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(INPUT)).logits
    want = torch.load(run_dir / "logits.pt")
    print(f"export of the ep x tp run: max abs logits diff {float((got - want).abs().max()):.2e}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,mesh", [("gpt_oss", {"ep": 2}), ("qwen2_moe", {"ep": 4}),
                                             ("mixtral", {"dp_replicate": 2, "ep": 4})])
def test_dry_run_holds_the_estimated_params_under_ep_and_tp(model_type, mesh):
    """The dry run (runtime/dryrun.py: the job's own build on a fake process group, meta tensors)
    accepts the composed mesh, and its first rank holds exactly the parameters and bytes the
    estimate counts (the last as many bytes) at dp_shard 2 x tp 2 x ep (x dp_replicate 2: world 8,
    the experts FSDP over efsdp 1 x dp_replicate 2): E / ep whole experts (GPT-OSS's biases with
    them) FSDP-sharded over dp_shard x tp / ep, the rest TP- then FSDP-split as without ep."""
    from meshbake.runtime.dryrun import build_rank

    from tests.helpers import resolve

    r = recipe(f"dry-{model_type}", model_type)
    _eptp(mesh["ep"])(r)
    r["mesh"].update(mesh)
    world = 4 * mesh.get("dp_replicate", 1)
    r["cluster"]["gpus_per_node"] = world
    res = resolve(yaml.safe_dump(r))
    first, last = build_rank(res.plan, 0), build_rank(res.plan, world - 1)
    assert first["ok"] and last["ok"], (first, last)
    assert (first["params"], first["param_bytes"]) == (res.estimate.params_per_rank, res.estimate.params_bytes), first
    # FSDP2 pads uneven shards: the last rank may hold fewer rows, never fewer bytes
    assert last["param_bytes"] == first["param_bytes"] and last["params"] <= first["params"], last
