"""model stage: HF config.json facts + the module tree of the real transformers class.

The module list is never hand-written: the model class transformers maps the config to is
instantiated on the meta device (no memory, ~0.8 s for 70B) and walked. What we keep per
module is what later stages need: its kind, its weight shape and its parameter count.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.runtime.roles import ModelRoles, attention_name, lora_target_fqns, mlp_name, transposed_experts

CATALOG_DIR = Path(__file__).parent / "catalog"


@dataclass(frozen=True)
class ModuleInfo:
    fqn: str                      # "model.layers.3.self_attn.q_proj"
    kind: str                     # "linear" | "embedding" | "norm" | "experts" | "router" | "sinks" | "other"
    shape: tuple[int, ...]        # weight shape: Linear (out, in), Embedding (vocab, hidden);
                                  # experts: gate_up_proj as (E, 2I, H) (GPT-OSS stores (E, H, 2I): read
                                  # transposed); sinks: (heads,); other: its first parameter
    numel: int                    # parameters directly owned (weight + bias; experts: gate_up + down
                                  # (+ their biases))


def expert_matrices(m: ModuleInfo) -> dict[str, tuple[int, int, int]]:
    """{parameter: (E, out, in)} of a grouped experts module: gate_up_proj (E, 2I, H) is its
    ModuleInfo shape, down_proj (E, H, I) the rest of its parameter count."""
    e, two_i, h = m.shape
    return {"gate_up_proj": (e, two_i, h), "down_proj": (e, h, (m.numel - e * two_i * h) // (e * h))}


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
    roles: ModelRoles             # embedding, lm_head, final norm, decoder blocks (no LoRA targets yet)
    # --- added for the model matrix (issue 11); defaults keep older callers valid
    attn_implementation: str = "sdpa"        # what transformers supports for this class (sdpa, else eager)
    # fused fqn -> "qkv" | "gate_up" | "experts" | "qkv_heads" | "experts_hf" | "experts_t"
    layouts: Mapping[str, str] = field(default_factory=dict)
    active_params: int = 0        # parameters one token goes through (MoE: top-k of E experts); 0 = num_params
    num_experts: int = 0
    experts_per_token: int = 0
    # every parameter as named_parameters() yields it (a tied lm_head once, as the embedding) with
    # its HF shape: what the runtime loader reads from model.weights (compiler/weights.py checks it)
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    router_aux_loss: bool = True  # the HF CausalLM adds a load-balancing loss (DeepSeek-V3's: none)

    def lora_targets(self, leaves: tuple[str, ...] | None) -> tuple[str, ...]:
        """The fqns recipe lora.targets (leaf names, "experts.gate_up_proj") adapt (runtime/roles.py's
        rule); None: every Linear and grouped experts parameter that may carry an adapter."""
        return lora_target_fqns((m.fqn for m in self.modules if m.kind == "linear"), leaves, self.roles.lm_head,
                                (m.fqn for m in self.modules if m.kind == "experts" and self.layouts.get(m.fqn) == "experts"))


def catalog_names() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.json"))


# tokens of a model name that do not change the architecture (config.json facts)
_VARIANT_TOKENS = {"instruct", "it", "hf", "chat", "base", "sft", "dpo", "pt", "meta"}
_SIZE = re.compile(r"\d+(\.\d+)?[bm]|\d+x\d+(\.\d+)?b")
_VERSION = re.compile(r"v?\d+(\.\d+)*")


@dataclass(frozen=True)
class NameKey:
    """A model name parsed into family, version, size and the other tokens:
    'NousResearch/Meta-Llama-3.1-8B-Instruct' -> (llama, 3.1, 8b, {}), 'Mixtral-8x7B-v0.1' ->
    (mixtral, 0.1, 8x7b, {}), 'qwen2.5-7b' -> (qwen, 2.5, 7b, {}), 'phi-3-mini-4k' -> (phi, 3, '', {mini, 4k})."""
    family: str
    version: str | None
    size: str
    rest: frozenset[str]


def name_key(name: str) -> NameKey:
    base = str(name).replace("\\", "/").rstrip("/").rpartition("/")[2].lower()
    family, version, size, rest = "", None, "", set()
    for tok in (t for t in re.split(r"[-_ ]+", base) if t):
        if tok in _VARIANT_TOKENS:
            continue
        if not family:
            m = re.fullmatch(r"([a-z]+)(\d+(\.\d+)*)?", tok)
            if m:
                family, version = m.group(1), m.group(2) or version
                continue
        if not size and _SIZE.fullmatch(tok):
            size = tok
        elif version is None and _VERSION.fullmatch(tok):
            version = tok.removeprefix("v")
        else:
            rest.add(tok)
    return NameKey(family or base, version, size, frozenset(rest))


def _same_line(a: NameKey, b: NameKey) -> bool:
    """Same family and version (an unversioned name is every version of its family)."""
    return a.family == b.family and (a.version is None or b.version is None or a.version == b.version)


def catalog_match(name: str, names: list[str]) -> str | None:
    """The catalog entry that is `name`'s architecture: same family, version and size, and every
    distinguishing token of the entry present in the name ('Mixtral-8x7B-v0.1' -> 'mixtral-8x7b';
    'Mistral-7B-v0.1' is not 'mistral-7b-v0.3': another version, another vocab)."""
    k = name_key(name)
    hits = [c for c in names if _same_line(k, ck := name_key(c)) and ck.size == k.size and ck.rest <= k.rest
            and (k.size or ck.rest)]
    return hits[0] if len(hits) == 1 else None


def catalog_near(name: str, names: list[str], n: int = 2) -> list[str]:
    """'did you mean' candidates for a name that is not in the catalog: only entries of the same
    family and version (another family or version has other config.json facts: vocab, rope, heads)."""
    import difflib

    k = name_key(name)
    same = [c for c in names if _same_line(k, name_key(c))]
    return difflib.get_close_matches(str(name).lower(), same, n=n, cutoff=0.0) if k.family else []


def _kind(module) -> str | None:
    """What a module that owns parameters is; None if it owns none (containers)."""
    import torch.nn as nn

    if not any(True for _ in module.parameters(recurse=False)):
        return None
    if isinstance(module, nn.Linear):
        # Llama-4's Llama4Router is an nn.Linear (E x H) whose forward routes: a router, not a
        # Linear to split or adapt
        return "router" if type(module).__name__ in LINEAR_ROUTERS else "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    name = type(module).__name__
    if name.endswith(("RMSNorm", "LayerNorm")):
        return "norm"
    own = dict(module.named_parameters(recurse=False))
    # transformers 5 grouped experts: one module, 3-D gate_up_proj (E, 2I, H) + down_proj (E, H, I)
    # (GPT-OSS: transposed, (E, H, 2I) + (E, I, H), with a bias each)
    if {"gate_up_proj", "down_proj"} <= set(own) <= EXPERT_PARAMS and own["gate_up_proj"].ndim == 3:
        return "experts"
    if name in SINK_OWNERS and set(own) == {"sinks"}:
        return "sinks"
    if name.endswith("Router") and set(own) <= {"weight", "bias"}:
        return "router"
    return "other"


EXPERT_PARAMS = {"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"}
LINEAR_ROUTERS = {"Llama4Router"}
# attentions whose per-head `sinks` parameter was read in transformers 5.24: GPT-OSS's eager
# attention appends sinks.reshape(1, -1, 1, 1) as one more logit column per head (softmax over
# [scores | sink], then the sink column dropped), so head h's sink goes with head h's q rows
SINK_OWNERS = {"GptOssAttention"}


def _shape(module, kind: str) -> tuple[int, ...]:
    if kind == "experts":
        e, a, b = module.gate_up_proj.shape
        # one convention for every later stage (placements, estimate, PLAN.md): (E, 2I, H)
        return (e, b, a) if transposed_experts(module) else (e, a, b)
    w = getattr(module, "weight", None)
    return tuple(w.shape) if w is not None else tuple(next(module.parameters(recurse=False)).shape)


# classes whose forward splits a fused [q|k|v] / [gate|up] contiguously (read in transformers
# 5.24: Phi-3's qkv_proj.split and gate_up_proj.chunk(2, -1), GLM / GLM-4's gate_up_proj.chunk(2, -1));
# other fused projections (CodeGen's mp-interleaved qkv, ...) are refused under tp
FUSED_OWNERS = {"Phi3Attention", "Phi3MLP", "GlmMLP", "Glm4MLP"}
# classes whose fused qkv rows are per head [q_h | k_h | v_h] for h in heads (GPT-NeoX:
# query_key_value(x).view(..., -1, 3 * head_dim).chunk(3, -1)): a contiguous row block of whole
# heads is already what a tp rank needs, so HF's order is kept and a plain colwise split is right
HEAD_INTERLEAVED_OWNERS = {"GPTNeoXAttention"}
FUSED_NAMES = ("qkv_proj", "gate_up_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")
# MoE blocks whose forward was read and is replaced by meshbake's in HF's own expert layout
# ("experts_hf"): GPT-OSS's GptOssMLP routes with `router` (logits, top-k softmax scores, indices),
# runs GptOssExperts (gate_up_proj (E, H, 2I) with gate / up interleaved as columns 0::2 / 1::2, a
# clamped SwiGLU (up + 1) * gate * sigmoid(alpha gate), biases on both projections) and returns
# (hidden, router_scores). The interleaved columns are already (gate_i, up_i) pairs: a Shard of
# the 2I dim keeps whole pairs, so nothing is reordered (runtime/fused.py)
HF_LAYOUT_MOE_OWNERS = {"GptOssMLP"}
# Llama-4's Llama4TextMoe (read in 5.24): router = Llama4Router (a Linear; sigmoid of the top-k
# logits, 0 elsewhere), every expert runs on the input scaled by its score (x * s, not the output
# times s: the same as top-k dispatch of the scaled rows, since an expert maps 0 to 0), plus a
# shared_expert MLP on every token; returns (hidden, router_logits). Its experts gate_up_proj
# (E, H, 2I) is [gate | up] along the last dim: stored as (gate_i, up_i) column pairs ("experts_t")
SCALED_INPUT_MOE_OWNERS = {"Llama4TextMoe"}


def _layouts(model, modules) -> dict[str, str]:
    """Fused parameters meshbake stores in its own TP-friendly row order (runtime/fused.py):
    a qkv_proj [q | k | v] (out = (H + 2 KV) x D), a gate_up_proj [gate | up] (out = 2 I), and
    grouped experts; and "qkv_heads", a fused qkv whose HF rows are already per head (kept in
    HF order). Recognised by their shapes against the config, where the owner's forward was read."""
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    out = {}
    for m in modules:
        leaf = m.fqn.rpartition(".")[2]
        owner = type(model.get_submodule(m.fqn.rpartition(".")[0])).__name__
        if m.kind == "linear" and owner in HEAD_INTERLEAVED_OWNERS:
            if leaf == "query_key_value" and kv == heads and m.shape[0] == 3 * heads * hd:
                out[m.fqn] = "qkv_heads"
            continue
        if m.kind == "linear" and owner not in FUSED_OWNERS:
            continue          # a fused layout is only assumed where its forward was read (below)
        if m.kind == "experts":
            block = model.get_submodule(m.fqn.rpartition(".")[0])
            if type(block).__name__ in HF_LAYOUT_MOE_OWNERS and _hf_layout_experts(block):
                out[m.fqn] = "experts_hf"
            elif type(block).__name__ in SCALED_INPUT_MOE_OWNERS and _scaled_input_block(block):
                out[m.fqn] = "experts_t"
            elif _plain_moe_block(block):
                out[m.fqn] = "experts"
        elif m.kind == "linear" and leaf == "qkv_proj" and m.shape[0] == (heads + 2 * kv) * hd:
            out[m.fqn] = "qkv"
        elif m.kind == "linear" and leaf == "gate_up_proj" and m.shape[0] == 2 * c.intermediate_size:
            out[m.fqn] = "gate_up"
    return out


