"""The model_type allow-list is the zoo's proof (issue #26 item 3): the compiler accepts the
parity matrix's families (tests/models) plus exactly the types `make zoo` trained with parity
(compiler/zoo.json), refuses every other type with the zoo's own reason, and docs/MODELS.md
(the page a user reads) says the same as the file the compiler reads."""
from __future__ import annotations

import json
import re

import pytest

from tests.helpers import ROOT

ZOO = json.loads((ROOT / "compiler/zoo.json").read_text())


def models_md() -> tuple[str, dict[str, tuple[str, str]]]:
    """docs/MODELS.md -> (transformers version of its title, {type: (compile, run)})."""
    text = (ROOT / "docs/MODELS.md").read_text()
    version = re.match(r"# Model zoo \(transformers ([^)]+)\)", text).group(1)
    rows = {}
    for ln in text.splitlines():
        if ln.startswith("| ") and not ln.startswith("| type "):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
            rows[cells[0]] = (cells[1], cells[3])
    return version, rows


def test_models_md_and_the_compilers_list_agree():
    version, rows = models_md()
    assert version == ZOO["transformers"]
    assert rows == {t: (r["compile"], r["run"]) for t, r in ZOO["types"].items()}


def test_the_matrix_families_are_proven_by_the_zoo_too():
    """The sweep trains the matrix's families by the same rule: a family the zoo could not match
    to one process would be a disagreement between two proofs."""
    from meshbake.compiler.model import SUPPORTED_TYPES

    assert {t: ZOO["types"][t]["run"] for t in SUPPORTED_TYPES} == dict.fromkeys(SUPPORTED_TYPES, "parity")


def test_no_type_compiled_then_crashed_and_every_refusal_names_its_path():
    bad = {t: r["run"] for t, r in ZOO["types"].items() if r["run"].startswith("CRASHED")
           or r["compile"] == "COMPILER TRACEBACK"}
    assert not bad, bad
    paths = ("model.config", "mesh.", "tp.", "train.", "lora.", "model.")
    refused = {t: r["reason"] for t, r in ZOO["types"].items() if r["compile"] == "refused"}
    assert refused and all(r.startswith(paths) for r in refused.values()), \
        {t: r[:80] for t, r in refused.items() if not r.startswith(paths)}


@pytest.mark.parametrize("model_type", sorted(ZOO["types"]))
def test_each_type_is_accepted_exactly_when_proven(model_type):
    from meshbake.compiler.model import SUPPORTED_TYPES, _type_errors, zoo_types

    row = ZOO["types"][model_type]
    errs = _type_errors(model_type, "config.json")
    if model_type in SUPPORTED_TYPES or row["run"] == "parity":
        assert errs == [] and (model_type in SUPPORTED_TYPES or model_type in zoo_types())
        return
    assert len(errs) == 1 and errs[0].path == "model.config", errs
    # the zoo's own words, not a stale "not supported"
    said = {"refused": row["reason"][:60], "compiled": row["run"][:20]}.get(row["compile"], row["compile"])
    assert said in errs[0].message, (said, errs[0].message)
    assert "make zoo" in errs[0].hint


def test_a_type_proven_on_another_transformers_minor_is_refused_with_both_versions(monkeypatch):
    from meshbake.compiler import model as M

    proven = sorted(M.zoo_types())
    assert proven, "the zoo proved no type beyond the matrix"
    monkeypatch.setattr(M, "_installed", lambda: "99.0.0")
    errs = M._type_errors(proven[0], "config.json")
    assert errs and f"transformers {ZOO['transformers']}" in errs[0].message and "99.0.0" in errs[0].message
