"""Issue 10: every independent error at once. A field with an error is set aside (its schema
default stands in, marked) and the later checks and stages still run; a check that reads a
set-aside field is skipped, so a stand-in causes no follow-on error. Each check declares the
fields it reads (errors.reads); the audit at the end holds every declaration to the reads."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from meshbake.compiler import estimate, mesh, pipeline, placements, validate
from meshbake.compiler.errors import Err, reads, run, skipped

from tests.helpers import ROOT, cli, paths, resolve, tiny_recipe


def res(d: dict):
    return resolve(yaml.safe_dump(d))


def with_field(d: dict, field: str, value) -> dict:
    section, key = field.split(".")
    d = copy.deepcopy(d)
    d[section] = {**d.get(section, {}), key: value}
    return d


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("  ") and not line.startswith("      fix:")]


# tp 3 divides no head count of tiny-llama (4 heads, 2 kv heads): a mesh.tp error of its own
TP3 = {"mesh": {"tp": 3, "dp_shard": 2}}


def test_a_type_error_does_not_hide_the_mesh_errors():
    """The issue's example through the real CLI entry (in process): the seq_len type error, the
    unknown key and tp 16 (crosses nodes of 8, does not divide the 8 kv heads), each once; no
    seq_len rule is computed from the stand-in seq_len."""
    r = cli("check", "70b_hsdp_tp", "--set", "mesh.tp=16", "--set", "train.seq_len=abc",
            "--set", "mesh.tensor_parallel_size=2")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(lines) == len(set(lines)) == 4 and "4 problems" in r.stderr, r.stderr
    by_path = sorted(line.split(":")[0].strip() for line in lines)
    assert by_path == ["mesh.tensor_parallel_size", "mesh.tp", "mesh.tp", "train.seq_len"], r.stderr
    assert any("does not divide cluster.gpus_per_node=8" in x for x in lines)
    assert any("does not divide num_key_value_heads=8" in x for x in lines)
    assert [x for x in lines if "train.seq_len" in x] == ['  train.seq_len: "abc" is not of type integer']


def test_tp_plan_overrides_are_checked_at_tp_1():
    bad = res(tiny_recipe("co", 2, tp={"plan": {"model.nope.*": "colwise", "model.norm": "colwise"}}))
    assert isinstance(bad, Err) and paths(bad) == ["tp.plan['model.nope.*']", "tp.plan['model.norm']"], bad
    nope, norm = bad.errors
    assert "matches no" in nope.message and nope.hint
    assert "'colwise' does not apply to norm" in norm.message and "sequence_parallel, replicate" in norm.hint
    ok = res(tiny_recipe("co", 2, tp={"plan": {"model.norm": "replicate"}}))
    assert not isinstance(ok, Err), ok
    assert ok.mesh.tp == 1 and set(ok.placements.styles.values()) == {"replicate"}   # nothing is split


def test_tp_plan_block_rules_are_checked_at_tp_1():
    """A q_proj override beside the block's other projections, or a tied embedding replicated
    beside its colwise lm_head, would not run at any tp > 1: said at tp 1 too, with the same
    error as at tp 2 (sequence parallel off either way). A consistent override compiles at both."""
    q_row = {"plan": {"model.layers.0.self_attn.q_proj": "rowwise"}}
    for mesh_ in ({"dp_shard": 2}, {"dp_shard": 1, "tp": 2}):
        bad = res(tiny_recipe("co", 2, mesh=mesh_, tp=q_row))
        assert isinstance(bad, Err) and paths(bad) == ["tp.plan"], (mesh_, bad)
        assert "q_proj changed to ['rowwise']" in bad.errors[0].message and "'model.layers.*.self_attn.*'" \
            in bad.errors[0].hint
        assert ("nothing is split at tp 1" in bad.errors[0].message) == ("tp" not in mesh_)
    tied = res(tiny_recipe("co", 2, model="tiny-qwen", tp={"plan": {"model.embed_tokens": "replicate"}}))
    assert isinstance(tied, Err) and "tied embeddings" in tied.errors[0].message, tied
    for mesh_ in ({"dp_shard": 2}, {"dp_shard": 1, "tp": 2}):
        ok = res(tiny_recipe("co", 2, mesh=mesh_, tp={"plan": {"model.layers.1.self_attn.*": "replicate"}}))
        assert not isinstance(ok, Err), (mesh_, ok)


def test_a_bad_micro_batch_size_gives_no_batch_arithmetic():
    """dp 2: with the stand-in micro_batch_size 1, global 3 would not divide 1 x 2 = 2; that
    error would be about a value the user did not write. The mesh.tp error is independent."""
    for micro in ("abc", 0):
        err = res(tiny_recipe("co", 6, **TP3, train={"micro_batch_size": micro, "global_batch_size": 3}))
        assert isinstance(err, Err) and paths(err)[0] == "train.micro_batch_size", err
        assert "train.global_batch_size" not in paths(err) and "mesh.tp" in paths(err), err
    # the same recipe with a valid micro_batch_size: the arithmetic error is real and reported
    err = res(tiny_recipe("co", 6, **TP3, train={"micro_batch_size": 1, "global_batch_size": 3}))
    assert "train.global_batch_size" in paths(err), err


def test_no_memory_error_from_a_stand_in_seq_len():
    """seq_len 512 fits 0.1 GB; the stand-in (the default 2048) does not: a set-aside seq_len
    must not produce the memory error."""
    assert not isinstance(res(tiny_recipe("co", 2, cluster={"gpu_memory_gb": 0.1}, train={"seq_len": 512})), Err)
    too_big = res(tiny_recipe("co", 2, cluster={"gpu_memory_gb": 0.1}, train={"seq_len": 2048}))
    assert paths(too_big) == ["cluster.gpu_memory_gb"]
    err = res(tiny_recipe("co", 2, cluster={"gpu_memory_gb": 0.1}, train={"seq_len": "512 tokens"}))
    assert isinstance(err, Err) and paths(err) == ["train.seq_len"], err


def test_cross_field_rules_do_not_stop_the_stages():
    """min_lr > lr (a validate rule) is reported together with the mesh error; lora.dropout is
    no error (the runtime drops out the adapters' input)."""
    err = res(tiny_recipe("co", 6, **TP3, train={"lr": 1e-4, "min_lr": 1e-3}, lora={"rank": 4, "dropout": 0.1}))
    assert isinstance(err, Err)
    assert {"train.min_lr", "mesh.tp"} <= set(paths(err)) and "lora.dropout" not in paths(err), err
    v = validate.validate_fields(tiny_recipe("co", 2, lora={"rank": 4, "dropout": 0.1}))
    assert not v.errors and v.recipe is not None
    assert not isinstance(res(tiny_recipe("co", 2, lora={"rank": 0, "dropout": 0.1})), Err)


def test_a_whole_section_of_the_wrong_type_is_set_aside(tmp_path: Path):
    """`train: 5`: train is set aside as a whole (defaults + a stand-in global_batch_size); the
    mesh does not read it and still reports tp 3."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**tiny_recipe("co", 6, **TP3), "train": 5}))
    r = cli("check", str(tmp_path / "r.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line.split(":")[0].strip() for line in error_lines(r.stderr)][:1] == ["train"], r.stderr
    assert "  mesh.tp: tp=3 does not divide" in r.stderr, r.stderr
    assert "train.global_batch_size" not in r.stderr and "train.seq_len" not in r.stderr


def test_validate_fields_sets_aside_fields_not_keys():
    d = {"name": "x", "model": {"config": "tiny-llama"}, "train": {"global_batch_size": 2, "betas": [0.9, "a"]},
         "mesh": {"tp": "2", "typo": float("nan")}, "tp": {"plan": {"model.x": "bad"}},
         "cluster": {"env": {"lower": "1"}}}
    v = validate.validate_fields(d)
    assert v.aside == {"train.betas", "mesh.tp", "tp.plan", "cluster.env"}
    assert "mesh.typo" in [e.path for e in v.errors]           # reported, dropped, nothing set aside for it
    r = v.recipe
    assert (tuple(r.train.betas), r.mesh.tp, r.tp.plan, dict(r.cluster.env)) == ((0.9, 0.95), 1, "auto", {})
    assert validate.validate_all(d)[0] is None                  # the strict answers are unchanged
    assert isinstance(validate.validate(d), Err)
    missing = validate.validate_fields({"model": 3})
    assert {"name", "model", "model.config", "train", "train.global_batch_size"} <= missing.aside
    assert missing.recipe is not None and missing.recipe.train.global_batch_size == 1   # a stand-in
    assert validate.validate_fields([1]).recipe is None


def test_prefix_rule_of_skipping():
    @reads("train.seq_len", "tp")
    def check(recipe):
        return ["ran"]
    assert not skipped(check, frozenset({"train.seq", "train.seq_len_x", "mesh"}))
    for aside in ("train.seq_len", "train", "tp.plan", "tp"):
        assert skipped(check, frozenset({aside})) and run(check, frozenset({aside}), None) == []
    assert run(check, frozenset(), None) == ["ran"]


# --- the audit: each check reads only the fields it declares --------------------------------

class _DictProbe(Mapping):
    """The validate dict: records each field read (a section iterated counts as all of it)."""

    def __init__(self, d, parts, seen):
        self._d, self._parts, self._seen = d, parts, seen

    def _wrap(self, k, v):
        parts = [*self._parts, k]
        if isinstance(v, Mapping) and "properties" in validate._section_schema(parts):
            return _DictProbe(v, parts, self._seen)
        self._seen.add(".".join(parts))
        return v

    def __getitem__(self, k):
        if k not in self._d:
            self._seen.add(".".join([*self._parts, k]))
        return self._wrap(k, self._d[k])

    def __contains__(self, k):
        self._seen.add(".".join([*self._parts, k]))
        return k in self._d

    def __iter__(self):
        self._seen.add(".".join(self._parts))
        return iter(self._d)

    def __len__(self):
        self._seen.add(".".join(self._parts))
        return len(self._d)


class _RecipeProbe:
    """The Recipe: records each field read; sections are probes in turn."""

    def __init__(self, obj, prefix, seen):
        self._obj, self._prefix, self._seen = obj, prefix, seen

    def __getattr__(self, name):
        v, p = getattr(self._obj, name), self._prefix + name
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return _RecipeProbe(v, p + ".", self._seen)
        self._seen.add(p)
        return v


def _audited(check, seen: dict):
    def probe(recipe, *args):
        log = seen.setdefault(check, set())
        wrapped = _DictProbe(recipe, [], log) if isinstance(recipe, dict) else _RecipeProbe(recipe, "", log)
        return check(wrapped, *args)
    probe.reads = check.reads
    return probe


def _undeclared(seen: dict) -> dict[str, list[str]]:
    def covered(field, check):
        return any(field == r or field.startswith(r + ".") for r in check.reads)
    out = {c.__qualname__: sorted(f for f in fields if not covered(f, c)) for c, fields in seen.items()}
    return {k: v for k, v in out.items() if v}


def _patch_checks(monkeypatch, seen: dict, modules) -> set:
    checks, wrapped = set(), {}
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            if callable(obj) and hasattr(obj, "reads"):
                checks.add(obj)
                monkeypatch.setattr(mod, name, wrapped.setdefault(obj, _audited(obj, seen)))
    return checks


AUDIT_RECIPES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.yaml"))] + [
    tiny_recipe("lora", 2, lora={"rank": 4, "targets": ["q_proj", "v_proj"]}),
    tiny_recipe("wandb", 2, tracking={"wandb": {"project": "p"}}, cluster={"env_pass": ["WANDB_API_KEY"]}),
    tiny_recipe("tp1-plan", 2, tp={"plan": {"model.norm": "replicate"}}),
    tiny_recipe("tp2-plan", 2, mesh={"tp": 2}, tp={"plan": {"model.layers.*.mlp.*": "replicate"}}),
    tiny_recipe("gemma-cp", 2, model="gemma-2-9b", mesh={"cp": 2}, train={"seq_len": 8192}),
    tiny_recipe("bad", 6, **TP3, train={"micro_batch_size": 3, "grad_accum": 5, "min_lr": 1.0}),
]


def test_every_check_reads_only_what_it_declares(monkeypatch):
    monkeypatch.chdir(ROOT)
    seen: dict = {}
    checks = _patch_checks(monkeypatch, seen, (validate, mesh, placements, estimate, pipeline))
    assert len(checks) >= 20
    for d in AUDIT_RECIPES:
        res(d)
    assert _undeclared(seen) == {}
    assert {c.__qualname__ for c in checks} - {c.__qualname__ for c in seen} == set()   # every check ran
    assert all(seen[c] for c in seen if c.reads), "a check that declares reads but read nothing"


def test_the_audit_catches_a_wrong_declaration(monkeypatch):
    """The audit above can fail: a check that reads train.seq_len but declares train.lr."""
    import types

    @reads("train.lr")
    def sloppy(recipe):
        return [] if recipe.train.seq_len and recipe.train.lr else []
    mod = types.SimpleNamespace(sloppy=sloppy)
    seen: dict = {}
    _patch_checks(monkeypatch, seen, (mod,))
    mod.sloppy(validate.validate(tiny_recipe("co", 2)))
    assert _undeclared(seen) == {"test_the_audit_catches_a_wrong_declaration.<locals>.sloppy": ["train.seq_len"]}


@pytest.mark.parametrize("field,value", [("train.seq_len", "abc"), ("model.dtype", "fp8"), ("tp.plan", 3),
                                         ("cluster.gpus_per_node", 0), ("model.config", 7), ("lora.targets", "q")])
def test_a_set_aside_field_skips_exactly_its_readers(monkeypatch, field, value):
    """With one field set aside, no check that declares it runs, and the field's own error is
    the first reported."""
    monkeypatch.chdir(ROOT)
    seen: dict = {}
    checks = _patch_checks(monkeypatch, seen, (validate, mesh, placements, estimate, pipeline))
    err = res(with_field(tiny_recipe("co", 2, mesh={"tp": 2}), field, value))
    assert isinstance(err, Err) and paths(err)[0] == field, err
    readers = {c for c in checks if skipped(c, frozenset({field}))}
    assert readers and not readers & set(seen), sorted(c.__qualname__ for c in readers & set(seen))
