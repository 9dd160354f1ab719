"""The fixture corpus: tests/recipes/valid compile; each tests/recipes/invalid/*.yaml is one
realistic mistake whose first line `# expect: <json.path>` names where it must be reported."""
from __future__ import annotations

from pathlib import Path

import pytest
from meshbake.compiler.errors import Err
from meshbake.compiler.pipeline import compile_recipe

from tests.helpers import ROOT, cli

VALID = sorted((ROOT / "tests/recipes/valid").glob("*.yaml"))
INVALID = sorted((ROOT / "tests/recipes/invalid").glob("*.yaml"))


def expected(path: Path) -> str:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name}: first line must be '# expect: <json.path>'"
    assert len(lines) > 1 and lines[1].startswith("# "), f"{path.name}: second line must say what the mistake is"
    return lines[0].removeprefix("# expect: ").strip()


def test_corpus_size():
    assert len(INVALID) >= 30 and len(VALID) >= 5


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_recipe_compiles(path, monkeypatch):
    monkeypatch.chdir(ROOT)              # model.config paths are relative to the working directory
    b = compile_recipe(path.read_text(), source=path.name)
    assert not isinstance(b, Err), b
    assert {"plan.json", "launch.sh", "job.sbatch", "PLAN.md"} <= set(b.files)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_recipe_reports_its_path(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = compile_recipe(path.read_text(), source=path.name)
    assert isinstance(err, Err), f"{path.name} compiled but should fail at {expected(path)}"
    paths = [e.path for e in err.errors]
    assert expected(path) in paths, paths
    for e in err.errors:
        assert e.message and e.hint, e       # every error says what is wrong and how to fix it


@pytest.mark.parametrize("name", ["typo_key", "tp_cross_node", "duplicate_key"])
def test_cli_exit_2_with_path_and_no_traceback(name):
    path = ROOT / "tests/recipes/invalid" / f"{name}.yaml"
    p = cli("check", str(path))
    assert p.returncode == 2
    assert f"  {expected(path)}:" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
