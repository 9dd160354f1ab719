"""Runs under torchrun: what PyTorch really does in one training step of the runtime, per rank.

    torchrun --standalone --nproc-per-node N tests/dist/measure.py CASES_JSON OUT_JSON

For each case (a plan.json dict) the runtime's own setup + train_step run twice (step 1 creates
the AdamW state); step 2 is measured:
  peak_bytes      the highest live tensor memory of this rank during step 2, from the profiler's
                  allocator events (profile_memory=True) recorded from before the model is built,
                  so the level at any time is the sum of every allocation minus every free
  collectives     every c10d collective issued in step 2 by the torch.distributed Python API
                  (as FSDP2 calls it): op, dtype, numel, group size
OUT_JSON (rank 0): {name: {"ranks": [per-rank result, ...]}}
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from runtime import plan as P
from runtime.train import init_distributed, setup, train_step

# the names FSDP2 / the train loop call through the dist module (looked up at call time), and
# where each finds the tensor it sends: (positional index, keyword)
COLLECTIVES = {"reduce_scatter_single": (1, "input"), "reduce_scatter_tensor": (1, "input"),
               "all_reduce": (0, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
               "all_gather_single": (1, "input_tensor"), "broadcast": (0, "tensor")}


@contextmanager
def logged_collectives(log: list):
    saved = {n: getattr(dist, n) for n in COLLECTIVES}

    def wrap(name, fn):
        pos, key = COLLECTIVES[name]

        def inner(*args, **kw):
            t = kw[key] if key in kw else args[pos]
            log.append({"op": name, "dtype": str(t.dtype).removeprefix("torch."), "numel": t.numel(),
                        "group_size": dist.get_world_size(kw.get("group"))})
            return fn(*args, **kw)
        return inner

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def peak_from_events(prof, window: str) -> dict:
    """Live tensor bytes: running sum of the allocator's +/- events; peak inside `window`."""
    events = prof.profiler.kineto_results.events()
    win = next(e for e in events if e.name() == window)
    t0, t1 = win.start_ns(), win.start_ns() + win.duration_ns()
    level = start = peak = 0
    for ts, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if ts > t1:
            break
        level += nbytes
        if ts < t0:
            start = peak = level
        else:
            peak = max(peak, level)
    return {"start_bytes": start, "peak_bytes": peak}


def run_case(plan: P.Plan, run_dir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    log: list = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        job = setup(plan, run_dir)
        train_step(job, 0, False)
        with record_function("measured_step"), logged_collectives(log):
            out = train_step(job, 1, False)
    return {**peak_from_events(prof, "measured_step"), "collectives": log, "loss": out.loss}


def main(cases_path: str, out_path: str) -> int:
    cases = json.loads(Path(cases_path).read_text())
    init_distributed("gloo")
    results = {}
    for case in cases:
        with tempfile.TemporaryDirectory() as d:
            try:
                r = run_case(P.from_dict(case["plan"]), Path(d) / "run")
            except Exception:   # noqa: BLE001 — a failed rank must not leave the others in a collective
                print(f"case {case['name']} failed on rank {dist.get_rank()}:\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                os._exit(1)
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, r)
        results[case["name"]] = {"ranks": ranks}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
