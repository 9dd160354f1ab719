"""placements stage: a TP style for every Linear / Embedding / norm of the model.

Auto plan = transformers' own `_tp_plan` for the blocks (q/k/v/gate/up colwise, o/down rowwise)
+ our policy for the rest: embedding rowwise (vocab-sharded, Shard(0)), lm_head colwise
(vocab-sharded: logits stay sharded for loss parallel), norms sequence_parallel when
tp.sequence_parallel else replicate. `tp.plan` overrides apply on top, in the order written.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from difflib import get_close_matches
from fnmatch import fnmatchcase

from meshbake.compiler.errors import Err, RecipeError, Result, reads, run
from meshbake.compiler.memo import cached
from meshbake.compiler.mesh import MeshSpec
from meshbake.compiler.model import ModelSpec, ModuleInfo, expert_matrices
from meshbake.compiler.recipe import Recipe
from meshbake.runtime.roles import ATTENTION_NAMES, MLP_NAMES, is_expert_target, local_shape, shard_dim, target_name

# transformers' style names -> ours; anything else (local_*, ep_*) is refused with its name.
# colwise_gather_output / rowwise_split_input are transformers' way around a fused [q|k|v] or
# [gate|up] (or a norm over the whole projection): every rank computes the full attention. We
# take them only where we split the real thing instead (_gathered), and refuse them elsewhere.
# latent: meshbake's own style for MLA's low-rank down-projections (compiler/model.py READ_TP_PLANS):
# whole on every tp rank like replicate, its input the gathered sequence as a local tensor
HF_STYLES = {"colwise": "colwise", "rowwise": "rowwise", "embedding_rowwise": "rowwise", "latent": "latent"}
HF_GATHERED = {"colwise_gather_output": "colwise", "rowwise_split_input": "rowwise"}
ALLOWED = {"linear": ("colwise", "rowwise", "replicate"), "embedding": ("rowwise", "replicate"),
           "norm": ("sequence_parallel", "replicate"), "experts": ("experts",), "router": ("replicate",),
           "sinks": ("sinks", "replicate"), "other": ("replicate",)}
# styles of fused layouts (runtime/fused.py): what a tp rank holds of a qkv_proj / gate_up_proj
# (qkv_heads: HF's own per-head rows, which a plain colwise split keeps whole)
FUSED_STYLES = {"qkv": "colwise_qkv", "gate_up": "colwise_gate_up", "experts": "experts", "qkv_heads": "colwise",
                "experts_hf": "experts", "experts_t": "experts"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# replicated modules at or above this size are reported: 16 MiB is ~1 ms of NVLink time per copy
WARN_BYTES = 16 * 2**20

@dataclass(frozen=True)
class Placements:
    styles: Mapping[str, str]               # fqn -> style, in module order
    warnings: tuple[str, ...]
    lora_targets: tuple[str, ...] = ()      # fqns of the adapted Linears (recipe lora.targets resolved)


def group_name(fqn: str) -> str:
    """model.layers.17.mlp.up_proj -> model.layers.*.mlp.up_proj (rows of the PLAN.md table)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", fqn)


_ATTN_PARENTS: dict = {}


def _attn_parents(model: ModelSpec) -> frozenset[str]:
    """Modules holding q/k projections (one scan per model, not one per norm: `suggest`
    resolves placements for dozens of candidates of an 80-layer model)."""
    return cached(_ATTN_PARENTS, id(model), (model,), lambda: frozenset(
        x.fqn.rpartition(".")[0] for x in model.modules
        if x.kind == "linear" and x.fqn.rpartition(".")[2] in ("q_proj", "k_proj", "qkv_proj")), size=64)


def _attn_norm(model: ModelSpec, m: ModuleInfo) -> str | None:
    """A norm inside the attention, on the q/k projections. Over head_dim (Qwen3, Gemma-3) it
    works on each rank's local heads: weight replicated, its gradient summed over tp. Over the
    whole projection (OLMo-2: H x D or KV x D) it is split like q/k and its variance all-reduced."""
    if m.fqn.rpartition(".")[0] not in _attn_parents(model):
        return None                                # not beside the attention projections
    width = m.shape[0] if m.shape else 0
    if width == model.head_dim:
        return "local_heads"
    if width in (model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim):
        return "colwise_norm"
    return None


