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


def _dims(dp_replicate=1, dp_shard=1, cp=1, tp=1):
    from meshbake.runtime.dims import ParallelDims

    return ParallelDims(dp_replicate, dp_shard, cp, tp, nodes=1, procs_per_node=dp_replicate * dp_shard * cp * tp,
                        device="cpu", backend="gloo")


def test_parallel_dims_strides_are_the_device_mesh_layout():
    """init_device_mesh lays ranks out as arange(world).view(shape): the strides PLAN.md's
    rank examples use must be that tensor's, for every axis."""
    import torch
    from meshbake.runtime.dims import DIMS

    for shape in ((2, 3, 2, 4), (1, 4, 1, 2), (3, 1, 2, 1)):
        d = _dims(*shape)
        grid = torch.arange(d.world).view(d.shape)
        assert d.shape == shape and d.world == grid.numel()
        assert tuple(d.strides[a] for a in DIMS) == grid.stride()


def test_parallel_dims_fsdp_mesh_follows_the_axes():
    assert _dims(dp_shard=4).fsdp_mesh_dims == ("dp_shard",)
    assert _dims(dp_replicate=2, dp_shard=2).fsdp_mesh_dims == ("dp_replicate", "dp_shard")
    assert _dims(dp_shard=2, cp=2).fsdp_mesh_dims == ("dp_shard_cp",)
    h = _dims(dp_replicate=2, dp_shard=2, cp=2, tp=2)
    assert h.fsdp_mesh_dims == ("dp_replicate", "dp_shard_cp") and h.fsdp_dims == ("dp_replicate", "dp_shard", "cp")
    assert (h.dp, h.fsdp, h.cp_chunks) == (4, 4, 4)
    # FSDP2 whenever another rank holds the same weights: not for TP alone (world 1 of dp x cp)
    assert not _dims(tp=4).fsdp_enabled and _dims(dp_replicate=2).fsdp_enabled and _dims(cp=2).fsdp_enabled


def test_sp_lp_are_off_at_tp_1_in_the_plan_with_a_warning():
    r = resolve(recipe_text(mesh={"dp_shard": 8, "tp": 1}, tp={"sequence_parallel": True, "loss_parallel": True},
                            train={"seq_len": 4098, "global_batch_size": 8}))
    assert not isinstance(r, Err), r        # 4098 is not a multiple of 4: SP off, nothing to divide
    assert (r.mesh.sequence_parallel, r.mesh.loss_parallel) == (False, False)
    assert (r.plan.tp.sequence_parallel, r.plan.tp.loss_parallel) == (False, False)
    assert any("no effect with tp = 1" in w for w in r.plan.warnings)
    assert _dims(cp=2, tp=4).seq_len_divisor(True) == 16 and _dims(cp=2, tp=4).seq_len_divisor(False) == 4


def test_plan_json_mesh_is_parallel_dims_only():
    """plan.json's mesh holds the ParallelDims fields + world, none of MeshSpec's compile-only ones."""
    import json

    from meshbake.runtime import plan as P
    from meshbake.runtime.dims import ParallelDims

    r = resolve(recipe_text())
    assert not isinstance(r, Err), r
    assert type(r.plan.mesh) is ParallelDims
    mesh = json.loads(P.dumps(r.plan))["mesh"]
    # pp is written only with a pipeline (mesh.pp > 1): a pp-1 plan.json reads as before pp existed
    assert set(mesh) == set(ParallelDims.__dataclass_fields__) - {"pp"} | {"world"}
    assert P.from_dict(json.loads(P.dumps(r.plan))).mesh == r.plan.mesh == r.mesh.dims