# the MoE block forms runtime/fused.py's forward runs: a router child (MOE_ROUTERS) + grouped
# `experts`, found by structure (Mixtral / Qwen3-MoE: gate; Granite-MoE: router); and blocks with
# shared experts whose forward was read (transformers 5.24), by class: {block class: children
# beside router + experts}. Qwen2-MoE adds shared_expert(x) * sigmoid(shared_expert_gate(x))
# (an H -> 1 Linear); DeepSeek-V3 adds shared_experts(x) ungated, and its router (sigmoid scores +
# e_score_correction_bias, group-limited top-k, routed_scaling_factor) is called as it is.
# GLM-4-MoE's Glm4MoeMoE is DeepSeek-V3's block line for line (read in 5.24: the same forward,
# Glm4MoeTopkRouter the same code as DeepseekV3TopkRouter, the same ungated shared_experts MLP)
# under a Llama-style q/k/v attention (biases, partial rotary, optional per-head qk-norm).
MOE_ROUTERS = ("gate", "router")
READ_MOE_BLOCKS = {"Qwen2MoeSparseMoeBlock": {"shared_expert", "shared_expert_gate"},
                   "DeepseekV3MoE": {"shared_experts"}, "Glm4MoeMoE": {"shared_experts"}}


def _plain_moe_block(block) -> bool:
    """A router + grouped experts block (+ the shared experts of READ_MOE_BLOCKS) and nothing
    else (no other children). runtime/fused.py replaces such a block's forward; any other MoE
    block is left to transformers and refused under tp."""
    import inspect

    kids = dict(block.named_children())
    router = next((n for n in MOE_ROUTERS if n in kids), None)
    extra = set(kids) - {router, "experts"}
    read = READ_MOE_BLOCKS.get(type(block).__name__)
    if router is None or "experts" not in kids or extra not in (set(), read):
        return False
    rname = type(kids[router]).__name__
    if not (rname.endswith("TopKRouter") or (read and rname.lower().endswith("topkrouter"))):
        return False
    if extra and not all(_is_gated_mlp(kids[n]) for n in extra if n.startswith("shared_expert") and n != "shared_expert_gate"):
        return False
    gate = kids.get("shared_expert_gate")
    if gate is not None and not (type(gate).__name__ == "Linear" and gate.out_features == 1 and gate.bias is None):
        return False
    # router(hidden_states) alone (MiniMax-M2's also wants a score-correction bias buffer)
    router_args = list(inspect.signature(type(kids[router]).forward).parameters)[1:]
    return (router_args == ["hidden_states"] and not any(True for _ in block.parameters(recurse=False))
            and not any(True for _ in block.buffers(recurse=False)) and hasattr(kids["experts"], "act_fn"))


