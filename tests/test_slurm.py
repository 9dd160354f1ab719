"""Real Slurm end to end: a local 2-node cluster (scripts/slurm-local/up.sh), the tiny_slurm
recipe bundled for the local-cpu profile, `sbatch --wait out/job.sbatch`; then a preemption:
USR1 to the batch shell -> checkpoint -> `scontrol requeue` -> the job resumes and finishes.
The cluster is stopped (daemons by pid, state dir removed) even when a test fails.

One cluster start for the module, and the three jobs (sbatch --wait and two preemption
variants) run two at a time on it (each takes 2 CPUs and 2 GPUs of each node's 16 and 8): Slurm's
waits (scheduling, the requeue hold, the steps' start) overlap instead of adding up. Two, not
four: a job's 4 ranks + 2 agents hold ~2 GB of RAM, and a 2-core CI runner may have 7 GB. Each
job has its own submit dir, run dir and rendezvous port (20000 + job id).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import ROOT, launch_env

pytestmark = pytest.mark.slurm
UP, DOWN = ROOT / "scripts/slurm-local/up.sh", ROOT / "scripts/slurm-local/down.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(b)]
    assert not missing, f"Slurm is not installed ({missing}); `make install` installs it from Debian"
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    env = launch_env(SLURM_CONF=str(state / "slurm.conf"))    # the venv's python first on PATH on the nodes
    t0 = time.perf_counter()
    try:
        up = subprocess.run([str(UP), str(state)], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"slurm-local up in {time.perf_counter() - t0:.1f} s")
        yield env
    finally:
        subprocess.run([str(DOWN), str(state)], capture_output=True, text=True, timeout=60)


def submit_dir(tmp: Path, *overrides: str) -> Path:
    """A submission directory as a user has it: data/ beside the bundle in out/."""
    from meshbake.compiler.bundle import write_bundle
    from meshbake.compiler.pipeline import compile_recipe

    (tmp / "data").symlink_to(ROOT / "data")
    b = compile_recipe((ROOT / "recipes/tiny_slurm.yaml").read_text(), overrides=overrides, source="tiny_slurm")
    assert hasattr(b, "files"), b
    write_bundle(b.files, tmp / "out")
    return tmp


def job(env, jid: str) -> dict[str, str]:
    p = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def daemon_logs(env, lines: int = 40) -> str:
    """The tail of slurmctld's and both slurmd's logs: why Slurm failed a job is only there."""
    logs = sorted((Path(env["SLURM_CONF"]).parent / "log").glob("*.log"))
    return "\n".join(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) for f in logs)


def metrics(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def sbatch_wait(slurm, d: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(["sbatch", "--wait", "--parsable", "out/job.sbatch"], cwd=d, env=slurm,
                       capture_output=True, text=True, timeout=900)
    return {"returncode": p.returncode, "stderr": p.stderr, "seconds": time.perf_counter() - t0}


def preempt(slurm, d: Path, signal: tuple[str, ...]) -> dict:
    """Submit, signal once >= 3 steps are logged, let the requeued job start 3 s later, wait for the end."""
    run = d / "runs/tiny_slurm"
    jid = subprocess.run(["sbatch", "--parsable", "out/job.sbatch"], cwd=d, env=slurm, capture_output=True,
                         text=True, check=True).stdout.strip().split(";")[0]
    deadline = time.time() + 600          # generous: the module's four jobs share this machine's cores
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.time() < deadline, "job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", *signal, jid], env=slurm, check=True)
    deadline = time.time() + 900
    requeued = False
    while True:
        info = job(slurm, jid)
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING" and not requeued:
            # Slurm holds a requeued job ~2 minutes (BeginTime); a scheduler would start it later.
            # Not "now": slurmd revoked the old incarnation's credential at the requeue, and a new
            # one issued within the same second counts as revoked ("Job credential revoked" ->
            # FAILED, seen under load); 3 s later the new credential is strictly newer
            subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now+3"], env=slurm, check=True)
            requeued = True
        if not info or info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        assert time.time() < deadline, info
        time.sleep(0.5)
    return {"info": info, "requeued": requeued}


# TERM to the batch shell (scancel --signal=TERM --batch) is not a job of its own here: after
# job.sbatch's TERM trap it is the USR1 variant's path (USR1 to srun), and that trap is run with
# stub srun / scontrol in tests/test_shell.py (test_job_sbatch_turns_a_stop_signal_into_usr1_...)
SIGNALS = {"usr1-batch-shell": ("--signal=USR1", "--batch"), "term-every-step-process": ("--signal=TERM",)}


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory) -> dict[str, tuple[Path, dict | BaseException]]:
    """The three jobs, two at a time: name -> (submit dir, outcome or the exception its driver raised)."""
    # 20 steps: the stop signal comes after step 3 and lands by step ~5 even with 8 ranks on 2
    # cores (~1.1 s a step), leaving 15 steps to resume into; 40 cost ~40 s more for nothing
    dirs = {name: submit_dir(tmp_path_factory.mktemp(name), "train.steps=20") for name in SIGNALS}
    dirs["sbatch-wait"] = submit_dir(tmp_path_factory.mktemp("sbatch-wait"), "train.steps=10")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        # one preemption job beside the short sbatch --wait, then the other preemption job
        first, second = SIGNALS
        futures = {first: pool.submit(preempt, slurm, dirs[first], SIGNALS[first]),
                   "sbatch-wait": pool.submit(sbatch_wait, slurm, dirs["sbatch-wait"]),
                   second: pool.submit(preempt, slurm, dirs[second], SIGNALS[second])}
        out = {name: (dirs[name], f.exception() or f.result()) for name, f in futures.items()}
    print(f"three Slurm jobs, two at a time: {time.perf_counter() - t0:.1f} s")
    return out


def outcome(jobs, name: str) -> tuple[Path, dict]:
    d, r = jobs[name]
    if isinstance(r, BaseException):
        raise r
    return d, r


def test_sbatch_wait_trains_on_two_nodes(slurm, jobs):
    d, p = outcome(jobs, "sbatch-wait")
    out = "".join(f.read_text() for f in d.glob("meshbake-tiny_slurm-*.*"))
    assert p["returncode"] == 0, f"{p['stderr']}{out}\n{daemon_logs(slurm)}"
    print(f"sbatch --wait: {p['seconds']:.1f} s")
    run = d / "runs/tiny_slurm"
    log = (run / "train.log").read_text()
    assert "ranks by host: n1: [0, 1], n2: [2, 3]" in log, log      # 4 ranks, 2 per node, tp in a node
    losses = metrics(run)
    assert sorted(losses) == list(range(1, 11)) and all(math.isfinite(v) for v in losses.values())
    assert losses[10] < losses[1]
    assert (run / "checkpoints/step-10/COMMITTED").is_file()
    assert "job.sbatch: job" in out and "restart 0 on n[1-2]" in out


@pytest.mark.parametrize("variant", list(SIGNALS))
def test_preemption_requeues_and_resumes(slurm, jobs, variant):
    """USR1 to the batch shell: what --signal=B:USR1@N does before the time limit (TERM to the
    batch shell takes this path after job.sbatch's trap, tests/test_shell.py). TERM to
    every process of the step (launch.sh, torchrun, the workers): torchrun must not die of it
    (issue 9). Not covered, a Slurm limit: TERM to srun itself (scancel --full, or a time limit
    without the USR1 warning) makes srun SIGKILL the tasks at once."""
    d, r = outcome(jobs, variant)
    info, run = r["info"], d / "runs/tiny_slurm"
    out = "".join(f.read_text() for f in d.glob("meshbake-tiny_slurm-*.*"))
    assert r["requeued"] and info.get("JobState", "COMPLETED") == "COMPLETED", \
        f"{info}\n{out[-3000:]}\n{daemon_logs(slurm)}"
    stopped = int(next(line for line in (run / "train.log").read_text().splitlines()
                       if line.startswith("stop signal")).split("step ")[1].split(",")[0])
    assert f"resumed from step-{stopped}" in (run / "train.log").read_text()
    assert "requeueing job" in out and "restart 1 on" in out
    assert sorted(metrics(run)) == list(range(1, 21))
    assert (run / "checkpoints/step-20/COMMITTED").is_file() and not (run / "PREEMPTED").exists()
