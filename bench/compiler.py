"""make bench (compiler part): cold wall time of `meshbake check` and `meshbake suggest` on
recipes/70b_hsdp_tp (Llama-3.1-70B, 64 GPUs), each a fresh interpreter (imports, config read,
the meta-device model build), best of 3 alternating runs. suggest's goal: under 5 s cold.
Writes bench/results/compiler.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/70b_hsdp_tp.yaml"
RUNS = 3


def _cold(args: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    times: dict[str, list[float]] = {"check": [], "suggest": []}
    for _ in range(RUNS):                       # alternate, so a busy moment hits both
        times["check"].append(_cold(["check", RECIPE]))
        times["suggest"].append(_cold(["suggest", RECIPE, "--json"]))
    out = {"recipe": RECIPE, "runs": RUNS,
           "results": {k: {"best_s": round(min(v), 2), "all_s": [round(x, 2) for x in v]} for k, v in times.items()}}
    path = ROOT / "bench/results/compiler.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
