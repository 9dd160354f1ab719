"""runtime/roles.py: the model's roles decided once and carried in plan.json; the one style ->
shard-dim table."""
from __future__ import annotations

import json

import pytest
from meshbake.compiler.placements import ALLOWED, FUSED_STYLES
from meshbake.runtime import plan as P
from meshbake.runtime.roles import SHARD_DIM, ModelRoles, local_shape, lora_shapes, plan_roles
from meshbake.runtime.sections import build

from tests.helpers import ROOT


def test_every_style_the_compiler_places_has_a_row():
    placed = {s for styles in ALLOWED.values() for s in styles} | set(FUSED_STYLES.values()) | {
        "local_heads", "colwise_norm", "latent"}      # latent: MLA's down-projections (model.py READ_TP_PLANS)
    assert placed == set(SHARD_DIM)


@pytest.mark.parametrize("shape,tensor,style,want", [
    ((8192, 8192), "linear", "colwise", (1024, 8192)),          # out features
    ((8192, 28672), "linear", "rowwise", (8192, 3584)),         # in features
    ((128256, 8192), "embedding", "rowwise", (16032, 8192)),    # an Embedding's input is the vocab
    ((8192,), "linear.bias", "rowwise", (8192,)),               # added after the all-reduce: whole
    ((8192,), "linear.bias", "colwise", (1024,)),
    ((8, 28672, 4096), "experts", "experts", (8, 3584, 4096)),  # each expert's intermediate dim
    ((8, 4096, 14336), "experts.down_proj", "experts", (8, 4096, 1792)),
    ((8192,), "norm", "sequence_parallel", (8192,)),
    ((128,), "norm", "local_heads", (128,)),
    ((576, 7168), "linear", "latent", (576, 7168)),            # DeepSeek-V3 kv_a_proj_with_mqa: whole
])
def test_local_shape(shape, tensor, style, want):
    assert local_shape(shape, tensor, style, 8) == want


def test_one_lora_factor_is_split_the_other_whole():
    assert lora_shapes((8192, 8192), "colwise", 16, 8) == ((16, 8192), (1024, 16))
    assert lora_shapes((8192, 8192), "rowwise", 16, 8) == ((16, 1024), (8192, 16))
    assert lora_shapes((8192, 8192), "replicate", 16, 8) == ((16, 8192), (8192, 16))


def _golden(name: str) -> dict:
    return json.loads((ROOT / "tests" / "golden" / name / "plan.json").read_text())


def test_plan_json_carries_the_roles_the_runtime_reads():
    d = _golden("70b_lora_fsdp_tp")
    roles = plan_roles(P.from_dict(d))
    assert isinstance(roles, ModelRoles) and roles.blocks[0] == "model.layers.0" and roles.num_blocks == 80
    assert len(roles.lora_targets) == 80 * 4 and roles.lora_targets[:4] == tuple(
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo")
    assert json.loads(P.dumps(P.from_dict(d)))["model"]["roles"] == d["model"]["roles"]


@pytest.mark.parametrize("name", ["70b_lora_fsdp_tp", "tiny_cpu"])
def test_a_plan_json_from_before_roles_gets_the_same_roles(name):
    """An old run being exported: its plan.json has no model.roles; they are derived in one
    place (roles.plan_roles) and come out as the compiler decides them today."""
    d = _golden(name)
    old = {**d, "model": {k: v for k, v in d["model"].items() if k != "roles"}}
    new, derived = build(ModelRoles, d["model"]["roles"]), plan_roles(P.from_dict(old))
    # the same modules (placements in plan.json are sorted by name, not in module order)
    assert derived.with_lora(sorted(derived.lora_targets)) == new.with_lora(sorted(new.lora_targets))


def test_plan_and_roles_are_stdlib_only():
    """runtime/plan.py imports roles; neither may need torch (the compiler reads them too)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(torch=None, transformers=None, numpy=None); "
            "import meshbake.runtime.plan, meshbake.runtime.roles")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def _placed(model_type: str, lora: tuple[str, ...]) -> tuple[P.Plan, dict]:
    """{param name: (style, tensor, its tp Shard dim or None)} of the job's own build at tp 2
    (runtime/parallel.parallelize on a fake process group, meta tensors)."""
    import torch.distributed as dist
    from meshbake.runtime.parallel import parallelize
    from meshbake.runtime.train import world_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tests.helpers import plan_of, tiny_recipe

    lo = {"rank": 4, "alpha": 8, "targets": list(lora)} if lora else None
    plan = P.from_dict(plan_of(tiny_recipe(model_type, 2, mesh={"dp_shard": 1, "tp": 2}, sp=True, lp=True, lora=lo,
                                           model=str(ROOT / "tests" / "models" / model_type / "config.json"))))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = parallelize(plan, world_mesh(plan))
        dims = {n: next((p.dim for p in t.placements if isinstance(p, Shard)), None) if isinstance(t, DTensor)
                else None for n, t in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    return plan, dims


@pytest.mark.parametrize("model_type,lora", [
    ("llama", ("q_proj", "o_proj", "down_proj")), ("phi3", ("qkv_proj", "o_proj", "gate_up_proj")),
    ("olmo2", ()), ("qwen3_moe", ()), ("qwen2", ("k_proj",))])      # qwen2: colwise biases, tied
def test_the_runtime_splits_what_the_table_says(model_type, lora):
    """Every parameter the runtime builds is split on the dim SHARD_DIM gives its style (and
    a LoRA factor on lora_dims'), so the compiler's shapes are the runtime's."""
    from meshbake.runtime.roles import lora_dims, shard_dim

    plan, dims = _placed(model_type, lora)
    kinds = {"experts": {"gate_up_proj": "experts", "down_proj": "experts.down_proj"}}
    seen = set()
    for name, dim in dims.items():
        fqn, _, leaf = name.rpartition(".")
        style = plan.tp.placements.get(fqn)
        if style is None:
            continue                                   # a tied lm_head.weight is listed under the embedding
        if leaf in ("lora_A", "lora_B"):
            want = lora_dims(style)[leaf == "lora_B"]
        elif style == "experts":
            want = shard_dim(style, kinds["experts"][leaf])
        else:
            kind = "norm" if "norm" in fqn.rpartition(".")[2] else "embedding" if fqn == plan_roles(plan).embedding \
                else "linear.bias" if leaf == "bias" else "linear"
            want = shard_dim(style, kind)
        assert dim == want, (name, style, dim, want)
        seen.add(style)
    assert {"colwise", "rowwise"} <= seen
    assert any(n.endswith("lora_A") for n in dims) == bool(lora)
