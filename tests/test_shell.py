"""Every generated script of every recipe passes `bash -n` and shellcheck; job.sbatch's stop-signal
traps, run with stub srun / scontrol."""
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.golden_refresh import golden_files, recipe_names


def test_shellcheck_is_installed():
    # `make install` apt-installs it; a missing linter must fail loudly, not skip
    assert shutil.which("shellcheck"), "shellcheck missing: run `make install`"


@pytest.mark.parametrize("name", recipe_names())
@pytest.mark.parametrize("script", ["launch.sh", "job.sbatch"])
def test_generated_shell_is_clean(name, script, tmp_path):
    files = golden_files(name)
    assert script in files
    path = tmp_path / script
    path.write_bytes(files[script])
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    text = files[script].decode()
    assert "set -euo pipefail" in text


# srun as a stub that runs until signalled: it records the signal it got and, on USR1, does what
# the training processes do (PREEMPTED in the run dir, exit 0); TERM kills it as it would kill the
# real srun's tasks (exit 143)
SRUN = """#!/usr/bin/env bash
trap 'echo USR1 >> "${STUB_OUT}/srun.signals"; echo 5 > "${MESHBAKE_RUN_DIR}/PREEMPTED"; exit 0' USR1
trap 'echo TERM >> "${STUB_OUT}/srun.signals"; exit 143' TERM
echo $$ > "${STUB_OUT}/srun.pid"
while true; do sleep 0.05; done
"""
SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "${STUB_OUT}/scontrol.args"
"""


def _catches(pid: int, *signums: int) -> bool:
    """Has the process installed handlers for these signals (SigCgt of /proc/PID/status)?"""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return all(caught >> (s - 1) & 1 for s in signums)


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_job_sbatch_turns_a_stop_signal_into_usr1_to_srun_and_requeues(sig, tmp_path):
    """The batch shell's traps, without a Slurm cluster (tests/test_slurm.py runs USR1 to the
    batch shell and TERM to every step process on a real one): USR1 (--signal=B:USR1@N before
    the time limit) and TERM (scancel --signal=TERM --batch, preemption) both reach srun as USR1
    (a TERM of its own makes srun SIGKILL the tasks mid-save); srun's exit 0 with PREEMPTED in
    the run dir makes job.sbatch requeue the job and exit 0."""
    from meshbake.compiler.bundle import write_bundle
    from meshbake.compiler.pipeline import compile_recipe

    from tests.helpers import ROOT

    b = compile_recipe((ROOT / "recipes/tiny_slurm.yaml").read_text(), source="tiny_slurm")
    write_bundle(b.files, tmp_path / "out")
    stubs, rec, run = tmp_path / "bin", tmp_path / "rec", tmp_path / "run"
    for d in (stubs, rec, run):
        d.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_OUT": str(rec), "HOME": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1", "MESHBAKE_BUNDLE_DIR": str(tmp_path / "out"), "MESHBAKE_RUN_DIR": str(run),
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    p = subprocess.Popen(["bash", str(tmp_path / "out/job.sbatch")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # the batch shell's traps are set and srun's own (else a USR1 sent too early kills the stub)
        while not ((rec / "srun.pid").is_file() and _catches(p.pid, signal.SIGUSR1, signal.SIGTERM)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate(timeout=5)
            time.sleep(0.02)
        p.send_signal(getattr(signal, f"SIG{sig}"))
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert (rec / "srun.signals").read_text() == "USR1\n"
    assert f"job.sbatch: {sig}, checkpointing" in out and "requeueing job 7" in out, out
    assert (rec / "scontrol.args").read_text() == "requeue 7\n"
