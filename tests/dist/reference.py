"""The single-process reference: plain HF model, plain AdamW, plain clip_grad_norm_, the
whole global batch in one forward. Shares with the runtime only the *definition* of the
experiment (init values per parameter name, the token stream, the LR schedule)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meshbake.runtime import plan as P
from meshbake.runtime.data import TokenData
from meshbake.runtime.parallel import DTYPES, hf_config, init_tensor, iter_full_weights
from meshbake.runtime.train import lr_factor


def hf_model(plan: P.Plan) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = hf_config(plan.model.config)
    cfg._attn_implementation = plan.model.attn_implementation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[plan.train.dtype])
    if plan.lora.rank:
        add_lora_hooks(model, plan)
    params = dict(model.named_parameters())
    with torch.no_grad():
        if plan.model.weights:
            for name, full in iter_full_weights(plan.model.weights, [n for n in params if ".lora_" not in n]):
                params[name].copy_(full)
        for name, p in params.items():
            if not plan.model.weights or ".lora_" in name:
                p.copy_(init_tensor(name, p.shape, plan.train.seed, cfg.initializer_range))
    if plan.lora.rank:
        merge_expert_adapters(model, plan)      # after the values: it renames the parametrized weights
    return model


class _ExpertDelta(torch.nn.Module):
    """W (E, out, in) -> W + s B A per expert (B (E, out, r) @ A (E, r, in)): PEFT's merged form."""

    def __init__(self, experts: torch.nn.Module, name: str, s: float):
        super().__init__()
        self.experts, self.name, self.s = [experts], name, s     # a list: not a submodule

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        ex = self.experts[0]
        return w + self.s * getattr(ex, f"lora_B_{self.name}") @ getattr(ex, f"lora_A_{self.name}")


def merge_expert_adapters(model: torch.nn.Module, plan: P.Plan) -> None:
    """Grouped MoE experts named in lora.targets ("experts.gate_up_proj"): adapters in HF's row
    order, merged into W by a parametrization (B = 0 at init: the same start as the runtime's
    pairs order, and AdamW is elementwise, so the trajectories are each other's permutation)."""
    from torch.nn.utils import parametrize

    s = plan.lora.alpha / plan.lora.rank
    for fqn, mod in list(model.named_modules()):
        for name in ("gate_up_proj", "down_proj"):
            if fqn.endswith(".experts") and hasattr(mod, f"lora_A_{name}"):
                parametrize.register_parametrization(mod, name, _ExpertDelta(mod, name, s))


def add_lora_hooks(model: torch.nn.Module, plan: P.Plan) -> None:
    """LoRA the textbook way (a side path x A^T B^T s added to the output), independent of the
    runtime's merged-weight form; base weights frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    s = plan.lora.alpha / plan.lora.rank
    for fqn, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and fqn.rpartition(".")[2] in plan.lora.targets:
            mod.lora_A = torch.nn.Parameter(torch.empty(plan.lora.rank, mod.in_features))
            mod.lora_B = torch.nn.Parameter(torch.empty(mod.out_features, plan.lora.rank))
            mod.register_forward_hook(lambda m, args, out: out + s * F.linear(F.linear(args[0], m.lora_A), m.lora_B))
        for name in ("gate_up_proj", "down_proj"):          # grouped experts: (E, r, in), (E, out, r)
            w = getattr(mod, name, None) if fqn.endswith(".experts") else None
            if f"experts.{name}" in plan.lora.targets and w is not None and w.ndim == 3:
                e, o, i = w.shape
                mod.register_parameter(f"lora_A_{name}", torch.nn.Parameter(torch.empty(e, plan.lora.rank, i)))
                mod.register_parameter(f"lora_B_{name}", torch.nn.Parameter(torch.empty(e, o, plan.lora.rank)))


def reference_losses(plan: P.Plan) -> tuple[dict[int, float], dict[int, float]]:
    losses, norms, _ = reference_run(plan)
    return losses, norms


def reference_run(plan: P.Plan) -> tuple[dict[int, float], dict[int, float], torch.nn.Module]:
    """The losses and gradient norms of every step, and the trained model."""
    t = plan.train
    model = hf_model(plan)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, plan))
    data = TokenData(plan.data, t, dp=1)
    losses, norms = {}, {}
    for step in range(t.steps):
        x = data.global_batch_tokens(step)                       # (G, T+1): every rank's samples
        if t.router_aux_loss_coef > 0:
            loss = moe_step(model, x, t)
        else:
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(0, 1))
            loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
        if t.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(trainable, t.grad_clip, norm)
        norms[step + 1] = float(norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step + 1] = loss.item()
    return losses, norms, model


def moe_step(model: torch.nn.Module, x: torch.Tensor, t: P.TrainPlan) -> torch.Tensor:
    """transformers' own MoE loss with gradient accumulation over the global micro-batches
    (micro-step m = samples [m G/accum, (m+1) G/accum) of every rank, runtime/data.py):
    cross-entropy over the global batch + coef x HF's aux_loss (output_router_logits) of each
    micro-batch, averaged over the micro-steps. Backward per micro-step."""
    per, total = x.shape[0] // t.grad_accum, torch.zeros(())
    for m in range(t.grad_accum):
        xm = x[m * per:(m + 1) * per]
        out = model(input_ids=xm[:, :-1], use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), xm[:, 1:].flatten(0, 1), reduction="sum")
        loss = ce / x[:, 1:].numel() + t.router_aux_loss_coef * out.aux_loss / t.grad_accum
        loss.backward()
        total += loss.detach()
    return total
