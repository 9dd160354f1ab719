"""mesh stage: resolve ([pp,] dp_replicate, dp_shard, cp, tp) and the batch arithmetic.

Axis order is fixed outer -> inner: [pp,] dp_replicate, dp_shard, cp, tp (runtime/dims.DIMS,
PP_DIMS: torchtitan's order). TP is innermost, so a TP group is `tp` consecutive ranks and
stays on one node when tp divides gpus_per_node; pp is outermost, so a stage group is
world / pp consecutive ranks (whole nodes) and only the stages' activation sends cross nodes.
With pp the micro-batches of a step ARE the gradient accumulation: grad_accum =
global_batch_size / (micro_batch_size x dp) is pp.microbatches (compiler/pp.py). The mesh
facts (dp, fsdp dims, tp/cp enabled, seq_len divisor, SP/LP off at tp = 1) are
runtime/dims.ParallelDims's; MeshSpec adds what only the compiler needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result, reads, run, skipped
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.recipe import Recipe
from meshbake.runtime.dims import DIMS, ParallelDims, backend_for, tokens_per_step


@dataclass(frozen=True, kw_only=True)
class MeshSpec(ParallelDims):
    inferred: str | None          # the axis that was -1
    grad_accum: int
    tokens_per_step: int          # global_batch_size * seq_len
    sequence_parallel: bool       # effective: ParallelDims.tp_flags (off at tp = 1)
    loss_parallel: bool

    @property
    def dims(self) -> ParallelDims:
        """The plan.json part: the ParallelDims fields only."""
        return ParallelDims(**{f.name: getattr(self, f.name) for f in fields(ParallelDims)})


def divisors(n: int) -> list[int]:
    """Pairs up to sqrt(n): O(sqrt n), not O(n) (n up to the 1024 GPUs per node the schema allows)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


@reads("mesh.dp_replicate", "mesh.dp_shard", "mesh.cp", "mesh.tp", "mesh.pp", "cluster.nodes",
       "cluster.gpus_per_node")
def _axes(recipe: Recipe, world: int) -> Result[dict[str, int]]:
    given = {a: getattr(recipe.mesh, a) for a in DIMS}
    free = [a for a, v in given.items() if v == -1]
    # pp (never -1, schema) is one more factor of the world: the other axes fill world / pp
    pp = recipe.mesh.pp
    fixed = math.prod(v for v in given.values() if v != -1) * pp
    w = f"cluster.nodes x cluster.gpus_per_node = {recipe.cluster.nodes} x {recipe.cluster.gpus_per_node} = {world}"
    if len(free) > 1:
        return Err((RecipeError("mesh", f"{' and '.join(free)} are both -1; at most one axis can be inferred",
                                f"set all but one of them; {w}"),))
    if free:
        if world % fixed:
            return Err((RecipeError("mesh", f"world size {world} ({w}) is not divisible by the product of the "
                                    f"other axes ({fixed})", f"pick axes whose product divides {world}"),))
        given[free[0]] = world // fixed
    elif fixed != world:
        prod = " x ".join(str(given[a]) for a in DIMS)
        names = "dp_replicate x dp_shard x cp x tp"
        if pp > 1:
            prod, names = f"{pp} x {prod}", f"pp x {names}"
        return Err((RecipeError("mesh", f"{names} = {prod} = {fixed}, but {w}",
                                "make the product equal the world size, or set dp_shard: -1 to infer it"),))
    return {**given, "pp": pp}


