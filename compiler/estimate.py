"""estimate stage: per-rank memory, FLOPs and communication of one optimizer step.

Memory model (bytes per rank), from the resolved placements and sharding:
  params     trainable+frozen weights after TP (colwise/rowwise /tp) then FSDP (/ dp_shard*cp),
             in model.dtype (the master copy FSDP2 keeps sharded)
  grads      trainable params, sharded like params, in model.dtype
  optimizer  AdamW exp_avg + exp_avg_sq: 2 x trainable params, sharded, in model.dtype
             -> full fine-tuning in fp32 is 4 + 4 + 8 = 16 bytes per parameter / (tp * dp_shard * cp)
  gathered   FSDP all-gathers one block in param_dtype and prefetches the next: 2 blocks,
             + one block of unsharded gradients in reduce_dtype during backward
  activations per decoder layer and token (param_dtype bytes; the attention's T^2 tensors are attn_mask):
             TP-sharded tensors  q, k, v, attn-out (2h + 2 kv_dim) + gate, up, act, gate*up (4I)   /tp
             replicated tensors  2 norm inputs + qkv input + mlp input (4h)  /tp only with SP
             tokens per rank = micro_batch_size * seq_len / cp; full AC keeps only the block input
             q/k norms (Qwen3, OLMo-2, Gemma-3): (4 + 2 pb) (q + kv) / tp more
             MoE models: each layer's MLP as it runs (_moe_mlp_activations): k token copies x (2h + 4I
             / tp) + router, shared experts, dense layers at their own intermediate
  logits     tokens x vocab x 8 bytes (bf16 logits, fp32 upcast, fp32 grad ~ 2+4+2), /tp under loss parallel
  experts    under mesh.ep: E / ep whole experts per rank (not split over tp), FSDP over efsdp = dp_shard x cp x
             tp / ep (gathered: E / ep per block)
  attn_mask  the attention's T^2 tensors (attention_memory): none for sdpa on causal rows (is_causal,
             flash kernel); packed documents (any data.format but synthetic), context parallel and
             eager attention pass an explicit mask, which SDPA converts to the query dtype and
             saves for backward in every layer
The usable budget is 90% of cluster.gpu_memory_gb (CUDA context, NCCL buffers, fragmentation).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

from meshbake.compiler import memo, perf
from meshbake.compiler.errors import Err, RecipeError, Result, reads
from meshbake.compiler.memo import cached, evolve
from meshbake.compiler.mesh import MeshSpec
from meshbake.compiler.model import ModelSpec, ModuleInfo, expert_matrices
from meshbake.compiler.moe import router_aux_coef
from meshbake.compiler.placements import DTYPE_BYTES, Placements
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import flops as F
from meshbake.runtime.dims import PP_DIMS, tokens_per_rank
from meshbake.runtime.quant import nf4_bytes, nf4_scaler_block, nf4_working_bytes
from meshbake.runtime.roles import ModelRoles, expert_lora_dims, is_expert_target, local_shape, lora_shapes
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
    flops_per_token: int           # runtime/flops.py: 6N (non-embedding; LoRA: 4N frozen + 6 per adapter param) + 12 L H Dh T
    fsdp_comm_bytes: int           # per rank per optimizer step on the wire (ring): dp_shard (x cp) + dp_replicate
    tp_comm_bytes: int             # ... on tp (the rows are in `traffic`)
    accum_grads_bytes: int = 0     # unsharded grads held between micro-steps (FSDP, grad_accum > 1)
    traffic: tuple[Collective, ...] = ()   # every collective of one optimizer step, per rank
    time: StepTime | None = None           # the step-time model (cluster.device cuda)
    phases: tuple[tuple[str, int], ...] = ()   # live bytes at the candidate peaks; total = the largest
    ep_comm_bytes: int = 0         # mesh.ep all-to-all (token dispatch + combine), per rank per step
    attn_mask_bytes: int = 0       # the attention's T^2 tensors at their peak phase (attention_memory)
    pp_comm_bytes: int = 0         # mesh.pp: the pipeline's sends + receives of the peak rank per step
    pp_peak_rank: int = 0          # mesh.pp: the pp rank whose memory the terms above are (the largest)
    pp_rank_rows: tuple[tuple[int, int, int], ...] = ()   # mesh.pp: (pp rank, params per rank, peak bytes) each
    pp_buffers_bytes: int = 0      # mesh.pp: the peak rank's pipeline receive buffers (alive all run)

    @property
    def terms(self) -> dict[str, int]:
        return {"params": self.params_bytes, "grads": self.grads_bytes, "optimizer": self.optimizer_bytes,
                "accum_grads": self.accum_grads_bytes, "gathered": self.gathered_bytes,
                "activations": self.activations_bytes, "logits": self.logits_bytes,
                "attn_mask": self.attn_mask_bytes, **({"pp_buffers": self.pp_buffers_bytes} if self.pp_rank_rows else {})}

    @property
    def traffic_by_axis(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """(axis, ranks, collectives, bytes, wire bytes) per mesh axis, per rank and optimizer step."""
        out: dict[str, list[int]] = {}
        for c in self.traffic:
            a = out.setdefault(c.axis, [c.ranks, 0, 0, 0])
            a[1] += c.count
            a[2] += c.bytes
            a[3] += c.wire_bytes
        return tuple((k, *v) for k, v in out.items())

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
    ep: int = 1                    # mesh.ep: experts split by index (rows = E / ep), FSDP over fsdp x tp / ep
    tp: int = 1                    # ... and whole on each tp rank (ep carved from dp_shard x cp x tp: etp 1)
    nf4: int = 0                   # QLoRA: a frozen target weight stored NF4, with this scaler block (runtime/quant.py)
    routed: int = 0                # a grouped experts weight (rows = the rank's experts): copies per token (top-k);
    #                                -1: an experts bias (E, n), no matmul


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def rank_params(recipe: Recipe, model: ModelSpec, pl: Placements, tp: int, ep: int = 1) -> list[RankParam]:
    """Every parameter's TP-local shape. Biases follow their Linear: a colwise Linear's bias is
    split with its output rows (Qwen2 q/k/v), a rowwise one's is whole. LoRA adds A (r x in)
    and B (out x r) beside each target, split by the table runtime/lora.py uses too
    (runtime/roles.py: one of the two stays whole); the base is then frozen."""
    lora, roles = recipe.lora.rank, model.roles
    adapted = set(pl.lora_targets) if lora else set()
    # QLoRA: the targets' weights are NF4 (tp is 1 there; the scaler block depends on the FSDP size,
    # recomputed in _sums_of: this records only that the weight is quantized)
    nf4 = 1 if lora and recipe.lora.quantize_base == "nf4" else 0
    out: list[RankParam] = []
    covered = 0
    for m in model.modules:
        if roles.tied and m.fqn == roles.lm_head:
            continue                                  # the tied lm_head is the embedding's weight
        style, where = pl.styles[m.fqn], roles.where(m.fqn)
        loc = local_shape(m.shape, m.kind, style, tp)
        bias = m.numel - _numel(m.shape)
        if ep > 1 and m.kind == "experts":            # gate_up and down: E / ep experts each, whole over tp
            e = m.shape[0]
            k = model.experts_per_token or 1
            out += [RankParam(e // ep, _numel(m.shape[1:]), where, not lora, ep=ep, tp=tp, routed=k),
                    RankParam(e // ep, bias // e, where, not lora, ep=ep, tp=tp, routed=k)]
            out += [RankParam(e // ep, _numel(a[1:]), where, True, ep=ep, tp=tp)
                    for a in _expert_adapters(m, adapted, lora, 1)]
            covered += m.numel
            continue
        k = (model.experts_per_token or 1) if m.kind == "experts" else 0
        out.append(RankParam(loc[0], _numel(loc[1:]), where, not lora, m.fqn == roles.embedding,
                             nf4=nf4 if m.fqn in adapted else 0, routed=k))
        if bias and style == "experts":               # down_proj (E, H, I) beside gate_up (E, 2I, H)
            e, two_i, h = m.shape
            down = local_shape((e, h, two_i // 2), "experts.down_proj", style, tp)
            out.append(RankParam(down[0], down[1] * down[2], where, not lora, routed=k))
            if bias > e * h * two_i // 2:             # GPT-OSS: gate_up bias (E, 2I) split like gate_up,
                out += [RankParam(e, two_i // tp, where, not lora, routed=-1),          # down bias (E, H) whole
                        RankParam(e, h, where, not lora, routed=-1)]
        elif bias:                                    # a Linear's bias (out,)
            out.append(RankParam(local_shape((bias,), "linear.bias", style, tp)[0], 1, where, not lora))
        covered += m.numel
        if m.fqn in adapted:
            for a in lora_shapes(m.shape, style, lora, tp):     # lora_A (r x in), lora_B (out x r)
                out.append(RankParam(a[0], a[1], where, True))
        if m.kind == "experts":
            out += [RankParam(a[0], _numel(a[1:]), where, True) for a in _expert_adapters(m, adapted, lora, tp)]
    rest = model.num_params - covered               # num_params counts a tied weight once, as covered does
    if rest > 0:                                      # parameters of no Linear/Embedding/norm: whole
        out.append(RankParam(rest, 1, "root", not lora))
    return out


def _expert_adapters(m: ModuleInfo, adapted: set[str], rank: int, tp: int) -> list[tuple[int, ...]]:
    """Local shapes of the LoRA factors beside a grouped experts module's targeted parameters
    (runtime/lora.py): A (E, r, in), B (E, out, r); under tp (experts style) B splits gate_up's
    2I rows, A down's I columns (runtime/roles.py expert_lora_dims); under ep the caller
    divides E."""
    out = []
    for name, (e, o, i) in expert_matrices(m).items():
        if f"{m.fqn}.{name}" in adapted:
            a_dim, b_dim = expert_lora_dims(None if tp == 1 else 1 if name == "gate_up_proj" else 2)
            out += [_split_dim((e, rank, i), a_dim, tp), _split_dim((e, o, rank), b_dim, tp)]
    return out


def _split_dim(shape: tuple[int, ...], dim: int | None, tp: int) -> tuple[int, ...]:
    return tuple(n // tp if d == dim else n for d, n in enumerate(shape))


def _activations(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, final_part: bool = True,
                 layers: int | None = None) -> tuple[int, int, int]:
    """(all layers' saved activations at the loss backward, one layer's when recomputed, logits),
    bytes per rank. Per layer and token (HF Llama/Qwen2 modules, measured on CPU):
      norms (2)   fp32 input copy + normalized + weighted output: (4 + 2 pb) h each; with SP the
                  first two are sequence-sharded and the output saved is the all-gathered one
      attention   q, k after RoPE, v, SDPA output: (2 H Dh + 2 Hkv Dh) pb / tp (flash: no T^2)
      MLP         gate, silu(gate), up, product: 4 I pb / tp
      MoE block   instead of the MLP: k routed copies per token (_moe_mlp_activations)
    selective AC keeps the matmul and SDPA outputs of q/k/v, attention and gate/up, plus the
    block input; full AC keeps the block input only, then recomputes one block in backward.
    Logits at the start of the loss backward: without loss parallel the log-softmax output,
    its incoming gradient and the gradient being written, fp32: 12 B per token x vocab; with
    loss parallel 16 B per token x vocab / tp (the sharded logits are kept too). layers: the
    blocks counted (pp: those of one in-flight micro-batch), else model.num_layers; passed rather
    than a copy of the model so the MoE term's cache (keyed by the model) hits per pp rank."""
    t, tp = recipe.train, mesh.tp
    n_layers = model.num_layers if layers is None else layers
    sp = mesh.sequence_parallel
    tokens = tokens_per_rank(t, mesh)
    pb = DTYPE_BYTES[t.mixed_precision.param_dtype]
    h, inter = model.hidden_size, model.intermediate_size
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    norm = ((4 + pb) * h // tp + pb * h) if sp else (4 + 2 * pb) * h
    sharded = (2 * q + 2 * kv + 4 * inter) * pb // tp
    kept = (2 * q + 2 * kv + 2 * inter) * pb // tp                  # selective AC's matmul outputs
    # per model, tp, ep and pb only: cached (a walk over every module, ~0.3 ms for Qwen3-30B-A3B,
    # per suggest candidate otherwise)
    moe = cached(_MOE_ACTS, (id(model), mesh.tp, mesh.ep, pb), (model,),
                 lambda: _moe_mlp_activations(model, mesh, pb)) if model.num_experts else None
    if moe is not None:     # MoE models: the MLP per layer as it runs (the mean over the layers)
        attn = (2 * q + 2 * kv) * pb // tp
        sharded, kept = attn + moe[0], attn + moe[1]
    # small per-token tensors: RMSNorm's rsqrt (4 B per norm), SDPA's logsumexp (4 B per local
    # head), once per forward RoPE cos + sin (2 Dh pb) and input ids, labels, positions (int64)
    small = 2 * 4 // (tp if sp else 1) + 4 * model.num_heads // tp
    # q/k norms (Qwen3, Qwen3-MoE, Gemma-3 per head; OLMo-2 over the projection): each saves, like
    # the block's norms, an fp32 input copy, the normalized and the weighted output, (4 + 2 pb) per
    # element of q (H Dh) / k (Hkv Dh), split over tp with the heads. 0 for Llama (no such module).
    qk = (4 + 2 * pb) * (q * _has_norm(model, "q_norm") + kv * _has_norm(model, "k_norm")) // tp
    layer = tokens * (2 * norm + sharded + small + qk)
    block_in = tokens * h * pb // (tp if sp else 1)
    # final norm (its output is lm_head's saved input) and the per-forward tensors
    final = tokens * (norm + 2 * model.head_dim * pb + 3 * 8) if final_part else 0   # pp: the last stage's
    ac = t.activation_checkpointing
    if ac == "full":
        acts = n_layers * block_in + final
    elif ac == "selective":
        acts = n_layers * (block_in + tokens * kept) + final
    else:
        acts = n_layers * layer + final
    lp = mesh.loss_parallel
    logits = tokens * model.vocab_size * (16 // tp if lp else 12)
    return acts, (layer if ac != "none" else 0), logits


_MOE_ACTS: dict = {}


_HAS_NORM: dict = {}


def _has_norm(model: ModelSpec, leaf: str) -> bool:
    """A q_norm / k_norm in the attention (Qwen3, OLMo-2): a walk over every module, memoized per
    model object (suggest asked it twice per candidate: 15M module visits for 70B on 64 GPUs)."""
    return cached(_HAS_NORM, (id(model), leaf), (model,),
                  lambda: any(m.kind == "norm" and m.fqn.endswith(f"self_attn.{leaf}") for m in model.modules))


def _moe_mlp_activations(model: ModelSpec, mesh: MeshSpec, pb: int) -> tuple[int, int] | None:
    """(saved, kept under selective AC) bytes per token of a MoE model's MLPs, the mean over its
    layers (so a pp stage's share scales with its layers), replacing the dense 4 I / tp of the
    Llama formula, which undercounted a MoE layer (measured +16-18% peak on the tiny Qwen3-MoE).
    The grouped-experts loop (runtime/fused.py experts_forward; runtime/ep.py _local_experts) runs
    per expert on the token copies routed to it, so per MoE layer and token, k = experts_per_token,
    I the experts' intermediate, H hidden:
      rows      c copies of the token: k without ep (every tp rank runs every copy on its I / tp
                slice), k / tp under ep (each tp rank dispatches 1/tp of the tokens; on average a
                rank receives as many copies as it sends); the slice Ie = I / tp without ep, I under ep
      per copy  the gathered input row (x[tok], the matmul's saved input: H), gate_up's output (2 Ie),
                act(gate) and act(gate) * up (2 Ie), the down output kept for the routing weight's
                product (H), and that product, which out.index_add_ saves (IndexAddBackward0 keeps
                its `source`, checked on torch 2.13: H): 3 H + 4 Ie in pb; + that weight (pb) and
                the int64 token / slot indices the gathers save (2 x 8). Without the product the
                MoE memory cases read -3.5% (Qwen2-MoE tp 2) to +1.4%; with it +1.4% to +3.2%
      router    its fp32 softmax over the E experts (4 E), the logits (pb E), the top-k ids (8 k)
                and weights (4 k)
      shared    a shared expert (Qwen2-MoE, DeepSeek-V3): its own MLP, 4 Is / tp; gated (Qwen2-MoE):
                + its output kept for the gate's product (H pb, a partial sum on every tp rank) and
                the gate's sigmoid (4)
    Dense layers among them (Qwen3-MoE mlp_only_layers, DeepSeek-V3 first_k_dense_replace) at their
    own intermediate, 4 Id / tp. Selective AC keeps the matmul outputs: 2 Ie + H per copy, 2 Is / tp,
    2 Id / tp. None when no layer is found by name (model.layers.N.mlp)."""
    import re

    tp, ep, k, h, e = mesh.tp, mesh.ep, model.experts_per_token, model.hidden_size, model.num_experts
    layers: dict[int, list[ModuleInfo]] = {}
    for m in model.modules:
        g = re.search(r"\.layers\.([0-9]+)\.mlp\.", m.fqn)
        if g:
            layers.setdefault(int(g.group(1)), []).append(m)
    if not layers:
        return None
    saved = kept = 0
    for mods in layers.values():
        ex = next((m for m in mods if m.kind == "experts"), None)
        shared = [m for m in mods if m.kind == "linear" and ".shared_expert" in m.fqn]
        dense = [m for m in mods if m.kind == "linear" and ".shared_expert" not in m.fqn]
        if ex is not None:
            i = expert_matrices(ex)["down_proj"][2]
            copies, ie = (k / tp, i) if ep > 1 else (k, i / tp)
            # GPT-OSS's clamped SwiGLU (experts_hf layout) saves gate_up, the clamped gate, its
            # sigmoid, the glu, up + 1 and the product: 7 Ie per copy where SwiGLU saves 4 (measured
            # with saved_tensors_hooks: tiny GPT-OSS 5.3 KB a token, Mixtral 3.8 KB)
            wide = 7 if model.layouts.get(ex.fqn) == "experts_hf" else 4
            saved += copies * ((3 * h + wide * ie) * pb + pb + 16) + e * (4 + pb) + k * 12
            kept += copies * (2 * ie + h) * pb
            gp = next((m for m in shared if m.fqn.endswith("gate_proj")), None)
            if gp is not None:
                saved += 4 * gp.shape[0] * pb / tp
                kept += 2 * gp.shape[0] * pb / tp
                if any(m.fqn.endswith("shared_expert_gate") for m in shared):
                    saved += h * pb + 4
        else:
            gp = next((m for m in dense if m.fqn.endswith(("gate_proj", "up_proj", "fc1"))), None)
            gu = next((m for m in dense if m.fqn.endswith("gate_up_proj")), None)
            i = gp.shape[0] if gp is not None else gu.shape[0] // 2 if gu is not None else model.intermediate_size
            saved += 4 * i * pb / tp
            kept += 2 * i * pb / tp
    n = len(layers)
    return int(saved / n), int(kept / n)


@dataclass(frozen=True)
class AttnMemory:
    """What the attention allocates beyond the per-token activations (attention_memory)."""
    kernel: str                    # what runs, for PLAN.md
    why: str                       # why that kernel and that mask
    held: int                      # bytes alive from the forward through the loss backward
    layer: int                     # + one layer's, alive while AC recomputes it
    always: int                    # of `held`, alive all step (runtime/cp.py keeps its mask between steps)

    @property
    def peak(self) -> int:
        return self.held + self.layer


def attention_memory(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> AttnMemory:
    """The attention's T^2 tensors, per rank (O(1): `suggest` calls it per candidate). B = micro-batch,
    Tq = seq_len / cp query rows of this rank, T = seq_len keys, pb = compute dtype bytes:
      sdpa, causal rows (synthetic data: no position_ids): transformers passes is_causal and no mask
        (flash attention on GPU, its CPU kernel here): nothing
      sdpa, packed rows (every other data.format: prepared windows carry position_ids restarting per
        document, and padding counts as one): transformers builds a bool (B, 1, T, T) document mask;
        SDPA converts it to the query dtype in every layer and saves that copy for backward (CPU
        flash kernel; on GPU flash takes no mask, so the memory-efficient kernel runs, saving it too):
        B T^2 pb per layer. With a mask transformers repeats K and V to every head (no enable_gqa):
        + 2 B T (H - Hkv) Dh pb / tp per layer
      CP (runtime/cp.py, any data): its own bool mask (Tq, T), or (B, 1, Tq, T) for packed rows, kept
        in its state all step; SDPA's query-dtype copy saved per layer as above; K/V stay grouped
      eager (classes without sdpa): scores softmaxed in fp32, cast to the compute dtype: B H/tp Tq T
        (4 + pb; fp32: 4) saved per layer, K/V repeated to every head
    Under activation checkpointing a layer's saved tensors are recomputed: what stays is the mask
    every checkpointed layer was called with (bool B T^2 for sdpa, pb for eager's float mask), and
    one layer's again while it is recomputed (selective AC keeps eager's score matmul outputs: B H/tp
    Tq T pb per layer). TP does not split the mask (it covers every head); CP splits its rows."""
    t, tp, cp = recipe.train, mesh.tp, mesh.cp
    b, seq, pb = t.micro_batch_size, t.seq_len, DTYPE_BYTES[t.mixed_precision.param_dtype]
    tq, L, ac = seq // cp, model.num_layers, t.activation_checkpointing
    packed = recipe.data.format != "synthetic"
    heads = model.num_heads // tp
    rep = 2 * b * tq * (model.num_heads - model.num_kv_heads) * model.head_dim * pb // tp   # repeat_kv, per layer
    gpu = recipe.cluster.device == "cuda"
    if cp > 1:
        bm = b if packed else 1
        state = bm * tq * seq
        per = state * pb
        why = (f"meshbake's CP attention (runtime/cp.py): SDPA with its own bool mask of the global positions "
               f"({bm} x {tq} x {seq}{', per document' if packed else ''}), kept in its state; SDPA converts it to "
               f"{t.mixed_precision.param_dtype} per layer" + ("" if not gpu else "; on GPU the memory-efficient kernel "
                                                              "(flash takes no mask)"))
        return AttnMemory("sdpa + explicit mask (context parallel)", why,
                          state + (L * per if ac == "none" else 0), per if ac != "none" else 0, state)
    if model.attn_implementation == "eager":
        mask = b * tq * seq * pb
        per = b * heads * tq * seq * (4 + (pb if pb != 4 else 0)) + rep
        keep = mask + (L * b * heads * tq * seq * pb if ac == "selective" else 0)
        why = ("eager: this class has no sdpa; it materializes the scores and a float mask "
               f"({b} x 1 x {tq} x {seq} x {pb} B)")
        return AttnMemory("eager (scores materialized)", why, keep if ac != "none" else L * per, per if ac != "none"
                          else 0, 0)
    if not packed:
        return AttnMemory("sdpa, is_causal" + (" (flash attention)" if gpu else ""),
                          "synthetic rows are one causal sequence each: transformers passes is_causal and no mask, "
                          "so no T^2 tensor exists", 0, 0, 0)
    mask = b * seq * seq
    per = mask * pb + rep
    why = (f"packed documents (data.format {recipe.data.format}: position_ids restart per document): transformers "
           f"builds a bool document mask ({b} x 1 x {seq} x {seq}); SDPA converts it to "
           f"{t.mixed_precision.param_dtype} in every layer and saves that copy for backward"
           + (", and K/V are repeated to every head" if rep else "")
           + ("; on GPU the memory-efficient kernel runs (flash takes no mask)" if gpu else ""))
    return AttnMemory("sdpa + explicit document mask" + (" (memory-efficient kernel)" if gpu else ""), why,
                      L * per if ac == "none" else mask, per if ac != "none" else 0, 0)


@dataclass(frozen=True)
class _Sums:
    """The numels _memory reads off a rank's parameter list for one FSDP size f (see _sums)."""
    shard: int                     # the rank's shard of every parameter (padded rows: ceil(rows / f))
    shard_train: int               # ... of the trainable ones
    train: int                     # trainable, unsharded
    root_train: int                # trainable in the root module (embedding, final norm, lm_head), unsharded
    root_emb_train: bool           # the embedding is among them
    gathered_last: int             # FSDP2's unsharded copy (padded rows x f) of the last block
    gathered_root: int             # ... of the root module
    kept_whole: int                # root + last block, unpadded (the OOM hint of a plan that does not shard)
    nf4_shard: int = 0             # QLoRA: the rank's shard of the NF4 weights (elements; in `shard` too) ...
    nf4_shard_bytes: int = 0       # ... and its NF4 storage in bytes (runtime/quant.py nf4_bytes)
    nf4_last: int = 0              # the last block's gathered NF4 weights (elements; in gathered_last too) ...
    nf4_last_bytes: int = 0        # ... and their gathered NF4 storage
    nf4_largest: int = 0           # the largest NF4 weight, whole: dequantized in each forward / backward
    last_whole: int = 0            # one block, unpadded and unsharded (QLoRA's block-by-block load)
    last_largest: int = 0          # the block's largest tensor, whole (QLoRA's load writes one at a time)
    root_whole: int = 0            # the root module's params, unsharded
    root_largest: int = 0          # ... its largest tensor (embedding or lm_head)
    root_shard: int = 0            # ... the rank's shard of them


_SUMS: dict = {}


def _sums(params: list[RankParam], f: int, fsdp: bool, db: int = 2) -> _Sums:
    """_Sums memoized per (params list, f): `suggest` estimates thousands of candidates over a
    few cached params lists (~700 entries for 80 layers), which made these walks most of its time.
    db: bytes of model.dtype (the NF4 scaler factors')."""
    return cached(_SUMS, (id(params), f, fsdp, db), (params,), lambda: _sums_of(params, f, fsdp, db), size=1024)


def _sums_of(params: list[RankParam], f: int, fsdp: bool, db: int = 2) -> _Sums:
    """One pass over the list (it was 17 generator passes: 150 us per list of ~360 parameters,
    1,245 lists in a suggest of 70B on 64 GPUs)."""
    shards = f if fsdp else 1
    shard = shard_train = train = root_train = gathered_last = gathered_root = kept_whole = 0
    nf4_shard = nf4_shard_bytes = nf4_last = nf4_last_bytes = nf4_largest = 0
    last_whole = last_largest = root_whole = root_largest = root_shard = 0
    root_emb_train = False
    for p in params:
        n = p.rows * p.rest
        if fsdp:
            fp = f * p.tp // p.ep                     # experts under ep: FSDP over efsdp = dp_shard x cp x tp / ep
            rows = -(-p.rows // fp)
            sh = rows * p.rest                        # the rank's shard: ceil(rows / f) rows
            ga = rows * fp * p.rest                   # FSDP2's unsharded copy: padded rows x f
        else:
            sh, ga = n, 0
        shard += sh
        if p.trainable:
            shard_train += sh
            train += n
        w = p.where
        if w == "root":
            root_whole += n
            root_largest = max(root_largest, n)
            root_shard += sh
            gathered_root += ga
            kept_whole += n
            if p.trainable:
                root_train += n
                root_emb_train = root_emb_train or p.embedding
        elif w == "last":
            last_whole += n
            last_largest = max(last_largest, n)
            gathered_last += ga
            kept_whole += n
        if p.nf4:                                     # one rank's NF4 storage (even rows)
            nf4_shard += sh
            nf4_largest = max(nf4_largest, n)
            block = nf4_scaler_block(p.rows, n, shards) or 1
            nf4_shard_bytes += nf4_bytes(n // shards, block, db)
            if w == "last" and fsdp:
                nf4_last += ga
                nf4_last_bytes += nf4_bytes(n // shards, block, db, False) * shards + 17 * db
    return _Sums(shard=shard, shard_train=shard_train, train=train, root_train=root_train,
                 root_emb_train=root_emb_train, gathered_last=gathered_last, gathered_root=gathered_root,
                 kept_whole=kept_whole, nf4_shard=nf4_shard, nf4_shard_bytes=nf4_shard_bytes, nf4_last=nf4_last,
                 nf4_last_bytes=nf4_last_bytes, nf4_largest=nf4_largest, last_whole=last_whole,
                 last_largest=last_largest, root_whole=root_whole, root_largest=root_largest, root_shard=root_shard)


def _memory(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, params: list[RankParam],
            pp: PPRank | None = None) -> dict[str, int]:
    """Bytes of rank 0, the peak rank: FSDP2 splits dim 0 into dp_shard x cp chunks of
    ceil(rows / f) rows, allocates every shard padded to that size, and rank 0's chunk is
    always a full one (the last ranks' may be short or empty), so its AdamW state is largest."""
    t = recipe.train
    mb, pb = DTYPE_BYTES[recipe.model.dtype], DTYPE_BYTES[t.mixed_precision.param_dtype]
    rb = DTYPE_BYTES[t.mixed_precision.reduce_dtype]
    fsdp = mesh.fsdp_enabled
    s = _sums(params, mesh.fsdp, fsdp, mb)
    n_shard, n_train = s.shard, s.shard_train
    # one call: a layer's recompute bytes and the logits do not depend on the layers counted or
    # the final part (suggest called it twice per pp rank, ~8% of its time)
    acts, recompute, logits = _activations(recipe, model, mesh, *((pp.last, pp.layers_each) if pp else ()))
    if pp is not None:             # this pp rank's layers, micro-batches in flight; logits on the last stage only
        acts = pp.inflight * acts
        # the last stage: each in-flight micro-batch's logits (the stage's output, pb per token x
        # vocab) stay in the stage's fwd_cache until its backward, beside the loss's 12 B; GPipe
        # runs every forward first, so each waiting one also keeps its fp32 log-softmax output
        # (4 B). Full vocab on every tp rank: no loss parallel under pp (compiler/pp.py), the
        # logits are gathered. Measured, tiny-llama pp 2 x dp_shard 2, seq 256 x mbs 2, 4
        # micro-batches (tests/test_measured.py): four 8.4 MB logits-sized tensors at 1F1B's peak
        # (logits, log-softmax, its grad, the grad written), 12 at GPipe's
        vt = tokens_per_rank(t, mesh) * model.vocab_size
        logits = logits + pp.logit_mbs * vt * pb + (pp.logit_mbs - 1) * vt * 4 if pp.last else 0
    # between micro-steps FSDP2 skips the reduce-scatter and keeps each parameter's unsharded
    # gradient (reduce dtype); without FSDP gradients just add up in .grad (the grads term)
    no_sync = fsdp and mesh.grad_accum > 1 and t.grad_sync == "last_micro_step"
    accum = s.train * rb if no_sync else 0
    # LoRA: the adapters (the only trainable params) are float32 whatever model.dtype
    # (runtime/lora.py ADAPTER_DTYPE): their params, grads and AdamW state
    tb = DTYPE_BYTES["float32"] if recipe.lora.rank else mb
    grads = n_train * tb
    # alive from the forward through the loss backward: the root module (never resharded after
    # forward), the last block (reshard_after_forward=False) and, once more, the last block's
    # flat all-gather output, which FSDP2 keeps (comm_ctx.all_gather_state) until the next
    # forward all-gather frees it
    # QLoRA: the last block's NF4 weights are gathered as NF4 storage (torchao's all-gather hooks),
    # and one weight at a time is dequantized (in model.dtype) in forward and backward: the largest
    block = (s.gathered_last - s.nf4_last) * pb + s.nf4_last_bytes
    dequant = nf4_working_bytes(s.nf4_largest, mb) if s.nf4_largest else 0
    kept = s.gathered_root * pb + 2 * block
    if pp is not None:             # every block of the rank stays gathered (runtime/pp.py: no reshard after
        kept = s.gathered_root * pb + block + block // max(1, pp.blocks)   # forward) + one all-gather buffer
    # the embedding's backward under TP: a full vocab x hidden gradient on every tp rank
    # (DTensor's embedding backward is Replicate), next to the root's unsharded grads
    emb_full = model.vocab_size * model.hidden_size * pb if mesh.tp > 1 and s.root_emb_train else 0
    root_grads = s.root_train * pb if fsdp else 0
    # params + AdamW's exp_avg and exp_avg_sq: alive all step (the grads are not in it)
    param_bytes = (n_shard - n_train - s.nf4_shard) * mb + s.nf4_shard_bytes + n_train * tb
    state = param_bytes + 2 * grads
    # torch.distributed.pipelining's receive buffers: PipelineStage allocates one per micro-batch
    # (torch.empty in _prepare_forward_infra / _setup_backward_recv_info) and keeps them all run:
    # the activations every stage but the first receives, the gradients every stage but the last,
    # mbs x seq / cp x hidden x pb each. O(micro-batches): gbs / dp x seq x hidden x pb per
    # direction, whatever the micro-batch size (measured: +2 x 131,072 B at stage 0 from 2 to 4
    # micro-batches, tiny-llama seq 256 x mbs 2 x hidden 64 x fp32)
    # Under sequence parallel a stage sends its local Shard(1) slice (mbs, T / tp, H) and the next
    # re-wraps it (runtime/pp.Stage), so each buffer is tp times smaller
    bufs = pp.recv_buffers * mesh.grad_accum * _hop_tokens(t, mesh) * model.hidden_size * pb if pp else 0
    state += bufs
    # the sharded grads alive in the forward and loss backward: none in the first micro-step
    # (zero_grad sets them to None); from the second on they hold the sum so far, unless FSDP2
    # skips the reduce-scatter (last_micro_step: the unsharded `accum` instead). Counting
    # state - grads here (params + one AdamW moment) put every loss-backward peak one grads
    # term low: TP-only tp 4 + SP + LP, tiny-llama-mha, seq 256 x mbs 2, fp32: params 656,640 +
    # AdamW 1,313,280 + acts 2,377,728 + logits 512 x 4096 / 4 x 16 = 8,388,608 -> 12,736,256 B
    # vs the measured 12.72-12.75 MB per rank (tests/test_measured.py); with state - grads it was
    # 12,079,616 B (-5.0%)
    live_grads = grads if mesh.grad_accum > 1 and not no_sync else 0
    if pp is not None:
        # a non-last stage's output (the hidden states it sent) stays in its fwd_cache per
        # in-flight micro-batch until that micro-batch's backward
        acts += 0 if pp.last else pp.inflight * tokens_per_rank(t, mesh) * model.hidden_size * pb
        # TP without FSDP: the embedding's .grad is the Replicate (full vocab x hidden) tensor its
        # backward made, alive from the first micro-batch's backward on (measured, tiny-llama pp 2
        # x tp 2, 4 micro-batches: a 1 MB = 4096 x 64 x 4 B tensor at stage 0's peak)
        # (in place of its vocab shard's gradient, which `grads` counts: that one never exists)
        if pp.first and not fsdp and mesh.grad_accum > 1:
            live_grads += emb_full - sum(p.rows * p.rest for p in params if p.embedding and p.trainable) * tb
    # the attention's T^2 tensors: held through the loss backward, one layer's more in a recompute,
    # CP's mask all step
    am = attention_memory(recipe, model, mesh)
    # AdamW (foreach) allocates sqrt(exp_avg_sq) for a whole param group: ~ the grads once more
    loss_bwd = ("loss backward", state + live_grads + accum + kept + dequant + acts + logits + am.held)
    if pp is not None and not pp.last:
        # a stage that computes no loss peaks inside a block's backward, its in-flight micro-batches'
        # activations alive: the MLP backward's three tokens x I / tp temporaries (the down input's
        # gradient, then the gradients of act(gate) and up; measured at every pp 2 stage 0 peak of
        # tests/test_measured.py: 3 x 512 x 256 x 4 B = 1.5 MB, at tp 2 3 x 786 KB). The held
        # gradients (FSDP2's unsharded `accum`; without FSDP the .grad sums, the TP embedding's full
        # one among them) exist from the rank's second
        # backward on: with as many micro-batch stage-forwards in flight as the step has (GPipe,
        # 1F1B with m <= pp - r), the first backward holds all of them and none of those gradients,
        # each later one a micro-batch fewer (pp 2 x dp_shard 2, 1F1B, 2 micro-batches: the peak is
        # micro-batch 0's backward, 11.58 MB; the estimate with both was 13.45, +16%)
        tokens = tokens_per_rank(t, mesh)
        block_bwd = 3 * tokens * (model.intermediate_size // mesh.tp) * pb
        held = accum + live_grads
        if pp.inflight >= mesh.grad_accum * recipe.pp.stages_per_rank:
            waves = max(acts, acts - acts // pp.inflight + held)
        else:
            waves = acts + held
        loss_bwd = ("block backward", state + kept + dequant + waves + block_bwd + am.held)
    phases = (loss_bwd,
              ("recompute", state + live_grads + accum + kept + dequant + 2 * block + acts + recompute + am.peak)
              if recompute else None,
              # the last micro-step's backward has reduce-scattered (and freed) the blocks'
              # held grads by now, so the blocks' sharded grads exist; the root's are reduced last
              ("embedding backward", state + grads + kept + root_grads + emb_full
               + (s.root_train * rb if no_sync else 0) + am.always),
              ("optimizer step", state + 2 * grads + am.always),
              (WEIGHT_LOAD, weight_load_bytes(s, param_bytes, mb, seeded=recipe.model.weights in (None, "random")))
              if s.nf4_largest else None)
    return {"params": param_bytes, "grads": grads, "optimizer": 2 * grads, "accum": accum, "gathered": kept + dequant,
            "pp_buffers": bufs,
            "block": block, "acts": acts, "logits": logits, "params_per_rank": n_shard, "kept_whole": s.kept_whole,
            "attn_mask": am.peak if recompute else am.held,
            "phases": tuple(ph for ph in phases if ph)}


def weight_load_bytes(s: _Sums, param_bytes: int, mb: int, seeded: bool) -> int:
    """QLoRA: runtime/parallel.build_quantized allocates one block whole in model.dtype, writes
    its tensors one at a time, quantizes its targets to NF4 and shards it, block after block,
    then the root (embeddings, final norm, lm_head). The rank holds the shards built so far
    (param_bytes, less the root's shard: the root is built last, whole) plus, at the larger of:
      a block   the block whole + the larger transient of writing its largest tensor or
                quantizing its largest target (they run one after the other)
      the root  the root whole + writing its largest tensor
    Writing a tensor: the seeded init builds it whole in float32 twice (torch.randn, then x std:
    8 bytes per element whatever model.dtype); a load from model.weights reads it whole once
    (a plain tensor before fully_shard: the whole is its block). Quantizing (torchao to_nf4):
    the scaled copy (mb) + the uint8 codes (1) + the packed codes and scalers (< 1) per element,
    and per chunk of min(numel, 1M) elements its 16 distances twice ((x - nf4), then .abs()).
    Measured, tiny-llama dp_shard 4 seeded (tests/test_measured.py): the root's init is the peak,
    this gives 4.27 MB for the measured 4.28 MB; the earlier fixed 1M x 16 distances (67 MB in fp32)
    made it 69.9 MB."""
    def write(n: int) -> int:
        return 2 * n * DTYPE_BYTES["float32"] if seeded else n * mb

    quantize = s.nf4_largest * (mb + 2) + 2 * min(s.nf4_largest, NF4_CHUNK) * 16 * mb
    built = param_bytes - s.root_shard * mb
    return built + max(s.last_whole * mb + max(write(s.last_largest), quantize),
                       s.root_whole * mb + write(s.root_largest))


def matmul_params(model: ModelSpec) -> int:
    """N of runtime/flops.py: every parameter but the input embedding table (a lookup); a
    tied table is lm_head's weight too, a matmul, and stays. MoE: the active ones (a
    ModelSpec.active_params fact, when the model stage provides one)."""
    n = getattr(model, "active_params", None) or model.num_params
    emb = next(m.numel for m in model.modules if m.fqn == model.roles.embedding)
    return n - (0 if model.roles.tied else emb)


def attention_head_dim(model: ModelSpec) -> int:
    """Dh of the attention FLOPs 12 L H Dh T (QK^T over the q/k head dim, AV over the v head dim,
    each half of it). MLA (DeepSeek-V3): q/k heads are qk_nope + qk_rope = 128 + 64 = 192 wide, v
    heads 128, so Dh = (192 + 128) / 2 = 160, not config head_dim (= qk_rope_head_dim, 64)."""
    c = model.config
    nope, rope, v = c.get("qk_nope_head_dim"), c.get("qk_rope_head_dim"), c.get("v_head_dim")
    if all(isinstance(x, int) and x > 0 for x in (nope, rope, v)):
        return (nope + rope + v) // 2
    return model.head_dim


_FLOPS: dict = {}


def flops_per_token(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> int:
    """Memoized per (model, LoRA rank, its targets, seq_len), all it reads: suggest asks for it
    once per candidate, and each call walks every module twice (~1 ms for 80 layers, 8,709 calls
    for 70B on 64 GPUs)."""
    lo = recipe.lora
    key = (id(model), lo.rank, pl_key(pl) if lo.rank > 0 else None, recipe.train.seq_len)
    return cached(_FLOPS, key, (model,), lambda: _flops_per_token(recipe, model, pl), size=1024)


def _flops_per_token(recipe: Recipe, model: ModelSpec, pl: Placements) -> int:
    t, lo = recipe.train, recipe.lora
    targets = set(pl.lora_targets) if lo.rank > 0 else set()
    adapted = [(m.shape[0], lo.rank, m.shape[1]) for m in model.modules if m.fqn in targets]
    # an expert adapter runs for the rows routed to its expert: k of the E per token and MoE layer
    adapted += [(o, lo.rank, i) for m in model.modules if m.kind == "experts"
                for name, (_, o, i) in expert_matrices(m).items() if f"{m.fqn}.{name}" in targets
                for _ in range(model.experts_per_token)]
    n = matmul_params(model)
    return F.flops_per_token(
        matmul_params=n, layers=model.num_layers, heads=model.num_heads, head_dim=attention_head_dim(model),
        seq_len=t.seq_len, frozen_params=n if lo.rank > 0 else 0,    # LoRA: no base weight has a gradient
        adapters=adapted)


_RANK_PARAMS: dict = {}
WEIGHT_LOAD = "weight load (QLoRA)"   # the phase of runtime/parallel.build_quantized's block-by-block load
NF4_CHUNK = 1024 ** 2                   # torchao's to_nf4 quantizes in chunks of this many elements


def _rank_params(recipe: Recipe, model: ModelSpec, pl: Placements, tp: int, ep: int = 1) -> list[RankParam]:
    """rank_params memoized: `meshbake suggest` estimates thousands of candidates that share a
    few (model, lora, styles, tp); one call walks every module (~4 ms for an 80-layer model).
    The cached entry holds the model, so its id is not reused while it lives; placements go by
    content (pl_key)."""
    return cached(_RANK_PARAMS, (id(model), recipe.lora, pl_key(pl), tp, ep), (model,),
                  lambda: rank_params(recipe, model, pl, tp, ep))


_PL_KEYS: dict = {}
_PL_CONTENT: dict[tuple, int] = {}
_PL_IDS = itertools.count()


def pl_key(pl: Placements) -> int:
    """An int equal for placements equal in all this stage reads of them (styles, lora_targets;
    never their warnings), never reused. suggest resolves placements per (tp, cp > 1, SP, LP,
    pp > 1, ep > 1), but the styles differ only with tp and SP (the norms' sequence_parallel):
    keyed by the object, the per-model caches below missed once per placements object (70B on 64
    GPUs: 1,603 pp rank lists built for ~400 distinct ones)."""
    def intern() -> int:
        if len(_PL_CONTENT) > 4096:
            _PL_CONTENT.clear()
        return _PL_CONTENT.setdefault((tuple(pl.styles.items()), pl.lora_targets), next(_PL_IDS))
    return cached(_PL_KEYS, id(pl), (pl,), intern, size=1024)


@dataclass(frozen=True)
class PPRank:
    """One pp rank's part of the pipeline, for its memory (see pp_ranks)."""
    rank: int
    stages: tuple[int, ...]
    blocks: int                    # decoder blocks this rank holds (all its stages)
    layers_each: int               # blocks whose activations one in-flight micro-batch holds
    inflight: int                  # micro-batch stage-forwards alive at the rank's peak
    first: bool                    # holds the embedding (stage 0)
    last: bool                     # holds final norm + lm_head + loss
    logit_mbs: int                 # micro-batches whose logits are alive at once on the last stage
    fqns: frozenset[str] = frozenset()
    recv_buffers: int = 0          # receive buffers per micro-batch: stages not first + stages not last


_PP_RANKS: dict = {}


def pp_ranks(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> tuple[PPRank, ...]:
    """_pp_ranks memoized: it reads only the model, pp, the pp section and the micro-batches per
    step, which suggest's candidates share by the dozen (AC, SP/LP, cp, dp splits), and walks
    every module once per pp rank (pp 64 x 80 blocks: ~50k fqn tests a call)."""
    p = recipe.pp
    return cached(_PP_RANKS, (id(model), mesh.pp, p.schedule, p.stages_per_rank, p.split, mesh.grad_accum),
                  (model,), lambda: _pp_ranks(recipe, model, mesh))


def _pp_ranks(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> tuple[PPRank, ...]:
    """Every pp rank's stages and in-flight micro-batches (m = micro-batches per step, v = stages per rank):
      GPipe           all m forwards before any backward: m micro-batches of the rank's blocks, and
                      the last stage keeps m micro-batches' logits
      1F1B            rank r runs pp - r forwards before its first backward (warm-up): min(m, pp - r)
                      micro-batches in flight, stage 0 the most; the last stage backs each one up at once
      Interleaved1F1B / ZBV (v local stages): torch's warm-up on rank r is (v - 1) pp + 2 (pp - 1 - r)
                      local-stage forwards (+ 1 in flight), each of one local stage's blocks; ZBV is
                      counted like that (an upper bound: its V order backs the last stage up sooner)"""
    from meshbake.compiler.pp import even_split, ranges, stage_ranks

    p, pp, m = recipe.pp, mesh.pp, mesh.grad_accum
    v, n = p.stages_per_rank, mesh.pp * p.stages_per_rank
    st = ranges(tuple(p.split) if p.split else even_split(model.num_layers, n))
    on = stage_ranks(pp, v, p.schedule)
    roles, out = model.roles, []
    # each module's block index (None: embedding, final norm, lm_head), parsed once: a module is in
    # block i iff its fqn starts with "<block_prefix>.i." (one pass, not modules x blocks prefix tests)
    head = roles.block_prefix + "."
    block_of = [(mm.fqn, int(mm.fqn[len(head):].split(".", 1)[0]) if mm.fqn.startswith(head)
                 and mm.fqn[len(head):].split(".", 1)[0].isdigit() and "." in mm.fqn[len(head):] else None)
                for mm in model.modules]
    for r in range(pp):
        mine = tuple(s for s in range(n) if on[s] == r)
        blocks = sorted(i for s in mine for i in range(*st[s]))
        if p.schedule == "GPipe":
            inflight, each = m, len(blocks)
        elif p.schedule == "1F1B":
            inflight, each = min(m, pp - r), len(blocks)
        else:
            inflight, each = min(m * v, (v - 1) * pp + 2 * (pp - 1 - r) + 1), max(st[s][1] - st[s][0] for s in mine)
        keep = set(blocks)
        fqns = frozenset(f for f, b in block_of
                         if b in keep
                         or (0 in mine and f == roles.embedding)
                         or (n - 1 in mine and f in (roles.final_norm, roles.lm_head)))
        out.append(PPRank(r, mine, len(blocks), each, inflight, 0 in mine, n - 1 in mine,
                          m if p.schedule == "GPipe" else 1, fqns, sum((s > 0) + (s < n - 1) for s in mine)))
    return tuple(out)


def _pp_model(model: ModelSpec, r: PPRank) -> ModelSpec:
    """The model as pp rank r holds it: its modules only (num_params their sum, so nothing is
    counted as 'rest'), its blocks as the layer count. Tied embeddings: the last stage's rank
    (without stage 0) holds its own copy of the table as lm_head's weight (runtime/pp.py), a
    parameter of its own there, placed like lm_head (colwise: vocab / tp rows), with its
    gradient and AdamW state; a rank holding both stages (ZBV's rank 0) one parameter."""
    mods = tuple(m for m in model.modules if m.fqn in r.fqns)
    roles = model.roles
    if roles.tied and not r.first:
        roles = replace(roles, tied=False)
    n = sum(m.numel for m in mods if not (roles.tied and m.fqn == roles.lm_head))
    return replace(model, modules=mods, num_params=n, num_layers=r.blocks, roles=roles)


# suggest estimates hundreds of pp candidates that differ only in AC / micro-batch / dp: a pp rank's
# parameter list depends on none of those. Keyed by the objects' ids, with the objects kept in the
# entry and compared by identity on a hit (an id is reused only after its object is gone).
_PP_PARAMS: dict[tuple, tuple] = {}
_PP_SIGS: dict[tuple, int] = {}
_SIG_IDS = itertools.count()


def _pp_rank_params(rec: Recipe, model: ModelSpec, pl: Placements, mesh: MeshSpec, r: PPRank):
    """(the model as pp rank r holds it, its RankParams with its blocks kept gathered: "last",
    an int equal for equal parameter lists)."""
    key = (id(model), pl_key(pl), r.fqns, r.blocks, mesh.tp, mesh.ep, rec.lora)
    hit = _PP_PARAMS.get(key) if memo.on() else None
    if hit is not None and hit[0] is model:
        # the cached list itself, never a copy (no caller mutates it): _sums and _fsdp_sums are
        # memoized by the list's id, and a copy per call missed them on every pp candidate
        # (70B on 64 GPUs: 16,746 _sums walks of 18,552 calls)
        return hit[1], hit[2], hit[3]
    mr = _pp_model(model, r)
    per = _module_params(rec, model, pl, mesh.tp, mesh.ep, mr.roles)
    params = [x for m in mr.modules for x in per[m.fqn]]
    if len(_PP_PARAMS) > 512:
        _PP_PARAMS.clear()
        _PP_SIGS.clear()
    # the list's content (shapes and roles, no names) as a small int: equal lists, equal int
    sig = _PP_SIGS.setdefault((mr.num_params, tuple(params)), next(_SIG_IDS))   # never reused: no clash after a clear
    _PP_PARAMS[key] = (model, mr, params, sig)
    return mr, params, sig


_MODULE_PARAMS: dict = {}


def _module_params(rec: Recipe, model: ModelSpec, pl: Placements, tp: int, ep: int,
                   roles: ModelRoles) -> dict[str, tuple[RankParam, ...]]:
    """rank_params module by module, a block's "last" (a pp rank keeps its blocks gathered). A pp
    rank's list is its modules' lists in order: rank_params over the rank's model (_pp_model)
    gives the same, its num_params being its modules' sum (no "rest" entry). Per model,
    placements, tp, ep, LoRA and the tied flag (the last stage's own lm_head, _pp_model): built
    once, where every pp rank list walked its modules (70B on 64 GPUs: 650 lists, ~0.25 s)."""
    def build() -> dict[str, tuple[RankParam, ...]]:
        def alone(m: ModuleInfo) -> ModelSpec:
            return evolve(model, modules=(m,), roles=roles,
                          num_params=0 if roles.tied and m.fqn == roles.lm_head else m.numel)
        return {m.fqn: tuple(evolve(x, where="last") if x.where == "block" else x
                             for x in rank_params(rec, alone(m), pl, tp, ep)) for m in model.modules}
    return cached(_MODULE_PARAMS, (id(model), pl_key(pl), tp, ep, rec.lora, roles.tied), (model,), build, size=64)


_PP_LISTS: dict = {}


def _pp_rank_lists(rec: Recipe, model: ModelSpec, pl: Placements, mesh: MeshSpec, ranks: tuple[PPRank, ...]):
    """Per pp rank: (rank, _pp_rank_params' model and list, the rank's memory signature: what
    _memory reads of the rank and its list). Memoized per ranks tuple (pp_ranks' cached object)
    and what the lists depend on: one lookup per candidate instead of a key built per rank
    (70B on 64 GPUs: 27,432 rank keys, 0.15 s, for 6,153 candidates)."""
    def build() -> tuple:
        out = []
        for r in ranks:
            mr, params, psig = _pp_rank_params(rec, model, pl, mesh, r)
            out.append((r, mr, params,
                        (r.blocks, r.layers_each, r.inflight, r.first, r.last, r.logit_mbs, r.recv_buffers, psig)))
        return tuple(out)
    return cached(_PP_LISTS, (id(ranks), id(model), pl_key(pl), mesh.tp, mesh.ep, rec.lora), (ranks, model), build,
                  size=1024)


def _pp_estimate(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements):
    """(peak PPRank, the model as it holds it (_pp_model), its params list, its _memory dict, every
    rank's (rank, params, total bytes)):
    per pp rank its own parts, all its blocks kept gathered ("last": runtime/pp.py does not
    reshard after forward), gradients unsynced until the last micro-batch (the pipeline stage
    turns FSDP2's gradient sync off until then: grad_sync last_micro_step in effect)."""
    rec = evolve(recipe, train=evolve(recipe.train, grad_sync="last_micro_step"))
    best, rows = None, []
    # ranks that hold the same parameter list (shapes and roles: RankParam has no name) and the
    # same schedule position have the same memory: pp 8 of Llama-3.1-405B's 126 blocks is 16
    # blocks on ranks 1-5 and 15 on 6, so _memory runs for 4-5 distinct ranks, not 8 (pp 64: ~10 of 64)
    seen: dict[tuple, dict[str, int]] = {}
    for r, mr, params, sig in _pp_rank_lists(rec, model, pl, mesh, pp_ranks(recipe, model, mesh)):
        mem = seen.get(sig) if memo.on() else None
        if mem is None:
            mem = seen[sig] = _memory(rec, mr, mesh, params, r)
        total = max(b for _, b in mem["phases"])
        rows.append((r.rank, mem["params_per_rank"], total))
        if best is None or total > best[4]:
            best = (r, mr, params, mem, total)
    return *best[:4], tuple(rows)


def _hop_tokens(t, mesh: MeshSpec) -> int:
    """Tokens of one stage-to-stage send per tp rank: mbs x seq / cp, / tp under sequence
    parallel (runtime/pp.Stage sends the local Shard(1) slice, the receiver re-wraps it); without
    it every tp rank sends its full replicated copy to its peer."""
    return tokens_per_rank(t, mesh) // (mesh.tp if mesh.sequence_parallel else 1)


def pp_traffic(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, r: PPRank) -> tuple[Collective, ...]:
    """The pipeline's point-to-point rows of pp rank r per optimizer step: per micro-batch and
    stage boundary the rank is on, the hidden states forward and their gradient back, each
    _hop_tokens x hidden x param bytes (mbs x seq / cp [/ tp under sequence parallel])."""
    t = recipe.train
    a = _hop_tokens(t, mesh) * model.hidden_size * DTYPE_BYTES[t.mixed_precision.param_dtype]
    n = mesh.pp * recipe.pp.stages_per_rank
    m = mesh.grad_accum
    sends = sum((s < n - 1) + (s > 0) for s in r.stages)       # fwd send to s+1, bwd send to s-1
    rows = () if not sends else (
        Collective("pp", 2, "send", "hidden states forward / their gradients backward", m * sends, m * sends * a),
        Collective("pp", 2, "recv", "hidden states forward / their gradients backward", m * sends, m * sends * a))
    if model.roles.tied and r.first != r.last:
        # tied embeddings: the first stage's table and the last stage's copy sum their gradients
        # once per step over the pair (runtime/pp.tied_grads), each rank its local shard: vocab / tp
        # rows (TP Shard(0)) / the FSDP shards (dim 0, padded up) x hidden, in the master dtype
        f = mesh.dp_shard * mesh.cp if mesh.fsdp_enabled else 1
        rows_local = -(-(model.vocab_size // mesh.tp) // f)
        rows += (Collective("pp", 2, "all_reduce", "tied embedding gradients (first + last stage's copy)", 1,
                            rows_local * model.hidden_size * DTYPE_BYTES[recipe.model.dtype]),)
    # clipping: each stage's sum of squared norms (a float64 scalar) summed over the pp group once a
    # step (runtime/train.clip_grad_norm pp_group)
    return rows + (Collective("pp", mesh.pp, "all_reduce", "grad norm: squares summed over the stages (float64)",
                              1, 8),)


def estimate(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements, *, memory_first: bool = False) -> Estimate:
    """memory_first (suggest): a plan whose (peak rank's) memory is over the budget comes back with
    its memory only (no traffic rows, no step time): check_memory refuses it on memory alone, and
    most of suggest's candidates end there (Llama-3.1-70B, 64 GPUs: 5,778 of 6,153 pp candidates,
    1,678 of 2,556 without pp; their traffic rows and step time were ~15% of a suggest run)."""
    if mesh.pp_enabled:
        return _estimate_pp(recipe, model, mesh, pl, memory_first)
    tp = mesh.tp
    pb = DTYPE_BYTES[recipe.train.mixed_precision.param_dtype]
    params = _rank_params(recipe, model, pl, tp, mesh.ep)
    mem = _memory(recipe, model, mesh, params)
    trainable_total = _fsdp_sums(_rank_params(recipe, model, pl, 1), 1, model.num_layers)[3]
    # what FSDP keeps gathered once it shards (for the OOM hint of a plan that does not shard yet)
    kept = mem["kept_whole"] * pb
    over = memory_first and max(b for _, b in mem["phases"]) > int(recipe.cluster.gpu_memory_gb * 1e9 * USABLE)
    comm = () if over else traffic(recipe, model, mesh, pl, params)
    est = Estimate(
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
        # the exact rows of traffic(); experts under ep are FSDP over efsdp = dp_shard x cp x tp / ep (runtime/ep.py)
        fsdp_comm_bytes=sum(c.wire_bytes for c in comm if c.axis.startswith("dp_") or c.axis == "efsdp"),
        tp_comm_bytes=sum(c.wire_bytes for c in comm if c.axis == "tp"),
        accum_grads_bytes=mem["accum"],
        traffic=comm,
        phases=mem["phases"],
        ep_comm_bytes=sum(c.wire_bytes for c in comm if c.op == "all_to_all"),
        attn_mask_bytes=mem["attn_mask"],
    )
    if over or not timed(recipe):
        return est
    gemms = gemm_shapes(recipe, mesh, params)
    return evolve(est, time=step_time(recipe, mesh, est, gemms, _work(recipe, model, mesh, gemms), model))


def _work(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, gemms) -> perf.Work:
    """The datasheet model's per-micro-batch work (compiler/perf.py); a tied lm_head is the
    embedding's weight, which gemm_shapes leaves out as a lookup: its matmul is added here."""
    if model.roles.tied:
        t = recipe.train
        gemms = (*gemms, (t.micro_batch_size * t.seq_len // mesh.cp,
                          model.vocab_size // (mesh.tp if mesh.loss_parallel else 1), model.hidden_size, 3))
    return perf.work_of(recipe, model, mesh, gemms, perf.kernel_of(attention_memory(recipe, model, mesh).kernel))


def _estimate_pp(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements,
                 memory_first: bool = False) -> Estimate:
    """estimate() under mesh.pp: the peak pp rank's memory (see _pp_estimate), its traffic: TP rows
    for its blocks and micro-batches, FSDP rows over its own parameters, the pipeline's send/recv."""
    pb = DTYPE_BYTES[recipe.train.mixed_precision.param_dtype]
    r, mr, params, mem, rows = _pp_estimate(recipe, model, mesh, pl)
    rec = evolve(recipe, train=evolve(recipe.train, grad_sync="last_micro_step"))
    over = memory_first and max(b for _, b in mem["phases"]) > int(recipe.cluster.gpu_memory_gb * 1e9 * USABLE)
    # the stage's rows on the stage model (its modules only: its blocks, the embedding on the first
    # stage, final norm + lm_head on the last); the last stage's copy of a tied table is clipped but
    # left out of the grad norm (runtime/pp.py norm_skip): one tensor fewer in its group's partials
    comm = () if over else \
        traffic(rec, mr, mesh, pl, params, norm_skip_head=model.roles.tied and not r.first) \
        + pp_traffic(recipe, model, mesh, r)
    est = Estimate(
        params_total=model.num_params,
        trainable_total=_fsdp_sums(_rank_params(recipe, model, pl, 1), 1, model.num_layers)[3],
        params_per_rank=mem["params_per_rank"], params_bytes=mem["params"], grads_bytes=mem["grads"],
        optimizer_bytes=mem["optimizer"], gathered_bytes=mem["gathered"],
        block_gather_bytes=mem["gathered"] or mem["kept_whole"] * pb,
        activations_bytes=mem["acts"], logits_bytes=mem["logits"],
        budget_bytes=int(recipe.cluster.gpu_memory_gb * 1e9 * USABLE),
        flops_per_token=flops_per_token(recipe, model, mesh, pl),
        fsdp_comm_bytes=sum(c.wire_bytes for c in comm if c.axis.startswith("dp_") or c.axis == "efsdp"),
        tp_comm_bytes=sum(c.wire_bytes for c in comm if c.axis == "tp"),
        accum_grads_bytes=mem["accum"], traffic=comm, phases=mem["phases"],
        # ep inside each stage group: the all-to-all rows of this rank's MoE blocks (traffic() over its stage model)
        ep_comm_bytes=sum(c.wire_bytes for c in comm if c.op == "all_to_all"), attn_mask_bytes=mem["attn_mask"],
        pp_comm_bytes=sum(c.bytes for c in comm if c.axis == "pp" and c.op in ("send", "recv")),
        pp_peak_rank=r.rank, pp_rank_rows=rows,
        pp_buffers_bytes=mem["pp_buffers"])
    if over or not timed(recipe):
        return est
    stage = evolve(model, num_layers=r.blocks)
    return evolve(est, time=step_time(recipe, mesh, est, None, _work(recipe, stage, mesh, gemm_shapes(recipe, mesh, params))))


@dataclass(frozen=True)
class MemFix:
    """One fix for a memory error: `--set` overrides and what they do. Offered only when it
    applies to the recipe (no loss_parallel at tp 1, no LoRA when LoRA is on) and, with the model
    at hand, only when the re-run mesh/placements/estimate accepts it and the estimate drops."""
    sets: tuple[tuple[str, Any], ...]
    why: str
    total_bytes: int = 0            # the estimate with the fix (0: not re-estimated)

    @property
    def args(self) -> str:
        return " ".join(f"--set {k}={_yaml_value(v)}" for k, v in self.sets)


def _yaml_value(v: Any) -> str:
    return {True: "true", False: "false", None: "null"}[v] if v is None or isinstance(v, bool) else str(v)


def _with_sets(recipe: Recipe, sets: tuple[tuple[str, Any], ...]) -> Recipe:
    """The recipe with dotted `section.field` values replaced (what `--set` would give)."""
    for key, v in sets:
        *parents, leaf = key.split(".")
        nodes = [recipe]
        for p in parents:
            nodes.append(getattr(nodes[-1], p))
        new = replace(nodes[-1], **{leaf: v})
        for p, parent in zip(reversed(parents), reversed(nodes[:-1])):
            new = replace(parent, **{p: new})
        recipe = new
    return recipe


def _batch_sets(recipe: Recipe, dp: int, mbs: int) -> tuple[tuple[str, Any], ...] | None:
    """The batch keys a fix that changes dp or micro_batch_size also needs: none if grad_accum is
    derived and still whole, `train.grad_accum=null` if the recipe pins it; None if the global
    batch does not split into mbs x dp any more."""
    if recipe.train.global_batch_size % (mbs * dp):
        return None
    # with pp, pp.microbatches is that same derived number: a pinned one must be re-derived too
    return ((("train.grad_accum", None),) if recipe.train.grad_accum is not None else ()) + (
        (("pp.microbatches", None),) if recipe.pp.microbatches is not None else ())


def _fix_candidates(est: Estimate, recipe: Recipe, mesh: MeshSpec, name: str) -> list[MemFix]:
    """Fixes that apply to this recipe, the largest term's first (each is re-checked by the caller)."""
    t, c = recipe.train, recipe.cluster
    act = []
    if t.activation_checkpointing != "full":
        act.append(MemFix((("train.activation_checkpointing", "full"),),
                          "train.activation_checkpointing: full (recompute each block in the backward)"))
    if t.micro_batch_size > 1:
        mbs = max(d for d in range(1, t.micro_batch_size) if t.micro_batch_size % d == 0)
        extra = _batch_sets(recipe, mesh.dp, mbs)
        if extra is not None:
            act.append(MemFix((("train.micro_batch_size", mbs),) + extra,
                              f"train.micro_batch_size: {mbs} (more accumulation steps, same global batch)"))
    lp = []
    # under pp, loss parallel and LoRA are refused (compiler/pp.py): never offered there
    if mesh.tp > 1 and not recipe.tp.loss_parallel and not mesh.pp_enabled:
        lp.append(MemFix((("tp.loss_parallel", True),), "tp.loss_parallel: true (logits stay vocab-sharded)"))
    lora = []
    if not recipe.lora.rank and not mesh.pp_enabled:
        sets: tuple[tuple[str, Any], ...] = (("lora.rank", 16),)
        if recipe.model.dtype == "float32":
            sets += (("model.dtype", "bfloat16"),)
        lora.append(MemFix(sets, "train LoRA (lora.rank: 16) on bfloat16 weights: AdamW state for the adapters "
                           "only"))
    tp = []
    tp2 = mesh.tp * 2
    if tp2 <= c.gpus_per_node and c.gpus_per_node % tp2 == 0:
        world = c.nodes * c.gpus_per_node
        dp = world // (tp2 * mesh.cp * mesh.pp)
        extra = _batch_sets(recipe, dp, t.micro_batch_size) \
            if world % (tp2 * mesh.cp * mesh.dp_replicate * mesh.pp) == 0 else None
        if extra is not None:
            tp.append(MemFix((("mesh.tp", tp2), ("mesh.dp_shard", -1)) + extra,
                             f"mesh.tp: {tp2} with mesh.dp_shard: -1 (each rank holds less of every block)"))
    nodes = []
    n = _shard_nodes(est, recipe, mesh)
    if n:
        for k in range(n, 4 * n + 1):
            ranks = k * c.gpus_per_node
            if ranks % (mesh.dp_replicate * mesh.cp * mesh.tp * mesh.pp):
                continue
            extra = _batch_sets(recipe, ranks // (mesh.cp * mesh.tp * mesh.pp), t.micro_batch_size)
            if extra is not None:
                nodes.append(MemFix((("cluster.nodes", k), ("mesh.dp_shard", -1)) + extra,
                                    f"cluster.nodes: {k} with mesh.dp_shard: -1 (params + grads + AdamW state "
                                    f"sharded over more ranks)"))
                break
    pp = []
    if mesh.pp_enabled:          # twice the stages: each pp rank holds half the blocks (and their state)
        world, pp2 = c.nodes * c.gpus_per_node, mesh.pp * 2
        if world % (pp2 * mesh.dp_replicate * mesh.cp * mesh.tp) == 0:
            extra = _batch_sets(recipe, world // (pp2 * mesh.cp * mesh.tp), t.micro_batch_size)
            if extra is not None:
                pp.append(MemFix((("mesh.pp", pp2), ("mesh.dp_shard", -1)) + extra + (
                    (("pp.split", None),) if recipe.pp.split is not None else ()),
                    f"mesh.pp: {pp2} with mesh.dp_shard: -1 (each pp rank holds half as many blocks)"))
    accum = []
    if est.accum_grads_bytes and t.grad_sync == "last_micro_step":
        accum.append(MemFix((("train.grad_sync", "every_micro_step"),),
                            "train.grad_sync: every_micro_step (gradients stay sharded between micro-steps)"))
    order = {"params": nodes + pp + lora + tp, "grads": nodes + pp + lora + tp, "optimizer": nodes + pp + lora + tp,
             "gathered": tp + pp + act + lora, "accum_grads": accum + act + lora,
             "activations": act + pp + tp + lora, "logits": lp + act + tp, "attn_mask": act,
             # m per direction whatever the micro-batch size: only more dp ranks make them fewer
             "pp_buffers": nodes}[name]
    rest = nodes + pp + lora + tp + act + lp + accum
    return list(dict.fromkeys(order + rest))


def memory_fixes(est: Estimate, recipe: Recipe, mesh: MeshSpec, model: ModelSpec | None) -> list[MemFix]:
    """The fixes to offer for an over-budget estimate. With the model, each is re-run through the
    mesh, placements and estimate stages: kept only if they accept it and the estimate drops,
    best (lowest) first; without it (suggest's many candidates) the ones that apply, unchecked."""
    name = max(est.terms.items(), key=lambda kv: kv[1])[0]
    cands = _fix_candidates(est, recipe, mesh, name)
    if model is None:
        return cands
    from meshbake.compiler.mesh import resolve_mesh
    from meshbake.compiler.placements import resolve_placements
    from meshbake.compiler.pp import resolve_pp

    kept = []
    for f in cands:
        r = _with_sets(recipe, f.sets)
        m = resolve_mesh(r, model)
        # a pp fix must also pass the pipeline's rules (micro-batches >= pp, blocks >= stages, refusals)
        if not isinstance(m, Err) and m.pp_enabled:
            ppr = resolve_pp(r, model, m)
            m = ppr if isinstance(ppr, Err) else m
        pl = m if isinstance(m, Err) else resolve_placements(r, model, m)
        if isinstance(pl, Err):
            continue
        total = estimate(r, model, m, pl).total_bytes
        if total < est.total_bytes:
            kept.append(replace(f, total_bytes=total))
    fits = [f for f in kept if f.total_bytes <= est.budget_bytes]
    return sorted(fits, key=lambda f: f.total_bytes) + [f for f in kept if f not in fits]


def _shard_nodes(est: Estimate, recipe: Recipe, mesh: MeshSpec) -> int | None:
    """How many nodes make the sharded state fit (None: sharding alone cannot, or the recipe's
    nodes already would). params + grads + AdamW shrink as 1/(dp_shard*cp); the other terms do
    not, so FSDP must cover state * fsdp / (budget - other) ranks."""
    fsdp = 1
    # the sharded grads are alive in the forward too from the second micro-step on (_memory)
    held = int(mesh.grad_accum > 1 and not (mesh.fsdp_enabled and recipe.train.grad_sync == "last_micro_step"))
    for phase, live in est.phases:
        # per phase: the sharded state alive then (grads exist from the backward on, and AdamW's
        # temporaries are grads-sized), and the rest, which more FSDP ranks do not shrink; once
        # FSDP shards, its gathered root + last block appear (0 while nothing is sharded)
        st = est.params_bytes + est.optimizer_bytes + {"optimizer step": 2, "embedding backward": 1}.get(
            phase, held) * est.grads_bytes
        other = live - st + (0 if phase == "optimizer step" else est.block_gather_bytes - est.gathered_bytes)
        room = est.budget_bytes - other
        if room <= 0:     # sharding alone cannot help
            return None
        fsdp = max(fsdp, math.ceil(st * mesh.fsdp / room))
    dp_shard = math.ceil(fsdp / mesh.cp)
    nodes = math.ceil(mesh.pp * mesh.dp_replicate * dp_shard * mesh.cp * mesh.tp / recipe.cluster.gpus_per_node)
    return nodes if nodes > recipe.cluster.nodes else None


def memory_hint(est: Estimate, recipe: Recipe, mesh: MeshSpec, model: ModelSpec | None = None) -> str:
    fixes = memory_fixes(est, recipe, mesh, model)
    if not fixes:
        return ("no single setting of this recipe brings the estimate down: use GPUs with more memory "
                "(cluster.gpu_memory_gb), a smaller model or a shorter train.seq_len")
    def one(f: MemFix) -> str:
        gb = f" (estimate {fmt_bytes(f.total_bytes)})" if f.total_bytes else ""
        return f"{f.why}, i.e. {f.args}{gb}"
    return "; or ".join(one(f) for f in fixes[:4])


def check_memory(est: Estimate, recipe: Recipe, mesh: MeshSpec, model: ModelSpec | None = None, *,
                 hint: bool = True) -> Result[Estimate]:
    """hint False (suggest, which shows the message only): the error's hint is left "" instead of
    searching memory_fixes (~1 ms a call; 70B on 64 GPUs drops ~7,500 candidates on memory)."""
    if est.total_bytes <= est.budget_bytes:
        return est
    if est.peak_phase == WEIGHT_LOAD:
        return Err((RecipeError("lora.quantize_base",
                                f"QLoRA's weight load needs {fmt_bytes(est.total_bytes)} per rank, above "
                                f"{fmt_bytes(est.budget_bytes)} ({USABLE:.0%} of the GPU): each rank loads one block "
                                f"(and the embeddings + lm_head) whole in model.dtype before quantizing it to NF4 and "
                                f"sharding it (training itself peaks at {fmt_bytes(sorted(b for _, b in est.phases)[-2])})",
                                "more dp_shard ranks, or quantize_base: none (LoRA, sharded from the start)"),))
    name, big = max(est.terms.items(), key=lambda kv: kv[1])
    # under pp the ranks of the stages differ (embedding / lm_head + logits, micro-batches in flight):
    # say which pp rank is the peak and what the others need, so a pp.split can move blocks off it
    stage = (f" on pp rank {est.pp_peak_rank} (per pp rank: "
             + ", ".join(fmt_bytes(b) for _, _, b in est.pp_rank_rows) + ")") if est.pp_rank_rows else ""
    return Err((RecipeError("cluster.gpu_memory_gb",
                            f"estimated {fmt_bytes(est.total_bytes)} per rank{stage} exceeds {fmt_bytes(est.budget_bytes)} "
                            f"({USABLE:.0%} of the GPU); largest term: {name} {fmt_bytes(big)}",
                            memory_hint(est, recipe, mesh, model) if hint else ""),))


def view(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, est: Estimate) -> dict[str, object]:
    """What PLAN.md prints of this stage, as plain values: each memory term with how it is
    counted, the live bytes per phase, the peak against the budget, traffic and FLOPs."""
    t = recipe.train
    pd = t.mixed_precision.param_dtype
    am = attention_memory(recipe, model, mesh)
    shard = (f"FSDP shards padded to ceil(rows / {mesh.fsdp}) rows (rank 0, the peak rank)" if mesh.fsdp_enabled
             else "no FSDP (one-rank data-parallel mesh)")
    fp32_adapters = " (LoRA adapters float32)" if recipe.lora.rank else ""
    how = {"params": f"{est.params_per_rank:,} params x {recipe.model.dtype}{fp32_adapters}, after TP; {shard}",
           "grads": f"trainable params{fp32_adapters}, sharded like params (from the backward on)",
           "optimizer": f"AdamW exp_avg + exp_avg_sq{fp32_adapters}, sharded",
           "accum_grads": f"unsharded grads held between the {mesh.grad_accum} micro-steps (no reduce-scatter until "
                          "the last)" if est.accum_grads_bytes else "none: no FSDP gradient accumulation without sync",
           "gathered": f"top-level module (embeddings, final norm, lm_head) + last block kept gathered in {pd}"
                       if mesh.fsdp_enabled else "none: no FSDP",
           "activations": (f"pp rank {est.pp_peak_rank}'s blocks x its micro-batches in flight ({recipe.pp.schedule})"
                           if mesh.pp_enabled else f"{model.num_layers} layers") + f", mbs {t.micro_batch_size} x seq {t.seq_len}"
                          f"{' / cp ' + str(mesh.cp) if mesh.cp_enabled else ''}, AC {t.activation_checkpointing}",
           "logits": ("tokens x vocab / tp x 16 B (loss parallel)" if mesh.loss_parallel
                      else "tokens x vocab x 12 B (fp32 log-softmax, its grad in and out)"),
           "attn_mask": _mask_how(recipe, model, mesh, am),
           "pp_buffers": f"the pipeline's receive buffers, allocated once: one per micro-batch ({mesh.grad_accum}) "
                         f"and direction (activations in: not stage 0; their gradients in: not the last stage), "
                         f"mbs x seq{' / cp' if mesh.cp_enabled else ''}"
                         f"{' / tp (sequence parallel)' if mesh.sequence_parallel else ''} x hidden in {pd} each"}
    flops_how = ("6N + 12 x layers x heads x head_dim x seq_len; N = matmul parameters, input embedding excluded"
                 + ("; LoRA: 4 per frozen weight (no weight gradient), 6 per adapter parameter" if recipe.lora.rank else ""))
    return {"memory_rows": [{"name": k, "bytes": v, "how": how[k]} for k, v in est.terms.items()],
            "phase_rows": [{"name": name, "bytes": b, "peak": name == est.peak_phase} for name, b in est.phases],
            "total_bytes": est.total_bytes, "peak_phase": est.peak_phase, "budget_bytes": est.budget_bytes,
            "usable": f"{USABLE:.0%}", "trainable_total": est.trainable_total,
            "fsdp_comm_bytes": est.fsdp_comm_bytes, "tp_comm_bytes": est.tp_comm_bytes,
            "ep_comm_bytes": est.ep_comm_bytes, "experts_per_rank": model.num_experts // mesh.ep,
            "flops_per_token": est.flops_per_token, "flops_how": flops_how,
            "traffic": [{**dataclasses.asdict(c), "wire_bytes": c.wire_bytes} for c in est.traffic],
            "traffic_by_axis": est.traffic_by_axis,
            "time": None if est.time is None else {"tokens_per_rank": est.time.tokens_per_rank,
                                                   "step_s": est.time.step_s, "mfu": est.time.mfu,
                                                   "tokens_per_s_gpu": est.time.tokens_per_s_gpu},
            "step_rows": step_rows(recipe, mesh, est.time) if est.time else (),
            "time_source": time_source(recipe, mesh),
            "attention": {"kernel": am.kernel, "why": am.why}}


def _mask_how(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, am: AttnMemory) -> str:
    """PLAN.md's attn_mask row: how the bytes are counted."""
    if not am.peak:
        return "none: causal rows, sdpa with is_causal (no T^2 tensor)"
    t = recipe.train
    L, ac = model.num_layers, t.activation_checkpointing
    if ac == "none":
        where = f"saved in each of the {L} layers for backward"
    else:
        where = f"AC {ac}: the mask the checkpointed layers were called with, + one layer's copy while recomputed"
    cp = " (CP keeps its bool mask all step)" if am.always else ""
    return f"{am.kernel}: mbs {t.micro_batch_size} x {t.seq_len // mesh.cp} x {t.seq_len} per layer, {where}{cp}"


# derived inputs: the mesh (its axes are checked before, so they are never set aside here; its
# grad_accum comes from the batch sizes) and the placements (tp.plan, tp.sequence_parallel)
@reads("train.seq_len", "train.micro_batch_size", "train.global_batch_size", "train.grad_accum",
       "train.mixed_precision", "train.activation_checkpointing", "train.grad_sync", "train.router_aux_loss_coef",
       "model.dtype", "tp", "data.format",
       "lora.rank", "lora.targets", "lora.quantize_base", "cluster.gpu_memory_gb", "cluster.nodes", "cluster.gpus_per_node",
       # the step-time model (cuda clusters): the hardware facts, the GPU's fitted efficiency
       # (compiler/perf.py by cluster.gpu) and torch.compile's share of the element-wise work
       "cluster.device", "cluster.peak_tflops", "cluster.hbm_gbps", "cluster.intra_node_gbps",
       "cluster.inter_node_gbps", "cluster.nics_per_node", "cluster.measured", "cluster.gpu", "train.compile")
def checked_estimate(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> Result[Estimate]:
    """estimate + check_memory: the memory check reads every field the estimate is computed from."""
    return check_memory(estimate(recipe, model, mesh, pl), recipe, mesh, model)

# ------------------------------------------------------------------------------------ traffic
@dataclass(frozen=True)
class Collective:
    """The collectives of one kind on one mesh axis in one optimizer step, per rank, as the
    runtime issues them (tests/dist/collectives.py logs every one on CPU; tests/test_measured.py
    holds these rows to the byte). bytes: the full buffers summed (an all-gather's output, a
    reduce-scatter's input, an all-reduce's tensor); a ring moves (n-1)/n of that per rank for
    all-gather / reduce-scatter and 2 (n-1)/n for all-reduce (wire_bytes)."""
    axis: str                      # tp | cp | dp_shard (dp_shard_cp when cp > 1) | dp_replicate | world
    #                                | ep | efsdp (mesh.ep: dp_shard x cp x tp = efsdp x ep, ep inner; runtime/ep.py)
    ranks: int                     # group size
    op: str                        # all_gather | reduce_scatter | all_reduce | all_to_all
    what: str
    count: int
    bytes: int

    @property
    def wire_bytes(self) -> int:
        if self.op in ("send", "recv"):           # point to point (pp): every byte crosses once
            return self.bytes
        return self.bytes * (2 if self.op == "all_reduce" else 1) * (self.ranks - 1) // self.ranks    # all_to_all:
        # uniform routing sends (ranks - 1) / ranks of the rows away


@dataclass(frozen=True)
class _Shape:
    """What the traffic needs from the model, its placements and LoRA (cached: see _shape).
    Layers "needing" a gradient: the backward collective of an activation runs only where the
    activation requires grad. Full fine-tuning: every layer. LoRA: the embedding and norms are
    frozen, so layer 0's attention input needs no gradient (nor its q/k/v input all-reduce /
    reduce-scatter), its attention output only if the attention is adapted; but with activation
    checkpointing transformers makes the embedding output require grad (enable_input_require_grads),
    and every layer is as under full fine-tuning again (the embedding weight still gets none)."""
    attn_colwise: int              # colwise Linears of one block's attention (q, k, v: 3; fused qkv: 1)
    mlp_colwise: int
    rowwise: int                   # rowwise Linears of one block (o, down)
    emb_tp: bool                   # embedding vocab-sharded
    emb_trainable: bool
    head_tp: bool                  # lm_head colwise
    n_before: int                  # layers whose attention input needs a gradient
    n_after_attn: int              # ... whose attention output (= MLP input) does
    n_after_mlp: int               # ... whose output does (their backward, and AC recompute, runs)
    k_layers: int                  # layers whose K / V need a gradient (CP's reduce-scatter)
    v_layers: int
    rep: tuple[int, int]           # trainable params replicated over tp (Partial grads): tensors, numel
    tp_tensors: int                # trainable tensors that are TP DTensors (one grad-norm group)
    plain_tensors: int             # trainable tensors that are not (another group)
    # per-block sums over every block (blocks can differ: Qwen3-MoE's mlp_only_layers are dense)
    rowwise_sum: int = 0           # rowwise Linears of all blocks
    mlp_colwise_sum: int = 0       # colwise Linears of all blocks' MLPs
    moe: int = 0                   # MoE blocks (a grouped `experts` module, runtime/fused.py)
    norm_stats: tuple[int, int] = (0, 0)   # colwise_norm modules of all blocks (OLMo-2 q/k norm): count, numel
    # LoRA on experts under tp: the factors replicated over tp (gate_up's A, down's B), whose
    # gradients runtime/lora.py all-reduces in every backward: tensors, numel (E r H each)
    expert_rep: tuple[int, int] = (0, 0)
    expert_tensors: int = 0        # LoRA factors on grouped experts (2 per adapted parameter), all blocks
    # GPT-OSS's experts (layout experts_hf): the down bias (E, H) whole on every tp rank, its gradient
    # summed over tp by _SumGrad in every backward (runtime/fused.py _hf_layout_experts): blocks, numel
    down_bias: tuple[int, int] = (0, 0)
    gated_shared: int = 0          # MoE blocks with a gated shared expert (Qwen2-MoE): _SumGrad of the gate
    has_head: bool = True          # the model holds lm_head (a pp stage without the last: no loss, no logits)


def _is_attn(fqn: str, prefix: str) -> bool:
    """A module of the block's attention (self_attn.*, attention.*), not of its MLP."""
    return "att" in fqn[len(prefix):].partition(".")[0]


def _shape(recipe: Recipe, model: ModelSpec, pl: Placements, tp: int, sp_on: bool) -> _Shape:
    lo = recipe.lora
    roles = model.roles
    # the first block the model holds: block 0, or under pp a stage's first (its stage model's modules)
    bp = roles.block_prefix + "."
    first = next((m.fqn[len(bp):].partition(".")[0] for m in model.modules
                  if m.fqn.startswith(bp) and m.fqn[len(bp):].partition(".")[0].isdigit()), "0")
    pre = f"{bp}{first}."
    block = [m for m in model.modules if m.fqn.startswith(pre)]
    leaf = lambda m: m.fqn.rpartition(".")[2]  # noqa: E731
    adapted = set(pl.lora_targets) if lo.rank else set()
    lin = [m for m in block if m.kind == "linear"]
    attn_ad = any(m.fqn in adapted for m in lin if _is_attn(m.fqn, pre))
    mlp_ad = (any(m.fqn in adapted for m in lin if not _is_attn(m.fqn, pre))
              or any(f.startswith(pre) for f in adapted if is_expert_target(f)))
    L = model.num_layers
    # a pp stage after the first receives its input as a tensor that requires grad (the pipeline's
    # receive buffer, whose gradient goes back to the previous stage): every block's backward runs
    if not lo.rank or recipe.train.activation_checkpointing != "none" or first != "0":
        n_before = n_attn = n_mlp = k_l = v_l = L
    else:
        any_ad = attn_ad or mlp_ad
        later = (L - 1) * any_ad
        n_before, n_attn, n_mlp = later, int(attn_ad) + later, L * any_ad
        ad = {leaf(m) for m in lin if m.fqn in adapted}
        k_l, v_l = (later + bool(ad & {"k_proj", "qkv_proj"}), later + bool(ad & {"v_proj", "qkv_proj"}))
    rep, ex_rep, ex_tensors = [0, 0], [0, 0], 0
    tp_t = plain_t = 0
    for m in model.modules:
        if roles.tied and m.fqn == roles.lm_head:
            continue                                   # the tied lm_head is the embedding's weight
        style = pl.styles[m.fqn] if tp > 1 else "replicate"
        w = _numel(m.shape)
        tensors = 2 if m.numel > w else 1              # weight (+ bias; experts: gate_up + down)
        hf_experts = m.kind == "experts" and model.layouts.get(m.fqn) == "experts_hf"
        if hf_experts:
            tensors = 4                                # + gate_up_proj_bias, down_proj_bias
        ex_ad = [n for n in expert_matrices(m) if f"{m.fqn}.{n}" in adapted] if m.kind == "experts" else []
        if ex_ad and style == "experts":               # A, B per parameter, TP DTensors; one of them replicated
            tp_t += 2 * len(ex_ad)
            ex_rep[0] += len(ex_ad)
            ex_rep[1] += len(ex_ad) * m.shape[0] * lo.rank * m.shape[2]     # E r H: gate_up's A, down's B
        elif ex_ad:
            plain_t += 2 * len(ex_ad)
        ex_tensors += 2 * len(ex_ad)
        if m.fqn in adapted:
            if style.startswith(("colwise", "rowwise")):   # A (colwise) / B (rowwise) replicated
                rep[0] += 1
                rep[1] += lo.rank * (m.shape[1] if style.startswith("colwise") else m.shape[0])
                tp_t += 2
            else:
                plain_t += 2
            continue
        if lo.rank:
            continue                                   # frozen base
        if style == "replicate":
            plain_t += tensors
            continue
        if hf_experts and style == "experts":          # the down bias stays a plain whole tensor
            tp_t, plain_t = tp_t + tensors - 1, plain_t + 1
            continue
        tp_t += tensors
        if style in ("sequence_parallel", "local_heads"):
            rep[0] += tensors                          # norm weight (+ bias) over local tokens / heads
            rep[1] += m.numel
        # a rowwise Linear's bias under SP is not one of them: DTensor adds the Replicate bias to the
        # Partial matmul output (as Partial) before the reduce-scatter, whose backward all-gathers the
        # output gradient, so the bias gradient comes out Replicate, no all-reduce (measured: GPT-OSS's
        # o_proj biases at tp 2, torch 2.13: 5 Partial-gradient all-reduces, its 5 norms, not 7)
    blocks = [m for m in model.modules if roles.in_block(m.fqn)]
    bpre = lambda m: m.fqn[:len(roles.block_prefix) + 1] + m.fqn[len(roles.block_prefix) + 1:].partition(".")[0] + "."  # noqa: E731
    colnorm = [m for m in blocks if pl.styles.get(m.fqn) == "colwise_norm"] if tp > 1 else []
    covered = sum(m.numel for m in model.modules)
    # MoE blocks runtime/fused.py's moe_block_forward runs (layout experts): a shared expert inside
    # runs on its local rows with F.linear (shared_expert_forward), so its colwise / rowwise Linears
    # issue no collectives of their own (the block's input _SumGrad and output reduction cover them)
    fused = [m.fqn.rpartition(".")[0] + "." for m in model.modules
             if m.kind == "experts" and model.layouts.get(m.fqn) == "experts"]
    local = lambda m: any(m.fqn.startswith(b + s) for b in fused for s in ("shared_expert.", "shared_experts."))  # noqa: E731
    hf_ex = [m for m in model.modules if m.kind == "experts" and model.layouts.get(m.fqn) == "experts_hf"]
    # a tied lm_head module counts the table a second time in `covered` (a pp stage without it: not)
    tied_head = sum(m.numel for m in model.modules if roles.tied and m.fqn == roles.lm_head)
    if not lo.rank and model.num_params - covered + tied_head > 0:
        plain_t += 1                                   # parameters of no Linear/Embedding/norm
    emb = [m for m in model.modules if m.fqn == roles.embedding]
    head = [m for m in model.modules if m.fqn == roles.lm_head]
    style_of = lambda ms: pl.styles[ms[0].fqn] if ms and tp > 1 else "replicate"  # noqa: E731
    return _Shape(
        attn_colwise=sum(1 for m in lin if _is_attn(m.fqn, pre) and pl.styles[m.fqn].startswith("colwise")),
        mlp_colwise=sum(1 for m in lin if not _is_attn(m.fqn, pre) and pl.styles[m.fqn].startswith("colwise")),
        rowwise=sum(1 for m in lin if pl.styles[m.fqn] == "rowwise"),
        emb_tp=style_of(emb) == "rowwise", emb_trainable=not lo.rank, head_tp=style_of(head).startswith("colwise"),
        has_head=bool(head),
        n_before=n_before, n_after_attn=n_attn, n_after_mlp=n_mlp, k_layers=k_l, v_layers=v_l,
        rep=(rep[0], rep[1]), tp_tensors=tp_t if tp > 1 else 0, plain_tensors=plain_t + (0 if tp > 1 else tp_t),
        rowwise_sum=sum(1 for m in blocks if m.kind == "linear" and pl.styles[m.fqn] == "rowwise" and not local(m)),
        mlp_colwise_sum=sum(1 for m in blocks if m.kind == "linear" and not _is_attn(m.fqn, bpre(m))
                            and pl.styles[m.fqn].startswith("colwise") and not local(m)),
        moe=sum(1 for m in model.modules if m.kind == "experts"),
        norm_stats=(len(colnorm), sum(m.numel for m in colnorm)), expert_rep=(ex_rep[0], ex_rep[1]),
        expert_tensors=ex_tensors,
        down_bias=(len(hf_ex), sum(m.shape[0] * m.shape[2] for m in hf_ex)) if tp > 1 and not lo.rank else (0, 0),
        gated_shared=sum(1 for b in fused for m in model.modules if m.fqn == b + "shared_expert_gate"))


_SHAPES: dict = {}


def _shape_cached(recipe: Recipe, model: ModelSpec, pl: Placements, tp: int, sp_on: bool) -> _Shape:
    key = (id(model), recipe.lora, recipe.tp.sequence_parallel, recipe.train.activation_checkpointing, pl_key(pl), tp)
    return cached(_SHAPES, key, (model,), lambda: _shape(recipe, model, pl, tp, sp_on))


_FSDP_SUMS: dict = {}


def _fsdp_sums(params: list[RankParam], f: int, layers: int) -> tuple[int, ...]:
    """FSDP2's padded numels (ceil(rows / f) x f rows): (root, blocks, last block, trainable),
    the trainable shard (ceil(rows / f) rows), and the groups with trainable params. Memoized
    per (params list, f): `suggest` asks for a few f per cached params list, thousands of times."""
    return cached(_FSDP_SUMS, (id(params), f, layers), (params,), lambda: _fsdp_sums_of(params, f, layers), size=1024)


def _fsdp_sums_of(params: list[RankParam], f: int, layers: int) -> tuple[int, ...]:
    padded = [(-(-p.rows // f) * f * p.rest, p) for p in params]
    train = [(n, p) for n, p in padded if p.trainable]
    return (sum(n for n, p in padded if p.where == "root"), sum(n for n, p in padded if p.where != "root"),
            sum(n for n, p in padded if p.where == "last"), sum(n for n, _ in train),
            sum(-(-p.rows // f) * p.rest for _, p in train),
            any(p.where == "root" for _, p in train) + layers * any(p.where != "root" for _, p in train))


def traffic(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements,
            params: list[RankParam], norm_skip_head: bool = False) -> tuple[Collective, ...]:
    """Every collective of one optimizer step, per rank, grouped by axis and purpose. Rules
    (measured on CPU, gloo, world 4; a = tokens x hidden x param bytes, tokens = mbs x seq / cp):
      FSDP2 (dp_shard x cp; groups: root = embedding + final norm + lm_head, one per block)
        all-gather in param_dtype, padded rows: per micro-step root + every block in forward,
        every block but the last again in backward (the root and the last block stay gathered);
        AC recompute gathers nothing (FSDP2 skips its pre-forward during backward)
        reduce-scatter in reduce_dtype, trainable params only, per group with any, per synced
        micro-step (every one, or the last with grad_sync last_micro_step)
        under pp (model = one pp rank's stage model, _pp_model) FSDP2 runs reshard_after_forward
        False (runtime/pp.py): the root (if the stage has root params) and each block gathered
        once a step, whatever the micro-batches
      HSDP  all-reduce of each reduce-scattered shard across dp_replicate (of the whole gradient
        when dp_shard x cp is 1: FSDP2 then issues no all-gather / reduce-scatter at all)
      TP, per micro-step. Sequence parallel: forward: the embedding's reduce-scatter, per layer
        an all-gather into attention and MLP and a reduce-scatter out of each rowwise Linear,
        lm_head's input all-gather; backward the transposes where a gradient is needed; AC
        recomputes each layer's forward up to its last saved tensor: +2 all-gathers and +1
        reduce-scatter (the down_proj output is never recomputed). Without SP: an all-reduce
        after the embedding and each rowwise Linear; in backward one per colwise Linear's input
        and lm_head's; AC +1 per layer. Logits all-gathered (tokens x vocab) without loss
        parallel; loss parallel: 3 all-reduces of tokens x fp32 (max, sum of exp, target logit)
      TP, replicated params (SP norms, LoRA's A of colwise / B of rowwise targets): their Partial
        gradients all-reduced, in param_dtype, when FSDP2 reduces (per synced micro-step); without
        FSDP once per step (runtime/parallel.reduce_partial_grads)
      CP (all-gather form, runtime/cp.py): K and V all-gathered per layer (their local kv heads,
        the whole sequence), reduce-scattered in backward; AC +2 all-gathers per layer
      TP, MoE blocks (style experts, runtime/fused.py; blocks may differ: Qwen3-MoE's mlp_only_layers
        are dense, so the Linear counts are summed over every block): the router runs replicated, each
        expert on its slice of the intermediate dim; the output's partial sums are all-reduced
        (reduce-scattered under SP: the block input's backward reduce-scatter is gone instead), and in
        backward the block input's gradient (a) and the routing weights' (tokens x k, fp32 for Mixtral,
        param_dtype for Qwen3-MoE) are all-reduced (_SumGrad); Qwen2-MoE's shared-expert gate (tokens x
        1) too, its shared expert's Linears run on local rows (no collectives of their own); GPT-OSS's
        experts' down bias (E x H, whole, added once) has its gradient all-reduced, its other expert
        tensors are TP DTensors, the down bias a plain one (grad-norm groups)
      TP, colwise_norm (OLMo-2 q/k norm over the whole projection): per norm and layer a forward
        all-reduce of the fp32 mean of squares (tokens x 4 B) and a backward reduce-scatter of its
        input gradient (tokens x the norm's dim)
      EP (mesh.ep, runtime/ep.py; ep carved from dp_shard x cp x tp) per MoE layer and micro-step
        over ep: the per-expert counts (E int64) and four all-to-alls of token rows x hidden x param bytes, the dispatch and
        the combine forward, their reverse backward. The dispatch forward and the combine backward
        send this rank's tokens x k rows (exact; under tp its 1/tp share of the tp group's tokens,
        and the block's tp collectives are the experts-over-tp rows above); the combine forward and the dispatch backward send
        back the rows this rank received, which routing decides: the rows give the ep group's mean
        (every row one rank receives another sent), exact summed over the group. The experts are
        FSDP'd on their own mesh over efsdp = dp_shard x cp x tp / ep (Shard(1), padded on dim 1): all-gathered
        per MoE layer forward and again in backward (the last too), reduce-scattered per synced
        micro-step, all-reduced across dp_replicate (whole when efsdp is 1); their blocks' groups
        over dp_shard exclude them; their grad norms are a mesh group of their own (efsdp, ep)
      router aux loss (train.router_aux_loss_coef > 0): per micro-step a world all-reduce of the top-k
        counts, probabilities and rows (2E + 1 float64); the step's stats all-reduce carries it (+8 B)
      clipping: one all-reduce per parameter mesh group and sharded axis of the per-tensor norms
        (model dtype); the step's [loss sum, stop] all-reduce over the world (2 x float64).
    Not modelled: the dtypes under autocast (TP without FSDP, param_dtype != model.dtype: counted in
    param_dtype); measured in fp32 only: the MoE and colwise_norm rows (their bf16 dtypes follow the
    code: the fp32 norm statistics and Mixtral's fp32 routing weights); AC recompute of MoE blocks and
    colwise_norm, LoRA on MoE / OLMo-2 models (the dense rules are applied) and MoE x CP without ep
    (no measurement; ep x cp is: tests/test_measured.py); colwise_norm without sequence parallel (same rule, not measured)."""
    t, mp = recipe.train, recipe.train.mixed_precision
    tp, cp, f, r, ga = mesh.tp, mesh.cp, mesh.fsdp, mesh.dp_replicate, mesh.grad_accum
    pb, rb, mb = DTYPE_BYTES[mp.param_dtype], DTYPE_BYTES[mp.reduce_dtype], DTYPE_BYTES[recipe.model.dtype]
    fsdp = r * f > 1
    syncs = ga if t.grad_sync == "every_micro_step" or not fsdp else 1
    sh = _shape_cached(recipe, model, pl, tp, mesh.sequence_parallel)
    L, tokens = model.num_layers, tokens_per_rank(t, mesh)
    out: list[Collective] = []

    def add(axis: str, n: int, op: str, what: str, count: int, nbytes: int) -> None:
        if n > 1 and count > 0:
            out.append(Collective(axis, n, op, what, count, nbytes))

    fax = "dp_shard_cp" if cp > 1 else "dp_shard"
    ep, coef = mesh.ep, router_aux_coef(recipe, model)
    if fsdp:
        # under ep the experts are FSDP-sharded on their own mesh (below), not in their block's group
        root, blocks, last, train, shard, groups = _fsdp_sums(params if ep == 1 else [p for p in params if p.ep == 1], f, L)
        pp = mesh.pp_enabled
        # under pp every block is "last" (kept gathered): root + blocks once a step (ga_gather 1)
        gathered, ga_gather = ((root + blocks) * pb, 1) if pp else ((root + 2 * blocks - last) * pb, ga)
        if f > 1:       # QLoRA: NF4 weights travel as their packed storage (torchao's all-gather hooks)
            for p in params:
                if p.nf4:
                    n, times = p.rows * p.rest, 1 if pp else 2 - (p.where == "last")
                    gathered -= times * (n * pb - f * nf4_bytes(n // f, nf4_scaler_block(p.rows, n, f) or 1, mb, False))
        add(fax, f, "all_gather", "params: root + every block once a step (pp: kept gathered)" if pp else
            "params: top-level module + every block forward, all but the last block again in backward",
            ga_gather * ((root > 0) + L + (0 if pp else L - 1)), ga_gather * gathered)
        add(fax, f, "reduce_scatter", f"gradients, {syncs} synced micro-step(s)", syncs * groups,
            syncs * train * rb)
        add("dp_replicate", r, "all_reduce", "gradient shards across replicas (HSDP)", syncs * groups,
            syncs * shard * rb)
    if ep > 1:
        _ep_rows(add, recipe, model, mesh, syncs, tokens, set(pl.lora_targets) if recipe.lora.rank else set())
    if tp > 1:
        a, sp = tokens * model.hidden_size * pb, recipe.tp.sequence_parallel
        ac = (t.activation_checkpointing != "none") * sh.n_after_mlp
        head_in = sh.head_tp * (sh.n_after_mlp > 0 or not L)
        mlp_bwd = sh.mlp_colwise_sum if sh.n_after_attn == L else sh.mlp_colwise * sh.n_after_attn
        if sp:
            ag = sh.emb_tp * sh.emb_trainable + L * 2 + sh.head_tp + sh.n_after_attn + sh.n_after_mlp + 2 * ac
            # a MoE block reduce-scatters its output (+1) and its input's gradient is all-reduced
            # instead (-1, below): n_after_attn counts both
            rs = sh.emb_tp + sh.rowwise_sum + sh.n_before + sh.n_after_attn + head_in + ac
            add("tp", tp, "all_gather", "activations (sequence parallel), forward + backward"
                + (" + AC recompute" if ac else ""), ga * ag, ga * ag * a)
            add("tp", tp, "reduce_scatter", "activations (sequence parallel), forward + backward"
                + (" + AC recompute" if ac else ""), ga * rs, ga * rs * a)
        else:
            ar = sh.emb_tp + sh.rowwise_sum + sh.moe + sh.attn_colwise * sh.n_before + mlp_bwd \
                + head_in + ac * max(0, sh.rowwise - 1)
            add("tp", tp, "all_reduce", "activations, forward + backward" + (" + AC recompute" if ac else ""),
                ga * ar, ga * ar * a)
        if sh.moe:          # runtime/fused.py moe_block_forward: router replicated, _SumGrad backward
            wb = 4 if model.model_type in ROUTER_FP32 else pb
            add("tp", tp, "all_reduce", "MoE: gradient of the block input (router + experts), backward",
                ga * sh.moe, ga * sh.moe * a)
            add("tp", tp, "all_reduce", "MoE: gradient of the routing weights, backward", ga * sh.moe,
                ga * sh.moe * tokens * model.experts_per_token * wb)
            # Qwen2-MoE: sigmoid(shared_expert_gate(x)) (tokens x 1) scales each rank's partial sum
            add("tp", tp, "all_reduce", "MoE: gradient of the shared expert's gate, backward", ga * sh.gated_shared,
                ga * sh.gated_shared * tokens * pb)
            # GPT-OSS: the experts' down bias (E x H), whole on every rank, added once
            add("tp", tp, "all_reduce", "MoE: gradient of the experts' down bias, backward", ga * sh.down_bias[0],
                ga * sh.down_bias[1] * pb)
        if sh.norm_stats[0]:  # colwise_norm (runtime/parallel._sharded_norm): the norm over a sharded dim
            n_norm, numel = sh.norm_stats
            add("tp", tp, "all_reduce", "colwise_norm statistics (fp32 mean of squares), forward",
                ga * n_norm, ga * n_norm * tokens * 4)
            add("tp", tp, "reduce_scatter", "colwise_norm input gradients, backward", ga * n_norm,
                ga * tokens * numel * pb)
        if sh.head_tp and not recipe.tp.loss_parallel:
            add("tp", tp, "all_gather", "logits (no loss parallel)", ga, ga * tokens * model.vocab_size * pb)
        if recipe.tp.loss_parallel and (sh.has_head or not mesh.pp_enabled):      # under pp: the last stage only
            add("tp", tp, "all_reduce", "loss parallel: max, sum of exp, target logit", 3 * ga, 3 * ga * tokens * 4)
        add("tp", tp, "all_reduce", "Partial grads of replicated params (norms, LoRA A/B)",
            syncs * sh.rep[0] if fsdp else sh.rep[0], syncs * sh.rep[1] * pb if fsdp else sh.rep[1] * mb)
        if sh.expert_rep[0]:        # runtime/lora.py expert_factors: the MoE loop runs on local tensors
            add("tp", tp, "all_reduce", "LoRA on experts: grads of the tp-replicated factors, every backward",
                ga * sh.expert_rep[0], ga * sh.expert_rep[1] * pb)
    if cp > 1:
        kv = t.micro_batch_size * t.seq_len * model.num_kv_heads * model.head_dim // tp * pb
        ac = 2 * (t.activation_checkpointing != "none") * sh.n_after_mlp
        add("cp", cp, "all_gather", "K, V per layer" + (" + AC recompute" if ac else ""), ga * (2 * L + ac),
            ga * (2 * L + ac) * kv)
        add("cp", cp, "reduce_scatter", "K, V gradients", ga * (sh.k_layers + sh.v_layers),
            ga * (sh.k_layers + sh.v_layers) * kv)
    # gradient clipping: the per-tensor norms of each mesh group, reduced over its sharded axes
    # (under ep the experts' tensors are a group of their own: see _ep_rows)
    # a norm has its gradients' dtype: the master dtype, or float32 for LoRA's adapters whatever
    # model.dtype (measured: model.dtype bfloat16 + LoRA reduced 64 B over dp_shard, not 32)
    nb = DTYPE_BYTES["float32"] if recipe.lora.rank else mb
    # the experts' own grad-norm group under ep (_ep_rows): their weights, or their LoRA factors
    ex_t = (2 * sh.moe if not recipe.lora.rank else sh.expert_tensors) if ep > 1 else 0
    tp_t, plain_t = sh.tp_tensors, sh.plain_tensors - ex_t
    if norm_skip_head and sh.has_head and not recipe.lora.rank:
        # pp, tied: the last stage's copy of the table is not in its grad norm (runtime/pp.py norm_skip)
        if sh.head_tp:
            tp_t -= 1
        else:
            plain_t -= 1
    for n_t in (tp_t, plain_t):
        if n_t:
            add(fax, f if fsdp else 1, "all_reduce", "grad-norm partials", 1, n_t * nb)
    add("tp", tp, "all_reduce", "grad-norm partials", 1 if tp_t else 0, tp_t * nb)
    if coef > 0:            # runtime/fused.router_aux_loss: top-k counts, probabilities, rows (float64)
        add("world", mesh.world, "all_reduce", "router aux loss: expert counts + probabilities", ga,
            ga * (2 * model.num_experts + 1) * 8)
    add("world", mesh.world, "all_reduce", "loss sum + stop flag" + (" + aux loss" if coef > 0 else ""), 1,
        24 if coef > 0 else 16)
    return _merge(out)


# routers whose routing weights stay fp32 whatever the compute dtype (transformers' MixtralTopKRouter);
# Qwen3-MoE's cast them back to the logits' dtype
ROUTER_FP32 = frozenset({"mixtral"})


def _ep_rows(add, recipe: Recipe, model: ModelSpec, mesh: MeshSpec, syncs: int, tokens: int,
             adapted: set[str] = frozenset()) -> None:
    """mesh.ep (runtime/ep.py): per MoE layer and micro-step, the per-expert counts
    (E int64) and four all-to-alls of token rows x hidden (dispatch, combine; their backward
    the reverse), of this rank's tokens (micro_batch_size x seq_len / cp), / tp rows each under
    tp. The experts' FSDP runs over efsdp = dp_shard x cp x tp / ep (x dp_replicate). LoRA on
    the experts: their adapters are in the same FSDP unit (gathered with the experts), and
    only they have gradients there."""
    mp = recipe.train.mixed_precision
    pb, rb, mb = DTYPE_BYTES[mp.param_dtype], DTYPE_BYTES[mp.reduce_dtype], DTYPE_BYTES[recipe.model.dtype]
    ep, fe, r, ga = mesh.ep, mesh.fsdp * mesh.tp // mesh.ep, mesh.dp_replicate, mesh.grad_accum
    ex = [m for m in model.modules if m.kind == "experts"]
    k, h, n = model.experts_per_token, model.hidden_size, len(ex)
    # under tp each tp rank dispatches its 1/tp of the block's tokens (rows [r N/tp, (r+1) N/tp)):
    # the group's mean, exact when tp divides them (always under sequence parallel)
    tokens = tokens // mesh.tp
    add("ep", ep, "all_to_all", "MoE: tokens per expert (int64), forward", ga * n, ga * n * model.num_experts * 8)
    add("ep", ep, "all_to_all", "MoE: token rows dispatched + combined, forward + backward "
        "(bytes: the ep group's mean, see the rules)", 4 * ga * n, 4 * ga * n * tokens * k * h * pb)
    full = shard = 0
    for m in ex:                      # gate_up (E/ep, 2I, H), down (E/ep, H, I): Shard(1) over efsdp
        e, two_i = m.shape[0] // ep, m.shape[1]
        i = two_i // 2
        full += e * (-(-two_i // fe) * fe * h + -(-h // fe) * fe * i)
        shard += e * (-(-two_i // fe) * h + -(-h // fe) * i)
    a_full = a_shard = a_tensors = 0  # LoRA factors A (E/ep, r, in), B (E/ep, out, r): Shard(1) too
    rk = recipe.lora.rank
    for m in ex:
        for name, (e, o, i) in expert_matrices(m).items():
            if f"{m.fqn}.{name}" in adapted:
                a_full += e // ep * (-(-rk // fe) * fe * i + -(-o // fe) * fe * rk)
                a_shard += e // ep * (-(-rk // fe) * i + -(-o // fe) * rk)
                a_tensors += 2
    trainable = not rk
    g_full, g_shard = (full, shard) if trainable else (a_full, a_shard)      # what has gradients
    g_units = n if trainable or a_tensors else 0
    add("efsdp", fe, "all_gather", "experts: every MoE layer forward and again in backward", 2 * ga * n,
        2 * ga * (full + a_full) * pb)
    add("efsdp", fe, "reduce_scatter", f"experts' gradients, {syncs} synced micro-step(s)", syncs * g_units,
        syncs * g_full * rb)
    add("dp_replicate", r, "all_reduce", "experts' gradient shards across replicas (HSDP)", syncs * g_units,
        syncs * g_shard * rb)
    g_tensors = 2 * n if trainable else a_tensors
    if g_tensors:                     # the experts' own mesh group: Partial over efsdp and ep
        add("efsdp", fe, "all_reduce", "grad-norm partials (experts)", 1, g_tensors * mb)
        add("ep", ep, "all_reduce", "grad-norm partials (experts)", 1, g_tensors * mb)


def _merge(rows: list[Collective]) -> tuple[Collective, ...]:
    """One row per (axis, op, what), in a fixed axis order."""
    order = {a: i for i, a in enumerate(("dp_replicate", "dp_shard", "dp_shard_cp", "efsdp", "ep", "cp", "tp",
                                          "world"))}
    merged: dict[tuple[str, str, str], Collective] = {}
    for c in rows:
        k = (c.axis, c.op, c.what)
        m = merged.get(k)
        merged[k] = c if m is None else Collective(c.axis, c.ranks, c.op, c.what, m.count + c.count,
                                                    m.bytes + c.bytes)
    return tuple(sorted(merged.values(), key=lambda c: order[c.axis]))


# ---------------------------------------------------------------------------------- step time
# the fraction of peak a step's FLOPs run at, non-matmul kernels and launch gaps included: fitted
# to torchtitan's eager bf16 Llama 3.1 8B on 8 H100 (5,762 tok/s/GPU, FSDP 8, selective AC;
# docs/PERFORMANCE.md), where this model's communication is all but hidden
MFU_CEILING = 0.35
FSDP_OVERLAP = 0.8           # share of FSDP / HSDP traffic prefetch and async reduce hide behind compute
SELECTIVE_RECOMPUTE = 0.02   # selective AC: element-wise recompute, ~2% of the step's FLOPs
MEMORY_PASSES = 3            # calibrated profiles: saved activations + logits written, read, gradient written
ADAMW_PASSES = 12            # HBM passes over the trainable shard: clip (norm read, scale r+w), AdamW
                             # foreach (param, grad, exp_avg, exp_avg_sq read; param, both states written;
                             # its sqrt temporary written and read)
AXIS_INNER = {"tp": ("tp",), "cp": ("cp", "tp"), "dp_shard": ("dp_shard", "cp", "tp"),
              "dp_shard_cp": ("dp_shard", "cp", "tp"), "dp_replicate": ("dp_replicate", "dp_shard", "cp", "tp"),
              "world": ("dp_replicate", "dp_shard", "cp", "tp"), "ep": ("ep",), "efsdp": ("dp_shard", "cp", "tp"),
              "pp": PP_DIMS}      # a pp hop goes from one stage group (world / pp ranks) to the next


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step per rank (see step_time for the model)."""
    compute_s: float
    recompute_s: float
    tp_s: float              # TP collectives: all exposed
    fsdp_s: float            # exposed share of the dp_shard (x cp) traffic
    hsdp_s: float            # exposed share of the all-reduce across dp_replicate
    cp_s: float              # CP's K/V all-gathers and reduce-scatters: all exposed
    tokens_per_rank: float
    optimizer_s: float = 0.0
    mfu: float = 0.0         # useful FLOPs (recompute excluded) / (step x peak)
    ep_s: float = 0.0        # mesh.ep's token all-to-alls (and their counts): all exposed
    pp_s: float = 0.0        # mesh.pp: the sends of the pipeline's fill and drain (the rest overlap)
    bubble_s: float = 0.0    # mesh.pp: idle stage time, bubble / (1 - bubble) x the compute
    memory_s: float = 0.0    # calibrated profiles: the element-wise traffic at the measured copy bandwidth
    attention_s: float = 0.0  # datasheet model: the attention kernels (compiler/perf.py)
    attn_kernel: str = ""    # datasheet model: flash | masked | eager (perf.kernel_of)

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.recompute_s + self.tp_s + self.fsdp_s + self.hsdp_s + self.cp_s
                + self.ep_s + self.optimizer_s + self.pp_s + self.bubble_s + self.memory_s + self.attention_s)

    @property
    def tokens_per_s_gpu(self) -> float:
        return self.tokens_per_rank / self.step_s


def _group(recipe: Recipe, mesh: MeshSpec, axis: str, size: int | None = None) -> perf.Group:
    """The group along `axis` (`size` ranks: a traffic row's own count): its ranks are the inner
    axes' span / size apart (consecutive ranks fill a node first), so it has gpus_per_node /
    stride members in each node it spans; a pp hop goes from one stage group (world / pp ranks,
    the span) to the next."""
    span = math.prod(getattr(mesh, a) for a in AXIS_INNER[axis])
    if size is None:
        size = {"dp_shard_cp": mesh.dp_shard * mesh.cp, "efsdp": max(1, mesh.dp_shard * mesh.cp * mesh.tp // mesh.ep),
                "world": mesh.world, "pp": mesh.pp}.get(axis) or getattr(mesh, axis)
    stride = span if axis == "pp" else max(1, span // max(size, 1))
    return perf.group_of(size, stride, recipe.cluster.gpus_per_node)


def axis_gbps(recipe: Recipe, mesh: MeshSpec, axis: str) -> tuple[float, str]:
    """(bus GB/s per rank, "intra" | "inter") of a group along `axis` (perf.bus_gbps: NVLink in a
    node; across nodes the NICs of the rails its members sit on)."""
    g = _group(recipe, mesh, axis)
    return _bus(recipe, g), "intra" if g.nodes <= 1 else "inter"


def _bus(recipe: Recipe, g: perf.Group) -> float:
    c = recipe.cluster
    return perf.bus_gbps(g, perf.gpu_of(c.gpu, c.peak_tflops), c.intra_node_gbps, c.inter_node_gbps,
                         c.nics_per_node, c.gpus_per_node)


def comm_seconds(recipe: Recipe, mesh: MeshSpec, rows: tuple[Collective, ...], axes: tuple[str, ...]) -> float:
    """Time of the rows on these axes: wire bytes / the group's bus bandwidth + a latency per call
    (perf.latency_s: ring hops in a node, NCCL's tree for all-reduce across nodes)."""
    s = 0.0
    for c in rows:
        if c.axis in axes:
            g = _group(recipe, mesh, c.axis, c.ranks)
            gbps = _bus(recipe, g)
            s += c.wire_bytes / (gbps * 1e9) + c.count * perf.latency_s(c.op, g)
    return s


def step_time(recipe: Recipe, mesh: MeshSpec, est: Estimate, gemms=None, work: perf.Work | None = None,
              model: ModelSpec | None = None) -> StepTime:
    """Per rank per optimizer step. A calibrated profile (cluster.measured.ranks > 0, `meshbake
    calibrate`) uses _measured_step (GEMM time at the step's shapes, measured collectives,
    oversubscription, per-op dispatch counted from `model`'s blocks); every other cuda plan the
    datasheet model of compiler/perf.py
    (datasheet_step): matmuls by shape, attention by kernel and sequence length, element-wise
    traffic at the HBM bandwidth, recompute by AC mode, collectives by their group's topology.
    Without `work` (a caller that has no model at hand) the one-constant form of the first model
    stands in: FLOPs / (peak x MFU_CEILING).
      TP, CP, EP exposed: every one sits between two dependent ops (no async TP; CP gathers K/V
                 right before the attention that reads them; runtime/ep.py dispatches, computes and
                 combines in order). AC's recompute collectives are in the rows already
      FSDP, HSDP prefetched / reduced while the compute goes on (perf.fsdp_exposed)
      optimizer  memory-bound: ADAMW_PASSES x the trainable shard over hbm_gbps
    MFU = flops_per_token x tokens/s per GPU / peak (the recompute is not useful work)."""
    if calibrated(recipe, mesh) and gemms is not None:
        return _measured_step(recipe, mesh, est, gemms, model)
    return datasheet_step(recipe, mesh, est, work)


def datasheet_step(recipe: Recipe, mesh: MeshSpec, est: Estimate, work: perf.Work | None,
                   cs: perf.Consts = perf.DEFAULT) -> StepTime:
    """step_time from the cluster's datasheet facts and compiler/perf.py's fitted constants."""
    c, t = recipe.cluster, recipe.train
    gpu = perf.gpu_of(c.gpu, c.peak_tflops)
    tokens = t.global_batch_size * t.seq_len / mesh.world
    if work is not None:
        cp_ = perf.compute_seconds(work, gpu, c.peak_tflops, c.hbm_gbps, cs)
        compute, attention, memory, recompute = cp_.matmul_s, cp_.attention_s, cp_.elementwise_s, cp_.recompute_s
        blocks = work.blocks
    else:
        compute = est.flops_per_token * tokens / (c.peak_tflops * 1e12 * MFU_CEILING)
        attention = memory = 0.0
        ac = t.activation_checkpointing
        recompute = compute / 3 if ac == "full" else compute * SELECTIVE_RECOMPUTE if ac == "selective" else 0.0
        blocks = 1
    busy = compute + attention + memory + recompute
    rows = est.traffic
    shard = comm_seconds(recipe, mesh, rows, ("dp_shard", "dp_shard_cp", "efsdp"))
    rep = comm_seconds(recipe, mesh, rows, ("dp_replicate",))
    dp = shard + rep
    exposed = perf.fsdp_exposed(dp, busy, blocks)
    st = StepTime(compute_s=compute, recompute_s=recompute, tp_s=comm_seconds(recipe, mesh, rows, ("tp",)),
                  fsdp_s=exposed * shard / dp if dp else 0.0, hsdp_s=exposed * rep / dp if dp else 0.0,
                  cp_s=comm_seconds(recipe, mesh, rows, ("cp",)), ep_s=comm_seconds(recipe, mesh, rows, ("ep",)),
                  tokens_per_rank=tokens, attention_s=attention, memory_s=memory,
                  attn_kernel=work.kernel if work is not None else "",
                  optimizer_s=ADAMW_PASSES * est.grads_bytes / (c.hbm_gbps * 1e9))
    if mesh.pp_enabled:
        # the bubble (pp - 1) / (m v + pp - 1) of the pipelined time: 1F1B / GPipe v = 1; looped
        # schedules shrink it by their v stages per rank (Narayanan et al. 2021); the hops of the
        # fill and the drain (2 (stages - 1) hidden-state sends) are on the critical path
        v, m = recipe.pp.stages_per_rank, mesh.grad_accum
        bubble = (mesh.pp - 1) / (m * v + mesh.pp - 1)
        hops = [x for x in rows if x.axis == "pp" and x.op == "send"]
        hop = hops[0].bytes / hops[0].count if hops else 0.0
        g = _group(recipe, mesh, "pp")
        gbps = _bus(recipe, g)
        # tied embeddings: the pair's all-reduce of the table's gradient after the last backward,
        # before clipping (exposed: nothing overlaps it)
        # (the pair: pp ranks 0 and pp - 1, (pp - 1) x world / pp ranks apart)
        pair = perf.group_of(2, (mesh.pp - 1) * (mesh.world // mesh.pp), c.gpus_per_node)
        tied = sum(x.wire_bytes / (_bus(recipe, pair) * 1e9) + perf.latency_s("all_reduce", pair)
                   for x in rows if x.axis == "pp" and x.op == "all_reduce")
        st = replace(st, bubble_s=busy * bubble / (1 - bubble),
                     pp_s=2 * (mesh.pp * v - 1) * (hop / (gbps * 1e9) + perf.latency_s("send", g)) + tied)
    return replace(st, mfu=est.flops_per_token * st.tokens_per_s_gpu / (c.peak_tflops * 1e12))


def timed(recipe: Recipe) -> bool:
    """The step-time model runs on cuda clusters (datasheet or measured facts) and on any
    cluster a `meshbake calibrate` profile measured (cluster.measured.ranks > 0: the cpu one)."""
    return recipe.cluster.device == "cuda" or recipe.cluster.measured.ranks > 0


def gemm_shapes(recipe: Recipe, mesh: MeshSpec, params: list[RankParam]) -> tuple[tuple[int, int, int, int], ...]:
    """The matmuls of one micro-batch on one rank, (m, n, k, passes): every 2-D weight but the
    input embedding (a lookup) as x(m, in) @ W^T(in, out) after TP (RankParam rows = out, rest =
    in), m = the micro-batch's tokens (mbs x seq / cp; SP gathers the sequence before the
    matmul); passes 3 (forward, input gradient, weight gradient) for a trained weight, 2 frozen.
    A grouped experts weight (RankParam.routed = top-k, rows = the rank's experts, rest = one
    expert's n x k) runs on the token copies routed to it, not on all m tokens: the rank's copies
    are m k (experts over tp: every tp rank runs every copy on its I / tp slice) or m k / tp (under
    ep each tp rank dispatches 1/tp of the tokens and receives, on average, as many copies as it
    sends), spread over its `rows` experts; one (m_e, n, k x rows) GEMM stands for the rows
    per-expert GEMMs (same FLOPs; n x k split as a square for the efficiency curve, O(1) tuples
    for suggest)."""
    t = recipe.train
    m = t.micro_batch_size * t.seq_len // mesh.cp
    return cached(_GEMMS, (id(params), m), (params,), lambda: _gemm_shapes(params, m), size=1024)


# suggest times thousands of candidates over a few hundred cached params lists; the shapes depend on
# the list and the micro-batch's tokens only (~0.5 ms a walk for 80 layers)
_GEMMS: dict = {}


def _gemm_shapes(params: list[RankParam], m: int) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for p in params:
        if p.embedding or p.rows <= 1 or p.rest <= 1 or p.routed < 0:
            continue
        passes = 3 if p.trainable else 2
        if p.routed:
            copies = m * p.routed / (p.tp if p.ep > 1 else 1)
            n = max(1, math.isqrt(p.rest))
            out.append((max(1, round(copies / p.rows)), n, p.rest // n * p.rows, passes))
        else:
            out.append((m, p.rows, p.rest, passes))
    return tuple(out)


def _gflops_at(measured, m: int, n: int, k: int) -> float:
    """Measured GEMM GFLOP/s at the nearest measured shape (log distance over m, n, k): CPU and
    GPU throughput depends on the shape, not only on the FLOPs (a 512 x 4096 x 64 fp32 matmul ran
    at a tenth of a 512 x 256 x 64 one here), so the shapes calibrate measures are the step's."""
    def dist(r) -> float:
        return sum(abs(math.log(a / b)) for a, b in zip(r[:3], (m, n, k)))
    return min(measured.gemm_gflops, key=dist)[3]


def _coll_fit(points, op: str, ranks: int) -> tuple[float, float]:
    """(latency s, bus GB/s) of one measured collective: the least-squares line t = latency +
    wire bytes / bus bandwidth through its [bytes, seconds] points (ring wire bytes: (n - 1) / n
    of the buffer, twice for all_reduce); every point counts, so one noisy size on a shared
    machine moves the fit less than a two-point one. A non-positive slope or intercept (noise)
    falls back to the largest message's bandwidth and the smallest one's time."""
    f = (2 if op == "all_reduce" else 1) * (ranks - 1) / ranks
    xs, ts = [b * f for b, _ in points], [t for _, t in points]
    n, mx, mt = len(xs), sum(xs) / len(xs), sum(ts) / len(ts)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / var if n > 1 and var else 0.0
    lat = mt - slope * mx
    if slope <= 0 or lat <= 0:
        lat, slope = ts[0], max(ts[-1] - ts[0], 1e-9) / xs[-1]
    return lat, 1 / slope / 1e9


def _fit_op(op: str) -> str:
    """The measured collective a traffic row is timed as (all_to_all and pp sends: the all-gather)."""
    return op if op in ("all_reduce", "all_gather", "reduce_scatter") else "all_gather"


def measured_comm_seconds(recipe: Recipe, rows: tuple[Collective, ...], axes: tuple[str, ...]) -> float:
    """The rows on these axes at the measured collectives: wire bytes / measured bus bandwidth +
    the measured latency per call (all_to_all and pp sends at the all-gather's fit)."""
    ms = recipe.cluster.measured
    s = 0.0
    for c in rows:
        if c.axis in axes:
            op = c.op if c.op in ("all_reduce", "all_gather", "reduce_scatter") else "all_gather"
            lat, gbps = _coll_fit(getattr(ms, op), op, ms.ranks)
            s += c.wire_bytes / (gbps * 1e9) + c.count * lat
    return s


def oversubscribed(recipe: Recipe, mesh: MeshSpec) -> float:
    """How many ranks share one core on device cpu: the ranks of a node over the cores the profile
    measured (4 gloo ranks on 2 cores: each computes at half its one-process throughput). GPUs
    are not shared: 1."""
    ms, c = recipe.cluster.measured, recipe.cluster
    if c.device != "cpu" or not ms.cores:
        return 1.0
    # other jobs' load: a busy thread got `share` of a core when calibrate measured. Linux shares
    # the cores between sessions (autogroup), each session's weight spread over the cores its
    # threads run on: N ranks of one session over C cores get C x share cores between them, a rank
    # C x share / N (share x 1 at world 1). On an idle machine share = 1 and this is ranks / cores
    return max(1.0, min(mesh.world, c.gpus_per_node) / ms.cores) / ms.share


# eager PyTorch's per-op cost between the matmuls (calibrated profiles: x cluster.measured.op_us).
# aten ops a TorchDispatchMode counts in one micro-batch's forward + fp32 cross-entropy + backward
# of HF Llama (transformers 5, sdpa, use_cache off; tests/models/llama at 1, 2 and 3 layers: 287,
# 498, 709 ops, so 211 per decoder block: 21 mm, ~35 t, ~31 view, ~27 mul, ~17 add, the norms'
# pow/mean/rsqrt, rotary's cat/neg/slice, SiLU, sdpa and their backward) and outside them (76:
# embedding, rotary tables, final norm, lm_head, cross-entropy, their backward); clip_grad_norm_ +
# foreach AdamW + zero_grad add 28 + 18 per block a step (46, 64, 82). Other decoder families differ
# by a few ops a block (biases, q/k norms); tests/test_calibrate.py recounts these against the
# installed transformers. The runtime's real world-1 step of 2 micro-batches counted 1,130 ops
# (2 x 498 + 64 + 70 of its own: data, clipping per mesh, the stats all-reduce, .item()s)
OPS_PER_BLOCK = 211
OPS_OUTSIDE = 76
OPS_OPTIMIZER = 28
OPS_OPTIMIZER_PER_BLOCK = 18


# the runtime's own step on CPU, counted the same way (a TorchDispatchMode around
# runtime/train.py train_step after 2 warm-up steps, tiny-llama at 1 and 2 layers, world 1 and world 4,
# seq 128 x micro 4): per micro-batch (plain ops per block, outside; DTensor ops per block, outside) and
# per step (plain ops: + per block; DTensor ops; a "DTensor op" is one the mode sees with a DTensor
# argument). A TP plan's ops cost cluster.measured.tp_op_us each (measured on the runtime's own TP
# step, hooks and collective calls included), the others plain_op_us (its plain step at world 1; op_us,
# HF Llama's modules alone, in a profile without it: op_cost). The runtime's AdamW and clip scaling
# run on the DTensors' local tensors (runtime/train.py AdamW, scale_grads): their 8 foreach ops per
# param group and the clip multiply are plain ops, and the mode sees one aten.view more per parameter
# (9 a Llama block, 3 outside); only the norm's reduction stays DTensor. Recounted with that runtime:
#   plain (world 1)            211 / 76 a micro-batch; 28 + 18 L (clip, AdamW, zero_grad) + 70 (the
#                              runtime's data, stats all-reduce, .item()s) a step: 1,130 at L = 2
#   FSDP (dp_shard 4)          282 / 99 (FSDP2's copy-in / copy-out and hooks' ops); 100 + 36 L plain
#                              + 3 DTensor a step (the norm over the DTensor shards): 1,501 at L = 2
#                              (before the local-tensor AdamW: 81 + 27 L plain + 19 DTensor)
#   TP + SP + LP (dp_shard 2 x tp 2)  188 / 74 plain + 149 / 51 DTensor a micro-batch (the block's
#                              ops on Shard/Replicate activations, redistributes, the loss parallel
#                              cross-entropy); 98 + 36 L plain + 7 DTensor a step: 1,775 at L = 2
#                              (before: 79 + 27 L plain + 23 DTensor, 1,754)
#   TP without SP (dp_shard 2 x tp 2)  230 / 106 plain + 91 / 16 DTensor a micro-batch; 104 + 36 L
#                              plain + 6 DTensor a step: 1,710 at L = 2 (before: 90 + 27 L + 23, 1,695)
CPU_OPS = {"plain": (211, 76, 0, 0, 98, 18, 0), "fsdp": (282, 99, 0, 0, 100, 36, 3),
           "tp_sp": (188, 74, 149, 51, 98, 36, 7), "tp": (230, 106, 91, 16, 104, 36, 6)}


def cpu_ops(recipe: Recipe, mesh: MeshSpec, layers: int) -> tuple[int, int]:
    """(plain aten ops, DTensor ops) one rank dispatches a step on CPU (CPU_OPS: counted on HF Llama;
    other decoder families differ by a few ops a block)."""
    kind = (("tp_sp" if mesh.sequence_parallel else "tp") if mesh.tp > 1
            else "fsdp" if mesh.fsdp > 1 or mesh.dp_replicate > 1 else "plain")
    blk, out, dblk, dout, step, step_blk, dstep = CPU_OPS[kind]
    micro = mesh.grad_accum
    return (blk * layers + out) * micro + step + step_blk * layers, (dblk * layers + dout) * micro + dstep


def tp_sync_applies(recipe: Recipe, mesh: MeshSpec) -> bool:
    """_measured_step divides a rank's CPU seconds by cluster.measured.sync as well: device cpu with
    the per-rank probes, a TP plan priced at the measured TP per-op cost, and more ranks on a node
    than its cores (the ranks then wait for their TP peers with a core idle)."""
    ms = recipe.cluster.measured
    return (recipe.cluster.device == "cpu" and bool(ms.rank_shares) and mesh.tp > 1 and ms.tp_op_us > 0
            and bool(ms.cores) and min(mesh.world, recipe.cluster.gpus_per_node) > ms.cores)


def rank_share(recipe: Recipe, mesh: MeshSpec) -> float:
    """The fraction of a core one rank gets on device cpu: the measured share of n busy processes in
    their own sessions (cluster.measured.rank_shares; n = the ranks of a node, nearest measured),
    which holds both the oversubscription (4 ranks on 2 idle cores: 0.5) and the other jobs' load;
    a profile without it: 1 / oversubscribed."""
    ms = recipe.cluster.measured
    if not ms.rank_shares:
        return 1 / oversubscribed(recipe, mesh)
    return min(1.0, _nearest(ms.rank_shares, (max(1, min(mesh.world, recipe.cluster.gpus_per_node)),)))


def _nearest(rows, key: tuple[int, ...]) -> float:
    """The measured value (last item) of the row nearest `key` in log distance over its leading
    items: throughput depends on the shape, not only on the amount of work."""
    return min(rows, key=lambda r: sum(abs(math.log(a / b)) for a, b in zip(r[:len(key)], key)))[-1]


def _measured_step(recipe: Recipe, mesh: MeshSpec, est: Estimate, gemms, model: ModelSpec | None = None) -> StepTime:
    """step_time from cluster.measured (see step_time): per micro-batch and rank, the matmuls at the
    GEMM throughput of their shapes, the attention at the measured sdpa throughput, the element-wise
    passes, the cross-entropy over the logits and the per-op dispatch; x micro-batches, x the
    oversubscription and load (oversubscribed); + the optimizer and the measured collectives."""
    ms, t = recipe.cluster.measured, recipe.train
    tokens = t.global_batch_size * t.seq_len / mesh.world
    # micro-batches per rank per step: grad_accum (gbs / (mbs x dp)); tp ranks run the same micro-
    # batches on their shards (tokens / (mbs x seq / cp) counted them 1 / tp times)
    micro = mesh.grad_accum
    # on cpu with the per-rank probes (rank_shares): every term is one rank's CPU seconds / the share
    # of a core a rank gets (per_rank_cpu below); older profiles: x oversubscribed
    per_rank = recipe.cluster.device == "cpu" and bool(ms.rank_shares) and model is not None
    tp_ops = per_rank and mesh.tp > 1 and ms.tp_op_us > 0
    share = 1.0 / rank_share(recipe, mesh) if per_rank else oversubscribed(recipe, mesh)
    ranks_local = max(1, min(mesh.world, recipe.cluster.gpus_per_node))
    if tp_ops and tp_sync_applies(recipe, mesh):
        # more ranks than cores, TP: a rank waits for its TP peer at every collective, and while the
        # ranks that would use a core all wait it idles: a rank keeps only `sync` of its share busy
        # (measured on the runtime's own TP step by calibrate: 4 ranks on 2 idle cores 0.84-0.86; the
        # closed loop's world-4 training step itself 0.84-0.90, e.g. 0.19 CPU-s a step in 0.45 s of
        # wall at a share of 0.5)
        share /= ms.sync
    mm = sum(p * 2 * m * n * k / (_gflops_at(ms, m, n, k) * 1e9) for m, n, k, p in gemms)
    mm_flops = sum(p * 2 * m * n * k for m, n, k, p in gemms)
    # the attention's score matmuls (12 L H Dh T per token): at the measured causal sdpa throughput
    # of the nearest (mbs x local heads, local seq, head_dim), else at the median GEMM rate
    rest = max(est.flops_per_token * t.micro_batch_size * t.seq_len / mesh.cp / mesh.tp - mm_flops, 0)
    med = sorted(r[3] for r in ms.gemm_gflops)[len(ms.gemm_gflops) // 2]
    seq = t.seq_len // mesh.cp
    attn_rate = med
    if ms.attention_gflops and model is not None:
        attn_rate = _nearest(ms.attention_gflops, (t.micro_batch_size * max(1, model.num_heads // mesh.tp), seq,
                                                   model.head_dim))
    compute = (mm + rest / (attn_rate * 1e9)) * micro * share
    ac = t.activation_checkpointing
    recompute = compute / 3 if ac == "full" else compute * SELECTIVE_RECOMPUTE if ac == "selective" else 0.0
    rows = est.traffic
    # the measured collectives are seconds on an idle machine (runtime/calibrate.py scales them by
    # the share around them); a loaded cpu machine stretches them like the compute: / share
    load = ms.share if recipe.cluster.device == "cpu" else 1.0
    axes = (("tp", ("tp",)), ("fsdp", ("dp_shard", "dp_shard_cp", "efsdp")), ("hsdp", ("dp_replicate",)),
            ("cp", ("cp",)), ("ep", ("ep",)))
    comm = {a: measured_comm_seconds(recipe, rows, ax) / load for a, ax in axes}
    if per_rank and ms.cores and ranks_local > ms.cores:
        # more ranks than cores: a rank waiting in a collective is another rank computing, so the
        # wait is not time of its own (the cores stay busy); what a collective costs is its CPU
        # (gloo's send/recv threads and the call, coll_cpu_us a call) at the rank's share. The
        # measured wall latency (1-2 ms at 4 ranks on 2 cores) is mostly that wait, counted
        # again on top of the compute it overlaps
        # tp_op_us already holds the calls' CPU of a TP step (its collectives ran in what it timed):
        # then only the bytes (the fit's bandwidth term: gloo's copies and reductions) remain
        calls = 0.0 if tp_ops else ms.coll_cpu_us * 1e-6
        comm = {a: sum(c.count * calls + c.wire_bytes / (_coll_fit(getattr(ms, _fit_op(c.op)), _fit_op(c.op),
                                                                      ms.ranks)[1] * 1e9)
                       for c in rows if c.axis in ax) * share for a, ax in axes}
    # gloo on CPU: the runtime's collectives run on the ranks' own cores, which the compute keeps
    # busy (and oversubscribed): nothing hides, every collective is exposed. On cuda FSDP2's
    # prefetch hides what step_time's FSDP_OVERLAP rule says
    hidden = FSDP_OVERLAP if recipe.cluster.device == "cuda" else 0.0
    dp = comm["fsdp"] + comm["hsdp"]
    exposed = max((1 - hidden) * dp, dp - compute - recompute) if dp and hidden else dp
    bw = ms.copy_gbps * 1e9 / share if ms.copy_gbps else 0.0
    opt = ADAMW_PASSES * est.grads_bytes / bw if bw else 0.0
    # the element-wise work between the matmuls (norms, rotary, SiLU, residual adds) is memory-bound:
    # every saved activation is written in the forward, read in the backward and its gradient
    # written: MEMORY_PASSES x one micro-batch's activations at the measured copy bandwidth. The
    # cross-entropy over the logits at its own measured rate (log-softmax's exp and log ran at a
    # tenth of the copy bandwidth here) when calibrate measured it, else as 3 more passes
    ce = 0.0
    if ms.cross_entropy_gbps and model is not None:
        vocab = model.vocab_size // mesh.tp if mesh.tp > 1 and recipe.tp.loss_parallel else model.vocab_size
        rows_ = t.micro_batch_size * seq
        ce = rows_ * vocab * 4 / (_nearest(ms.cross_entropy_gbps, (rows_, vocab)) * 1e9) * micro * share
        passes = MEMORY_PASSES * est.activations_bytes
    else:
        passes = MEMORY_PASSES * (est.activations_bytes + est.logits_bytes)
    memory = passes / bw * micro if bw else 0.0
    # eager dispatch: every aten op of the forward + backward costs op_us of CPU whatever its size
    # (tiny-llama: 498 ops a micro-batch x ~7 us = 3.5 ms, ~5% of its world-1 step's CPU here)
    ops = ((OPS_OUTSIDE + OPS_PER_BLOCK * model.num_layers) * micro + OPS_OPTIMIZER
           + OPS_OPTIMIZER_PER_BLOCK * model.num_layers) if model is not None else 0
    dispatch = ops * ms.op_us * 1e-6 * share
    if per_rank:      # the runtime's own op counts (CPU_OPS); a TP step's ops at its measured cost
        plain, dt = cpu_ops(recipe, mesh, model.num_layers)
        dispatch = (plain + dt) * op_cost(recipe, mesh) * 1e-6 * share
    st = StepTime(compute_s=compute, recompute_s=recompute, tp_s=comm["tp"], memory_s=memory + ce + dispatch,
                  fsdp_s=exposed * comm["fsdp"] / dp if dp else 0.0, hsdp_s=exposed * comm["hsdp"] / dp if dp else 0.0,
                  cp_s=comm["cp"], ep_s=comm["ep"], tokens_per_rank=tokens, optimizer_s=opt)
    peak = med * 1e9
    return replace(st, mfu=est.flops_per_token * st.tokens_per_s_gpu / peak)


def op_cost(recipe: Recipe, mesh: MeshSpec) -> float:
    """CPU microseconds an op of the runtime's step costs in the per-rank model: a TP plan's at the
    measured cost of the runtime's own TP step (tp_op_us), any other's at its plain step's
    (plain_op_us: world 1, no TP; ~2x op_us, HF Llama's modules alone, which left the closed loop's
    world 1 at -5% to -10% of the measured step: the runtime's loop, clip and AdamW cost more an op);
    op_us where calibrate measured neither (an older profile)."""
    ms = recipe.cluster.measured
    if mesh.tp > 1 and ms.tp_op_us:
        return ms.tp_op_us
    return ms.plain_op_us if mesh.tp == 1 and ms.plain_op_us else ms.op_us


def calibrated(recipe: Recipe, mesh: MeshSpec) -> bool:
    """The step time comes from cluster.measured (see step_time), not the datasheet keys."""
    ms = recipe.cluster.measured
    return ms.ranks > 0 and bool(ms.gemm_gflops) and not mesh.pp_enabled


def time_source(recipe: Recipe, mesh: MeshSpec) -> str:
    """PLAN.md's line on which profile numbers the step time used."""
    ms = recipe.cluster.measured
    if calibrated(recipe, mesh):
        return (f"measured by meshbake calibrate (cluster.measured: {ms.ranks} ranks, {ms.cores} cores; GEMM "
                f"throughput at the step's shapes, {ms.copy_gbps:g} GB/s copy, the measured collectives), not the "
                "datasheet keys")
    c = recipe.cluster
    g = perf.gpu_of(c.gpu, c.peak_tflops)
    which = f"cluster.gpu {c.gpu}" if c.gpu else f"{g.name} by its peak" if g.name != "generic" else "no catalog GPU"
    return (f"datasheet ({which}: peak_tflops {c.peak_tflops:g}, hbm_gbps {c.hbm_gbps:g}, intra/inter_node_gbps, "
            f"nics_per_node) in compiler/perf.py's model, {perf.band_line()}; meshbake calibrate measures them")


def _measured_rows(recipe: Recipe, mesh: MeshSpec, st: StepTime) -> tuple[tuple[str, float, str], ...]:
    ms = recipe.cluster.measured
    share = oversubscribed(recipe, mesh)
    cores = (max(1.0, min(mesh.world, recipe.cluster.gpus_per_node) / ms.cores)
             if ms.cores and recipe.cluster.device == "cpu" else 1.0)
    over = (f"; {min(mesh.world, recipe.cluster.gpus_per_node)} ranks on {ms.cores} cores: x {cores:g}"
            if cores > 1 else "") + (f"; load (a busy thread got {ms.share:.3g} of a core): x {1 / ms.share:.3g}"
                                     if share > 1 and ms.share < 1 else "")
    per_rank = recipe.cluster.device == "cpu" and bool(ms.rank_shares)
    if per_rank:      # _measured_step's per-rank CPU model
        r = rank_share(recipe, mesh)
        over = (f"; one rank's CPU / {r:.3g}, the share of a core each of "
                f"{min(mesh.world, recipe.cluster.gpus_per_node)} busy processes got (measured)")
        if tp_sync_applies(recipe, mesh):
            over += f" / {ms.sync:.3g}, the part of it a rank of the TP step kept busy (measured)"
    ew = (f"{MEMORY_PASSES} passes over activations at {ms.copy_gbps:g} GB/s measured copy"
          + (", cross-entropy over the logits at its measured rate" if ms.cross_entropy_gbps else " (+ logits)")
          + (f", eager ops x {op_cost(recipe, mesh) if per_rank else ms.op_us:.3g} us "
             "measured per op" if ms.op_us else ""))
    exposed = "exposed (gloo: no overlap)" if recipe.cluster.device == "cpu" else f"at most {FSDP_OVERLAP:.0%} hidden"
    coll = "measured collectives (bus GB/s + latency), exposed"
    if per_rank and ms.cores and min(mesh.world, recipe.cluster.gpus_per_node) > ms.cores:
        # _measured_step: more ranks than cores, a rank's wait is another rank's compute
        coll = exposed = ("their bytes at the measured bus GB/s" + ("" if mesh.tp > 1 and ms.tp_op_us else
                          f" + {ms.coll_cpu_us:.3g} us CPU a call") + " / the rank's share (more ranks than "
                          "cores: a wait is another rank's compute)")
    attn = ", the attention at the measured sdpa GFLOP/s" if ms.attention_gflops else ""
    return (("compute", st.compute_s, f"the step's matmuls at the measured GEMM GFLOP/s of their shapes{attn}{over}"),
            ("recompute", st.recompute_s, f"activation checkpointing {recipe.train.activation_checkpointing}"),
            ("element-wise", st.memory_s, f"{ew}{over}"),
            ("TP", st.tp_s, coll if mesh.tp > 1 else "no TP"),
            ("CP", st.cp_s, coll if mesh.cp > 1 else "no CP"),
            ("FSDP", st.fsdp_s, f"measured collectives, {exposed}" if mesh.fsdp > 1 else "no FSDP traffic"),
            ("HSDP", st.hsdp_s, f"measured collectives, {exposed}" if mesh.dp_replicate > 1 else "no replicas"),
            *((("EP", st.ep_s, "token all-to-alls at the measured all-gather, exposed"),) if mesh.ep > 1 else ()),
            ("optimizer", st.optimizer_s, f"{ADAMW_PASSES} passes over the trainable shard at the measured copy"))


def step_rows(recipe: Recipe, mesh: MeshSpec, st: StepTime) -> tuple[tuple[str, float, str], ...]:
    """PLAN.md's step-time table: (term, seconds, what it assumes)."""
    c = recipe.cluster
    if calibrated(recipe, mesh):
        return _measured_rows(recipe, mesh, st)
    gb = {a: axis_gbps(recipe, mesh, a) for a in ("tp", "cp", "ep", "dp_shard_cp" if mesh.cp > 1 else "dp_shard",
                                                   "dp_replicate")}
    bw = {a: f"{g:.4g} GB/s bus ({'NVLink' if w == 'intra' else 'the NICs of its rails'})" for a, (g, w) in gb.items()}
    fsdp_ax = "dp_shard_cp" if mesh.cp > 1 else "dp_shard"
    gpu = perf.gpu_of(c.gpu, c.peak_tflops)
    frac = perf.DEFAULT.frac(gpu.family)
    t = recipe.train
    return (("matmuls", st.compute_s, f"GEMMs by shape after TP: {c.peak_tflops:g} TFLOP/s x {frac:.0%} "
                                      f"({gpu.family}) x 1 / (1 + {perf.KAPPA:g} x ridge / intensity)"
                                      # LoRA's rank-r products are thin GEMMs (perf.gemm_seconds)
                                      + (f"; LoRA's rank-{recipe.lora.rank} adapter products at {c.hbm_gbps:g} GB/s "
                                         "HBM (memory-bound)" if 0 < recipe.lora.rank <= perf.THIN_DIM else "")),
            ("attention", st.attention_s, f"12 L H Dh T FLOPs per token at seq {t.seq_len}, {st.attn_kernel} kernel "
                                           f"({perf.ATTN.get(st.attn_kernel, 1):.0%} of flash's rate)"),
            ("element-wise", st.memory_s, f"norms, RoPE, SiLU, loss at {c.hbm_gbps:g} GB/s HBM"
                                          + (f"; torch.compile fuses {perf.COMPILE_FUSION:.0%}" if t.compile else "")),
            ("recompute", st.recompute_s, f"activation checkpointing {t.activation_checkpointing}"),
            ("TP", st.tp_s, f"exposed, {bw['tp']}" if mesh.tp > 1 else "no TP"),
            ("CP", st.cp_s, f"exposed, {bw['cp']}" if mesh.cp > 1 else "no CP"),
            ("FSDP", st.fsdp_s, f"{bw[fsdp_ax]}; the first all-gather exposed, the rest behind compute"
             if mesh.fsdp > 1 else "no FSDP traffic"),
            ("HSDP", st.hsdp_s, f"{bw['dp_replicate']}; overlapped like FSDP" if mesh.dp_replicate > 1 else "no replicas"),
            # a row only under mesh.ep: a dense plan's table stays as it was
            *((("EP", st.ep_s, f"token all-to-alls, exposed, {bw['ep']}"),) if mesh.ep > 1 else ()),
            ("optimizer", st.optimizer_s, f"{ADAMW_PASSES} passes over the trainable shard at {c.hbm_gbps:g} GB/s HBM"))
