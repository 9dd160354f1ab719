"""Each recipe key is declared once, in runtime/recipe.schema.json: the Recipe's classes and the
plan's sections are generated from it (runtime/sections.py). Every schema property is exactly one
field, typed from the schema; every recipe key reaches the plan or is listed here as compile-time
only; recipe.yaml and plan.json read back to the same objects."""
from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
from meshbake.compiler import load, validate
from meshbake.compiler.errors import Err
from meshbake.compiler.recipe import Recipe
from meshbake.compiler.render import recipe_yaml
from meshbake.runtime import plan as P
from meshbake.runtime import sections as S

from tests.golden_refresh import GOLDEN, PROFILE_GOLDENS
from tests.helpers import ROOT


def _objects(node: Mapping[str, Any], path: str = ""):
    """(dotted path, schema node) of every object with properties, as runtime.sections names them."""
    yield path, node
    for prop, sub in node.get("properties", {}).items():
        if not S.is_field(sub):
            continue
        here = f"{path}.{prop}" if path else prop
        for arm in [sub, *sub.get("anyOf", [])]:
            if arm.get("type") == "object" and "properties" in arm:
                yield from _objects(arm, here)
            items = arm.get("items")
            if isinstance(items, dict) and items.get("type") == "object" and "properties" in items:
                yield from _objects(items, here + "[]")


def _leaves(node: Mapping[str, Any], path: str = ""):
    """Dotted path of every recipe key that holds a value (not an object with properties)."""
    for prop, sub in node.get("properties", {}).items():
        here = f"{path}.{prop}" if path else prop
        if not S.is_field(sub):
            continue
        if sub.get("type") == "object" and "properties" in sub:
            yield from _leaves(sub, here)
        else:
            yield here


def test_every_schema_property_is_exactly_one_field_of_its_class():
    seen = set()
    for path, node in _objects(S.schema()):
        cls = S.section(path)
        seen.add(path)
        props = [k for k, v in node["properties"].items() if S.is_field(v)]
        assert [f.name for f in dataclasses.fields(cls)] == props, path      # same names, same order
        assert cls.__dataclass_params__.frozen and all(f.kw_only for f in dataclasses.fields(cls)), path
        hints = typing.get_type_hints(cls)
        for name, sub in node["properties"].items():
            if not S.is_field(sub):
                continue
            f = {f.name: f for f in dataclasses.fields(cls)}[name]
            if "enum" in sub:                                    # enums are Literal types
                lit = [a for a in typing.get_args(hints[name]) if typing.get_origin(a) is Literal] or [hints[name]]
                assert typing.get_args(lit[0]) == tuple(sub["enum"]), f"{path}.{name}"
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if "default" in sub:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert S.to_dict(value) == sub["default"], f"{path}.{name}"
            elif name in node.get("required", ()):
                assert not has_default, f"{path}.{name}"
    assert seen == set(S.SECTIONS), set(S.SECTIONS) ^ seen
    assert S.section("") is Recipe


def test_input_only_keys_name_a_field_they_are_rewritten_into():
    data = S.schema()["properties"]["data"]["properties"]
    only = {k: v["x-normalized-into"] for k, v in data.items() if not S.is_field(v)}
    assert only == {"path": "data.sources", "source": "data.format", "text_field": "data.fields.text"}
    for target in only.values():
        *section, name = target.split(".")
        assert name in {f.name for f in dataclasses.fields(S.section(".".join(section)))}, target


def test_annotations_follow_the_schema_types():
    h = typing.get_type_hints
    assert h(S.section("train"))["betas"] == tuple[float, float]
    assert h(S.section("train"))["grad_accum"] == int | None
    assert h(S.section("lora"))["targets"] == tuple[str, ...]
    assert h(S.section("data"))["sources"] == tuple[S.section("data.sources[]"), ...]
    assert S.section("data.sources[]") is S.section("data.eval_sources[]")       # the same declaration
    assert h(S.section("cluster"))["env"] == Mapping[str, str | int]
    assert h(S.section("tracking"))["wandb"] is S.section("tracking.wandb")
    plan = h(S.section("tp"))["plan"]
    assert typing.get_args(plan)[0] == Literal["auto"] and typing.get_origin(typing.get_args(plan)[1]) is Mapping


