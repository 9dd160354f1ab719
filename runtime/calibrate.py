"""`meshbake calibrate`'s measurement program: measured facts of the machine it runs on.

Launched by the CLI under `torchrun --standalone --nproc-per-node N` (gloo on CPU, nccl on
CUDA); rank 0 writes one JSON object to the path given as argv[1]:

    gemm_gflops      [[m, n, k, GFLOP/s], ...]: a Linear's forward + backward matmuls, x (m, k) and
                     W (n, k) in the profile's dtype (see gemm), timed on
                     rank 0 alone while the other ranks wait in a barrier (one process's
                     throughput; the compiler scales it down when ranks outnumber cores)
    copy_gbps        a large tensor copy, (read + write) bytes / s, rank 0 alone
    attention_gflops [[batch x heads, seq, head_dim, GFLOP/s], ...]: causal sdpa forward + backward
    cross_entropy_gbps [[rows, vocab, GB/s], ...]: cross-entropy forward + backward over fp32 logits
    op_us            the CPU cost of one small eager aten op with autograd (the dispatch between
                     the matmuls: ~219 ops per Llama block's forward + backward)
    share            the fraction of one core a busy thread gets right now (CPU time / wall time;
                     1 on an idle machine): the other jobs' load
    rank_shares      [[n, share], ...]: the fraction of a core each of n busy processes gets when
                     they run at once, each in its own session as torchrun starts its workers
                     (n = 1 and the rank count): what n ranks of one node get between them and
                     the other jobs (2 cores, idle: [4, 0.5]; under load much less)
    tp_op_us         CPU microseconds per op of the runtime's own TP + FSDP step at a size with no
                     arithmetic (argv[2]: its plan.json, tiny-llama dp_shard N/2 x tp 2 + SP + LP),
                     every rank's CPU, the median over steps
    plain_op_us      the same on the runtime's own plain step at world 1 (no TP, no FSDP), from a
                     second launch of one process (`--step-only`, argv[2] its plan.json): the per-op
                     cost of a plan without TP. ~2x op_us here (8.6-9.0 vs 4.3 us): the runtime's
                     loop (data, stats, .item()s), clip and AdamW on top of the modules' ops
    sync             the fraction of its share of the cores a rank of that TP step kept busy (its
                     CPU over the step's wall, over rank_shares' share for N): below 1 where the
                     ranks outnumber the cores and wait for each other at every collective, a core
                     idling while its ranks wait (2 idle cores, 4 ranks: 0.84-0.86), which a
                     busy-loop probe never shows
    coll_cpu_us      the CPU one small collective costs the calling process, all its threads
                     (gloo's send/recv threads included), microseconds
    all_reduce, all_gather, reduce_scatter
                     [[bytes, seconds], ...]: one collective of a `bytes` per-rank buffer over
                     all N ranks with the real backend, the median of its repeats, x the
                     share measured around them (seconds as on an idle machine)
    ranks, cores     N, and the CPU cores this process may run on (sched_getaffinity)

Every number is a median over repeats: the machine may be shared. The one-process facts are
timed in the thread's CPU time, not wall time (the same on an idle machine): on a shared one a
time slice lost to another job would land in whichever sample it hit, and the load is measured
once, by itself, as `share`. Stdlib + torch only; the runtime never imports the compiler.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

ATTN_SHAPES = ((16, 128, 16), (16, 512, 64))        # (batch x heads, seq, head_dim)
CE_SHAPES = ((512, 1024), (512, 4096), (256, 32768))            # (rows, vocab) of the logits
SHARE_S = 0.3                                       # wall time of the load probe
SHAPES = ((512, 64, 64), (512, 256, 64), (512, 64, 256), (512, 4096, 64), (1024, 1024, 1024))
SIZES = (4 * 1024, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024)    # bytes per rank per collective
COPY_BYTES = 64 * 1024 * 1024                                   # past the caches
BUDGET_S = 0.15                                                 # wall time per measured point (at most)


def _median_time(fn, budget_s: float = BUDGET_S, min_reps: int = 3, max_reps: int = 200) -> float:
    """The median CPU seconds of fn on this thread (torch runs CPU ops on the calling thread with
    one OMP thread, the autograd engine too); on CUDA, wall time after a synchronize."""
    fn()                                          # warm-up: allocation, first-call dispatch
    import torch
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    clock = time.perf_counter if cuda else time.thread_time
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times)


def cpu_share(seconds: float = SHARE_S) -> float:
    """CPU time / wall time of one busy thread over `seconds`: 1 alone on a core, 2 / 10 when ten
    runnable groups share two cores (Linux's autogroup shares a core between sessions, not
    threads: the ~45 runnable threads this machine showed gave a share of 0.12, not 2 / 45)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    x = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(2000):
            x += 1
    return min(1.0, (time.thread_time() - c0) / (time.perf_counter() - t0))


