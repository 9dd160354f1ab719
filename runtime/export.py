"""Consolidate a run's DCP checkpoint into a Hugging Face folder (config.json + safetensors).

    python -m runtime.export RUN_DIR [--step N] -o OUT      (also: meshbake export ...)

One process, no process group: DCP reads every shard of every rank and reassembles full
tensors, whatever mesh saved them. The output is written to OUT.tmp and renamed, so a failed
export never leaves a half folder; `AutoModelForCausalLM.from_pretrained(OUT)` loads it.

What it may delete: only a previous export (OUT holding meshbake-export.json and nothing that
file does not list) under --force, and a stale OUT.tmp of a killed export (it holds the
marker). OUT may not be, contain or lie inside the run dir or its checkpoint dir (compared
after resolving symlinks): `export runs/a -o runs --force` would delete the run it exports.

What it writes: the model's save_pretrained into OUT.tmp (a folder this export created), the
data.tokenizer folder's tokenizer files (TOKENIZER_FILES) when each is a regular file, copied
through safeio (never a link: a tokenizer folder from elsewhere holding `tokenizer.model ->
~/.ssh/id_rsa` or `x -> /proc/self/environ` put the key and HF_TOKEN into the folder the user
uploads), and meshbake-export.json listing exactly those files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import safeio
from .errors import EXIT_USER, UserError
from .lora import ADAPTER_DTYPE, expert_targets, lora_scale, lora_targets
from .parallel import DTYPES, hf_config, quantized
from .plan import load_plan
from .roles import plan_roles


def _adapter_slots(model, plan) -> dict[str, tuple[str, torch.Tensor, str, torch.Tensor]]:
    """{W's parameter name: (lora_A key, A, lora_B key, B)} for a LoRA run's targets, empty
    otherwise: a Linear's lora_A (r x in) / lora_B (out x r), a grouped experts parameter's
    lora_A_<p> (E, r, in) / lora_B_<p> (E, out, r). The checkpoint holds them beside the frozen
    base weights (runtime/lora.py), in float32 (an older run's bf16 ones load into these too)."""
    lo = plan.lora
    if not lo.rank:
        return {}
    dtype, r = ADAPTER_DTYPE, lo.rank
    out = {f"{fqn}.weight": (f"{fqn}.lora_A", torch.empty(r, m.in_features, dtype=dtype),
                             f"{fqn}.lora_B", torch.empty(m.out_features, r, dtype=dtype))
           for fqn, m in lora_targets(model, plan)}
    for fqn, experts, name in expert_targets(model, plan):
        e, o, i = getattr(experts, name).shape
        mod = fqn.rpartition(".")[0]
        out[fqn] = (f"{mod}.lora_A_{name}", torch.empty(e, r, i, dtype=dtype),
                    f"{mod}.lora_B_{name}", torch.empty(e, o, r, dtype=dtype))
    return out


def _merge_adapters(model, adapters: dict, scale: float) -> None:
    """W <- W + s B A (per expert for grouped experts: (E, out, r) @ (E, r, in)): the exported
    folder is a plain HF model, what the LoRA run computed (x W^T + s x A^T B^T, runtime/lora.py),
    still in runtime row order (_hf_order follows). Summed in float32, rounded once to W's dtype."""
    for name, (_, a, _, b) in adapters.items():
        w = model.get_parameter(name)
        w.copy_(w.float() + scale * (b.float() @ a.float()))


def _qlora_base(model, plan) -> None:
    """The frozen base a QLoRA run computed with (runtime/quant.py): model.weights (or the seeded
    init), in runtime order, each LoRA target's weight replaced by its NF4 round trip (the same
    scaler blocks as the run's mesh). The adapters are then merged into that dequantized base and
    the folder is written in model.dtype (bfloat16 for a bf16 base): a plain HF model whose logits
    are the run's, loadable without torchao."""
    from .parallel import materialize
    from .quant import dequantized

    materialize(model, plan)
    shards = plan.mesh.fsdp if plan.mesh.fsdp_enabled else 1
    for _, m in lora_targets(model, plan):
        m.weight.copy_(dequantized(m.weight, shards))


MARKER = "meshbake-export.json"      # {"files": [...], "step": N}: what this export wrote
_MARKER_LIMIT = 1 << 20

# What a tokenizer's save_pretrained writes (fast and sentencepiece tokenizers, chat templates):
# only these are copied from data.tokenizer. An allow-list, not the folder: a model folder used
# as the tokenizer would overwrite the export's config.json and weights with the base model's,
# and a README, a tokenizer.py (auto_map: code) or a stray secret is not the tokenizer. Not the
# tokenizer library's own save either: transformers' save_pretrained copies a sentencepiece
# tokenizer.model with shutil.copyfile, which follows a link to anything.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
_TOKENIZER_LIMIT = 1 << 30           # a tokenizer.json of a 256k vocabulary is ~35 MB


def _related(a: Path, b: Path) -> bool:
    """a is b, inside b, or contains b (both already resolved)."""
    return a == b or a in b.parents or b in a.parents


def _is_previous_export(d: Path) -> bool:
    """d holds a meshbake-export.json listing every file in d, and no directories."""
    try:
        listed = set(json.loads(safeio.read_text_bounded(d / MARKER, _MARKER_LIMIT))["files"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return False
    return all(p.is_file() and not p.is_symlink() and (p.name in listed or p.name == MARKER) for p in d.iterdir())


def _is_export_tmp(d: Path) -> bool:
    """A killed export's temp folder: the marker (written first) and plain files only."""
    try:
        json.loads(safeio.read_text_bounded(d / MARKER, _MARKER_LIMIT))
    except (OSError, ValueError, UserError):
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
    if tmp.is_symlink():             # removing or writing it would act on wherever it points
        raise UserError(tmp, "is a symbolic link where the export's temp folder goes", "remove it, or choose another -o")
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


def copy_tokenizer(src: Path, dst: Path, log: Callable[[str], None]) -> list[str]:
    """The TOKENIZER_FILES of src that are regular files, copied into dst (a folder the caller
    created) through safeio: no link followed, no FIFO opened, bounded. -> the names written;
    what was left out is said in one line each (names through printable: they are src's)."""
    written, links = [], []
    for name in TOKENIZER_FILES:
        try:
            mode = os.lstat(src / name).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            links.append(f"{name} ({safeio._kind(mode)})")
            continue
        with safeio.open_regular(src / name, _TOKENIZER_LIMIT) as f:
            safeio.create_new(dst / name, f.read(_TOKENIZER_LIMIT + 1))
        written.append(name)
    if links:
        log(f"data.tokenizer {safeio.printable(src)}: not copied, not regular files: {', '.join(links)}; copy the "
            "files themselves into the folder (cp -L) if they are the tokenizer's")
    others = sorted(safeio.printable(n) for n in os.listdir(src) if n not in TOKENIZER_FILES)
    if others:
        log(f"data.tokenizer {safeio.printable(src)}: not copied, not tokenizer files: "
            f"{', '.join(others[:8])}{f' and {len(others) - 8} more' if len(others) > 8 else ''}")
    return written


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
    adapters = _adapter_slots(model, plan)
    if quantized(plan):
        _qlora_base(model, plan)
        sd = {"model": {k: t for ak, a, bk, b in adapters.values() for k, t in ((ak, a), (bk, b))}}
        ckpt.load_dcp(sd, path)          # a QLoRA checkpoint holds the adapters only (checkpoint._options)
    else:
        sd = {"model": model.state_dict()}
        for ak, a, bk, b in adapters.values():
            sd["model"][ak], sd["model"][bk] = a, b
        # a tied lm_head.weight is the embedding: whichever key the checkpoint holds fills both
        ckpt.load_dcp(sd, path, allow_partial_load=plan_roles(plan).tied)
        for ak, _, bk, _ in adapters.values():
            del sd["model"][ak], sd["model"][bk]
        model.load_state_dict(sd["model"])
    if adapters:
        _merge_adapters(model, adapters, lora_scale(plan.lora))
    _hf_order(model, plan)
    step_n = int(path.name.split("-")[1])
    if tmp.exists():                     # a killed export's (check_out: marker or empty, not a link)
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(tmp)                        # made here, now: nothing in it but what this export writes
    # the marker first: a killed export leaves a tmp that the next export may remove
    safeio.create_new(tmp / MARKER, json.dumps({"files": [], "step": step_n}) + "\n")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok = Path(_tokenizer_folder(plan.data.tokenizer)) if plan.data.tokenizer else None
    if tok is not None and tok.is_dir():
        copy_tokenizer(tok, tmp, lambda s: print(f"meshbake export: {s}", file=sys.stderr))
    files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    safeio.write_atomic(tmp / MARKER, json.dumps({"files": files, "step": step_n}, indent=1) + "\n")
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


def _tokenizer_folder(tokenizer: str) -> str:
    """data.tokenizer's folder: a pinned Hub id's snapshot (runtime/hub.py), or the path itself."""
    from . import hub

    try:
        return hub.local_folder(tokenizer, "model", hub.TOKENIZER_FILES)
    except hub.HubMiss:
        return tokenizer          # not here: nothing to copy (as a missing folder)
