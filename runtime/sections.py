"""Recipe sections as frozen dataclasses, generated from the recipe's JSON Schema (stdlib only).

runtime/recipe.schema.json is the one place a recipe key is declared: its name, type, enum,
default and description. This module turns every object of it into a frozen, keyword-only
dataclass, so the compiler's Recipe and the runtime's plan sections are that declaration,
not copies of it:

    schema node                               field annotation
    {"type": "integer"}                       int
    {"type": "number"}                        float            (an int given for it becomes a float)
    {"type": ["string", "null"]}              str | None
    {"enum": ["cosine", "linear"]}            Literal["cosine", "linear"]   (| None if the default is null)
    {"type": "array", "items": X}             tuple[X, ...]
    {"type": "array", "prefixItems": [X, Y]}  tuple[X, Y]
    {"type": "object", "properties": ...}     its own class (train.mixed_precision -> MixedPrecisionSection)
    {"type": "object"} (free-form)            Mapping[str, V]  (V from additionalProperties)
    {"anyOf": [...]} (without "type")         the union of its arms  (tp.plan: Literal["auto"] | Mapping)

Field names are the schema's property names, in schema order; defaults are the schema's (a
section whose fields all have defaults defaults to itself). A property annotated
`"x-normalized-into": "<key>"` (data.path, and the older spellings data.source / data.text_field,
also `"deprecated": true`) is input only: compiler/validate.py rewrites it into <key>, so it is
not a field.

`build(cls, mapping)` makes any of these dataclasses (and the plan's hand-written ones) from a
plain mapping by keyword, recursively, checking each value against its annotation; `to_dict` is
its inverse (the schema's shape: lists, dicts, scalars). `derive(cls, section, **facts)` extends a
recipe section with facts resolved later (runtime/plan.py's TrainPlan, DataPlan, TPPlan).

`build(..., validate=True)` (runtime/plan.py's reader of plan.json: a file on disk someone else
may have written) also holds every value to its schema node's keywords, not only its type: a
`name` with a newline in it type-checks as a str, and is then written into scripts and logs.
`check(node, value)` is that small stdlib validator of the keywords the schema uses (type, enum,
const, anyOf, pattern, min/maxLength, minimum/maximum and their exclusive forms, items,
prefixItems, min/maxItems, uniqueItems, properties, required, additionalProperties,
propertyNames, min/maxProperties); the recipe side needs none of it (compiler/validate.py runs
the full JSON Schema validator first). A violation is a `SchemaError` (a TypeError) naming the
JSON path.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal, Union

SCHEMA_PATH = Path(__file__).with_name("recipe.schema.json")
NORMALIZED = "x-normalized-into"       # schema annotation: input-only key, rewritten by validate


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def is_field(node: Mapping[str, Any]) -> bool:
    """A schema property that becomes a dataclass field (not an input-only spelling)."""
    return NORMALIZED not in node


def _camel(name: str) -> str:
    # tp -> TP (two-letter names are acronyms), mixed_precision -> MixedPrecision
    return "".join(p.upper() if len(p) <= 2 else p.capitalize() for p in name.split("_"))


class _Generator:
    """Schema -> classes, one per object node; identical nodes (data.sources and
    data.eval_sources items) share one class."""

    def __init__(self) -> None:
        self.by_path: dict[str, type] = {}
        self._by_node: dict[str, type] = {}

    def object_class(self, node: Mapping[str, Any], path: str, name: str) -> type:
        key = json.dumps(node, sort_keys=True)
        if key in self._by_node:
            cls = self._by_node[key]
        else:
            specs = []
            for prop, sub in node.get("properties", {}).items():
                if is_field(sub):
                    specs.append(self._field(prop, sub, f"{path}.{prop}" if path else prop))
            cls = dataclasses.make_dataclass(name, specs, frozen=True, kw_only=True)
            cls.__module__, cls.__doc__ = __name__, node.get("description", "")
            SCHEMA_OF[cls] = node
            self._by_node[key] = cls
        self.by_path[path] = cls
        return cls

    def _field(self, prop: str, node: Mapping[str, Any], path: str) -> tuple[str, Any, dataclasses.Field]:
        ann = self.annotation(node, path, prop)
        meta = {"description": node.get("description", ""), "path": path}
        if "default" in node:
            default = convert(ann, node["default"], path)
            if isinstance(default, dict):
                f = dataclasses.field(default_factory=lambda d=default: dict(d), metadata=meta)
            else:
                f = dataclasses.field(default=default, metadata=meta)
        elif dataclasses.is_dataclass(ann) and _all_defaulted(ann):
            f = dataclasses.field(default_factory=ann, metadata=meta)
        else:
            f = dataclasses.field(metadata=meta)       # required: no default in the schema
        return prop, ann, f

    def annotation(self, node: Mapping[str, Any], path: str, prop: str) -> Any:
        if "enum" in node:
            ann: Any = Literal[tuple(node["enum"])]
            return ann | None if node.get("default", ...) is None and None not in node["enum"] else ann
        if "const" in node:
            return Literal[node["const"]]
        if "type" not in node and "anyOf" in node:
            return _union([self.annotation(a, path, prop) for a in node["anyOf"]])
        kinds = node.get("type", [])
        return _union([self._kind(k, node, path, prop) for k in ([kinds] if isinstance(kinds, str) else kinds)])

    def _kind(self, kind: str, node: Mapping[str, Any], path: str, prop: str) -> Any:
        if kind == "object" and "properties" in node:
            return self.object_class(node, path, _camel(prop) + "Section")
        if kind == "object":
            extra = node.get("additionalProperties")
            return Mapping[str, self.annotation(extra, path + "[]", prop) if isinstance(extra, dict) else Any]
        if kind == "array":
            if "prefixItems" in node:
                return tuple[tuple(self.annotation(x, f"{path}[{i}]", prop) for i, x in enumerate(node["prefixItems"]))]
            items = node.get("items")
            item = self._item(items, path, prop) if isinstance(items, dict) else Any
            return tuple[item, ...]
        return {"integer": int, "number": float, "boolean": bool, "string": str, "null": type(None)}[kind]

    def _item(self, items: Mapping[str, Any], path: str, prop: str) -> Any:
        if items.get("type") == "object" and "properties" in items:
            return self.object_class(items, path + "[]", _camel(prop.removesuffix("s")))
        return self.annotation(items, path + "[]", prop)


def _union(arms: list[Any]) -> Any:
    out: Any = arms[0]
    for a in arms[1:]:
        out = out | a
    return out


def _all_defaulted(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


# ----------------------------------------------------------------------------- check (schema keywords)
# class -> its schema node: the generated classes register themselves; runtime/plan.py declares
# the nodes of its hand-written ones (the plan-only fields: mesh, model, placements, ...)
SCHEMA_OF: dict[type, Mapping[str, Any]] = {}


class SchemaError(TypeError):
    """A value outside its schema node; str() = 'path: problem' (one line: the value is shown
    escaped and cut, see show)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path or '(top)'}: {problem}")
        self.path, self.problem = path, problem


