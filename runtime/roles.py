"""What each part of the model is, and what a TP style splits (stdlib only).

ModelRoles is decided once, by the compiler's model stage on the real transformers module
tree (compiler/model.py), and carried in plan.json (model.roles); every later user, compiler
or runtime, reads it instead of finding the lm_head, the embedding or the decoder blocks again.
The LoRA targets are resolved to module fqns at compile time (compiler/placements.py) with
the one matching rule below; the runtime adapts exactly those modules.

SHARD_DIM is the one table of which dim of a tensor a tp rank holds 1/tp of, per placement
style (plan.json tp.placements): the compiler's per-rank shapes and memory, the runtime's
DTensor layouts and the LoRA adapters' layouts all come from it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelRoles:
    embedding: str                  # the input embedding (token table): "model.embed_tokens"
    lm_head: str                    # the output embedding: "lm_head"
    final_norm: str                 # the norm lm_head reads: "model.norm" ("" if the model has none)
    block_prefix: str               # "model.layers": block i is f"{block_prefix}.{i}", one FSDP unit each
    num_blocks: int
    tied: bool                      # lm_head's weight is the embedding's (one parameter)
    lora_targets: tuple[str, ...] = ()   # fqns of the Linears that get adapters (compile time), () = no LoRA

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(f"{self.block_prefix}.{i}" for i in range(self.num_blocks))

    def in_block(self, fqn: str) -> bool:
        return fqn.startswith(self.block_prefix + ".")

    def where(self, fqn: str) -> str:
        """"last" (inside the last block, kept gathered after forward), "block", or "root"
        (embedding, final norm, lm_head: the root FSDP unit)."""
        if fqn.startswith(f"{self.block_prefix}.{self.num_blocks - 1}."):
            return "last"
        return "block" if self.in_block(fqn) else "root"

    def with_lora(self, targets: Iterable[str]) -> ModelRoles:
        return replace(self, lora_targets=tuple(targets))


# what a decoder block calls its attention (compiler/model.py refuses a block with neither):
# Llama-style self_attn, GPT-NeoX attention. Sequence parallel gathers its input (runtime/parallel.py).
ATTENTION_NAMES = ("self_attn", "attention")


def attention_name(block) -> str | None:
    """The attention child of a decoder block (any object with attributes), or None."""
    return next((n for n in ATTENTION_NAMES if hasattr(block, n)), None)


# Grouped MoE experts (transformers 5: one module, 3-D gate_up_proj (E, 2I, H) and down_proj
# (E, H, I)) are targeted by parameter, named as PEFT's LoraConfig(target_parameters=[...]) does,
# relative to the experts module: lora.targets "experts.gate_up_proj", "experts.down_proj". Their
# fqn in roles.lora_targets is the parameter's: "model.layers.0.mlp.experts.gate_up_proj".
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def is_expert_target(fqn: str) -> bool:
    """A LoRA target fqn that is a grouped experts parameter (not a Linear module)."""
    return any(fqn.endswith(f".experts.{p}") for p in EXPERT_PARAMS)


def target_name(fqn: str) -> str:
    """What recipe lora.targets calls a target: a Linear's leaf (q_proj) or "experts.gate_up_proj"."""
    return ".".join(fqn.rsplit(".", 2)[-2:]) if is_expert_target(fqn) else fqn.rpartition(".")[2]


# what a decoder block calls its feed-forward part: Llama-style mlp, Granite-MoE's block_sparse_moe
# (router + grouped experts), Llama-4's feed_forward. Sequence parallel gathers its input too.
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")


def mlp_name(block) -> str | None:
    """The MLP child of a decoder block, or None."""
    return next((n for n in MLP_NAMES if hasattr(block, n)), None)


# grouped experts that store gate_up_proj transposed, (E, H, 2I), and down_proj (E, I, H), without
# transformers' is_transposed attribute (use_experts_implementation): Llama-4's
TRANSPOSED_EXPERTS = frozenset({"Llama4TextExperts"})


def transposed_experts(module) -> bool:
    """By class, through the MRO: FSDP2's fully_shard swaps in a subclass (FSDPLlama4TextExperts)."""
    return bool(getattr(module, "is_transposed", False)) or any(c.__name__ in TRANSPOSED_EXPERTS
                                                                for c in type(module).__mro__)


