"""`meshbake report`: the recorded run tests/fixtures/run_tiny_demo (a real 2-process tiny_chat
run, see its SOURCE.md: 40 steps, eval every 10, checkpoints every 10, a rank killed at step 15
and restarted by torchrun from step-10, a SIGUSR1 preemption at step 26 and a relaunch that
resumed from step-26) becomes a self-contained HTML page and a terminal summary with the right
numbers and events."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

from meshbake.compiler.report import load_run, nice_ticks, parse_events, render_html, summary_lines

RUN = Path(__file__).parent / "fixtures" / "run_tiny_demo"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


def test_summary_counts_the_runs_real_events_and_numbers():
    run = load_run(RUN)
    recs = [json.loads(x) for x in (RUN / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 44 and len(run.records) == 40 and run.relogged == 4   # steps 11-14 ran twice
    # the later record of a re-run step wins (the run that went on)
    last14 = [r for r in recs if r["step"] == 14][-1]
    assert run.records[13] == last14
    kinds = [(e.kind, e.step) for e in run.events]
    assert [s for k, s in kinds if k == "checkpoint"] == [10, 20, 26, 30, 40]
    assert [s for k, s in kinds if k == "resume"] == [10, 26]
    assert [s for k, s in kinds if k == "preemption"] == [26]
    text = "\n".join(summary_lines(run))
    assert "steps 40/40 done" in text
    assert f"loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}" in text
    assert "5 checkpoints, 2 resumes, 1 preemption, 2 restarts" in text
    mfu = sorted(r["mfu"] for r in run.records[2:])
    assert f"MFU {mfu[len(mfu) // 2] * 100:.1f}%" in text            # median after warm-up
    assert f"eval loss {recs[-1]['eval_loss']:.4f} at step 40" in text
    assert "peak mem n/a (not measured on CPU)" in text


def test_html_is_self_contained_with_six_plots_and_the_event_table(tmp_path):
    page = render_html(load_run(RUN))
    p = _parse(page)
    names = [t for t, _ in p.tags]
    assert names.count("svg") == 6
    assert not {"script", "link", "img", "iframe"} & set(names)          # nothing fetched, nothing run
    assert not re.search(r"(src|href)=", page)
    assert re.findall(r"https?://[^\"]+", page) == ["http://www.w3.org/2000/svg"] * 6   # the SVG namespace only
    lines = [a["points"].split() for t, a in p.tags if t == "polyline"]
    assert len(lines[0]) == 40                  # loss: one vertex per step (re-run steps once)
    marks = [a for t, a in p.tags if t == "line" and a.get("class") == "mark"]
    assert len(marks) == 5 * (5 + 2 + 1)        # checkpoint, resume, preemption on each plot with data (memory: none)
    body = "".join(p.text)
    for s in ("resumed from step-26", "stop signal: saved at step 26", "checkpoint step-40 committed",
              "memory estimate", "dp_replicate 1 x dp_shard 1 x cp 1 x tp 2", "peak memory not measured",
              "chat data/chat/chatterbot_en.jsonl"):
        assert s in body, s


def test_eval_points_and_eval_only_records(tmp_path):
    run = load_run(RUN)
    evals = [(r["step"], r["eval_loss"]) for r in run.records if "eval_loss" in r]
    assert [s for s, _ in evals] == [10, 20, 30, 40] and evals[-1][1] < evals[0][1]
    assert len(re.findall(r'<circle [^>]*fill="#d62728"', render_html(run))) == 4      # one dot per eval
    run_dir = tmp_path / "run"                   # an eval-only record merges into its step
    shutil.copytree(RUN, run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 35, "eval_loss": 4.5}) + "\n")
    run = load_run(run_dir)
    assert run.records[34]["eval_loss"] == 4.5 and "loss" in run.records[34]
    assert len(re.findall(r'<circle [^>]*fill="#d62728"', render_html(run))) == 5


def test_train_log_parsing_and_ticks():
    ev = parse_events("ranks by host: a: [0]\nstep     3  loss 1\ncheckpoint step-3 committed\n"
                      "step     5  loss 1\nstep 5: loss nan, grad norm nan: not finite; stopping\n")
    assert [(e.kind, e.step) for e in ev] == [("start", 0), ("checkpoint", 3), ("error", 5)]
    for lo, hi in ((5.5, 8.4), (3e-4, 3e-3), (0.0, 5.6e3), (0.7, 0.7)):
        t = nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 12, (lo, hi, t)
        step = t[1] - t[0]
        assert all(abs((b - a) - step) < 1e-9 * max(1, abs(step)) for a, b in zip(t, t[1:]))
        mant = step / 10 ** __import__("math").floor(__import__("math").log10(step))
        assert any(abs(mant - m) < 1e-6 for m in (1, 2, 2.5, 5)), (step, mant)
    assert nice_ticks(0, 40, 6) == [0, 10, 20, 30, 40]


def test_cli_writes_the_page_and_refuses_a_non_run_dir(tmp_path, capsys):
    from meshbake.compiler.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(RUN), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!doctype html>")
    assert "steps 40/40 done" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run dir" in capsys.readouterr().err