SPIN = """
import sys, time
start, seconds = float(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.005)
c0, t0, x = time.thread_time(), time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:
    for _ in range(2000):
        x += 1
print(min(1.0, (time.thread_time() - c0) / (time.perf_counter() - t0)))
"""


def rank_shares(counts: tuple[int, ...], seconds: float = SHARE_S) -> list[list[float]]:
    """[[n, share], ...]: n busy processes started at once, each in its own session (torchrun's
    SubprocessHandler starts every worker with start_new_session=True, and Linux's autogroup
    shares the cores between sessions, not threads), the mean fraction of a core each got.
    A rank's share is not the one-thread `share` / ranks: 4 sessions of ours among 10 others'
    on 2 cores get 2 / 14 each where a lone probe got 2 / 11; idle, 4 get 2 / 4 where one got 1.
    `python -S` (no site) starts in ~10 ms; the processes wait for a common start time."""
    import subprocess

    out = []
    for n in counts:
        start = time.time() + 0.25
        ps = [subprocess.Popen([sys.executable, "-S", "-c", SPIN, repr(start), repr(seconds)], stdout=subprocess.PIPE,
                               text=True, start_new_session=True) for _ in range(n)]
        vals = [float(p.communicate(timeout=60)[0]) for p in ps]
        out.append([n, statistics.mean(vals)])
    return out


# timed steps of the TP probe, after WARM_STEPS + 1 (the training runs' steps 2-6 still warm up)
TP_STEPS, WARM_STEPS = 12, 5


