"""Issue 9, finding 1: no value from a recipe runs as code in launch.sh or job.sbatch.

The scripts are really run, with stub commands first on PATH (python3, srun, scontrol write what
they were given to a file and exit 0), so the test sees exactly what bash made of each value.
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
from pathlib import Path

import jinja2
import pytest
from meshbake.compiler import render
from meshbake.compiler.errors import Err
from meshbake.compiler.pipeline import resolve_dict
from meshbake.compiler.validate import schema

BASE = {
    "name": "t",
    "model": {"config": "tiny-llama"},
    "mesh": {"tp": 2},
    "cluster": {"nodes": 1, "gpus_per_node": 2, "device": "cpu", "gpu_memory_gb": 2},
    "train": {"seq_len": 64, "global_batch_size": 2, "steps": 2},
}

STUB = """#!/usr/bin/env bash
# what the stubbed command saw: its name, the run dir, cluster.env's NCCL_FUZZ, its arguments
printf '%s\\0' "$(basename "$0")" "${MESHBAKE_RUN_DIR-<unset>}" "${NCCL_FUZZ-<unset>}" "$@" > "${STUB_OUT}/$(basename "$0").$$"
"""


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stubbin")
    for name in ("python3", "srun", "scontrol", "-mark"):
        (d / name).write_text(STUB)
        (d / name).chmod(0o755)
    return d


_BASE_RES = {}


def _resolve_fast(d: dict):
    """resolve_dict, but the model/mesh/placements of BASE are reused when only strings changed
    (the property test below compiles hundreds of recipes; the schema still judges each one)."""
    from dataclasses import replace

    from meshbake.compiler.validate import validate_all

    if "res" not in _BASE_RES:
        _BASE_RES["res"] = resolve_dict(BASE)
    base = _BASE_RES["res"]
    recipe, errs = validate_all(d)
    if recipe is None or errs:
        return Err(tuple(errs))
    if (recipe.model, recipe.mesh, recipe.train) != (base.recipe.model, base.recipe.mesh, base.recipe.train):
        return resolve_dict(d)
    return replace(base, recipe=recipe, plan=replace(base.plan, name=recipe.name, run_dir=recipe.run_dir))


def bundle(tmp: Path, **changes) -> Path | Err:
    d = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node = d
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    res = _resolve_fast(d)
    if isinstance(res, Err):
        return res
    out = tmp / "bundle"
    out.mkdir()
    for rel, data in render.render_bundle(res).items():
        if "/" not in rel:
            (out / rel).write_bytes(data)
    return out


def run_script(out: Path, script: str, stubs: Path, tmp: Path) -> list[list[str]]:
    """Run the script from an empty cwd; -> the argv records of the stubs; cwd must stay empty."""
    cwd, rec = tmp / "cwd", tmp / "rec"
    cwd.mkdir()
    rec.mkdir()
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_OUT": str(rec), "HOME": str(tmp)}
    if script == "job.sbatch":
        env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", MESHBAKE_BUNDLE_DIR=str(out), SLURM_SUBMIT_DIR=str(tmp))
    r = subprocess.run(["bash", str(out / script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(cwd)) == [], f"{script} created files in its cwd: {os.listdir(cwd)}"
    return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(rec.iterdir())]


def run_dirs_seen(out, script, stubs, tmp) -> set[str]:
    seen = {r[1] for r in run_script(out, script, stubs, tmp)}
    assert seen, f"{script} ran no stub"
    return seen


def test_run_dir_with_command_substitution_is_inert(stubs, tmp_path):
    """`--set 'run_dir=runs/$(touch PWNED)'` created PWNED when launch.sh or job.sbatch ran."""
    value = "runs/$(touch PWNED)`touch PWNED2`${IFS}$(touch PWNED3)"
    out = bundle(tmp_path, run_dir=value)
    assert not isinstance(out, Err), out
    for script in ("launch.sh", "job.sbatch"):
        sub = tmp_path / script
        sub.mkdir()
        assert run_dirs_seen(out, script, stubs, sub) == {value}


def test_run_dir_with_space_is_one_directory_without_quotes(stubs, tmp_path):
    """`run_dir=runs/my run` trained into `./'runs/my run'/` (the quotes became part of the name)."""
    out = bundle(tmp_path, run_dir="runs/my run")
    for script in ("launch.sh", "job.sbatch"):
        sub = tmp_path / script
        sub.mkdir()
        assert run_dirs_seen(out, script, stubs, sub) == {"runs/my run"}


def test_env_setup_starting_with_dash_runs(stubs, tmp_path):
    """`eval '-mark'` is `eval: -m: invalid option`; `eval -- '-mark'` runs the command -mark."""
    out = bundle(tmp_path, cluster__env_setup="-mark --flag")
    recs = run_script(out, "launch.sh", stubs, tmp_path)
    assert any(r[0] == "-mark" and r[3:] == ["--flag"] for r in recs), recs


# ---- the schema: full-match, ASCII-only patterns --------------------------------------------------

def _patterns(node, path=""):
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            yield path, node["pattern"]
        for k, v in node.items():
            yield from _patterns(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _patterns(v, f"{path}[{i}]")


PATTERNS = list(_patterns(schema()))


def test_schema_has_patterns():
    assert len(PATTERNS) >= 8


@pytest.mark.parametrize("where,pattern", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_pattern_refuses_trailing_newline_and_non_ascii_digits(where, pattern):
    """jsonschema runs re.search: Python's `$` also matches before a final newline, `\\d` matches
    '１' (fullwidth). Every pattern must refuse 'good value' + newline and must not use \\d, \\w, \\s."""
    from jsonschema import Draft202012Validator

    assert not re.search(r"\\[dwsDWS]", pattern), f"{where}: {pattern} uses a Unicode-wide class"
    v = Draft202012Validator({"type": "string", "pattern": pattern})
    good = next((g for g in ("gpu", "HF_TOKEN", "01:00:00", "480G") if v.is_valid(g)), None)
    assert good, f"{where}: add a value its pattern accepts to this test"
    # env_setup may span lines (it is the user's own shell code); no other value may
    bads = (good + "\x00", good + "\x1b") if where.endswith("env_setup") else (
        good + "\n", good + "\n\n", "\n" + good, good + "\x00")
    for bad in bads:
        assert not v.is_valid(bad), (where, bad)


def test_time_refuses_fullwidth_digits():
    out = resolve_dict({**BASE, "cluster": {**BASE["cluster"], "time": "１２:00:00"}})
    assert isinstance(out, Err) and [e.path for e in out.errors] == ["cluster.time"]


# ---- the templates: one quoting rule, enforced --------------------------------------------------

def test_shell_templates_refuse_an_unquoted_string():
    env = render.environment(shell=True)
    with pytest.raises(ValueError, match="unquoted value"):
        env.from_string("x={{ v }}").render(v="$(id)")
    assert env.from_string("x={{ v | shquote }} n={{ n }}").render(v="$(id)", n=3) == "x='$(id)' n=3"
    with pytest.raises(ValueError, match="SBATCH"):
        env.from_string("#SBATCH --qos={{ v | token }}").render(v="a\n#SBATCH --x")


def test_every_interpolation_in_shell_templates_is_filtered():
    """Audit of the templates' text: each {{ }} is an integer field or ends in | shquote / | token."""
    ints = re.compile(r"^(plan\.mesh\.\w+|cluster\.(signal_seconds|cpus_per_task)|2 \* plan\.mesh\.cp)$")
    for name in render.SHELL_TEMPLATES:
        text = (render.TEMPLATES / f"{name}.j2").read_text()
        for expr in re.findall(r"{{(.*?)}}", text):
            expr = expr.strip()
            assert expr.endswith(("| shquote", "| token")) or ints.match(expr), f"{name}: {{{{ {expr} }}}}"
        assert not re.search(r'"[^"\n]*{{[^}]*shquote', text), f"{name}: a shquoted value inside double quotes"


