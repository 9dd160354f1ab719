"""Runs under torchrun: what PyTorch really does in one training step of the runtime, per rank.

    torchrun --standalone --nproc-per-node N tests/dist/measure.py CASES_JSON OUT_JSON

For each case (a plan.json dict; "memory" and "setup_memory" flags) the runtime's own setup runs,
then train_step:
  collectives       every collective issued in the measured step (tests/dist/collectives.py:
                    FSDP2's, DTensor's, loss and context parallel's, the train loop's): op, mesh
                    axis, dtype, bytes. A memory case's step 2; any other case's step 1, unprofiled
                    (what step 2 issues, rank by rank: the same ops, groups, dtypes and bytes, the
                    MoE all-to-alls' routed bytes aside; compared with b576d78's step-2 log)
  peak_bytes        ("memory") the highest live tensor memory of this rank during step 2 (step 1
                    creates the AdamW state): the exact level at its start (every storage Python
                    reaches) + the highest rise above it in the profiler's allocator events of the
                    step (profile_memory=True, with addresses and the ops' inputs)
  setup_peak_bytes  ("setup_memory") the highest level of the tensors setup allocates
OUT_JSON (rank 0): {name: {"ranks": [per-rank result, ...]}}
"""
from __future__ import annotations

import bisect
import gc
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from meshbake.runtime import plan as P
from meshbake.runtime.train import init_distributed, setup, train_step

from tests.dist.collectives import CollectiveLog, mesh_axes


