"""make bench: runtime throughput vs a plain hand-written FSDP2 (+TP) loop, side by side.

Same tiny Llama (tiny_cpu's model), batch (seq 128, micro 4, global 16) and mesh: world 1
(dp_shard 1) and world 4 (dp_shard 2 x tp 2 + SP + LP). Each torchrun alternates ours and the
baseline for ROUNDS rounds; the ratio is baseline step time / our step time (>= 1 means we
are faster), from the medians over rounds; cpu_ratio the same from CPU seconds per step (the
measure that holds up when other jobs load the machine). Writes bench/results/runtime.json.

LoRA rows (issue 24): the same model, batch and meshes with lora rank 8 (alpha 16, dropout 0,
the default targets q/k/v/o_proj), against the hand-written loop's own minimal LoRA
(bench/baseline.py add_lora). `python -m bench.run lora_world4 ...` re-runs only the named rows
and keeps the others already in runtime.json (each row records when it ran).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, STEPS = 4, 25
GOAL = 0.97
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}       # targets: the default q/k/v/o_proj
ROWS = {"world1": (1, 1, None), "world4": (4, 2, None), "lora_world1": (1, 1, LORA), "lora_world4": (4, 2, LORA)}


def plan_for(world: int, tp: int, lora: dict | None = None) -> str:
    from meshbake.compiler.pipeline import compile_recipe

    recipe = {"name": f"bench_w{world}", "model": {"config": "tiny-llama", "dtype": "float32"},
              "mesh": {"dp_shard": -1, "tp": tp}, "tp": {"sequence_parallel": tp > 1, "loss_parallel": tp > 1},
              "cluster": {"nodes": 1, "gpus_per_node": world, "device": "cpu", "gpu_memory_gb": 4},
              "train": {"seq_len": 128, "micro_batch_size": 4, "global_batch_size": 16 if world > 1 else 8,
                        "steps": STEPS, "lr": 1e-3, "warmup_steps": 2,
                        # the hand-written loop's FSDP schedule: one reduce-scatter per step, after the
                        # last micro-step (set_requires_gradient_sync); the default every_micro_step
                        # would reduce-scatter after each of the grad_accum 2 (world 4)
                        "grad_sync": "last_micro_step",
                        "mixed_precision": {"param_dtype": "float32", "reduce_dtype": "float32"}},
              "data": {"format": "text", "path": str(ROOT / "data/shakespeare.txt"),
                       "tokenizer": str(ROOT / "data/tokenizer"), "prepared_dir": "prepared"},
              "checkpoint": {"every_steps": 0, "save_on_exit": False}}
    if lora:     # throughput only: random base weights on purpose (no Hub here)
        recipe["lora"] = lora
        recipe["model"]["weights"] = "random"
    b = compile_recipe(yaml.safe_dump(recipe), source="bench")
    if not hasattr(b, "files"):
        raise SystemExit(f"bench recipe does not compile: {b}")
    from meshbake.runtime import plan as P
    from meshbake.runtime.prepare import prepare

    # prepared_dir is relative to the launch directory (validate refuses an absolute one): ROOT,
    # the cwd of the torchrun below too
    with contextlib.chdir(ROOT):
        prepare(P.from_dict(json.loads(b.files["plan.json"])), quiet=True, log=lambda s: None)   # tokenize once
    return b.files["plan.json"].decode()


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform()}


def bench(world: int, tp: int, lora: dict | None = None) -> dict:
    load = [os.getloadavg()[0]]         # other work on the machine: the ratio holds up, tokens/s do not
    with tempfile.TemporaryDirectory() as d:
        plan = Path(d) / "plan.json"
        plan.write_text(plan_for(world, tp, lora))
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")   # same threads at every world
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={world}", "-m", "bench.worker", str(plan), str(ROUNDS)],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-4000:])
    load.append(os.getloadavg()[0])
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("BENCH "))[6:])
    ours, base = statistics.median(r["ours_step_s"]), statistics.median(r["baseline_step_s"])
    # CPU seconds per step (rank 0's process, all threads): on this shared 2-core box other jobs
    # stretch wall time by 5-20x and unevenly between rounds, CPU time far less
    cpu = statistics.median(r["baseline_step_cpu_s"]) / statistics.median(r["ours_step_cpu_s"])
    tok = (16 if world > 1 else 8) * 128
    return {"mesh": {"world": world, "dp_shard": world // tp, "tp": tp, "sequence_parallel": tp > 1},
            "lora": lora, "ran_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_avg_1m_before_after": [round(x, 1) for x in load], "tokens_per_step": tok,
            "ours_tokens_per_s": tok / ours, "baseline_tokens_per_s": tok / base,
            "ratio": base / ours, "cpu_ratio": cpu, "rounds": r}


def main(only: list[str]) -> int:
    path = ROOT / "bench/results/runtime.json"
    unknown = set(only) - set(ROWS)
    if unknown:
        raise SystemExit(f"bench.run: no row {sorted(unknown)}; rows: {list(ROWS)}")
    kept = json.loads(path.read_text())["results"] if only and path.is_file() else {}
    results = {**kept, **{k: bench(*ROWS[k]) for k in (only or ROWS)}}
    results = {k: results[k] for k in ROWS if k in results}
    out = {"benchmark": "runtime vs hand-written FSDP2(+TP) loop, tiny-llama fp32, gloo/CPU (lora_*: LoRA r 8 "
                        "on q/k/v/o_proj vs a hand-written LoRA)",
           "goal_ratio": GOAL, "steps_per_round": STEPS, "warmup_steps_dropped": 5, "machine": machine(),
           "results": results}
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    for k, v in results.items():
        print(f"{k}: ours {v['ours_tokens_per_s']:,.0f} tok/s, hand-written {v['baseline_tokens_per_s']:,.0f} tok/s, "
              f"ratio {v['ratio']:.3f} (goal >= {GOAL}), CPU-time ratio {v.get('cpu_ratio', float('nan')):.3f}, "
              f"load {v['load_avg_1m_before_after']}")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
