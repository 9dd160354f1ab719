"""Context parallel, all-gather form (as used to train Llama 3 at long context): each cp rank
holds 2 of the 2*cp sequence chunks, load-balanced for the causal mask (rank i: chunks i and
2cp-1-i, so every rank has as many early as late tokens), all-gathers K and V along the sequence
and attends with its local queries under the causal mask of their GLOBAL positions.

Needs only all_gather (autograd: reduce-scatter in backward) and a masked SDPA, so it runs on
any device and attention kernel; PyTorch's ring attention (experimental context_parallel) covers
CUDA kernels only (on CPU, torch 2.13: "_scaled_dot_product_flash_attention_for_cpu does not have a
sharding strategy registered"). K/V memory per rank: the full sequence of K and V for one layer at a time.
Shapes: T global, cp ranks, Tl = T / cp local tokens; q (B, H, Tl, D), k/v (B, Hkv, Tl, D).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "meshbake_cp"
_STATE: dict = {}          # the cp mesh and this micro-batch's positions, set by the train loop


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions of this rank's tokens, in the order they are held: (Tl,)."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunk_ids(cp, rank)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """(B, T) -> (B, Tl): this rank's two chunks."""
    c = x.shape[1] // (2 * cp)
    return torch.cat([x[:, i * c:(i + 1) * c] for i in chunk_ids(cp, rank)], dim=1)


def masks(mesh, seq_len: int, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(local position ids, attention mask) of a micro-batch on this cp rank: (Tl,) and the causal
    (Tl, T) mask for one causal sequence, or (B, Tl) and a (B, 1, Tl, T) mask for packed rows
    (position_ids (B, T) restarting at 0 per document): causal in the global token order AND the
    same document (document = run of positions increasing by 1), so no query attends across a
    document boundary however the chunks are spread over the cp ranks. Pure: nothing is stored."""
    cp, rank = mesh.size(), mesh.get_local_rank()
    q_pos = local_positions(seq_len, cp, rank)
    k_pos = torch.cat([local_positions(seq_len, cp, r) for r in range(cp)])   # all-gather order
    causal = k_pos[None, :] <= q_pos[:, None]                                 # (Tl, T)
    if position_ids is None:
        return q_pos, causal
    first = position_ids[:, :1] - 1
    doc = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)   # (B, T) document index
    same = doc[:, q_pos][:, :, None] == doc[:, k_pos][:, None, :]             # (B, Tl, T)
    return position_ids[:, q_pos], (causal[None] & same)[:, None]


def set_batch(mesh, seq_len: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Prepare the attention for a micro-batch (its mask from `masks`, kept until the next call:
    the train loop runs one micro-batch's forward and backward at a time); returns the local
    position ids. Under pp the schedule interleaves micro-batches, so each stage forward passes
    its own mask to cp_attention as a kwarg instead (runtime/pp.Stage)."""
    pos, mask = masks(mesh, seq_len, position_ids)
    _STATE.update(mesh=mesh, mask=mask)
    return pos


def use_mesh(mesh) -> None:
    """The cp mesh cp_attention gathers over, where no set_batch call sets it (pipeline stages)."""
    _STATE["mesh"] = mesh


def cp_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    mesh = _STATE["mesh"]
    _STATE["calls"] = _STATE.get("calls", 0) + 1
    # (B, Hkv, Tl, D) x cp -> (B, Hkv, T, D); autograd reduce-scatters the K/V grads back
    k = all_gather_tensor_autograd(key.contiguous(), gather_dim=2, group=mesh)
    v = all_gather_tensor_autograd(value.contiguous(), gather_dim=2, group=mesh)
    # the stage's own mask under pp (HF hands the model's extra kwargs down to the attention, and
    # AC's recompute gets the same ones), else the one set_batch keeps for this micro-batch
    mask = kwargs.get("cp_mask")
    mask = (_STATE["mask"] if mask is None else mask).to(query.device)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout if module.training else 0.0,
                                         scale=scaling, enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous(), None       # (B, Tl, H, D), as HF expects


def install(model) -> None:
    """Route the model's attention through cp_attention; HF's own mask is not needed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, cp_attention)
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)
    model.config._attn_implementation = NAME