def lora_target_fqns(linears: Iterable[str], leaves: Iterable[str] | None, lm_head: str,
                     experts: Iterable[str] = ()) -> tuple[str, ...]:
    """The rule for recipe lora.targets: every Linear whose leaf name (q_proj, ...) is listed,
    never the lm_head, then the grouped experts parameters listed ("experts.gate_up_proj") of
    every experts module (leaves None: every Linear but the lm_head and every experts
    parameter; the router is no Linear and never a target, as in PEFT). `linears`, `experts`:
    the fqns of the model's Linear and grouped experts modules, in module order."""
    want = None if leaves is None else set(leaves)
    lin = tuple(f for f in linears if f != lm_head and (want is None or f.rpartition(".")[2] in want))
    return lin + tuple(f"{e}.{p}" for e in experts for p in EXPERT_PARAMS
                       if want is None or f"experts.{p}" in want)


def plan_roles(plan) -> ModelRoles:
    """plan.model.roles, or for a plan.json written before roles existed (a run being exported)
    the roles every model meshbake built then had: the compiler required model.layers[i] and
    an output embedding, which transformers names lm_head in each supported family; the LoRA
    targets by the same leaf-name rule over the placements (which list every Linear)."""
    r = getattr(plan.model, "roles", None)
    if r is not None:              # runtime.plan.from_dict built it (sections.build)
        return r
    legacy = ModelRoles("model.embed_tokens", "lm_head", "model.norm", "model.layers",
                        plan.model.config["num_hidden_layers"], plan.model.tie_word_embeddings)
    if not plan.lora.rank:
        return legacy
    return legacy.with_lora(lora_target_fqns(plan.tp.placements, plan.lora.targets, legacy.lm_head))


# style -> {tensor: the dim a tp rank holds 1/tp of}; a tensor not listed is whole on every tp rank.
# Tensors by their layout: "linear" weight (out, in) and "linear.bias" (out,); "embedding" (vocab,
# hidden); "norm" (width,); grouped experts "experts" = gate_up_proj (E, 2I, H) and
# "experts.down_proj" (E, H, I). Rowwise splits a module's input: a Linear's in features, an
# Embedding's vocab (its input is the token id).
SHARD_DIM: Mapping[str, Mapping[str, int]] = {
    "colwise": {"linear": 0, "linear.bias": 0},          # out features (lm_head: the vocab)
    "colwise_qkv": {"linear": 0, "linear.bias": 0},      # fused rows in meshbake's order (runtime/fused.py)
    "colwise_gate_up": {"linear": 0, "linear.bias": 0},
    "rowwise": {"linear": 1, "embedding": 0},             # its bias is added after the reduce: whole
    "colwise_norm": {"norm": 0},                          # like its projection's rows (OLMo-2 q/k norm)
    "experts": {"experts": 1, "experts.down_proj": 2},    # each expert's intermediate dim
    "sinks": {"sinks": 0},                                # GPT-OSS attention sinks: one per q head
    "sequence_parallel": {},                              # the activations are split, not the weight
    "local_heads": {},
    "replicate": {},
    "latent": {},                                         # MLA down-projection: whole (runtime/parallel.py)
}


def shard_dim(style: str, tensor: str) -> int | None:
    return SHARD_DIM[style].get(tensor)


def local_shape(shape: tuple[int, ...], tensor: str, style: str, tp: int) -> tuple[int, ...]:
    """What one tp rank holds of a tensor of `shape` placed `style`."""
    return _split(shape, shard_dim(style, tensor), tp)


def _split(shape: tuple[int, ...], dim: int | None, tp: int) -> tuple[int, ...]:
    return tuple(n // tp if i == dim else n for i, n in enumerate(shape))


def lora_dims(style: str) -> tuple[int | None, int | None]:
    """(lora_A dim, lora_B dim) split over tp beside a Linear placed `style`. B A (out x in)
    takes W's layout with no new communication: W's out dim is B's rows (A whole), W's in dim
    is A's columns (B whole)."""
    d = shard_dim(style, "linear")
    return (1 if d == 1 else None, 0 if d == 0 else None)


def expert_lora_dims(w_dim: int | None) -> tuple[int | None, int | None]:
    """(lora_A (E, r, in) dim, lora_B (E, out, r) dim) split beside a grouped expert weight
    W (E, out, in) split on `w_dim` (None: whole): by expert index (ep, dim 0) both; on out
    (tp, gate_up_proj's 2I) B's rows; on in (tp, down_proj's I) A's columns."""
    return {None: (None, None), 0: (0, 0), 1: (None, 1), 2: (2, None)}[w_dim]


def lora_shapes(weight: tuple[int, int], style: str, rank: int, tp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_A (r x in), lora_B (out x r)) as one tp rank holds them: at tp 8 on a colwise
    q_proj 8192 x 8192, r 16: A 16 x 8192 whole, B 1024 x 16."""
    out, inp = weight
    a_dim, b_dim = lora_dims(style)
    return _split((rank, inp), a_dim, tp), _split((out, rank), b_dim, tp)
