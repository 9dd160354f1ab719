"""mesh.ep at compile time: the rules (each a RecipeError with a path and a fix), the estimate
(experts / ep per rank, all-to-all bytes) and PLAN.md. Parity of the runtime (runtime/ep.py)
is in tests/test_models.py (EP_VARIANTS, one world-4 torchrun launch with the model matrix)."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.test_models import _ep, recipe


def compiled(model_type="mixtral", device="cpu", **mesh):
    from meshbake.compiler.pipeline import compile_recipe

    r = recipe("ep", model_type)
    r["cluster"]["device"] = device
    _ep(mesh.pop("ep", 2), **{k: mesh.pop(k) for k in ("dp_shard", "dp_replicate") if k in mesh})(r)
    r["mesh"].update(mesh)
    r["cluster"]["gpus_per_node"] = r["mesh"].get("dp_replicate", 1) * r["mesh"]["dp_shard"] * \
        r["mesh"].get("cp", 1) * r["mesh"]["tp"]
    return compile_recipe(yaml.safe_dump(r), source="ep")


def errors(b) -> list[tuple[str, str]]:
    assert not hasattr(b, "files"), "compiled"
    assert all(e.hint for e in b.errors)
    return [(e.path, f"{e.message} {e.hint}") for e in b.errors]


def test_ep_one_changes_nothing():
    from meshbake.compiler.pipeline import compile_recipe

    plain = compile_recipe(yaml.safe_dump(recipe("ep", "mixtral")), source="ep")
    r = recipe("ep", "mixtral")
    r["mesh"]["ep"] = 1
    same = compile_recipe(yaml.safe_dump(r), source="ep")
    assert plain.files == same.files
    assert json.loads(plain.files["plan.json"])["mesh"]["ep"] == 1
    assert "ep" not in plain.files["PLAN.md"].decode().split("## Mesh")[1].split("## Batch")[0].replace("rep", "")


@pytest.mark.parametrize("mesh, path, words", [
    ({"ep": 3, "dp_shard": 6}, "mesh.ep", "does not divide the 4 experts"),
    ({"ep": 4, "dp_shard": 2}, "mesh.ep", "does not divide dp_shard x cp x tp = 2 x 1 x 1 = 2"),
    ({"ep": 3, "dp_shard": 3, "tp": 2}, "mesh.ep", "ep=3 with tp=2: ep is carved from dp_shard x cp x tp"),
    ({"ep": 4, "dp_shard": 1, "tp": 2}, "mesh.ep", "does not divide dp_shard x cp x tp = 1 x 1 x 2 = 2: "),
    ({"ep": 4, "dp_shard": 1, "tp": 2}, "mesh.ep", "use mesh.ep in [2]"),
    ({"ep": 4, "dp_shard": 1, "cp": 2}, "mesh.ep", "does not divide dp_shard x cp x tp = 1 x 2 x 1 = 2"),
    # the composed mesh: ep a multiple of tp dividing dp_shard x cp x tp (2 and 4 fit 1 x 2 x 2)
    ({"ep": 3, "dp_shard": 1, "cp": 2, "tp": 2}, "mesh.ep", "ep=3 with tp=2: ep is carved from dp_shard x cp x tp"),
    ({"ep": 3, "dp_shard": 1, "cp": 2, "tp": 2}, "mesh.ep", "use mesh.ep in [2, 4] (a multiple of tp)"),
])
def test_ep_rules(mesh, path, words):
    errs = errors(compiled(**mesh))
    assert any(p == path and words in text for p, text in errs), errs


def test_ep_needs_experts_and_no_compile():
    b = compiled("llama", ep=2, dp_shard=4)
    assert any(p == "mesh.ep" and "has no experts" in t for p, t in errors(b))
    from meshbake.compiler.pipeline import compile_recipe

    r = recipe("ep", "mixtral")
    _ep(2)(r)
    r["cluster"]["gpus_per_node"] = 4
    r["train"]["compile"] = True
    assert [p for p, _ in errors(compile_recipe(yaml.safe_dump(r), source="ep"))] == ["train.compile"]


def test_ep_estimate_and_plan_md():
    """dp_shard 4, ep 2, Mixtral tiny (4 experts of 2 x 64 x 64 + 64 x 64 per layer, 2 layers):
    per rank the experts' params stay 1/4 (E/ep x 1/(dp_shard/ep)), the gathered last block holds
    2 of 4 experts, and the all-to-all bytes are counted."""
    ep = compiled(ep=2, dp_shard=4)
    plain = compiled(ep=1, dp_shard=4)
    pe, pp = json.loads(ep.files["plan.json"]), json.loads(plain.files["plan.json"])
    assert pe["mesh"]["ep"] == 2 and pe["mesh"]["world"] == 4
    est, base = pe["estimate"], pp["estimate"]
    expert_bytes_block = 4 * (2 * 64 * 64 + 64 * 64) * 4            # fp32, one layer's experts
    assert est["params_bytes"] == base["params_bytes"]              # 1/4 of the experts either way
    # the last block is kept gathered (2 copies counted): half its experts under ep 2
    assert base["gathered_bytes"] - est["gathered_bytes"] == 2 * expert_bytes_block // 2
    # 4 x 2 layers x 1 micro-step (8 = 2 x 4 dp) x 64 tokens x k 2 x hidden 64 x 4 B x 1/2, + the
    # per-expert counts (4 int64) of each layer x 1/2
    assert est["ep_comm_bytes"] == 4 * 2 * 1 * 64 * 2 * 64 * 4 // 2 + 2 * 4 * 8 // 2 and base["ep_comm_bytes"] == 0
    assert est["fsdp_comm_bytes"] < base["fsdp_comm_bytes"]
    md = ep.files["PLAN.md"].decode()
    assert "ep 2 carved from dp_shard (2 x 2)" in md and "| ep (within dp_shard) | 2 | 0, 1 |" in md
    assert "expert parallel (ep 2)" in md and "EP all-to-all" in md
    assert "each rank holds 2 of 4 experts" in md


def test_ep_traffic_rows_by_hand():
    """The rows estimate.traffic lists for mesh.ep (held to the collectives of a real run in
    tests/test_measured.py), re-derived: Mixtral tiny, dp_shard 4 = efsdp 2 x ep 2, 2 MoE layers,
    1 micro-step of 2 x 32 tokens, k 2, hidden 64, fp32; 2 of the 4 experts per rank."""
    est = json.loads(compiled(ep=2, dp_shard=4).files["plan.json"])["estimate"]
    rows = {}
    for c in est["traffic"]:
        r = rows.setdefault((c["axis"], c["op"]), [0, 0])
        r[0] += c["count"]
        r[1] += c["bytes"]
    # per layer: the counts (4 int64), dispatch + combine forward and their reverse backward
    assert rows["ep", "all_to_all"] == [2 * (1 + 4), 2 * 4 * 8 + 2 * 4 * 64 * 2 * 64 * 4]
    experts = 2 * (2 * 64 * 64 + 64 * 64) * 4            # one layer's local experts, gathered, fp32
    assert rows["efsdp", "all_gather"] == [2 * 2, 2 * 2 * experts]      # forward + backward, each layer
    assert rows["efsdp", "reduce_scatter"] == [2, 2 * experts]
    # clipping: the experts' 4 tensors are a mesh group of their own, Partial over efsdp and ep
    assert rows["efsdp", "all_reduce"] == [1, 4 * 4] and rows["ep", "all_reduce"] == [1, 4 * 4]
    # the blocks' FSDP over dp_shard 4 no longer carries the experts: attention, norms, router
    block = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 64 + 4 * 64     # q, o; k, v (2 kv heads x 16); norms; router
    root = 2 * 1024 * 64 + 64
    assert rows["dp_shard", "all_gather"] == [1 + 2 + 1, (root + 2 * 2 * block - block) * 4]


def test_ep_all_to_all_in_the_step_time_model():
    """On a cuda cluster the step-time model counts mesh.ep's all-to-alls as exposed time (the
    runtime dispatches, computes the experts and combines in order): ep_s = the ep rows' wire
    bytes over the ep group's bandwidth + a start-up latency each, inside step_s, and a PLAN.md
    row. ep = 1 has no such row and ep_s = 0."""
    from meshbake.compiler import perf

    def plan(ep):
        b = compiled(ep=ep, dp_shard=4, device="cuda")
        assert hasattr(b, "files"), errors(b)
        return json.loads(b.files["plan.json"]), b.files["PLAN.md"].decode(), yaml.safe_load(b.files["recipe.yaml"])

    (pe, md, r), (pp, md1, _) = plan(2), plan(1)
    t, c = pe["estimate"]["time"], r["cluster"]
    rows = [x for x in pe["estimate"]["traffic"] if x["axis"] == "ep"]
    assert {x["op"] for x in rows} == {"all_to_all", "all_reduce"} and all(x["ranks"] == 2 for x in rows)
    # a ring all-reduce moves 2 (n - 1) / n of its bytes, an all-to-all (n - 1) / n (uniform routing)
    wire = sum(x["bytes"] * (2 if x["op"] == "all_reduce" else 1) // 2 for x in rows)
    # ep 2 is two consecutive GPUs of one node: NVLink at its bus efficiency, one ring hop (two
    # for the all-reduce) after NCCL's start-up
    lat = {op: perf.BASE_LAT_S + (2 if op == "all_reduce" else 1) * perf.HOP_LAT_S["intra"] for op in ("all_to_all",
                                                                                                   "all_reduce")}
    want = (wire / (c["intra_node_gbps"] * perf.NVLINK_EFF * 1e9)
            + sum(x["count"] * lat[x["op"]] for x in rows))
    assert t["ep_s"] == pytest.approx(want, rel=1e-12) and t["ep_s"] > 0
    # inside step_s: the table's seconds add up to it, EP row included
    from meshbake.compiler.estimate import StepTime
    st = StepTime(**t)
    assert st.step_s - StepTime(**{**t, "ep_s": 0.0}).step_s == pytest.approx(t["ep_s"], rel=1e-9)
    assert "| EP |" in md and "token all-to-alls, exposed" in md
    assert pp["estimate"]["time"]["ep_s"] == 0.0 and "| EP |" not in md1


def test_ep_with_tp_estimate_rules_and_plan_md():
    """ep x tp (etp 1, runtime/ep.py): Mixtral tiny at dp_shard 2 x tp 2 + SP + LP, ep 2 = the tp
    pair. The experts are whole on each rank (placement replicate, not split over tp), E/ep = 2
    per rank, FSDP over efsdp = dp_shard x tp / ep = 2; each tp rank dispatches half of its 64
    tokens; the tp rows of the block (gathers, reduce-scatters, the MoE _SumGrad all-reduces) are
    those of the experts-over-tp plan. Held to a real run's collectives in tests/test_measured.py
    (moe_qwen3_ep2_tp2_sp_lp), parity in tests/test_ep_mesh.py."""
    from tests.test_ep_mesh import plan_of

    pe, pt = plan_of("e", "mixtral", dict(ep=2)), plan_of("t", "mixtral", dict(ep=1))
    assert {k: v for k, v in pe["tp"]["placements"].items() if k.endswith("experts")} == \
        {"model.layers.0.mlp.experts": "replicate", "model.layers.1.mlp.experts": "replicate"}
    assert pe["mesh"]["ep"] == 2 and pe["mesh"]["world"] == 4

    def rows(p):
        out = {}
        for c in p["estimate"]["traffic"]:
            r = out.setdefault((c["axis"], c["op"]), [0, 0])
            r[0] += c["count"]
            r[1] += c["bytes"]
        return out
    re_, rt = rows(pe), rows(pt)
    ga, layers, k, h = 2, 2, 2, 64                     # 8 samples / (2 dp x mbs 2): 2 micro-steps
    mine = 2 * 32 // 2                                 # mbs 2 x seq 32 per dp rank, half per tp rank
    assert re_["ep", "all_to_all"] == [ga * layers * (1 + 4), ga * layers * (4 * 8 + 4 * mine * k * h * 4)]
    experts = 2 * (2 * 64 * 64 + 64 * 64) * 4          # one layer's 2 local experts, whole, fp32
    assert re_["efsdp", "all_gather"] == [2 * ga * layers, 2 * ga * layers * experts]
    assert re_["efsdp", "reduce_scatter"] == [ga * layers, ga * layers * experts]
    for key in [("tp", "all_gather"), ("tp", "reduce_scatter")]:
        assert re_[key] == rt[key], key
    # tp all-reduces: the same but the grad-norm partials of the 4 expert tensors (no longer tp DTensors)
    assert re_["tp", "all_reduce"][1] == rt["tp", "all_reduce"][1] - 4 * 4
    est, base = pe["estimate"], pt["estimate"]
    assert est["params_bytes"] == base["params_bytes"]      # experts / 4 per rank either way
    assert est["gathered_bytes"] == base["gathered_bytes"]  # 2 whole experts = 4 halves
    assert est["ep_comm_bytes"] == ga * layers * (4 * mine * k * h * 4 + 4 * 8) // 2
    md = compiled_md("mixtral", 2)
    assert "ep 2 carved from dp_shard x tp (2 x 2)" in md and "| ep (within dp_shard x tp) | 2 | 0, 1 |" in md
    assert "each rank holds 2 of 4 experts whole" in md and "FSDP-sharded over dp_shard x tp / ep = 2" in md


def compiled_md(model_type: str, ep: int) -> str:
    from meshbake.compiler.pipeline import compile_recipe

    from tests.test_ep_mesh import mesh_recipe

    r = mesh_recipe("md", model_type, ep)
    return compile_recipe(yaml.safe_dump(r), source="md").files["PLAN.md"].decode()
