"""`meshbake report RUN_DIR [-o report.html]`: a run dir -> one self-contained HTML page + a terminal summary.

Reads what the runtime leaves in the run dir (docs/CONTRACTS.md): plan.json, metrics.jsonl
(one record per logged step; a step re-run after a resume appears twice, the later record
wins), train.log (the events: starts, resumes, checkpoints, preemptions). Plots are inline SVG
drawn here (no JavaScript, no CDN): the page opens offline and in a CI artifact viewer.
Pure functions from text to text; only `main` reads and writes files.
"""
from __future__ import annotations

import html
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshbake.runtime.dims import tokens_per_step
from meshbake.runtime.plan import Plan, from_dict

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


# ------------------------------------------------------------------------------ reading
_STEP_LINE = re.compile(r"^\s*step\s+(\d+)(?:/\d+)?\s")     # "step    12  loss" / "step 12/40 ..."
_EVENTS = ((re.compile(r"^ranks by host"), "start"), (re.compile(r"^resumed from step-(\d+)"), "resume"),
           (re.compile(r"^checkpoint step-(\d+) committed"), "checkpoint"),
           (re.compile(r"^stop signal: .* at step (\d+)"), "preemption"),
           (re.compile(r"not finite"), "error"), (re.compile(r"^checkpoint step-(\d+)(\.tmp)?: "), "skipped"))


def parse_events(log_text: str) -> tuple[Event, ...]:
    """train.log lines -> events; step lines only advance the current step."""
    out, step = [], 0
    for line in log_text.splitlines():
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
                out.append(Event(kind, at, line))
                break
    return tuple(out)


