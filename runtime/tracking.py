"""Experiment trackers fed by MetricsLog on rank 0: TensorBoard event files and Weights & Biases.

Both packages are optional: they are imported only when plan.tracking turns them on (preflight
refuses to start a run whose python lacks them), so a bundle with tracking off runs with torch +
transformers alone. Every numeric field of a metrics.jsonl record becomes a scalar: `loss` ->
`train/loss`, `eval_loss` -> `eval/loss`, at the record's optimizer step.

W&B: the run id is kept in <run_dir>/wandb-run-id, so a requeued or restarted job continues
the same W&B run (resume="allow") instead of starting a new one per preemption. Offline mode
writes <run_dir>/wandb/offline-run-*/ without any network; `wandb sync` uploads it later. The
API key is read by wandb from WANDB_API_KEY in the job's environment, never from the plan.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import safeio
from .errors import UserError
from .plan import Plan, plan_to_dict

# what _wandb_id writes (12 hex digits) and what W&B itself generates (8 of [a-z0-9]); anything
# else in the file was not written by meshbake
_WANDB_ID = re.compile(r"[a-z0-9]{1,64}")


def tag(key: str) -> str:
    """metrics.jsonl key -> tracker tag: eval_* under eval/, everything else under train/."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    return {tag(k): float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_config(plan: Plan) -> dict[str, Any]:
    """The plan summary as the run's config: everything but the per-module placement table
    and the full config.json (hundreds of keys nobody filters runs by)."""
    d = plan_to_dict(plan)
    d["tp"].pop("placements", None)
    cfg = d["model"].pop("config", {})
    d["model"].update({k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")})
    return d


def summary_text(plan: Plan) -> str:
    m, t = plan.mesh, plan.train
    text = (f"{plan.name}: {plan.model.source} ({plan.model.num_params:,} params), world {m.world} = "
            f"dp_replicate {m.dp_replicate} x dp_shard {m.dp_shard} x cp {m.cp} x tp {m.tp} on {m.nodes} x "
            f"{m.procs_per_node} {m.device}; {t.steps} steps x {t.global_batch_size} x {t.seq_len} tokens, "
            f"lr {t.lr:g} {t.lr_schedule}; lora rank {plan.lora.rank}")
    return safeio.printable(text)          # the name and source come from plan.json


def parse_wandb_id(text: str) -> str | None:
    """The id in a wandb-run-id file's text (one line, [a-z0-9]{1,64}), or None."""
    rid = text.strip()
    return rid if _WANDB_ID.fullmatch(rid) else None


def _wandb_id(run_dir: Path) -> str:
    """The W&B run id kept in run_dir/wandb-run-id (created on the first start). A symlink,
    FIFO or directory there, or text that is not an id, is refused: the id goes to wandb.init
    and into train.log, and a planted file is a sign the run dir is not this job's alone."""
    path = run_dir / "wandb-run-id"
    try:
        text = safeio.read_text_bounded(path, limit=256)
    except FileNotFoundError:
        rid = os.urandom(6).hex()
        # a fresh temp file renamed over the name: a crash never leaves an empty (refused) id file
        safeio.write_atomic(path, rid + "\n")
        return rid
    rid = parse_wandb_id(text)
    if rid is None:
        raise UserError(safeio.printable(path), "does not hold a W&B run id ([a-z0-9], at most 64 characters)",
                        "remove it (a new run id is then made), or use a run dir only you write to")
    return rid


class Trackers:
    """Open on rank 0 only (MetricsLog creates it when enabled)."""

    def __init__(self, plan: Plan, run_dir: Path, info: Callable[[str], None]):
        t = plan.tracking
        self.tb = self.wb = None
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = safeio.subdir(run_dir, "tensorboard")      # a planted link to elsewhere is refused
            self.tb = SummaryWriter(log_dir=str(tb_dir))
            self.tb.add_text("plan", summary_text(plan), 0)
            info(f"tensorboard: writing {tb_dir}")
        if t.wandb.project:
            os.environ.setdefault("WANDB_SILENT", "true")
            # outside the try below: a planted wandb/ link or wandb-run-id is the user's to fix
            # (exit 3), not a tracker hiccup to train through
            safeio.subdir(run_dir, "wandb")
            rid = _wandb_id(run_dir)
            try:
                import wandb

                wb = t.wandb
                self.wb = wandb.init(project=wb.project, entity=wb.entity, name=wb.name or plan.name,
                                     mode=wb.mode, dir=str(run_dir), id=rid, resume="allow",
                                     config=run_config(plan), tags=list(wb.tags))
                info(f"wandb: {wb.mode} run {self.wb.id} in project {wb.project}")
            except Exception as e:     # noqa: BLE001  a tracker must never stop a training job
                info(f"wandb: could not start ({type(e).__name__}: {e}); training continues without it")

    def log(self, rec: dict[str, Any]) -> None:
        vals, step = scalars(rec), int(rec["step"])
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()            # an event file complete after every logged step (jobs get killed)
        if self.wb is not None:
            self.wb.log(vals, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None