def _is_gated_mlp(mlp) -> bool:
    """down(act(gate(x)) * up(x)) with bias-free Linears (Qwen2MoeMLP), nothing else."""
    import torch.nn as nn

    kids = dict(mlp.named_children())
    return (set(kids) == {"gate_proj", "up_proj", "down_proj", "act_fn"} and hasattr(mlp, "act_fn")
            and all(isinstance(kids[n], nn.Linear) and kids[n].bias is None for n in ("gate_proj", "up_proj", "down_proj")))


def _hf_layout_experts(block) -> bool:
    """GPT-OSS's form exactly: router + experts, interleaved transposed experts with both biases."""
    kids = dict(block.named_children())
    if set(kids) != {"router", "experts"} or not type(kids["router"]).__name__.endswith("TopKRouter"):
        return False
    ex = kids["experts"]
    own = {n for n, _ in ex.named_parameters(recurse=False)}
    return (own == EXPERT_PARAMS and getattr(ex, "is_transposed", False) and not getattr(ex, "is_concatenated", True)
            and hasattr(ex, "_apply_gate") and not any(True for _ in block.parameters(recurse=False)))


def _scaled_input_block(block) -> bool:
    """Llama-4's form exactly: router (Linear, no bias) + transposed concatenated experts without
    biases + a shared_expert MLP of gate / up / down Linears."""
    kids = dict(block.named_children())
    if set(kids) != {"router", "experts", "shared_expert"} or type(kids["router"]).__name__ not in LINEAR_ROUTERS:
        return False
    ex, sh = kids["experts"], kids["shared_expert"]
    return ({n for n, _ in ex.named_parameters(recurse=False)} == {"gate_up_proj", "down_proj"}
            and transposed_experts(ex) and hasattr(ex, "act_fn") and kids["router"].bias is None
            and {n for n, _ in sh.named_children()} >= {"gate_proj", "up_proj", "down_proj"}
            and not any(True for _ in block.parameters(recurse=False)))


