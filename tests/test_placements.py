"""placements stage: a style for every Linear/Embedding/norm, overrides checked."""
from meshbake.compiler.errors import Err

from tests.helpers import paths, recipe_text, resolve


def styles(r):
    return dict(r.placements.styles)


def test_auto_plan_llama_with_sp():
    r = resolve(recipe_text(tp={"sequence_parallel": True, "loss_parallel": True}))
    assert not isinstance(r, Err), r
    s = styles(r)
    assert len(s) == len(r.model.modules)          # nothing unmatched
    assert s["model.embed_tokens"] == "rowwise"
    assert s["lm_head"] == "colwise"
    assert s["model.layers.3.self_attn.q_proj"] == "colwise"
    assert s["model.layers.3.self_attn.o_proj"] == "rowwise"
    assert s["model.layers.3.mlp.down_proj"] == "rowwise"
    assert s["model.layers.3.input_layernorm"] == "sequence_parallel"
    assert s["model.norm"] == "sequence_parallel"
    assert r.plan.tp.sequence_parallel and r.plan.tp.loss_parallel


def test_norms_replicated_without_sp():
    r = resolve(recipe_text())
    assert styles(r)["model.layers.0.post_attention_layernorm"] == "replicate"


def test_tp1_replicates_everything_and_turns_sp_off():
    r = resolve(recipe_text(mesh={"tp": 1}, tp={"sequence_parallel": True}), "lora.rank=8")
    assert not isinstance(r, Err), r
    assert set(styles(r).values()) == {"replicate"}
    assert not r.plan.tp.sequence_parallel
    assert any("no effect" in w for w in r.plan.warnings)


def test_pattern_matching_nothing_is_an_error_with_did_you_mean():
    r = resolve(recipe_text(tp={"plan": {"model.layers.*.mlp.gate": "replicate"}}))
    assert isinstance(r, Err) and paths(r) == ["tp.plan['model.layers.*.mlp.gate']"]
    assert "model.layers.*.mlp.gate_proj" in r.errors[0].hint


def test_replicating_a_whole_block_part_is_allowed_and_warned_with_bytes():
    r = resolve(recipe_text(tp={"plan": {"model.layers.*.mlp.*": "replicate"}}), "lora.rank=8")
    assert not isinstance(r, Err), r
    assert styles(r)["model.layers.0.mlp.up_proj"] == "replicate"
    w = [w for w in r.plan.warnings if "mlp.up_proj" in w]
    # 14336 x 4096 x 4 B = 234.9 MB per copy
    assert w and "234.9 MB" in w[0]


def test_half_replicated_block_is_refused():
    r = resolve(recipe_text(tp={"plan": {"model.layers.*.self_attn.k_proj": "replicate"}}))
    assert isinstance(r, Err) and paths(r) == ["tp.plan"]


def test_style_must_fit_the_module_kind():
    r = resolve(recipe_text(tp={"plan": {"model.norm": "colwise"}}))
    assert isinstance(r, Err) and paths(r) == ["tp.plan['model.norm']"]


def test_loss_parallel_needs_colwise_lm_head():
    r = resolve(recipe_text(tp={"loss_parallel": True, "plan": {"lm_head": "replicate"}}))
    assert isinstance(r, Err) and paths(r) == ["tp.loss_parallel"]


def test_tied_embeddings_must_be_placed_together():
    base = recipe_text(model={"config": "qwen2.5-0.5b"}, mesh={"tp": 2, "dp_shard": -1})
    r = resolve(base, "tp.plan={lm_head: replicate}")
    assert isinstance(r, Err) and paths(r) == ["tp.plan"] and "tied" in r.errors[0].message
    ok = resolve(base)
    assert not isinstance(ok, Err), ok
    assert any("tied embeddings" in w for w in ok.plan.warnings)
    assert ok.plan.model.tie_word_embeddings
