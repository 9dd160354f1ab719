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

from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.compiler.mesh import MeshSpec
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.placements import DTYPE_BYTES, Placements
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import flops as F
from meshbake.runtime.roles import local_shape, lora_shapes
from meshbake.runtime.units import fmt_bytes

USABLE = 0.9


@dataclass(frozen=True)
class Estimate:
    params_total: int              # unique parameters of the model
    trainable_total: int
    params_per_rank: int           # after TP and FSDP sharding (rank 0: FSDP pads every shard to its rows)
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    gathered_bytes: int
    activations_bytes: int
    logits_bytes: int
    budget_bytes: int
    block_gather_bytes: int        # what `gathered` is as soon as FSDP shards (dp_shard x cp > 1)
    flops_per_token: int           # runtime/flops.py: 6N (non-embedding; LoRA: 4N frozen) + 12 L H Dh T
    fsdp_comm_bytes: int           # per rank per optimizer step
    tp_comm_bytes: int
    accum_grads_bytes: int = 0     # unsharded grads held between micro-steps (FSDP, grad_accum > 1)
    phases: tuple[tuple[str, int], ...] = ()   # live bytes at the candidate peaks; total = the largest

    @property
    def terms(self) -> dict[str, int]:
        return {"params": self.params_bytes, "grads": self.grads_bytes, "optimizer": self.optimizer_bytes,
                "accum_grads": self.accum_grads_bytes, "gathered": self.gathered_bytes,
                "activations": self.activations_bytes, "logits": self.logits_bytes}

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda kv: kv[1])[0] if self.phases else "sum"

    @property
    def total_bytes(self) -> int:
        """The peak: the largest of the phases (not every term is alive at once: activations
        and logits are gone before the step's gradients and the optimizer's temporaries exist)."""
        return max(b for _, b in self.phases) if self.phases else sum(self.terms.values())