def ops_in(fn) -> int:
    """The aten ops a TorchDispatchMode sees while fn() runs (the op counts the per-op costs divide
    by, and tests/test_calibrate.py's recount of the estimate's CPU_OPS / OPS_* constants)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return c.n


def tp_step(plan_path: str) -> tuple[float, float]:
    """(CPU microseconds per op, busy fraction) of the runtime's own step of plan_path, all ranks:
    `meshbake calibrate` compiles tiny-llama at dp_shard N/2 x tp 2 + SP + LP (tp_op_us), and at
    world 1 without TP or FSDP (plain_op_us, step_only), seq 8 x micro 1, 2 micro-batches a step (no
    arithmetic to speak of), WARM_STEPS + 1 + TP_STEPS steps; runtime/train.py setup and train_step
    run it.

    The per-op cost: each rank's process CPU a step (all its threads: gloo's included), the mean
    over ranks, the median over steps, over the ops a TorchDispatchMode counts in one step. That is
    what an op costs there: DTensor's sharding propagation, the TP styles' and FSDP2's hooks in
    Python, the collectives' calls. A bare DTensor op costs ~2x a plain one (15 vs 8 us here); the
    runtime's TP step pays ~10x a plain op per op counted, which the bare op does not show. One
    rank's median over 6 steps moved 56% between calibrations here; the mean of N ranks over 12
    steps is 4 x 2 times the samples.

    The busy fraction: the same step's mean rank CPU over its wall (the slowest rank's), the median
    over steps: a rank's share of the cores less the time it waited for the others with its core
    idle (the caller divides it by the measured share of N busy processes)."""
    import tempfile
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from . import train
    from .plan import load_plan

    plan = load_plan(plan_path)
    with tempfile.TemporaryDirectory() as d:
        job = train.setup(plan, Path(d))
        for s in range(WARM_STEPS):         # warm-up: sharding propagation caches, allocations
            train.train_step(job, s, False)
        ops = ops_in(lambda: train.train_step(job, WARM_STEPS, False))
        cpu, wall = [], []
        for s in range(WARM_STEPS + 1, WARM_STEPS + 1 + TP_STEPS):
            c0, w0 = time.process_time(), time.perf_counter()
            float(train.train_step(job, s, False).stats[0])
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        job.log.close()
    # every rank's per-step CPU and wall, gathered once after the timed steps (no extra sync in them)
    mine = torch.tensor([cpu, wall], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    per_step_cpu = torch.stack([e[0] for e in every]).mean(0)
    per_step_wall = torch.stack([e[1] for e in every]).max(0).values
    op_us = float(per_step_cpu.median()) / ops * 1e6
    busy = float((per_step_cpu / per_step_wall).median())
    return op_us, busy


def gemm(dtype, device) -> list[list[float]]:
    """A Linear's three matmuls as the runtime's autograd runs them, W (n, k) as nn.Linear stores it:
    forward y = x W^T (F.linear), input gradient dy W, weight gradient dy^T x; GFLOP/s = 6 m n k
    over their time together (the layouts matter on CPU: x @ W^T with a (4096, 64) W runs at
    several times the speed of x @ B with a (64, 4096) B)."""
    import torch
    import torch.nn.functional as F

    out = []
    for m, n, k in SHAPES:
        x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
        dy = torch.randn(m, n, dtype=dtype, device=device)

        def step(x=x, w=w, dy=dy) -> None:
            F.linear(x, w)
            torch.mm(dy, w)
            torch.mm(dy.t(), x)
        s = _median_time(step)
        out.append([m, n, k, 6 * m * n * k / s / 1e9])
    return out


def copy_gbps(device) -> float:
    import torch

    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    s = _median_time(lambda: dst.copy_(src), min_reps=5)
    return 2 * COPY_BYTES / s / 1e9              # read + write


def attention(dtype, device) -> list[list[float]]:
    """Causal scaled_dot_product_attention forward + backward (the kernel the runtime's HF models
    call with attn_implementation sdpa) at ATTN_SHAPES, GFLOP/s in the estimate's count: 12 x heads
    x head_dim x seq per token (QK^T and AV, 2 T H Dh each, x3 with the backward; causal not
    halved). On this CPU the flash kernel ran the tiny model's (16, 128, 16) at a few GFLOP/s where
    its matmuls ran at 50-90: the median GEMM rate put the attention at a twentieth of its time."""
    import torch
    import torch.nn.functional as F

    out = []
    for bh, t, d in ATTN_SHAPES:
        q, k, v = (torch.randn(1, bh, t, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        g = torch.randn(1, bh, t, d, dtype=dtype, device=device)

        def step(q=q, k=k, v=v, g=g) -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
        out.append([bh, t, d, 12 * bh * d * t * t / _median_time(step) / 1e9])
    return out


def cross_entropy(device) -> list[list[float]]:
    """F.cross_entropy forward + backward over (rows, vocab) fp32 logits (the runtime upcasts the
    logits to fp32), GB/s of logits: log-softmax's exp and log make it slower than a copy (the
    tiny model's 512 x 1024 ran at ~1/3 of the copy bandwidth here)."""
    import torch
    import torch.nn.functional as F

    out = []
    for rows, vocab in CE_SHAPES:
        x = torch.randn(rows, vocab, device=device, requires_grad=True)
        y = torch.randint(0, vocab, (rows,), device=device)

        def step(x=x, y=y) -> None:
            F.cross_entropy(x, y, reduction="sum").backward()
        out.append([rows, vocab, rows * vocab * 4 / _median_time(step) / 1e9])
    return out


def op_us(device) -> float:
    """CPU microseconds per eager aten op with autograd, as the runtime's own module code pays it:
    a 2-layer HF Llama (hidden 64, 8 tokens, vocab 64: no arithmetic to speak of), forward +
    cross-entropy + backward, over the aten ops a TorchDispatchMode counts in it (501 here). What a
    decoder block pays between its matmuls: dispatch, autograd nodes, the Python of the module
    calls (rotary, the mask helpers, the attention interface). ~7.5 us an op on this machine, where
    small hand-written RMSNorm + Linear modules cost ~4 us an op and a bare torch.add 1.2."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    x = torch.randint(0, 64, (1, 8), device=device)

    def step() -> None:
        logits = model(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="sum").backward()
    step()
    ops = ops_in(step)
    return _median_time(step) / ops * 1e6


def one_process(dtype, device, ranks: int = 1) -> dict:
    """The facts one process measures alone (see the module docstring), with one intra-op thread as
    each rank runs (OMP_NUM_THREADS=1: the thread's CPU time is then the op's); the load probes first
    (the share of one thread, and of 1 and `ranks` processes in their own sessions)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        share = cpu_share()
        return {"share": share, "rank_shares": rank_shares(tuple(sorted({1, ranks}))),
                "gemm_gflops": gemm(dtype, device), "copy_gbps": copy_gbps(device),
                "attention_gflops": attention(dtype, device), "cross_entropy_gbps": cross_entropy(device),
                "op_us": op_us(device)}
    finally:
        torch.set_num_threads(threads)