# ---- property: random strings in every field that reaches a script ------------------------------

ALPHABET = list("ab-_./ 0") + list("'\"$`\\;&|<>(){}[]*?!#~%^=,:+@") + ["\n", "\t", "\r", "\x00", "\x1b",
                                                                       "é", "１", "＄", "\u202e", "\u3000", "😀"]
PIECES = ["$(touch PWNED)", "`touch PWNED`", "${IFS}", "'\"'\"'", "\n#SBATCH --x", "-", "--", "$HOME", "\\"]
FIELDS = ["name", "run_dir", "cluster__partition", "cluster__account", "cluster__qos", "cluster__constraint",
          "cluster__time", "cluster__mem", "cluster__env_setup", "cluster__env_pass", "cluster__gpu_type",
          "cluster__container_image", "cluster__container_mounts", "cluster__env"]


def _html_tags(markdown: str) -> set[str]:
    from markdown_it import MarkdownIt

    return set(re.findall(r"<(/?[A-Za-z!][A-Za-z0-9-]*)", MarkdownIt("commonmark").enable("table").render(markdown)))


def _base_plan_md(field: str = "") -> str:
    d = json.loads(json.dumps(BASE))
    if field == "cluster__env_setup":      # a set env_setup is shown in a fenced block: <pre><code> of its own
        d["cluster"]["env_setup"] = "true"
    return render.render_bundle(_resolve_fast(d))["PLAN.md"].decode()


