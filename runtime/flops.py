"""Training FLOPs per token: the one formula behind PLAN.md's number and the runtime's MFU.

torchtitan's convention (models/utils.py get_num_flop_per_token; PaLM appendix B):

    6 * N  +  12 * L * H * Dh * T

N: the matmul parameters one token passes through (the input embedding is a lookup, not a
matmul, so it is left out; lm_head is a matmul and stays, also when tied). For MoE, N counts
the routed experts a token really uses (top-k of them) plus the shared ones, not all experts.
6 = forward 2 (multiply + add) + backward 4 (input gradient 2 + weight gradient 2).
12 L H Dh T: attention scores QK^T and the weighted sum AV, each 2 * T * H * Dh FLOPs per token
per layer forward, x3 with backward; causal masking is not halved (torchtitan neither).

LoRA (the runtime adds s*B*A to the frozen weight, runtime/lora.py):
    frozen, not adapted        4 per parameter: forward + input gradient, no weight gradient
    adapted weights W          6: autograd forms d(W + sBA), a full weight-gradient matmul
    adapters                   the product B @ A (out x r x in) once per micro-step forward and
                               twice backward (dB, dA): 6 * out * r * in per micro-step, spread
                               over the micro-step's tokens of one rank (mbs x T / cp)
Stdlib only: the compiler imports this module; the runtime reads the number from plan.json.
"""
from __future__ import annotations

from collections.abc import Iterable


def attention_flops(layers: int, heads: int, head_dim: int, seq_len: int) -> int:
    return 12 * layers * heads * head_dim * seq_len


def flops_per_token(*, matmul_params: int, layers: int, heads: int, head_dim: int, seq_len: int,
                    frozen_params: int = 0, adapters: Iterable[tuple[int, int, int]] = (),
                    tokens_per_micro_step: int = 1) -> int:
    """matmul_params: N above (active ones for MoE), frozen ones included. frozen_params: the
    part of N that gets no weight gradient (LoRA: the matmul weights without an adapter).
    adapters: (out, rank, in) of every adapted Linear (full, unsharded shapes)."""
    per_step = sum(6 * o * r * i for o, r, i in adapters)
    return (6 * matmul_params - 2 * frozen_params + attention_flops(layers, heads, head_dim, seq_len)
            + per_step // max(1, tokens_per_micro_step))


def dense_from_config(config: dict, num_params: int, tied: bool, seq_len: int) -> int:
    """A dense model from its HF config facts alone (plans written without the number)."""
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    embedding = 0 if tied else config["vocab_size"] * hidden
    return flops_per_token(matmul_params=num_params - embedding, layers=layers, heads=heads, head_dim=head_dim,
                           seq_len=seq_len)
