"""LoRA adapters that compose with TP and FSDP2 by construction.

A target Linear (weight W: out x in; plan.json model.roles.lora_targets, resolved by the
compiler) gets two parameters on the SAME module, lora_A (r x in) and lora_B (out x r), and
computes the unmerged form, as PEFT does:

    y = x W^T + s * dropout(x) A^T B^T + b,      s = alpha / r

W is frozen: it gets no gradient, and no out x in temporary is ever formed (the merged form
F.linear(x, W + s B A) built one per layer in forward and a full weight-gradient matmul in
backward, reduced to dA and dB afterwards). Backward here: dx through W (as for any frozen
layer) plus the thin adapter matmuls. Tensor parallelism needs no new communication (layouts
from runtime/roles.py lora_dims, which the compiler's memory estimate reads too):
    colwise  W Shard(0): A Replicate, B Shard(0) (out rows). x is Replicate (with sequence
             parallel the block's PrepareModuleInput has already all-gathered it, so the
             adapter sees the same gathered x as W); x A^T is computed whole on every tp
             rank, then B gives this rank's output columns, Shard(-1) like x W^T.
    rowwise  W Shard(1): A Shard(1) (in cols), B Replicate. x is Shard(-1); x_local A_local^T
             is a Partial sum over tp, B keeps it Partial, and it is added to x_local W_local^T
             (Partial too) BEFORE RowwiseParallel's one reduction (all-reduce, or the
             reduce-scatter of sequence parallel).
    replicate           : both Replicate (plain tensors without TP)
The gradients of A beside a colwise / B beside a rowwise W are Partial over tp, as before
(FSDP2 reduces them; without FSDP runtime/parallel.py reduce_partial_grads does).

dtype: adapters are kept in float32 whatever the base's dtype (ADAPTER_DTYPE; PEFT does the
same): master weights, gradients and AdamW state. FSDP2's MixedPrecisionPolicy is one per
fully_shard call and FSDP2 decides per parameter (a param_dtype equal to the parameter's own
dtype is dropped), so the block's one policy serves both: the frozen bf16 W is gathered as it
is and the fp32 adapters are cast to param_dtype for the forward, their gradients reduced in
reduce_dtype into fp32 sharded grads. FSDP2 needs one dtype only across a group's TRAINABLE
params: all adapters, all fp32. No second policy (it would need the adapters in a module of
their own, renaming them and adding an all-gather per adapted Linear). So the adapter path
computes in the block's compute dtype, as PEFT's does under autocast; without FSDP the
forward casts the adapters to the input's dtype (autocast, if on, then casts as it does for W).

dropout (recipe lora.dropout, PEFT's lora_dropout) is applied to the adapter's input only, in
training. Under TP it is a DTensor op: on CUDA DTensor's RNG tracker gives the same mask on
every tp rank for the replicated colwise input and distinct ones per shard for the rowwise
input; on CPU (no tracker) each rank draws from its own generator, seeded alike on every rank.

Grouped MoE experts (recipe lora.targets "experts.gate_up_proj" / "experts.down_proj", PEFT's
target_parameters names): expert e's weight W_e (out x in) of the 3-D parameter W (E, out, in)
gets its own rank-r pair, kept grouped on the experts module as lora_A_<param> (E, r, in) and
lora_B_<param> (E, out, r); the MoE loop (runtime/fused.py experts_forward, runtime/ep.py
_local_experts) computes, for the rows routed to e,
    y_e = x_e W_e^T + s * dropout(x_e) A_e^T B_e^T,
the unmerged form of PEFT's ParamWrapper (which merges W_e + s B_e A_e; its A is our A
flattened to (E r, in), its B ours as (out, r E)). gate_up_proj's rows are in runtime/fused.py's
pairs order, so B's rows are too (export undoes both with the same to_hf). Layouts beside W
(runtime/roles.py expert_lora_dims, read from W's own DTensor placement):
    ep   W Shard(0) (expert index): A, B Shard(0), each rank holds its experts' adapters; the
         1/ep gradient scale of ep's experts applies to them too; no new collective.
    tp   gate_up W Shard(1) (2I): A Replicate, B Shard(1); down W Shard(2) (I): A Shard(2), B
         Replicate. The MoE loop runs on local tensors, so the replicated factor's gradient is
         this rank's partial sum: it is all-reduced over tp in backward (_SumGrad, one
         all-reduce of E r H floats per replicated factor and MoE layer, 2 per layer).
Dropout on the expert rows as on a Linear's input (per routed copy of a token).

The base W is frozen; FSDP2 shards A and B with the rest of the block. Names stay HF's
("...q_proj.weight") plus "...q_proj.lora_A", so checkpoints and base weights load as usual.
B starts at zero, so step 0 is exactly the base model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .plan import Plan
from .roles import EXPERT_PARAMS, expert_lora_dims, is_expert_target, lora_dims, plan_roles

ADAPTER_DTYPE = torch.float32     # lora_A / lora_B, their grads and AdamW state, whatever the base dtype


class LoraLinear(nn.Linear):
    """nn.Linear whose forward adds the adapter delta; swapped in by __class__ (no new names)."""

    lora_scale: float
    lora_dropout: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)          # frozen W: input gradient only
        a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype:         # without FSDP: compute in the input's dtype (FSDP2 cast them already)
            a, b = a.to(x.dtype), b.to(x.dtype)
        h = F.dropout(x, self.lora_dropout, True) if self.lora_dropout and self.training else x
        # s folded into B (out x r, the small side): no scalar op on a Partial DTensor
        return y + F.linear(F.linear(h, a), b * self.lora_scale)


def lora_targets(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Linear]]:
    """The Linear layers a LoRA plan adapts (the compiler resolved lora.targets to fqns)."""
    return [(fqn, model.get_submodule(fqn)) for fqn in plan_roles(plan).lora_targets if not is_expert_target(fqn)]


def expert_targets(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module, str]]:
    """(parameter fqn, experts module, parameter name) of every grouped experts target."""
    out = []
    for fqn in plan_roles(plan).lora_targets:
        if is_expert_target(fqn):
            mod, _, name = fqn.rpartition(".")
            out.append((fqn, model.get_submodule(mod), name))
    return out


def lora_scale(lo) -> float:
    return lo.alpha / lo.rank


def apply_lora(model: nn.Module, plan: Plan, held: set[str] | None = None) -> list[str]:
    """After TP (so W's layout is known), before FSDP. Returns the adapted module names.
    held: the module names the model still has (a pipeline rank's stages, runtime/pp.py): the
    targets of other stages are theirs to adapt."""
    lo = plan.lora
    for p in model.parameters():
        p.requires_grad_(False)
    done = []
    if held is not None:
        plan = _only_targets(plan, held)
    for fqn, mod in lora_targets(model, plan):
        add_adapters(mod, lo.rank, lora_scale(lo), float(lo.dropout), plan.tp.placements.get(fqn, "replicate"))
        done.append(fqn)
    for fqn, mod, name in expert_targets(model, plan):
        add_expert_adapters(mod, name, lo.rank, lora_scale(lo), float(lo.dropout))
        done.append(fqn)
    if not done:
        raise ValueError(f"lora.targets {list(lo.targets)}: plan.json names no module to adapt")
    return done


def _only_targets(plan: Plan, held: set[str]) -> Plan:
    """The plan with its LoRA targets cut to the modules in `held` (a grouped experts target
    "...experts.gate_up_proj" by its module)."""
    from dataclasses import replace

    r = plan_roles(plan)
    mine = [f for f in r.lora_targets if f in held or f.rpartition(".")[0] in held]
    return replace(plan, model=replace(plan.model, roles=r.with_lora(mine)))


def add_adapters(mod: nn.Linear, rank: int, scale: float, dropout: float, style: str) -> LoraLinear:
    """One Linear (already TP'd when W is a DTensor, placed `style`) becomes a LoraLinear with
    empty fp32 lora_A / lora_B laid out beside W (runtime/roles.py lora_dims)."""
    out_f, in_f = mod.weight.shape
    dev = mod.weight.device
    a = torch.empty(rank, in_f, device=dev, dtype=ADAPTER_DTYPE)
    b = torch.empty(out_f, rank, device=dev, dtype=ADAPTER_DTYPE)
    w = mod.weight
    if isinstance(w, DTensor):
        mesh = w.device_mesh
        a_dim, b_dim = lora_dims(style)
        a = distribute_tensor(a, mesh, [Replicate() if a_dim is None else Shard(a_dim)], src_data_rank=None)
        b = distribute_tensor(b, mesh, [Replicate() if b_dim is None else Shard(b_dim)], src_data_rank=None)
    mod.lora_A = nn.Parameter(a)
    mod.lora_B = nn.Parameter(b)
    mod.__class__ = LoraLinear
    mod.lora_scale = scale
    mod.lora_dropout = dropout
    return mod


def add_expert_adapters(experts: nn.Module, name: str, rank: int, scale: float, dropout: float) -> None:
    """lora_A_<name> (E, r, in) and lora_B_<name> (E, out, r), fp32, empty, beside the grouped
    W = experts.<name> (E, out, in), split as W is (ep: by expert; tp: see the module doc)."""
    w = getattr(experts, name)
    e, out_f, in_f = w.shape
    a = torch.empty(e, rank, in_f, device=w.device, dtype=ADAPTER_DTYPE)
    b = torch.empty(e, out_f, rank, device=w.device, dtype=ADAPTER_DTYPE)
    if isinstance(w, DTensor):
        (pl,) = w.placements              # one mesh dim: tp (experts style) or ep
        a_dim, b_dim = expert_lora_dims(pl.dim if isinstance(pl, Shard) else None)
        a = distribute_tensor(a, w.device_mesh, [Replicate() if a_dim is None else Shard(a_dim)], src_data_rank=None)
        b = distribute_tensor(b, w.device_mesh, [Replicate() if b_dim is None else Shard(b_dim)], src_data_rank=None)
    experts.register_parameter(f"lora_A_{name}", nn.Parameter(a))
    experts.register_parameter(f"lora_B_{name}", nn.Parameter(b))
    experts.lora_scale, experts.lora_dropout = scale, dropout


def expert_factors(experts: nn.Module, wrap=lambda t: t) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{param name: (A (E_l, r, in), s B (E_l, out, r))} as this rank's MoE loop uses them: local
    tensors, a factor replicated over a mesh whose W is split passed through _SumGrad (its local
    gradient is a partial sum, see the module doc), then `wrap` (ep: the 1/ep gradient scale)."""
    from .fused import _SumGrad

    def local(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor):
            return wrap(t)
        loc = t.to_local()
        if t.device_mesh.size() > 1 and all(p.is_replicate() for p in t.placements):
            loc = _SumGrad.apply(loc, t.device_mesh.get_group())
        return wrap(loc)

    out = {}
    for name in EXPERT_PARAMS:
        a = getattr(experts, f"lora_A_{name}", None)
        if a is not None:
            out[name] = (local(a), local(getattr(experts, f"lora_B_{name}")) * experts.lora_scale)
    return out


def expert_linear(experts: nn.Module, x: torch.Tensor, w: torch.Tensor, factors: dict, name: str,
                  e: int) -> torch.Tensor:
    """x (n, in) through local expert e's W (out, in), plus its adapter when `name` has one."""
    y = F.linear(x, w)
    if name not in factors:
        return y
    a, b = factors[name]
    p = experts.lora_dropout
    h = F.dropout(x, p, True) if p and experts.training else x
    return y + F.linear(F.linear(h, a[e].to(x.dtype)), b[e].to(x.dtype))


def _is_adapter(name: str, part: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == part or leaf.startswith(part + "_")


def lora_init(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor | None:
    """A ~ N(0, 1/in) (the variance of kaiming-uniform's bound), B = 0; None if not an adapter.
    Grouped experts' lora_A_<param> (E, r, in): the same per expert (in = the last dim)."""
    if _is_adapter(name, "lora_B"):
        return torch.zeros(shape)
    if _is_adapter(name, "lora_A"):
        return torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    return None
