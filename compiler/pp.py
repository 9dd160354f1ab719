"""pp stage: pipeline parallelism resolved (mesh.pp > 1) -> runtime/plan.PPPlan, or None.

The decoder blocks are split into pp x pp.stages_per_rank stages at block boundaries; the
embedding goes with the first stage, the final norm + lm_head + loss with the last
(runtime/pp.py builds them on torch.distributed.pipelining, torchtitan's approach). The split
is decided here, once, and carried in plan.json (pp.stages); the runtime never re-derives it.

With pp the micro-batches of a step ARE the gradient accumulation: each pipeline runs
grad_accum = global_batch_size / (micro_batch_size x dp) micro-batches per optimizer step
through its stages, so pp.microbatches is that number (null in the recipe: derived).

Composes with tp's sequence and loss parallel: what crosses between stages stays a plain tensor
(the schedule's send / recv and its shape inference), so under sequence parallel a stage sends
its local Shard(1) slice of the hidden states, (mbs, T/tp, H), and the next stage re-wraps it
(tp x fewer bytes than the full sequence, no all-gather at the boundary); under loss parallel
the last stage hands its local (mbs, T, V/tp) logits to the loss, which re-wraps them and runs
the vocab-sharded cross-entropy (runtime/pp.py; parity in tests/test_pp.py, 1F1B and ZBV).

LoRA: each rank adapts the targets its stages hold (after TP, before FSDP, as without pp); the
names are the model's, so checkpoints resume and export as without pp. Packed data (text / chat
/ instruction): the per-document position_ids go to every stage as a schedule kwarg (each rank
reads them from its own copy of the batch: nothing extra is sent), and eval runs the schedule
forward only (runtime/pp.eval_loss). Context parallel: cp's attention is installed before the
split, each stage's blocks attend over the cp pair's all-gathered K/V. Packed rows need a mask
per micro-batch (causal AND same document) while the schedule interleaves the micro-batches over
the stages, so each stage forward builds its own micro-batch's mask from the global position_ids
(the schedule kwarg) and hands it to cp_attention as a kwarg (runtime/pp.Stage, runtime/cp.masks):
no mask is kept between forwards, and AC's recompute gets the same one.

Tied embeddings (tie_word_embeddings: Llama-3.2, Qwen2.5 0.5B-3B, ...), Megatron-LM's way: the
embedding lives on the first stage, lm_head on the last, and the last stage's rank holds its own
copy of the table as lm_head's weight, named model.embed_tokens.weight as in one process (same
seeded init or checkpoint values, one checkpoint key: DCP writes it once, both ranks load it).
After each backward the two copies' gradients are summed over the (first, last) pair
(runtime/pp.tied_grads; the pp group at pp 2), so both take the identical AdamW update; the
grad norm counts the table once. The copy costs the last stage the table's parameters, its
gradient and its optimizer state (compiler/estimate.py), and each step one all-reduce of its
local shard (vocab x hidden / (tp x dp_shard) elements). ZBV puts both stages on rank 0: one
parameter, no copy (refused with FSDP: one parameter in two FSDP stage roots).

MoE (qwen3_moe, mixtral): each stage's MoE blocks run as without pp (runtime/fused.py, experts
TP'd or FSDP'd), or with mesh.ep > 1 experts by index over an ep axis carved from each stage
group's dp_shard x cp x tp (runtime/ep.py: the all-to-alls stay inside the ranks that hold the
same blocks; compiler/moe.py's ep rules apply unchanged, since they read the stage group's axes).
The router aux loss is exact under pp (runtime/pp.aux_carry: the per-layer router sums ride
beside the hidden states to the last stage's loss). The split: by decoder-block count (even,
or pp.split), for MoE as for dense models. It counts neither parameters nor FLOPs directly: for
the MoE types accepted every block is alike (a routed-experts block holds all E experts' weights
but runs top-k of them per token, the same for each block), so an even count balances the held
parameters (memory) and the FLOPs (time) at once; the exceptions are Qwen3-MoE's mlp_only_layers
(dense blocks: fewer parameters and FLOPs) and, as for dense models, the embedding on the first
stage and final norm + lm_head on the last. PLAN.md's stage table shows each stage's parameters
(all experts held), and pp.split overrides.

What is not implemented yet is refused with the reason (errors as values), never run
half-right: QLoRA (its NF4 base loads
block by block into a whole model), torch.compile, model types whose base model does anything
to inputs_embeds (Gemma scales them: only the first stage may) or that are not tested under pp
(the other MoE types: Qwen2-MoE, DeepSeek-V3, GLM-4-MoE, GPT-OSS, Granite-MoE, Llama-4).
"""
from __future__ import annotations

