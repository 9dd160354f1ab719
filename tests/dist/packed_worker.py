"""Runs under torchrun: one packed row through the real parallelized model, per case.

    torchrun --standalone --nproc-per-node 4 tests/dist/packed_worker.py CASES_JSON OUT_DIR

CASES_JSON: [{"name", "plan": plan.json dict, "input_ids", "labels", "position_ids": [[...T]]}
             | {"name", "kind": "resume", "plans": [full, first, second], "dir": run root}]
Every rank feeds the same row (dp copies average to the same gradient). Rank 0 saves, per case,
OUT_DIR/<name>.pt = {"tok_loss": (T,) per-token loss in global order, "grads": {fqn: full grad}}
of sum(token losses) -- what test_packing.py compares with each document run alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from meshbake.runtime import cp
from meshbake.runtime import plan as P
from meshbake.runtime.parallel import build
from meshbake.runtime.train import device_for, init_distributed, world_mesh

from tests.dist import watchdog


def run_case(case: dict, out: Path) -> None:
    plan = P.from_dict(case["plan"])
    mesh = world_mesh(plan)
    model = build(plan, mesh, device_for(plan))
    x, y, pos = (torch.tensor(case[k]) for k in ("input_ids", "labels", "position_ids"))     # (1, T)
    T, ncp = x.shape[1], plan.mesh.cp
    order = torch.arange(T)
    if ncp > 1:
        rank = mesh["cp"].get_local_rank()
        pos = cp.set_batch(mesh["cp"], T, pos)
        x, y = (cp.shard_sequence(t, ncp, rank) for t in (x, y))
        order = cp.local_positions(T, ncp, rank)
    logits = model(input_ids=x, position_ids=pos, use_cache=False).logits          # (1, T/cp, V[/tp])
    lp_sum = None
    if plan.tp.loss_parallel:             # the training loss: vocab-sharded CE, -100 ignored, summed
        from meshbake.runtime.train import forward_loss_sum
        with torch.no_grad():
            s = forward_loss_sum(model, x, y, True, pos)
        lp_sum = float(s.full_tensor() if isinstance(s, DTensor) else s)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    tok = F.cross_entropy(logits[0].float(), y[0], reduction="none", ignore_index=-100)    # (T/cp,)
    # FSDP averages grads over dp_shard x cp: the dp copies are equal, the cp parts add up
    (tok.sum() * ncp).backward()
    full = torch.zeros(T)
    if ncp > 1:
        parts = [torch.zeros_like(tok) for _ in range(ncp)]
        orders = [torch.zeros_like(order) for _ in range(ncp)]
        dist.all_gather(parts, tok.detach().contiguous(), group=mesh["cp"].get_group())
        dist.all_gather(orders, order.contiguous(), group=mesh["cp"].get_group())
        for o, t in zip(orders, parts):
            full[o] = t
    else:
        full = tok.detach()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.detach().clone()
    if dist.get_rank() == 0:
        torch.save({"tok_loss": full, "grads": grads, "lp_sum": lp_sum}, out / f"{case['name']}.pt")
    dist.barrier()


def resume_case(case: dict, out: Path) -> None:
    """Prepared data, a run straight through (full) vs. the same run stopped after a checkpoint on
    one mesh (first) and resumed on another dp size (second): the resumed steps must read the
    next unseen samples, so their losses equal the straight run's."""
    from meshbake.runtime.train import run

    full, first, second = (P.from_dict(d) for d in case["plans"])
    root = Path(case["dir"])
    a = run(full, root / "full")
    run(first, root / "split")
    b = run(second, root / "split")
    if dist.get_rank() == 0:
        (out / f"{case['name']}.json").write_text(json.dumps({"full": a.losses, "resumed": b.losses}))
    dist.barrier()


def main(cases_path: str, out_dir: str) -> int:
    cases = json.loads(Path(cases_path).read_text())
    init_distributed(cases[0]["plan"]["mesh"]["backend"])
    try:
        for case in cases:
            with watchdog.case(case["name"]):      # a hang ends the launch naming the case (tests/dist/watchdog.py)
                (resume_case if case.get("kind") == "resume" else run_case)(case, Path(out_dir))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
