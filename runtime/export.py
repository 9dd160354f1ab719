"""Consolidate a run's DCP checkpoint into a Hugging Face folder (config.json + safetensors).

    python -m runtime.export RUN_DIR [--step N] -o OUT      (also: meshbake export ...)

One process, no process group: DCP reads every shard of every rank and reassembles full
tensors, whatever mesh saved them. The output is written to OUT.tmp and renamed, so a failed
export never leaves a half folder; `AutoModelForCausalLM.from_pretrained(OUT)` loads it.

What it may delete: only a previous export (OUT holding meshbake-export.json and nothing that
file does not list) under --force, and a stale OUT.tmp of a killed export (it holds the
marker). OUT may not be, contain or lie inside the run dir or its checkpoint dir (compared
after resolving symlinks): `export runs/a -o runs --force` would delete the run it exports.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import EXIT_USER, UserError
from .lora import lora_scale, lora_targets
from .parallel import DTYPES, hf_config
from .plan import load_plan
from .roles import plan_roles


def _adapter_slots(model, plan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{fqn: (lora_A (r x in), lora_B (out x r))} for a LoRA run's targets, empty otherwise;
    the checkpoint holds them beside the frozen base weights (runtime/lora.py)."""
    lo = plan.lora
    if not lo.rank:
        return {}
    dtype = DTYPES[plan.train.dtype]
    return {fqn: (torch.empty(lo.rank, m.in_features, dtype=dtype), torch.empty(m.out_features, lo.rank, dtype=dtype))
            for fqn, m in lora_targets(model, plan)}


def _merge_adapters(model, adapters: dict, scale: float) -> None:
    """W <- W + s B A: the exported folder is a plain HF model, what the LoRA run computed."""
    for fqn, (a, b) in adapters.items():
        model.get_submodule(fqn).weight.add_(scale * (b @ a))


MARKER = "meshbake-export.json"      # {"files": [...], "step": N}: what this export wrote


def _related(a: Path, b: Path) -> bool:
    """a is b, inside b, or contains b (both already resolved)."""
    return a == b or a in b.parents or b in a.parents


