"""The whole pipeline as one function: recipe dict -> Plan -> Bundle {path: bytes}.

load -> validate -> model -> mesh -> placements -> estimate -> plan -> render, one module per
stage (the plan stage is compiler/plan.py). Each stage returns its value or Err; the first
stage that fails stops the pipeline (later stages need its value), but every stage reports
all of its own errors at once. validate does not stop it: a field with an error is set aside
(validate.Validated) and the later stages run every check that does not read it (errors.reads).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result, reads, run, skipped
from meshbake.compiler.estimate import Estimate, checked_estimate
from meshbake.compiler.mesh import MeshSpec, resolve_mesh
from meshbake.compiler.model import ModelSpec, _type_errors, fact_errors, model_spec
from meshbake.compiler.placements import Placements, resolve_placements
from meshbake.compiler.plan import build_plan, data_plan, versions
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
    missing: tuple[str, ...] = ()     # what the run needs that is not here yet (compiler/hub.py; check's last line)
    weights: Any = None               # compiler/weights.WeightsCheck: model.weights' headers (None: random init)


@dataclass(frozen=True)
class Bundle:
    resolved: Resolved
    files: Mapping[str, bytes]     # relative path -> content, sorted


def resolve(recipe: Recipe, model_config: Mapping[str, Any], source: str,
            aside: frozenset[str] = frozenset()) -> Result[Resolved]:
    """The stages after validate. `aside`: fields validate set aside (their errors are already
    reported); the checks that read them are skipped, and without a mesh or an estimate to trust
    the pipeline stops with nothing more to say (Err(())). `meshbake prepare` needs none of this
    (resolve_data_dict)."""
    model = model_spec(model_config, source)
    if isinstance(model, Err):
        return model
    mesh = resolve_mesh(recipe, model, aside)
    if isinstance(mesh, Err):
        return mesh
    from meshbake.compiler.pp import resolve_pp

    pp = resolve_pp(recipe, model, mesh, aside)
    if isinstance(pp, Err):
        return pp
    pl = resolve_placements(recipe, model, mesh, aside)
    if isinstance(pl, Err):
        return pl
    if skipped(checked_estimate, aside):
        return Err(())
    est = checked_estimate(recipe, model, mesh, pl)
    if isinstance(est, Err):
        return est
    return Resolved(recipe=recipe, model=model, mesh=mesh, placements=pl, estimate=est,
                    plan=build_plan(recipe, model, mesh, pl, est, versions(), pp))


@reads("model.config")
def _model_config(recipe: Recipe) -> Result[dict[str, Any]]:
    from meshbake.compiler import load

    return load.read_model_config(recipe.model.config)


@reads("data")
def _tokenizer_errors(recipe: Recipe, cfg: Mapping[str, Any], folder: str | None = None) -> tuple[RecipeError, ...]:
    """The tokenizer against the model (vocab) and the data (a chat template for format chat);
    folder: where the tokenizer is read (a pinned Hub tokenizer's snapshot)."""
    from meshbake.compiler import hub, load

    folder = folder or recipe.data.tokenizer
    errs = load.tokenizer_errors(recipe.data.format, folder, cfg)
    if errs:
        return tuple(RecipeError(e.path, e.message.replace(str(folder), str(recipe.data.tokenizer)), e.hint)
                     for e in errs)
    chat = hub.chat_template_error(folder, recipe.data.tokenizer) if recipe.data.format == "chat" else None
    return (chat,) if chat else ()


@reads("data")
def _column_errors(recipe: Recipe, pinned) -> tuple[RecipeError, ...]:
    """The first record of each data source that is here against data.format / data.fields."""
    from meshbake.compiler.columns import column_errors

    return tuple(column_errors(recipe, pinned))


@reads("model.weights", "model.config", "lora", "data")
def _random_weights(recipe: Recipe) -> tuple[RecipeError, ...]:
    from meshbake.compiler import hub

    e = hub.random_weights_error(recipe)
    return (e,) if e else ()


def _validated_pinned(d: Mapping[str, Any]):
    """validate + Hub ids pinned to org/name@<sha> (compiler/hub.py): the start resolve_dict and
    resolve_data_dict share. -> (Validated, Pinned), or Err with validate's errors when model.config
    itself is unusable (nothing after it can be said)."""
    from meshbake.compiler import hub
    from meshbake.compiler import validate as validate_mod

    v = validate_mod.validate_fields(dict(d))
    if v.recipe is None or skipped(_model_config, v.aside):
        return Err(v.errors)
    return v, hub.pin_recipe(v.recipe)


def resolve_dict(d: Mapping[str, Any]) -> Result[Resolved]:
    """Validated-or-not recipe dict -> Resolved (reads the model config.json / catalog). Every
    independent error at once: a field with an error is set aside (validate.Validated) and the
    later stages still run the checks that do not read it."""
    from meshbake.compiler import hub

    vp = _validated_pinned(d)
    if isinstance(vp, Err):
        return vp
    v, pinned = vp
    recipe, errs = pinned.recipe, v.errors + pinned.errors
    errs += tuple(run(_random_weights, v.aside, recipe))
    errs += tuple(run(_column_errors, v.aside, recipe, pinned))
    cfg = _model_config(recipe)
    if not isinstance(cfg, Err):
        errs += tuple(run(_tokenizer_errors, v.aside, recipe, cfg, hub.tokenizer_folder(recipe.data.tokenizer, pinned)))
    res = cfg if isinstance(cfg, Err) else resolve(recipe, cfg, recipe.model.config, v.aside)
    if isinstance(res, Err):
        return Err(tuple(dict.fromkeys(errs + res.errors)))
    wc = None if {"model", "model.weights"} & v.aside else _weights_check(recipe, res.model, cfg, pinned)
    if wc is not None and wc.error is not None:
        errs += (wc.error,)
    return Err(errs) if errs else replace(res, missing=pinned.missing, weights=wc)


def _weights_check(recipe: Recipe, model: ModelSpec, cfg: Mapping[str, Any], pinned):
    """model.weights' safetensors headers against the model's parameters (compiler/weights.py)."""
    from meshbake.compiler.weights import check_weights

    return check_weights(recipe.model.weights, pinned.pin("model.weights"), model.params, cfg, recipe.model.dtype)


@dataclass(frozen=True)
class DataResolved:
    """What `meshbake prepare` reads of a plan (runtime/prepare.py: name, data, train.seq_len and
    train.seed, versions['meshbake']), resolved without building the model: the data section needs
    only the config.json's vocab_size, and the meta-model build (torch + the transformers modeling
    code, ~4 s) was most of prepare's start-up. The mesh / placement / memory errors are check's
    and bundle's; the fingerprint is the full plan's (plan.data is the same DataPlan)."""
    name: str
    data: P.DataPlan
    train: Any                     # the recipe's train section: seq_len, seed
    versions: dict[str, str]


def resolve_data_dict(d: Mapping[str, Any]) -> Result[DataResolved]:
    """Recipe dict -> DataResolved or Err: every validation error, model.config unreadable or not a
    model meshbake runs (its type and size facts, as the model stage checks them first), and the
    tokenizer / vocab check, as resolve_dict reports them; nothing of the later stages."""
    from meshbake.compiler import __version__, hub

    vp = _validated_pinned(d)               # pinned: prepare reads the revision the run will
    if isinstance(vp, Err):
        return vp
    v, pinned = vp
    recipe, errs = pinned.recipe, v.errors + pinned.errors
    cfg = _model_config(recipe)
    if isinstance(cfg, Err):
        return Err(tuple(dict.fromkeys(errs + cfg.errors)))
    errs += tuple(run(_tokenizer_errors, v.aside, recipe, cfg, hub.tokenizer_folder(recipe.data.tokenizer, pinned)))
    errs += tuple(_type_errors(cfg.get("model_type"), recipe.model.config) or fact_errors(cfg, recipe.model.config))
    if errs:
        return Err(tuple(dict.fromkeys(errs)))
    return DataResolved(name=recipe.name, data=data_plan(recipe, cfg["vocab_size"], __version__),
                        train=recipe.train, versions={"meshbake": __version__})


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


__all__ = ["Bundle", "DataResolved", "Resolved", "RecipeError", "compile_recipe", "resolve", "resolve_data_dict",
           "resolve_dict", "resolve_text", "build_plan"]