def _gathered_ok(model: ModelSpec, m: ModuleInfo) -> bool:
    """transformers gathers this Linear's output only because of a fused sibling or a
    whole-projection q/k norm; both are split for real here (runtime/fused.py, colwise_norm)."""
    parent = m.fqn.rpartition(".")[0]
    sib = [x for x in model.modules if x.fqn.rpartition(".")[0] == parent]
    return any(x.fqn in model.layouts or (x.kind == "norm" and _attn_norm(model, x) == "colwise_norm") for x in sib)


def _latent_parents(model: ModelSpec) -> frozenset[str]:
    """Modules holding an MLA down-projection placed latent (DeepSeek-V3's attention)."""
    pats = [p for p, st in model.hf_tp_plan.items() if st == "latent"]
    if not pats:
        return frozenset()
    return cached(_LATENT_PARENTS, id(model), (model,), lambda: frozenset(
        x.fqn.rpartition(".")[0] for x in model.modules
        if x.kind == "linear" and any(fnmatchcase(x.fqn, p) for p in pats)), size=64)


_LATENT_PARENTS: dict = {}


def _auto(model: ModelSpec, m: ModuleInfo, sp: bool) -> str | RecipeError:
    if m.kind == "norm":
        if m.fqn.rpartition(".")[0] in _latent_parents(model):
            return "replicate"        # q_a_layernorm / kv_a_layernorm: on the latent, whole on every rank
        return _attn_norm(model, m) or ("sequence_parallel" if sp else "replicate")
    if m.kind == "embedding":
        return "rowwise"
    if m.fqn in model.layouts:
        return FUSED_STYLES[model.layouts[m.fqn]]
    if m.kind in ("router", "other"):      # small (router E x H) or unknown: whole on every tp rank
        return "replicate"
    if m.kind == "sinks":                  # one per q head: split with q_proj's heads (Shard(0))
        return "sinks"
    if m.fqn == model.roles.lm_head:
        return "colwise"                           # vocab-sharded logits
    for pattern, hf_style in model.hf_tp_plan.items():
        if fnmatchcase(m.fqn, pattern):
            if hf_style in HF_GATHERED and _gathered_ok(model, m):
                return HF_GATHERED[hf_style]
            if hf_style not in HF_STYLES:
                return RecipeError("tp.plan", f"{model.architecture} asks for TP style {hf_style!r} on "
                                   f"{m.fqn}, which meshbake does not implement",
                                   f"set tp.plan {{'{group_name(m.fqn.rpartition('.')[0])}.*': replicate}} "
                                   "(that block whole on every tp rank) or use mesh.tp: 1")
            return HF_STYLES[hf_style]
    return "replicate"


@reads("tp.plan")
def _overrides(recipe: Recipe, model: ModelSpec, styles: dict[str, str]) -> list[RecipeError]:
    plan = recipe.tp.plan
    if not isinstance(plan, Mapping):
        return []
    kinds = {m.fqn: m.kind for m in model.modules}
    errs = []
    for pattern, style in plan.items():
        path = f"tp.plan['{pattern}']"
        hits = [f for f in styles if fnmatchcase(f, pattern)]
        if not hits:
            near = get_close_matches(pattern, sorted({group_name(f) for f in styles}), n=3, cutoff=0.5)
            errs.append(RecipeError(path, "pattern matches no Linear/Embedding/norm of "
                                    f"{model.architecture}", f"did you mean {' or '.join(near)}?" if near
                                    else "patterns are fnmatch globs over module names, e.g. "
                                    "'model.layers.*.mlp.*'"))
            continue
        fused = sorted(f for f in hits if f in model.layouts and style not in ("replicate", styles[f]))
        if fused:
            errs.append(RecipeError(path, f"{group_name(fused[0])} is a fused {model.layouts[fused[0]]} projection: "
                                    f"{style!r} would give a rank rows of {_fused_parts(fused[0])} that "
                                    "do not belong together", "use 'replicate' or remove the override"))
            continue
        bad = sorted({kinds[f] for f in hits if style not in ALLOWED[kinds[f]]})
        if bad:
            errs.append(RecipeError(path, f"style {style!r} does not apply to {'/'.join(bad)} modules",
                                    f"allowed: {'; '.join(f'{k}: ' + ', '.join(ALLOWED[k]) for k in bad)}"))
            continue
        for f in hits:
            styles[f] = style
    return errs


