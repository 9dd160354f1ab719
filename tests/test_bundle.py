"""bundle: deterministic bytes, no machine facts inside, atomic writes, manifest."""
import functools
import getpass
import hashlib
import os
import re
import subprocess
import sys

import pytest
from meshbake.compiler.bundle import write_bundle
from meshbake.compiler.errors import Err
from meshbake.compiler.pipeline import compile_recipe

from tests.helpers import ROOT

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


@functools.cache
def bundle_of(name: str):
    """Compiled once per process (the tests only read it)."""
    p = ROOT / "recipes" / f"{name}.yaml"
    b = compile_recipe(p.read_text(), source=str(p))
    assert not isinstance(b, Err), b
    return b


# every recipe compiled and written by `meshbake bundle` in another interpreter, with another
# hash seed (set and dict-of-set orders differ between processes, not within one)
OTHER_PROCESS = """
import sys
from meshbake.compiler.cli import main
for name in sys.argv[2:]:
    assert main(["bundle", name, "-o", f"{sys.argv[1]}/{name}"]) == 0, name
"""


@pytest.fixture(scope="module")
def other_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("other-process")
    env = dict(os.environ, PYTHONHASHSEED="4242")
    p = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(out), *RECIPES], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def on_disk(d) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_compiles_to_the_same_bytes_in_another_process(name, tmp_path, other_process):
    """This process's bundle, written by write_bundle, is byte for byte the bundle another
    interpreter (another PYTHONHASHSEED, through the CLI) wrote."""
    a = bundle_of(name)
    write_bundle(a.files, tmp_path / "one")
    mine, theirs = on_disk(tmp_path / "one"), on_disk(other_process / name)
    assert mine == dict(a.files)                      # the writer wrote exactly the compiled bytes
    assert sorted(mine) == sorted(theirs)
    for rel in mine:
        assert mine[rel] == theirs[rel], f"{name}/{rel} differs between two processes"
    assert {"job.sbatch", "launch.sh", "plan.json", "recipe.yaml", "PLAN.md", "MANIFEST.sha256",
            "runtime/plan.py"} <= set(a.files)


@pytest.mark.parametrize("name", RECIPES)
def test_no_absolute_paths_users_or_timestamps(name):
    files = bundle_of(name).files
    user = getpass.getuser()
    for rel, data in files.items():
        text = data.decode()
        assert str(ROOT) not in text, rel
        assert "/home/" not in text and "/root" not in text and "/tmp/" not in text, rel
        if len(user) > 3 and not rel.startswith("runtime/"):   # runtime/ is source, copied verbatim
            assert not re.search(rf"\b{re.escape(user)}\b", text), rel
        assert not re.search(r"20\d\d-\d\d-\d\d[T ]\d\d:\d\d", text), rel


def test_manifest_lists_every_file_with_its_sha256():
    files = bundle_of("tiny_cpu").files
    lines = files["MANIFEST.sha256"].decode().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    assert set(listed) == set(files) - {"MANIFEST.sha256"}
    for rel, digest in listed.items():
        assert hashlib.sha256(files[rel]).hexdigest() == digest


def test_bundle_carries_the_runtime_source():
    files = bundle_of("tiny_cpu").files
    for p in (ROOT / "runtime").glob("*.py"):
        assert files[f"runtime/{p.name}"] == p.read_bytes()


def test_failed_write_leaves_the_previous_bundle(tmp_path):
    out = tmp_path / "out"
    old = {"a.txt": b"old", "MANIFEST.sha256": f"{hashlib.sha256(b'old').hexdigest()}  a.txt\n".encode()}
    assert write_bundle(old, out) == out
    with pytest.raises(TypeError):
        write_bundle({"a.txt": b"new", "b.txt": None}, out)      # fails half-way
    assert (out / "a.txt").read_bytes() == b"old" and not (out / "b.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no temp dir left behind


def test_only_a_previous_bundle_is_replaced(tmp_path):
    """`-o .` or `-o ~/project` must never delete a user's files."""
    files = bundle_of("tiny_cpu").files
    out = write_bundle(files, tmp_path / "out")
    (out / "runtime/__pycache__").mkdir()
    (out / "runtime/__pycache__/plan.cpython-311.pyc").write_bytes(b"")   # running the bundle writes these
    assert write_bundle(files, out) == out                               # a bundle: replaced
    (out / "notes.txt").write_text("mine")
    r = write_bundle(files, out)
    assert isinstance(r, Err) and r.errors[0].path == "-o" and "notes.txt" in r.errors[0].message
    assert (out / "notes.txt").read_text() == "mine"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text("x")
    assert isinstance(write_bundle(files, proj), Err) and (proj / "train.py").is_file()
    (tmp_path / "afile").write_text("x")
    assert "not a directory" in write_bundle(files, tmp_path / "afile").errors[0].message
    (tmp_path / "empty").mkdir()
    assert write_bundle(files, tmp_path / "empty") == tmp_path / "empty"  # an empty dir is fine


def test_launch_scripts_are_executable(tmp_path):
    out = write_bundle(bundle_of("tiny_cpu").files, tmp_path / "b")
    assert os.access(out / "launch.sh", os.X_OK)
    assert not os.access(out / "plan.json", os.X_OK)


def test_runtime_plan_roundtrip():
    import json

    from meshbake.runtime.plan import dumps, from_dict
    files = bundle_of("70b_hsdp_tp").files
    plan = from_dict(json.loads(files["plan.json"]))
    assert dumps(plan).encode() == files["plan.json"]
    assert plan.mesh.world == 64 and plan.train.grad_accum == 8
    assert len(plan.tp.placements) == 80 * 9 + 3


def test_template_context_is_plain_values():
    """render is a view: the templates get the plan (the contract the runtime executes) and the
    stages' views as plain values, never a compiler object to compute from."""
    from meshbake.compiler.render import context
    from meshbake.runtime.plan import Plan

    ctx = context(bundle_of("70b_hsdp_tp_cp").resolved)

    def walk(v, where):
        if isinstance(v, dict):
            # Jinja's `row.items` is dict.items before the key: a view key may not shadow a method
            assert not set(v) & set(dir(dict)), where
            for k, x in v.items():
                walk(x, f"{where}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
        else:
            assert v is None or isinstance(v, (str, int, float)), f"{where}: {type(v).__name__}"

    assert isinstance(ctx.pop("plan"), Plan)
    walk(ctx, "context")
    assert {"model", "mesh", "placements", "est", "cluster", "job_name"} <= set(ctx)


def test_templates_do_no_arithmetic():
    """Every number a template prints comes computed from a stage (or a ParallelDims fact)."""
    from jinja2 import nodes
    from meshbake.compiler.render import TEMPLATES, environment

    env = environment()
    for path in sorted(TEMPLATES.glob("*.j2")):
        ast = env.parse(path.read_text())
        ops = [f"line {n.lineno}: {type(n).__name__}" for n in ast.find_all((nodes.BinExpr, nodes.UnaryExpr))
               if not isinstance(n, nodes.Not)]
        assert not ops, f"{path.name}: {ops}"