def test_build_checks_every_value_and_to_dict_inverts_it():
    Train = S.section("train")
    t = S.build(Train, {"global_batch_size": 8, "lr": 1, "betas": [0.9, 0.99], "mixed_precision": {"param_dtype": "float32"}})
    assert (t.lr, t.betas, t.mixed_precision.param_dtype, t.mixed_precision.reduce_dtype) == (1.0, (0.9, 0.99),
                                                                                            "float32", "float32")
    assert isinstance(t.lr, float) and S.build(Train, S.to_dict(t)) == t
    for bad, where in (({"seq_len": "abc"}, "seq_len"), ({"lr_schedule": "cosin"}, "lr_schedule"),
                       ({"betas": [0.9]}, "betas"), ({"compile": 1}, "compile"), ({"seq_len": True}, "seq_len"),
                       ({"mixed_precision": {"param_dtype": "fp8"}}, "mixed_precision.param_dtype"),
                       ({"seq_lenn": 1}, "train")):
        with pytest.raises(TypeError, match=where):
            S.build(Train, {"global_batch_size": 8, **bad}, path="train")
    with pytest.raises(TypeError, match="global_batch_size"):
        S.build(Train, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.lr = 2.0


# --------------------------------------------------------------------------------- the plan
# recipe keys that are not at the same path in plan.json: where they went, or None = compile time
# only (the templates, the estimate, suggest). Keys of the sections the plan carries as generated
# classes (train, data, tp, checkpoint, lora, tracking) need no entry: they are there by construction.
PLAN_HOME = {
    "model.config": "model.source", "model.weights": "model.weights", "model.dtype": "train.dtype",
    "mesh.dp_replicate": "mesh.dp_replicate", "mesh.dp_shard": "mesh.dp_shard", "mesh.cp": "mesh.cp",
    "mesh.tp": "mesh.tp", "mesh.allow_cross_node_tp": None,
    "cluster.*": None,           # job.sbatch / launch.sh / the estimate; device and max_restarts below
    "cluster.device": "mesh.device", "cluster.max_restarts": "max_restarts",
}


def _plan_has(path: str) -> bool:
    cls: Any = P.Plan
    for part in path.split("."):
        # an optional section (plan.json `pp`, present only when mesh.pp > 1): its class
        args = [a for a in typing.get_args(cls) if a is not type(None)] if not dataclasses.is_dataclass(cls) else []
        cls = args[0] if len(args) == 1 else cls
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        cls = typing.get_type_hints(cls)[part]
    return True


def test_every_recipe_key_reaches_the_plan_or_is_listed_as_compile_time_only():
    for key in _leaves(S.schema()):
        home = PLAN_HOME[key] if key in PLAN_HOME else PLAN_HOME.get(key.split(".")[0] + ".*", key)
        assert home is None or _plan_has(home), f"{key}: not in the plan at {home}; list it in PLAN_HOME"
    for key, home in PLAN_HOME.items():
        assert key.endswith(".*") or key in set(_leaves(S.schema())), f"PLAN_HOME lists {key}, not in the schema"
        assert home is None or _plan_has(home), home
    for section in ("checkpoint", "lora", "tracking"):                # the recipe's own classes
        assert typing.get_type_hints(P.Plan)[section] is S.section(section)
    for section, cls in (("train", P.TrainPlan), ("data", P.DataPlan), ("tp", P.TPPlan)):
        assert issubclass(cls, S.section(section)) and typing.get_type_hints(P.Plan)[section] is cls


def _golden_plans() -> list[Path]:
    return sorted(GOLDEN.glob("*/plan.json"))


@pytest.mark.parametrize("path", _golden_plans(), ids=lambda p: p.parent.name)
def test_plan_json_round_trips_byte_for_byte(path):
    text = path.read_text()
    plan = P.from_dict(json.loads(text))
    assert P.dumps(plan) == text
    assert P.from_dict(json.loads(P.dumps(plan))) == plan


def test_older_plan_json_with_flat_tracking_still_loads():
    d = json.loads((GOLDEN / "tiny_chat/plan.json").read_text())
    new = P.from_dict(d)
    d["tracking"] = {"tensorboard": True, "wandb_project": "p", "wandb_entity": None, "wandb_name": "n",
                     "wandb_mode": "online", "wandb_tags": ["a", "b"]}
    del d["tp"]["plan"]
    old = P.from_dict(d)
    assert old.tracking == S.build(P.TrackingPlan, {"tensorboard": True, "wandb": {
        "project": "p", "name": "n", "mode": "online", "tags": ["a", "b"]}})
    assert old.tp.plan == "auto" and old.train == new.train and old.data == new.data


# ------------------------------------------------------------------------------- recipe.yaml
def _recipes() -> list[tuple[str, str | None]]:
    return [(p.stem, None) for p in sorted((ROOT / "recipes").glob("*.yaml"))] + \
        [(recipe, profile) for profile, (recipe, _) in PROFILE_GOLDENS.items()]


def _recipe(text: str, source: str, cluster: str | None = None) -> Recipe:
    d = load.recipe_from_text(text, source, (), cluster)
    assert not isinstance(d, Err), d
    r = validate.validate(d)
    assert not isinstance(r, Err), r
    return r


@pytest.mark.parametrize("name,profile", _recipes())
def test_recipe_round_trips_through_recipe_yaml(name, profile):
    r = _recipe((ROOT / f"recipes/{name}.yaml").read_text(), name, profile)
    text = recipe_yaml(r)
    again = _recipe(text, "recipe.yaml")
    assert again == r
    assert recipe_yaml(again) == text
    assert validate.schema_errors(S.to_dict(r)) == []        # the normalized recipe is a valid recipe
