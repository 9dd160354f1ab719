"""Per-step metrics: one JSON line in <run_dir>/metrics.jsonl and one console line (rich).

MFU uses the PaLM / torchtitan count of training FLOPs per token:
    6 * N  +  12 * n_layers * hidden * seq_len
6N = forward (2N) + backward (4N) over the N matmul parameters (the input embedding is a
lookup, not a matmul, so it is excluded unless tied to lm_head); the second term is the
attention score and value matmuls (QK^T and AV: 2 matmuls x 2 FLOPs x T x hidden per layer
forward, x3 with backward), which N does not contain.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from runtime.plan import Plan

# dense bf16 peak per device (vendor datasheets, no sparsity)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "B200": 2250e12}


def flops_per_token(plan: Plan) -> float:
    c = plan.model.config
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    n = plan.model.num_params - (0 if plan.model.tie_word_embeddings else vocab * hidden)
    return 6 * n + 12 * layers * hidden * plan.train.seq_len


def peak_flops(device: torch.device) -> float | None:
    """Per-device peak: MESHBAKE_PEAK_TFLOPS wins; CUDA by device name; CPU unknown -> None."""
    env = os.environ.get("MESHBAKE_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return rss * 1024


class _Plain:
    def print(self, msg: str) -> None:
        print(msg.replace("[dim]", "").replace("[/dim]", ""), flush=True)


class MetricsLog:
    """Rank 0 writes; other ranks hold a disabled instance."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.log = run_dir / "train.log"
        self.console = None
        if enabled:
            try:     # rich for the console line where installed; a bundle needs only torch + transformers
                from rich.console import Console

                self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
            except ImportError:
                self.console = _Plain()

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
        mfu = f"{rec['mfu'] * 100:5.1f}%" if rec["mfu"] is not None else "  n/a"
        line = (f"step {rec['step']:>5}  loss {rec['loss']:8.4f}  lr {rec['lr']:.2e}  gnorm {rec['grad_norm']:7.3f}  "
                f"{rec['tokens_per_s']:>9,.0f} tok/s  {rec['tokens_per_s_per_device']:>8,.0f} tok/s/dev  "
                f"mfu {mfu}  mem {rec['peak_mem_bytes'] / 2**30:6.2f} GiB")
        if rec.get("eval_loss") is not None:
            line += f"  eval loss {rec['eval_loss']:.4f} ppl {rec['eval_ppl']:.2f}"
        self.console.print(line)
        with self.log.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
