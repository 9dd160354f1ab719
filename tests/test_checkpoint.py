"""Checkpoints, exact resume, resharding, faults and preemption, through the real bundle:
`bash out/launch.sh` (torchrun, gloo processes) exactly as a user runs it.

Plan P: dp_shard 4; plan Q: dp_shard 2 x tp 2 (+SP, LP); plan P2: dp_shard 2 (2 processes).
30 steps, checkpoint every 10, keep 2. The reshard (4 ranks of FSDP shards -> 2 x 2 with TP, and
back) needs 4 processes and runs on P; the fault and preemption scenarios (a rank's death and
torchrun's restart, a writer killed mid-save, a corrupted shard, SIGUSR1 and a process group's
SIGTERM) are the same mechanisms on 2 processes as on 4 (one torchrun agent, every rank agreeing
on the stop step through one collective, one shard file per rank) and run on P2, each held to P2's
own uninterrupted run: 4 process starts fewer per launch (a worker's start, torch and transformers
imported, is most of a launch's CPU time).

The eleven launches run two at a time (one module fixture, `launched`): a launch leaves a core idle
while launch.sh's preflight, prepare and the torchrun agent start one after the other, so two
interleave well on two cores. Each scenario has its own bundle and run dir; the tests below
assert on what their scenario left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from meshbake.runtime.checkpoint import list_checkpoints, verify

from tests.helpers import launch_env, tiny_recipe, write_bundle_of

pytestmark = pytest.mark.dist
STEPS = 30


def bundle(tmp: Path, name: str, *, mesh: dict, sp=False, every=10, keep=2, max_restarts=0, resume="auto",
           world=4) -> Path:
    return write_bundle_of(tiny_recipe(
        name, world, mesh={**mesh, "cp": 1}, sp=sp, lp=sp, cluster={"max_restarts": max_restarts},
        train={"seq_len": 64, "steps": STEPS, "lr": 2e-3, "warmup_steps": 3, "min_lr": 2e-4},
        checkpoint={"every_steps": every, "keep": keep, "resume": resume}), tmp / f"bundle-{name}")


def launch(b: Path, run_dir: Path, expect_rc=0, **extra) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", str(b / "launch.sh")], env=launch_env(run_dir, **extra), capture_output=True, text=True,
                       timeout=600, cwd=b.parent)
    assert p.returncode == expect_rc, p.stderr[-5000:]
    return p


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; after a restart a replayed step's last record wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


def signal_mid_run(b: Path, run: Path, send) -> tuple[subprocess.Popen, str, str]:
    """launch.sh in the background; once 3 steps are logged, send(proc); wait for the exit."""
    proc = subprocess.Popen(["bash", str(b / "launch.sh")], env=launch_env(run), cwd=b.parent, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        m = run / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    send(proc)
    out, err = proc.communicate(timeout=600)
    return proc, out, err


# ------------------------------------------------------------------ the scenarios' launches
def run_base(tmp: Path, p: Path, name="run-base") -> Path:
    """An uninterrupted run: of P (the reshard's reference), of P2 (the faults' and preemptions')."""
    run = tmp / name
    launch(p, run)
    return run


P2 = {"mesh": {"dp_shard": 2, "tp": 1}, "world": 2}


def run_restart(tmp: Path) -> Path:
    b = bundle(tmp, "p2_restart", **P2, max_restarts=1)
    run = tmp / "run-restart"
    launch(b, run, MESHBAKE_FAULT="step:1:25")
    return run


def run_killsave(tmp: Path) -> Path:
    b = bundle(tmp, "p2_killsave", **P2, max_restarts=1, keep=5)
    run = tmp / "run-killsave"
    launch(b, run, MESHBAKE_FAULT="save:1:20")
    return run


def run_reshard(tmp: Path, base: Future) -> tuple[Path, Path]:
    run0 = base.result()
    q = bundle(tmp, "q", mesh={"dp_shard": 2, "tp": 2}, sp=True, every=5, resume=str(run0 / "checkpoints/step-20"))
    run_q = tmp / "run-q"
    launch(q, run_q)
    # and back: dp_shard 4 resumes from the dp2 x tp2 checkpoint at step 25
    p2 = bundle(tmp, "p_back", mesh={"dp_shard": 4, "tp": 1}, resume=str(run_q / "checkpoints/step-25"))
    run_p2 = tmp / "run-back"
    launch(p2, run_p2)
    return run_q, run_p2


def run_preempt(tmp: Path, p: Path) -> dict:
    run = tmp / "run-preempt"
    proc, _, err = signal_mid_run(p, run, lambda proc: proc.send_signal(signal.SIGUSR1))
    r = {"run": run, "returncode": proc.returncode, "stderr": err, "stopped": None, "committed": False}
    if proc.returncode == 0:
        r["stopped"] = stopped = int((run / "PREEMPTED").read_text())
        r["committed"] = (run / f"checkpoints/step-{stopped}/COMMITTED").is_file()    # before the resume prunes
        launch(p, run)                # the next launch resumes
    return r


def corrupted_copy(run0: Path, run: Path) -> bytes:
    """40 KB overwritten in the middle of rank 1's shard of step-30, size unchanged."""
    shutil.copytree(run0, run)
    shard = run / "checkpoints/step-30/__1_0.distcp"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid - 20480:mid + 20480] = b"\xa5" * 40960
    shard.write_bytes(bytes(data))
    return bytes(data)


