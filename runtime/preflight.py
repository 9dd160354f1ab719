"""launch.sh runs this (stdlib only) before torchrun:  python -m runtime.preflight PLAN_JSON

Everything the plan needs from the machine it lands on, checked once with one clear line per
problem and exit 2, instead of a traceback from every rank: torch and transformers (and torchao
for a QLoRA plan) importable by this python, the data / tokenizer / weights paths present (they are
relative to the launch directory; a pinned Hugging Face Hub id is looked up in the cache when
HF_HUB_OFFLINE is set, which launch.sh sets for a plan with Hub ids unless the job's environment
says otherwise: every file the run reads from the pinned snapshot must be there, else one line
naming repo@sha, the file and the fix, `meshbake pull` of the bundle's recipe.yaml).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from . import hub
from .plan import Plan, load_plan
from .safeio import printable

# recipe key -> (repo type, what the runtime reads of the snapshot: runtime/hub.snapshot_problems)
_HUB_KINDS = {"data.tokenizer": ("model", "tokenizer"), "model.weights": ("model", "weights")}


def _hub_problems(key: str, ref: hub.HubRef, recipe: str) -> list[str]:
    repo_type, kind = _HUB_KINDS.get(key, ("dataset", "dataset"))
    fix = f"run `meshbake pull {recipe}` where the Hub is reachable, with the same HF_HUB_CACHE"
    folder = hub.cached_snapshot(ref, repo_type)
    if folder is None:
        return [f"{key}: {ref.text} is not in the Hugging Face cache (HF_HUB_CACHE={hub.cache_dir()}) and "
                f"HF_HUB_OFFLINE is set; {fix} (or `hf download {ref.repo} --revision {ref.revision}"
                f"{' --repo-type dataset' if repo_type == 'dataset' else ''}`)"]
    return [f"{key}: {ref.text}: {what} is not in the Hugging Face cache (HF_HUB_CACHE={hub.cache_dir()}) and "
            f"HF_HUB_OFFLINE is set; {fix}" for what in hub.snapshot_problems(folder, kind)]


def problems(plan: Plan, recipe: str = "BUNDLE/recipe.yaml") -> list[str]:
    """recipe: the bundle's recipe.yaml (what `meshbake pull` is told to fetch)."""
    out = []
    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            out.append(f"{sys.executable} cannot import {mod}; activate the training environment "
                       f"(cluster.env_setup) or set MESHBAKE_PYTHON")
    for on, mod in ((plan.tracking.tensorboard, "tensorboard"), (plan.tracking.wandb.project, "wandb")):
        if on and importlib.util.find_spec(mod) is None:
            out.append(f"tracking: {sys.executable} cannot import {mod}; pip install {mod} in the training "
                       f"environment, or turn it off in the recipe's tracking section")
    if plan.lora.rank and plan.lora.quantize_base != "none" and importlib.util.find_spec("torchao") is None:
        out.append(f"lora.quantize_base {plan.lora.quantize_base}: {sys.executable} cannot import torchao (its NF4Tensor "
                   "stores the 4-bit base); pip install 'meshbake[qlora]' (or torchao) in the training environment")
    d = plan.data
    one = len(d.sources) == 1 and not d.eval_sources
    srcs = [("data.path" if one else f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources)]
    srcs += [(f"data.eval_sources[{i}].path", s.path) for i, s in enumerate(d.eval_sources)]
    if d.format not in ("synthetic",) and importlib.util.find_spec("datasets") is None:
        out.append(f"{sys.executable} cannot import datasets (needed to prepare data.format {d.format}); "
                   f"pip install datasets, or run `meshbake prepare` where it is installed")
    for key, path in (*srcs, ("data.tokenizer", d.tokenizer), ("model.weights", plan.model.weights)):
        ref = hub.hub_ref(path)
        if ref is not None:        # a pinned Hub id: in the cache, or downloaded when the Hub is reachable
            if hub.offline():
                out += _hub_problems(key, ref, recipe)
            continue
        if path and not Path(path).exists():
            out.append(f"{key}: {path!r} not found (relative to the launch directory {os.getcwd()}); "
                       f"launch from the directory it is relative to, or fix the recipe and re-bundle")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = problems(load_plan(args[0]), str(Path(args[0]).parent / "recipe.yaml"))
    for p in found:
        print(f"meshbake: {printable(p)}", file=sys.stderr)      # a path or the cwd may hold a newline
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