from meshbake.compiler.errors import Err, RecipeError, Result, reads, run, skipped
from meshbake.compiler.mesh import MeshSpec
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import plan as P

# model types whose HF base model takes inputs_embeds as they are (the stages after the first
# call it with inputs_embeds=<the previous stage's hidden states>): Llama's forward, which Mistral,
# Qwen2 and Qwen3 share (Qwen2 / Qwen3 index config.layer_types by loop position: runtime/pp.py
# gives each stage its blocks' slice). Parity cases in tests/test_pp.py: tiny-llama, a Qwen2 with a
# sliding-window second block, a Qwen3 (q/k norms); Mistral: compile test (same forward as Llama);
# the MoE types Qwen3-MoE and Mixtral (same base forward, MoE blocks; with ep and the aux loss)
PP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
# schedule -> stages per rank it runs: 1 (single-stage), "2+" (looped), 2 (V-shaped)
SINGLE = ("1F1B", "GPipe")


def even_split(layers: int, stages: int) -> tuple[int, ...]:
    """Blocks per stage as even as possible, the first `layers % stages` stages one more:
    32 layers / 3 stages -> (11, 11, 10)."""
    q, r = divmod(layers, stages)
    return tuple(q + (1 if i < r else 0) for i in range(stages))


def ranges(counts: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return tuple(out)


def stage_ranks(pp: int, stages_per_rank: int, schedule: str) -> tuple[int, ...]:
    """The pp rank each stage runs on (torch's generate_stage_to_rank_mapping): looped (stage s
    on rank s % pp) for 1F1B / GPipe / Interleaved1F1B, V-shaped for ZBV (rank r holds stages r
    and 2 pp - 1 - r, so the first and the last stage share rank 0)."""
    n = pp * stages_per_rank
    if schedule == "ZBVZeroBubble":
        return tuple(s if s < pp else n - 1 - s for s in range(n))
    return tuple(s % pp for s in range(n))


@reads("pp", "mesh.pp", "train.global_batch_size", "train.micro_batch_size")
def _schedule_errors(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> list[RecipeError]:
    p, pp = recipe.pp, mesh.pp
    errs = []
    spr, stages, accum = p.stages_per_rank, pp * p.stages_per_rank, mesh.grad_accum
    if p.schedule in SINGLE and spr != 1:
        errs.append(RecipeError("pp.stages_per_rank", f"{p.schedule} runs one stage per rank, stages_per_rank is {spr}",
                                "use pp.schedule: Interleaved1F1B for more stages per rank, or stages_per_rank: 1"))
    if p.schedule == "Interleaved1F1B" and spr < 2:
        errs.append(RecipeError("pp.stages_per_rank", "Interleaved1F1B needs at least 2 stages per rank",
                                "set pp.stages_per_rank: 2 (or use pp.schedule: 1F1B)"))
    if p.schedule == "ZBVZeroBubble" and spr != 2:
        errs.append(RecipeError("pp.stages_per_rank", f"ZBVZeroBubble runs exactly 2 stages per rank (V-shaped), "
                                f"stages_per_rank is {spr}", "set pp.stages_per_rank: 2"))
    if model.num_layers < stages:
        errs.append(RecipeError("mesh.pp", f"{model.num_layers} decoder blocks (num_hidden_layers of {model.source}) "
                                f"cannot fill pp x stages_per_rank = {pp} x {spr} = {stages} stages",
                                f"use at most {model.num_layers} stages"))
    batch = (f"global_batch_size / (micro_batch_size x dp) = {recipe.train.global_batch_size} / "
             f"({recipe.train.micro_batch_size} x {mesh.dp}) = {accum}")
    if p.microbatches is not None and p.microbatches != accum:
        errs.append(RecipeError("pp.microbatches", f"microbatches={p.microbatches}, but with pp the micro-batches are "
                                f"the gradient accumulation: {batch}",
                                f"remove pp.microbatches, or set train.global_batch_size: "
                                f"{recipe.train.micro_batch_size * p.microbatches * mesh.dp} (micro_batch_size x "
                                f"microbatches x dp)"))
    elif accum < pp:
        errs.append(RecipeError("train.global_batch_size", f"{batch} micro-batches per step, fewer than pp = {pp} "
                                "stages (torch's 1F1B refuses it; the pipeline would never fill)",
                                f"set train.global_batch_size to at least micro_batch_size x pp x dp = "
                                f"{recipe.train.micro_batch_size * pp * mesh.dp}"))
    elif p.schedule in ("Interleaved1F1B", "ZBVZeroBubble") and accum % max(1, accum // pp):
        rounds = max(1, accum // pp)
        errs.append(RecipeError("train.global_batch_size", f"{p.schedule} runs the micro-batches in rounds of pp: "
                                f"{accum} micro-batches is not a multiple of its {rounds} rounds",
                                f"make the micro-batches per step a multiple of pp = {pp} (global_batch_size "
                                f"{recipe.train.micro_batch_size * pp * mesh.dp * rounds})"))
    return errs


@reads("pp.split", "mesh.pp", "pp.stages_per_rank")
def _split(recipe: Recipe, model: ModelSpec, stages: int) -> Result[tuple[int, ...]]:
    split = recipe.pp.split
    if split is None:
        return even_split(model.num_layers, stages)
    if len(split) != stages or sum(split) != model.num_layers:
        return Err((RecipeError("pp.split", f"{len(split)} stages of {sum(split)} blocks, but the plan has "
                                f"pp x stages_per_rank = {stages} stages of num_hidden_layers = {model.num_layers}",
                                f"give {stages} counts summing to {model.num_layers}, e.g. "
                                f"{list(even_split(model.num_layers, stages))}, or remove pp.split"),))
    return tuple(split)


@reads("pp", "mesh", "lora", "train.compile", "train.router_aux_loss_coef", "data")
def _refused(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> list[RecipeError]:
    """Features pp does not compose with yet: each one an error with the reason."""
    def no(path: str, why: str, fix: str) -> None:
        errs.append(RecipeError(path, f"not supported with mesh.pp > 1: {why}", fix))

    errs: list[RecipeError] = []
    if model.model_type not in PP_MODEL_TYPES:
        no("model.config", f"model_type {model.model_type} has no pipeline stage split yet (supported: "
           f"{', '.join(PP_MODEL_TYPES)})", "use mesh.pp: 1")
    if model.roles.tied and recipe.pp.schedule == "ZBVZeroBubble" and mesh.fsdp_enabled:
        no("pp.schedule", f"tied embeddings with ZBVZeroBubble and FSDP: the V puts the first and the last stage on "
           f"pp rank 0, so {model.roles.embedding}'s weight would be one parameter in two FSDP stage roots",
           "use pp.schedule: 1F1B or Interleaved1F1B (the last stage then holds its own copy of the table), "
           "or mesh.dp_shard: 1")
    if recipe.lora.rank > 0 and recipe.lora.quantize_base != "none":
        no("lora.quantize_base", "QLoRA's NF4 base is loaded block by block into one whole model "
           "(runtime/parallel.build_quantized), not into pipeline stages", "use lora.quantize_base: none (LoRA), "
           "or mesh.pp: 1")
    if recipe.train.compile:
        no("train.compile", "torch.compile of stage blocks is not tested yet", "set train.compile: false")
    return errs


def resolve_pp(recipe: Recipe, model: ModelSpec, mesh: MeshSpec,
               aside: frozenset[str] = frozenset()) -> Result[P.PPPlan | None]:
    """The resolved pipeline, None without one; every error at once (a check reading a field
    validate set aside is skipped, and then there is no pipeline to build: Err(()))."""
    p = recipe.pp
    if mesh.pp == 1:
        default = type(p)()
        if p != default:
            changed = sorted(k for k in vars(default) if getattr(p, k) != getattr(default, k))
            return Err((RecipeError(f"pp.{changed[0]}", "has no effect with mesh.pp 1 (no pipeline)",
                                    "set mesh.pp > 1, or remove the pp section"),))
        return None
    errs = run(_refused, aside, recipe, model, mesh) + run(_schedule_errors, aside, recipe, model, mesh)
    stages = mesh.pp * p.stages_per_rank
    split = _split(recipe, model, stages) if model.num_layers >= stages and not skipped(_split, aside) else Err(())
    if isinstance(split, Err):
        errs += split.errors
    if errs:
        return Err(tuple(errs))
    return P.PPPlan(schedule=p.schedule, microbatches=mesh.grad_accum, stages_per_rank=p.stages_per_rank,
                    split=tuple(split) if p.split is not None else None, stages=ranges(split))


def stage_rows(model: ModelSpec, pp: P.PPPlan, pp_size: int) -> list[dict]:
    """PLAN.md's stage table: per stage its pp rank, blocks, and parameters (the first stage's
    embedding and the last's final norm + lm_head counted where they live)."""
    r = model.roles
    per_block = [0] * model.num_layers
    extra = {"first": 0, "last": 0}
    for m in model.modules:
        if r.in_block(m.fqn):
            per_block[int(m.fqn[len(r.block_prefix) + 1:].split(".")[0])] += m.numel
        elif m.fqn == r.embedding:
            extra["first"] += m.numel
        else:                          # final norm, lm_head
            extra["last"] += m.numel
    ranks = stage_ranks(pp_size, pp.stages_per_rank, pp.schedule)
    rows = []
    for s, (a, b) in enumerate(pp.stages):
        parts = (["embedding"] if s == 0 else []) + [f"blocks {a}-{b - 1}" if b - a > 1 else f"block {a}"] + (
            ["final norm + lm_head + loss"] if s == len(pp.stages) - 1 else [])
        n = sum(per_block[a:b]) + (extra["first"] if s == 0 else 0) + (extra["last"] if s == len(pp.stages) - 1 else 0)
        rows.append({"stage": s, "rank": ranks[s], "parts": ", ".join(parts), "blocks": b - a, "params": n})
    return rows


def node_placement(m) -> dict:
    """Which mesh axes cross nodes and which stay inside one, and the nodes of the first stage
    group, for PLAN.md (m: runtime/dims.ParallelDims with pp > 1). torchrun numbers the ranks
    node by node (rank = node x procs_per_node + local rank), so rank r is on node r // ppn. An
    axis of size n and stride s (consecutive groups of s x n ranks) stays inside a node iff
    s x n <= ppn: tp always does (the mesh stage refuses a tp that does not divide the node's
    GPUs); pp's stride is world / pp, so pp crosses nodes once world / pp >= ppn.
    A stage group is world / pp consecutive ranks: ranks 0 .. world/pp - 1 on nodes
    0 .. (world/pp - 1) // ppn; when world / pp is not a multiple of ppn two stage groups share
    a node (allowed: only the activation sends and the dp traffic of the groups go between them)."""
    ppn, st = m.procs_per_node, m.strides
    sized = [d for d in m.mesh_dims if getattr(m, d) > 1]
    across = [d for d in sized if st[d] * getattr(m, d) > ppn]
    inside = [d for d in sized if d not in across]
    group = m.world // m.pp
    last = (group - 1) // ppn
    return {"across": across, "inside": inside, "group_ranks": group, "first_nodes": (0, last),
            "first_text": f"ranks 0-{group - 1} on " + (f"nodes 0-{last}" if last else "node 0"),
            "shares_node": group % ppn != 0}
