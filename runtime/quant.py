"""QLoRA: the frozen base weights of the LoRA targets stored as NF4 (recipe lora.quantize_base: nf4).

Library: torchao's NF4Tensor (torchao.quantization; torchao.dtypes.nf4tensor before 0.15), the tensor torchtune's QLoRA recipes
train under FSDP2. It is a tensor subclass that implements FSDP2's fsdp_pre_all_gather /
fsdp_post_all_gather, so fully_shard shards its packed storage by rows and all-gathers the
packed bytes per block (never a bf16 copy on the wire), and its dequantization is plain torch
ops, so it runs (and is tested) on CPU. bitsandbytes' Params4bit needs its CUDA kernels and
has no FSDP2 all-gather hooks (its 4-bit matmuls are CUDA-only, so nothing of it could run or be
tested here); it is not used.

Storage of one NF4 weight of n elements (torchao's layout, block 64, double quantization):
    quantized_data       uint8, n / 2           two 4-bit codes per byte
    quantized_scalers    int8,  n / 64          one absmax per block of 64, quantized
    quantization_factor  dtype, n / 64 / S      one factor per S scalers (S = scaler block)
    scaler_mean, nf4     dtype, 1 + 16          per tensor (every FSDP shard keeps its own copy)
= 0.5156 bytes per element plus n / (64 S) scaler factors. S is 256 (torchao's default, the
QLoRA paper's) whenever every FSDP shard holds whole scaler blocks; only tensors too small for
that (test models) use the largest power of two that fits (nf4_scaler_block). The quantization
is of the whole tensor, before sharding: every mesh dequantizes to the same W.

Compute: F.linear on an NF4Tensor weight is torchao's linear_nf4: the weight is dequantized to
its dtype (model.dtype) in the forward and again in the backward (for dx); it has no gradient.
The transient working copy (torchao's get_original_weight, measured on CPU) is the output (n x
dtype bytes) plus two int64 index tensors of n / 2 and two n / 2 intermediates per half:
nf4_working_bytes.

Where it composes: FSDP2 over one flat mesh (dp_shard, x cp). torchao's all-gather hooks take
the group of a 1-D mesh (mesh.get_group()), so HSDP (dp_replicate > 1) and FSDP x TP's 2-D
parameter mesh are out; an NF4Tensor inside a TP DTensor goes through torchao's own aten table
(t, mm as linear_nf4) whose results under colwise/rowwise placements are not verified: tp > 1
and dp_replicate > 1 are refused at compile time (compiler/placements.py _quantize_errors), as is
any target whose rows do not split evenly over the FSDP shards (torchao splits the packed storage
by whole rows, no padding).
"""
from __future__ import annotations

NF4_BLOCK = 64            # elements per absmax block (torchao / QLoRA default)
NF4_SCALER_BLOCK = 256    # scalers per quantization factor (double quantization)


def nf4_scaler_block(rows: int, numel: int, shards: int) -> int:
    """The scaler block S for a (rows x cols) weight split over `shards` FSDP ranks: 256, or the
    largest power of two such that each shard holds whole scaler blocks; 0 = cannot be stored
    NF4 on this mesh (rows not divisible by shards, or a shard not whole blocks of 64)."""
    if rows % shards or (numel // shards) % NF4_BLOCK:
        return 0
    per = numel // shards // NF4_BLOCK        # absmax blocks per shard
    s = NF4_SCALER_BLOCK
    while per % s:
        s //= 2
    return s


def nf4_bytes(numel: int, scaler_block: int, dtype_bytes: int, per_tensor: bool = True) -> int:
    """Bytes of the NF4 storage of `numel` elements (one shard's: numel / shards): packed codes,
    int8 scalers, one factor per scaler block, and (per_tensor) the mean + 16-entry table each
    shard keeps. FSDP2 all-gathers the first three only (torchao's fsdp_pre_all_gather)."""
    blocks = numel // NF4_BLOCK
    return numel // 2 + blocks + (blocks // scaler_block) * dtype_bytes + (17 * dtype_bytes if per_tensor else 0)


def nf4_working_bytes(numel: int, dtype_bytes: int) -> int:
    """The transient of dequantizing one whole weight (torchao get_original_weight): two int64
    code tensors of numel / 2 (8 bytes each), the two dequantized halves, the two scaled halves
    and the stacked result, each numel / 2 or numel of dtype."""
    return 8 * numel + 3 * numel * dtype_bytes


def _to_nf4():
    """torchao's to_nf4 (torchao.quantization since 0.15; torchao.dtypes.nf4tensor before). Its
    import logs one line per CUDA/SM90 kernel library it cannot load on a CPU-only machine:
    silenced, the NF4 path needs none of them."""
    import logging

    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        try:
            from torchao.quantization import to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4
    except ImportError as e:
        raise ImportError("lora.quantize_base nf4 needs torchao (pip install 'meshbake[qlora]')") from e
    finally:
        log.setLevel(level)
    return to_nf4


def quantize_base(model, plan, modules: set[str] | None = None) -> list[str]:
    """Each LoRA target's frozen weight becomes an NF4Tensor Parameter (torchtune's QLoRA:
    embeddings, norms and lm_head stay in model.dtype). Before fully_shard, on the full plain
    weight (tp is 1); modules: only these targets (parallel.build_quantized, one block at a
    time). -> the quantized module names."""
    import torch.nn as nn

    from .lora import lora_targets

    to_nf4 = _to_nf4()
    shards = plan.mesh.fsdp if plan.mesh.fsdp_enabled else 1
    done = []
    for fqn, mod in lora_targets(model, plan):
        if modules is not None and fqn not in modules:     # build_quantized: one block at a time
            continue
        w = mod.weight.detach()
        s = nf4_scaler_block(w.shape[0], w.numel(), shards)
        if not s:
            raise ValueError(f"{fqn}.weight {tuple(w.shape)}: cannot be stored NF4 over {shards} FSDP shards")
        mod.weight = nn.Parameter(to_nf4(w.contiguous(), NF4_BLOCK, s), requires_grad=False)
        done.append(fqn)
    model._meshbake_nf4 = True           # checkpoint.py: save and load the adapters only
    return done


# Checkpoints (runtime/checkpoint.py _options) hold the adapters and their AdamW state only: the base
# is rebuilt on resume and export from model.weights (or the seeded init) and quantized again with
# the run's FSDP size. For real models S is 256 on any mesh; a tiny test model resumed on another
# dp_shard x cp could get another S (a slightly different dequantized base).


def dequantized(w, shards: int):
    """W as the QLoRA run computes with it: NF4 round trip of the full (runtime-order) weight."""
    s = nf4_scaler_block(w.shape[0], w.numel(), shards)
    return _to_nf4()(w.detach().contiguous(), NF4_BLOCK, s).get_original_weight()
