"""Per-step metrics: one JSON line in <run_dir>/metrics.jsonl and one console line (rich).

MFU = FLOPs per token (runtime/flops.py, the number the compiler wrote into plan.json and
PLAN.md: one formula for both) x tokens/s per device / the device's peak.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from runtime.flops import dense_from_config
from runtime.plan import Plan

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
    def print(self, msg: str) -> None:
        print(msg.replace("[dim]", "").replace("[/dim]", ""), flush=True)


class MetricsLog:
    """Rank 0 writes; other ranks hold a disabled instance."""

    def __init__(self, run_dir: Path, enabled: bool, plan: Plan | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.log = run_dir / "train.log"
        self.console = None
        self.trackers = None
        if enabled:
            try:     # rich for the console line where installed; a bundle needs only torch + transformers
                from rich.console import Console

                self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
            except ImportError:
                self.console = _Plain()
            if plan is not None and (plan.tracking.tensorboard or plan.tracking.wandb_project):
                from runtime.tracking import Trackers     # imports tensorboard / wandb only when asked

                self.trackers = Trackers(plan, run_dir, self.info)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        self.console.print(f"[dim]meshbake[/dim] {msg}")
        with self.log.open("a", encoding="utf-8") as f:
            f.write(msg + "\n")

    def step(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.trackers is not None:
            self.trackers.log(rec)
        mfu = f"{rec['mfu'] * 100:5.1f}%" if rec["mfu"] is not None else "  n/a"
        mem = f"{rec['peak_mem_bytes'] / 2**30:6.2f} GiB" if rec.get("peak_mem_bytes") is not None else "n/a"
        line = (f"step {rec['step']:>5}  loss {rec['loss']:8.4f}  lr {rec['lr']:.2e}  gnorm {rec['grad_norm']:7.3f}  "
                f"{rec['tokens_per_s']:>9,.0f} tok/s  {rec['tokens_per_s_per_device']:>8,.0f} tok/s/dev  "
                f"mfu {mfu}  mem {mem}")
        if rec.get("eval_loss") is not None:
            line += f"  eval loss {rec['eval_loss']:.4f} ppl {rec['eval_ppl']:.2f}"
        self.console.print(line)
        with self.log.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