@reads("tp.plan", "tp.sequence_parallel", "tp.loss_parallel")
def _consistency(recipe: Recipe, model: ModelSpec, auto: dict[str, str], styles: dict[str, str]) -> list[RecipeError]:
    """A block's linears are either all as transformers plans them or all replicated: a
    replicated k_proj beside a colwise q_proj would mix local and global head counts."""
    errs, sp = [], recipe.tp.sequence_parallel
    parents: dict[str, list[str]] = {}
    for f in styles:
        parents.setdefault(f.rpartition(".")[0], []).append(f)
    for parent, kids in parents.items():
        lin = [f for f in kids if shard_dim(auto[f], "linear") is not None and model.roles.in_block(f)]
        changed = [f for f in lin if styles[f] != auto[f]]
        if changed and (sp or len(changed) != len(lin) or any(styles[f] != "replicate" for f in changed)):
            why = ("with tp.sequence_parallel the residual stream is sequence-sharded between blocks, "
                   "so every block must keep the colwise/rowwise pair" if sp else
                   "a block is either TP-sharded as a colwise/rowwise pair or replicated as a whole")
            names = ", ".join(group_name(f).rpartition(".")[2] for f in changed)
            errs.append(RecipeError("tp.plan", f"{group_name(parent)}: {names} "
                                    f"changed to {sorted({styles[f] for f in changed})}; {why}",
                                    f"set '{group_name(parent)}.*': replicate, or remove the override"))
    embed, head = model.roles.embedding, model.roles.lm_head
    if sp and (styles[embed], styles[head]) != ("rowwise", "colwise"):
        errs.append(RecipeError("tp.plan", f"{embed}/{head} must stay rowwise/colwise with tp.sequence_parallel",
                                "remove their overrides or set tp.sequence_parallel: false"))
    if recipe.tp.loss_parallel and styles[head] != "colwise":
        errs.append(RecipeError("tp.loss_parallel", f"loss parallel needs vocab-sharded logits, but {head} is "
                                f"{styles[head]}", f"set tp.loss_parallel: false or keep {head} colwise"))
    if model.roles.tied and (styles[embed] == "replicate") != (styles[head] == "replicate"):
        errs.append(RecipeError("tp.plan", f"tied embeddings: {embed} and {head} share one weight, placed "
                                f"{styles[embed]} and {styles[head]}", "shard both (rowwise embedding + colwise "
                                "lm_head both split the vocab dim) or replicate both"))
    return list(dict.fromkeys(errs))   # one error per block group, not one per layer


@reads("tp.sequence_parallel")
def _replicated_under_sp(recipe: Recipe, model: ModelSpec, auto: Mapping[str, str]) -> list[RecipeError]:
    """Sequence parallel hands each block's self_attn and mlp the gathered sequence as a DTensor
    (runtime/parallel.py tp_plan); a Linear transformers' tp plan gives no style (replicated)
    cannot take it. Found by the zoo: HunYuan-V1-Dense (its plan covers only the embedding) and
    Youtu (MLA attention outside its plan) compiled, then crashed on the first forward."""
    if not recipe.tp.sequence_parallel:
        return []
    pre = model.roles.block_prefix + "."
    # a MoE block whose forward runtime/fused.py replaces takes the gathered input as a local
    # tensor: its replicated Linears (Qwen2-MoE's shared_expert_gate, H -> 1) run on that
    moe = tuple(f.rpartition(".")[0] + "." for f, k in model.layouts.items() if k == "experts")
    bad: dict[str, None] = {}
    for m in model.modules:
        if moe and m.fqn.startswith(moe):
            continue
        parts = m.fqn[len(pre):].split(".") if m.fqn.startswith(pre) else []
        if m.kind == "linear" and len(parts) > 2 and parts[1] in (*ATTENTION_NAMES, *MLP_NAMES) and auto[m.fqn] == "replicate":
            bad[group_name(m.fqn)] = None
    if not bad:
        return []
    names = list(bad)
    return [RecipeError("tp.sequence_parallel", f"{model.architecture}: {', '.join(names[:3])}"
                        f"{' ...' if len(names) > 3 else ''} has no style in transformers' tp plan (replicated); "
                        "under sequence parallel its input is the gathered sequence as a DTensor, which a "
                        "replicated module cannot take",
                        "set tp.sequence_parallel: false (the replicated modules then run whole on every tp rank)")]


