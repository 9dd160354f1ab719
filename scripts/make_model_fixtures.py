"""Write tests/models/<model_type>/config.json: tiny random-init configs of real architectures.

Each is built by the real transformers config class (so every family-specific field is valid
and present), with the sizes shrunk: hidden 64, 2 layers, 4 heads / 2 kv heads of head_dim 16,
vocab 1024 (tp 2 divides every sharded dim). A few hundred thousand parameters each.
    python scripts/make_model_fixtures.py [MODEL_TYPE ...]   (rewrites the fixtures; review the diff)
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "models"
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=1024, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, initializer_range=0.02)
DROP = object()          # a COMMON key the family's config does not have
MODELS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"tie_word_embeddings": True},                        # q/k/v carry a bias
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},         # q_norm/k_norm per head
    # soft-capped attention logits and lm_head, sliding window 8 < seq_len 32 on even layers
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True},
    "phi3": {"tie_word_embeddings": False},                         # fused qkv_proj and gate_up_proj
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1], "tie_word_embeddings": False},
    "olmo2": {"tie_word_embeddings": False},                       # q_norm/k_norm over the whole projection
    # fused gate_up_proj [gate | up], attention bias, partial rotary (0.5); GLM-4 adds post-attention
    # and post-MLP norms
    "glm": {"head_dim": 16},
    "glm4": {"head_dim": 16},
    # fused query_key_value per head [q_h | k_h | v_h], parallel residual, LayerNorm with bias,
    # rotary on a quarter of head_dim, embed_in / lm_head (hub: embed_out); no GQA
    "gpt_neox": {"num_key_value_heads": DROP},
    # routed experts + a shared expert behind a sigmoid gate (shared_expert_gate, H -> 1); q/k/v bias
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "tie_word_embeddings": False},
    # the MoE block is block_sparse_moe (router + grouped experts, softmax over the top-k logits);
    # mu-P multipliers on the embedding, the residual branches, the attention scores and the logits
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64,
                   "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0625,
                   "logits_scaling": 4.0, "tie_word_embeddings": True},
    # MLA (q/kv low-rank down-projections + norms, per-head up-projections, a rope/nope head split
    # with one shared rope key), layer 0 dense (first_k_dense_replace), layer 1 MoE: sigmoid
    # router with e_score_correction_bias, group-limited top-k (2 groups of 2, 1 group kept),
    # routed_scaling_factor, and a shared expert added ungated; num_key_value_heads = heads, as in V3;
    # v heads narrower than q/k heads (8 vs 8 + 8), as V3's 128 vs 128 + 64
    "deepseek_v3": {"num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
                    "n_group": 2, "topk_group": 1, "n_shared_experts": 1, "moe_intermediate_size": 64,
                    "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "tie_word_embeddings": False},
    # DeepSeek-V3's MoE block (sigmoid router + e_score_correction_bias, 2 groups of 2 experts, 1
    # kept, routed_scaling_factor, an ungated shared expert; layer 0 dense by first_k_dense_replace)
    # under GLM's attention: q/k/v biases, rotary on half of head_dim, per-head q/k RMSNorm
    "glm4_moe": {"head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                 "n_shared_experts": 1, "moe_intermediate_size": 64, "first_k_dense_replace": 1,
                 "routed_scaling_factor": 2.5, "attention_bias": True, "use_qk_norm": True,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                 "tie_word_embeddings": False},
    # attention sinks (one logit per q head), q/k/v/o biases, sliding window 8 < seq_len 32 on
    # even layers (layer_types), 4 experts top-2 with biases, gate/up interleaved in (E, H, 2I),
    # clamped SwiGLU; eager attention (transformers has no sdpa with sinks)
    "gpt_oss": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64,
                "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                # YaRN as gpt-oss ships it (factor 32 over 4096 = 131072), shrunk: 4 x 64 = 256
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 64,
                                    "rope_theta": 150000.0}},
    # layer 0: RoPE + qk L2 norm + chunked attention (chunk 8 < seq_len 32) + dense MLP
    # (intermediate_size_mlp); layer 1: NoPE (no_rope_layers 0) + full attention + temperature
    # tuning (floor_scale 8 so it binds at positions < 32) + MoE (interleave step 2): sigmoid
    # router top-1 of 4 experts scaling the input, a shared expert, experts fused (E, H, 2I) [gate | up]
    "llama4_text": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size": 64,
                    "intermediate_size_mlp": 128, "interleave_moe_layer_step": 2, "no_rope_layers": [1, 0],
                    "attention_chunk_size": 8, "floor_scale": 8, "rope_parameters": {"rope_type": "default",
                                                                                     "rope_theta": 500000.0}},
}


def main() -> None:
    import sys

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    only = set(sys.argv[1:])          # model types to (re)write; none: all
    for model_type, extra in MODELS.items():
        if only and model_type not in only:
            continue
        kw = {k: v for k, v in {**COMMON, **extra}.items() if v is not DROP}
        cfg = AutoConfig.for_model(model_type, **kw)
        d = cfg.to_diff_dict()          # only what differs from the class defaults, like a hub config.json
        d["model_type"] = model_type
        d["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
        for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            d.pop(k, None)
        path = OUT / model_type / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        print(path, d.get("architectures"))


if __name__ == "__main__":
    main()
