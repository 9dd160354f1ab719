"""`meshbake report RUN_DIR [-o report.html]`: a run dir -> one self-contained HTML page + a terminal summary.

Reads what the runtime leaves in the run dir (docs/CONTRACTS.md): plan.json, metrics.jsonl
(one record per logged step; a step re-run after a resume appears twice, the later record
wins), train.log (the events: starts, resumes, checkpoints, preemptions). Plots are inline SVG
drawn here (no JavaScript, no CDN): the page opens offline and in a CI artifact viewer.
Pure functions from text to text; only `load_run` reads and `main` writes files.

Everything in a run dir is someone else's bytes (a shared or handed-over run, a requeued job's):
plan.json is read through runtime.plan.load_plan (schema-checked, size-capped, no symlink or
FIFO); metrics.jsonl and train.log are streamed through runtime.safeio.open_regular line by line,
a line longer than LINE_MAX skipped and counted, at most MAX_STEPS steps kept (decimated by a
doubling stride past that), so memory is bounded whatever their size; report.html is written with
safeio.write_atomic (a symlink planted at it, e.g. to a .pth file, is refused, not written
through); every string from those files goes through safeio.printable before the terminal and
through printable + html.escape into the page.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from meshbake.runtime.dims import tokens_per_step
from meshbake.runtime.errors import EXIT_USER, UserError, from_os_error
from meshbake.runtime.plan import Plan, load_plan
from meshbake.runtime.safeio import open_regular, printable, write_atomic

LINE_MAX = 64 << 10      # a metrics record is ~400 bytes, a train.log line < 1 KB: longer ones are not ours
MAX_STEPS = 4096         # steps kept for plots and the summary: a plot is 520 px wide; past it, decimated
MAX_KEYS = 64            # numeric keys kept per record (the runtime logs ~12)
MAX_EVENTS = 2000        # train.log events kept (the last ones): a checkpoint every 10 steps for 20k steps
EVENT_CHARS = 300        # an event's text as shown


def _h(s: object) -> str:
    """A string from a file of the run dir, for the page: control/format characters shown as
    escapes (printable), then HTML-escaped."""
    return html.escape(printable(s))

COLORS = {"train": "#1f77b4", "eval": "#d62728", "estimate": "#7f7f7f", "checkpoint": "#2ca02c",
          "resume": "#ff7f0e", "preemption": "#9467bd", "start": "#8c564b", "error": "#d62728"}


@dataclass(frozen=True)
class Event:
    kind: str          # start | resume | checkpoint | preemption | error | skipped | info
    step: int          # the optimizer step it happened at (0 = before the first step)
    text: str


@dataclass(frozen=True)
class Run:
    plan: Plan
    records: tuple[dict[str, Any], ...]     # one per step, the last one logged for it, by step
    relogged: int                           # steps logged more than once (re-run after a resume)
    events: tuple[Event, ...]
    preempted: bool                         # PREEMPTED present: stopped, waiting for the requeue
    notes: tuple[str, ...] = ()             # what was skipped reading the files (said once, in summary and page)


# ------------------------------------------------------------------------------ reading
_STEP_LINE = re.compile(r"^\s*step\s+(\d+)(?:/\d+)?\s")     # "step    12  loss" / "step 12/40 ..."
_EVENTS = ((re.compile(r"^ranks by host"), "start"), (re.compile(r"^resumed from step-(\d+)"), "resume"),
           (re.compile(r"^checkpoint step-(\d+) committed"), "checkpoint"),
           (re.compile(r"^stop signal: .* at step (\d+)"), "preemption"),
           (re.compile(r"not finite"), "error"), (re.compile(r"^checkpoint step-(\d+)(\.tmp)?: "), "skipped"))


def parse_events(log: str | Iterable[str]) -> tuple[Event, ...]:
    """train.log lines (its text, or its lines one by one) -> events, the last MAX_EVENTS of them;
    step lines only advance the current step."""
    out: deque[Event] = deque(maxlen=MAX_EVENTS)
    step = 0
    for line in (log.splitlines() if isinstance(log, str) else log):
        line = line.strip()
        m = _STEP_LINE.match(line)
        if m:
            step = int(m.group(1))
            continue
        for rx, kind in _EVENTS:
            m = rx.search(line)
            if m:
                at = int(m.group(1)) if m.groups() and m.group(1) else step
                if kind == "resume":
                    step = at
                if at >= 2**62:
                    break                  # a step number no run reaches: not an event of ours
                if kind == "resume":
                    step = at
                out.append(Event(kind, at, line[:EVENT_CHARS]))
                break
    return tuple(out)


def _record(raw: Any) -> dict[str, Any] | None:
    """One metrics.jsonl value -> the record kept: its step (an int in [0, 2**62)) and at most
    MAX_KEYS keys holding numbers or null (what the plots and the summary read; a key of a
    string, list or object is dropped, so a kept record is ~MAX_KEYS x 100 bytes at most);
    None if it is not a record of ours."""
    if not isinstance(raw, dict):
        return None
    s = raw.get("step")
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**62:
        return None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if len(out) >= MAX_KEYS:
            break
        if len(k) <= 64 and (v is None or isinstance(v, float)
                             or (isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63)):
            out[k] = v
    out["step"] = s
    return out


@dataclass(frozen=True)
class Metrics:
    records: tuple[dict[str, Any], ...]     # the last record of every kept step, by step
    relogged: int                           # kept steps logged more than once
    long_lines: int                         # lines longer than LINE_MAX, skipped
    bad_lines: int                          # lines that are no JSON record with a step, skipped
    stride: int                             # 1, or the decimation: only steps that are multiples of it kept


def _merge(old: dict[str, Any] | None, rec: dict[str, Any]) -> dict[str, Any]:
    """A step's record after rec: an eval record (eval_* keys, no loss) merges into it; a train
    record replaces it, keeping its eval_* keys."""
    if any(k.startswith("eval_") for k in rec) and "loss" not in rec:
        return {**(old or {"step": rec["step"]}), **rec}
    return {**rec, **{k: v for k, v in (old or {}).items() if k.startswith("eval_")}}


def parse_metrics(lines: str | Iterable[str | None]) -> Metrics:
    """metrics.jsonl (its text, or its lines; None = a line too long, counted) -> the last record
    of every step, sorted by step. Eval records (eval_* keys) are merged into their step's record.
    Memory is bounded: at most MAX_STEPS steps are held; one more and the stride doubles (only
    steps that are multiples of it are kept), so a run of 10**6 steps keeps every 256th
    (10**6 / 256 = 3907 <= 4096); the lowest and the highest step are kept besides (the
    summary's first and last loss)."""
    by_step: dict[int, dict[str, Any]] = {}
    seen: dict[int, int] = {}
    ends: dict[int, dict[str, Any]] = {}     # the lowest and the highest step seen, whatever the stride
    stride, long_lines, bad, relogged_dropped = 1, 0, 0, 0
    for line in (lines.splitlines() if isinstance(lines, str) else lines):
        if line is None:
            long_lines += 1
            continue
        if not line.strip():
            continue
        try:
            # NaN/Infinity are Python's json defaults, kept: the runtime logs a diverged loss as NaN
            # (series() drops non-finite values); RecursionError: "[[[[...", ValueError: an int of 5000 digits
            rec = _record(json.loads(line))
        except (ValueError, RecursionError):
            rec = None
        if rec is None:
            bad += 1
            continue
        s = rec["step"]
        if not ends or s <= min(ends) or s >= max(ends):
            ends[s] = _merge(ends.get(s), rec)
            lo, hi = min(ends), max(ends)
            for k in [k for k in ends if k not in (lo, hi)]:
                del ends[k]
        if s % stride:
            continue
        if "loss" in rec or not any(k.startswith("eval_") for k in rec):
            seen[s] = seen.get(s, 0) + 1
        by_step[s] = _merge(by_step.get(s), rec)
        while len(by_step) > MAX_STEPS:        # halve what is held: at most log2(2**62) = 62 times in all
            stride *= 2
            for k in [k for k in by_step if k % stride]:
                del by_step[k]
                relogged_dropped += seen.pop(k, 0) > 1
    by_step.update({k: v for k, v in ends.items() if k not in by_step})
    return Metrics(tuple(by_step[s] for s in sorted(by_step)),
                   relogged_dropped + sum(1 for n in seen.values() if n > 1), long_lines, bad, stride)


def read_lines(f: IO[bytes], limit: int = LINE_MAX) -> Iterator[str | None]:
    """The lines of a binary file, decoded (bad UTF-8 replaced), without their newline; None for a
    line longer than limit bytes, which is read in limit-sized pieces and dropped (never held
    whole). Reads no further than the file's size when opened: a file something keeps appending
    to still ends."""
    budget = os.fstat(f.fileno()).st_size
    while budget > 0:
        chunk = f.readline(limit + 1)
        if not chunk:
            return
        budget -= len(chunk)
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n") and budget > 0:   # the rest of the long line
                chunk = f.readline(limit + 1)
                budget -= len(chunk)
            yield None
            continue
        yield chunk.rstrip(b"\r\n").decode("utf-8", errors="replace")


def _present(path: Path) -> bool:
    """Something is at path (a symlink or FIFO too: open_regular then refuses it in one line)."""
    return os.path.lexists(path)


def load_run(run_dir: Path) -> Run:
    plan = load_plan(str(run_dir / "plan.json"))
    m, notes = run_dir / "metrics.jsonl", []
    met = Metrics((), 0, 0, 0, 1)
    if _present(m):
        with open_regular(m) as f:
            met = parse_metrics(read_lines(f))
    log = run_dir / "train.log"
    events: tuple[Event, ...] = ()
    long_log = 0
    if _present(log):
        with open_regular(log) as f:
            def counted(lines: Iterable[str | None]) -> Iterator[str]:
                nonlocal long_log
                for x in lines:
                    if x is None:
                        long_log += 1
                    else:
                        yield x
            events = parse_events(counted(read_lines(f)))
    kib = LINE_MAX >> 10
    for n, what in ((met.long_lines, f"metrics.jsonl lines longer than {kib} KiB"),
                    (met.bad_lines, "metrics.jsonl lines that are no record with a step"),
                    (long_log, f"train.log lines longer than {kib} KiB")):
        if n:
            notes.append(f"skipped {n:,} {what}")
    if met.stride > 1:
        notes.append(f"more than {MAX_STEPS:,} steps logged: every {met.stride}th step kept")
    return Run(plan, met.records, met.relogged, events, os.path.isfile(run_dir / "PREEMPTED"), tuple(notes))


# ---------------------------------------------------------------------------- numbers
def si(v: float) -> str:
    """3927.4 -> '3.93K', 2e-05 -> '2e-05', 0.41 -> '0.41'."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e3:
        for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
            if a >= div:
                return f"{v / div:.3g}{unit}"
    if a < 1e-2:
        return f"{v:.2g}"
    return f"{v:.3g}"


def _num(v: Any) -> float | None:
    """A number of plan.json's free-form estimate (any JSON there; only numbers are used)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def gib(v: float) -> str:
    return f"{v / 2**30:.2f} GiB" if v >= 2**28 else f"{v / 2**20:.1f} MiB"


def series(recs: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in recs if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def _median_after_warmup(pts: list[tuple[int, float]]) -> float | None:
    vals = [v for _, v in pts[2:]] or [v for _, v in pts]      # step 1-2 include warm-up / compilation
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------------------ plots
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 x 10^k.

    Ticks are k * step for the integers k from floor(lo / step) to ceil(hi / step): no float
    accumulation (t += step never moves t when step is below t's spacing: 1e16 + 1.0 == 1e16, and
    the old loop on losses 1e16 and 1e16 + 4 never ended), and since step >= (hi - lo) / n there
    are at most n + 2 of them. The step is also at least two float spacings of the larger end
    (1e16: ulp 2, step >= 4), so the ticks differ. Anything the arithmetic cannot serve (a
    non-finite end, a span that overflows, a step that underflows to 0) gets [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo <= 4 * math.ulp(max(abs(lo), abs(hi))):       # one value (or float-indistinguishable)
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    try:
        raw = max((hi - lo) / n, 2 * math.ulp(max(abs(lo), abs(hi))))
        mag = 10.0 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        k0, k1 = math.floor(lo / step), math.ceil(hi / step)
    except (ValueError, OverflowError, ZeroDivisionError):
        return [lo, hi]
    if not (math.isfinite(step) and step > 0) or k1 - k0 > n + 2:
        return [lo, hi]
    out = sorted({round(k * step, 12) for k in range(k0, k1 + 1)})
    return out if len(out) >= 2 and all(map(math.isfinite, out)) else [lo, hi]


@dataclass(frozen=True)
class Line:
    label: str
    color: str
    points: tuple[tuple[float, float], ...]
    dots: bool = False          # sparse series (eval): draw each point


def svg_chart(title: str, lines: Sequence[Line], fmt: Callable[[float], str] = si,
              hlines: Sequence[tuple[float, str, str]] = (), vmarks: Sequence[tuple[int, str]] = (),
              x_max: int | None = None, w: int = 520, h: int = 230, empty: str = "") -> str:
    """A line chart as an <svg> string: axes with round ticks, one polyline per series,
    horizontal reference lines (value, label, color), dashed vertical event marks (step, color)."""
    ml, mr, mt, mb = 64, 14, 30, 34
    pw, ph = w - ml - mr, h - mt - mb
    pts = [p for ln in lines for p in ln.points]
    if not pts:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">'
                f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" class="empty">'
                f'{_h(empty or title + ": no data")}</text></svg>')
    ys = [y for _, y in pts] + [v for v, _, _ in hlines]
    yt = nice_ticks(min(ys), max(ys))
    xt = nice_ticks(0, max(x_max or 0, max(x for x, _ in pts)), 6)
    y0, y1, x0, x1 = yt[0], yt[-1], xt[0], xt[-1]

    xs = x1 - x0 if math.isfinite(x1 - x0) and x1 > x0 else 1.0      # never 0 or inf (ticks are [lo, hi] at worst)
    ys_ = y1 - y0 if math.isfinite(y1 - y0) and y1 > y0 else 1.0

    def X(x: float) -> float:
        return ml + (x - x0) / xs * pw

    def Y(y: float) -> float:
        return mt + ph - (y - y0) / ys_ * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">',
           f'<text x="{ml}" y="18" class="title">{_h(title)}</text>']
    for t in yt:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
                   f'<text x="{ml - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" class="tick">{fmt(t)}</text>')
    for t in xt:
        out.append(f'<text x="{X(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{t:g}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{h - 3}" text-anchor="middle" class="tick">step</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="frame"/>')
    for step, color in vmarks:
        out.append(f'<line x1="{X(step):.1f}" x2="{X(step):.1f}" y1="{mt}" y2="{mt + ph}" stroke="{color}" '
                   f'class="mark"/>')
    for v, label, color in hlines:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="{color}" class="ref"/>'
                   f'<text x="{ml + pw - 4}" y="{Y(v) - 4:.1f}" text-anchor="end" class="tick" fill="{color}">'
                   f'{_h(label)}</text>')
    lx = ml + 6
    for ln in lines:
        if not ln.points:
            continue
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ln.points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{ln.color}" stroke-width="1.6"/>')
        if ln.dots or len(ln.points) == 1:
            out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.6" fill="{ln.color}"/>' for x, y in ln.points]
        out.append(f'<rect x="{lx}" y="{mt + 6}" width="10" height="3" fill="{ln.color}"/>'
                   f'<text x="{lx + 14}" y="{mt + 11}" class="legend">{_h(ln.label)}</text>')
        lx += 22 + 7 * len(ln.label)
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------ summary
def summary_lines(run: Run) -> list[str]:
    p, recs = run.plan, run.records
    m, t = p.mesh, p.train
    loss = series(recs, "loss")
    ev = series(recs, "eval_loss")
    tps, mfu, mem = series(recs, "tokens_per_s"), series(recs, "mfu"), series(recs, "peak_mem_bytes")
    last = recs[-1]["step"] if recs else 0
    kinds = [e.kind for e in run.events]
    # train.epochs: plan.json has no step count (the run resolved it from the prepared windows);
    # the records' epoch (samples consumed / windows) says how far it got
    epoch = _num(recs[-1].get("epoch")) if recs else None
    done = last >= t.steps if t.steps is not None else epoch is not None and epoch >= t.epochs
    out = [f"{p.name}: {p.model.source} ({si(p.model.num_params)} params), world {m.world} = dp_replicate "
           f"{m.dp_replicate} x dp_shard {m.dp_shard} x cp {m.cp} x tp {m.tp} on {m.nodes} x {m.procs_per_node} "
           f"{m.device}",
           (f"steps {last}/{t.steps}" if t.steps is not None else f"steps {last}")
           + (f" (epoch {epoch:.2f} of {t.epochs:g})" if epoch is not None and t.epochs is not None else "")
           + (" (preempted, waiting for the requeue)" if run.preempted else " done" if done else " (stopped early)")]
    if loss:
        lo = min(loss, key=lambda sv: sv[1])
        out[-1] += f"  loss {loss[0][1]:.4f} -> {loss[-1][1]:.4f} (min {lo[1]:.4f} at step {lo[0]})"
    if ev:
        out[-1] += f"  eval loss {ev[-1][1]:.4f} at step {ev[-1][0]}"
    med = _median_after_warmup(tps)
    line = f"tokens/s {med:,.0f} median ({med / m.world:,.0f} per device)" if med else "tokens/s -"
    mm = _median_after_warmup(mfu)
    line += f"  MFU {mm * 100:.1f}%" if mm is not None else "  MFU n/a"
    if mem:
        est = _num(p.estimate.get("total_bytes"))
        line += f"  peak mem {gib(max(v for _, v in mem))}" + (f" (plan estimate {gib(est)})" if est else "")
    else:
        line += "  peak mem n/a" + (" (not measured on CPU)" if m.device == "cpu" else "")
    out.append(line)
    counts = {k: kinds.count(k) for k in ("checkpoint", "resume", "preemption", "error")}
    counts["restart"] = max(0, kinds.count("start") - 1)
    out.append("events: " + ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in
                                      ((k, counts[k]) for k in ("checkpoint", "resume", "preemption", "restart",
                                                                "error")) if n or k != "error")
               + (f"; {run.relogged} steps re-run after a resume (the later record is plotted)"
                  if run.relogged else ""))
    out += [f"note: {n}" for n in run.notes]
    return out