@reads("lora.rank", "lora.targets")
def _lora_errors(recipe: Recipe, model: ModelSpec) -> list[RecipeError]:
    """Adapters go on Linear layers named by their leaf name (q_proj, ...), never lm_head, and on
    grouped MoE experts by parameter ("experts.gate_up_proj", "experts.down_proj"; runtime/lora.py)."""
    lo = recipe.lora
    if lo.rank == 0:
        return []
    leaves = sorted({target_name(f) for f in model.lora_targets(None)})
    errs = []
    # grouped experts meshbake keeps in HF's own layout (GPT-OSS's experts_hf, Llama-4's experts_t)
    # run through their own loops in runtime/fused.py, which have no adapter term
    other = sorted({k for k in model.layouts.values() if k in ("experts_hf", "experts_t")})
    for i, t in enumerate(lo.targets):
        if other and t in ("experts.gate_up_proj", "experts.down_proj"):
            errs.append(RecipeError(f"lora.targets[{i}]", f"{t!r}: {model.architecture}'s grouped experts are "
                                    f"kept in their own layout ({other[0]}: "
                                    + ("(E, H, 2I) with gate / up interleaved and a bias on each projection"
                                       if other[0] == "experts_hf" else "(E, H, 2I) [gate | up], input scaled by "
                                       "the router score") + "), and meshbake's expert adapters (runtime/lora.py) "
                                    "are built and parity-tested for the (E, 2I, H) layout only",
                                    f"remove {t} from lora.targets (adapt the attention, e.g. q_proj, v_proj)"))
        elif t not in leaves:
            near = get_close_matches(t, leaves, n=1) or [n for n in leaves if n.endswith("." + t)][:1]
            errs.append(RecipeError(f"lora.targets[{i}]", f"{t!r} is no Linear layer or grouped experts parameter "
                                    f"of {model.architecture}",
                                    f"did you mean {near[0]!r}?" if near else f"choose from {', '.join(leaves)}"))
    targets = set(model.lora_targets(lo.targets))
    shapes = [m.shape for m in model.modules if m.fqn in targets] + _expert_matrices(model, targets)
    smallest = min((min(sh) for sh in shapes), default=0)
    if shapes and lo.rank > smallest:
        # B (out x r) @ A (r x in) has rank <= min(out, in): a larger r only adds parameters
        errs.append(RecipeError("lora.rank", f"rank {lo.rank} exceeds the smallest dimension ({smallest}) of the "
                                f"targeted layers of {model.architecture}, so the adapters cannot add rank",
                                f"use a rank <= {smallest} (8 to 64 is usual)"))
    return errs


def _expert_matrices(model: ModelSpec, targets: set[str]) -> list[tuple[int, int]]:
    """(out, in) of one expert's matrix for each targeted grouped experts parameter."""
    return [(o, i) for m in model.modules if m.kind == "experts"
            for name, (_, o, i) in expert_matrices(m).items() if f"{m.fqn}.{name}" in targets]


