"""mesh stage: every rule of DESIGN.md, each an error with its path and a hint."""
from meshbake.compiler.errors import Err

from tests.helpers import paths, recipe_text, resolve


def test_dp_shard_inferred_and_batch_arithmetic():
    r = resolve(recipe_text(mesh={"dp_replicate": 2, "dp_shard": -1, "tp": 8},
                            cluster={"nodes": 8, "gpus_per_node": 8},
                            train={"seq_len": 8192, "global_batch_size": 64,
                                   "activation_checkpointing": "full"}),
                "model.config=llama-3.1-70b", "lora.rank=16")
    assert not isinstance(r, Err), r
    m = r.mesh
    assert (m.dp_replicate, m.dp_shard, m.cp, m.tp, m.world) == (2, 4, 1, 8, 64)
    assert m.inferred == "dp_shard"
    assert m.grad_accum == 64 // (1 * 2 * 4)          # global / (micro x dp_replicate x dp_shard)
    assert m.tokens_per_step == 64 * 8192


def test_world_size_mismatch():
    r = resolve(recipe_text(mesh={"dp_shard": 2, "tp": 8}))
    assert isinstance(r, Err) and paths(r) == ["mesh"]
    assert "16" in r.errors[0].message and "8" in r.errors[0].message


def test_two_inferred_axes():
    r = resolve(recipe_text(mesh={"dp_replicate": -1, "dp_shard": -1, "tp": 8}))
    assert isinstance(r, Err) and paths(r) == ["mesh"]


def test_tp_must_divide_kv_heads_with_valid_values_in_hint():
    r = resolve(recipe_text(mesh={"tp": 16}, cluster={"nodes": 1, "gpus_per_node": 16}))
    assert isinstance(r, Err) and paths(r) == ["mesh.tp"]
    e = r.errors[0]
    assert "num_key_value_heads=8" in e.message
    assert "16" in e.message and "[1, 2, 4, 8]" in e.hint


def test_tp_across_nodes_is_refused_unless_allowed():
    text = recipe_text(mesh={"tp": 4, "dp_shard": -1}, cluster={"nodes": 2, "gpus_per_node": 2})
    r = resolve(text)
    assert isinstance(r, Err) and "mesh.tp" in paths(r) and "cross nodes" in str(r.errors[0])
    ok = resolve(text, "mesh.allow_cross_node_tp=true")
    assert not isinstance(ok, Err), ok


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    r = resolve(recipe_text(tp={"sequence_parallel": True}, train={"seq_len": 4100, "global_batch_size": 8}))
    assert isinstance(r, Err) and paths(r) == ["train.seq_len"]
    assert "4096" in r.errors[0].hint


def test_context_parallel_needs_seq_len_divisible_by_2cp():
    r = resolve(recipe_text(mesh={"cp": 4, "tp": 2}, train={"seq_len": 4100, "global_batch_size": 8}))
    assert isinstance(r, Err) and paths(r) == ["train.seq_len"]
    assert "2 x cp = 8" in r.errors[0].message


def test_global_batch_must_be_exact():
    r = resolve(recipe_text(mesh={"dp_shard": 4, "tp": 2}, train={"seq_len": 4096, "global_batch_size": 10}))
    assert isinstance(r, Err) and paths(r) == ["train.global_batch_size"]
    assert "8 or 12" in r.errors[0].hint


def test_grad_accum_given_must_agree():
    r = resolve(recipe_text(mesh={"dp_shard": 4, "tp": 2},
                            train={"seq_len": 4096, "global_batch_size": 16, "grad_accum": 2}))
    assert isinstance(r, Err) and paths(r) == ["train.grad_accum"]


def test_all_mesh_errors_reported_at_once():
    r = resolve(recipe_text(mesh={"dp_shard": 1, "tp": 16}, cluster={"nodes": 2, "gpus_per_node": 8},
                            tp={"sequence_parallel": True}, train={"seq_len": 1000, "global_batch_size": 3}),
                "mesh.dp_shard=1")
    assert isinstance(r, Err)
    # tp crosses nodes AND does not divide the heads; seq_len; batch: all at once
    assert paths(r).count("mesh.tp") == 2 and "train.seq_len" in paths(r)


def test_vocab_not_divisible_by_tp_says_how_to_pad(tmp_path):
    """A vocab of 4097 (a pad token added to 4096) cannot be split into equal vocab shards."""
    import json

    from tests.helpers import ROOT
    cfg = json.loads((ROOT / "compiler/catalog/tiny-llama.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, vocab_size=4097)))
    r = resolve(recipe_text(mesh={"tp": 2, "dp_shard": 4}), f"model.config={tmp_path / 'config.json'}")
    assert isinstance(r, Err) and paths(r) == ["mesh.tp"], r
    e = r.errors[0]
    assert "vocab_size=4097" in e.message and "pad_to_multiple_of=64" in e.hint and "4160" in e.hint
    # with the heads wrong too, both are reported, and the heads hint does not offer a tp the vocab refuses
    r = resolve(recipe_text(mesh={"tp": 4, "dp_shard": 2}), f"model.config={tmp_path / 'config.json'}")
    assert isinstance(r, Err) and paths(r) == ["mesh.tp", "mesh.tp"], r
    assert r.errors[0].hint == "try tp in [1]" and "vocab_size=4097" in r.errors[1].message
