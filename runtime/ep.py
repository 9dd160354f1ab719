"""Expert parallelism: MoE experts split by expert index over an `ep` axis carved from the
flattened (dp_shard, cp, tp) ranks, tokens dispatched to their experts' ranks with all-to-all
(torchtitan / NeMo AutoModel style; docs/EXPERT_PARALLEL.md).

Mesh (torchtitan's ParallelDims with etp = 1): within one replica the world is row-major
(dp_shard, cp, tp), tp innermost, so world rank w = (r dp_shard + d) cp tp + c tp + t. ep is
carved from that flat index: ep groups are ep consecutive ranks, efsdp = dp_shard x cp x tp / ep
groups the ranks ep apart. ep is a multiple of tp (compiler/moe.py), so an ep group is ep / tp
consecutive (dp_shard, cp) coordinates x every tp rank: the MoE block is token-wise, so a cp
rank's chunk of a sequence is dispatched exactly like a dp rank's tokens, and the tp ranks of
one coordinate dispatch disjoint 1/tp shares of its tokens (below). A second device mesh over
the same ranks, (dp_replicate, efsdp, ep), holds the experts: gate_up_proj (E, 2I, H) and
down_proj (E, H, I) are Shard(0) over ep (rank r keeps experts [r E/ep, (r+1) E/ep)), whole (not
split over tp: etp = 1), and FSDP-sharded on dim 1 over efsdp (x dp_replicate for HSDP). Every
other weight is FSDP over dp_shard x cp (and TP-split over tp) as without ep. Examples: dp_shard
2 x cp 2, ep 2: the cp pair of one sequence; dp_shard 2 x tp 2, ep 2: the tp pair; cp 2 x tp 2,
ep 4: all four.

Under tp the MoE block's input is the tp group's whole sequence (gathered from the sequence
shards under SP, replicated without): every tp rank routes all N = B x T tokens (router
replicated, as in runtime/fused.py), then dispatches only its 1/tp of them, rows [r N/tp,
(r+1) N/tp) (torchtitan's ReordererSequenceParallel), so no token goes out tp times. The
block's output is then a partial sum over tp (each token's routed output on one tp rank, the
tp-split shared expert's partial sums on all), reduced (reduce-scattered to the sequence shard
under SP) once, exactly as the experts-over-tp block does.

Gradient scale. Let D = dp_replicate x dp_shard x cp, the ranks' coordinates that see different
tokens (the tp ranks of one coordinate share them). The train loop scales each coordinate's loss
so that a dense weight's FSDP average over D gives the true gradient g: g = (1/D) sum_c g_c.
An expert's gradient on a rank is the sum over the token copies it received; every token of a
coordinate is dispatched exactly once (by one of its tp ranks) to the one rank of its ep group
holding its expert, so summed over the ranks holding an expert shard (dp_replicate x efsdp) it
is sum_c g_c = D g. Its FSDP averages over those dp_replicate x efsdp = D tp / ep ranks:
    D g / (D tp / ep) = (ep / tp) g,   i.e. (dp_r x dp_shard x cp) / (dp_r x efsdp) = ep / tp,
so the local experts' gradients are scaled by b = tp / ep in backward (_ScaleGrad; FSDP2's
set_gradient_divide_factor needs ReduceOp.PREMUL_SUM, which gloo lacks): 1/ep at tp 1 (any cp),
1 at ep = tp. Checked by tests/test_ep_mesh.py's grad norms and trained weights against one
process (ep over dp_shard x tp, dp_shard x cp, and cp x tp).

Forward of one MoE block, N tokens routed on this rank (N/tp dispatched), k experts per token:
  1. route: (N, k) expert ids and weights; this rank's n = N/tp tokens' n k copies sorted by expert;
  2. per-expert counts exchanged (all_to_all_single of E integers), then the copies themselves
     (all_to_all_single, uneven splits, autograd: its backward is the reverse all-to-all);
  3. this rank's E/ep experts run on the rows received (grouped by source rank, then expert);
  4. the outputs go back (reverse all-to-all), are scaled by the routing weight and added into
     their token's row (index_add_), exactly transformers' grouped-experts loop.
Traffic per MoE layer and rank, forward: 2 x (N/tp) k H x bytes x (ep-1)/ep (dispatch + combine,
for uniform routing); the same in backward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .lora import expert_factors, expert_linear
from .roles import transposed_experts

DIMS = ("dp_replicate", "efsdp", "ep")


def experts_mesh(plan) -> DeviceMesh:
    """(dp_replicate, efsdp = dp_shard x cp x tp / ep, ep) over the world, with pp the outermost
    axis before them. The world is row-major ([pp,] dp_replicate, dp_shard, cp, tp), so dp_shard
    x cp x tp is one run of consecutive ranks per (pipeline stage group and) replica and this
    shape is a reshape of it: an ep group is ep consecutive ranks of that run (ep / tp
    (dp_shard, cp) coordinates x every tp rank), efsdp the ranks ep apart. Under pp every group
    lies inside one pp coordinate (one stage group: ep dispatches only among the ranks that
    hold the same blocks); the callers index the mesh by name (mesh["ep"], mesh["efsdp"]), so
    the pp dim is only there to make the groups per stage group."""
    m = plan.mesh
    shape, names = (m.dp_replicate, m.experts_fsdp, m.ep), DIMS
    if m.pp > 1:
        shape, names = (m.pp, *shape), ("pp", *names)
    return init_device_mesh(m.device, shape, mesh_dim_names=names)


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_meshbake_tp")]


def install(model: nn.Module, mesh: DeviceMesh, tp: int = 1) -> None:
    """Experts Shard(0) over mesh['ep'], the MoE block forwards replaced by the dispatching one.
    After TP (which leaves the experts whole: their placement is replicate under ep) and
    fused.install (the MoE blocks carry its tp mesh, routing statistics and aux-loss hooks)."""
    ep_mesh = mesh["ep"]
    if not _moe_blocks(model) and "pp" not in (mesh.mesh_dim_names or ()):   # a pp stage may hold dense blocks only
        raise RuntimeError("mesh.ep > 1 but the model has no MoE block in the grouped-experts layout")
    for block in _moe_blocks(model):
        ex = block.experts
        for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            p = getattr(ex, n, None)       # GPT-OSS's biases (E, 2I), (E, H) go with their experts
            if p is None:
                continue
            if isinstance(p, DTensor):     # a plan.json with the experts tp-split and ep: ETP is not built
                raise RuntimeError(f"mesh.ep: {n} is already split over {p.device_mesh} (placement experts); "
                                   "under ep the experts' tp placement must be replicate")
            ex.register_parameter(n, nn.Parameter(distribute_tensor(p, ep_mesh, [Shard(0)])))
        ex._meshbake_grad_scale = tp / ep_mesh.size()     # see the module doc: tp / ep
        ex.forward = _local_experts.__get__(ex)
        block._meshbake_ep = ep_mesh
        block.forward = block_forward.__get__(block)


def shard_experts(model: nn.Module, mesh: DeviceMesh, policy: Any) -> None:
    """FSDP2 on each experts module over (dp_replicate,) efsdp, before the blocks' own fully_shard
    (which then leaves these parameters alone). Dim 1: dim 0 is the ep shard already."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["dp_replicate", "efsdp"] if mesh["dp_replicate"].size() > 1 else mesh["efsdp"]
    for block in _moe_blocks(model):
        fully_shard(block.experts, mesh=dp_mesh, mp_policy=policy, shard_placement_fn=lambda p: Shard(1))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _local_experts(self, x: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
    """This rank's E/ep experts on the rows received, in expert order (runtime/fused.py pairs
    layout for gate_up). Every local expert runs, even on 0 rows: its weights then get a zero
    gradient, so every rank's FSDP reduce-scatters the same parameters."""
    scale = self._meshbake_grad_scale              # tp / ep (module doc)

    def local(n):
        p = getattr(self, n)
        return _ScaleGrad.apply(p.to_local() if isinstance(p, DTensor) else p, scale)
    gu, dn = local("gate_up_proj"), local("down_proj")
    ad = expert_factors(self, lambda t: _ScaleGrad.apply(t, scale))     # LoRA: Shard(0) like W, same scale
    outs = []
    if hasattr(self, "gate_up_proj_bias"):         # GPT-OSS (experts_hf): HF's (E, H, 2I) with biases
        gub, dnb = local("gate_up_proj_bias"), local("down_proj_bias")
        for e, xe in enumerate(torch.split(x, rows_per_expert)):
            outs.append(self._apply_gate(xe @ gu[e] + gub[e]) @ dn[e] + dnb[e])  # (n, H)
        return torch.cat(outs)
    if transposed_experts(self):                   # Llama-4 (experts_t): (E, H, 2I) as column pairs
        for e, xe in enumerate(torch.split(x, rows_per_expert)):
            h = (xe @ gu[e]).unflatten(-1, (-1, 2))                            # (n, I, 2)
            outs.append(self.act_fn(h[..., 0]) * h[..., 1] @ dn[e])            # (n, H)
        return torch.cat(outs)
    for e, xe in enumerate(torch.split(x, rows_per_expert)):
        h = expert_linear(self, xe, gu[e], ad, "gate_up_proj", e).unflatten(-1, (-1, 2))              # (n, I, 2)
        outs.append(expert_linear(self, self.act_fn(h[..., 0]) * h[..., 1], dn[e], ad, "down_proj", e))  # (n, H)
    return torch.cat(outs)


def block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, T, H): route, dispatch this tp rank's share, run the local experts,
    combine. Under tp as runtime/fused.py moe_block_forward: the input the gathered Replicate
    DTensor under SP (a plain replicated tensor without), the output the tp group's partial sums
    reduce-scattered to the sequence shard (all-reduced without SP)."""
    import torch.nn.functional as F
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    from torch.distributed.tensor import Partial, Replicate

    from .fused import _aux_terms, _count, _local, _SumGrad, block_output, route, shared_expert_forward, shared_experts

    ep_mesh, tp_mesh = self._meshbake_ep, getattr(self, "_meshbake_tp", None)
    group, ep = ep_mesh.get_group(), ep_mesh.size()
    sp = isinstance(hidden_states, DTensor)
    x = hidden_states.to_local() if sp else hidden_states
    b, t, h = x.shape
    flat = x.reshape(-1, h)
    logits, w, idx = route(self, flat)                                        # (N, E), (N, k), (N, k)
    if torch.is_grad_enabled():
        replay = torch._C._current_graph_task_id() != -1
        if not replay:
            _count(self, logits, idx)
        if getattr(self, "_meshbake_aux", None) is not None:
            _aux_terms(self, logits, idx.shape[-1], replay)
    shared, gate = shared_experts(self)
    # Qwen2-MoE: sigmoid(shared_expert_gate(x)) (N, 1), replicated like the router
    s = torch.sigmoid(F.linear(flat, _local(gate.weight))) if gate is not None else None
    n_tok, lo = flat.shape[0], 0
    mine = flat
    if tp_mesh is not None:
        # every tp rank routed all N tokens; it dispatches rows [lo, hi) only. The routing weights'
        # and the input's gradients are then partial over tp (zero outside a rank's rows; the
        # shared expert's tp-split partial sums): summed by _SumGrad, as in moe_block_forward,
        # so the replicated router gets the whole gradient on every tp rank
        tg, r, tp = tp_mesh.get_group(), tp_mesh.get_local_rank(), tp_mesh.size()
        w, flat = _SumGrad.apply(w, tg), _SumGrad.apply(flat, tg)
        s = _SumGrad.apply(s, tg) if s is not None else None
        lo, hi = n_tok * r // tp, n_tok * (r + 1) // tp
        mine, w_mine, idx = flat[lo:hi], w[lo:hi], idx[lo:hi]
    else:
        w_mine = w
    n_exp, k = logits.shape[-1], idx.shape[-1]
    local = n_exp // ep
    with torch.no_grad():
        order = torch.argsort(idx.flatten(), stable=True)                    # (n k,) copies by expert
        sent = torch.bincount(idx.flatten(), minlength=n_exp)                # (E,) copies per expert
        got = torch.empty_like(sent)                                          # (ep x E/ep,) per source, expert
        dist.all_to_all_single(got, sent, group=group)
        send_splits = sent.view(ep, local).sum(1).tolist()
        recv_splits = got.view(ep, local).sum(1).tolist()
        by_src = got.view(ep, local)
        # received rows are grouped by source rank, then local expert: regroup by expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=got.device).repeat(ep), by_src.flatten())
        regroup = torch.argsort(expert_of_row, stable=True)
        rows_per_expert = by_src.sum(0).tolist()
    tok = order // k                                                          # source token of each copy
    scaled = getattr(self, "_meshbake_scaled_input", False)       # Llama-4: the expert's input times its score
    rows = mine[tok] * w_mine.flatten()[order, None].to(mine.dtype) if scaled else mine[tok]
    y = all_to_all_single_autograd(rows, recv_splits, send_splits, group)
    y = self.experts(y[regroup], rows_per_expert)                             # FSDP unshards here
    y = y[torch.argsort(regroup)]                                             # back to source order
    y = all_to_all_single_autograd(y, send_splits, recv_splits, group)       # (n k, H) in `order`
    if not scaled:
        y = y * w_mine.flatten()[order, None].to(y.dtype)
    out = torch.zeros_like(flat).index_add_(0, tok + lo, y.to(flat.dtype))   # (N, H): rows [lo, hi) filled
    if shared is not None:           # every token's shared expert(s): whole at tp 1, this rank's partial sum under tp
        z = shared_expert_forward(shared, flat, tp_mesh is not None)
        out = out + (s * z if s is not None else z)
    out = out.reshape(b, t, h)
    if tp_mesh is not None:
        out = DTensor.from_local(out, tp_mesh, [Partial()], run_check=False)
        out = out.redistribute(tp_mesh, [Shard(1)]) if sp else out.redistribute(tp_mesh, [Replicate()]).to_local()
    if scaled:                       # Llama-4's shared expert (shared_experts gives None for it): its own TP styles
        out = out + self.shared_expert(hidden_states)
    return block_output(self, out, w)