@reads("cluster.gpus_per_node", "mesh.allow_cross_node_tp")
def _tp_errors(recipe: Recipe, model: ModelSpec, tp: int) -> list[RecipeError]:
    errs = []
    gpn = recipe.cluster.gpus_per_node
    if gpn % tp and not recipe.mesh.allow_cross_node_tp:
        errs.append(RecipeError("mesh.tp", f"tp={tp} does not divide cluster.gpus_per_node={gpn}, so TP groups "
                                "would cross nodes (every matmul all-reduces over the slow inter-node network)",
                                f"use tp in {divisors(gpn)} or set mesh.allow_cross_node_tp: true"))
    dims = {"num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads,
            "intermediate_size": model.intermediate_size}
    dense = model.config.get("intermediate_size")
    if isinstance(dense, int) and dense != model.intermediate_size:   # MoE: experts' I above, dense layers' here
        dims = {**dims, "moe_intermediate_size": model.intermediate_size, "intermediate_size": dense}
    shared = model.config.get("shared_expert_intermediate_size")
    if isinstance(shared, int) and shared and model.num_experts:   # Qwen2-MoE's shared expert: colwise / rowwise
        dims = {**dims, "shared_expert_intermediate_size": shared}
    mlp = model.config.get("intermediate_size_mlp")     # Llama-4: its dense layers' I (intermediate_size: experts')
    if isinstance(mlp, int):
        dims = {**dims, "intermediate_size_mlp": mlp}
    bad = [f"{k}={v}" for k, v in dims.items() if v % tp]
    if bad:
        ok = [d for d in divisors(min(gpn, model.num_kv_heads))
              if all(v % d == 0 for v in (*dims.values(), model.vocab_size))]
        errs.append(RecipeError("mesh.tp", f"tp={tp} does not divide {', '.join(bad)} of {model.source}",
                                f"try tp in {ok}"))
    if model.vocab_size % tp:
        # the embedding and lm_head are split on the vocab dim (equal Shard(0) blocks); a vocab
        # such as 32001 (a pad token added to 32000) is fixed once, in the checkpoint, by padding
        mult = math.lcm(64, tp)
        pad = -(-model.vocab_size // mult) * mult
        errs.append(RecipeError("mesh.tp", f"tp={tp} does not divide vocab_size={model.vocab_size} of "
                                f"{model.source} (embedding and lm_head are sharded on the vocab dim)",
                                f"pad the vocabulary: model.resize_token_embeddings(len(tokenizer), "
                                f"pad_to_multiple_of={mult}) -> vocab_size {pad}, save_pretrained, point "
                                f"model.config at it"))
    return errs


@reads("train.seq_len", "tp.sequence_parallel")      # sp: the effective tp.sequence_parallel
def _seq_errors(recipe: Recipe, dims: ParallelDims, sp: bool) -> list[RecipeError]:
    s, need = recipe.train.seq_len, dims.seq_len_divisor(sp)
    if s % need == 0:
        return []
    why = []
    if dims.cp_enabled:
        why.append(f"2 x cp = {dims.cp_chunks} (load-balanced context parallel)")
    if sp:
        why.append(f"tp = {dims.tp} (sequence parallel)")
    by = why[0] if len(why) == 1 else f"{' x '.join(why)} = {need}"
    return [RecipeError("train.seq_len", f"seq_len={s} is not divisible by {by}",
                        f"use a multiple of {need}, e.g. {max(need, s - s % need)}")]


@reads("train.micro_batch_size", "train.global_batch_size", "train.grad_accum")
def _batch(recipe: Recipe, dp: int) -> Result[int]:
    t = recipe.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        lo = max(per_step, t.global_batch_size - t.global_batch_size % per_step)
        return Err((RecipeError("train.global_batch_size",
                                f"global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x "
                                f"dp_replicate x dp_shard = {t.micro_batch_size} x {dp} = {per_step}",
                                f"use {lo} or {lo + per_step}"),))
    ga = t.global_batch_size // per_step
    if t.grad_accum is not None and t.grad_accum != ga:
        return Err((RecipeError("train.grad_accum", f"grad_accum={t.grad_accum}, but global_batch_size / "
                                f"(micro_batch_size x dp) = {t.global_batch_size} / {per_step} = {ga}",
                                "remove train.grad_accum (it is derived) or make them agree"),))
    return ga


def resolve_mesh(recipe: Recipe, model: ModelSpec, aside: frozenset[str] = frozenset()) -> Result[MeshSpec]:
    """All mesh rules at once: every error is collected, none stops the others. A rule that reads
    a field validate set aside is skipped; without the axes there is no mesh (Err(()))."""
    if skipped(_axes, aside):
        return Err(())
    c = recipe.cluster
    world = c.nodes * c.gpus_per_node
    axes = _axes(recipe, world)
    if isinstance(axes, Err):
        return axes
    from meshbake.compiler.moe import ep_errors

    dims = ParallelDims(**axes, nodes=c.nodes, procs_per_node=c.gpus_per_node, device=c.device,
                        backend=backend_for(c.device), ep=recipe.mesh.ep)
    sp, lp = dims.tp_flags(recipe.tp.sequence_parallel, recipe.tp.loss_parallel)
    errs = run(_tp_errors, aside, recipe, model, dims.tp) + run(_seq_errors, aside, recipe, dims, sp)
    errs += run(ep_errors, aside, recipe, model, axes)
    # a stand-in when a batch size is set aside: the checks that would read it are skipped too
    ga = 1 if skipped(_batch, aside) else _batch(recipe, dims.dp)
    if isinstance(ga, Err):
        errs += ga.errors
    if errs:
        return Err(tuple(errs))
    free = [a for a in DIMS if getattr(recipe.mesh, a) == -1]
    return MeshSpec(**vars(dims), inferred=free[0] if free else None, grad_accum=ga,
                    tokens_per_step=tokens_per_step(recipe.train), sequence_parallel=sp, loss_parallel=lp)


_ROLES = {"pp": "pipeline parallel: decoder blocks split into stages, activations sent point to point; "
                "outermost, so stage groups are whole nodes and only the sends cross between them",
          "dp_replicate": "replicas of the sharded model; gradients all-reduced (HSDP)",
          "dp_shard": "FSDP: parameters, gradients, optimizer state sharded",
          "cp": "context parallel: sequence split, K/V gathered; weights FSDP-sharded with dp_shard",
          "tp": "tensor parallel: every block's matmuls split; consecutive ranks, one node"}


def mesh_rows(dims: ParallelDims) -> list[dict[str, Any]]:
    """PLAN.md's mesh table: per axis its size, the first ranks of rank 0's group, its role."""
    rows = []
    for axis in dims.mesh_dims:
        size, stride = getattr(dims, axis), dims.strides[axis]
        example = ", ".join(str(i * stride) for i in range(min(size, 4))) + (", ..." if size > 4 else "")
        rows.append({"axis": axis, "size": size, "example": example, "role": _ROLES[axis]})
    if dims.ep_enabled:
        # carved from the flattened (dp_shard, cp, tp) index, tp innermost (runtime/ep.py): the
        # world is row-major (dp_replicate, dp_shard, cp, tp), so an ep group is ep consecutive
        # world ranks (stride 1). The label names only the axes > 1 it is carved from.
        within = " x ".join(a for a in ("dp_shard", "cp", "tp") if getattr(dims, a) > 1) or "dp_shard"
        rows.append({"axis": f"ep (within {within})", "size": dims.ep,
                     "example": ", ".join(str(i) for i in range(min(dims.ep, 4))) + (", ..." if dims.ep > 4 else ""),
                     "role": "expert parallel: experts split by index, tokens sent to them all-to-all; experts "
                             + ("whole on each tp rank, " if dims.tp_enabled else "")
                             + f"FSDP-sharded over {within} / ep = {dims.experts_fsdp}"})
    return rows


def view(mesh: MeshSpec) -> dict[str, Any]:
    """What PLAN.md prints of this stage beyond plan.mesh, as plain values."""
    return {"inferred": mesh.inferred, "tokens_per_step": mesh.tokens_per_step, "rows": mesh_rows(mesh)}
