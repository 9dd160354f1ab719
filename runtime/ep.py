"""Expert parallelism: MoE experts split by expert index over an `ep` axis carved from the FSDP
ranks dp_shard x cp, tokens dispatched to their experts' ranks with all-to-all (torchtitan / NeMo
AutoModel style; docs/EXPERT_PARALLEL.md).

Mesh: dp_shard x cp = efsdp x ep with ep inner (torchtitan's ParallelDims carves ep the same way:
the MoE block is token-wise, so the tokens of a cp rank, a chunk of a sequence, are dispatched
exactly like those of a dp rank). tp is 1 under ep and the world is row-major (dp_replicate,
dp_shard, cp), so an ep group is ep consecutive ranks. A second device mesh over the same
ranks, (dp_replicate, efsdp = dp_shard x cp / ep, ep), holds the experts: gate_up_proj
(E, 2I, H) and down_proj (E, H, I) are Shard(0) over ep (rank r keeps experts [r E/ep,
(r+1) E/ep)) and FSDP-sharded on dim 1 over efsdp (x dp_replicate for HSDP). Every other weight
is FSDP over dp_shard x cp as without ep. An expert's gradient is the sum over the ep group's
tokens (the all-to-all's backward brings them home), so it must be divided by the whole
data-parallel size dp_replicate x dp_shard x cp (what every other weight's FSDP averages over:
the train loop scales the loss by dp x cp / tokens), while its FSDP averages over dp_replicate x
efsdp only: dp_replicate x dp_shard x cp / (dp_replicate x efsdp) = ep, whatever share of ep the
cp ranks are, so the local experts' gradients are scaled by 1/ep in backward (_ScaleGrad;
FSDP2's set_gradient_divide_factor needs ReduceOp.PREMUL_SUM, which gloo lacks), and each
token's loss weighs the same as without ep.

Forward of one MoE block, N tokens (B x T) on this rank, k experts per token, router replicated:
  1. route: (N, k) expert ids and weights; the N k token copies sorted by expert;
  2. per-expert counts exchanged (all_to_all_single of E integers), then the copies themselves
     (all_to_all_single, uneven splits, autograd: its backward is the reverse all-to-all);
  3. this rank's E/ep experts run on the rows received (grouped by source rank, then expert);
  4. the outputs go back (reverse all-to-all), are scaled by the routing weight and added into
     their token's row (index_add_), exactly transformers' grouped-experts loop.
Traffic per MoE layer and rank, forward: 2 x N k H x bytes x (ep-1)/ep (dispatch + combine, for
uniform routing); the same in backward.
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
    """(dp_replicate, efsdp = dp_shard x cp / ep, ep) over the world (tp = 1 under ep). The world
    is row-major (dp_replicate, dp_shard, cp, tp = 1), so dp_shard x cp is one run of consecutive
    ranks per replica and this shape is a reshape of it: an ep group is ep consecutive ranks of
    that run (with cp 2, ep 2: the two cp ranks of one sequence; ep 4 over dp_shard 2 x cp 2: all
    four), efsdp the ranks ep apart."""
    m = plan.mesh
    return init_device_mesh(m.device, (m.dp_replicate, m.experts_fsdp, m.ep), mesh_dim_names=DIMS)


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_meshbake_tp")]


def install(model: nn.Module, mesh: DeviceMesh) -> None:
    """Experts Shard(0) over mesh['ep'], the MoE block forwards replaced by the dispatching one.
    After fused.install (the MoE blocks carry its routing statistics and aux-loss hooks)."""
    ep_mesh = mesh["ep"]
    if not _moe_blocks(model):
        raise RuntimeError("mesh.ep > 1 but the model has no MoE block in the grouped-experts layout")
    for block in _moe_blocks(model):
        ex = block.experts
        for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            p = getattr(ex, n, None)       # GPT-OSS's biases (E, 2I), (E, H) go with their experts
            if p is None:
                continue
            ex.register_parameter(n, nn.Parameter(distribute_tensor(p, ep_mesh, [Shard(0)])))
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
    gu = self.gate_up_proj
    ep = gu.device_mesh.size() if isinstance(gu, DTensor) else 1

    def local(n):
        p = getattr(self, n)
        return _ScaleGrad.apply(p.to_local() if isinstance(p, DTensor) else p, 1.0 / ep)
    gu, dn = local("gate_up_proj"), local("down_proj")
    ad = expert_factors(self, lambda t: _ScaleGrad.apply(t, 1.0 / ep))    # LoRA: Shard(0) like W, same 1/ep
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
    """(B, T, H) -> (B, T, H): route, dispatch, run the local experts, combine."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    from .fused import _aux_terms, _count, block_output, route, shared_experts

    ep_mesh = self._meshbake_ep
    group, ep = ep_mesh.get_group(), ep_mesh.size()
    b, t, h = hidden_states.shape
    flat = hidden_states.reshape(-1, h)
    logits, w, idx = route(self, flat)                                        # (N, E), (N, k), (N, k)
    if torch.is_grad_enabled():
        replay = torch._C._current_graph_task_id() != -1
        if not replay:
            _count(self, logits, idx)
        if getattr(self, "_meshbake_aux", None) is not None:
            _aux_terms(self, logits, idx.shape[-1], replay)
    n_exp, k = logits.shape[-1], idx.shape[-1]
    local = n_exp // ep
    with torch.no_grad():
        order = torch.argsort(idx.flatten(), stable=True)                    # (N k,) copies by expert
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
    rows = flat[tok] * w.flatten()[order, None].to(flat.dtype) if scaled else flat[tok]
    x = all_to_all_single_autograd(rows, recv_splits, send_splits, group)
    y = self.experts(x[regroup], rows_per_expert)                             # FSDP unshards here
    y = y[torch.argsort(regroup)]                                             # back to source order
    y = all_to_all_single_autograd(y, send_splits, recv_splits, group)       # (N k, H) in `order`
    if not scaled:
        y = y * w.flatten()[order, None].to(y.dtype)
    out = torch.zeros_like(flat).index_add_(0, tok, y.to(flat.dtype))
    shared, gate = shared_experts(self)
    if shared is not None:           # every token's shared expert(s), whole (tp is 1 under ep)
        out = out + (torch.sigmoid(gate(flat)) * shared(flat) if gate is not None else shared(flat))
    out = out.reshape(b, t, h)
    if scaled:                       # Llama-4's shared expert (shared_experts gives None for it)
        out = out + self.shared_expert(hidden_states)
    return block_output(self, out, w)