def collectives(dist, world: int, device) -> dict[str, list[list[float]]]:
    import torch

    out: dict = {"all_reduce": [], "all_gather": [], "reduce_scatter": []}
    cpu: list[float] = []
    for nbytes in SIZES:
        n = nbytes // 4
        n -= n % world
        x = torch.ones(n, device=device)
        shard = torch.ones(n // world, device=device)
        full = torch.empty(n, device=device)
        ops = {"all_reduce": lambda x=x: dist.all_reduce(x),
               "all_gather": lambda full=full, shard=shard: dist.all_gather_into_tensor(full, shard),
               "reduce_scatter": lambda shard=shard, x=x: dist.reduce_scatter_tensor(shard, x)}
        for name, op in ops.items():
            times = []
            op()
            for _ in range(11 if nbytes < 1024 * 1024 else 5):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                op()
                if nbytes <= 64 * 1024:       # the per-call CPU (small messages: no bandwidth term)
                    cpu.append(time.process_time() - c0)
                t = torch.tensor([time.perf_counter() - t0], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)      # the slowest rank is the collective's time
                times.append(float(t))
            out[name].append([n * 4, statistics.median(times)])
    out["coll_cpu_us"] = statistics.median(cpu) * 1e6
    return out


def _cuda() -> bool:
    """Measure the GPU: CUDA is there and MESHBAKE_CALIBRATE_DEVICE does not ask for the CPU."""
    import torch

    return torch.cuda.is_available() and os.environ.get("MESHBAKE_CALIBRATE_DEVICE", "") != "cpu"


def step_only(argv: list[str]) -> int:
    """`--step-only OUT PLAN` under torchrun: the runtime's own step of PLAN (its world is the
    launch's) at one intra-op thread, {"plain_op_us": CPU microseconds per op} to OUT; {} on CUDA
    (the per-op CPU model is a CPU one)."""
    import torch
    import torch.distributed as dist

    res: dict = {}
    dist.init_process_group("gloo")
    if not _cuda():
        torch.set_num_threads(1)
        res["plain_op_us"] = tp_step(argv[2])[0]
    if dist.get_rank() == 0:
        with open(argv[1], "w", encoding="utf-8") as f:
            json.dump(res, f)
    dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    if "--step-only" in argv:
        return step_only([a for a in argv if a != "--step-only"])
    import torch
    import torch.distributed as dist

    cuda = _cuda()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    res: dict = {"ranks": world, "cores": len(os.sched_getaffinity(0)), "device": device.type,
                 "dtype": str(dtype).removeprefix("torch.")}
    if rank == 0:
        res.update(one_process(dtype, device, world))
    dist.barrier()
    if not cuda and len(argv) > 2:        # every rank trains the tiny TP step
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        us, busy = tp_step(argv[2])
        torch.set_num_threads(threads)
        if rank == 0:
            # the share of N busy processes again right after (the load moves): the sync fraction
            # is the busy fraction over their mean, at most 1 (a rank cannot use more than its share)
            after = rank_shares((world,))[0][1]
            around = statistics.mean([dict(res["rank_shares"])[world], after])
            res.update(tp_op_us=us, sync=min(1.0, busy / around))
    share = [cpu_share(0.1)] if rank == 0 else []
    coll = collectives(dist, world, device)
    if rank == 0:
        # the collectives' seconds as on an idle machine: under load a rank waits for its core at
        # every wake-up, and the time stretches like the rest (x 1 / share); the estimate
        # divides by the share of the run it predicts (cluster.measured.share)
        share.append(cpu_share(0.1))
        s = statistics.mean(share)
        res["coll_cpu_us"] = coll.pop("coll_cpu_us")
        res.update({op: [[b, t * s] for b, t in rows] for op, rows in coll.items()})
        res["collective_share"] = s
    if rank == 0:
        with open(argv[1], "w", encoding="utf-8") as f:
            json.dump(res, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
