"""The rank-0 console (runtime/metrics.py MetricsLog): progress with percentage and ETA,
rate-limited step lines, one line per eval, tagged lines for checkpoints, resumes and
preemptions; metrics.jsonl keeps every record whatever the console shows."""
from __future__ import annotations

import json
import re

import pytest
from meshbake.compiler.pipeline import compile_recipe
from meshbake.runtime.metrics import MetricsLog, duration
from meshbake.runtime.plan import from_dict

from tests.helpers import ROOT


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def plan():
    b = compile_recipe((ROOT / "recipes/tiny_cpu.yaml").read_text(), overrides=("train.steps=40",), source="t")
    return from_dict(json.loads(b.files["plan.json"]))


def _rec(n: int, step_time: float = 2.0) -> dict:
    return {"step": n, "loss": 8.0 - n * 0.05, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": step_time,
            "tokens_per_s": 1000.0, "tokens_per_s_per_device": 250.0, "mfu": None, "peak_mem_bytes": 2**29}


def _steps(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/40", out, re.M)]


def test_progress_percent_and_eta_from_the_measured_rate(tmp_path, plan, capsys, monkeypatch):
    monkeypatch.setenv("MESHBAKE_CONSOLE_INTERVAL", "0")
    clock = Clock()
    log = MetricsLog(tmp_path, True, plan, clock=clock)
    for n in range(1, 11):           # 2 s per step
        clock.t += 2.0
        log.step(_rec(n))
    out = capsys.readouterr().out
    assert _steps(out) == list(range(1, 11))
    last = out.strip().splitlines()[-1]
    # 10 of 40 steps at 2 s each: 25%, 30 steps left x 2 s = 60 s
    assert last.startswith("step 10/40  25%  eta  1m00s  loss 7.5000"), last
    assert "1,000 tok/s (250/dev)" in last and "mfu n/a" in last and "mem 0.50 GiB" in last


def test_step_lines_rate_limited_but_metrics_keep_every_record(tmp_path, plan, capsys, monkeypatch):
    monkeypatch.delenv("MESHBAKE_CONSOLE_INTERVAL", raising=False)      # default: one line per 5 s
    clock = Clock()
    log = MetricsLog(tmp_path, True, plan, clock=clock)
    for n in range(1, 41):           # 0.5 s per step: 20 s in all
        clock.t += 0.5
        log.step(_rec(n, 0.5))
    out = capsys.readouterr().out
    # first step, then every 10th step (5 s / 0.5 s), and the last step always
    assert _steps(out) == [1, 11, 21, 31, 40]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 40
    assert _steps((tmp_path / "train.log").read_text()) == [1, 11, 21, 31, 40]


def test_eval_and_events_always_printed_on_their_own_lines(tmp_path, plan, capsys, monkeypatch):
    monkeypatch.delenv("MESHBAKE_CONSOLE_INTERVAL", raising=False)
    clock = Clock()
    log = MetricsLog(tmp_path, True, plan, clock=clock)
    log.step(_rec(1))
    log.step(_rec(2))                                   # within 5 s: no step line
    log.step({"step": 2, "eval_loss": 6.25, "eval_ppl": 518.0})   # an eval record alone
    log.info("checkpoint step-2 committed")
    log.info("stop signal: saved at step 2, exiting for requeue")
    log.info("resumed from step-2 (saved on world 4), continuing at step 3")
    log.info("ranks by host: vm: [0, 1, 2, 3]")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 1/40") and not any(x.startswith("step 2/40") for x in out)
    assert out[1].split() == ["EVAL", "eval", "2/40", "loss", "6.2500", "ppl", "518.0000"]
    assert out[2].split()[0] == "CHECKPOINT" and out[3].split()[0] == "PREEMPTED" and out[4].split()[0] == "RESUMED"
    assert out[5] == "meshbake ranks by host: vm: [0, 1, 2, 3]"      # brackets survive rich markup
    log_lines = (tmp_path / "train.log").read_text().splitlines()
    assert "checkpoint step-2 committed" in log_lines and "eval 2/40  loss 6.2500  ppl 518.0000" in log_lines
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1] == {"step": 2, "eval_loss": 6.25, "eval_ppl": 518.0}


def test_eval_merged_into_a_step_record_gets_its_own_line(tmp_path, plan, capsys, monkeypatch):
    """runtime/train.py merges evaluate()'s numbers into the step's record."""
    monkeypatch.delenv("MESHBAKE_CONSOLE_INTERVAL", raising=False)
    log = MetricsLog(tmp_path, True, plan, clock=Clock())
    log.step(_rec(1))
    log.step({**_rec(2), "eval_loss": 6.5, "eval_ppl": 665.1, "eval_tokens": 4096})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("step 1/40")          # step 2's line is rate-limited
    assert out[1].split() == ["EVAL", "eval", "2/40", "loss", "6.5000", "ppl", "665.1000", "tokens", "4096"]


def test_the_report_reads_the_new_console_lines(tmp_path, plan, monkeypatch):
    from meshbake.compiler.report import parse_events

    monkeypatch.setenv("MESHBAKE_CONSOLE_INTERVAL", "0")
    log = MetricsLog(tmp_path, True, plan, clock=Clock())
    for n in range(1, 4):
        log.step(_rec(n))
    log.info("step 3: loss nan, grad norm nan: not finite; stopping without a checkpoint")
    ev = parse_events((tmp_path / "train.log").read_text())
    assert [(e.kind, e.step) for e in ev] == [("error", 3)]


def test_duration():
    assert [duration(s) for s in (0, 45.4, 60, 725, 3600 * 3 + 720)] == ["0s", "45s", "1m00s", "12m05s", "3h12m"]