def allocations(prof) -> tuple[list[tuple[int, int, int]], dict[int, list[int]]]:
    """(time, ptr, +/-bytes) of every CPU allocator event the profiler saw, in time order, and
    the uses of every storage: ptr -> the end times of the ops that took it as an input
    (record_shapes=True records each tensor input's storage pointer), in time order."""
    from torch._C._profiler import _EventType

    out, uses, stack = [], {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            out.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        elif node.tag == _EventType.TorchOp:
            for x in node.extra_fields.inputs:
                for t in x if isinstance(x, list) else [x]:
                    ptr = getattr(t, "storage_data_ptr", None)
                    if ptr:
                        uses.setdefault(ptr, []).append(node.end_time_ns)
    for times in uses.values():
        times.sort()
    return sorted(out), uses


def _last_use(uses: dict[int, list[int]], ptr: int, after: int, before: int) -> int:
    """The end of the last op that read storage `ptr` in (after, before), else `after`."""
    times = uses.get(ptr, [])
    i = bisect.bisect_left(times, before) - 1
    return times[i] if i >= 0 and times[i] > after else after


def peak_from_events(prof, window: str, steady: bool) -> dict:
    """Live tensor bytes in `window` (a record_function range) and their peak, relative to the
    level when the profiler started. The profiler records allocator events of the threads it
    profiles only: gloo's worker threads free collective buffers unseen (the functional
    collectives' inputs and outputs, whose last reference the finished work drops; pipelining's
    send buffers). A buffer is known to be freed unseen when its address is handed out again, or
    (`steady`) when it is allocated in the window and still live at its end: in a steady-state
    step everything the step allocates is freed by its end (grads are set to None, the AdamW
    state exists from step 1). With the ops' inputs recorded (record_shapes), such a buffer is
    taken as freed right after the last op that read it (the wait or the copy out: when the work
    holding it can finish); without, when its address came back. Counting it live until its
    address came back made one rank's pp 2 x tp 2 peak 12.6 MB (32%) high in one run of three
    (the logits' all-gather buffers), and not counting it at all made another 8.4 MB low: the
    level is exact only with the free placed. A free of a buffer from before the profiler
    started is seen with its size (the allocator reports it) and counted."""
    events = prof.profiler.kineto_results.events()
    win = next(e for e in events if e.name() == window)
    t0, t1 = win.start_ns(), win.start_ns() + win.duration_ns()
    allocs, uses = allocations(prof)
    allocs = [a for a in allocs if a[0] <= t1]
    # pass 1: the level's steps: every allocation, and its free (seen, or placed)
    live: dict[int, tuple[int, int, int]] = {}     # ptr -> (allocation index, bytes, time)
    steps: list[tuple[int, int, int]] = []         # (time, 0 free / 1 allocation, allocation index)
    unseen = set()
    for n, (ts, ptr, nbytes) in enumerate(allocs):
        old = live.pop(ptr, None)
        if nbytes > 0:
            if old is not None:                     # the address came back: freed unseen before
                steps.append((_last_use(uses, ptr, old[2], ts) if uses else ts, 0, old[0]))
                unseen.add(old[0])
            live[ptr] = (n, nbytes, ts)
            steps.append((ts, 1, n))
        else:                                       # a free seen, of this profile's allocation or older
            steps.append((ts, 0, old[0] if old is not None else n))
    if steady:
        for ptr, (n, _, ts) in live.items():
            if ts >= t0:
                steps.append((_last_use(uses, ptr, ts, t1), 0, n))
                unseen.add(n)
    # pass 2: the level over time; at one instant a free goes first
    level = start = peak = 0
    at, at_peak, now = t0, set(), set()
    for ts, kind, n in sorted(steps):
        b = abs(allocs[n][2])
        level, _ = (level + b, now.add(n)) if kind else (level - b, now.discard(n))
        if ts < t0:
            start = peak = level
        elif ts <= t1 and level > peak:
            peak, at, at_peak = level, ts, set(now)
    # the ops running when the peak was reached, outermost first (where in the step it is)
    where = sorted((e.start_ns(), e.name()) for e in events
                   if e.name() != "[memory]" and e.start_ns() <= at <= e.start_ns() + e.duration_ns())
    return {"start_bytes": start, "rise_bytes": peak - start, "level_peak_bytes": peak,
            "unseen_free_bytes": sum(allocs[n][2] for n in at_peak & unseen), "peak_in": [n for _, n in where][-6:]}


def _tensors(objs: list) -> list:
    """The tensors among `objs`, sorted out by type at C level (map / compress: no Python loop
    over the ~300K objects gc tracks)."""
    from itertools import compress

    kinds = {t for t in set(map(type, objs)) if issubclass(t, torch.Tensor)}
    return list(compress(objs, map(kinds.__contains__, map(type, objs))))


def python_live_bytes() -> int:
    """Bytes of every CPU tensor storage Python can reach (parameters, FSDP2's padded shards,
    AdamW state, data), each storage once: the exact live level at a quiet point. The
    profiler's running sum cannot give it: frees on gloo threads before the window are unseen."""
    from torch.distributed.tensor import DTensor

    storages = {}
    for o in _tensors(gc.get_objects()):
        if not isinstance(o, DTensor) and o.device.type == "cpu":
            try:       # a wrapper subclass (QLoRA's NF4Tensor) has no storage: its inner tensors are counted
                st = o.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
    return sum(storages.values())


def packed_rows(plan: P.Plan, docs: int):
    """A load_data stand-in for a packed case (the plan's data.format is text, so the estimate
    counts the document mask): the synthetic stream's rows, each `docs` documents long, with
    position_ids restarting per document as prepared windows carry them (runtime/prepare.py)."""
    from dataclasses import replace as dc_replace

    from meshbake.runtime.data import TokenData

    def load(plan_, dp, folder=None):
        data = TokenData(dc_replace(plan_.data, format="synthetic"), plan_.train, dp)
        rows, n = data.rows, plan_.train.seq_len
        pos = torch.arange(n) % (n // docs)
        data.rows = lambda idx: dc_replace(rows(idx), position_ids=pos.expand(len(idx), n).clone())
        return data, None, {}
    return load


def run_case(plan: P.Plan, run_dir: Path, packed_docs: int = 0, memory: bool = True,
             setup_memory: bool = False) -> dict:
    """One case. A `memory` case (one the memory or pp stage tests read) runs as it always has:
    setup + step 1 under profile_memory, gc, the exact live level, step 2 under profile_memory +
    record_shapes and CollectiveLog (what the heap holds when step 2 starts decides where a
    buffer gloo frees lands, and a run without the setup / step 1 profile read mem_cp2 32,768 B
    low on one rank: 54b829e). Setup's window is walked only for `setup_memory` (QLoRA's
    weight-load test reads it). Any other case is read by the traffic and reduce-dtype tests
    only: setup, then one step under CollectiveLog, unprofiled (a dispatch mode sees the same
    collectives with or without the profiler, an observer; step 1 issues the same collectives
    as step 2: the AdamW state it creates is local)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if packed_docs:
        import meshbake.runtime.train as T
        T.load_data = packed_rows(plan, packed_docs)
    gc.collect()      # the previous case's garbage goes before the window (its frees would count here)
    if not memory:
        job = setup(plan, run_dir)
        with CollectiveLog(mesh_axes(job.mesh)) as log:
            out = train_step(job, 0, False)
        return {"collectives": log.records, "loss": out.loss}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("setup"):
            job = setup(plan, run_dir)
        train_step(job, 0, False)
    res = {}
    if setup_memory:
        # setup (the model built and loaded: QLoRA's block-by-block weight load): the highest level
        # of the tensors allocated since the profiler started; setup keeps what it builds, so nothing
        # it allocated and still holds is "freed unseen" (setup's collectives are few: a gloo-thread
        # free could only make this a little high)
        load = peak_from_events(prof, "setup", steady=False)
        res = {"setup_peak_bytes": load["level_peak_bytes"], "setup_peak_in": load["peak_in"]}
    # cyclic garbage of step 1 (autograd graph nodes holding tensors) goes now, not at a random
    # point of the measured step: the peak is the step's own. The step is profiled on its own,
    # with the ops' inputs (record_shapes: the last use of a buffer gloo frees unseen); setup
    # cannot be, record_shapes' weak references refuse Module.to_empty's swap_tensors
    gc.collect()
    base = python_live_bytes()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof, \
                record_function("measured_step"), CollectiveLog(mesh_axes(job.mesh)) as log:
            out = train_step(job, 1, False)
    finally:
        gc.enable()
    mem = peak_from_events(prof, "measured_step", steady=True)
    # the step's peak = the exact level at its start + the highest rise above it during the step
    return {**mem, **res, "base_bytes": base, "peak_bytes": base + mem["rise_bytes"], "collectives": log.records,
            "loss": out.loss}


def main(cases_path: str, out_path: str) -> int:
    cases = json.loads(Path(cases_path).read_text())
    init_distributed("gloo")
    # the ~250K objects the imports made (modules, functions, classes; no tensor: checked) are
    # moved out of gc's reach: the two full collections per case and python_live_bytes' scan then
    # walk what the cases made only
    gc.collect()
    assert not _tensors(gc.get_objects()), "a tensor before the first case: python_live_bytes would not see it"
    gc.freeze()
    results = {}
    for case in cases:
        with tempfile.TemporaryDirectory() as d:
            try:
                r = run_case(P.from_dict(case["plan"]), Path(d) / "run", case.get("packed_docs", 0),
                             case.get("memory", True), case.get("setup_memory", False))
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
