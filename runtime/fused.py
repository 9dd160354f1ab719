"""Fused projections and grouped MoE experts, stored in a row order that tensor parallel can
split (torchtitan and NeMo AutoModel do the same; a plain Shard(0) of HF's [q|k|v] would give
rank 0 all of q and rank 1 k and v: silently wrong).

Layouts (independent of tp, so DCP checkpoints reshard across tp sizes; export undoes them):
  qkv      HF rows [q (H*D) | k (KV*D) | v (KV*D)]  ->  per kv group g (KV groups, G = H/KV):
           [q heads gG..gG+G-1 | k_g | v_g], i.e. (KV, G+2, D, in). A Shard(0) over tp (tp | KV)
           gives each rank whole groups: its own heads' q with the k and v they attend to.
  gate_up  HF rows [gate (I) | up (I)]  ->  pairs (gate_i, up_i): (I, 2, in). Shard(0) gives a
           rank gate AND up rows of one slice of the intermediate dim.
  experts  gate_up_proj (E, 2I, H) as pairs along dim 1 (same as gate_up, per expert); down_proj
           (E, H, I) unchanged. Sharded on I: each rank runs every expert on its slice.
  experts_t Llama-4's grouped experts, gate_up_proj (E, H, 2I) [gate | up] along the last dim ->
           pairs along that dim; down_proj (E, I, H) unchanged. Sharded on 2I / I like experts.
  experts_hf GPT-OSS's grouped experts as HF stores them: gate_up_proj (E, H, 2I) whose columns are
           already (gate_i, up_i) pairs (HF's forward reads gate = 0::2, up = 1::2), its bias (E, 2I),
           down_proj (E, I, H), its bias (E, H). Sharded on the 2I / I dims: whole pairs per rank;
           the down bias is whole and added by one tp rank (the partial sums then hold it once).
  qkv_heads  HF rows already per head [q_h | k_h | v_h] for h in heads (GPT-NeoX query_key_value,
           read with view(..., -1, 3 D)): kept in HF order, a plain colwise Shard(0) (tp | H) gives
           whole heads and HF's view(-1) finds the local head count. No hook, no reorder.
At run time a forward hook turns the local output of a fused Linear back into HF's local
order ([q_l | k_l | v_l], [gate_l | up_l]) so transformers' own attention / MLP code runs on
the local heads; the attention gets its local head counts. The MoE block forward is replaced:
router replicated (every tp rank routes the same tokens), experts on local slices, a shared
expert (Qwen2-MoE) on its colwise / rowwise rows with its sigmoid gate replicated, partial
outputs summed over tp (all-reduce, or reduce-scatter to the sequence shard under SP).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .roles import transposed_experts


def _heads(cfg) -> tuple[int, int, int]:
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    return h, kv, d


def param_layouts(layouts: dict[str, str]) -> dict[str, str]:
    """{parameter name: layout} of the parameters stored in meshbake order (a qkv_heads
    projection and experts_hf experts are stored in HF's order: none of their parameters)."""
    out = {}
    for fqn, kind in layouts.items():
        if kind in ("qkv_heads", "experts_hf"):
            continue
        if kind in ("experts", "experts_t"):
            out[f"{fqn}.gate_up_proj"] = kind
        else:
            out[f"{fqn}.weight"] = kind
            out[f"{fqn}.bias"] = kind
    return out


# the dim holding [gate | up] (HF) / (gate_i, up_i) pairs (meshbake): a gate_up Linear's rows,
# experts' gate_up_proj (E, 2I, H) dim 1, Llama-4's transposed (E, H, 2I) dim 2
PAIR_DIM = {"gate_up": 0, "experts": 1, "experts_t": 2}


def to_runtime(kind: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """HF order -> meshbake order (full tensors)."""
    if kind == "qkv":
        h, kv, d = _heads(cfg)
        rest = t.shape[1:]
        q = t[:h * d].reshape(kv, h // kv, d, *rest)
        k = t[h * d:(h + kv) * d].reshape(kv, 1, d, *rest)
        v = t[(h + kv) * d:].reshape(kv, 1, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(t.shape).contiguous()
    dim = PAIR_DIM.get(kind, 0)
    gate, up = t.chunk(2, dim=dim)
    return torch.stack([gate, up], dim=dim + 1).reshape(t.shape).contiguous()


def to_hf(kind: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """meshbake order -> HF order (full tensors): the inverse of to_runtime."""
    if kind == "qkv":
        h, kv, d = _heads(cfg)
        g = t.reshape(kv, h // kv + 2, d, *t.shape[1:])
        q, k, v = g[:, :h // kv], g[:, h // kv], g[:, h // kv + 1]
        return torch.cat([q.reshape(h * d, *t.shape[1:]), k.reshape(kv * d, *t.shape[1:]),
                          v.reshape(kv * d, *t.shape[1:])]).contiguous()
    dim = PAIR_DIM.get(kind, 0)
    pairs = t.reshape(*t.shape[:dim], t.shape[dim] // 2, 2, *t.shape[dim + 1:])
    return torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim=dim).contiguous()


# ----------------------------------------------------------------------------- forward
def _qkv_hook(group_heads: int, head_dim: int):
    """Local qkv_proj output (..., KV_l * (G+2) * D) -> HF's local order [q_l | k_l | v_l]."""
    def hook(module, args, out):
        g = out.unflatten(-1, (-1, group_heads + 2, head_dim))            # (..., KV_l, G+2, D)
        q, k, v = g[..., :group_heads, :], g[..., group_heads, :], g[..., group_heads + 1, :]
        return torch.cat([q.flatten(-3), k.flatten(-2), v.flatten(-2)], dim=-1)
    return hook


def _gate_up_hook(module, args, out):
    """Local gate_up_proj output (..., I_l * 2) as pairs -> [gate_l | up_l]; HF chunks it in 2."""
    p = out.unflatten(-1, (-1, 2))
    return torch.cat([p[..., 0], p[..., 1]], dim=-1)


class _SumGrad(torch.autograd.Function):
    """Identity forward, gradient summed over the tp group backward (Megatron's `f`): for a
    tensor every tp rank holds whole but whose users on each rank see only part of the work."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _routed(idx: torch.Tensor, n_exp: int):
    """For each expert some token chose (idx (N, k)): (expert, the top-k positions, the token
    rows), in expert order, as transformers' grouped-experts loops walk them."""
    with torch.no_grad():
        mask = F.one_hot(idx, num_classes=n_exp).permute(2, 1, 0)          # (E, k, N)
        hit = mask.sum(dim=(-1, -2)).nonzero().flatten().tolist()
    for e in hit:
        pos, tok = torch.where(mask[e])
        yield e, pos, tok


def experts_forward(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                    tp_group=None) -> torch.Tensor:
    """transformers' grouped-experts loop on this rank's slice of every expert (pairs layout):
    the sum over tp ranks of the outputs is the full output. x (N, H), idx / w (N, k)."""
    if hasattr(experts, "gate_up_proj_bias"):
        return _hf_layout_experts(experts, x, idx, w, tp_group)
    if transposed_experts(experts):
        return _scaled_input_experts(experts, x, idx, w)
    from .lora import expert_factors, expert_linear

    gu, dn = _local(experts.gate_up_proj), _local(experts.down_proj)    # (E, 2I_l, H), (E, H, I_l)
    ad = expert_factors(experts)                                        # LoRA on the experts, if any
    n_exp = gu.shape[0]
    out = torch.zeros_like(x)
    for e, pos, tok in _routed(idx, n_exp):
        h = expert_linear(experts, x[tok], gu[e], ad, "gate_up_proj", e).unflatten(-1, (-1, 2))   # (n, I_l, 2)
        h = experts.act_fn(h[..., 0]) * h[..., 1]
        h = expert_linear(experts, h, dn[e], ad, "down_proj", e) * w[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


def shared_experts(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(shared expert MLP, its H -> 1 sigmoid gate) of a MoE block (compiler/model.py
    READ_MOE_BLOCKS): Qwen2-MoE's shared_expert + shared_expert_gate, DeepSeek-V3's
    shared_experts ungated, or (None, None)."""
    if getattr(block, "_meshbake_scaled_input", False):
        return None, None            # Llama-4's shared expert runs after the reduction (moe_block_forward)
    mlp = getattr(block, "shared_expert", None)
    if mlp is not None:
        return mlp, block.shared_expert_gate
    return getattr(block, "shared_experts", None), None


def shared_expert_forward(mlp: nn.Module, x: torch.Tensor, tp: bool) -> torch.Tensor:
    """Qwen2-MoE's shared expert down(act(gate(x)) * up(x)), x (N, H). Under tp on this rank's
    rows: gate/up colwise (I/tp rows each), down rowwise (I/tp columns), so the result is this
    rank's partial sum, added to the experts' partial sums before the block's one reduction.
    At tp 1 the module itself runs (a LoRA adapter on it included)."""
    if not tp:
        return mlp(x)
    g, u, d = (_local(getattr(mlp, n).weight) for n in ("gate_proj", "up_proj", "down_proj"))
    return F.linear(mlp.act_fn(F.linear(x, g)) * F.linear(x, u), d)


def _scaled_input_experts(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Llama-4's Llama4TextExperts (experts_t) on this rank's slice: each routed row is scaled by
    its router score BEFORE the expert (HF: routed_in = x * score, every expert on every token,
    score 0 off the top-k, and an expert maps 0 to 0), nothing after. gate_up (E, H, 2I_l) as
    (gate_i, up_i) column pairs, down (E, I_l, H)."""
    gu, dn = _local(experts.gate_up_proj), _local(experts.down_proj)
    n_exp = gu.shape[0]
    out = torch.zeros_like(x)
    for e, pos, tok in _routed(idx, n_exp):
        h = ((x[tok] * w[tok, pos, None]) @ gu[e]).unflatten(-1, (-1, 2))    # (n, I_l, 2)
        out.index_add_(0, tok, (experts.act_fn(h[..., 0]) * h[..., 1] @ dn[e]).to(out.dtype))
    return out


def _hf_layout_experts(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                       tp_group=None) -> torch.Tensor:
    """GPT-OSS's GptOssExperts loop (experts_hf) on this rank's slice: gate_up (E, H, 2I_l) and its
    bias (E, 2I_l) hold whole (gate_i, up_i) column pairs, so HF's own _apply_gate (clamped SwiGLU
    on 0::2 / 1::2) runs on them as is; down (E, I_l, H). The down bias (E, H) is whole on every
    rank: tp rank 0 adds it (the others add it times 0, so every rank's backward reaches the
    gradient all-reduce), and _SumGrad sums its gradient over tp."""
    gu, gub = _local(experts.gate_up_proj), _local(experts.gate_up_proj_bias)
    dn, dnb = _local(experts.down_proj), _local(experts.down_proj_bias)
    once = 1.0
    if tp_group is not None:
        dnb = _SumGrad.apply(dnb, tp_group)
        once = 1.0 if dist.get_rank(tp_group) == 0 else 0.0
    n_exp = gu.shape[0]
    out = torch.zeros_like(x)
    for e, pos, tok in _routed(idx, n_exp):
        h = experts._apply_gate(x[tok] @ gu[e] + gub[e])                    # (n, I_l)
        h = (h @ dn[e] + once * dnb[e]) * w[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


def moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, T, H). Under SP the input is the gathered Replicate DTensor and the
    output a Shard(1) DTensor (reduce-scatter of the partial sums); else plain tensors."""
    mesh = getattr(self, "_meshbake_tp", None)
    sp = isinstance(hidden_states, DTensor)
    x = hidden_states.to_local() if sp else hidden_states
    b, t, h = x.shape
    flat = x.reshape(-1, h)
    logits, w, idx = route(self, flat)
    if torch.is_grad_enabled():
        replay = torch._C._current_graph_task_id() != -1     # activation checkpointing's recompute
        if not replay:
            _count(self, logits, idx)
        if getattr(self, "_meshbake_aux", None) is not None:
            _aux_terms(self, logits, idx.shape[-1], replay)
    shared, gate = shared_experts(self)
    # Qwen2-MoE: sigmoid(shared_expert_gate(x)), (N, 1), from the replicated H -> 1 Linear on the
    # whole input, like the router (so before the _SumGrad of the input below)
    s = torch.sigmoid(F.linear(flat, _local(gate.weight))) if gate is not None else None
    group = None
    if mesh is not None:
        group = mesh.get_group()
        w, flat = _SumGrad.apply(w, group), _SumGrad.apply(flat, group)
        s = _SumGrad.apply(s, group) if s is not None else None   # it scales each rank's partial sum
    y = experts_forward(self.experts, flat, idx, w, group)
    if shared is not None:
        z = shared_expert_forward(shared, flat, mesh is not None)
        y = y + (s * z if s is not None else z)
    y = y.reshape(b, t, h)
    if mesh is not None:
        y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        y = y.redistribute(mesh, [Shard(1)]) if sp else y.redistribute(mesh, [Replicate()]).to_local()
    if getattr(self, "_meshbake_scaled_input", False):
        # Llama-4's shared expert on every token: its own colwise / rowwise Linears (the rowwise
        # down_proj reduces, to the sequence shard under SP), on the block's input as it came
        y = y + self.shared_expert(hidden_states)
    return block_output(self, y, w)


def route(block: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, E), weights (N, k), expert ids (N, k)) of the block's router. Llama-4's
    Llama4Router returns (scores (N, E): sigmoid of the top-k logits, 0 elsewhere; logits): the
    weights are its scores at its own top-k ids (the same topk of the same logits)."""
    if getattr(block, "_meshbake_scaled_input", False):
        scores, logits = block.router(flat)
        idx = torch.topk(logits, block.router.top_k, dim=-1).indices
        return logits, scores.gather(1, idx), idx
    return router(block)(flat)


def block_output(block: nn.Module, y, w):
    """What the decoder layer expects back from its MoE block: the hidden states, or for
    GPT-OSS's GptOssMLP (layout experts_hf) (hidden states, router scores), which
    GptOssDecoderLayer unpacks (and drops the scores); Llama-4's Llama4TextMoe returns
    (hidden states, router logits), unpacked and dropped alike."""
    return (y, w) if getattr(block, "_meshbake_hf_layout", False) or getattr(block, "_meshbake_scaled_input", False) else y


def router(block: nn.Module) -> nn.Module:
    """The MoE block's top-k router: Mixtral / Qwen-MoE `gate`, Granite-MoE / GPT-OSS `router`
    (compiler/model.py MOE_ROUTERS); called as router(x) -> (logits (N, E), weights (N, k), expert
    ids (N, k))."""
    r = getattr(block, "gate", None)
    return r if r is not None else block.router


def _count(block: nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> None:
    """Per-expert routed token counts and summed router probabilities, since the last read."""
    with torch.no_grad():
        n_exp = logits.shape[-1]
        stats = torch.cat([torch.bincount(idx.flatten(), minlength=n_exp).double(),
                           torch.softmax(logits.detach().double(), dim=-1).sum(0),
                           torch.tensor([float(idx.shape[0])], dtype=torch.float64, device=logits.device)])
        prev = getattr(block, "_meshbake_stats", None)
        block._meshbake_stats = stats if prev is None else prev + stats


def _aux_terms(block: nn.Module, logits: torch.Tensor, k: int, replay: bool) -> None:
    """This layer's share of transformers' load_balancing_loss_func (no attention mask: every
    row counts, as in the HF forward the runtime mirrors): top-k slot counts per expert (no
    gradient), the router's softmax probabilities summed over rows (with gradient), the rows.
    Recorded once per forward; under activation checkpointing the recompute runs the same
    ops (the recompute must save what the forward saved) but records nothing."""
    probs = torch.softmax(logits, dim=-1)                                  # (N, E)
    _, sel = torch.topk(probs, k, dim=-1)
    with torch.no_grad():
        counts = torch.bincount(sel.flatten(), minlength=probs.shape[-1]).to(torch.float32)
    if not replay:
        block._meshbake_aux.append((counts, probs.float().sum(0), probs.shape[0]))


def router_aux_loss(model: nn.Module, tp: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The aux loss of the forward just run, over every rank's tokens (a collective: call it on
    all ranks), or None if nothing was recorded. HF's formula on one process over the union
    of the tokens of all dp x cp ranks: with C_e the top-k counts and P_e the summed
    probabilities over all layers and all ranks, R the rows (layers x tokens),
        aux = E * sum_e (C_e / R) (P_e / R).
    C and R carry no gradient, and P is a sum over ranks, so the gradient of aux is the sum over
    ranks of the gradient of  E * sum_e (C_e / R) (P_e,rank / R)  -- the local term returned
    (differentiable), beside the global value (detached). tp ranks route the same tokens: the
    world sum counts them tp times."""
    blocks = [m for m in model.modules() if getattr(m, "_meshbake_aux", None)]
    if not blocks:
        return None
    terms = [t for b in blocks for t in b._meshbake_aux]
    for b in blocks:
        b._meshbake_aux = []
    counts, probs = sum(t[0] for t in terms), sum(t[1] for t in terms)    # (E,), (E,)
    n_exp = counts.shape[0]
    stats = torch.cat([counts.double(), probs.detach().double(),
                       torch.tensor([float(sum(t[2] for t in terms))], dtype=torch.float64, device=counts.device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    stats = stats / tp
    c_glob, p_glob, rows = stats[:n_exp], stats[n_exp:2 * n_exp], stats[-1]
    f = c_glob / rows
    local = n_exp * (f.to(probs.dtype) * probs).sum() / rows.to(probs.dtype)
    return local, n_exp * (f * p_glob / rows).sum()


def moe_metrics(model: nn.Module) -> dict[str, Any]:
    """{} for dense models; else, over the steps since the last call and every rank (a
    collective: call it on all ranks):
      expert_load        per expert, the fraction of routed token slots it got (mean over MoE
                         layers; 1/E each when balanced)
      expert_load_max    max over layers and experts of fraction x E (1.0 = perfectly balanced)
      router_aux_loss    transformers' load-balancing loss E * sum_e f_e P_e over all layers (f_e
                         top-k slots of e / rows, P_e summed router probability of e / rows, rows =
                         layers x tokens; load_balancing_loss_func), over the tokens since the last
                         call. Added to the training loss only with train.router_aux_loss_coef."""
    # one row per decoder layer of the whole model, [counts (E) | probabilities (E) | tokens | MoE
    # flag], so every rank all-reduces the same shape: under pp a rank holds its stages' layers only
    # (maybe none of the MoE ones), and the world sum fills each row from the stage that holds it
    # (every rank of one stage group adds its own tokens, as without pp)
    blocks = [(int(re.search(r"layers\.([0-9]+)\.", n + ".").group(1)), m) for n, m in model.named_modules()
              if hasattr(m, "_meshbake_tp")]
    # a pp rank whose stages hold dense blocks only (Qwen3-MoE's mlp_only_layers) reads E from the config
    n_exp = blocks[0][1].experts.gate_up_proj.shape[0] if blocks else n_experts(model.config.to_dict().get)
    if not n_exp:
        return {}
    stats = torch.zeros(model.config.num_hidden_layers, 2 * n_exp + 2, dtype=torch.float64)
    for i, b in blocks:
        got = getattr(b, "_meshbake_stats", None)
        if got is not None:
            stats[i, :-1] = got.cpu()
        stats[i, -1] = 1.0
        b._meshbake_stats = None
    if dist.is_initialized():
        dev = next(model.parameters()).device
        stats = stats.to(dev)
        dist.all_reduce(stats)           # tp ranks count the same tokens: fractions are unaffected
        stats = stats.cpu()
    stats = stats[stats[:, -1] > 0, :-1]                                  # (L MoE layers, 2E + 1)
    counts, probs, tokens = stats[:, :n_exp], stats[:, n_exp:2 * n_exp], stats[:, -1:].clamp(min=1)
    frac = counts / counts.sum(-1, keepdim=True).clamp(min=1)          # (L, E), rows sum to 1
    rows = tokens.sum()
    aux = n_exp * ((counts.sum(0) / rows) * (probs.sum(0) / rows)).sum()
    return {"expert_load": [round(x, 6) for x in frac.mean(0).tolist()],
            "expert_load_max": float((frac * n_exp).max()), "router_aux_loss": float(aux)}


def install(model: nn.Module, layouts: dict[str, str], tp_mesh: Any, aux: bool = False) -> None:
    """Hooks and forwards for the fused modules of plan.model.layouts (also at tp 1: the
    weights are in meshbake order whatever the mesh). aux: MoE blocks record the router's
    load-balancing terms (router_aux_loss reads them)."""
    tp = tp_mesh.size() if tp_mesh is not None else 1
    h, kv, d = _heads(model.config)
    for fqn, kind in layouts.items():
        mod = model.get_submodule(fqn)
        if kind == "qkv":
            mod.register_forward_hook(_qkv_hook(h // kv, d))
            attn = model.get_submodule(fqn.rpartition(".")[0])
            if tp > 1:      # transformers splits the local [q|k|v] with these counts
                attn.config = copy.copy(attn.config)
                attn.config.num_attention_heads = h // tp
                attn.num_key_value_heads = kv // tp
        elif kind == "gate_up":
            mod.register_forward_hook(_gate_up_hook)
        elif kind in ("experts", "experts_hf", "experts_t"):
            block = model.get_submodule(fqn.rpartition(".")[0])
            block._meshbake_tp = tp_mesh
            block._meshbake_hf_layout = kind == "experts_hf"
            block._meshbake_scaled_input = kind == "experts_t"
            block._meshbake_aux = [] if aux else None
            block.forward = moe_block_forward.__get__(block)


# ---------------------------------------------------------------------- checkpoint names
def _expert_keys(prefix: str, leaf: str, e: int) -> list[str]:
    """Per-expert keys a hub checkpoint (and transformers' save_pretrained) uses for expert e
    of the grouped `prefix` (...mlp.experts): Qwen-MoE names and Mixtral's w1/w3/w2, as in
    transformers' conversion_mapping.py."""
    mixtral = prefix.replace(".mlp.", ".block_sparse_moe.")
    names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}[leaf]
    return [f"{prefix}.{e}.{names[0]}.weight", f"{mixtral}.{e}.{names[1]}.weight"]


def legacy_sources(name: str, n_experts: int, have) -> list[list[str]] | None:
    """Where a parameter missing under its own name lives in an HF checkpoint: a list of key
    lists (concatenated per expert, then stacked), or None. `have(key)` says if a key exists.
    Names as in transformers' conversion_mapping.py (5.24): Qwen-MoE / Mixtral per-expert keys,
    Granite-MoE's input_linear (E, 2I, H) [gate | up], output_linear (E, H, I), router.layer."""
    def first(cands):
        return next((k for k in cands if have(k)), None)

    granite = {".block_sparse_moe.experts.gate_up_proj": ".block_sparse_moe.input_linear.weight",
               ".block_sparse_moe.experts.down_proj": ".block_sparse_moe.output_linear.weight",
               ".block_sparse_moe.router.weight": ".block_sparse_moe.router.layer.weight"}
    for ours, theirs in granite.items():   # Granite-MoE's checkpoint names: the same tensors, renamed
        if name.endswith(ours) and have(alt := name.removesuffix(ours) + theirs):
            return [[alt]]
    if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
        prefix, leaf = name.rsplit(".", 1)
        parts = ("gate", "up") if leaf == "gate_up_proj" else ("down",)
        keys = [[first(_expert_keys(prefix, p, e)) for p in parts] for e in range(n_experts)]
        return keys if all(k for ks in keys for k in ks) else None
    alt = name.replace(".mlp.", ".block_sparse_moe.")        # Mixtral's router
    if name.startswith("lm_head."):                          # GPT-NeoX (Pythia) hub checkpoints: embed_out
        alt = "embed_out." + name.removeprefix("lm_head.")
    if alt != name and have(alt):
        return [[alt]]
    # a base-model checkpoint (LlamaModel.save_pretrained, no head): its keys lack the CausalLM's
    # base_model_prefix ("model.layers.0..." is "layers.0..."), as transformers' loader accepts;
    # a 2-part name (lm_head.weight) has no such prefix
    head, _, rest = name.partition(".")
    return [[rest]] if rest.count(".") >= 1 and head and have(rest) else None


def checkpoint_sources(names, n_experts: int, have) -> dict[str, list[list[str]] | None]:
    """{parameter name: the checkpoint keys it is read from} (None: in no key). The one mapping
    from parameter names to checkpoint keys: runtime/parallel.load_weights reads by it, and the
    compiler's header check (compiler/weights.py) checks by it, so a check that passes is a load
    that finds every tensor. A tied lm_head is not among the names (named_parameters yields a
    tied parameter once, as the embedding), so a checkpoint without lm_head.weight is fine then."""
    return {n: [[n]] if have(n) else legacy_sources(n, n_experts, have) for n in names}


def n_experts(get) -> int:
    """The experts per MoE layer a config says (get: config attribute / dict lookup); 0: dense."""
    return get("num_local_experts") or get("num_experts") or 0


def assemble(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """[[gate_e, up_e] per expert] -> (E, 2I, H); [[down_e]] -> (E, H, I); [[t]] -> t."""
    if len(groups) == 1 and len(groups[0]) == 1:
        return groups[0][0]
    return torch.stack([torch.cat(g, dim=0) for g in groups])
