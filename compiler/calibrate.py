"""`meshbake calibrate [-o clusters/NAME.yaml] [--cluster BASE] [--nproc N]`: measure this machine.

Launches runtime/calibrate.py under `torchrun --standalone --nproc-per-node N` (N = --nproc, or
the base profile's gpus_per_node, or 4; gloo on CPU) and writes a cluster profile: the base
profile's keys (none without --cluster: a one-node CPU profile) plus `measured:` (GEMM GFLOP/s
by shape, copy GB/s, causal sdpa GFLOP/s by shape, cross-entropy GB/s, the per-op CPU cost, the
load at the time (share), all_reduce / all_gather / reduce_scatter [bytes, seconds]; on CPU the
runtime's own TP step's per-op cost, and its plain step's from a second, one-process launch). A recipe that
names that profile gets its step time from the measured facts (compiler/estimate.py
_measured_step), for device cpu too. Errors are values: a failed launch prints its stderr tail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from meshbake.compiler.errors import Err
from meshbake.compiler.load import _profile_path, read_profile
from meshbake.runtime.safeio import printable


def plain_plan() -> bytes | None:
    """plan.json of the plain step runtime/calibrate.py's plain_op_us runs: tp_plan's step at world
    1 (tiny-llama, no TP, no FSDP, seq 8 x micro 1, 2 micro-batches a step, fp32, synthetic, cpu)."""
    return _probe_plan("calibrate_plain", 1, {"dp_shard": 1}, {})


def tp_plan(nproc: int) -> bytes | None:
    """plan.json of the tiny TP step runtime/calibrate.py's tp_op_us runs (tiny-llama, dp_shard
    nproc / 2 x tp 2 + SP + LP, seq 8 x micro 1, 2 micro-batches a step, fp32, synthetic data, cpu):
    None at an odd nproc. Two micro-batches, not one: the per-op cost is an average over the step's
    ops, and since the optimizer and the clip run on local tensors (plain ops, cheaper than the
    blocks' DTensor ops) one micro-batch weighted them twice as much as a step with gradient
    accumulation does (the closed loop's world 4 then read +9% / +17%)."""
    if nproc < 2 or nproc % 2:
        return None
    return _probe_plan("calibrate_tp", nproc, {"dp_shard": nproc // 2, "tp": 2},
                       {"sequence_parallel": True, "loss_parallel": True})


def _probe_plan(name: str, nproc: int, mesh: dict, tp: dict) -> bytes | None:
    from meshbake.compiler.pipeline import compile_recipe
    from meshbake.runtime.calibrate import TP_STEPS, WARM_STEPS

    fp32 = {"param_dtype": "float32", "reduce_dtype": "float32"}
    tp_ranks = mesh.get("tp", 1)
    r = {"name": name, "model": {"config": "tiny-llama", "dtype": "float32"}, "mesh": mesh, "tp": tp,
         "cluster": {"nodes": 1, "gpus_per_node": nproc, "device": "cpu", "gpu_memory_gb": 8},
         # 2 micro-batches a step (global batch = 2 x the data-parallel ranks)
         "train": {"seq_len": 8, "micro_batch_size": 1, "global_batch_size": 2 * nproc // tp_ranks,
                   "steps": WARM_STEPS + 1 + TP_STEPS,
                   "mixed_precision": fp32},
         "data": {"source": "synthetic"}, "checkpoint": {"every_steps": 0, "save_on_exit": False}}
    b = compile_recipe(yaml.safe_dump(r), source=name)
    return b.files["plan.json"] if hasattr(b, "files") else None


def measure(nproc: int, timeout: int = 600) -> dict | str:
    """The measurement program's JSON, or the reason it failed (the launch's stderr tail)."""
    with tempfile.TemporaryDirectory() as d:
        def plan_file(name: str, plan: bytes | None) -> list[str]:
            if plan is None:
                return []
            (Path(d) / name).write_bytes(plan)
            return [str(Path(d) / name)]

        m = _launch(nproc, plan_file("tp_plan.json", tp_plan(nproc)), Path(d) / "measured.json",
                    "the measurement launch", timeout)
        if isinstance(m, str):
            return m
        # the plain step at world 1: a launch of its own (the runtime's world is the launch's), ~8 s
        step = _launch(1, ["--step-only", *plan_file("plain_plan.json", plain_plan())], Path(d) / "plain.json",
                       "the plain step's launch", timeout)
        return step if isinstance(step, str) else {**m, **step}


def _launch(nproc: int, args: list[str], out: Path, what: str, timeout: int) -> dict | str:
    """runtime/calibrate.py under torchrun with nproc ranks writing `out` (its first argument): its
    JSON, or the reason it failed (`what` and the launch's stderr tail)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        "-m", "meshbake.runtime.calibrate", str(out), *args],
                       env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not out.is_file():
        return f"{what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


def profile_text(base: dict, m: dict, base_name: str | None) -> str:
    """The profile YAML: a header saying what measured it, the base keys, then measured:."""
    keys = ("ranks", "cores", "gemm_gflops", "copy_gbps", "all_reduce", "all_gather", "reduce_scatter")
    measured = {k: m[k] for k in keys}
    measured["gemm_gflops"] = [[a, b, c, round(g, 3)] for a, b, c, g in m["gemm_gflops"]]
    measured["copy_gbps"] = round(m["copy_gbps"], 3)
    for op in keys[4:]:
        measured[op] = [[b, float(f"{t:.6g}")] for b, t in m[op]]
    # the facts added for the CPU closed loop (issue #25): absent from an older measurement
    if "attention_gflops" in m:
        measured["attention_gflops"] = [[*r[:3], round(r[3], 3)] for r in m["attention_gflops"]]
        measured["cross_entropy_gbps"] = [[*r[:2], round(r[2], 4)] for r in m["cross_entropy_gbps"]]
        measured["op_us"] = round(m["op_us"], 3)
        measured["share"] = max(0.001, round(m["share"], 3))
    if "rank_shares" in m:      # the per-rank CPU model (issue #25: the closed loop in make test)
        measured["rank_shares"] = [[n, max(0.001, round(s, 3))] for n, s in m["rank_shares"]]
        measured["tp_op_us"] = round(m.get("tp_op_us", 0.0), 3)
        measured["plain_op_us"] = round(m.get("plain_op_us", 0.0), 3)
        if "sync" in m:
            measured["sync"] = max(0.001, round(m["sync"], 3))
        measured["coll_cpu_us"] = round(m["coll_cpu_us"], 3)
    prof = {**base, "measured": measured}
    prof.setdefault("device", m["device"])
    prof.setdefault("nodes", 1)
    prof.setdefault("gpus_per_node", m["ranks"])
    head = (f"# measured by `meshbake calibrate` ({m['ranks']} ranks, {m['cores']} cores, {m['device']}, "
            f"{m['dtype']}){' on top of ' + base_name if base_name else ''}.\n"
            "# measured.* replace the datasheet keys in the step-time model (docs/PERFORMANCE.md, calibrate)\n"
            + (f"# collectives: seconds as on an idle machine (measured x the share {m['collective_share']:.3g} "
               "a busy thread got around them)\n" if "collective_share" in m else ""))
    return head + yaml.safe_dump(prof, sort_keys=False, default_flow_style=None, width=100)


# runtime/recipe.schema.json cluster.gpus_per_node's maximum: a process count beyond it is no profile's
MAX_NPROC = 1024


def _base_profile(name: str) -> dict | str:
    """The --cluster profile as a mapping, through the recipe's own YAML loader (load.parse_yaml: no
    tags, no alias bombs, no duplicate keys), or why not in one line. A profile is a file someone
    hands over: yaml.safe_load took a list (AttributeError), a !!python tag (a traceback) and any
    gpus_per_node, which became torchrun's --nproc-per-node."""
    path = _profile_path(name)
    if not path.is_file():
        return f"no cluster profile {printable(name)!r} ({printable(path)})"
    prof = read_profile(path, "--cluster")
    if isinstance(prof, Err):
        e = prof.errors[0]
        return f"--cluster {printable(path)}: {printable(e.path)}: {printable(e.message)}; {printable(e.hint)}"
    n = prof.get("gpus_per_node", 4)
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_NPROC):
        return (f"--cluster {printable(path)}: gpus_per_node {printable(repr(n))[:40]} is not a process count from 1 to "
                f"{MAX_NPROC} (cluster.gpus_per_node); fix the profile, or pass --nproc N")
    return {k: v for k, v in prof.items() if k != "measured"}


def calibrate_main(args) -> int:
    base: dict = {}
    if args.cluster:
        got = _base_profile(args.cluster)
        if isinstance(got, str):
            print(f"meshbake calibrate: {got}", file=sys.stderr)
            return 2
        base = got
    if args.nproc is not None and not 1 <= args.nproc <= MAX_NPROC:
        print(f"meshbake calibrate: --nproc {args.nproc} is not a process count from 1 to {MAX_NPROC}", file=sys.stderr)
        return 2
    nproc = args.nproc or base.get("gpus_per_node", 4)
    m = measure(nproc)
    if isinstance(m, str):
        print(f"meshbake calibrate: {m}", file=sys.stderr)
        return 1
    text = profile_text(base, m, args.cluster)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