def parse_metrics(text: str) -> tuple[tuple[dict[str, Any], ...], int]:
    """metrics.jsonl -> the last record of every step, sorted by step; and how many steps repeat.
    Eval records (eval_* keys) are merged into their step's record."""
    by_step: dict[int, dict[str, Any]] = {}
    seen: dict[int, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        s = int(rec["step"])
        if any(k.startswith("eval_") for k in rec) and "loss" not in rec:
            by_step[s] = {**by_step.get(s, {"step": s}), **rec}
            continue
        seen[s] = seen.get(s, 0) + 1
        evals = {k: v for k, v in by_step.get(s, {}).items() if k.startswith("eval_")}
        by_step[s] = {**rec, **evals}
    return tuple(by_step[s] for s in sorted(by_step)), sum(1 for n in seen.values() if n > 1)


def load_run(run_dir: Path) -> Run:
    plan = from_dict(json.loads((run_dir / "plan.json").read_text(encoding="utf-8")))
    m = run_dir / "metrics.jsonl"
    recs, relogged = parse_metrics(m.read_text(encoding="utf-8")) if m.is_file() else ((), 0)
    log = run_dir / "train.log"
    events = parse_events(log.read_text(encoding="utf-8", errors="replace")) if log.is_file() else ()
    return Run(plan, recs, relogged, events, (run_dir / "PREEMPTED").is_file())


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
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 x 10^k."""
    if hi <= lo:
        lo, hi = lo - (abs(lo) * 0.1 or 1), hi + (abs(hi) * 0.1 or 1)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    t, out = math.floor(lo / step) * step, []
    while t < hi + step * 0.999:
        out.append(round(t, 12))
        t += step
    return out


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
                f'{html.escape(empty or title + ": no data")}</text></svg>')
    ys = [y for _, y in pts] + [v for v, _, _ in hlines]
    yt = nice_ticks(min(ys), max(ys))
    xt = nice_ticks(0, max(x_max or 0, max(x for x, _ in pts)), 6)
    y0, y1, x0, x1 = yt[0], yt[-1], xt[0], xt[-1]

    def X(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def Y(y: float) -> float:
        return mt + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">',
           f'<text x="{ml}" y="18" class="title">{html.escape(title)}</text>']
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
                   f'{html.escape(label)}</text>')
    lx = ml + 6
    for ln in lines:
        if not ln.points:
            continue
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ln.points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{ln.color}" stroke-width="1.6"/>')
        if ln.dots or len(ln.points) == 1:
            out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.6" fill="{ln.color}"/>' for x, y in ln.points]
        out.append(f'<rect x="{lx}" y="{mt + 6}" width="10" height="3" fill="{ln.color}"/>'
                   f'<text x="{lx + 14}" y="{mt + 11}" class="legend">{html.escape(ln.label)}</text>')
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
    out = [f"{p.name}: {p.model.source} ({si(p.model.num_params)} params), world {m.world} = dp_replicate "
           f"{m.dp_replicate} x dp_shard {m.dp_shard} x cp {m.cp} x tp {m.tp} on {m.nodes} x {m.procs_per_node} "
           f"{m.device}",
           f"steps {last}/{t.steps}" + (" (preempted, waiting for the requeue)" if run.preempted else
                                        " done" if last >= t.steps else " (stopped early)")]
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
        est = p.estimate.get("total_bytes")
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
            f"<td>{e.step}</td><td>{html.escape(e.text)}</td></tr>" for e in run.events if e.kind != "info"]
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
            ("optimizer", f"AdamW lr {t.lr:g} -> {t.min_lr:g} {t.lr_schedule}, warmup {t.warmup_steps}, "
                          f"weight_decay {t.weight_decay:g}, grad_clip {t.grad_clip:g}"),
            ("precision", f"weights {t.dtype}, compute {t.mixed_precision.param_dtype}, reduce "
                          f"{t.mixed_precision.reduce_dtype}; activation checkpointing {t.activation_checkpointing}"),
            ("lora", f"rank {plan.lora.rank} alpha {plan.lora.alpha:g} on {', '.join(plan.lora.targets)}"
             if plan.lora.rank else "off (full fine-tuning)"),
            ("data", f"{plan.data.format} " + ", ".join(str(src.path) for src in plan.data.sources)),
            ("checkpoints", f"every {plan.checkpoint.every_steps or '-'} steps, keep {plan.checkpoint.keep}, "
                            f"resume {plan.checkpoint.resume}")]
    terms = [(k.removesuffix("_bytes"), v) for k, v in sorted(e.items())
             if k.endswith("_bytes") and k not in ("total_bytes", "budget_bytes") and "comm" not in k]
    if e.get("total_bytes"):
        rows.append(("memory estimate", f"{gib(e['total_bytes'])} per rank of {gib(e.get('budget_bytes', 0))} "
                     "budget: " + ", ".join(f"{k} {gib(v)}" for k, v in terms)))
    if plan.versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(plan.versions.items()))))
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def charts(run: Run) -> list[str]:
    recs, plan = run.records, run.plan
    order = ("checkpoint", "resume", "preemption")       # a preemption's mark drawn over its checkpoint's
    marks = [(e.step, COLORS[e.kind]) for e in sorted((e for e in run.events if e.kind in order),
                                                       key=lambda e: order.index(e.kind))]
    xm = plan.train.steps
    est = plan.estimate.get("total_bytes")
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
            f"{html.escape(p.name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>meshbake run report: {html.escape(p.name)}</h1>"
            f"<div class=\"sub\">{html.escape(p.model.source)} &middot; world {p.mesh.world} &middot; "
            f"{len(run.records)} logged steps</div>"
            f"<pre class=\"sum\">{html.escape(chr(10).join(summary_lines(run)))}</pre>"
            f"<h2>Metrics</h2><div class=\"sub\">dashed lines: {legend}</div><div class=\"grid2\">{plots}</div>"
            f"<h2>Events (train.log)</h2>{_events_table(run)}"
            f"<h2>Plan</h2>{_plan_table(p)}</body></html>\n")


def main(run_dir: str, out: str | None) -> int:
    rd = Path(run_dir)
    if not (rd / "plan.json").is_file():
        print(f"meshbake report: {run_dir} is not a run dir (no plan.json); give the directory a run wrote "
              "(runs/<name> or MESHBAKE_RUN_DIR)", file=sys.stderr)
        return 2
    try:
        run = load_run(rd)
    except (ValueError, KeyError) as e:
        print(f"meshbake report: cannot read {run_dir} ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    target = Path(out) if out else rd / "report.html"
    try:
        target.write_text(render_html(run), encoding="utf-8")
    except OSError as e:
        print(f"meshbake report: cannot write {target} ({e.strerror})", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(run)))
    print(f"wrote {target}")
    return 0
