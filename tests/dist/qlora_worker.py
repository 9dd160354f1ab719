"""Runs under torchrun: QLoRA (lora.quantize_base nf4) through the real runtime on an FSDP2 mesh.

    torchrun --standalone --nproc-per-node 2 tests/dist/qlora_worker.py PLAN_JSON OUT_PT TRAIN_PLAN_JSON [CP_PLAN_JSON]

PLAN_JSON: one forward + backward with the adapters set to non-zero values (tests/dist/lora_worker.py
adapter_value); rank 0 writes the loss, every adapter's full gradient and what the ranks hold
(NF4 local shards: type, rows, bytes). TRAIN_PLAN_JSON: trained for its steps by runtime/train.py
run() in the same process group (checkpoint at the end, for the export test): its losses and
the trained model's logits on INPUT. CP_PLAN_JSON: trained likewise (FSDP over the flattened
dp_shard x cp mesh): its losses.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from meshbake.runtime import plan as P
from meshbake.runtime.dryrun import _nbytes
from meshbake.runtime.parallel import build, set_full
from meshbake.runtime.train import device_for, forward_loss_sum, init_distributed, run, world_mesh
from torch.distributed.tensor import DTensor

from tests.dist.lora_worker import INPUT, adapter_value


def main(plan_path: str, out_path: str, train_plan: str, cp_plan: str | None = None) -> int:
    plan = P.from_dict(json.loads(Path(plan_path).read_text()))
    init_distributed(plan.mesh.backend)
    model = build(plan, world_mesh(plan), device_for(plan))
    for name, p in model.named_parameters():
        if ".lora_" in name:
            set_full(p, adapter_value(name, p.shape))
    ids = torch.tensor(INPUT)
    loss = forward_loss_sum(model, ids[:, :-1], ids[:, 1:], False) / ids[:, 1:].numel()
    loss.backward()
    grads, held = {}, {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            grads[name] = p.grad.full_tensor().detach().clone()
        else:
            assert p.grad is None, name
        local = p.to_local() if isinstance(p, DTensor) else p
        held[name] = (type(local).__name__, tuple(local.shape), _nbytes(local))
    tplan, run_dir = P.from_dict(json.loads(Path(train_plan).read_text())), Path(out_path).parent / "train_run"
    res = run(tplan, run_dir)
    logits = None
    if not tplan.mesh.cp_enabled:    # (CP's attention takes the load-balanced sequence chunks only)
        res.model.eval()
        with torch.no_grad():        # the trained sharded model's logits, for the export test
            logits = res.model(input_ids=torch.tensor(INPUT), use_cache=False).logits
    cp_losses = run(P.from_dict(json.loads(Path(cp_plan).read_text())), Path(out_path).parent / "cp_run").losses \
        if cp_plan else None
    if dist.get_rank() == 0:
        (run_dir / "plan.json").write_text(P.dumps(tplan))
        torch.save({"loss": float(loss), "grads": grads, "held": held, "losses": res.losses, "logits": logits,
                    "run_dir": str(run_dir), "cp_losses": cp_losses}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
