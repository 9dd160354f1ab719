"""Training FLOPs per token: the one formula behind PLAN.md's number and the runtime's MFU.

torchtitan's convention (models/utils.py get_num_flop_per_token; PaLM appendix B):

    6 * N  +  12 * L * H * Dh * T

N: the matmul parameters one token passes through (the input embedding is a lookup, not a
matmul, so it is left out; lm_head is a matmul and stays, also when tied). For MoE, N counts
the routed experts a token really uses (top-k of them) plus the shared ones, not all experts.
6 = forward 2 (multiply + add) + backward 4 (input gradient 2 + weight gradient 2).
12 L H Dh T: attention scores QK^T and the weighted sum AV, each 2 * T * H * Dh FLOPs per token
per layer forward, x3 with backward; causal masking is not halved (torchtitan neither).

LoRA (the unmerged form, runtime/lora.py: y = x W^T + s dropout(x) A^T B^T), per token:
    every frozen weight W       4 per parameter: forward 2 + input gradient 2, no weight gradient,
                                adapted or not (the adapter never touches W's gradient)
    adapters A (r x in), B (out x r)   6 per adapter parameter, r (in + out) per Linear: forward
                                2 (x A^T, then B), input gradients 2 (through B, then A), weight
                                gradients 2 (dB, dA), like any trained Linear of that shape
    adapters on MoE experts     the same per expert matrix, counted for the k routed experts of
                                each MoE layer (a token's rows never reach the other E - k)
Stdlib only: the compiler imports this module; the runtime reads the number from plan.json.
"""
from __future__ import annotations

from collections.abc import Iterable


def attention_flops(layers: int, heads: int, head_dim: int, seq_len: int) -> int:
    return 12 * layers * heads * head_dim * seq_len


def flops_per_token(*, matmul_params: int, layers: int, heads: int, head_dim: int, seq_len: int,
                    frozen_params: int = 0, adapters: Iterable[tuple[int, int, int]] = ()) -> int:
    """matmul_params: N above (active ones for MoE), frozen ones included, adapters not.
    frozen_params: the part of N that gets no weight gradient (LoRA: all of it).
    adapters: (out, rank, in) of every adapted Linear (full, unsharded shapes)."""
    adapter_params = sum(r * (o + i) for o, r, i in adapters)
    return (6 * matmul_params - 2 * frozen_params + 6 * adapter_params
            + attention_flops(layers, heads, head_dim, seq_len))


def dense_from_config(config: dict, num_params: int, tied: bool, seq_len: int) -> int:
    """A dense model from its HF config facts alone (plans written without the number)."""
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    embedding = 0 if tied else config["vocab_size"] * hidden
    return flops_per_token(matmul_params=num_params - embedding, layers=layers, heads=heads, head_dim=head_dim,
                           seq_len=seq_len)
