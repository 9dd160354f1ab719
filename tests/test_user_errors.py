"""Runtime failures that are the user's (issue 9, finding 8): bad data, a read-only run dir, a
full disk. Each is ONE line naming the file and the fix, printed once (not per rank), no
traceback, no torchrun failure summary after it, exit 3. Through the real bundle:
`bash launch.sh` with 2 gloo processes; the read-only and full filesystems are real mounts in a
private mount namespace (`unshare --mount`), gone when the launch ends.

The four launches run two at a time (one module fixture), each in its own directory with its
own data file and bundle; the tests assert on what their launch printed and left.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from meshbake.runtime.checkpoint import list_checkpoints, verify

from tests.helpers import ROOT, launch_env, tiny_recipe, write_bundle_of

pytestmark = pytest.mark.dist


def bundle(tmp: Path, data: Path) -> Path:
    return write_bundle_of(tiny_recipe(
        "usererr", 2, tp=None,
        train={"micro_batch_size": 1, "global_batch_size": 2, "steps": 20, "warmup_steps": 1},
        data={"source": "jsonl", "path": str(data), "tokenizer": str(ROOT / "data/tokenizer")},
        checkpoint={"every_steps": 10, "keep": 2}), tmp / "bundle")


def launch(b: Path, run: Path, mount: str = "", after: str = "true") -> subprocess.CompletedProcess:
    """bash launch.sh, after `mount` (a shell command) in a private mount namespace if given,
    then `after` (in the namespace still)."""
    env = launch_env(run)
    cmd = ["bash", str(b / "launch.sh")]
    if mount:
        script = f"{mount} && {{ bash {b / 'launch.sh'}; rc=$?; {after}; exit $rc; }}"
        cmd = ["unshare", "--mount", "bash", "-c", script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=b.parent)


def one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 3; exactly one stderr line names the problem; no traceback or torchrun summary."""
    assert p.returncode == 3, p.stderr[-5000:]
    mine = [line for line in p.stderr.splitlines() if line.startswith("meshbake: ")]
    assert len(mine) == 1 and all(w in mine[0] for w in words), p.stderr[-5000:]
    for noise in ("Traceback", "ChildFailedError", "Root Cause"):
        assert noise not in p.stderr, p.stderr[-5000:]
    print(f"stderr, {len(p.stderr.splitlines())} lines:\n{p.stderr}")
    return mine[0]


def records(n: int) -> list[str]:
    return [json.dumps({"text": f"To be, or not to be, that is the question {i}."}) for i in range(n)]


def bad_utf8(tmp: Path) -> dict:
    data = tmp / "d.jsonl"
    lines = records(40)
    data.write_bytes(("\n".join(lines[:2]) + "\n").encode() + b'{"text": "caf\xe9"}\n' + "\n".join(lines).encode())
    offset = len(("\n".join(lines[:2]) + "\n").encode()) + len(b'{"text": "caf')
    return {"data": data, "offset": offset, "p": launch(bundle(tmp, data), tmp / "run-utf8")}


def bad_jsonl(tmp: Path) -> dict:
    """Line 1's text holds U+2028 and a form feed, which str.splitlines() also splits on."""
    data = tmp / "d.jsonl"
    lines = [json.dumps({"text": "one\u2028two\x0cthree"}, ensure_ascii=False)] + records(2) + ['{"text": "broken'] \
        + records(40)
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"data": data, "p": launch(bundle(tmp, data), tmp / "run-jsonl")}


def good_bundle(tmp: Path) -> Path:
    data = tmp / "d.jsonl"
    data.write_text("\n".join(records(200)) + "\n")
    return bundle(tmp, data)


def read_only(tmp: Path) -> dict:
    b = good_bundle(tmp)
    ro = tmp / "ro"
    ro.mkdir()
    run = ro / "run"
    return {"run": run, "p": launch(b, run, f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}")}


def disk_full(tmp: Path) -> dict:
    b = good_bundle(tmp)
    full = tmp / "full"
    full.mkdir()
    run = full / "run"
    # the run dir is copied out before the namespace (and its tmpfs) goes away
    return {"after": tmp / "after",
            "p": launch(b, run, f"mount -t tmpfs -o size=12m tmpfs {full}", after=f"cp -r {run} {tmp}/after")}


SCENARIOS = {"utf8": bad_utf8, "jsonl": bad_jsonl, "read_only": read_only, "disk_full": disk_full}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """name -> what the scenario returned, or the exception it raised (re-raised by its test)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(f, tmp_path_factory.mktemp(n)) for n, f in SCENARIOS.items()}
        return {n: f.exception() or f.result() for n, f in futures.items()}


def result(launched: dict, name: str) -> dict:
    r = launched[name]
    if isinstance(r, BaseException):
        raise r
    return r


def test_invalid_utf8_names_file_byte_and_line(launched):
    r = result(launched, "utf8")
    one_line(r["p"], f"{r['data']}: not valid UTF-8 at byte {r['offset']} (line 3", "iconv")


def test_bad_jsonl_line_names_file_and_true_line_number(launched):
    """Line 1's text holds U+2028 and a form feed, which str.splitlines() also splits on: the
    reported number must still be the file's line 4."""
    r = result(launched, "jsonl")
    one_line(r["p"], f"{r['data']}:4: not a JSON record", "fix or remove that line")


def test_read_only_run_dir(launched):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    r = result(launched, "read_only")
    p = r["p"]
    if "mount:" in p.stderr or "unshare:" in p.stderr:
        pytest.skip(f"no private mounts here: {p.stderr[:200]}")
    one_line(p, str(r["run"]), "read-only", "MESHBAKE_RUN_DIR")


def test_disk_full_during_save_keeps_the_previous_checkpoint(launched):
    """A 12 MB filesystem: step-10 (8 MB of model + AdamW state) fits, step-20 does not."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    r = result(launched, "disk_full")
    p = r["p"]
    if "mount:" in p.stderr or "unshare:" in p.stderr:
        pytest.skip(f"no private mounts here: {p.stderr[:200]}")
    one_line(p, "no space left on device while saving step 20", "step-20.tmp removed", "step-10 is intact",
             "free space")
    after = r["after"]
    kept = list_checkpoints(after / "checkpoints")
    assert [s for s, _ in kept] == [10] and verify(kept[0][1]) is None
    assert not (after / "checkpoints/step-20.tmp").exists()