def show(v: Any, limit: int = 60) -> str:
    """v for an error line: repr (escapes newlines, ESC, U+202E: str.isprintable() is False for
    them), at most ~limit characters (a 1 MB string in a plan.json is not echoed whole)."""
    r = repr(v) if not isinstance(v, (dict, list, tuple)) else f"<{type(v).__name__} of {len(v)}>"
    r = r if r.isprintable() else r.encode("ascii", "backslashreplace").decode("ascii")
    return r if len(r) <= limit else r[:limit - 3] + "..."


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _is(kind: str, v: Any) -> bool:
    if kind in ("integer", "number"):
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind == "number" else int):
            return False
        return not isinstance(v, float) or math.isfinite(v)     # JSON has no NaN/Infinity
    return isinstance(v, {"string": str, "boolean": bool, "null": type(None), "array": (list, tuple),
                          "object": Mapping}[kind])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1 (Python's True == 1 is)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def check(node: Mapping[str, Any], v: Any, path: str = "") -> None:
    """SchemaError unless v satisfies node's keywords (the subset of JSON Schema 2020-12 the recipe
    schema uses; see the module docstring). As in JSON Schema, a keyword of one type (pattern,
    minimum, items) says nothing about a value of another type: "type" decides which apply."""
    if "anyOf" in node:
        why = []
        for arm in node["anyOf"]:
            try:
                check(arm, v, path)
                break
            except SchemaError as e:
                why.append(e.problem)
        else:
            raise SchemaError(path, f"{show(v)} fits none of its forms ({'; '.join(why)})")
    kinds = node.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(k, v) for k in kinds):
            raise SchemaError(path, f"{show(v)} is not of type {' or '.join(kinds)}")
    if "const" in node and not _same(v, node["const"]):
        raise SchemaError(path, f"{show(v)} is not {show(node['const'])}")
    if "enum" in node and not any(_same(v, e) for e in node["enum"]):
        raise SchemaError(path, f"{show(v)} is not one of {', '.join(show(e) for e in node['enum'])}")
    if isinstance(v, str):
        _check_string(node, v, path)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        _check_number(node, v, path)
    elif isinstance(v, (list, tuple)):
        _check_array(node, v, path)
    elif isinstance(v, Mapping):
        _check_object(node, v, path)


