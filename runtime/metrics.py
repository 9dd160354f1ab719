"""Per-step metrics: one JSON line in <run_dir>/metrics.jsonl and one console line (rich).

MFU = FLOPs per token (runtime/flops.py, the number the compiler wrote into plan.json and
PLAN.md: one formula for both) x tokens/s per device / the device's peak.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import safeio
from .flops import dense_from_config
from .plan import Plan

# dense bf16 peak per device (vendor datasheets, no sparsity)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "B200": 2250e12}


def flops_per_token(plan: Plan) -> float:
    """The compiler's number (MoE active experts and LoRA's backward need model facts the plan
    does not carry); a plan written without it: the dense formula from the config."""
    fpt = plan.estimate.get("flops_per_token")
    if fpt:
        return float(fpt)
    return float(dense_from_config(plan.model.config, plan.model.num_params, plan.model.tie_word_embeddings,
                                   plan.train.seq_len))


def peak_flops(device: torch.device) -> float | None:
    """Per-device peak: MESHBAKE_PEAK_TFLOPS wins; CUDA by device name; CPU unknown -> None."""
    env = os.environ.get("MESHBAKE_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """This rank's peak tensor memory since the last call (the steps of one log line), then reset.
    CUDA: the caching allocator's own counters (allocated = live tensors, what the plan's
    estimate predicts; reserved = what the allocator holds from the driver, fragmentation
    included). CPU: None. There is no allocator counter, and the process RSS high-water mark
    (interpreter, libraries, freed pages) says nothing about the plan's tensors."""
    if device.type != "cuda":
        return {"peak_mem_bytes": None, "peak_mem_reserved_bytes": None}
    out = {"peak_mem_bytes": torch.cuda.max_memory_allocated(device),
           "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    torch.cuda.reset_peak_memory_stats(device)
    return out


class _Plain:
    """Console without rich: the markup stripped."""

    def print(self, msg: str) -> None:
        tags = r"(?<!\\)\[/?(?:(?:dim|bold|green|yellow|red|magenta|cyan)[^\]]*)?\]"
        print(re.sub(tags, "", msg).replace("\\[", "["), flush=True)


def duration(s: float) -> str:
    """Seconds -> '45s', '12m05s', '3h12m' (an ETA, not a timestamp)."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# train.log events the console highlights (the same prefixes compiler/report.py reads back)
EVENT_STYLES = ((re.compile(r"^checkpoint step-\d+ committed"), "CHECKPOINT", "green"),
                (re.compile(r"^resumed from "), "RESUMED", "cyan"),
                (re.compile(r"^stop signal"), "PREEMPTED", "magenta"),
                (re.compile(r"not finite|^checkpoint .*skipped"), "WARNING", "red"))


class MetricsLog:
    """Rank 0 writes metrics.jsonl (every record), train.log and the console; other ranks hold a
    disabled instance. Step lines show progress, percentage and ETA, and are rate-limited: at
    most one per MESHBAKE_CONSOLE_INTERVAL seconds (default 5; 0 = every logged step), the first
    and the last step always, so a fast run logging every step does not flood a Slurm .out file.
    Eval lines, checkpoints, resumes and preemptions are always printed, each on its own line."""

    def __init__(self, run_dir: Path, enabled: bool, plan: Plan | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.log = run_dir / "train.log"
        self.console = None
        self.trackers = None
        self.total = plan.train.steps if plan is not None else None
        self.interval = float(os.environ.get("MESHBAKE_CONSOLE_INTERVAL", "5") or 5)
        self.clock = clock
        self._start: tuple[float, int] | None = None      # (time, step) this process started counting from
        self._last_print = -math.inf
        self.escape = lambda m: m
        if enabled:
            try:     # rich for the console line where installed; a bundle needs only torch + transformers
                from rich.console import Console
                from rich.markup import escape

                self.console, self.escape = Console(file=sys.stdout, highlight=False, soft_wrap=True), escape
            except ImportError:
                self.console, self.escape = _Plain(), lambda m: m.replace("[", "\\[")
            if plan is not None and (plan.tracking.tensorboard or plan.tracking.wandb.project):
                from .tracking import Trackers  # imports tensorboard / wandb only when asked

                self.trackers = Trackers(plan, run_dir, self.info)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def _write(self, line: str) -> None:
        # one line, whatever the message holds: a newline from a plan name or a checkpoint dir
        # name must not start a line of its own (train.log may be a planted link to a .pth file:
        # append_text refuses that, printable is the second wall) and ESC must not reach a
        # terminal that `tail -f`s the log. A per-call open (no symlink followed, fstat regular)
        # costs about what the plain open("a") did.
        safeio.append_text(self.log, safeio.printable(line) + "\n")

    def info(self, msg: str) -> None:
        """A run event: train.log gets the message (control and format characters shown as
        escapes: no message of ours spans lines, so a line break in one came from disk or the
        plan); the console marks checkpoints, resumes, preemptions and warnings with a coloured tag."""
        if not self.enabled:
            return
        msg = safeio.printable(msg)
        tag = next(((t, c) for rx, t, c in EVENT_STYLES if rx.search(msg)), None)
        head = f"[bold {tag[1]}]{tag[0]:>10}[/]" if tag else "[dim]meshbake[/dim]"
        self.console.print(f"{head} {self.escape(msg)}")
        self._write(msg)

    def _progress(self, n: int, rec: dict[str, Any]) -> str:
        now = self.clock()
        if self._start is None:      # the first logged step of this process: its own time is the rate
            self._start = (now - float(rec.get("step_time_s") or 0.0), n - 1)
        t0, s0 = self._start
        if not self.total:
            return f"step {n}"
        rate = (now - t0) / max(1, n - s0)                       # seconds per step, this process
        pct = 100.0 * n / self.total
        return f"step {n}/{self.total} {pct:3.0f}%  eta {duration(rate * (self.total - n)):>6}"

    def step(self, rec: dict[str, Any]) -> None:
        """One record: metrics.jsonl always; the step line when due (rate-limited); an EVAL line
        whenever the record holds eval_* numbers (merged into a step record, or alone)."""
        if not self.enabled:
            return
        # json.dumps (ensure_ascii) escapes every control and non-ASCII character, U+2028 included:
        # a record is one line whatever it holds
        safeio.append_text(self.path, json.dumps(rec, sort_keys=True) + "\n")
        if self.trackers is not None:
            self.trackers.log(rec)
        n = int(rec["step"])
        if "loss" in rec:
            self._step_line(n, rec)
        evals = {k: v for k, v in sorted(rec.items()) if k.startswith("eval_") and v is not None}
        if evals:                 # the train loop merges eval numbers into that step's record
            text = "  ".join(f"{k[5:]} {v:.4f}" if isinstance(v, float) else f"{k[5:]} {v}" for k, v in evals.items())
            line = f"eval {n}" + (f"/{self.total}" if self.total else "") + f"  {text}"
            self.console.print(f"[bold yellow]{'EVAL':>10}[/] {self.escape(safeio.printable(line))}")
            self._write(line)

    def _step_line(self, n: int, rec: dict[str, Any]) -> None:
        head = self._progress(n, rec)
        now = self.clock()
        if not (now - self._last_print >= self.interval or n == self.total or self._last_print == -math.inf):
            return
        self._last_print = now
        mfu = f"{rec['mfu'] * 100:4.1f}%" if rec.get("mfu") is not None else "n/a"
        mem = f"{rec['peak_mem_bytes'] / 2**30:.2f} GiB" if rec.get("peak_mem_bytes") is not None else "n/a"
        ep = f"  epoch {rec['epoch']:.2f}" if rec.get("epoch") is not None else ""
        line = (f"{head}{ep}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  gnorm {rec['grad_norm']:.3f}  "
                f"{rec['tokens_per_s']:,.0f} tok/s ({rec['tokens_per_s_per_device']:,.0f}/dev)  mfu {mfu}  "
                f"mem {mem}")
        self.console.print(self.escape(line))
        self._write(line)
