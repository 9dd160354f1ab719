"""make bench: runtime throughput vs a plain hand-written FSDP2 (+TP) loop, side by side.

Same tiny Llama (tiny_cpu's model), batch (seq 128, micro 4, global 16) and mesh: world 1
(dp_shard 1) and world 4 (dp_shard 2 x tp 2 + SP + LP). Each torchrun alternates ours and the
baseline for ROUNDS rounds; the ratio is baseline step time / our step time (>= 1 means we
are faster), from the medians over rounds. Writes bench/results/runtime.json.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, STEPS = 4, 25
GOAL = 0.97


def plan_for(world: int, tp: int) -> str:
    from meshbake.compiler.pipeline import compile_recipe

    recipe = {"name": f"bench_w{world}", "model": {"config": "tiny-llama", "dtype": "float32"},
              "mesh": {"dp_shard": -1, "tp": tp}, "tp": {"sequence_parallel": tp > 1, "loss_parallel": tp > 1},
              "cluster": {"nodes": 1, "gpus_per_node": world, "device": "cpu", "gpu_memory_gb": 4},
              "train": {"seq_len": 128, "micro_batch_size": 4, "global_batch_size": 16 if world > 1 else 8,
                        "steps": STEPS, "lr": 1e-3, "warmup_steps": 2,
                        "mixed_precision": {"param_dtype": "float32", "reduce_dtype": "float32"}},
              "data": {"format": "text", "path": str(ROOT / "data/shakespeare.txt"),
                       "tokenizer": str(ROOT / "data/tokenizer"), "prepared_dir": str(ROOT / "prepared")},
              "checkpoint": {"every_steps": 0, "save_on_exit": False}}
    b = compile_recipe(yaml.safe_dump(recipe), source="bench")
    if not hasattr(b, "files"):
        raise SystemExit(f"bench recipe does not compile: {b}")
    from meshbake.runtime import plan as P
    from meshbake.runtime.prepare import prepare

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


def bench(world: int, tp: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        plan = Path(d) / "plan.json"
        plan.write_text(plan_for(world, tp))
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")   # same threads at every world
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={world}", "-m", "bench.worker", str(plan), str(ROUNDS)],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-4000:])
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("BENCH "))[6:])
    ours, base = statistics.median(r["ours_step_s"]), statistics.median(r["baseline_step_s"])
    tok = (16 if world > 1 else 8) * 128
    return {"mesh": {"world": world, "dp_shard": world // tp, "tp": tp, "sequence_parallel": tp > 1},
            "tokens_per_step": tok, "ours_tokens_per_s": tok / ours, "baseline_tokens_per_s": tok / base,
            "ratio": base / ours, "rounds": r}


def main() -> int:
    results = {f"world{w}": bench(w, tp) for w, tp in ((1, 1), (4, 2))}
    out = {"benchmark": "runtime vs hand-written FSDP2(+TP) loop, tiny-llama fp32, gloo/CPU",
           "goal_ratio": GOAL, "steps_per_round": STEPS, "warmup_steps_dropped": 5, "machine": machine(),
           "results": results}
    path = ROOT / "bench/results/runtime.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    for k, v in results.items():
        print(f"{k}: ours {v['ours_tokens_per_s']:,.0f} tok/s, hand-written {v['baseline_tokens_per_s']:,.0f} tok/s, "
              f"ratio {v['ratio']:.3f} (goal >= {GOAL})")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
