"""estimate stage: per-rank memory, FLOPs and communication of one optimizer step.

Memory model (bytes per rank), from the resolved placements and sharding:
  params     trainable+frozen weights after TP (colwise/rowwise /tp) then FSDP (/ dp_shard*cp),
             in model.dtype (the master copy FSDP2 keeps sharded)
  grads      trainable params, sharded like params, in model.dtype
  optimizer  AdamW exp_avg + exp_avg_sq: 2 x trainable params, sharded, in model.dtype
             -> full fine-tuning in fp32 is 4 + 4 + 8 = 16 bytes per parameter / (tp * dp_shard * cp)
  gathered   FSDP all-gathers one block in param_dtype and prefetches the next: 2 blocks,
             + one block of unsharded gradients in reduce_dtype during backward
  activations per decoder layer and token (param_dtype bytes, flash attention: no s^2 term):
             TP-sharded tensors  q, k, v, attn-out (2h + 2 kv_dim) + gate, up, act, gate*up (4I)   /tp
             replicated tensors  2 norm inputs + qkv input + mlp input (4h)  /tp only with SP
             tokens per rank = micro_batch_size * seq_len / cp; full AC keeps only the block input
  logits     tokens x vocab x 8 bytes (bf16 logits, fp32 upcast, fp32 grad ~ 2+4+2), /tp under loss parallel
The usable budget is 90% of cluster.gpu_memory_gb (CUDA context, NCCL buffers, fragmentation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.errors import Err, RecipeError, Result
from compiler.mesh import MeshSpec
from compiler.model import ModelSpec
from compiler.placements import DTYPE_BYTES, Placements, local_shape
from compiler.recipe import Recipe

USABLE = 0.9


@dataclass(frozen=True)
class Estimate:
    params_total: int              # unique parameters of the model
    trainable_total: int
    params_per_rank: int           # after TP and FSDP sharding
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    gathered_bytes: int
    activations_bytes: int
    logits_bytes: int
    budget_bytes: int
    block_gather_bytes: int        # what `gathered` is as soon as FSDP shards (dp_shard x cp > 1)
    flops_per_token: int           # 6N + attention 12 * L * h * seq (PaLM appendix B; causal not halved)
    fsdp_comm_bytes: int           # per rank per optimizer step
    tp_comm_bytes: int

    @property
    def terms(self) -> dict[str, int]:
        return {"params": self.params_bytes, "grads": self.grads_bytes, "optimizer": self.optimizer_bytes,
                "gathered": self.gathered_bytes, "activations": self.activations_bytes,
                "logits": self.logits_bytes}

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())


def _tp_local(model: ModelSpec, pl: Placements, tp: int) -> tuple[int, int]:
    """(all params, one block's params) held by one tp rank, before FSDP."""
    head_tied = model.tie_word_embeddings
    total = block = 0
    for m in model.modules:
        if head_tied and m.kind == "linear" and m.shape[0] == model.vocab_size:
            continue                                  # the tied lm_head is the embedding's weight
        full = 1
        for d in m.shape:
            full *= d
        loc = 1
        for d in local_shape(m.shape, m.kind, pl.styles[m.fqn], tp):
            loc *= d
        n = m.numel - full + loc                      # bias (if any) kept whole: it is small
        if pl.styles[m.fqn] == "experts":             # gate_up AND down are split on each expert's I
            n = m.numel // tp
        total += n
        if m.fqn.startswith(f"{model.block_prefix}.0."):
            block += n
    covered = sum(m.numel for m in model.modules) - (model.vocab_size * model.hidden_size if head_tied else 0)
    return total + max(0, model.num_params - covered), block


def _lora_trainable(recipe: Recipe, model: ModelSpec, tp: int) -> int:
    r = recipe.lora.rank
    leaves = set(recipe.lora.targets)
    # A (r x in) and B (out x r); one of them is split by the base layer's TP style
    return sum(r * (m.shape[1] + m.shape[0]) // tp for m in model.modules
               if m.kind == "linear" and m.fqn.rpartition(".")[2] in leaves)


def _activations(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> tuple[int, int]:
    t, tp = recipe.train, mesh.tp
    tokens = t.micro_batch_size * t.seq_len // mesh.cp
    b = DTYPE_BYTES[t.mixed_precision.param_dtype]
    h, inter = model.hidden_size, model.intermediate_size
    kv = model.num_kv_heads * model.head_dim
    sp_div = tp if recipe.tp.sequence_parallel else 1
    per_layer = tokens * b * ((2 * h + 2 * kv + 4 * inter) // tp + 4 * h // sp_div)
    if t.activation_checkpointing == "full":
        acts = model.num_layers * tokens * b * h // sp_div + per_layer   # inputs + one recomputed layer
    else:
        acts = model.num_layers * per_layer
    logits = tokens * model.vocab_size * 8 // (tp if recipe.tp.loss_parallel else 1)
    return acts, logits


def estimate(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> Estimate:
    tp, f = mesh.tp, mesh.fsdp
    mb = DTYPE_BYTES[recipe.model.dtype]
    pb = DTYPE_BYTES[recipe.train.mixed_precision.param_dtype]
    rb = DTYPE_BYTES[recipe.train.mixed_precision.reduce_dtype]
    local, block = _tp_local(model, pl, tp)
    lora = recipe.lora.rank > 0
    trainable_local = _lora_trainable(recipe, model, tp) if lora else local
    trainable_total = _lora_trainable(recipe, model, 1) if lora else model.num_params
    acts, logits = _activations(recipe, model, mesh)
    ga, frac = mesh.grad_accum, (f - 1) / f
    tokens = recipe.train.micro_batch_size * recipe.train.seq_len // mesh.cp
    return Estimate(
        params_total=model.num_params,
        trainable_total=trainable_total,
        params_per_rank=-(-local // f),
        params_bytes=-(-local // f) * mb,
        grads_bytes=-(-trainable_local // f) * mb,
        optimizer_bytes=-(-trainable_local // f) * 2 * mb,
        gathered_bytes=(2 * block * pb + block * rb) if f > 1 else 0,
        block_gather_bytes=2 * block * pb + block * rb,
        activations_bytes=acts,
        logits_bytes=logits,
        budget_bytes=int(recipe.cluster.gpu_memory_gb * 1e9 * USABLE),
        flops_per_token=6 * trainable_total + 12 * model.num_layers * model.hidden_size * recipe.train.seq_len
        # LoRA: frozen layers skip the weight-gradient matmul (4N); adapted ones do it on W + sBA (+2N_t)
        if not lora else 4 * model.num_params + 2 * sum(m.numel for m in model.modules if m.kind == "linear"
                                                      and m.fqn.rpartition(".")[2] in recipe.lora.targets)
        + 12 * model.num_layers * model.hidden_size * recipe.train.seq_len,
        # all-gather in forward and again in backward per micro-step, one reduce-scatter per step
        fsdp_comm_bytes=int((2 * ga * local * pb + trainable_local * rb) * frac),
        # 2 all-reduces (or all-gather + reduce-scatter under SP) forward + 2 backward per layer
        tp_comm_bytes=int(4 * model.num_layers * ga * tokens * model.hidden_size * pb * 2 * (tp - 1) / tp),
    )


_FIXES = {
    "params": "shard further (raise dp_shard with more nodes or tp) or train LoRA (lora.rank) on bfloat16 weights",
    "grads": "shard further (more ranks in dp_shard) or use LoRA (lora.rank)",
    "optimizer": "shard further (more ranks in dp_shard) or use LoRA (lora.rank) so only adapters have AdamW state",
    "gathered": "raise tp so each block is smaller per rank",
    "activations": "set train.activation_checkpointing: full, lower train.micro_batch_size, or raise cp/tp",
    "logits": "set tp.loss_parallel: true (logits stay vocab-sharded) or lower train.micro_batch_size",
}


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def _shard_fix(est: Estimate, recipe: Recipe, mesh: MeshSpec) -> str | None:
    """How many nodes make the sharded state fit. params + grads + AdamW shrink as 1/(dp_shard*cp);
    the other terms do not, so FSDP must cover state * fsdp / (budget - other) ranks."""
    state = est.params_bytes + est.grads_bytes + est.optimizer_bytes
    # with more FSDP ranks the all-gathered blocks appear (they are 0 while nothing is sharded)
    other = est.total_bytes - state - est.gathered_bytes + est.block_gather_bytes
    room = est.budget_bytes - other
    if room <= 0:     # sharding alone cannot help: say what else is too big
        rest = {k: v for k, v in est.terms.items() if k not in ("params", "grads", "optimizer")}
        rest["gathered"] = est.block_gather_bytes
        name, big = max(rest.items(), key=lambda kv: kv[1])
        return (f"sharding over more ranks is not enough: the unsharded terms alone are "
                f"{_gb(sum(rest.values()))} per rank, largest {name} {_gb(big)}; {_FIXES[name]}; then add nodes")
    fsdp = math.ceil(state * mesh.fsdp / room)
    dp_shard = math.ceil(fsdp / mesh.cp)
    nodes = math.ceil(mesh.dp_replicate * dp_shard * mesh.cp * mesh.tp / recipe.cluster.gpus_per_node)
    if nodes <= recipe.cluster.nodes:
        return None
    return (f"params + grads + AdamW state are {_gb(state)} per rank sharded over dp_shard x cp = {mesh.fsdp}; "
            f"they need >= {fsdp} ranks: cluster.nodes: {nodes} (or more) with mesh.dp_shard: -1 (then "
            f"re-check global_batch_size), or train LoRA (lora.rank) so only adapters have AdamW state")


def check_memory(est: Estimate, recipe: Recipe, mesh: MeshSpec) -> Result[Estimate]:
    if est.total_bytes <= est.budget_bytes:
        return est
    name, big = max(est.terms.items(), key=lambda kv: kv[1])
    fix = (_shard_fix(est, recipe, mesh) if name in ("params", "grads", "optimizer") else None) or _FIXES[name]
    return Err((RecipeError("cluster.gpu_memory_gb",
                            f"estimated {_gb(est.total_bytes)} per rank exceeds {_gb(est.budget_bytes)} "
                            f"({USABLE:.0%} of the GPU); largest term: {name} {_gb(big)}", fix),))
