"""`meshbake calibrate` (issue #25 item 3): the measured step-time model's arithmetic on round
numbers, its per-op counts against the installed transformers, and the closed loop: calibrate
this machine (the CLI writes a profile with every fact), predict tiny-llama's step at world 1 and
world 4 from it, run both, compare: step wall and one rank's CPU a step within +-25% (bench/calibrate.py
records the same loop with the load average for `make bench`)."""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import compiled, launch_env, tiny_recipe, write_bundle_of


def _synthetic(tmp_path: Path, cores: int) -> Path:
    """A measured profile with round numbers: every GEMM shape 10 GFLOP/s, copy 5 GB/s, each
    collective exactly 1 ms + wire bytes / 0.1 GB/s at 4 ranks."""
    def line(op: str) -> list:
        f = (2 if op == "all_reduce" else 1) * 3 / 4
        return [[b, 1e-3 + b * f / 0.1e9] for b in (4096, 65536, 1048576, 8388608)]
    m = {"ranks": 4, "cores": cores, "gemm_gflops": [[512, 64, 64, 10.0], [512, 4096, 64, 10.0]], "copy_gbps": 5.0,
         **{op: line(op) for op in ("all_reduce", "all_gather", "reduce_scatter")}}
    p = tmp_path / "synthetic.yaml"
    p.write_text(yaml.safe_dump({"measured": m}))
    return p


def test_measured_model_terms(tmp_path):
    """The arithmetic of _measured_step on round numbers: the least-squares fit recovers the
    collective's 1 ms + 0.1 GB/s exactly; 4 ranks on 2 cores double the per-rank compute (dp 4
    splits the tokens by 4: compute w4 / w1 = 2 / 4); PLAN.md names the measured numbers."""
    from meshbake.compiler.estimate import _coll_fit

    prof = _synthetic(tmp_path, cores=2)
    m = yaml.safe_load(prof.read_text())["measured"]
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        lat, gbps = _coll_fit(m[op], op, 4)
        assert lat == pytest.approx(1e-3, rel=1e-6) and gbps == pytest.approx(0.1, rel=1e-6)
    train = {"seq_len": 128, "micro_batch_size": 4, "global_batch_size": 16}
    times, plans = {}, {}
    for world in (1, 4):
        b = compiled(tiny_recipe(f"syn{world}", world, cluster={"profile": str(prof)}, train=train))
        times[world] = json.loads(b.files["plan.json"])["estimate"]["time"]
        plans[world] = b.files["PLAN.md"].decode()
    assert times[4]["compute_s"] / times[1]["compute_s"] == pytest.approx(2 / 4, rel=1e-9)
    assert times[1]["fsdp_s"] == 0 and times[4]["fsdp_s"] > 0 and times[4]["tp_s"] == 0
    assert "Profile numbers used: measured by meshbake calibrate (cluster.measured: 4 ranks, 2 cores" in plans[4]
    assert "4 ranks on 2 cores: x 2" in plans[4]
    # the same profile with 4 cores: no oversubscription, compute w4 / w1 = 1 / 4
    b = compiled(tiny_recipe("syn4c", 4, cluster={"profile": str(_synthetic(tmp_path, cores=4))}, train=train))
    assert json.loads(b.files["plan.json"])["estimate"]["time"]["compute_s"] / times[1]["compute_s"] == \
        pytest.approx(1 / 4, rel=1e-9)


def test_op_counts_match_transformers():
    """_measured_step's per-op term counts (76 + 211 x layers) aten ops per micro-batch and 28 + 18 x
    layers per optimizer step: recount them with a TorchDispatchMode on HF Llama (tests/models/llama)
    at 1 and 2 layers, forward + cross-entropy + backward, and clip_grad_norm_ + foreach AdamW +
    zero_grad (after a first step: AdamW's state exists). A transformers upgrade that changes them
    fails here."""
    import torch
    import torch.nn.functional as F
    from meshbake.compiler.estimate import OPS_OPTIMIZER, OPS_OPTIMIZER_PER_BLOCK, OPS_OUTSIDE, OPS_PER_BLOCK
    from meshbake.runtime.calibrate import ops_in
    from transformers import LlamaConfig, LlamaForCausalLM

    counts, x = {}, torch.randint(0, 1024, (2, 16))
    for layers in (1, 2):
        cfg = LlamaConfig.from_pretrained(Path(__file__).parent / "models/llama", num_hidden_layers=layers)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), foreach=True)

        def micro(model=model) -> None:
            logits = model(input_ids=x, use_cache=False).logits
            F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="sum").backward()

        def step(model=model, opt=opt) -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        micro()
        step()
        micro()
        opt_ops = ops_in(step)
        counts[layers] = (ops_in(micro), opt_ops)
    block, per_block_opt = counts[2][0] - counts[1][0], counts[2][1] - counts[1][1]
    assert (block, counts[1][0] - block, per_block_opt, counts[1][1] - per_block_opt) == \
        (OPS_PER_BLOCK, OPS_OUTSIDE, OPS_OPTIMIZER_PER_BLOCK, OPS_OPTIMIZER), counts


