"""The yardstick: a plain hand-written FSDP2 (+TP, SP, loss parallel) loop, torchtitan style
(its TP plan and its reshard_after_forward=False on the last block), on the same HF model,
batch and mesh as the runtime. No plan, no metrics file, no checkpoint logic, pre-generated
batches, foreach clipping and AdamW: the cheapest fast loop one would write by hand.

With lora (rank > 0): a minimal hand-written LoRA, PEFT's unmerged form, written without
looking at runtime/lora.py's code: every parameter frozen, then each target Linear (leaf name
in lora["targets"]) gets lora_a (r x in) and lora_b (out x r) beside its frozen W and an
instance forward W x + (x a^T b^T) * alpha / r. Under TP the adapters take W's layout so no
collective is added: colwise W (rows split) -> a whole, b rows split; rowwise W (columns split)
-> a columns split, b whole, the adapter's partial sum joining W's before the one reduction.
AdamW and clipping over the adapters only."""
from __future__ import annotations

import time
import types
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


def llama_tp(model, tp_mesh: DeviceMesh) -> None:
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })


def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


def _beside(w: torch.Tensor, shape: tuple[int, int], dim: int | None) -> nn.Parameter:
    """An empty adapter matrix on W's device (meta here), split over W's tp mesh on `dim`."""
    t = torch.empty(shape, device=w.device)
    if isinstance(w, DTensor):
        t = distribute_tensor(t, w.device_mesh, [Replicate() if dim is None else Shard(dim)], src_data_rank=None)
    return nn.Parameter(t)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> int:
    """After TP (W's layout known), before FSDP; returns how many Linears were adapted."""
    model.requires_grad_(False)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = mod.weight.shape
            split = mod.weight.placements[0].dim if isinstance(mod.weight, DTensor) else None   # 0 colwise, 1 rowwise
            mod.lora_a = _beside(mod.weight, (rank, in_f), 1 if split == 1 else None)
            mod.lora_b = _beside(mod.weight, (out_f, rank), 0 if split == 0 else None)
            mod.scaling = alpha / rank
            mod.forward = types.MethodType(_lora_forward, mod)
            n += 1
    return n


def train(hf_cfg, mesh: DeviceMesh, *, tp: int, steps: int, mbs: int, accum: int, seq: int, lr: float,
          lora: dict | None = None, cpu_times: list[float] | None = None) -> list[float]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    if tp > 1:
        llama_tp(model, mesh["tp"])
    if lora and not add_lora(model, lora["rank"], lora["alpha"], lora["targets"]):
        raise ValueError(f"no Linear named {lora['targets']}")
    layers = list(model.model.layers)
    fsdp = mesh["dp_shard"].size() > 1      # torchtitan applies FSDP only when dp_shard (x cp) > 1
    for i, layer in enumerate(layers if fsdp else []):
        # torchtitan's choice: the last block is needed again at once by backward, keep it gathered
        fully_shard(layer, mesh=mesh["dp_shard"], reshard_after_forward=i < len(layers) - 1)
    if fsdp:
        fully_shard(model, mesh=mesh["dp_shard"])
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):        # LoRA starts at the base model
                p.zero_()
            else:
                p.normal_(0, 0.02)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.1, foreach=True)
    batches = [torch.randint(hf_cfg.vocab_size, (mbs, seq + 1)) for _ in range(accum)]
    times = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        for i, x in enumerate(batches):
            if fsdp:
                model.set_requires_gradient_sync(i == accum - 1)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            with loss_parallel() if tp > 1 else nullcontext():
                loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(0, 1)) / accum
                loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:       # the process's CPU seconds (all threads) of the step
            cpu_times.append(time.process_time() - c0)
    return times