@dataclass(frozen=True)
class RankParam:
    """One parameter as a rank holds it after TP (before FSDP): dim-0 rows x the rest."""
    rows: int
    rest: int
    where: str                     # "root" (embedding, final norm, lm_head) | "block" | "last" (last block)
    trainable: bool
    embedding: bool = False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def rank_params(recipe: Recipe, model: ModelSpec, pl: Placements, tp: int) -> list[RankParam]:
    """Every parameter's TP-local shape. Biases follow their Linear: a colwise Linear's bias is
    split with its output rows (Qwen2 q/k/v), a rowwise one's is whole. LoRA adds A (r x in)
    and B (out x r) beside each target, split by the table runtime/lora.py uses too
    (runtime/roles.py: one of the two stays whole); the base is then frozen."""
    lora, roles = recipe.lora.rank, model.roles
    adapted = set(pl.lora_targets) if lora else set()
    out: list[RankParam] = []
    covered = 0
    for m in model.modules:
        if roles.tied and m.fqn == roles.lm_head:
            continue                                  # the tied lm_head is the embedding's weight
        style, where = pl.styles[m.fqn], roles.where(m.fqn)
        loc = local_shape(m.shape, m.kind, style, tp)
        out.append(RankParam(loc[0], _numel(loc[1:]), where, not lora, m.fqn == roles.embedding))
        bias = m.numel - _numel(m.shape)
        if bias and style == "experts":               # down_proj (E, H, I) beside gate_up (E, 2I, H)
            e, h = m.shape[0], m.shape[2]
            down = local_shape((e, h, bias // e // h), "experts.down_proj", style, tp)
            out.append(RankParam(down[0], down[1] * down[2], where, not lora))
        elif bias:                                    # a Linear's bias (out,)
            out.append(RankParam(local_shape((bias,), "linear.bias", style, tp)[0], 1, where, not lora))
        covered += m.numel
        if m.fqn in adapted:
            for a in lora_shapes(m.shape, style, lora, tp):     # lora_A (r x in), lora_B (out x r)
                out.append(RankParam(a[0], a[1], where, True))
    rest = model.num_params - covered               # num_params counts a tied weight once, as covered does
    if rest > 0:                                      # parameters of no Linear/Embedding/norm: whole
        out.append(RankParam(rest, 1, "root", not lora))
    return out


def _activations(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> tuple[int, int, int]:
    """(all layers' saved activations at the loss backward, one layer's when recomputed, logits),
    bytes per rank. Per layer and token (HF Llama/Qwen2 modules, measured on CPU):
      norms (2)   fp32 input copy + normalized + weighted output: (4 + 2 pb) h each; with SP the
                  first two are sequence-sharded and the output saved is the all-gathered one
      attention   q, k after RoPE, v, SDPA output: (2 H Dh + 2 Hkv Dh) pb / tp (flash: no T^2)
      MLP         gate, silu(gate), up, product: 4 I pb / tp
    selective AC keeps the matmul and SDPA outputs of q/k/v, attention and gate/up, plus the
    block input; full AC keeps the block input only, then recomputes one block in backward.
    Logits at the start of the loss backward: without loss parallel the log-softmax output,
    its incoming gradient and the gradient being written, fp32: 12 B per token x vocab; with
    loss parallel 16 B per token x vocab / tp (the sharded logits are kept too)."""
    t, tp = recipe.train, mesh.tp
    sp = mesh.sequence_parallel
    tokens = t.micro_batch_size * t.seq_len // mesh.cp
    pb = DTYPE_BYTES[t.mixed_precision.param_dtype]
    h, inter = model.hidden_size, model.intermediate_size
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    norm = ((4 + pb) * h // tp + pb * h) if sp else (4 + 2 * pb) * h
    sharded = (2 * q + 2 * kv + 4 * inter) * pb // tp
    # small per-token tensors: RMSNorm's rsqrt (4 B per norm), SDPA's logsumexp (4 B per local
    # head), once per forward RoPE cos + sin (2 Dh pb) and input ids, labels, positions (int64)
    small = 2 * 4 // (tp if sp else 1) + 4 * model.num_heads // tp
    layer = tokens * (2 * norm + sharded + small)
    block_in = tokens * h * pb // (tp if sp else 1)
    # final norm (its output is lm_head's saved input) and the per-forward tensors
    final = tokens * (norm + 2 * model.head_dim * pb + 3 * 8)
    ac = t.activation_checkpointing
    if ac == "full":
        acts = model.num_layers * block_in + final
    elif ac == "selective":
        acts = model.num_layers * (block_in + tokens * (2 * q + 2 * kv + 2 * inter) * pb // tp) + final
    else:
        acts = model.num_layers * layer + final
    lp = mesh.loss_parallel
    logits = tokens * model.vocab_size * (16 // tp if lp else 12)
    return acts, (layer if ac != "none" else 0), logits


def _memory(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, params: list[RankParam]) -> dict[str, int]:
    """Bytes of rank 0, the peak rank: FSDP2 splits dim 0 into dp_shard x cp chunks of
    ceil(rows / f) rows, allocates every shard padded to that size, and rank 0's chunk is
    always a full one (the last ranks' may be short or empty), so its AdamW state is largest."""
    t = recipe.train
    mb, pb = DTYPE_BYTES[recipe.model.dtype], DTYPE_BYTES[t.mixed_precision.param_dtype]
    rb = DTYPE_BYTES[t.mixed_precision.reduce_dtype]
    f = mesh.fsdp
    fsdp = mesh.fsdp_enabled

    def shard(p: RankParam) -> int:
        return -(-p.rows // f) * p.rest if fsdp else p.rows * p.rest

    def gathered(p: RankParam) -> int:                # FSDP2's unsharded copy: padded rows x f
        return -(-p.rows // f) * f * p.rest if fsdp else 0

    train = [p for p in params if p.trainable]
    n_shard, n_train = sum(map(shard, params)), sum(map(shard, train))
    acts, recompute, logits = _activations(recipe, model, mesh)
    # between micro-steps FSDP2 skips the reduce-scatter and keeps each parameter's unsharded
    # gradient (reduce dtype); without FSDP gradients just add up in .grad (the grads term)
    no_sync = fsdp and mesh.grad_accum > 1 and t.grad_sync == "last_micro_step"
    accum = sum(p.rows * p.rest for p in train) * rb if no_sync else 0
    grads = n_train * mb
    # alive from the forward through the loss backward: the root module (never resharded after
    # forward), the last block (reshard_after_forward=False) and, once more, the last block's
    # flat all-gather output, which FSDP2 keeps (comm_ctx.all_gather_state) until the next
    # forward all-gather frees it
    block = sum(gathered(p) for p in params if p.where == "last") * pb
    kept = sum(gathered(p) for p in params if p.where == "root") * pb + 2 * block
    root_train = [p for p in train if p.where == "root"]
    # the embedding's backward under TP: a full vocab x hidden gradient on every tp rank
    # (DTensor's embedding backward is Replicate), next to the root's unsharded grads
    emb_full = model.vocab_size * model.hidden_size * pb if mesh.tp > 1 and any(p.embedding for p in root_train) else 0
    root_grads = sum(p.rows * p.rest for p in root_train) * pb if fsdp else 0
    state = n_shard * mb + 2 * grads
    # AdamW (foreach) allocates sqrt(exp_avg_sq) for a whole param group: ~ the grads once more
    phases = (("loss backward", state - grads + accum + (0 if fsdp else grads * (mesh.grad_accum > 1))
               + kept + acts + logits),
              ("recompute", state - grads + accum + kept + 2 * block + acts + recompute) if recompute else None,
              # the last micro-step's backward has reduce-scattered (and freed) the blocks'
              # held grads by now; the root's are reduced last
              ("embedding backward", state + kept + root_grads + emb_full
               + (sum(p.rows * p.rest for p in root_train) * rb if no_sync else 0)),
              ("optimizer step", state + 2 * grads))
    return {"params": n_shard * mb, "grads": grads, "optimizer": 2 * grads, "accum": accum, "gathered": kept,
            "block": block, "acts": acts, "logits": logits, "params_per_rank": n_shard,
            "phases": tuple(ph for ph in phases if ph)}


def matmul_params(model: ModelSpec) -> int:
    """N of runtime/flops.py: every parameter but the input embedding table (a lookup); a
    tied table is lm_head's weight too, a matmul, and stays. MoE: the active ones (a
    ModelSpec.active_params fact, when the model stage provides one)."""
    n = getattr(model, "active_params", None) or model.num_params
    emb = next(m.numel for m in model.modules if m.fqn == model.roles.embedding)
    return n - (0 if model.roles.tied else emb)


def flops_per_token(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> int:
    t, lo = recipe.train, recipe.lora
    targets = set(pl.lora_targets) if lo.rank > 0 else set()
    adapted = [m for m in model.modules if m.fqn in targets]
    n = matmul_params(model)
    return F.flops_per_token(
        matmul_params=n, layers=model.num_layers, heads=model.num_heads, head_dim=model.head_dim,
        seq_len=t.seq_len, frozen_params=n - sum(m.shape[0] * m.shape[1] for m in adapted) if adapted else 0,
        adapters=[(m.shape[0], lo.rank, m.shape[1]) for m in adapted],
        tokens_per_micro_step=t.micro_batch_size * t.seq_len // mesh.cp)


_RANK_PARAMS: dict = {}


def _rank_params(recipe: Recipe, model: ModelSpec, pl: Placements, tp: int) -> list[RankParam]:
    """rank_params memoized: `meshbake suggest` estimates thousands of candidates that share a
    few (model, lora, styles, tp); one call walks every module (~4 ms for an 80-layer model).
    The cached entry holds the model and placements, so their ids are not reused while it lives."""
    key = (id(model), recipe.lora, id(pl), tp)
    hit = _RANK_PARAMS.get(key)
    if hit is None or hit[0] is not model or hit[1] is not pl:
        if len(_RANK_PARAMS) > 256:
            _RANK_PARAMS.clear()
        hit = _RANK_PARAMS[key] = (model, pl, rank_params(recipe, model, pl, tp))
    return hit[2]


def estimate(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> Estimate:
    tp, f = mesh.tp, mesh.fsdp
    pb = DTYPE_BYTES[recipe.train.mixed_precision.param_dtype]
    rb = DTYPE_BYTES[recipe.train.mixed_precision.reduce_dtype]
    params = _rank_params(recipe, model, pl, tp)
    mem = _memory(recipe, model, mesh, params)
    local = sum(p.rows * p.rest for p in params)
    trainable_local = sum(p.rows * p.rest for p in params if p.trainable)
    trainable_total = sum(p.rows * p.rest for p in _rank_params(recipe, model, pl, 1) if p.trainable)
    ga, frac = mesh.grad_accum, (f - 1) / f
    tokens = recipe.train.micro_batch_size * recipe.train.seq_len // mesh.cp
    # what FSDP keeps gathered once it shards (for the OOM hint of a plan that does not shard yet)
    kept = sum(p.rows * p.rest for p in params if p.where in ("root", "last")) * pb
    return Estimate(
        params_total=model.num_params,
        trainable_total=trainable_total,
        params_per_rank=mem["params_per_rank"],
        params_bytes=mem["params"],
        grads_bytes=mem["grads"],
        optimizer_bytes=mem["optimizer"],
        gathered_bytes=mem["gathered"],
        block_gather_bytes=mem["gathered"] or kept,
        activations_bytes=mem["acts"],
        logits_bytes=mem["logits"],
        budget_bytes=int(recipe.cluster.gpu_memory_gb * 1e9 * USABLE),
        flops_per_token=flops_per_token(recipe, model, mesh, pl),
        # all-gather in forward and again in backward per micro-step; reduce-scatter per micro-step
        # (grad_sync every_micro_step) or once per step
        fsdp_comm_bytes=int((2 * ga * local * pb + trainable_local * rb * (
            1 if recipe.train.grad_sync == "last_micro_step" else ga)) * frac),
        # 2 all-reduces (or all-gather + reduce-scatter under SP) forward + 2 backward per layer
        tp_comm_bytes=int(4 * model.num_layers * ga * tokens * model.hidden_size * pb * 2 * (tp - 1) / tp),
        accum_grads_bytes=mem["accum"],
        phases=mem["phases"],
    )


_FIXES = {
    "params": "shard further (raise dp_shard with more nodes or tp) or train LoRA (lora.rank) on bfloat16 weights",
    "grads": "shard further (more ranks in dp_shard) or use LoRA (lora.rank)",
    "optimizer": "shard further (more ranks in dp_shard) or use LoRA (lora.rank) so only adapters have AdamW state",
    "gathered": "raise tp so each block is smaller per rank",
    "accum_grads": "raise micro_batch_size and lower grad_accum (unsharded gradients are held between micro-steps)",
    "activations": "set train.activation_checkpointing: full, lower train.micro_batch_size, or raise cp/tp",
    "logits": "set tp.loss_parallel: true (logits stay vocab-sharded) or lower train.micro_batch_size",
}


def _shard_fix(est: Estimate, recipe: Recipe, mesh: MeshSpec) -> str | None:
    """How many nodes make the sharded state fit. params + grads + AdamW shrink as 1/(dp_shard*cp);
    the other terms do not, so FSDP must cover state * fsdp / (budget - other) ranks."""
    state = est.params_bytes + est.grads_bytes + est.optimizer_bytes
    fsdp = 1
    for phase, live in est.phases:
        # per phase: the sharded state alive then (grads exist from the backward on, and AdamW's
        # temporaries are grads-sized), and the rest, which more FSDP ranks do not shrink; once
        # FSDP shards, its gathered root + last block appear (0 while nothing is sharded)
        st = est.params_bytes + est.optimizer_bytes + {"optimizer step": 2, "embedding backward": 1}.get(
            phase, 0) * est.grads_bytes
        other = live - st + (0 if phase == "optimizer step" else est.block_gather_bytes - est.gathered_bytes)
        room = est.budget_bytes - other
        if room <= 0:     # sharding alone cannot help: say what else is too big
            rest = {k: v for k, v in est.terms.items() if k not in ("params", "grads", "optimizer")}
            rest["gathered"] = est.block_gather_bytes
            name, big = max(rest.items(), key=lambda kv: kv[1])
            return (f"sharding over more ranks is not enough: at the {phase} the unsharded terms alone are "
                    f"{fmt_bytes(other)} per rank, largest {name} {fmt_bytes(big)}; {_FIXES[name]}; then add nodes")
        fsdp = max(fsdp, math.ceil(st * mesh.fsdp / room))
    dp_shard = math.ceil(fsdp / mesh.cp)
    nodes = math.ceil(mesh.dp_replicate * dp_shard * mesh.cp * mesh.tp / recipe.cluster.gpus_per_node)
    if nodes <= recipe.cluster.nodes:
        return None
    return (f"params + grads + AdamW state are {fmt_bytes(state)} per rank sharded over dp_shard x cp = {mesh.fsdp}; "
            f"they need >= {fsdp} ranks: cluster.nodes: {nodes} (or more) with mesh.dp_shard: -1 (then "
            f"re-check global_batch_size), or train LoRA (lora.rank) so only adapters have AdamW state")


def check_memory(est: Estimate, recipe: Recipe, mesh: MeshSpec) -> Result[Estimate]:
    if est.total_bytes <= est.budget_bytes:
        return est
    name, big = max(est.terms.items(), key=lambda kv: kv[1])
    fix = (_shard_fix(est, recipe, mesh) if name in ("params", "grads", "optimizer") else None) or _FIXES[name]
    return Err((RecipeError("cluster.gpu_memory_gb",
                            f"estimated {fmt_bytes(est.total_bytes)} per rank exceeds {fmt_bytes(est.budget_bytes)} "
                            f"({USABLE:.0%} of the GPU); largest term: {name} {fmt_bytes(big)}", fix),))


def view(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, est: Estimate) -> dict[str, object]:
    """What PLAN.md prints of this stage, as plain values: each memory term with how it is
    counted, the live bytes per phase, the peak against the budget, traffic and FLOPs."""
    t = recipe.train
    pd = t.mixed_precision.param_dtype
    shard = (f"FSDP shards padded to ceil(rows / {mesh.fsdp}) rows (rank 0, the peak rank)" if mesh.fsdp_enabled
             else "no FSDP (one-rank data-parallel mesh)")
    how = {"params": f"{est.params_per_rank:,} params x {recipe.model.dtype}, after TP; {shard}",
           "grads": "trainable params, sharded like params (from the backward on)",
           "optimizer": "AdamW exp_avg + exp_avg_sq, sharded",
           "accum_grads": f"unsharded grads held between the {mesh.grad_accum} micro-steps (no reduce-scatter until "
                          "the last)" if est.accum_grads_bytes else "none: no FSDP gradient accumulation without sync",
           "gathered": f"top-level module (embeddings, final norm, lm_head) + last block kept gathered in {pd}"
                       if mesh.fsdp_enabled else "none: no FSDP",
           "activations": f"{model.num_layers} layers, mbs {t.micro_batch_size} x seq {t.seq_len}"
                          f"{' / cp ' + str(mesh.cp) if mesh.cp_enabled else ''}, AC {t.activation_checkpointing}",
           "logits": ("tokens x vocab / tp x 16 B (loss parallel)" if mesh.loss_parallel
                      else "tokens x vocab x 12 B (fp32 log-softmax, its grad in and out)")}
    flops_how = ("6N + 12 x layers x heads x head_dim x seq_len; N = matmul parameters, input embedding excluded"
                 + ("; LoRA: 4 per frozen weight, 6 per adapted one, + the adapters' B x A" if recipe.lora.rank else ""))
    return {"memory_rows": [{"name": k, "bytes": v, "how": how[k]} for k, v in est.terms.items()],
            "phase_rows": [{"name": name, "bytes": b, "peak": name == est.peak_phase} for name, b in est.phases],
            "total_bytes": est.total_bytes, "peak_phase": est.peak_phase, "budget_bytes": est.budget_bytes,
            "usable": f"{USABLE:.0%}", "trainable_total": est.trainable_total,
            "fsdp_comm_bytes": est.fsdp_comm_bytes, "tp_comm_bytes": est.tp_comm_bytes,
            "flops_per_token": est.flops_per_token, "flops_how": flops_how}