def _check_string(node: Mapping[str, Any], v: str, path: str) -> None:
    # lengths in code points, as JSON Schema counts them (len of a Python str)
    if len(v) < node.get("minLength", 0):
        raise SchemaError(path, f"{show(v)} is shorter than {node['minLength']} characters")
    if "maxLength" in node and len(v) > node["maxLength"]:
        raise SchemaError(path, f"{show(v)} is longer than {node['maxLength']} characters")
    # pattern: a search, not a full match (JSON Schema); the schema's patterns anchor themselves
    # with ^...$(?!\n), so a trailing newline does not slip past $
    if "pattern" in node and not _regex(node["pattern"]).search(v):
        raise SchemaError(path, f"{show(v)} does not match {node['pattern']}")


def _check_number(node: Mapping[str, Any], v: float, path: str) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise SchemaError(path, f"{show(v)} is not a finite number")
    for kw, bad, says in (("minimum", lambda b: v < b, "less than the minimum"),
                          ("exclusiveMinimum", lambda b: v <= b, "not more than"),
                          ("maximum", lambda b: v > b, "more than the maximum"),
                          ("exclusiveMaximum", lambda b: v >= b, "not less than")):
        if kw in node and bad(node[kw]):
            raise SchemaError(path, f"{show(v)} is {says} {node[kw]}")


def _check_array(node: Mapping[str, Any], v: Sequence[Any], path: str) -> None:
    if len(v) < node.get("minItems", 0):
        raise SchemaError(path, f"has {len(v)} items, fewer than {node['minItems']}")
    if "maxItems" in node and len(v) > node["maxItems"]:
        raise SchemaError(path, f"has {len(v)} items, more than {node['maxItems']}")
    if node.get("uniqueItems") and len({_key(x) for x in v}) < len(v):
        raise SchemaError(path, "holds an item twice")
    prefix = node.get("prefixItems", [])
    for i, x in enumerate(v):
        sub = prefix[i] if i < len(prefix) else node.get("items")    # 2020-12: items = after the prefix
        if sub is False:
            raise SchemaError(f"{path}[{i}]", "is one item too many")
        if isinstance(sub, Mapping):
            check(sub, x, f"{path}[{i}]")


def _check_object(node: Mapping[str, Any], v: Mapping[str, Any], path: str) -> None:
    if len(v) < node.get("minProperties", 0):
        raise SchemaError(path, f"has {len(v)} keys, fewer than {node['minProperties']}")
    if "maxProperties" in node and len(v) > node["maxProperties"]:
        raise SchemaError(path, f"has {len(v)} keys, more than {node['maxProperties']}")
    for k in node.get("required", ()):
        if k not in v:
            raise SchemaError(path, f"has no {k!r}")
    props, extra = node.get("properties", {}), node.get("additionalProperties", True)
    for k, x in v.items():
        at = f"{path}.{k}" if path else str(k)
        if "propertyNames" in node:
            check(node["propertyNames"], k, f"{path} key {show(k)}")
        if k in props:
            if isinstance(props[k], Mapping):
                check(props[k], x, at)
        elif extra is False:
            raise SchemaError(path or "(top)", f"unknown key {show(k)}")
        elif isinstance(extra, Mapping):
            check(extra, x, at)


# ----------------------------------------------------------------------------- build / to_dict
@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _builds(ann: Any) -> bool:
    """ann is (an optional) dataclass: build checks that value against its own class's node."""
    if dataclasses.is_dataclass(ann):
        return True
    return typing.get_origin(ann) in (Union, types.UnionType) and all(
        a is type(None) or dataclasses.is_dataclass(a) for a in typing.get_args(ann))


