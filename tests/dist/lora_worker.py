"""Runs under torchrun: one LoRA forward + backward through the real runtime (build: TP, SP,
LP, FSDP2), the adapters set to non-zero values; rank 0 writes the loss and every adapter's
full gradient. Every dp rank sees the same batch, so FSDP2's averaged gradient is the
single-process one. Plus the collectives one adapted Linear issues on the tp mesh, with and
without its adapter (runtime/lora.py: the adapter adds none).

    torchrun --standalone --nproc-per-node 4 tests/dist/lora_worker.py PLAN_JSON OUT_PT [TRAIN_PLAN_JSON]
    torchrun --standalone --nproc-per-node 4 tests/dist/lora_worker.py --many OUT_PT PLAN_JSON...

--many: each plan (its own mesh over the same ranks: experts over tp or ep, fused projections)
built in turn in one process group; rank 0 writes {plan name: {"loss", "grads"}}.

TRAIN_PLAN_JSON: a plan trained for its steps by runtime/train.py run() in the same process
group (bf16 base, fp32 adapters, dropout, activation checkpointing): its losses and dtypes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshbake.runtime import plan as P
from meshbake.runtime.parallel import build
from meshbake.runtime.train import device_for, forward_loss_sum, init_distributed, world_mesh

from tests.dist import watchdog

INPUT = [[(7 * i + 3 * j) % 4096 for i in range(33)] for j in range(2)]    # 2 x (32 + 1): inputs and labels


def adapter_value(name: str, shape) -> torch.Tensor:
    """Non-zero A and B (B = 0 at init would leave dA = 0 and test nothing), fixed per name."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=g) * 0.1


def comm_counts(tp_mesh, style: str) -> dict[str, int]:
    """Collectives of one forward + backward of a frozen Linear placed `style` on the tp mesh,
    plain ("base") and with an adapter ("lora")."""
    import torch.nn as nn
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from meshbake.runtime.lora import add_adapters

    out = {}
    for kind in ("base", "lora"):
        torch.manual_seed(0)
        lin = nn.Linear(16, 8, bias=False)
        lin.weight.requires_grad_(False)
        parallelize_module(lin, tp_mesh, ColwiseParallel() if style == "colwise" else RowwiseParallel())
        if kind == "lora":
            add_adapters(lin, 4, 2.0, 0.0, style)
            with torch.no_grad():
                for p in (lin.lora_A, lin.lora_B):
                    p.to_local().normal_()
        x = torch.randn(2, 4, 16)
        if style == "rowwise":
            x = x.chunk(tp_mesh.size(), -1)[tp_mesh.get_local_rank()]
        x.requires_grad_(True)
        with CommDebugMode() as c:
            lin(x).sum().backward()
        out[kind] = c.get_total_counts()
    return out


def train_case(plan_path: str, run_dir: Path) -> dict:
    from meshbake.runtime.train import run

    res = run(P.from_dict(json.loads(Path(plan_path).read_text())), run_dir)
    lora = [(n, p) for n, p in res.model.named_parameters() if ".lora_" in n]
    return {"losses": res.losses, "grad_norms": res.grad_norms,
            "adapter_dtypes": sorted({str(p.dtype) for _, p in lora}),
            "base_dtypes": sorted({str(p.dtype) for n, p in res.model.named_parameters() if ".lora_" not in n}),
            "dropout": sorted({m.lora_dropout for m in res.model.modules() if hasattr(m, "lora_dropout")})}


def loss_and_grads(plan: P.Plan, mesh) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.nn.Module]:
    """One forward + backward of INPUT (token ids mod the vocab) with every adapter set to
    adapter_value: the loss and every adapter's full gradient (the frozen base gets none)."""
    from contextlib import nullcontext

    from torch.distributed.tensor.parallel import loss_parallel

    from meshbake.runtime.parallel import set_full

    model = build(plan, mesh, device_for(plan))
    for name, p in model.named_parameters():
        if ".lora_" in name:
            set_full(p, adapter_value(name, p.shape))
    ids = torch.tensor(INPUT) % plan.model.config["vocab_size"]
    loss = forward_loss_sum(model, ids[:, :-1], ids[:, 1:], plan.tp.loss_parallel) / ids[:, 1:].numel()
    with loss_parallel() if plan.tp.loss_parallel else nullcontext():     # its backward too (runtime/train.py)
        loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            g = p.grad
            grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
        else:
            assert p.grad is None, name
    return loss, grads, model


def export_case(plan: P.Plan, run_dir: Path) -> dict:
    """run() for the plan's steps (its DCP checkpoint in run_dir), then the trained model's
    logits of INPUT: rank 0 writes run_dir/logits.pt and run_dir/plan.json."""
    from meshbake.runtime.train import run

    res = run(plan, run_dir)
    res.model.eval()
    ids = torch.tensor(INPUT)[:, :-1] % plan.model.config["vocab_size"]
    with torch.no_grad():
        logits = res.model(input_ids=ids, use_cache=False).logits
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if dist.get_rank() == 0:
        torch.save(logits, run_dir / "logits.pt")
        (run_dir / "plan.json").write_text(P.dumps(plan))
    return {"run_dir": str(run_dir), "losses": res.losses}


def main_many(out_path: str, *plan_paths: str) -> int:
    plans = [P.from_dict(json.loads(Path(p).read_text())) for p in plan_paths]
    init_distributed(plans[0].mesh.backend)
    out = {}
    for plan in plans:
        with watchdog.case(plan.name):      # a hang ends the launch naming the case (tests/dist/watchdog.py)
            if plan.checkpoint.every_steps:      # trained and checkpointed: logits after it, for export
                out[plan.name] = export_case(plan, Path(out_path).parent / plan.name)
                continue
            loss, grads, _ = loss_and_grads(plan, world_mesh(plan))
            out[plan.name] = {"loss": float(loss.full_tensor() if isinstance(loss, DTensor) else loss), "grads": grads}
    if dist.get_rank() == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(plan_path: str, out_path: str, train_plan: str | None = None) -> int:
    plan = P.from_dict(json.loads(Path(plan_path).read_text()))
    init_distributed(plan.mesh.backend)
    mesh = world_mesh(plan)
    loss, grads, model = loss_and_grads(plan, mesh)
    comms = {style: comm_counts(mesh["tp"], style) for style in ("colwise", "rowwise")}
    trained = train_case(train_plan, Path(out_path).parent / "train_run") if train_plan else None
    if dist.get_rank() == 0:
        torch.save({"trained": trained, "loss": float(loss.full_tensor() if isinstance(loss, DTensor) else loss), "grads": grads,
                    "comms": comms, "adapter_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters()
                                                               if ".lora_" in n})}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main_many(*sys.argv[2:]) if sys.argv[1] == "--many" else main(*sys.argv[1:]))