def random_string(rng: random.Random) -> str:
    if rng.random() < 0.4:      # characters some whitelists allow, so those fields get accepted too
        return "".join(rng.choice("aZ09_.:/#@+=-,|&()[]*") for _ in range(rng.randint(1, 10)))
    parts = [rng.choice(PIECES) if rng.random() < 0.3 else rng.choice(ALPHABET) for _ in range(rng.randint(1, 8))]
    return "".join(parts)


def test_random_strings_are_refused_or_reach_the_script_exactly(stubs, tmp_path):
    rng = random.Random(9)
    refused = accepted = 0
    per_field: dict[str, int] = {}
    for i in range(140):
        field = FIELDS[i % len(FIELDS)]
        s = random_string(rng)
        case = tmp_path / str(i)
        case.mkdir()
        if field == "cluster__env_setup":
            # the user's own code runs: it must see the exact string it was given
            value: object = f"printf '%s' {shlex.quote(s)} > \"$STUB_OUT/env_setup\""
        elif field in ("cluster__env_pass", "cluster__container_mounts"):
            value = [s]
        elif field == "cluster__env":
            value = {"NCCL_FUZZ": s}
        else:
            value = s
        out = bundle(case, **{field: value})
        if isinstance(out, Err):
            refused += 1
            continue
        accepted += 1
        per_field[field] = per_field.get(field, 0) + 1
        for script in ("launch.sh", "job.sbatch"):
            r = subprocess.run(["bash", "-n", str(out / script)], capture_output=True, text=True)
            assert r.returncode == 0, (field, s, r.stderr)
            sub = case / script
            sub.mkdir()
            recs = run_script(out, script, stubs, sub)
            if field == "run_dir":
                assert {r[1] for r in recs} == {s}, (script, s, recs)
            if field == "cluster__env" and script == "job.sbatch":
                assert {r[2] for r in recs} == {s}, (s, recs)
            if field in ("cluster__container_image", "cluster__container_mounts") and script == "job.sbatch":
                args = [a for r in recs if r[0] == "srun" for a in r[3:]]
                want = f"--container-image={s}" if field == "cluster__container_image" else None
                assert (want in args) if want else any(a.endswith("," + s) for a in args), (s, args)
            if field == "cluster__env_setup" and script == "launch.sh":
                assert (sub / "rec" / "env_setup").read_bytes().decode() == s, s
        plan_md_tags = _html_tags((out / "PLAN.md").read_text())
        assert plan_md_tags <= _html_tags(_base_plan_md(field)), (field, s, plan_md_tags)   # no markup from s
        sbatch = (out / "job.sbatch").read_text()
        flag = {"name": "job-name", "cluster__time": "time", "cluster__mem": "mem"}.get(
            field, field.removeprefix("cluster__"))
        if field in ("name", "cluster__partition", "cluster__account", "cluster__qos", "cluster__constraint",
                     "cluster__time", "cluster__mem"):
            prefix = "meshbake-" if field == "name" else ""
            assert f"#SBATCH --{flag}={prefix}{s}\n" in sbatch, (field, s)
    print(f"accepted per field: {per_field}; refused {refused}")
    assert refused > 20 and accepted > 20, (refused, accepted)
    # the free-text fields reach the scripts (and are checked there), not only refusals
    assert {"run_dir", "cluster__env_setup", "cluster__env"} <= set(per_field), per_field


def test_finalize_refuses_markup_objects_too():
    """A jinja2 Markup (str subclass) is no licence to skip quoting."""
    env = render.environment(shell=True)
    with pytest.raises(ValueError):
        env.from_string("{{ v }}").render(v=jinja2.utils.markupsafe.Markup("$(id)"))
