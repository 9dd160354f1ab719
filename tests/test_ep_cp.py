"""Expert parallelism composed with context parallelism: ep carved from dp_shard x cp
(runtime/ep.py, docs/EXPERT_PARALLEL.md). World 4 = dp_shard 2 x cp 2, ep 2 (the two cp ranks
of a sequence: experts FSDP over efsdp 2) and ep 4 (every rank: one expert each, efsdp 1), on
Qwen3-MoE and on Qwen2-MoE (shared expert behind a sigmoid gate, with the router's aux loss):
loss AND gradient norm of every step equal to one process (fp32, rel 1e-4). The gradient norm
is the check on the experts' 1/ep gradient scale (Adam's first steps are scale-invariant, so a
wrong scale hides from the loss); ONE torchrun launch for the four cases, one of them checkpointed
and exported to HF. Plus the compile-time side: the rules, PLAN.md, the estimate's rows and the
dry run's layout for the composed mesh."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from meshbake.runtime import plan as P

from tests.dist.reference import reference_run
from tests.test_models import RTOL, STEPS, _ep, recipe

# (name, model type, ep, aux loss)
CASES = [("ep2-cp2-qwen3_moe", "qwen3_moe", 2, False), ("ep4-cp2-qwen3_moe", "qwen3_moe", 4, False),
         ("ep2-cp2-qwen2_moe", "qwen2_moe", 2, True), ("ep4-cp2-qwen2_moe", "qwen2_moe", 4, True)]
EXPORTED = "ep2-cp2-qwen2_moe"      # also checkpointed (DCP) after its last step and exported to HF


def epcp_recipe(name: str, model_type: str, ep: int, aux: bool = False, dp_shard: int = 2, cp: int = 2) -> dict:
    r = recipe(name, model_type)
    _ep(ep, dp_shard=dp_shard, aux=aux)(r)
    r["mesh"]["cp"] = cp
    r["cluster"]["gpus_per_node"] = dp_shard * cp
    r["train"]["global_batch_size"] = 2 * dp_shard       # micro-batch 2 per dp rank, as the matrix
    return r


def compiled(r: dict):
    from meshbake.compiler.pipeline import compile_recipe

    return compile_recipe(yaml.safe_dump(r), source=r["name"] if "name" in r else "epcp")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from tests.test_parity import torchrun

    cases = []
    for name, t, ep, aux in CASES:
        b = compiled(epcp_recipe(name, t, ep, aux))
        assert hasattr(b, "files"), b.errors
        cases.append({"name": name, "kind": "train", "plan": json.loads(b.files["plan.json"])})
        if name == EXPORTED:      # a DCP checkpoint of the experts on the (efsdp, ep) mesh, kept for export
            cases[-1]["plan"]["checkpoint"].update(every_steps=STEPS, keep=1)
            cases[-1]["keep_run"] = True
    tmp = tmp_path_factory.mktemp("epcp")
    with ThreadPoolExecutor(1) as pool:           # the references run while the ranks wait on each other
        launched = pool.submit(torchrun, 4, cases, tmp)
        refs, states = {}, {}
        for c in cases:
            *refs[c["name"]], model = reference_run(P.from_dict(c["plan"]))
            if c["name"] == EXPORTED:
                states[c["name"]] = model.state_dict()
        out = launched.result()
    # the plan beside the checkpoint, as a job's run dir has it (the worker writes it only with logits)
    (tmp / EXPORTED / "plan.json").write_text(P.dumps(P.from_dict(next(c for c in cases if c["name"] == EXPORTED)["plan"])))
    return {c["name"]: dict(out[c["name"]], plan=c["plan"], reference=refs[c["name"]], run_dir=tmp / c["name"],
                            reference_state=states.get(c["name"])) for c in cases}


@pytest.mark.dist
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ep_over_cp_parity(results, name):
    r = results[name]
    (ref, ref_norms), plan = r["reference"], r["plan"]
    assert (plan["mesh"]["dp_shard"], plan["mesh"]["cp"], plan["mesh"]["tp"]) == (2, 2, 1)
    got = {int(k): v for k, v in r["losses"].items()}
    norms = {int(k): v for k, v in r["grad_norms"].items()}
    assert sorted(got) == sorted(norms) == list(range(1, STEPS + 1))
    rel = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    rel_norm = max(abs(norms[k] - ref_norms[k]) / ref_norms[k] for k in ref_norms)
    print(f"{name}: max rel loss diff {rel:.2e}, grad norm {rel_norm:.2e}")
    assert rel < RTOL, (name, got, ref)
    assert rel_norm < RTOL, (name, norms, ref_norms)
    # really split: E / ep experts on each rank (4 experts in both fixtures), attention really cp
    assert r["ep_local_experts"] == 4 // plan["mesh"]["ep"]


@pytest.mark.dist
def test_ep_over_cp_checkpoint_exports_the_trained_weights(results, tmp_path):
    """The ep 2 x cp 2 run's DCP checkpoint (experts Shard(0) over ep, Shard(1) over efsdp),
    exported by one process to HF's layout: every trained tensor equals the single-process run's
    after the same steps (the bound of tests/test_models.py's export test, 1e-3 relative)."""
    from meshbake.runtime.export import main as export_main
    from transformers import AutoModelForCausalLM

    r = results[EXPORTED]
    assert export_main([str(r["run_dir"]), "-o", str(tmp_path / "hf")]) == 0
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    ref = r["reference_state"]
    assert any(".experts." in n for n in ref)
    # not the k_proj biases (as there): their exact gradient is 0, AdamW turns round-off into +-lr moves
    worst = max((((sd[n].double() - t.double()).norm() / t.double().norm().clamp(min=1e-12)).item(), n)
                for n, t in ref.items() if not n.endswith("k_proj.bias"))
    print(f"{EXPORTED}: exported weights max rel diff {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-3, worst


@pytest.mark.dist
def test_cp_attention_ran_in_every_case(results):
    # the worker counts cp_attention's calls per case: every attention layer ran on the cp mesh
    calls = [results[c[0]]["cp_attention_calls"] for c in CASES]
    assert all(n > 0 for n in calls), calls


def errors(b) -> list[tuple[str, str]]:
    assert not hasattr(b, "files"), "compiled"
    assert all(e.hint for e in b.errors)
    return [(e.path, f"{e.message} {e.hint}") for e in b.errors]


def test_ep_must_divide_dp_shard_x_cp():
    """ep | dp_shard x cp (not dp_shard alone): ep 4 over dp_shard 2 x cp 2 compiles, ep 4 over
    dp_shard 1 x cp 2 is refused at mesh.ep with the sizes that fit."""
    assert hasattr(compiled(epcp_recipe("ok", "qwen3_moe", 4)), "files")
    errs = errors(compiled(epcp_recipe("bad", "qwen3_moe", 4, dp_shard=1)))
    assert errs == [("mesh.ep", "ep=4 does not divide dp_shard x cp = 1 x 2 = 2: ep is carved from dp_shard x cp "
                     "(ep ranks see different tokens and hold different experts; FSDP shards each expert over "
                     "dp_shard x cp / ep) use mesh.ep in [2], or a dp_shard x cp that ep divides")], errs


def test_plan_md_and_estimate_of_the_composed_mesh():
    """dp_shard 2 x cp 2, ep 2: the ep group is ranks 0, 1 (the cp pair), the experts' FSDP over
    efsdp = 2 x 2 / 2 = 2; ep 4: ranks 0-3, efsdp 1 (no experts' FSDP rows). The token rows are
    this rank's micro_batch_size x seq_len / cp tokens (2 x 32 / 2 = 32) x k 2 x hidden 64 x 4 B
    x 4 all-to-alls per MoE layer; the blocks' FSDP stays over dp_shard x cp = 4 without the
    experts; params at rest are those of ep 1 (the experts 1/4 per rank either way)."""
    def plan(ep):
        b = compiled(epcp_recipe("p", "qwen3_moe", ep))
        return json.loads(b.files["plan.json"]), b.files["PLAN.md"].decode()

    (p2, md2), (p4, md4), (p1, _) = plan(2), plan(4), plan(1)
    assert "ep 2 carved from dp_shard x cp (2 x 2)" in md2 and "| ep (within dp_shard x cp) | 2 | 0, 1 |" in md2
    assert "FSDP-sharded over dp_shard x cp / ep = 2" in md2 and "2 consecutive ranks of dp_shard x cp" in md2
    assert "ep 4 carved from dp_shard x cp (1 x 4)" in md4 and "| ep (within dp_shard x cp) | 4 | 0, 1, 2, 3 |" in md4
    assert p2["mesh"]["ep"] == 2 and "each rank holds 2 of 4 experts" in md2 and "each rank holds 1 of 4 experts" in md4

    def rows(p):
        out = {}
        for c in p["estimate"]["traffic"]:
            out.setdefault((c["axis"], c["op"]), []).append((c["ranks"], c["count"], c["bytes"]))
        return out

    r2, r4 = rows(p2), rows(p4)
    moe = 1                                  # the tiny Qwen3-MoE's MoE layers (the rows' counts say it)
    tokens = 2 * 32 // 2
    assert (2, 4 * moe, 4 * moe * tokens * 2 * 64 * 4) in r2["ep", "all_to_all"]
    assert (4, 4 * moe, 4 * moe * tokens * 2 * 64 * 4) in r4["ep", "all_to_all"]
    experts = 2 * (128 * 64 + 64 * 64) * 4      # 2 local experts' gate_up (128 x 64) + down (64 x 64), fp32
    assert r2["efsdp", "all_gather"] == [(2, 2 * moe, 2 * moe * experts)]
    assert ("efsdp", "all_gather") not in r4
    assert all(c[0] == 4 for k, v in r2.items() if k[0] == "dp_shard_cp" for c in v)
    assert p2["estimate"]["params_bytes"] == p4["estimate"]["params_bytes"] == p1["estimate"]["params_bytes"]


@pytest.mark.parametrize("ep", [2, 4])
def test_dry_run_places_the_ep_group_and_holds_the_estimate(ep):
    """The job's own build on fake ranks (runtime/dryrun.py), rank 3 of dp_shard 2 x cp 2: the
    experts' mesh is (efsdp, ep) = [[0, 1], [2, 3]] at ep 2 (an ep group = the cp pair of one
    dp_shard rank) and [[0, 1, 2, 3]] at ep 4; Shard(0) over ep (E / ep experts), Shard(1) over
    efsdp; every other weight FSDP over dp_shard_cp [0, 1, 2, 3]; the rank holds exactly the
    estimated parameters and bytes."""
    from meshbake.runtime.dryrun import build_rank
    from torch.distributed.tensor import Shard

    from tests.helpers import resolve
    from tests.test_dryrun import _layout

    res = resolve(yaml.safe_dump(epcp_recipe("dr", "qwen3_moe", ep)))
    layout = _layout(res.plan, 3, False)
    experts = [x for x in layout if ".mlp.experts." in x[0]]
    want = [[0, 1], [2, 3]] if ep == 2 else [[0, 1, 2, 3]]
    assert experts and all(x[1:4] == (("efsdp", "ep"), want, (Shard(1), Shard(0))) for x in experts), experts
    assert all(x[4][0] == 4 // ep for x in experts)
    assert {(x[1], str(x[2])) for x in layout if x not in experts} == {(("dp_shard_cp",), "[0, 1, 2, 3]")}
    r3 = build_rank(res.plan, 3)
    assert r3["ok"], r3
    assert (r3["params"], r3["param_bytes"]) == (res.estimate.params_per_rank, res.estimate.params_bytes)
