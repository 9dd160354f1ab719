"""Under torchrun: our runtime and the hand-written loop, alternated ABAB in one process group
so machine noise hits both; prints one JSON line of per-round median step times (rank 0)."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
from meshbake.runtime import plan as P
from meshbake.runtime.parallel import hf_config
from meshbake.runtime.train import init_distributed, run, world_mesh

from bench.baseline import train as baseline_train

WARMUP = 5


def main(plan_path: str, rounds: int) -> None:
    plan = P.load_plan(plan_path)
    init_distributed("gloo")
    t = plan.train
    lo = plan.lora
    lora = {"rank": lo.rank, "alpha": lo.alpha, "targets": list(lo.targets)} if lo.rank else None
    if lo.rank and lo.dropout:
        raise SystemExit("bench: the hand-written LoRA has no dropout; bench with lora.dropout 0")
    ours, base = [], []
    def ours_round():
        with tempfile.TemporaryDirectory() as d:
            res = run(plan, Path(d) / "run")
        ours.append(statistics.median(list(res.step_times.values())[WARMUP:]))

    def base_round():
        times = baseline_train(hf_config(plan.model.config), world_mesh(plan), tp=plan.mesh.tp, steps=t.steps,
                               mbs=t.micro_batch_size, accum=t.grad_accum, seq=t.seq_len, lr=t.lr, lora=lora)
        base.append(statistics.median(times[WARMUP:]))

    for i in range(rounds):          # ABBA...: neither side always runs first
        for f in ((ours_round, base_round) if i % 2 == 0 else (base_round, ours_round)):
            f()
    if dist.get_rank() == 0:
        print("BENCH " + json.dumps({"ours_step_s": ours, "baseline_step_s": base}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
