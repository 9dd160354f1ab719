"""Runs under torchrun: builds each plan's model with random init (no model.weights) through
the runtime's own build() and writes the FULL initial state (every parameter under every name
it has, tied ones twice, and every buffer) gathered to rank 0. No training step.

    torchrun --standalone --nproc-per-node N tests/dist/init_worker.py CASES_JSON OUT_PT

CASES_JSON: [{"name", "plan": plan.json dict}], one process group for all of them.
OUT_PT (rank 0): {name: {"state": {key: full tensor}, "tied": bool | None}}
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshbake.runtime import plan as P
from meshbake.runtime.parallel import build
from meshbake.runtime.train import device_for, init_distributed, world_mesh


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gathers every tensor in the same order (full_tensor is a collective)."""
    out = {}
    for key, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        full = t.full_tensor() if isinstance(t, DTensor) else t
        out[key] = full.detach().clone().cpu()
    return out


def main(cases_path: str, out_path: str) -> int:
    cases = json.loads(Path(cases_path).read_text())
    init_distributed(cases[0]["plan"]["mesh"]["backend"])
    results = {}
    for case in cases:
        plan = P.from_dict(case["plan"])
        try:
            model = build(plan, world_mesh(plan), device_for(plan))
            tied = None
            if plan.model.tie_word_embeddings:
                tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
            results[case["name"]] = {"state": full_state(model), "tied": tied}
            del model
        except Exception:   # noqa: BLE001 — a failed rank must not leave the others in a collective
            print(f"case {case['name']} failed on rank {dist.get_rank()}:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            os._exit(1)
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