def run_corrupt(tmp: Path, p: Path, base: Future) -> tuple[Path, bytes]:
    run = tmp / "run-corrupt"
    data = corrupted_copy(base.result(), run)
    launch(p, run)
    return run, data


def run_sigterm(tmp: Path, p: Path) -> tuple[Path, subprocess.Popen, str]:
    run = tmp / "run-sigterm"
    proc, _, err = signal_mid_run(p, run, lambda proc: os.killpg(proc.pid, signal.SIGTERM))
    return run, proc, err


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """Every scenario's launches, two at a time: name -> its result, or the exception it raised
    (re-raised by the test that reads it). The base run goes first; the two scenarios that start
    from its checkpoints wait for it, the others do not need it until their assertions."""
    tmp = tmp_path_factory.mktemp("ckpt")
    p = bundle(tmp, "p", mesh={"dp_shard": 4, "tp": 1})
    p2 = bundle(tmp, "p2", **P2)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        base = pool.submit(run_base, tmp, p)
        base2 = pool.submit(run_base, tmp, p2, "run-base2")
        futures = {"base": base, "base2": base2, "reshard": pool.submit(run_reshard, tmp, base),
                   "restart": pool.submit(run_restart, tmp), "killsave": pool.submit(run_killsave, tmp),
                   "preempt": pool.submit(run_preempt, tmp, p2), "corrupt": pool.submit(run_corrupt, tmp, p2, base2),
                   "sigterm": pool.submit(run_sigterm, tmp, p2)}
        out = {name: f.exception() or f.result() for name, f in futures.items()}
    print(f"checkpoint scenarios, 11 launches two at a time: {time.perf_counter() - t0:.1f} s")
    return {**out, "p": p}


def result(launched: dict, name: str):
    r = launched[name]
    if isinstance(r, BaseException):
        raise r
    return r


@pytest.fixture(scope="module")
def base(launched):
    run = result(launched, "base")
    return run, losses(run)


@pytest.fixture(scope="module")
def base2(launched):
    """P2's uninterrupted run: the reference of the fault and preemption scenarios (2 processes)."""
    run = result(launched, "base2")
    return run, losses(run)


def test_checkpoints_are_committed_and_pruned(base):
    run, ref = base
    assert sorted(ref) == list(range(1, STEPS + 1))
    kept = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert kept == [20, 30]                                   # keep: 2, step-10 pruned
    ck = run / "checkpoints/step-20"
    state = json.loads((ck / "train_state.json").read_text())
    assert state["step"] == 20 and state["world"] == 4 and state["scheduler"]["last_epoch"] == 20
    assert (ck / ".metadata").is_file() and len(list(ck.glob("*.distcp"))) == 4
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_rank_death_restarts_and_resumes_exactly(base2, launched):
    """Rank 1 os._exit()s at step 25; torchrun --max-restarts 1 restarts the group, which
    resumes from step-20 and reproduces steps 21-30 bit for bit."""
    _, ref = base2
    run = result(launched, "restart")
    assert "resumed from step-20" in log(run)
    got = losses(run)
    diff = max(abs(got[s] - ref[s]) for s in range(21, STEPS + 1))
    print(f"restart after rank death: max |loss diff| steps 21-30 = {diff:.1e}")
    assert diff <= 1e-6


def test_killed_writer_leaves_previous_checkpoint_usable(base2, launched):
    """Rank 1 of 2 dies while step-20 is being written: step-20.tmp is left behind, never used;
    the restart skips it (log line) and resumes from step-10."""
    _, ref = base2
    run = result(launched, "killsave")
    text = log(run)
    assert "step-20.tmp: incomplete" in text and "resumed from step-10" in text, text
    got = losses(run)
    assert max(abs(got[s] - ref[s]) for s in range(11, STEPS + 1)) <= 1e-6
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [10, 20, 30]


