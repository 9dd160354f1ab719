"""Security issue 21, the runtime's run-dir writers: nothing meshbake writes into a run dir follows
a link someone planted there, blocks on a FIFO, or carries a raw newline or escape sequence.

The finding: train.log planted as a symlink to site-packages/x.pth, and a plan name (or a
checkpoint dir name the resume scan logs) holding a newline, made a training run append an
`import os; os.system(...)` line that every later Python start ran. Here: train.log,
metrics.jsonl, plan.json, PREEMPTED, .shared-check, wandb-run-id, tensorboard/ and wandb/ planted
as links (or a FIFO) are refused with a UserError and the target is untouched; logged strings are
one line with their control and format characters escaped. Unit-level (MetricsLog and the train
helpers called directly), plus one world-1 launch for the whole path: exit 3, one line.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from meshbake.runtime import train
from meshbake.runtime.errors import UserError
from meshbake.runtime.metrics import MetricsLog
from meshbake.runtime.tracking import Trackers, _wandb_id, parse_wandb_id

from tests.helpers import launch_env, one_process_group, tiny_recipe, write_bundle_of

PAYLOAD = "import os; os.system('touch /tmp/pwned')"
HOSTILE = f"run\n{PAYLOAD}\x1b[2J\u202egnp.evil"      # newline, ESC (clear screen), right-to-left override


def _rec(n: int = 1, **extra) -> dict:
    return {"step": n, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": 0.1, "tokens_per_s": 10.0,
            "tokens_per_s_per_device": 10.0, "mfu": None, "peak_mem_bytes": None, **extra}


@pytest.fixture
def pth(tmp_path) -> Path:
    """A .pth file in a stand-in site-packages dir, outside the run dir."""
    site = tmp_path / "site-packages"
    site.mkdir()
    p = site / "x.pth"
    p.write_text("# untouched\n")
    return p


@pytest.fixture
def run(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def _untouched(p: Path) -> None:
    assert p.read_text() == "# untouched\n"


# ------------------------------------------------------------------- train.log, metrics.jsonl
def test_train_log_planted_as_a_link_to_a_pth_file_is_refused(run, pth, capsys):
    (run / "train.log").symlink_to(pth)
    log = MetricsLog(run, True)
    with pytest.raises(UserError, match="train.log: is a symbolic link"):
        log.info(HOSTILE)
    _untouched(pth)


def test_metrics_jsonl_planted_as_a_link_to_a_pth_file_is_refused(run, pth, capsys):
    (run / "metrics.jsonl").symlink_to(pth)
    log = MetricsLog(run, True)
    with pytest.raises(UserError, match="metrics.jsonl: is a symbolic link"):
        log.step(_rec())
    _untouched(pth)


def test_a_fifo_at_metrics_jsonl_is_refused_without_blocking(run, capsys):
    fifo = run / "metrics.jsonl"
    os.mkfifo(fifo)
    log = MetricsLog(run, True)
    got: list = []

    def write():
        try:
            log.step(_rec())
            got.append("written")
        except Exception as e:          # noqa: BLE001  the test looks at what came out
            got.append(e)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():                   # blocked in open(): unblock it with a reader, then fail
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        t.join(timeout=10)
        os.close(fd)
        pytest.fail("writing metrics.jsonl blocked on a FIFO")
    assert len(got) == 1 and isinstance(got[0], UserError) and "is a FIFO" in str(got[0]), got


def test_a_hostile_logged_string_is_one_escaped_line_in_train_log_and_on_the_console(run, capsys):
    log = MetricsLog(run, True)
    log.info(f"resumed from step-4{HOSTILE}")       # e.g. a checkpoint dir name the resume scan logs
    log.info("next")
    lines = (run / "train.log").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 3, lines
    first = lines[0]
    for raw in ("\x1b", "\u202e", "\r"):
        assert raw not in first
    assert first == "resumed from step-4run\\n" + PAYLOAD + "\\x1b[2J\\u202egnp.evil", first
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert len([x for x in out.splitlines() if x.strip()]) == 2, out
    assert "\\n" + PAYLOAD in out
    assert not any(x.startswith(PAYLOAD) for x in out.splitlines() + lines)


def test_metrics_jsonl_lines_escape_line_separators_and_controls(run, capsys):
    log = MetricsLog(run, True)
    log.step(_rec(1, note="a\u2028b\u2029c\u0085d\ne\x1b"))
    text = (run / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.count("\n") == 1 and text.isascii(), repr(text)
    assert len(text.splitlines()) == 1          # str.splitlines breaks at U+2028/U+0085 too
    assert json.loads(text)["note"] == "a\u2028b\u2029c\u0085d\ne\x1b"


# ------------------------------------------------------------------ train.py's own files
def test_plan_json_copy_preempted_and_shared_check_refuse_planted_links(run, pth, tmp_path):
    src = tmp_path / "plan.json"
    src.write_text('{"name": "t"}\n')
    (run / "plan.json").symlink_to(pth)
    with pytest.raises(UserError, match="plan.json: is a symbolic link"):
        train.copy_plan(src, run)
    _untouched(pth)
    (run / "PREEMPTED").symlink_to(pth)
    with pytest.raises(UserError, match="PREEMPTED: is a symbolic link"):
        train.mark_preempted(run, 7)
    with pytest.raises(UserError, match="PREEMPTED: is a symbolic link"):
        train.clear_preempted(run)
    _untouched(pth)
    assert (run / "PREEMPTED").is_symlink()
    # regular files: written whole, and only a regular PREEMPTED is removed
    (run / "plan.json").unlink()
    (run / "PREEMPTED").unlink()
    train.copy_plan(src, run)
    train.mark_preempted(run, 7)
    assert (run / "plan.json").read_text() == src.read_text() and (run / "PREEMPTED").read_text() == "7\n"
    train.clear_preempted(run)
    assert not (run / "PREEMPTED").exists()
    assert sorted(p.name for p in run.iterdir()) == ["plan.json"]       # no temp file left behind


def test_shared_check_planted_as_a_link_or_fifo_is_refused(run, pth):
    marker = run / ".shared-check"
    marker.symlink_to(pth)
    with one_process_group(), pytest.raises(UserError, match=r"\.shared-check: is a symbolic link"):
        train.check_shared_run_dir(run, wait_s=0)
    _untouched(pth)
    with pytest.raises(UserError, match="symbolic link"):     # the other ranks' read refuses it too
        train.read_marker(marker)
    marker.unlink()
    os.mkfifo(marker)
    with pytest.raises(UserError, match="is a FIFO"):
        train.read_marker(marker)
    marker.unlink()
    assert train.read_marker(marker) is None
    with one_process_group():
        train.check_shared_run_dir(run, wait_s=0)          # a plain run dir passes and is left clean
    assert list(run.iterdir()) == []


def test_a_user_error_before_the_process_group_is_one_escaped_line(monkeypatch, capsys, tmp_path):
    def refuse(path):
        raise UserError(f"{tmp_path}/plan{HOSTILE}.json", "is a symbolic link", "remove it")

    monkeypatch.setattr(train, "load_plan", refuse)
    monkeypatch.setattr(train.Signals, "install", lambda self: None)    # not this pytest process's handlers
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.main(["plan.json"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshbake: ") and "\x1b" not in err and "\u202e" not in err, err
    assert "\\n" + PAYLOAD in err


# ------------------------------------------------------------------------------ trackers
def _tracking(tensorboard: bool = False, wandb: str | None = None):
    """A stand-in plan with just the tracking section (the refusals come before any other field is read)."""
    wb = SimpleNamespace(project=wandb, entity=None, name=None, mode="offline", tags=())
    return SimpleNamespace(name="t", tracking=SimpleNamespace(tensorboard=tensorboard, wandb=wb))


def test_tensorboard_planted_as_a_link_to_another_dir_is_refused(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="tensorboard: is a symbolic link"):
        Trackers(_tracking(tensorboard=True), run, print)
    assert list(elsewhere.iterdir()) == []


def test_wandb_dir_planted_as_a_link_is_refused(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "wandb").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="wandb: is a symbolic link"):
        Trackers(_tracking(wandb="p"), run, print)
    assert list(elsewhere.iterdir()) == []


def test_wandb_run_id_link_fifo_or_garbage_is_refused(run, pth):
    path = run / "wandb-run-id"
    path.symlink_to(pth)
    with pytest.raises(UserError, match="symbolic link"):
        _wandb_id(run)
    _untouched(pth)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(UserError, match="FIFO"):
        _wandb_id(run)
    path.unlink()
    for garbage in ("abc\nimport os", "ABC", "x" * 65, "", "../../etc", "a\x1bb"):
        path.write_text(garbage + "\n")
        with pytest.raises(UserError, match="W&B run id") as e:
            _wandb_id(run)
        assert "\n" not in str(e.value)
    path.write_text("0123abcd\n")
    assert _wandb_id(run) == "0123abcd"
    path.unlink()
    rid = _wandb_id(run)                       # the first start: made, kept, read back
    assert re.fullmatch(r"[0-9a-f]{12}", rid) and path.read_text() == rid + "\n" and _wandb_id(run) == rid
    assert parse_wandb_id(" 9zz \n") == "9zz" and parse_wandb_id("a b") is None


# --------------------------------------------------------------------- end to end, world 1
@pytest.mark.dist
def test_launch_with_train_log_planted_as_a_pth_link_exits_3_in_one_line(tmp_path, pth):
    b = write_bundle_of(tiny_recipe("rundir", 1, tp=None, train={"micro_batch_size": 2, "global_batch_size": 2,
                                                                  "steps": 2, "warmup_steps": 1}), tmp_path / "bundle")
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    (run_dir / "train.log").symlink_to(pth)
    p = subprocess.run(["bash", str(b / "launch.sh")], env=launch_env(run_dir), capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    mine = [x for x in p.stderr.splitlines() if x.startswith("meshbake: ")]
    assert len(mine) == 1 and "train.log: is a symbolic link" in mine[0], p.stderr[-3000:]
    for noise in ("Traceback", "ChildFailedError", "Root Cause"):
        assert noise not in p.stderr, p.stderr[-3000:]
    _untouched(pth)
    assert not (run_dir / "metrics.jsonl").exists()