# the closed loop: tiny-llama fp32, seq 128 x micro 4, 2 micro-batches a step, STEPS steps, the
# median step after the first WARM (step 1 is 1.3-3.5x slower; world-4 steps 2-6 still warm up: 0.66,
# 0.57, 0.50, 0.46, 0.52 s, then 0.38-0.52 s over steps 7-24 on an idle machine; 12 steps, median after
# 4, gave 0.45-0.59 s in five launches of the same bundle, 20 after 6 0.45-0.49 s)
STEPS, WARM = 20, 6
# +-25%: the goal, for the step's wall time and for one rank's CPU seconds a step. The
# prediction is plan.json's estimate.time from the calibrated profile with the one-process facts and
# load probes measured right before and right after each run (nothing from the run itself)
TOL = 0.25
RUNS = ((1, {"dp_shard": 1}, False), (4, {"dp_shard": 2, "tp": 2}, True))
FACTS = ("gemm_gflops", 5), ("attention_gflops", 2), ("cross_entropy_gbps", 3)
# a world that missed is measured once more (facts, run, facts): the machine's speed moves between
# launches (an idle machine: world 4's rank CPU a step 0.184 s in one loop, 0.260 s in the next with
# the same calibration, probes at 1.0 / 0.5 both times); both attempts are in the failure message
ATTEMPTS = 2


def _steps(b: Path, run: Path) -> list[dict]:
    p = subprocess.run(["bash", str(b / "launch.sh")], env=launch_env(run), capture_output=True, text=True,
                       timeout=900, cwd=b.parent)
    assert p.returncode == 0, p.stderr[-5000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "step_time_s" in r and r.get("step", 0) > WARM]
    assert len(recs) == STEPS - WARM, recs
    return recs


def _mean_facts(a: dict, b: dict) -> dict:
    """The one-process facts measured before and after a run, averaged (rows: their measured value;
    the load probes too): what the machine was like over the run, as far as the two ends say."""
    def avg(x, y):
        if isinstance(x, list):
            return [[*r[:-1], (r[-1] + q[-1]) / 2] for r, q in zip(x, y)]
        return (x + y) / 2
    return {k: avg(a[k], b[k]) for k in a}


def _predicted(r: dict, path: Path, prof: dict, measured: dict) -> tuple[float, dict, str]:
    """plan.json's step time (the sum of its terms, StepTime.step_s) of recipe r compiled with the
    profile prof holding `measured`, its non-zero terms, and PLAN.md."""
    path.write_text(yaml.safe_dump({**prof, "measured": measured}))
    b = compiled(r)
    plan = b.files["PLAN.md"].decode()
    assert "Profile numbers used: measured by meshbake calibrate" in plan
    t = json.loads(b.files["plan.json"])["estimate"]["time"]
    terms = {k: v for k, v in t.items() if k.endswith("_s")}
    return sum(terms.values()), {k: round(v, 4) for k, v in terms.items() if v}, plan