def test_reshard_dp_shard4_to_dp2_tp2_and_back(base, launched):
    _, ref = base
    run_q, run_p2 = result(launched, "reshard")
    assert "resumed from step-20 (saved on world 4)" in log(run_q)
    got = losses(run_q)
    assert sorted(got) == list(range(21, STEPS + 1))
    d1 = max(abs(got[s] - ref[s]) / ref[s] for s in got)
    back = losses(run_p2)
    d2 = max(abs(back[s] - ref[s]) / ref[s] for s in back)
    print(f"reshard dp4 -> dp2xtp2: max rel {d1:.1e}; dp2xtp2 -> dp4: max rel {d2:.1e}")
    assert sorted(back) == list(range(26, STEPS + 1))
    assert d1 < 1e-5 and d2 < 1e-5


def test_preemption_signal_saves_and_resume_continues(base2, launched):
    """SIGUSR1 to launch.sh (what job.sbatch forwards before the time limit): the step
    finishes, a checkpoint is written, PREEMPTED names the step, exit 0; the next launch resumes."""
    _, ref = base2
    r = result(launched, "preempt")
    run, stopped = r["run"], r["stopped"]
    assert r["returncode"] == 0, r["stderr"][-4000:]
    assert 3 <= stopped < STEPS, "the signal should land mid-run"
    assert r["committed"], f"step-{stopped} (PREEMPTED) was not committed"
    assert f"resumed from step-{stopped}" in log(run) and not (run / "PREEMPTED").exists()
    got = losses(run)
    assert max(abs(got[s] - ref[s]) for s in range(1, STEPS + 1)) <= 1e-6


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(base2, launched):
    """40 KB overwritten in the middle of a rank's shard of step-30, size unchanged (issue 9):
    the restart says so in one line, sets step-30 aside, resumes from step-20 and reproduces
    steps 21-30; keep 2 then holds step-20's successor and the new step-30, both verified."""
    _, ref = base2
    run, data = result(launched, "corrupt")
    text = log(run)
    bad = [line for line in text.splitlines() if "failed verification" in line]
    assert bad == ["checkpoint step-30 failed verification: __1_0.distcp differs from the sha256 written at save "
                   "(corrupted); renamed to step-30.corrupt, trying step-20"], text
    assert "resumed from step-20" in text
    got = losses(run)
    assert max(abs(got[s] - ref[s]) for s in range(21, STEPS + 1)) <= 1e-6
    kept = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in kept] == [20, 30] and all(verify(path) is None for _, path in kept)
    assert (run / "checkpoints/step-30.corrupt/__1_0.distcp").read_bytes() == data


def test_sigterm_to_the_whole_process_group_saves_and_exits_0(launched):
    """How Slurm delivers scancel, preemption and the time limit: SIGTERM to every process of
    the step at once (launch.sh, torchrun, the workers), here os.killpg. torchrun must not
    turn it into SignalException + exit 1 (no requeue) and SIGKILL the workers mid-save: the
    workers finish the step, commit a checkpoint, write PREEMPTED, and everything exits 0."""
    run, proc, err = result(launched, "sigterm")
    assert proc.returncode == 0, err[-4000:]
    assert "SignalException" not in err and "Traceback" not in err, err[-4000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert 3 <= stopped < STEPS, "the signal should land mid-run"
    assert verify(run / f"checkpoints/step-{stopped}") is None


def test_param_groups_of_a_stage_the_checkpoint_does_not_list():
    """DCP writes optim.param_groups.N.params once, from one rank: under pp the saved lists name
    one stage's FQNs. A rank of another stage keeps its own groups (FQNs and hyperparameters)
    with the checkpoint's lr; a rank whose FQNs are listed takes the listed group's values."""
    from meshbake.runtime.checkpoint import own_param_groups

    saved = [{"params": ["model.layers.0.mlp.up_proj.weight"], "lr": 3e-4, "initial_lr": 1e-3, "weight_decay": 0.1,
              "betas": (0.9, 0.95)},
             {"params": ["model.layers.0.input_layernorm.weight"], "lr": 3e-4, "initial_lr": 1e-3,
              "weight_decay": 0.0, "betas": (0.9, 0.95)}]
    stage1 = [{"params": ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"], "lr": 1e-9, "initial_lr": 1e-3,
               "weight_decay": 0.1, "betas": (0.9, 0.95)},
              {"params": ["model.norm.weight"], "lr": 1e-9, "initial_lr": 1e-3, "weight_decay": 0.0,
               "betas": (0.9, 0.95)}]
    got = own_param_groups(saved, stage1)
    assert [g["params"] for g in got] == [g["params"] for g in stage1]
    assert [g["weight_decay"] for g in got] == [0.1, 0.0] and {g["lr"] for g in got} == {3e-4}
    assert all(g["betas"] == (0.9, 0.95) for g in got)
    stage0 = [dict(saved[0], lr=1e-9, weight_decay=0.5), dict(saved[1], lr=1e-9)]
    got = own_param_groups(saved, stage0)
    assert [g["weight_decay"] for g in got] == [0.1, 0.0] and {g["lr"] for g in got} == {3e-4}