# ----------------------------------------------------------------------------------- HTML
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1120px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-bottom:12px} pre.sum{background:#f6f8fa;padding:10px 12px;border-radius:6px;white-space:pre-wrap}
.grid2{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:10px 18px}
svg{background:#fff;border:1px solid #e3e3e3;border-radius:6px;max-width:100%;height:auto}
svg .title{font-weight:600;font-size:13px} svg .tick{font-size:10.5px;fill:#555} svg .legend{font-size:11px;fill:#333}
svg .grid{stroke:#eee} svg .frame{fill:none;stroke:#bbb} svg .mark{stroke-dasharray:3 3;stroke-width:1.2}
svg .ref{stroke-dasharray:6 3;stroke-width:1.2} svg .empty{fill:#999;font-size:12px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#555;font-weight:600} .k{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.ev td:first-child{white-space:nowrap}
"""


def _events_table(run: Run) -> str:
    rows = [f'<tr><td><span class="k" style="background:{COLORS.get(e.kind, "#999")}"></span>{e.kind}</td>'
            f"<td>{e.step}</td><td>{_h(e.text)}</td></tr>" for e in run.events if e.kind != "info"]
    if run.preempted:
        rows.append("<tr><td>preempted</td><td></td><td>PREEMPTED is present: the last run stopped after its "
                    "checkpoint and waits for the requeue</td></tr>")
    return ('<table class="ev"><tr><th>event</th><th>step</th><th>train.log</th></tr>' + "".join(rows)
            + "</table>") if rows else "<p>no events in train.log</p>"


def _plan_table(plan: Plan) -> str:
    m, t, e = plan.mesh, plan.train, plan.estimate
    rows = [("model", f"{plan.model.source} ({plan.model.architecture}, {plan.model.num_params:,} params)"),
            ("mesh", f"dp_replicate {m.dp_replicate} x dp_shard {m.dp_shard} x cp {m.cp} x tp {m.tp} = world "
                     f"{m.world} on {m.nodes} x {m.procs_per_node} {m.device} ({m.backend})"),
            ("tensor parallel", f"sequence_parallel {plan.tp.sequence_parallel}, "
                                f"loss_parallel {plan.tp.loss_parallel}"),
            ("batch", f"{t.global_batch_size} sequences x {t.seq_len} tokens = {tokens_per_step(t):,} "
                      f"tokens per step (micro {t.micro_batch_size} x grad_accum {t.grad_accum} x dp {m.dp})"),
            ("length", f"{t.steps} steps" if t.steps is not None else f"{t.epochs:g} epochs (steps from the prepared "
                       "data)"),
            ("optimizer", f"AdamW lr {t.lr:g} -> {t.min_lr:g} {t.lr_schedule}, warmup "
                          + (f"{t.warmup_ratio:g} of the steps" if t.warmup_ratio is not None else f"{t.warmup_steps}")
                          + ", "
                          f"weight_decay {t.weight_decay:g}, grad_clip {t.grad_clip:g}"),
            ("precision", f"weights {t.dtype}, compute {t.mixed_precision.param_dtype}, reduce "
                          f"{t.mixed_precision.reduce_dtype}; activation checkpointing {t.activation_checkpointing}"),
            ("lora", f"rank {plan.lora.rank} alpha {plan.lora.alpha:g} on {', '.join(plan.lora.targets)}"
             + (f", {plan.lora.quantize_base} base (QLoRA)" if plan.lora.quantize_base != "none" else "")
             if plan.lora.rank else "off (full fine-tuning)"),
            ("data", f"{plan.data.format} " + ", ".join(str(src.path) for src in plan.data.sources)),
            ("checkpoints", f"every {plan.checkpoint.every_steps or '-'} steps, {plan.checkpoint.per_epoch or '-'} per "
                            f"epoch, keep {plan.checkpoint.keep}, "
                            f"resume {plan.checkpoint.resume}")]
    terms = [(k.removesuffix("_bytes"), v) for k, v in sorted(e.items())
             if k.endswith("_bytes") and k not in ("total_bytes", "budget_bytes") and "comm" not in k
             and _num(v) is not None]
    if _num(e.get("total_bytes")):
        rows.append(("memory estimate", f"{gib(e['total_bytes'])} per rank of {gib(_num(e.get('budget_bytes')) or 0)} "
                     "budget: " + ", ".join(f"{k} {gib(v)}" for k, v in terms)))
    if plan.versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(plan.versions.items()))))
    return "<table>" + "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def charts(run: Run) -> list[str]:
    recs, plan = run.records, run.plan
    order = ("checkpoint", "resume", "preemption")       # a preemption's mark drawn over its checkpoint's
    marks = [(e.step, COLORS[e.kind]) for e in sorted((e for e in run.events if e.kind in order),
                                                       key=lambda e: order.index(e.kind))]
    xm = plan.train.steps
    est = _num(plan.estimate.get("total_bytes"))
    tps = series(recs, "tokens_per_s")
    return [
        svg_chart("loss", [Line("train", COLORS["train"], tuple(series(recs, "loss"))),
                           Line("eval", COLORS["eval"], tuple(series(recs, "eval_loss")), dots=True)],
                  vmarks=marks, x_max=xm),
        svg_chart("learning rate", [Line("lr", COLORS["train"], tuple(series(recs, "lr")))], vmarks=marks, x_max=xm),
        svg_chart("grad norm (before clipping)", [Line("grad norm", COLORS["train"], tuple(series(recs, "grad_norm")))],
                  hlines=[(plan.train.grad_clip, f"clip {plan.train.grad_clip:g}", COLORS["estimate"])]
                  if plan.train.grad_clip else (), vmarks=marks, x_max=xm),
        svg_chart("tokens/s (all ranks)", [Line("tokens/s", COLORS["train"], tuple(tps))], vmarks=marks, x_max=xm),
        svg_chart("MFU", [Line("MFU", COLORS["train"], tuple(series(recs, "mfu")))],
                  fmt=lambda v: f"{v * 100:.0f}%", vmarks=marks, x_max=xm,
                  empty="MFU not reported: no known peak FLOPs (set MESHBAKE_PEAK_TFLOPS)"),
        svg_chart("peak memory per rank, GiB",
                  [Line("measured", COLORS["train"],
                        tuple((s, v / 2**30) for s, v in series(recs, "peak_mem_bytes")))],
                  hlines=[(est / 2**30, f"plan estimate {gib(est)}", COLORS["estimate"])] if est else (),
                  vmarks=marks, x_max=xm, empty="peak memory not measured (CPU: no allocator counter)")]


def render_html(run: Run) -> str:
    p = run.plan
    legend = " ".join(f'<span class="k" style="background:{COLORS[k]}"></span>{k}'
                      for k in ("checkpoint", "resume", "preemption"))
    plots = "".join(f"<div>{c}</div>" for c in charts(run))
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>meshbake report: "
            f"{_h(p.name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>meshbake run report: {_h(p.name)}</h1>"
            f"<div class=\"sub\">{_h(p.model.source)} &middot; world {p.mesh.world} &middot; "
            f"{len(run.records)} logged steps</div>"
            f"<pre class=\"sum\">{chr(10).join(_h(x) for x in summary_lines(run))}</pre>"
            f"<h2>Metrics</h2><div class=\"sub\">dashed lines: {legend}</div><div class=\"grid2\">{plots}</div>"
            f"<h2>Events (train.log)</h2>{_events_table(run)}"
            f"<h2>Plan</h2>{_plan_table(p)}</body></html>\n")


def main(run_dir: str, out: str | None) -> int:
    """Exit 0; 2 when RUN_DIR holds no plan.json at all (not a run dir); 3 (EXIT_USER, one line)
    when a file of it is not one meshbake wrote (plan.json outside its schema, a symlink or FIFO
    where a file belongs, report.html a symlink) or the disk refuses."""
    rd = Path(run_dir)
    if not _present(rd / "plan.json"):
        print(f"meshbake report: {printable(run_dir)} is not a run dir (no plan.json); give the directory a run "
              "wrote (runs/<name> or MESHBAKE_RUN_DIR)", file=sys.stderr)
        return 2
    # a user-given -o is the user's choice of place, but its last component is still never followed
    # if it is a symlink (write_atomic refuses it): the same planted-link risk, one level up
    target = Path(out) if out else rd / "report.html"
    try:
        run = load_run(rd)
        write_atomic(target, render_html(run))
    except UserError as e:
        print(f"meshbake report: {printable(e)}", file=sys.stderr)
        return EXIT_USER
    except OSError as e:
        user = from_os_error(e)
        print(f"meshbake report: {printable(user) if user else printable(f'{e.filename or target}: {e.strerror}')}",
              file=sys.stderr)
        return EXIT_USER
    print("\n".join(printable(x) for x in summary_lines(run)))
    print(f"wrote {printable(target)}")
    return 0
