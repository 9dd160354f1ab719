"""Issue 21, deliverable 7: files someone else wrote. A property over every path a run dir, a step
dir, an export dir and a prepared dir can hold: plant there what an attacker would (a symlink to a
secret, to a `.pth` file, to a FIFO or to another directory; a FIFO; a hostile name with a newline,
an escape sequence and U+202E), run the command that reads it (report, export, resume, prepare and
the ranks' locate), and check, for every (path, plant, command):

- nothing hangs (each command in a thread with a deadline);
- nothing outside the named dirs is written (the outside dir's listing and bytes are unchanged)
  and no secret read from outside reaches any output (files written, stdout, stderr);
- the command either works or refuses in ONE line starting `meshbake`, without a traceback, and
  no raw control or format character reaches the terminal.

One saved run (3 committed steps of tiny-llama, written by runtime.checkpoint.save in this process)
and one prepared dir are built per module and copied for every case.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli, one_process_group
from tests.test_integrity import make_run

SECRET = "hf_SECRETSECRETSECRETSECRETSECRET00"
PTH = "# site-packages/x.pth, untouched\n"
HOSTILE = "x\nimport os; os.system('id')\x1b[2J\u202e"
DEADLINE = 30.0


# ------------------------------------------------------------------ the world an attacker plants in
def outside_dir(base: Path) -> Path:
    """What must never be read into an output or written: a secret, a .pth file, a FIFO."""
    o = base / "outside"
    o.mkdir()
    (o / "secret.txt").write_text(SECRET + "\n")
    (o / "x.pth").write_text(PTH)
    os.mkfifo(o / "pipe")
    return o


def snapshot(o: Path) -> dict[str, bytes | str]:
    return {p.name: ("fifo" if p.is_fifo() else p.read_bytes()) for p in sorted(o.iterdir())}


def plant(path: Path, kind: str, outside: Path) -> None:
    """Replace whatever is at path with the plant."""
    if path.is_symlink() or path.is_file() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link-secret":
        path.symlink_to(outside / "secret.txt")
    elif kind == "link-pth":
        path.symlink_to(outside / "x.pth")
    elif kind == "link-fifo":
        path.symlink_to(outside / "pipe")
    elif kind == "link-dir":
        path.symlink_to(outside, target_is_directory=True)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        raise ValueError(kind)


def unblock(outside: Path, planted: Path) -> None:
    """A command that (wrongly) blocked opening a FIFO is freed, so the suite goes on."""
    for f in (outside / "pipe", planted):
        try:
            if f.is_fifo():
                fd = os.open(f, os.O_RDWR | os.O_NONBLOCK)
                os.close(fd)
        except OSError:
            pass


def run_with_deadline(fn, seconds: float = DEADLINE):
    box: dict = {}

    def go():
        try:
            box["value"] = fn()
        except BaseException as e:     # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive()), box


# ------------------------------------------------------------------ the commands under test
def _one_line_ok(rc: int, out: str, err: str, what: str) -> None:
    for stream in (out, err):
        assert SECRET not in stream, (what, stream[-2000:])
        assert "\x1b" not in stream and "\u202e" not in stream, (what, stream[-2000:])
        assert "Traceback" not in stream, (what, stream[-3000:])
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc in (1, 2, 3) and len(lines) == 1 and lines[0].startswith("meshbake"), (what, rc, err[-3000:])


def do_report(w: Path) -> tuple[int, str, str]:
    r = cli("report", "runs/runA", cwd=w)
    return r.returncode, r.stdout, r.stderr


def do_export(w: Path) -> tuple[int, str, str]:
    r = cli("export", "runs/runA", "-o", "hf", cwd=w)
    return r.returncode, r.stdout, r.stderr


def do_resume(w: Path) -> tuple[int, str, str]:
    """What a restarted rank does (runtime.train.resume): find the newest verified step, load it."""
    import torch
    from meshbake.runtime import checkpoint as ck
    from meshbake.runtime.errors import UserError
    from meshbake.runtime.parallel import hf_config
    from meshbake.runtime.plan import load_plan
    from meshbake.runtime.safeio import printable
    from transformers import AutoModelForCausalLM

    logged: list[str] = []
    try:
        plan = load_plan(str(w / "runs/runA/plan.json"))
        with one_process_group():
            m = AutoModelForCausalLM.from_config(hf_config(plan.model.config), dtype=torch.float32)
            opt = torch.optim.AdamW(m.parameters())
            p = ck.find_resume(w / "runs/runA/checkpoints", "auto", logged.append)
            if p is not None:
                ck.load(p, m, opt)
    except UserError as e:
        return 3, "\n".join(logged), e.line()
    except (FileExistsError, FileNotFoundError) as e:     # find_resume's own refusals
        return 3, "\n".join(logged), f"meshbake: {printable(e)}"
    for line in logged:            # every log line the scan wrote is one printable line
        assert "\n" not in line and printable(line) == line, line
    return 0, "\n".join(logged), ""


def prepared_plan(w: Path):
    from meshbake.runtime import plan as P

    plan = P.load_plan(str(ROOT / "tests/fixtures/run_tiny_demo/plan.json"))
    return plan, replace(plan.data, prepared_dir=str(w / "prepared"),
                         sources=tuple(replace(s, path=str(w / "data/train.jsonl")) for s in plan.data.sources),
                         tokenizer=str(w / "tok"))


def do_prepare(w: Path) -> tuple[int, str, str]:
    from meshbake.runtime.errors import UserError
    from meshbake.runtime.prepare import locate, prepare

    plan, data = prepared_plan(w)
    plan = replace(plan, data=data)
    out: list[str] = []
    try:
        prepare(plan, quiet=True, log=out.append)
        locate(plan)
    except UserError as e:
        return 3, "\n".join(out), e.line()
    return 0, "\n".join(out), ""


COMMANDS = {"report": do_report, "export": do_export, "resume": do_resume, "prepare": do_prepare}

# (path relative to the work dir, the commands that read or write it)
RUN, STEP = "runs/runA", "runs/runA/checkpoints/step-3"
SLOTS = [
    (f"{RUN}/plan.json", ("report", "export")),      # resume reads the bundle's plan, the user's own
    (f"{RUN}/metrics.jsonl", ("report",)),
    (f"{RUN}/train.log", ("report",)),
    (f"{RUN}/report.html", ("report",)),
    (f"{RUN}/checkpoints", ("export", "resume")),
    (STEP, ("export", "resume")),
    (f"{STEP}/manifest.json", ("export", "resume")),
    (f"{STEP}/.metadata", ("export", "resume")),
    (f"{STEP}/__0_0.distcp", ("export", "resume")),
    (f"{STEP}/train_state.json", ("resume",)),
    (f"{STEP}/COMMITTED", ("export", "resume")),
    ("hf.tmp", ("export",)),
    ("tok/tokenizer_config.json", ("export", "prepare")),
    ("tok/environ.txt", ("export",)),
    ("prepared", ("prepare",)),
    ("prepared/POINTER", ("prepare",)),
    ("prepared/DIR/index.json", ("prepare",)),
    ("prepared/DIR/train/input_ids.npy", ("prepare",)),
]
KINDS = ("link-secret", "link-pth", "link-fifo", "link-dir", "fifo")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """runs/runA (3 committed steps, its plan naming tok/ as tokenizer), tok/ (a real tokenizer),
    data/train.jsonl and prepared/ (prepared once)."""
    from meshbake.runtime.prepare import prepare

    base = tmp_path_factory.mktemp("hostile")
    make_run(base / "runs/runA")
    shutil.copytree(ROOT / "data/chat_tokenizer", base / "tok")
    plan_path = base / "runs/runA/plan.json"
    d = json.loads(plan_path.read_text())
    d["data"]["tokenizer"] = "tok"            # export copies the tokenizer named in the plan
    plan_path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    (base / "data").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} " * 20}]}
            for i in range(64)]
    (base / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan, data = prepared_plan(base)
    prepare(replace(plan, data=data), quiet=True, log=lambda s: None)
    return base


def resolve_slot(w: Path, slot: str) -> Path:
    """POINTER and DIR stand for the prepared pointer file and the directory it names."""
    if "POINTER" in slot or "DIR" in slot:
        ptr = next((w / "prepared").glob("*.current"))
        name = json.loads(ptr.read_text())["dir"]
        slot = slot.replace("POINTER", ptr.name).replace("DIR", name)
    return w / slot


# prepared/ is the root the recipe names (data.prepared_dir): a symlink there is the user's choice
CASES = [(slot, kind, cmd) for slot, cmds in SLOTS for kind in KINDS for cmd in cmds
         if not (kind == "link-dir" and slot == "prepared")
         and not (kind == "link-dir" and slot.endswith((".json", ".jsonl", ".log", ".html", ".npy", "COMMITTED",
                                                        ".distcp", ".metadata", ".txt", "POINTER")))]


@pytest.mark.parametrize("slot,kind,cmd", CASES, ids=[f"{c}:{k}:{s}" for s, k, c in CASES])
def test_planted_path(world, tmp_path, slot, kind, cmd):
    w = tmp_path / "w"
    shutil.copytree(world, w, symlinks=True)
    outside = outside_dir(tmp_path)
    before = snapshot(outside)
    target = resolve_slot(w, slot)
    plant(target, kind, outside)
    done, box = run_with_deadline(lambda: COMMANDS[cmd](w))
    if not done:
        unblock(outside, target)
    assert done, f"{cmd} hung on a {kind} at {slot}"
    if "error" in box:
        raise box["error"]
    rc, out, err = box["value"]
    _one_line_ok(rc, out, err, f"{cmd} {kind} {slot}")
    assert snapshot(outside) == before, f"{cmd} wrote outside through a {kind} at {slot}"
    for p in w.rglob("*"):          # no secret copied into anything the command wrote
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 64 << 20:
            assert SECRET.encode() not in p.read_bytes(), f"{cmd} copied the secret into {p.relative_to(w)}"


HOSTILE_NAMES = [f"{RUN}/checkpoints/step-4{HOSTILE}", f"{RUN}/checkpoints/step-5.tmp{HOSTILE}",
                 f"{STEP}/{HOSTILE}", f"tok/{HOSTILE}"]


@pytest.mark.parametrize("where", HOSTILE_NAMES, ids=["step-dir", "tmp-dir", "in-step", "in-tokenizer"])
@pytest.mark.parametrize("cmd", ["report", "export", "resume"])
def test_hostile_names(world, tmp_path, where, cmd):
    """A name with a newline, an escape sequence and U+202E is never echoed raw: not to the
    terminal, not as a line of its own in a log."""
    w = tmp_path / "w"
    shutil.copytree(world, w, symlinks=True)
    p = w / where
    p.mkdir(parents=True) if "step-" in where.rsplit("/", 1)[-1] else p.write_text("x\n")
    done, box = run_with_deadline(lambda: COMMANDS[cmd](w))
    assert done, f"{cmd} hung on a hostile name at {where}"
    if "error" in box:
        raise box["error"]
    rc, out, err = box["value"]
    _one_line_ok(rc, out, err, f"{cmd} hostile {where}")
    if cmd == "export" and rc == 0:
        listed = json.loads((w / "hf/meshbake-export.json").read_text())["files"]
        assert not any("\n" in f or "\x1b" in f for f in listed), listed
