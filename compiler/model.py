"""model stage: HF config.json facts + the module tree of the real transformers class.

The module list is never hand-written: the model class transformers maps the config to is
instantiated on the meta device (no memory, ~0.8 s for 70B) and walked. What we keep per
module is what later stages need: its kind, its weight shape and its parameter count.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from compiler.errors import Err, RecipeError, Result

CATALOG_DIR = Path(__file__).parent / "catalog"


@dataclass(frozen=True)
class ModuleInfo:
    fqn: str                      # "model.layers.3.self_attn.q_proj"
    kind: str                     # "linear" | "embedding" | "norm"
    shape: tuple[int, ...]        # weight shape: Linear (out, in), Embedding (vocab, hidden)
    numel: int                    # parameters directly owned (weight + bias)


@dataclass(frozen=True)
class ModelSpec:
    source: str                   # what the recipe said: catalog name or path
    config: Mapping[str, Any]     # the config.json dict, as read
    architecture: str             # "LlamaForCausalLM"
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_params: int               # unique parameters (a tied weight counted once)
    modules: tuple[ModuleInfo, ...]
    hf_tp_plan: Mapping[str, str]  # transformers' own plan: {fqn pattern: hf style}
    block_prefix: str             # "model.layers": children are the FSDP units

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block (all blocks are equal in these architectures)."""
        pre = f"{self.block_prefix}.0."
        return sum(m.numel for m in self.modules if m.fqn.startswith(pre))


def catalog_names() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.json"))


def catalog_config(name: str) -> dict[str, Any] | None:
    path = CATALOG_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _kind(module) -> str | None:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    name = type(module).__name__
    if name.endswith(("RMSNorm", "LayerNorm")):
        return "norm"
    return None


def _meta_model(config: Mapping[str, Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def model_spec(config: Mapping[str, Any], source: str) -> Result[ModelSpec]:
    """Build the ModelSpec of a config.json dict; errors point at model.config."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return Err((RecipeError("model.config", f"{source}: config.json has no model_type",
                                "point model.config at a Hugging Face config.json"),))
    try:
        model = _meta_model(config)
    except (ValueError, KeyError, TypeError) as e:
        return Err((RecipeError("model.config", f"{source}: transformers cannot build "
                                f"model_type {model_type!r} as a causal LM ({e})",
                                "meshbake supports decoder-only CausalLM architectures"),))
    modules = tuple(
        ModuleInfo(fqn, kind, tuple(mod.weight.shape), sum(p.numel() for p in mod.parameters(recurse=False)))
        for fqn, mod in model.named_modules()
        if (kind := _kind(mod)) is not None and getattr(mod, "weight", None) is not None
    )
    c = model.config
    heads = c.num_attention_heads
    return ModelSpec(
        source=source,
        config=dict(config),
        architecture=type(model).__name__,
        model_type=model_type,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=getattr(c, "max_position_embeddings", 0) or 0,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        num_params=sum(p.numel() for p in model.parameters()),
        modules=modules,
        hf_tp_plan=dict(getattr(model, "_tp_plan", None) or {}),
        block_prefix=_block_prefix(model),
    )


def _block_prefix(model) -> str:
    import torch.nn as nn

    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            return fqn
    return "model.layers"