def _is_previous_export(d: Path) -> bool:
    """d holds a meshbake-export.json listing every file in d, and no directories."""
    try:
        listed = set(json.loads((d / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.is_file() and not p.is_symlink() and (p.name in listed or p.name == MARKER) for p in d.iterdir())


def _is_export_tmp(d: Path) -> bool:
    """A killed export's temp folder: the marker (written first) and plain files only."""
    try:
        json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(p.is_file() and not p.is_symlink() for p in d.iterdir())


def check_out(run_dir: Path, ckpt_dir: Path, out: Path, force: bool) -> tuple[Path, Path]:
    """-> (out, tmp) resolved, or a UserError. Nothing is deleted here."""
    out = out.resolve()
    tmp = out.with_name(out.name + ".tmp")
    for mine, what in ((run_dir.resolve(), "the run dir"), (ckpt_dir.resolve(), "the checkpoint dir")):
        for o in (out, tmp):
            if _related(o, mine):
                raise UserError(o, f"is, contains or is inside {what} {mine}, which --force or the export's "
                                   "temp folder would delete", "give an -o outside the run, e.g. hf/<name>")
    if out.exists() and not out.is_dir():
        raise UserError(out, "exists and is not a directory", "choose a new -o")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(out, "exists and is not empty", "choose a new -o, or pass --force to replace a "
                                                            "previous export")
        if not _is_previous_export(out):
            raise UserError(out, f"is not a previous meshbake export (no {MARKER} listing all its files), and "
                                 "--force replaces only those", "choose a new -o, or remove it yourself")
    if tmp.exists() and not (tmp.is_dir() and (_is_export_tmp(tmp) or not any(tmp.iterdir()))):
        raise UserError(tmp, "exists and holds files meshbake did not write (the export's temp folder)",
                        "remove or rename it, or choose another -o")
    return out, tmp


def _hf_order(model, plan) -> None:
    """Fused projections and experts were trained in meshbake's row order (runtime/fused.py;
    adapters merged above in that order too): write HF's order back."""
    from .fused import param_layouts, to_hf

    params = dict(model.named_parameters())
    for name, kind in param_layouts(plan.model.layouts).items():
        if name in params:
            params[name].copy_(to_hf(kind, params[name], model.config))


def export(run_dir: Path, step: int | None, out: Path, force: bool = False) -> Path:
    from transformers import AutoModelForCausalLM

    if not (run_dir / "plan.json").is_file():
        raise UserError(run_dir, "is not a run dir (no plan.json)",
                        "give the directory the run wrote its metrics and checkpoints to, e.g. runs/<name>")
    plan = load_plan(str(run_dir / "plan.json"))
    root = ckpt.ckpt_root(run_dir, plan.checkpoint.dir)
    found = dict(ckpt.list_checkpoints(root, lambda s: print(f"meshbake export: {s}", file=sys.stderr)))
    if not found:
        raise UserError(root, "holds no committed checkpoint",
                        "export after the run has saved one (checkpoint.every), or give the run dir that did")
    if step is not None and step not in found:
        raise UserError(root, f"holds no committed step-{step}", f"pass --step one of {sorted(found)}")
    out, tmp = check_out(run_dir, root, out, force)
    path = found[step if step is not None else max(found)]
    problem = ckpt.verify(path)          # never write corrupted weights as a clean HF folder
    if problem is not None:
        earlier = sorted(s for s in found if s < int(path.name.split("-")[1]))
        raise UserError(path, f"failed verification: {problem}",
                        f"export an earlier step with --step N (committed: {earlier})" if earlier
                        else "no earlier committed step to export; the run must save again")
    cfg = hf_config(plan.model.config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[plan.train.dtype])
    sd = {"model": model.state_dict()}
    adapters = _adapter_slots(model, plan)
    for fqn, (a, b) in adapters.items():
        sd["model"][f"{fqn}.lora_A"], sd["model"][f"{fqn}.lora_B"] = a, b
    # a tied lm_head.weight is the embedding: whichever key the checkpoint holds fills both
    ckpt.load_dcp(sd, path, allow_partial_load=plan_roles(plan).tied)
    for fqn in adapters:
        del sd["model"][f"{fqn}.lora_A"], sd["model"][f"{fqn}.lora_B"]
    model.load_state_dict(sd["model"])
    if adapters:
        _merge_adapters(model, adapters, lora_scale(plan.lora))
    _hf_order(model, plan)
    step_n = int(path.name.split("-")[1])
    if tmp.exists():                     # a killed export's (check_out: marker or empty)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # the marker first: a killed export leaves a tmp that the next export may remove
    (tmp / MARKER).write_text(json.dumps({"files": [], "step": step_n}) + "\n")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok = Path(plan.data.tokenizer) if plan.data.tokenizer else None
    if tok is not None and tok.is_dir():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    (tmp / MARKER).write_text(json.dumps({"files": files, "step": step_n}, indent=1) + "\n")
    if out.exists():
        # check_out proved it empty or a previous export; re-checked against a race
        if any(out.iterdir()) and not _is_previous_export(out):
            raise UserError(out, "changed during the export", "run it again")
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"meshbake export: {path} -> {out} ({sum(p.numel() for p in model.parameters()):,} params)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="meshbake export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest committed)")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    args = ap.parse_args(argv)
    try:
        with torch.no_grad():          # scoped: `meshbake export` runs in-process from the CLI and tests
            export(Path(args.run_dir), args.step, Path(args.out), args.force)
    except UserError as e:
        print(f"meshbake export: {e}", file=sys.stderr)
        return EXIT_USER
    return 0


if __name__ == "__main__":
    sys.exit(main())
