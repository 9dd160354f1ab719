"""LoRA adapters that compose with TP and FSDP2 by construction.

A target Linear (weight W: out x in; plan.json model.roles.lora_targets, resolved by the
compiler) gets two parameters on the SAME module, lora_A (r x in) and lora_B (out x r), and
computes  y = x (W + s B A)^T + b,  s = alpha / r. Because B A has W's shape, it takes W's
tensor-parallel layout with no new communication (runtime/roles.py lora_dims, which the
compiler's memory estimate reads too):
    colwise  W Shard(0): B Shard(0) (out rows), A Replicate   -> B A is Shard(0)
    rowwise  W Shard(1): A Shard(1) (in cols),  B Replicate   -> B A is Shard(1)
    replicate           : both Replicate (plain tensors without TP)
The base W is frozen; FSDP2 shards A and B with the rest of the block. Names stay HF's
("...q_proj.weight") plus "...q_proj.lora_A", so checkpoints and base weights load as usual.
Trade-off: the weight-gradient matmul of W + sBA is done as for full fine-tuning (LoRA's
backward-compute saving is not taken; its memory saving is: no grads or AdamW state for W).
B starts at zero, so step 0 is exactly the base model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .plan import Plan
from .roles import lora_dims, plan_roles


class LoraLinear(nn.Linear):
    """nn.Linear whose forward adds the adapter delta; swapped in by __class__ (no new names)."""

    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.lora_scale * (self.lora_B @ self.lora_A), self.bias)


def lora_targets(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Linear]]:
    """The Linear layers a LoRA plan adapts (the compiler resolved lora.targets to fqns)."""
    return [(fqn, model.get_submodule(fqn)) for fqn in plan_roles(plan).lora_targets]


def lora_scale(lo) -> float:
    return lo.alpha / lo.rank


def apply_lora(model: nn.Module, plan: Plan) -> list[str]:
    """After TP (so W's layout is known), before FSDP. Returns the adapted module names."""
    lo = plan.lora
    for p in model.parameters():
        p.requires_grad_(False)
    done = []
    for fqn, mod in lora_targets(model, plan):
        out_f, in_f = mod.weight.shape
        dev, dtype = mod.weight.device, mod.weight.dtype
        a = torch.empty(lo.rank, in_f, device=dev, dtype=dtype)
        b = torch.empty(out_f, lo.rank, device=dev, dtype=dtype)
        w = mod.weight
        if isinstance(w, DTensor):
            mesh = w.device_mesh
            a_dim, b_dim = lora_dims(plan.tp.placements[fqn])
            a = distribute_tensor(a, mesh, [Replicate() if a_dim is None else Shard(a_dim)], src_data_rank=None)
            b = distribute_tensor(b, mesh, [Replicate() if b_dim is None else Shard(b_dim)], src_data_rank=None)
        mod.lora_A = nn.Parameter(a)
        mod.lora_B = nn.Parameter(b)
        mod.__class__ = LoraLinear
        mod.lora_scale = lora_scale(lo)
        done.append(fqn)
    if not done:
        raise ValueError(f"lora.targets {list(lo.targets)}: plan.json names no module to adapt")
    return done


def lora_init(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor | None:
    """A ~ N(0, 1/in) (the variance of kaiming-uniform's bound), B = 0; None if not an adapter."""
    if name.endswith(".lora_B"):
        return torch.zeros(shape)
    if name.endswith(".lora_A"):
        return torch.randn(shape, generator=generator) / shape[1] ** 0.5
    return None
