"""Distributed checkpoints (torch.distributed.checkpoint): atomic, resumable on another mesh.

Layout under <run_dir>/<checkpoint.dir>/:
    step-40/             a committed checkpoint: DCP shards + .metadata, train_state.json,
                         rng-rank<r>.pt, COMMITTED (written last, before the rename)
    step-50.tmp/         being written, or left behind by a killed writer: never resumed from
    step-40.old/         the previous copy of a step saved again, renamed aside for the commit
                         and removed after it; never resumed from
Commit protocol: every rank writes its DCP shards into step-N.tmp -> barrier -> rank 0 writes
train_state.json and COMMITTED, fsyncs, renames step-N.tmp -> step-N -> barrier. A crash at
any point before the rename leaves only a .tmp directory; the previous step-M is untouched.

Model and optimizer go through get_state_dict/set_state_dict, whose keys are the model's own
fqns whatever the FSDP/TP wrapping: a checkpoint saved on dp_shard 4 loads on dp_shard 2 x
tp 2 (DCP reshards on load). RNG states are per rank and restored only on the same world size.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

COMMITTED = "COMMITTED"
_STEP = re.compile(r"^step-(\d+)$")


def ckpt_root(run_dir: Path, dir_: str) -> Path:
    p = Path(dir_)
    return p if p.is_absolute() else run_dir / p


def list_checkpoints(root: Path, log: Callable[[str], None] = lambda s: None) -> list[tuple[int, Path]]:
    """Committed checkpoints, oldest first; incomplete ones are reported and skipped."""
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        m = _STEP.match(p.name)
        if p.name.endswith(".tmp"):
            log(f"checkpoint {p.name}: incomplete (writer stopped before commit), skipped")
        elif m and (p / COMMITTED).is_file():
            out.append((int(m.group(1)), p))
        elif m:
            log(f"checkpoint {p.name}: no {COMMITTED} marker, skipped")
    return sorted(out)


def find_resume(root: Path, resume: str, log: Callable[[str], None]) -> Path | None:
    """auto: the run's newest committed checkpoint. A path: where a NEW run starts from (a
    warm start, or another mesh's checkpoint); once this run has committed checkpoints of its
    own, a restart or a requeue continues from those (torchtitan's initial_load_path), or every
    preemption would throw the progress since that path away."""
    found = list_checkpoints(root, log)
    if resume == "never":
        if found:   # training on would prune and overwrite them, mixing two runs in one dir
            raise FileExistsError(f"checkpoint.resume: never, but {root} holds committed checkpoints "
                                  f"({', '.join(p.name for _, p in found)}) of an earlier run; set "
                                  f"MESHBAKE_RUN_DIR to a new run dir, or remove them")
        return None
    if found:
        if resume != "auto":
            log(f"checkpoint.resume {resume}: this run has its own {found[-1][1].name}, continuing from it")
        return found[-1][1]
    if resume == "auto":
        return None
    p = Path(resume)
    if not (p / COMMITTED).is_file():
        raise FileNotFoundError(f"checkpoint.resume: {resume} is not a committed checkpoint (no {COMMITTED})")
    return p


def _fsync_dir(p: Path) -> None:
    fd = os.open(str(p), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, model, optim, train_state: dict[str, Any], keep: int,
         fault: Callable[[str], None] = lambda where: None) -> Path:
    rank = dist.get_rank()
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(torch.get_rng_state(), tmp / f"rng-rank{rank}.pt")
    fault("save")                       # test hook: a rank dying mid-write
    dist.barrier()
    if rank == 0:
        state = dict(train_state, world=dist.get_world_size())
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        with open(tmp / COMMITTED, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        aside = root / f"step-{step}.old"
        if final.exists():               # the same step saved again (a resume from an older step)
            # renamed aside, never rmtree'd in place: a crash mid-rmtree could leave a step-N
            # that still has COMMITTED but lost shards, and resume would pick it
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optim) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    state = json.loads((path / "train_state.json").read_text())
    rng = path / f"rng-rank{dist.get_rank()}.pt"
    if state.get("world") == dist.get_world_size() and rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return state