def _attn_implementation(model) -> str:
    """sdpa where transformers supports it; else eager (Gemma-2: sdpa has no logit
    soft-capping, and flex attention has no CPU backward)."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def _moe_facts(model, modules, num_params: int) -> tuple[int, int, int]:
    """(active params per token, experts, experts per token): a token runs k of E experts."""
    c = model.config
    e = next((m.shape[0] for m in modules if m.kind == "experts"), 0)
    k = getattr(c, "num_experts_per_tok", 0) or 0
    if not e or not k:
        return num_params, 0, 0
    experts = sum(m.numel for m in modules if m.kind == "experts")
    return num_params - experts + experts * k // e, e, k


# The facts every later stage reads, with bounds. Without them transformers fills in its own
# defaults (a bare {"model_type": "llama"} silently became Llama-2-7B), and absurd values hang
# the meta-device build (its cost grows faster than linearly in layers: 256 layers 0.8 s, 512 3 s)
# or divide by zero. The bounds are ~2-4x the largest real models (Llama-3.1-405B: hidden 16384,
# 126 layers, 128 heads, intermediate 53248; Gemma vocab 262144).
FACTS = {"hidden_size": 65536, "num_hidden_layers": 256, "num_attention_heads": 1024,
         "intermediate_size": 262144, "vocab_size": 4194304}
OPTIONAL_FACTS = {"num_key_value_heads": 1024, "head_dim": 4096, "max_position_embeddings": 1 << 24}


# model_types whose module tree the runtime drives and whose parity the dist tests cover
# (tests/models/<model_type>/, README "Model families"). Others fail late: BERT's
# BertLMHeadModel has no model.layers; a family nobody ran may hold a plain tensor the TP
# DTensors cannot mix with. Adding one here means adding its tests/models fixture. The other
# types accepted are the ones `make zoo` trained with parity (compiler/zoo.json, zoo_types()).
SUPPORTED_TYPES = ("deepseek_v3", "gemma2", "gemma3_text", "glm", "glm4", "glm4_moe", "gpt_neox", "gpt_oss",
                   "granitemoe", "llama", "llama4_text", "mistral", "mixtral", "olmo2", "phi3", "qwen2", "qwen2_moe",
                   "qwen3", "qwen3_moe")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_errors(model_type: Any, source: str) -> list[RecipeError]:
    """model_type must name a decoder transformers can build as a causal LM (short hints, not
    transformers' 12 KB list of every model type)."""
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str) or not model_type:
        return [RecipeError("model.config", f"{source}: config.json has no model_type",
                            "point model.config at a Hugging Face config.json")]
    if model_type not in CONFIG_MAPPING_NAMES:
        near = difflib.get_close_matches(model_type, sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
        return [RecipeError("model.config", f"{source}: model_type {model_type!r} is unknown to transformers "
                            f"(it knows {len(CONFIG_MAPPING_NAMES)} model types, "
                            f"{len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} of them causal LMs)",
                            f"did you mean {' or '.join(map(repr, near))}?" if near else
                            "use a decoder config.json such as llama, mistral or qwen2")]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [RecipeError("model.config", f"{source}: model_type {model_type!r} is not a causal LM "
                            "(encoder, encoder-decoder or vision model)",
                            "meshbake trains decoder-only CausalLM architectures (llama, mistral, qwen2, ...)")]
    if model_type in SUPPORTED_TYPES or model_type in zoo_types():
        return []
    zoo = _zoo()
    row = zoo["types"].get(model_type)
    proven = f"the parity matrix ({', '.join(SUPPORTED_TYPES)}) and the zoo's {len(zoo_types())} more (docs/MODELS.md)"
    if row is None:
        why = f"`make zoo` has no result for it (its last sweep ran transformers {zoo['transformers']})"
    elif row["run"] == "parity":
        why = (f"`make zoo` proved it on transformers {zoo['transformers']}, and transformers "
               f"{_installed()} is installed")
    elif row["compile"] == "refused":
        why = f"`make zoo` refused it: {row['reason']}"
    elif row["compile"] == "compiled":
        why = f"`make zoo` trained it without matching one process: {row['run']} {row['reason']}".rstrip()
    else:
        why = f"`make zoo` could not build it: {row['compile']} {row['reason']}".rstrip()
    return [RecipeError("model.config", f"{source}: model_type {model_type!r} is not one meshbake runs: {why}",
                        f"meshbake runs {proven}; `make zoo` re-proves the list for the installed transformers")]


def _installed() -> str:
    import transformers

    return transformers.__version__


@functools.cache
def _zoo() -> dict[str, Any]:
    """The last `make zoo` sweep (scripts/zoo.py writes it with docs/MODELS.md): per model_type its
    compile outcome and whether 3 steps at dp_shard 2 x tp 2 + SP + LP matched one process."""
    return json.loads((Path(__file__).parent / "zoo.json").read_text(encoding="utf-8"))


def zoo_types() -> frozenset[str]:
    """Types the zoo trained with parity, accepted only under the transformers minor version the
    sweep ran (another version may build the same type differently)."""
    zoo = _zoo()
    if zoo["transformers"].split(".")[:2] != _installed().split(".")[:2]:
        return frozenset()
    return frozenset(t for t, r in zoo["types"].items() if r["run"] == "parity")


def fact_errors(config: Mapping[str, Any], source: str) -> list[RecipeError]:
    """The size facts are present, integers and within bounds, and consistent with each other."""
    errs = []
    if isinstance(config.get("text_config"), Mapping):
        return [RecipeError("model.config", f"{source}: model_type {config.get('model_type')!r} is a multimodal "
                            "config (the decoder's facts are under text_config)",
                            "write the text_config part as its own config.json (its model_type, e.g. "
                            "gemma3_text) and point model.config at it")]
    missing = [k for k in FACTS if k not in config]
    if missing:
        errs.append(RecipeError("model.config", f"{source}: config.json lacks {', '.join(missing)}",
                                "give the model's real sizes; transformers would silently fill in the defaults "
                                f"of some other {config.get('model_type')} model"))
    for k, top in {**FACTS, **OPTIONAL_FACTS}.items():
        v = config.get(k)
        if k not in config or (v is None and k in OPTIONAL_FACTS):
            continue
        if not _is_int(v) or not 1 <= v <= top:
            errs.append(RecipeError("model.config", f"{source}: {k} is {json.dumps(v, default=repr)}",
                                    f"{k} must be an integer from 1 to {top:,}"))
    if errs:
        return errs
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        errs.append(RecipeError("model.config", f"{source}: hidden_size {config['hidden_size']} is not divisible "
                                f"by num_attention_heads {heads}", "give head_dim, or fix the sizes"))
    if heads % kv:
        errs.append(RecipeError("model.config", f"{source}: num_attention_heads {heads} is not a multiple of "
                                f"num_key_value_heads {kv}", "each kv head serves a whole group of query heads"))
    return errs


def _layers(model):
    """The decoder blocks: the base model's `layers` (model.model.layers; GPT-NeoX's
    model.gpt_neox.layers), or None."""
    base = getattr(model, "base_model", None)
    if base is model:
        # Llama-4's text model: base_model_prefix "language_model" names the attribute of the
        # multimodal wrapper, and Llama4ForCausalLM holds its decoder as .model
        base = getattr(model, "model", None)
    return getattr(base, "layers", None) if base is not None else None


def _structure_error(model, num_layers: int, model_type: str, source: str) -> RecipeError | None:
    """The runtime drives the base model's layers[i] with an attention (self_attn; GPT-NeoX's
    attention, runtime/roles.ATTENTION_NAMES) and an mlp (Granite-MoE's block_sparse_moe,
    runtime/roles.MLP_NAMES), and the output embedding (lm_head)."""
    import torch.nn as nn

    layers = _layers(model)
    ok = (isinstance(layers, nn.ModuleList) and len(layers) == num_layers
          and all(attention_name(b) and mlp_name(b) for b in layers)
          and isinstance(model.get_output_embeddings(), nn.Linear))
    if ok:
        return None
    mixer = _recurrent_mixer_error(model, layers, model_type, source) if isinstance(layers, nn.ModuleList) else None
    return mixer or RecipeError("model.config", f"{source}: model_type {model_type!r} builds {type(model).__name__}, "
                                "which is not a Llama-style decoder (model.layers[i].self_attn / .mlp and an lm_head)",
                                "meshbake trains decoders such as llama, mistral, qwen2")


# parameters that mark a recurrent (state-space / linear-attention) token mixer: Mamba-2 and the
# gated delta rule (Qwen3-Next's Qwen3NextGatedDeltaNet, read in transformers 5.24) keep a per-head
# decay A_log and step bias dt_bias, beside a depthwise causal conv1d over the sequence
RECURRENT_PARAMS = ("A_log", "dt_bias")


def _recurrent_mixer_error(model, layers, model_type: str, source: str) -> RecipeError | None:
    """Blocks whose token mixer is a recurrence over the sequence instead of attention (hybrid
    models: Qwen3-Next's linear_attn on 3 of 4 layers): named with their parameter paths and the
    structural reason they are not run (a cp shard would cut the recurrence; a tp split needs a
    per-head map of the fused projections' rows (Qwen3-Next: in_proj_qkvz / in_proj_ba, grouped per
    key head) and of the depthwise conv1d's [q | k | v] channels, not built or parity-tested here)."""
    import torch.nn as nn

    names = {id(mod): fqn for fqn, mod in model.named_modules()}
    hits = []
    for i, block in enumerate(layers):
        if attention_name(block):
            continue
        for child in block.children():
            own = [n for n, _ in child.named_parameters()]
            if any(n.rpartition(".")[2] in RECURRENT_PARAMS for n in own):
                hits.append((i, names[id(child)], type(child).__name__, own))
    if not hits:
        return None
    i, fqn, cls, own = hits[0]
    layer_ids = sorted({h[0] for h in hits})
    pattern = re.sub(r"\.\d+\.", ".*.", fqn, count=1)
    mixer = model.get_submodule(fqn)
    linears = [n for n, m in mixer.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in mixer.named_modules() if isinstance(m, nn.Conv1d)]
    return RecipeError(
        "model.config",
        f"{source}: model_type {model_type!r} builds {type(model).__name__}, whose layers {layer_ids} mix tokens "
        f"by a recurrence, not attention: {pattern} ({cls}: {', '.join(own)}). Its state runs along the whole "
        "sequence, so a cp shard would cut it; a tp split by heads needs a map of the rows of its projections "
        f"({', '.join(linears)})" + (f" and of {'/'.join(convs)}'s channels" if convs else "")
        + ", not built or parity-tested in meshbake, whose runtime drives attention (self_attn) blocks only",
        "meshbake trains attention decoders (llama, qwen3, qwen3_moe, ...); train this hybrid model with a "
        "framework that implements its linear-attention layers")


# config.json keys transformers resolves to code: an attention or experts implementation of the
# form "org/repo" is a Hub kernel that building the model downloads and runs (transformers'
# integrations/hub_kernels.is_kernel). meshbake picks the attention itself (ModelSpec.attn_implementation,
# set on the config by the runtime), so these keys are dropped when config.json is read and
# before every transformers build, and never recorded in plan.json. The runtime drops the same
# set (runtime/parallel.py KERNEL_KEYS; a test holds the two equal).
KERNEL_KEYS = frozenset({"attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                         "experts_implementation", "_experts_implementation", "_experts_implementation_internal"})


def without_kernel_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """config without KERNEL_KEYS, in nested sub-configs too (transformers sets them recursively).
    A copy of the top level; a nested dict is copied only when it held such a key, else it is the
    same object, as before (transformers normalizes rope_scaling in place, and plan.json records
    the result: the goldens hold rope_theta inside it)."""
    return {k: _nested(v) for k, v in config.items() if k not in KERNEL_KEYS}


def _nested(v: Any) -> Any:
    if not isinstance(v, Mapping):
        return v
    out = without_kernel_keys(v)
    return v if out == v else out


# config.json text (and torch's default dtype) -> (the meta model, what building it changed in the
# caller's config). Building the meta model is most of a compile: llama-3.1-70b's 80 layers take
# ~0.1 s (every Linear's kaiming init dispatched on meta tensors), and the test suite, `meshbake
# suggest` over recipes and a CLI session compile the same few configs thousands of times. The
# compiler only reads the model (modules, parameter shapes, config), so one instance is shared.
_META: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}
_META_SIZE = 16          # a 70B meta model is a few MB of module objects; a full cache is cleared


def _meta_model(config: Mapping[str, Any]):
    """The HF model of a config.json dict on the meta device, cached by the dict's content. The
    build changes the caller's dict in place (transformers writes rope_theta into a llama3
    rope_scaling) and plan.json records that: a cache hit makes the same change."""
    import copy

    import torch

    key = (json.dumps(config, sort_keys=True, default=repr), str(torch.get_default_dtype()))
    hit = _META.get(key)
    if hit is None:
        model = _build_meta_model(config)
        before, after = json.loads(key[0]), json.loads(json.dumps(config, sort_keys=True, default=repr))
        if len(_META) >= _META_SIZE:
            _META.clear()
        hit = _META[key] = (model, {k: v for k, v in after.items() if before.get(k, _MISSING) != v})
    model, changed = hit
    for k, v in changed.items():          # only on a hit is anything left to change
        if isinstance(config.get(k), dict) and isinstance(v, dict) and config[k] != v:
            config[k].clear()
            config[k].update(copy.deepcopy(v))
        elif config.get(k, _MISSING) != v:
            config[k] = copy.deepcopy(v)        # type: ignore[index]  # a top-level change (none seen in 5.24)
    return model


_MISSING = object()


def _build_meta_model(config: Mapping[str, Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = without_kernel_keys(config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def model_spec(config: Mapping[str, Any], source: str) -> Result[ModelSpec]:
    """Build the ModelSpec of a config.json dict; errors point at model.config."""
    model_type = config.get("model_type")
    errs = _type_errors(model_type, source) or fact_errors(config, source)
    if errs:
        return Err(tuple(errs))
    try:
        model = _meta_model(config)
    except Exception as e:      # noqa: BLE001 any config transformers refuses (its classes raise anything)
        first = (str(e).splitlines() or [""])[0][:300]
        return Err((RecipeError("model.config", f"{source}: transformers cannot build model_type "
                                f"{model_type!r} from this config.json ({type(e).__name__}: {first})",
                                "check the config.json values"),))
    bad = _structure_error(model, config["num_hidden_layers"], model_type, source)
    if bad is not None:
        return Err((bad,))
    modules = tuple(
        ModuleInfo(fqn, kind, _shape(mod, kind), sum(p.numel() for p in mod.parameters(recurse=False)))
        for fqn, mod in model.named_modules()
        if (kind := _kind(mod)) is not None
    )
    try:
        return _spec(model, config, source, model_type, modules)
    except (AttributeError, TypeError) as e:     # a config without the decoder facts we read
        return Err((RecipeError("model.config", f"{source}: {model_type} config lacks a fact meshbake needs ({e})",
                                "meshbake supports decoder-only CausalLM configs with hidden_size, "
                                "num_attention_heads and num_hidden_layers"),))


def _spec(model, config, source: str, model_type: str, modules) -> ModelSpec:
    c = model.config
    heads = c.num_attention_heads
    num_params = sum(p.numel() for p in model.parameters())
    active, n_exp, k_exp = _moe_facts(model, modules, num_params)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    return ModelSpec(
        source=source,
        config=_portable(config),
        architecture=type(model).__name__,
        model_type=model_type,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        intermediate_size=_intermediate(c),
        vocab_size=c.vocab_size,
        max_position_embeddings=getattr(c, "max_position_embeddings", 0) or 0,
        tie_word_embeddings=tied,
        num_params=num_params,
        modules=modules,
        hf_tp_plan=_tp_plan(model, modules),
        roles=_roles(model, modules, tied),
        attn_implementation=_attn_implementation(model),
        layouts=_layouts(model, modules),
        active_params=active,
        num_experts=n_exp,
        experts_per_token=k_exp,
        params=tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
        # Mixtral / Qwen-MoE / Granite-MoE CausalLMs hold router_aux_loss_coef and add
        # load_balancing_loss_func; DeepseekV3ForCausalLM adds no auxiliary loss (aux-loss-free)
        router_aux_loss=hasattr(model, "router_aux_loss_coef"),
    )


# Linears transformers' _tp_plan leaves out although their owner's forward splits by heads /
# intermediate rows like Llama's (read in transformers 5.24): Granite-MoE's attention (its plan
# names only the experts) views q/k/v with -1 heads; Qwen2-MoE's shared expert is a plain gated
# MLP (the plan names the dense mlp.gate_proj, not mlp.shared_expert.gate_proj). {owner class:
# {leaf: hf style}}; the MoE block's forward (runtime/fused.py) runs the shared expert's local rows.
# DeepSeek-V3's MLA: the low-rank down-projections q_a_proj (H -> q_lora_rank) and
# kv_a_proj_with_mqa (H -> kv_lora_rank + qk_rope_head_dim) are small and feed every head, so they
# stay whole on every tp rank ("latent", runtime/parallel.py), with their norms; the per-head
# up-projections q_b_proj / kv_b_proj (viewed (..., -1, head dims)) split colwise by heads, o_proj
# rowwise.
READ_TP_PLANS = {
    "GraniteMoeAttention": {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"},
    "Qwen2MoeMLP": {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"},
    # GptOssConfig.base_model_tp_plan (5.24) names only embed_tokens (its experts go by the ep plan);
    # its q/k/v/o are Llama's Linears (with biases), split as Llama's: q/k/v colwise by heads (the
    # sinks follow q's heads, style "sinks"), o_proj rowwise (its bias added once, after the reduce)
    "GptOssAttention": {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"},
    "DeepseekV3Attention": {"q_a_proj": "latent", "kv_a_proj_with_mqa": "latent", "q_b_proj": "colwise",
                            "kv_b_proj": "colwise", "q_proj": "colwise", "o_proj": "rowwise"},
}


def _tp_plan(model, modules) -> dict[str, str]:
    """transformers' own plan {fqn pattern: style} plus READ_TP_PLANS for the Linears it misses."""
    from fnmatch import fnmatchcase

    plan = dict(getattr(model, "_tp_plan", None) or {})
    for m in modules:
        owner = type(model.get_submodule(m.fqn.rpartition(".")[0])).__name__
        style = READ_TP_PLANS.get(owner, {}).get(m.fqn.rpartition(".")[2])
        if m.kind == "linear" and style and not any(fnmatchcase(m.fqn, p) for p in plan):
            plan[re.sub(r"\.\d+(?=\.|$)", ".*", m.fqn)] = style
    return plan


def _portable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json as plan.json carries it, minus what describes the machine it was saved on:
    `_name_or_path` (a user's home path), `_commit_hash` and other `_` keys, transformers_version;
    and the KERNEL_KEYS, which name code, not facts.
    The runtime drops these keys before building the model anyway."""
    return {k: v for k, v in without_kernel_keys(config).items()
            if not k.startswith("_") and k != "transformers_version"}
def _intermediate(c) -> int:
    """The dim TP splits in the MLP: Qwen3-MoE experts use moe_intermediate_size (its
    intermediate_size belongs to dense layers, which must divide too)."""
    for k in ("moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim"):
        v = getattr(c, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return 4 * c.hidden_size          # GPT-2 style configs: n_inner None means 4 x hidden


def _roles(model, modules, tied: bool) -> ModelRoles:
    """Read off the transformers model: its input / output embeddings, the decoder blocks
    (_structure_error proved them the base model's layers, one per num_hidden_layers) and the
    norm lm_head reads (the last norm outside the blocks)."""
    names = {id(mod): fqn for fqn, mod in model.named_modules()}
    layers = _layers(model)
    blocks = names[id(layers)]
    norm = [m.fqn for m in modules if m.kind == "norm" and not m.fqn.startswith(blocks + ".")]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return ModelRoles(embedding=names[id(emb)], lm_head=names[id(head)], final_norm=norm[-1] if norm else "",
                      block_prefix=blocks, num_blocks=len(layers),
                      tied=tied)
