"""Small builders shared by the compiler tests: a valid recipe as text, compiled in memory."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "name": "t",
    "model": {"config": "llama-3.1-8b"},
    "mesh": {"tp": 8},
    "cluster": {"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80},
    "train": {"seq_len": 4096, "global_batch_size": 8},
}


def recipe_text(**sections) -> str:
    """BASE with whole sections replaced/added, e.g. recipe_text(mesh={"tp": 4, "dp_shard": 2})."""
    d = {**BASE, **sections}
    return yaml.safe_dump(d, sort_keys=False)


def compile_(text: str, *overrides: str):
    from meshbake.compiler.pipeline import compile_recipe

    return compile_recipe(text, overrides=tuple(overrides))


def resolve(text: str, *overrides: str):
    """-> Resolved or Err (no rendering), through the CLI's own load chain."""
    from meshbake.compiler.pipeline import resolve_text

    return resolve_text(text, overrides, source="<test>")


def paths(err) -> list[str]:
    return [e.path for e in err.errors]