def calibrate(tmp_path: Path) -> dict:
    """`meshbake calibrate --nproc 4 -o P` on this machine: P's profile, every measured fact
    present and positive (the GEMMs, sdpa, cross-entropy, per-op costs, the TP step's busy
    fraction, load shares, collectives)."""
    base = tmp_path / "calibrated.yaml"
    p = subprocess.run(["meshbake", "calibrate", "--nproc", "4", "--cluster", "local-cpu", "-o", str(base)],
                       env=launch_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    prof = yaml.safe_load(base.read_text())
    m = prof["measured"]
    assert m["ranks"] == 4 and m["cores"] >= 1 and m["copy_gbps"] > 0 and 0 < m["share"] <= 1 and m["op_us"] > 0
    assert m["tp_op_us"] > 0 and m["plain_op_us"] > 0 and m["coll_cpu_us"] > 0 and 0 < m["sync"] <= 1, m
    assert [n for n, _ in m["rank_shares"]] == [1, 4], m
    for key, n in FACTS:
        assert len(m[key]) == n and all(r[-1] > 0 for r in m[key]), (key, m[key])
    assert all(len(m[op]) == 4 and all(s > 0 for _, s in m[op]) for op in ("all_reduce", "all_gather", "reduce_scatter"))
    return prof


def measure_world(tmp_path: Path, prof: dict, world: int, mesh: dict, sp: bool, attempt: int = 0) -> dict:
    """One world of the loop: the one-process facts and load probes (one busy thread; 1 and 4 busy
    processes in their own sessions, as torchrun starts ranks) right before and right after the run
    (the load moves within minutes on a shared machine), the run itself, and the predictions from
    the calibrated profile holding their mean: the step's wall (`predicted_s`), and one rank's CPU
    seconds a step (`predicted_cpu_s`: the same model at shares 1 and sync 1, i.e. before dividing
    by the share of a core a rank gets), against the run's median step wall and rank 0's median
    process CPU a step. Nothing of the run enters the predictions; `idle_s` (shares 1 / 0.5, an idle
    2-core machine) is kept for the report."""
    import torch
    from meshbake.runtime.calibrate import one_process

    m = prof["measured"]
    train = {"seq_len": 128, "micro_batch_size": 4, "global_batch_size": 8 * (world // mesh.get("tp", 1)),
             "steps": STEPS, "warmup_steps": 2}
    tag = f"w{world}_{attempt}"
    path = tmp_path / f"{tag}.yaml"
    before = one_process(torch.float32, torch.device("cpu"), 4)
    path.write_text(yaml.safe_dump({**prof, "measured": {**m, **before}}))
    r = tiny_recipe(f"cal_{tag}", world, mesh=mesh, sp=sp, lp=sp, cluster={"profile": str(path)}, train=train)
    recs = _steps(write_bundle_of(r, tmp_path / f"b{tag}"), tmp_path / f"run{tag}")
    after = one_process(torch.float32, torch.device("cpu"), 4)
    facts = {**m, **_mean_facts(before, after)}
    row = {"calibrated": {k: m[k] for k in ("tp_op_us", "plain_op_us", "sync", "op_us")},
           "measured_s": statistics.median(x["step_time_s"] for x in recs),
           "cpu_s": statistics.median(x["cpu_time_s"] for x in recs),
           "shares_before_after": [[round(before["share"], 3), *(round(s, 3) for _, s in before["rank_shares"])],
                                   [round(after["share"], 3), *(round(s, 3) for _, s in after["rank_shares"])]]}
    row["predicted_s"], row["terms"], plan = _predicted(r, path, prof, facts)
    row["predicted_cpu_s"] = _predicted(r, path, prof, {**facts, "share": 1.0, "sync": 1.0,
                                                        "rank_shares": [[1, 1.0], [4, 1.0]]})[0]
    row["idle_s"] = _predicted(r, path, prof, {**facts, "share": 1.0,
                                               "rank_shares": [[1, 1.0], [4, min(1.0, m["cores"] / 4)]]})[0]
    row["error"] = row["predicted_s"] / row["measured_s"] - 1
    row["cpu_error"] = row["predicted_cpu_s"] / row["cpu_s"] - 1
    if world > 1:
        # PLAN.md names the measured busy fraction it divided by (4 ranks on the machine's cores)
        assert m["cores"] >= 4 or "the part of it a rank of the TP step kept busy (measured)" in plan, plan
        assert f"eager ops x {m['tp_op_us']:.3g} us measured per op" in plan, plan
    else:         # world 1: the runtime's plain step's per-op cost, not HF Llama's (op_us)
        assert f"eager ops x {m['plain_op_us']:.3g} us measured per op" in plan, plan
    return row


def closed_loop(tmp_path: Path, attempts: int = ATTEMPTS) -> dict:
    """calibrate once, then per world up to `attempts` measurements (another only after a miss, of
    the wall or of the CPU); {world: [row, ...]}: the last row is the one that counts."""
    prof = calibrate(tmp_path)
    out: dict = {}
    for world, mesh, sp in RUNS:
        rows = out.setdefault(world, [])
        while len(rows) < attempts and (not rows or max(abs(rows[-1]["error"]), abs(rows[-1]["cpu_error"])) > TOL):
            rows.append(measure_world(tmp_path, prof, world, mesh, sp, len(rows)))
    return out


@pytest.mark.dist
def test_calibrated_prediction_holds_at_world_1_and_4(tmp_path):
    """The closed loop (issue #25 item 3): `meshbake calibrate --nproc 4` on this machine, then
    tiny-llama fp32 at world 1 and at world 4 = dp_shard 2 x tp 2 + SP + LP, each predicted from
    the calibrated profile (with the load probes of its own minutes) and run through its bundle's
    launch.sh: the predicted step holds within +-25% of the measured step's wall, and one rank's
    predicted CPU seconds a step within +-25% of the run's (the part no load moves). A world that
    missed is measured once more (ATTEMPTS); the last attempt must hold."""
    out = closed_loop(tmp_path)
    report = json.dumps(out, indent=1)
    for world, rows in out.items():
        last = rows[-1]
        assert abs(last["error"]) <= TOL, f"world {world}: step wall predicted vs measured off by more than {TOL:.0%}\n{report}"
        assert abs(last["cpu_error"]) <= TOL, f"world {world}: CPU a step predicted vs measured, off by > {TOL:.0%}\n{report}"
