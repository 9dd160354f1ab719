"""`meshbake report` and plan.json read-back on a run dir someone else wrote (issue 21, "trust
nothing you did not write"): planted symlinks and FIFOs, plan.json values outside the schema,
numbers that hang the axis code, huge lines, terminal escape sequences."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from meshbake.compiler import report as R
from meshbake.runtime import plan as P

HERE = Path(__file__).parent
RUN = HERE / "fixtures" / "run_tiny_demo"
GOLDEN = HERE / "golden"


def _run(tmp_path: Path, **plan_changes) -> Path:
    rd = tmp_path / "run"
    shutil.copytree(RUN, rd)
    if plan_changes:
        d = json.loads((rd / "plan.json").read_text())
        d.update(plan_changes)
        (rd / "plan.json").write_text(json.dumps(d))
    return rd


def _report(rd: Path, *extra: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """meshbake report in a subprocess: a hang is a failure after `timeout` s, not a stuck suite."""
    p = subprocess.run([sys.executable, "-m", "meshbake.compiler", "report", str(rd), *extra],
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _one_line_err(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_report_html_symlinked_to_a_pth_is_refused_and_left_untouched(tmp_path):
    # the finding: a plan name with raw newlines + report.html -> x.pth: every later Python start ran it
    rd = _run(tmp_path, name="x\nimport os; os.system('touch /tmp/pwned')\n")
    pth = tmp_path / "elsewhere" / "x.pth"
    pth.parent.mkdir()
    pth.write_text("# site dir\n")
    (rd / "report.html").symlink_to(pth)
    code, out, err = _report(rd)
    assert code == 3, (out, err)
    assert "plan.json" in _one_line_err(err)            # the name is refused first
    assert pth.read_text() == "# site dir\n" and (rd / "report.html").is_symlink()
    # with a clean plan the symlink itself is refused: never written through, even with -o
    rd2 = _run(tmp_path / "b")
    (rd2 / "report.html").symlink_to(pth)
    code, out, err = _report(rd2)
    assert code == 3 and "symbolic link" in _one_line_err(err)
    link = tmp_path / "mine.html"
    link.symlink_to(pth)
    code, out, err = _report(rd2, "-o", str(link))
    assert code == 3 and "symbolic link" in _one_line_err(err)
    assert pth.read_text() == "# site dir\n"


def test_losses_1e16_and_1e16_plus_4_finish_fast(tmp_path):
    rd = _run(tmp_path)
    (rd / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1e16}) + "\n"
                                      + json.dumps({"step": 2, "loss": 1e16 + 4}) + "\n")
    code, out, err = _report(rd, timeout=20)
    assert code == 0, err
    assert "<svg" in (rd / "report.html").read_text()


PAIRS = [(1e16, 1e16 + 4), (1e16, 1e16), (0.0, 0.0), (-1e308, 1e308), (5e-324, 1e-323), (1e-300, 1e300),
         (float("inf"), 1.0), (float("nan"), 1.0), (3.0, -2.0), (1e300, 1.0000000000000002e300), (-0.0, 0.0)]


def test_nice_ticks_ends_on_any_pair_of_floats():
    # in a subprocess: the old loop on (1e16, 1e16 + 4) grew a list forever (1.4 GB in 30 s); a
    # thread could not be stopped, a process is killed at the timeout
    code = ("import json, sys; from meshbake.compiler.report import nice_ticks; "
            "print(json.dumps([nice_ticks(lo, hi) for lo, hi in json.loads(sys.argv[1])]))")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(PAIRS)], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 0, p.stderr
    for (lo, hi), ticks in zip(PAIRS, json.loads(p.stdout)):
        assert 2 <= len(ticks) <= 8 and ticks == sorted(ticks) and len(set(ticks)) == len(ticks), (lo, hi, ticks)


def test_non_finite_metrics_are_not_plotted(tmp_path):
    recs = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}, {"step": 3, "loss": 2.0},
            {"step": 4, "loss": 1.5}]
    met = R.parse_metrics("\n".join(json.dumps(r) for r in recs) + '\n{"step": 5, "loss": 1e999}\n')
    assert [s for s, _ in R.series(met.records, "loss")] == [3, 4]


@pytest.mark.parametrize("text", ['NaN', 'Infinity', '-Infinity', '1e999'])
def test_non_finite_number_in_plan_json_is_one_line_exit_3(tmp_path, text):
    rd = _run(tmp_path)
    raw = (rd / "plan.json").read_text()
    d = json.loads(raw)
    d["train"]["lr"] = "__X__"
    (rd / "plan.json").write_text(json.dumps(d).replace('"__X__"', text))
    code, out, err = _report(rd)
    assert code == 3 and "plan.json" in _one_line_err(err), err


def test_plan_name_outside_the_schema_pattern_is_one_line_naming_the_path(tmp_path, capsys):
    rd = _run(tmp_path, name="a name with spaces")
    assert R.main(str(rd), None) == 3
    line = _one_line_err(capsys.readouterr().err)
    assert "plan.json: name: 'a name with spaces' does not match" in line
    d = json.loads((rd / "plan.json").read_text())
    d["name"] = "ok"
    d["train"]["warmup_steps"] = -3
    with pytest.raises(P.PlanError, match=r"plan\.json: train\.warmup_steps: -3 is less than the minimum 0"):
        P.from_dict(d)
    d["train"]["warmup_steps"] = 1
    d["tp"]["placements"] = {"lm_head\n": "colwise"}
    with pytest.raises(P.PlanError, match=r"tp\.placements key"):
        P.from_dict(d)


def test_an_8_mb_metrics_line_is_skipped_counted_and_never_held(tmp_path):
    rd = _run(tmp_path)
    with (rd / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 41, "loss": 1.0, "pad": "x" * (8 << 20)}) + "\n")
        f.write(json.dumps({"step": 42, "loss": 1.0}) + "\n")
    tracemalloc.start()
    try:
        run = R.load_run(rd)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB reading an 8 MiB line"
    assert [r["step"] for r in run.records][-2:] == [40, 42]
    assert any("skipped 1 metrics.jsonl lines longer than 64 KiB" in n for n in run.notes)
    assert sum("longer than 64 KiB" in x for x in R.summary_lines(run)) == 1


def test_many_steps_are_decimated_to_a_bounded_number():
    lines = (json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 100_001))
    met = R.parse_metrics(lines)
    assert len(met.records) <= R.MAX_STEPS + 2 and met.stride == 32
    assert met.records[0]["step"] == 1 and met.records[-1]["step"] == 100_000


def test_escape_sequences_never_reach_the_terminal(tmp_path, capsys):
    evil = "\x1b[2K\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\\r\u202e"
    rd = _run(tmp_path)
    with (rd / "train.log").open("a") as f:
        f.write(f"checkpoint step-40 committed {evil}\n")
    assert R.main(str(rd), None) == 0
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\r" not in out.out and "\u202e" not in out.out
    page = (rd / "report.html").read_text()
    assert "\x1b" not in page and "\u202e" not in page and "\\x1b" in page
    # in plan.json the name's pattern refuses it, and the refusal line is escaped too
    rd2 = _run(tmp_path / "b", name="run" + evil)
    assert R.main(str(rd2), None) == 3
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\u202e" not in out.err and "\r" not in out.err
    # a string the schema lets through is still shown escaped


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["metrics.jsonl", "train.log", "plan.json"])
def test_a_fifo_in_the_run_dir_does_not_hang(tmp_path, name):
    rd = _run(tmp_path)
    (rd / name).unlink()
    os.mkfifo(rd / name)
    code, out, err = _report(rd, timeout=20)
    assert code == 3 and "FIFO" in _one_line_err(err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_at_report_html_is_refused(tmp_path):
    rd = _run(tmp_path)
    os.mkfifo(rd / "report.html")
    code, out, err = _report(rd, timeout=20)
    assert code == 3 and "FIFO" in _one_line_err(err)


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*/plan.json")), ids=lambda p: p.parent.name)
def test_every_golden_plan_loads_through_load_plan(path):
    plan = P.load_plan(str(path))
    assert P.dumps(plan) == path.read_text()


def test_fixture_and_older_plans_load(tmp_path):
    P.load_plan(str(RUN / "plan.json"))
    d = json.loads((GOLDEN / "tiny_chat/plan.json").read_text())
    d["tracking"] = {"tensorboard": True, "wandb_project": "p", "wandb_entity": None, "wandb_name": "n",
                     "wandb_mode": "online", "wandb_tags": ["a", "b"]}
    (tmp_path / "plan.json").write_text(json.dumps(d))
    assert P.load_plan(str(tmp_path / "plan.json")).tracking.wandb.project == "p"


def test_plan_json_symlink_and_oversize_are_refused(tmp_path):
    (tmp_path / "plan.json").symlink_to(GOLDEN / "tiny_chat/plan.json")
    with pytest.raises(P.UserError, match="symbolic link"):
        P.load_plan(str(tmp_path / "plan.json"))
    big = tmp_path / "big.json"
    big.write_text(" " * (P.PLAN_MAX_BYTES + 1))
    with pytest.raises(P.UserError, match="bytes"):
        P.load_plan(str(big))
