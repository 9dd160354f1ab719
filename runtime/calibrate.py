"""`meshbake calibrate`'s measurement program: measured facts of the machine it runs on.

Launched by the CLI under `torchrun --standalone --nproc-per-node N` (gloo on CPU, nccl on
CUDA); rank 0 writes one JSON object to the path given as argv[1]:

    gemm_gflops      [[m, n, k, GFLOP/s], ...]: a Linear's forward + backward matmuls, x (m, k) and
                     W (n, k) in the profile's dtype (see gemm), timed on
                     rank 0 alone while the other ranks wait in a barrier (one process's
                     throughput; the compiler scales it down when ranks outnumber cores)
    copy_gbps        a large tensor copy, (read + write) bytes / s, rank 0 alone
    all_reduce, all_gather, reduce_scatter
                     [[bytes, seconds], ...]: one collective of a `bytes` per-rank buffer over
                     all N ranks with the real backend, the median of its repeats
    ranks, cores     N, and the CPU cores this process may run on (sched_getaffinity)

Every number is a median over repeats: the machine may be shared. Stdlib + torch only; the
runtime never imports the compiler.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

SHAPES = ((512, 64, 64), (512, 256, 64), (512, 64, 256), (512, 4096, 64), (1024, 1024, 1024))
SIZES = (4 * 1024, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024)    # bytes per rank per collective
COPY_BYTES = 64 * 1024 * 1024                                   # past the caches
BUDGET_S = 0.15                                                 # wall time per measured point (at most)


def _median_time(fn, budget_s: float = BUDGET_S, min_reps: int = 3, max_reps: int = 200) -> float:
    fn()                                          # warm-up: allocation, first-call dispatch
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def collectives(dist, world: int, device) -> dict[str, list[list[float]]]:
    import torch

    out: dict[str, list[list[float]]] = {"all_reduce": [], "all_gather": [], "reduce_scatter": []}
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
                t0 = time.perf_counter()
                op()
                t = torch.tensor([time.perf_counter() - t0], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)      # the slowest rank is the collective's time
                times.append(float(t))
            out[name].append([n * 4, statistics.median(times)])
    return out


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and os.environ.get("MESHBAKE_CALIBRATE_DEVICE", "") != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    res: dict = {"ranks": world, "cores": len(os.sched_getaffinity(0)), "device": device.type,
                 "dtype": str(dtype).removeprefix("torch.")}
    if rank == 0:
        res["gemm_gflops"] = gemm(dtype, device)
        res["copy_gbps"] = copy_gbps(device)
    dist.barrier()
    res.update(collectives(dist, world, device))
    if rank == 0:
        with open(argv[1], "w", encoding="utf-8") as f:
            json.dump(res, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