@reads("lora.rank", "lora.targets")
def _shared_expert_lora_errors(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> list[RecipeError]:
    """Under tp the MoE block's forward (runtime/fused.py shared_expert_forward) runs the shared
    expert's local weight rows itself, not its modules, so an adapter on them would be skipped."""
    if not recipe.lora.rank or mesh.tp == 1:
        return []
    moe = tuple(f.rpartition(".")[0] + leaf for f, k in model.layouts.items() if k == "experts"
                for leaf in (".shared_expert.", ".shared_experts."))
    hit = sorted({group_name(f) for f in model.lora_targets(recipe.lora.targets) if moe and f.startswith(moe)})
    if not hit:
        return []
    return [RecipeError("lora.targets", f"{', '.join(hit[:3])}: an adapter on the shared expert under mesh.tp "
                        f"{mesh.tp} is not built (the MoE block runs the shared expert's tp-local rows itself)",
                        "leave gate_proj / up_proj / down_proj out of lora.targets (attention targets such as "
                        "q_proj, v_proj are fine), or use mesh.tp: 1")]


@reads("lora.quantize_base", "lora.rank", "lora.targets", "mesh", "train.compile")
def _quantize_errors(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> list[RecipeError]:
    """QLoRA (runtime/quant.py): torchao's NF4Tensor shards under FSDP2 over one flat mesh only."""
    from meshbake.runtime.quant import nf4_scaler_block

    lo = recipe.lora
    if lo.quantize_base == "none":
        return []
    where = "lora.quantize_base"
    if lo.rank == 0:
        return [RecipeError(where, f"{lo.quantize_base} quantizes the frozen base of LoRA, and lora.rank is 0 "
                            "(full fine-tuning trains every weight, none can be 4-bit)",
                            "set lora.rank (e.g. 16), or quantize_base: none")]
    why = []
    if mesh.tp > 1:
        why.append((f"mesh.tp {mesh.tp}: torchao's NF4Tensor shards under FSDP2 over one flat mesh only (its all-gather "
                    "hooks); its matmuls inside a tensor-parallel DTensor (colwise/rowwise, sequence parallel, FSDP x TP) "
                    "are not verified, so the 4-bit base is not split over tp", "set mesh.tp: 1"))
    if mesh.dp_replicate > 1:
        why.append((f"mesh.dp_replicate {mesh.dp_replicate}: torchao's NF4 all-gather hooks take the group of a "
                    "1-D mesh, and HSDP gives FSDP2 a 2-D one", "set mesh.dp_replicate: 1 (shard over dp_shard)"))
    if mesh.ep > 1:
        why.append((f"mesh.ep {mesh.ep}: QLoRA with expert parallel is not supported (the NF4 base is FSDP-"
                    "sharded over one flat mesh, and the experts live on the (efsdp, ep) mesh)", "set mesh.ep: 1"))
    experts = sorted({target_name(f) for f in model.lora_targets(lo.targets) if is_expert_target(f)})
    if experts:
        why.append((f"lora.targets {', '.join(experts)}: torchao's NF4Tensor quantizes 2-D Linear weights for "
                    "F.linear; the grouped 3-D expert tensors (E, out, in), sliced per expert in the MoE loop, are "
                    "not an NF4 layout it runs", f"remove {', '.join(experts)} from lora.targets (the experts "
                    "then stay frozen in model.dtype), or set lora.quantize_base: none"))
    if recipe.train.compile:
        why.append(("train.compile: torch.compile of blocks holding NF4 weights is not verified here",
                    "set train.compile: false"))
    errs = [RecipeError(where, w, h) for w, h in why]
    if errs:
        return errs
    shards = mesh.fsdp if mesh.fsdp_enabled else 1
    targets = set(model.lora_targets(lo.targets))
    bad = [m for m in model.modules if m.fqn in targets
           and not nf4_scaler_block(m.shape[0], m.shape[0] * m.shape[1], shards)]
    if bad:
        m = bad[0]
        errs.append(RecipeError(where, f"{m.fqn} {m.shape[0]} x {m.shape[1]}: its rows do not split into "
                                f"{shards} FSDP shards of whole 64-element NF4 blocks (torchao splits the packed "
                                "storage by whole rows, without padding)",
                                "choose dp_shard x cp dividing the targets' rows, or quantize_base: none"))
    return errs


# What a family does that a parallel form cannot reproduce exactly: refused, never run wrong.
@reads("train.seq_len")
def _cp_errors(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> list[RecipeError]:
    c, why = model.config, []
    if mesh.cp == 1:
        return []
    if c.get("attn_logit_softcapping"):
        why.append(f"soft-caps attention logits (attn_logit_softcapping {c['attn_logit_softcapping']})")
    window = c.get("sliding_window")
    if isinstance(window, int) and window < recipe.train.seq_len and c.get("use_sliding_window", True) is not False:
        why.append(f"uses sliding-window attention (window {window} < seq_len {recipe.train.seq_len})")
    if model.model_type == "llama4_text":
        why.append("uses chunked attention on its RoPE layers (attention_chunk_size) and position-scaled queries "
                   "on its NoPE layers (attn_temperature_tuning reads the local sequence length)")
    if any(m.kind == "sinks" for m in model.modules):
        why.append("adds a learned sink logit per head to the attention softmax (attention sinks)")
    if not why:
        return []
    return [RecipeError("mesh.cp", f"{model.architecture} {' and '.join(why)}; context parallel "
                        "attention (all-gathered K/V under a plain causal mask) would compute "
                        "something else", "set mesh.cp: 1 (long sequences: raise tp with "
                        "sequence parallel, or activation_checkpointing: full)")]


@reads("train.router_aux_loss_coef")
def _architecture_errors(recipe: Recipe, model: ModelSpec, mesh: MeshSpec) -> list[RecipeError]:
    c, errs = model.config, []
    if mesh.tp > 1:
        # a plan that compiles must run: parameters meshbake cannot place are refused, not left
        # as plain tensors beside DTensors (the "mixed torch.Tensor and DTensor" crash)
        odd = [m for m in model.modules if model.roles.in_block(m.fqn)
               and (m.kind == "other" or (m.kind == "experts" and m.fqn not in model.layouts))]
        if odd:
            m = odd[0]
            groups = sorted({group_name(x.fqn) for x in odd})
            errs.append(RecipeError("mesh.tp", f"{model.architecture}: {', '.join(groups[:3])}"
                                    f"{' ...' if len(groups) > 3 else ''} ({m.kind}, {m.shape}) has no tensor-parallel "
                                    "form in meshbake (only router + grouped experts MoE blocks and Linear / "
                                    "Embedding / norm modules are split)", "use mesh.tp: 1 (FSDP over dp_shard "
                                    "shards these weights too)"))
    if mesh.tp > 1:
        from meshbake.compiler.model import FUSED_NAMES

        fused = sorted({group_name(m.fqn) for m in model.modules if m.kind == "linear" and m.fqn not in model.layouts
                        and m.fqn.rpartition(".")[2] in FUSED_NAMES})
        if fused:
            what = sorted({_fused_parts(f) for f in fused[:2]})
            errs.append(RecipeError("mesh.tp", f"{model.architecture}: {', '.join(fused[:2])} is a fused projection "
                                    "whose row order meshbake has not mapped (splitting its rows would mix "
                                    f"{' or '.join(what)})", "use mesh.tp: 1"))
    latent = _latent_parents(model)
    full_q = sorted({group_name(m.fqn) for m in model.modules if m.fqn.rpartition(".")[0] in latent
                     and m.fqn.rpartition(".")[2] == "q_proj"})
    if mesh.tp > 1 and full_q:
        # the parity-tested MLA form has q through the latent too (q_a_proj -> q_b_proj); a full-rank
        # q_proj beside the latent kv_a_proj_with_mqa would give the attention input one colwise and
        # one whole consumer, a gradient layout not run here
        errs.append(RecipeError("mesh.tp", f"{model.architecture}: {full_q[0]} is a full-rank query projection "
                                "(config q_lora_rank null) beside MLA's latent kv projection; meshbake's MLA "
                                "split is parity-tested with q_lora_rank set (DeepSeek-V3: 1536)",
                                "use mesh.tp: 1, or a config with q_lora_rank"))
    if mesh.tp > 1 and model.num_experts and (c.get("router_jitter_noise") or 0) > 0:
        errs.append(RecipeError("model.config", f"router_jitter_noise {c['router_jitter_noise']}: each tp rank would "
                                "draw its own noise and route the same token to different experts",
                                "set router_jitter_noise: 0 in the config.json (Mixtral-8x7B ships 0) or mesh.tp: 1"))
    from meshbake.compiler.moe import aux_errors
    return errs + aux_errors(recipe, model)


def _fused_parts(fqn: str) -> str:
    """What rows a fused projection concatenates, by its leaf name: a gate_up_proj [gate | up],
    every other FUSED_NAMES leaf (qkv_proj, query_key_value, c_attn, Wqkv, W_pack) [q | k | v]."""
    return "gate and up" if fqn.rpartition(".")[2] == "gate_up_proj" else "q, k and v"


def resolve_placements(recipe: Recipe, model: ModelSpec, mesh: MeshSpec,
                       aside: frozenset[str] = frozenset()) -> Result[Placements]:
    """A check that reads a field validate set aside is skipped (errors.reads)."""
    errs = [e for check in (_cp_errors, _architecture_errors) for e in run(check, aside, recipe, model, mesh)]
    errs += run(_lora_errors, aside, recipe, model)
    errs += [] if errs else run(_shared_expert_lora_errors, aside, recipe, model, mesh)
    errs += [] if errs else run(_quantize_errors, aside, recipe, model, mesh)
    if errs:
        return Err(tuple(errs))
    lora = model.lora_targets(recipe.lora.targets) if recipe.lora.rank else ()
    if mesh.tp == 1:
        # nothing is split, nothing to warn about; but tp.plan must still name real modules and
        # styles their kind can take: an override that is wrong at tp 1 is wrong at tp 8
        replicated = {m.fqn: "replicate" for m in model.modules}
        errs = run(_overrides, aside, recipe, model, dict(replicated)) or _consistency_at_tp1(recipe, model, aside)
        return Err(tuple(errs)) if errs else Placements(replicated, (), lora)
    auto = _auto_styles(model, recipe.tp.sequence_parallel)
    if isinstance(auto, RecipeError):
        return Err((auto,))           # one unsupported style is enough to say
    styles = dict(auto)
    errs = run(_overrides, aside, recipe, model, styles)
    _follow_projections(model, styles)
    errs += [] if errs else run(_consistency, aside, recipe, model, auto, styles)
    errs += [] if errs else run(_replicated_under_sp, aside, recipe, model, auto)
    if errs:
        return Err(tuple(errs))
    if mesh.ep > 1:       # experts split by index over ep and whole on each rank (etp 1, runtime/ep.py)
        styles.update({m.fqn: "replicate" for m in model.modules if m.kind == "experts"})
    return Placements(styles, _warnings(recipe, model, mesh, styles), lora)


_AUTO: dict = {}


def _auto_styles(model: ModelSpec, sp: bool) -> dict[str, str] | RecipeError:
    """Every module's style by transformers' plan and meshbake's policy (_auto), or the first
    one meshbake cannot run. Read only (callers copy it before overrides): memoized per model and
    sp, where suggest matched every module against the model's TP plan per placements key (70B on
    64 GPUs: 52 keys x 724 modules, 175k fnmatch calls, ~6% of its time)."""
    return cached(_AUTO, (id(model), sp), (model,), lambda: _auto_styles_of(model, sp))


def _auto_styles_of(model: ModelSpec, sp: bool) -> dict[str, str] | RecipeError:
    auto: dict[str, str] = {}
    for m in model.modules:
        s = _auto(model, m, sp)
        if isinstance(s, RecipeError):
            return s
        auto[m.fqn] = s
    return auto


def _consistency_at_tp1(recipe: Recipe, model: ModelSpec, aside: frozenset[str]) -> list[RecipeError]:
    """The block rules of _consistency on the plan the overrides make of the model's own TP plan
    (a q_proj changed to rowwise beside a colwise k_proj; a tied embedding replicated beside a
    colwise lm_head): wrong at every tp > 1, so said at tp 1 too, where the recipe is written
    before it is scaled out. Sequence and loss parallel are off at tp 1 (ParallelDims.tp_flags),
    so only the rules that hold without them run. A model whose own plan has a style meshbake
    cannot split is refused at tp > 1 for that reason; nothing to check here then."""
    plain = replace(recipe, tp=replace(recipe.tp, sequence_parallel=False, loss_parallel=False))
    auto = _auto_styles(model, False)
    if isinstance(auto, RecipeError):
        return []
    styles = dict(auto)
    if run(_overrides, aside, plain, model, styles):
        return []
    _follow_projections(model, styles)
    return [replace(e, message=f"{e.message} (nothing is split at tp 1, but this plan would not run at any tp > 1)")
            for e in run(_consistency, aside, plain, model, auto, styles)]


def _follow_projections(model: ModelSpec, styles: dict[str, str]) -> None:
    """q/k norms follow their projections: in an attention replicated by a tp.plan override
    they see all heads, so they are plain replicated norms too; so are attention sinks (owned
    by the attention module itself)."""
    for m in model.modules:
        if styles.get(m.fqn) in ("local_heads", "colwise_norm", "sinks"):
            parent = m.fqn if m.kind == "sinks" else m.fqn.rpartition(".")[0]
            projs = [f for f in styles if f.startswith(parent + ".") and f.endswith(("q_proj", "qkv_proj"))]
            if projs and all(styles[f] == "replicate" for f in projs):
                styles[m.fqn] = "replicate"


def _warnings(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, styles: Mapping[str, str]) -> tuple[str, ...]:
    nbytes = DTYPE_BYTES[recipe.model.dtype]
    out: dict[str, list[int]] = {}
    for m in model.modules:
        if mesh.ep > 1 and m.kind == "experts":
            continue                    # split by expert index over ep instead (E / ep per rank)
        if styles[m.fqn] == "replicate" and m.numel * nbytes >= WARN_BYTES:
            out.setdefault(group_name(m.fqn), []).append(m.numel * nbytes)
    return tuple(
        f"{g}: replicated on all {mesh.tp} tp ranks ({len(b)} x {b[0] / 1e6:,.1f} MB of {recipe.model.dtype} "
        f"weights per rank before FSDP; sharded it would be {sum(b) / mesh.tp / 1e6:,.1f} MB)"
        for g, b in out.items())


def placement_rows(model: ModelSpec, pl: Placements, tp: int, dtype: str, ep: int = 1) -> list[dict[str, object]]:
    """PLAN.md's placement table: one row per module group (model.layers.*.mlp.up_proj) with its
    count, kind, weight shape, style, shape per tp rank and bytes per tp rank (all its modules)."""
    import math

    rows: dict[str, dict[str, object]] = {}
    nbytes = DTYPE_BYTES[dtype]
    for m in model.modules:
        style = pl.styles[m.fqn]
        g = group_name(m.fqn)
        loc = local_shape(m.shape, m.kind, style, tp)
        if ep > 1 and m.kind == "experts":     # split by expert index over ep (runtime/ep.py)
            style, loc = f"expert parallel (ep {ep})", (m.shape[0] // ep, *m.shape[1:])
        # every parameter the module owns (bias, an expert's down_proj) is split like its weight
        b = m.numel * math.prod(loc) // max(1, math.prod(m.shape)) * nbytes
        if g in rows:
            rows[g]["count"] += 1
            rows[g]["nbytes"] += b
            continue
        fmt = lambda s: " x ".join(map(str, s))  # noqa: E731
        rows[g] = {"group": g, "count": 1, "kind": m.kind, "shape": fmt(m.shape), "style": style,
                   "local": fmt(loc), "nbytes": b}
    for r in rows.values():
        r["bytes"] = f"{r['nbytes'] / 1e6:,.1f} MB" if r["nbytes"] >= 1e5 else f"{r['nbytes'] / 1e3:,.1f} kB"
    return list(rows.values())
