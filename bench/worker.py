"""Under torchrun: our runtime and the hand-written loop, alternated ABAB in one process group
so machine noise hits both; prints one JSON line of per-round median step times (rank 0)."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
from meshbake.runtime import plan as P
from meshbake.runtime import train as T
from meshbake.runtime.parallel import hf_config

from bench.baseline import train as baseline_train

WARMUP = 5


def main(plan_path: str, rounds: int) -> None:
    plan = P.load_plan(plan_path)
    T.init_distributed("gloo")
    t = plan.train
    lo = plan.lora
    lora = {"rank": lo.rank, "alpha": lo.alpha, "targets": list(lo.targets)} if lo.rank else None
    if lo.rank and lo.dropout:
        raise SystemExit("bench: the hand-written LoRA has no dropout; bench with lora.dropout 0")
    ours, base, ours_cpu, base_cpu = [], [], [], []
    def ours_round():
        cpu: list[float] = []
        step = T.train_step

        def timed(*a, **kw):        # the CPU seconds of each of run()'s steps, beside its wall step_times
            c0 = time.process_time()
            out = step(*a, **kw)
            cpu.append(time.process_time() - c0)
            return out
        T.train_step = timed
        try:
            with tempfile.TemporaryDirectory() as d:
                res = T.run(plan, Path(d) / "run")
        finally:
            T.train_step = step
        ours.append(statistics.median(list(res.step_times.values())[WARMUP:]))
        ours_cpu.append(statistics.median(cpu[WARMUP:]))

    def base_round():
        cpu: list[float] = []
        times = baseline_train(hf_config(plan.model.config), T.world_mesh(plan), tp=plan.mesh.tp, steps=t.steps,
                               mbs=t.micro_batch_size, accum=t.grad_accum, seq=t.seq_len, lr=t.lr, lora=lora,
                               cpu_times=cpu)
        base.append(statistics.median(times[WARMUP:]))
        base_cpu.append(statistics.median(cpu[WARMUP:]))

    for i in range(rounds):          # ABBA...: neither side always runs first
        for f in ((ours_round, base_round) if i % 2 == 0 else (base_round, ours_round)):
            f()
    if dist.get_rank() == 0:
        print("BENCH " + json.dumps({"ours_step_s": ours, "baseline_step_s": base, "ours_step_cpu_s": ours_cpu,
                                     "baseline_step_cpu_s": base_cpu}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
