"""The yardstick: a plain hand-written FSDP2 (+TP, SP, loss parallel) loop, torchtitan style
(its TP plan and its reshard_after_forward=False on the last block), on the same HF model,
batch and mesh as the runtime. No plan, no metrics file, no checkpoint logic, pre-generated
batches, foreach clipping and AdamW: the cheapest fast loop one would write by hand."""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
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


def train(hf_cfg, mesh: DeviceMesh, *, tp: int, steps: int, mbs: int, accum: int, seq: int, lr: float) -> list[float]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    if tp > 1:
        llama_tp(model, mesh["tp"])
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
        for p in model.parameters():
            p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=True)
    batches = [torch.randint(hf_cfg.vocab_size, (mbs, seq + 1)) for _ in range(accum)]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for i, x in enumerate(batches):
            if fsdp:
                model.set_requires_gradient_sync(i == accum - 1)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            with loss_parallel() if tp > 1 else nullcontext():
                loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(0, 1)) / accum
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times
