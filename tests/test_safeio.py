"""runtime/safeio.py: the one door for files in directories someone else may write. Each test plants
what an attacker would (a symlink to a .pth file, a FIFO, a symlinked directory) and checks that the
refusal is one UserError line and that nothing outside the directory was touched."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from meshbake.runtime import safeio
from meshbake.runtime.errors import UserError


def _no_hang(fn, seconds: float = 10.0):
    """fn() in a thread; fails (instead of hanging the suite) if it does not return in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:        # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.fixture
def pth(tmp_path: Path) -> Path:
    """A stand-in for site-packages/x.pth outside the run dir."""
    d = tmp_path / "site-packages"
    d.mkdir()
    p = d / "x.pth"
    p.write_text("# original\n")
    return p


def test_append_refuses_symlink_and_leaves_target(tmp_path: Path, pth: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").symlink_to(pth)
    with pytest.raises(UserError, match="symbolic link"):
        safeio.append_text(run / "train.log", "import os; os.system('id')\n")
    assert pth.read_text() == "# original\n"


def test_append_and_replace_regular(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    safeio.append_text(p, "a\n")
    safeio.append_text(p, "b\n")
    assert p.read_text() == "a\nb\n"
    safeio.write_atomic(p, "c\n")
    assert p.read_text() == "c\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.jsonl"]      # no temp left behind


@pytest.mark.parametrize("op", ["append", "replace", "create", "read"])
def test_fifo_is_refused_without_blocking(tmp_path: Path, op: str):
    f = tmp_path / "PREEMPTED"
    os.mkfifo(f)
    call = {"append": lambda: safeio.append_text(f, "1\n"), "replace": lambda: safeio.write_atomic(f, "1\n"),
            "create": lambda: safeio.create_new(f, "1\n"), "read": lambda: safeio.read_bounded(f)}[op]
    with pytest.raises((UserError, FileExistsError)):
        _no_hang(call)


def test_write_atomic_refuses_planted_symlink(tmp_path: Path, pth: Path):
    (tmp_path / "report.html").symlink_to(pth)
    with pytest.raises(UserError, match="symbolic link"):
        safeio.write_atomic(tmp_path / "report.html", "<html>")
    assert pth.read_text() == "# original\n" and (tmp_path / "report.html").is_symlink()


def test_subdir_refuses_symlinked_directory(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        safeio.subdir(run, "checkpoints", "step-1")
    assert list(elsewhere.iterdir()) == []
    assert safeio.subdir(run, "tensorboard", "x") == run / "tensorboard" / "x"
    with pytest.raises(UserError, match="plain name"):
        safeio.subdir(run, "..")


def test_read_bounded_refuses_oversized_and_symlink(tmp_path: Path, pth: Path):
    big = tmp_path / "manifest.json"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(UserError, match="more than"):
        safeio.read_bounded(big, limit=1024)
    assert safeio.read_bounded(big, limit=4096) == b"x" * 2048
    (tmp_path / "plan.json").symlink_to(pth)
    with pytest.raises(UserError, match="symbolic link"):
        safeio.read_bounded(tmp_path / "plan.json")


@pytest.mark.parametrize("raw,shown", [
    ("a\nimport os", "a\\nimport os"),
    ("\x1b]8;;http://x\x1b\\link", "\\x1b]8;;http://x\\x1b\\link"),
    ("abc\u202eZ\u200b", "abc\\u202eZ\\u200b"),
    ("line\u2028sep\r", "line\\u2028sep\\r"),
    ("plain é 中 text", "plain é 中 text"),
])
def test_printable_shows_controls_and_format_chars(raw: str, shown: str):
    assert safeio.printable(raw) == shown
    assert "\n" not in safeio.printable(raw) and "\x1b" not in safeio.printable(raw)


def test_plain_name():
    assert safeio.plain_name("__0_0.distcp") and safeio.plain_name(".metadata")
    for bad in ("", ".", "..", "../x", "/etc/passwd", "a/b", "a\nb", "a\u202eb"):
        assert not safeio.plain_name(bad), bad
