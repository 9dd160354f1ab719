"""The whole pipeline as one function: recipe dict -> Plan -> Bundle {path: bytes}.

load -> validate -> model -> mesh -> placements -> estimate -> plan -> render, one module per
stage (the plan stage is compiler/plan.py). Each stage returns its value or Err; the first
stage that fails stops the pipeline (later stages need its value), but every stage reports
all of its own errors at once.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.compiler.estimate import Estimate, check_memory, estimate
from meshbake.compiler.mesh import MeshSpec, resolve_mesh
from meshbake.compiler.model import ModelSpec, model_spec
from meshbake.compiler.placements import Placements, resolve_placements
from meshbake.compiler.plan import build_plan, versions
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import plan as P


@dataclass(frozen=True)
class Resolved:
    recipe: Recipe
    model: ModelSpec
    mesh: MeshSpec
    placements: Placements
    estimate: Estimate
    plan: P.Plan


@dataclass(frozen=True)
class Bundle:
    resolved: Resolved
    files: Mapping[str, bytes]     # relative path -> content, sorted


def resolve(recipe: Recipe, model_config: Mapping[str, Any], source: str) -> Result[Resolved]:
    model = model_spec(model_config, source)
    if isinstance(model, Err):
        return model
    mesh = resolve_mesh(recipe, model)
    if isinstance(mesh, Err):
        return mesh
    pl = resolve_placements(recipe, model, mesh)
    if isinstance(pl, Err):
        return pl
    est = check_memory(estimate(recipe, model, mesh, pl), recipe, mesh)
    if isinstance(est, Err):
        return est
    return Resolved(recipe=recipe, model=model, mesh=mesh, placements=pl, estimate=est,
                    plan=build_plan(recipe, model, mesh, pl, est, versions()))


def resolve_dict(d: Mapping[str, Any]) -> Result[Resolved]:
    """Validated-or-not recipe dict -> Resolved (reads the model config.json / catalog)."""
    from meshbake.compiler import load
    from meshbake.compiler import validate as validate_mod

    recipe, errs = validate_mod.validate_all(dict(d))
    if recipe is None:
        return Err(tuple(errs))
    cfg = load.read_model_config(recipe.model.config)
    if not isinstance(cfg, Err):
        errs = tuple(errs) + load.tokenizer_errors(recipe.data.format, recipe.data.tokenizer, cfg)
    res = cfg if isinstance(cfg, Err) else resolve(recipe, cfg, recipe.model.config)
    if isinstance(res, Err):
        return Err(tuple(errs) + res.errors)
    return Err(tuple(errs)) if errs else res


def compile_recipe(text: str, overrides: tuple[str, ...] = (), cluster: str | None = None,
                   source: str = "<recipe>") -> Result[Bundle]:
    """Recipe text -> Bundle, without writing anything (tests call this)."""
    from meshbake.compiler.render import render_bundle

    res = resolve_text(text, overrides, cluster, source)
    if isinstance(res, Err):
        return res
    return Bundle(res, render_bundle(res))


def resolve_text(text: str, overrides: tuple[str, ...] = (), cluster: str | None = None,
                 source: str = "<recipe>") -> Result[Resolved]:
    """Recipe text -> Resolved or Err (no rendering)."""
    from meshbake.compiler import load

    d = load.recipe_from_text(text, source, tuple(overrides), cluster)
    return d if isinstance(d, Err) else resolve_dict(d)


__all__ = ["Bundle", "Resolved", "RecipeError", "compile_recipe", "resolve", "resolve_dict", "resolve_text", "build_plan"]