def build(cls: type, value: Mapping[str, Any], *, strict: bool = True, path: str = "", validate: bool = False):
    """cls(**value) by keyword, recursively: nested mappings become their dataclasses, lists
    tuples, ints given for floats floats. A value that does not fit its annotation is a
    TypeError naming its path. strict=False drops unknown keys (plan.json of another version).
    validate=True also holds each value to the schema node of its class (SCHEMA_OF: pattern,
    enum, bounds, lengths; see check): a SchemaError (a TypeError) naming its path."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{path or cls.__name__}: expected a mapping for {cls.__name__}, got {show(value)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - names)
    if unknown and strict:
        raise TypeError(f"{path or cls.__name__}: unknown keys {[show(k) for k in unknown]} for {cls.__name__}")
    props = SCHEMA_OF.get(cls, {}).get("properties", {}) if validate else {}
    kw = {}
    for k, v in value.items():
        if k not in names:
            continue
        at = f"{path}.{k}" if path else k
        if k in props and not _builds(hints[k]):     # a nested class checks its own fields (no double work)
            check(props[k], v, at)
        kw[k] = _convert(hints[k], v, at, strict, validate)
    try:
        return cls(**kw)
    except TypeError as e:              # a required field missing
        raise TypeError(f"{path or cls.__name__}: {e}") from None


def convert(ann: Any, value: Any, path: str = "") -> Any:
    """One value to its annotation (see build)."""
    return _convert(ann, value, path, True)


def _convert(ann: Any, v: Any, path: str, strict: bool, validate: bool = False) -> Any:
    if ann is Any:
        return v
    if dataclasses.is_dataclass(ann):
        return v if isinstance(v, ann) else build(ann, v, strict=strict, path=path, validate=validate)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(arm, v, path, strict, validate)
            except SchemaError:
                raise                  # the right shape, a value outside its schema: say that, not "fits none"
            except TypeError:
                pass
        raise TypeError(f"{path}: {show(v)} fits none of {ann}") from None
    if origin is Literal:
        if v in args and type(v) in {type(a) for a in args}:
            return v
        raise TypeError(f"{path}: {show(v)} is not one of {args}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {show(v)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x, f"{path}[{i}]", strict, validate) for i, x in enumerate(v))
        if len(v) != len(args):
            raise TypeError(f"{path}: expected {len(args)} items, got {show(v)}")
        return tuple(_convert(a, x, f"{path}[{i}]", strict, validate) for i, (a, x) in enumerate(zip(args, v)))
    if origin in (dict, Mapping):
        if not isinstance(v, Mapping):
            raise TypeError(f"{path}: expected a mapping, got {show(v)}")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, path, strict, validate): _convert(vt, x, f"{path}.{k}", strict, validate)
                for k, x in v.items()}
    if ann is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if ann is type(None):
        if v is None:
            return v
    elif isinstance(v, ann) and not (ann is int and isinstance(v, bool)):
        return v
    raise TypeError(f"{path}: expected {getattr(ann, '__name__', ann)}, got {show(v)}")


def to_dict(obj: Any) -> Any:
    """A section (or plan) as plain data in the schema's shape: fields in order, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(x) for k, x in obj.items()}
    return obj


def derive(cls: type, base: Any, **facts: Any):
    """cls (a subclass of base's class with extra fields) from base's fields + the facts,
    which may also override base's own (TrainPlan.grad_accum: None in the recipe, resolved)."""
    own = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return cls(**{**own, **facts})


def _generate() -> dict[str, type]:
    g = _Generator()
    g.object_class(schema(), "", "Recipe")
    names: dict[str, type] = {}
    for path, cls in g.by_path.items():
        if names.setdefault(cls.__name__, cls) is not cls:     # two different objects named alike
            raise ValueError(f"recipe.schema.json: {path} would be a second class {cls.__name__}; rename the key")
    return dict(g.by_path)


SECTIONS: dict[str, type] = _generate()   # dotted schema path -> class ("" = the whole recipe)
# module attributes too (Recipe, TrainSection, MixedPrecisionSection, Source, ...): pickle and
# reprs find a class by its module and name
globals().update({cls.__name__: cls for cls in SECTIONS.values()})


def section(path: str) -> type:
    """The class of a schema object by its dotted path: "" (the whole recipe), "train",
    "train.mixed_precision", "tracking.wandb", "data.sources[]" (an item of the array)."""
    return SECTIONS[path]
