"""prepare's start-up (issue 23): `meshbake prepare` resolves the data section without building the
model, and a small jsonl file is read without datasets when datasets would give the same records.
Structure only (what is imported, what is equal), never a timing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import meshbake.runtime.prepare as PR
import pytest
import yaml
from meshbake.compiler import load
from meshbake.compiler.errors import Err
from meshbake.compiler.pipeline import resolve_data_dict, resolve_dict

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from meshbake.compiler.cli import main
rc = main(["prepare", "RECIPE", "--quiet"])
built = sorted(m for m in sys.modules if m.startswith("transformers.models.llama") or m == "transformers.modeling_utils")
print("RESULT", rc, built, "datasets" in sys.modules)
"""


def test_prepare_builds_no_model_and_reads_jsonl_without_datasets(tmp_path):
    """`meshbake prepare tiny_chat` in a fresh process: no modeling code imported (the meta-model build
    was ~4 s of its start-up), no datasets (its import and arrow cache: ~1.5 s) for a small jsonl file."""
    r = yaml.safe_load((ROOT / "recipes/tiny_chat.yaml").read_text())
    r["data"].update(path=str(ROOT / r["data"]["path"]), tokenizer=str(ROOT / r["data"]["tokenizer"]))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    out = subprocess.run([sys.executable, "-c", PROBE.replace("RECIPE", str(tmp_path / "r.yaml"))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr
    assert line[0] == "RESULT 0 [] False", (line[0], out.stderr[-2000:])
    assert list((tmp_path / "prepared").glob("tiny_chat-*.current"))


def test_data_plan_is_the_full_plans():
    """The plan prepare resolves is the compiled plan's data section, seq_len, seed and version: the
    same prepared directory and fingerprint that the ranks check."""
    d = load.load_recipe("tiny_chat", (), None)
    full, light = resolve_dict(d), resolve_data_dict(d)
    assert not isinstance(full, Err) and not isinstance(light, Err)
    assert light.data == full.plan.data and light.name == full.plan.name
    assert (light.train.seq_len, light.train.seed) == (full.plan.train.seq_len, full.plan.train.seed)
    assert PR.pointer_path(light) == PR.pointer_path(full.plan)
    assert light.versions["meshbake"] == full.plan.versions["meshbake"]


def test_prepare_still_reports_recipe_and_model_config_errors():
    d = load.load_recipe("tiny_chat", (), None)
    bad = resolve_data_dict({**d, "train": {**d["train"], "seq_len": "x"}})
    assert isinstance(bad, Err) and any(e.path == "train.seq_len" for e in bad.errors)
    cfg = resolve_data_dict({**d, "model": {**d["model"], "config": "no-such-model-xyz"}})
    assert isinstance(cfg, Err) and cfg.errors[0].path == "model.config"


def typed(v):
    """A value with its types spelled out: 1, 1.0 and True differ; dict key order counts."""
    if isinstance(v, dict):
        return ("dict", [(k, typed(x)) for k, x in v.items()])
    if isinstance(v, list):
        return ("list", [typed(x) for x in v])
    return (type(v).__name__, repr(v))


def loaded(path: Path, tmp: Path, fast: bool, monkeypatch):
    monkeypatch.setattr(PR, "FAST_JSONL_BYTES", 64 << 20 if fast else 0)
    ds, lines, bad = PR._load("files", path, "chat", tmp / ("fast" if fast else "slow"))
    rows = None if ds is None else [typed(b) for b in ds.iter(batch_size=7)]
    part = None if ds is None or len(ds) < 3 else [typed(b) for b in ds.select(range(1, 3)).iter(batch_size=512)]
    return type(ds).__name__, rows, part, None if lines is None else list(lines), bad


CASES = {
    "uniform": ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "n": 1}',
                '', '{"messages": [{"role": "user", "content": "a"}], "n": 2}', 'not json', '[1]',
                '{"messages": [], "n": null}'],
    "missing_key": ['{"a": "x", "b": "y"}', '{"a": "z"}'],
    "nested_missing": ['{"m": [{"role": "user", "content": "x", "name": "n"}]}', '{"m": [{"role": "u", "content": "y"}]}'],
    "key_order": ['{"a": "x", "b": "y"}', '{"b": "y", "a": "x"}'],
    "int_float": ['{"a": 1}', '{"a": 2.5}'],
    "dates": ['{"a": "2024-01-02"}', '{"a": "text"}'],
    "empty_object": ['{"a": {}}', '{"a": {}}'],
    "nulls": ['{"a": null, "t": [null, "x"]}', '{"a": {"k": 1}, "t": []}'],
    "big_int": ['{"a": 123456789012345678901234567890}'],
    "bom_and_types": ['\ufeff{"a": true, "b": -0.0, "c": [[1, 2], []], "d": "\\u00e9\\u2028x"}'],
}


@pytest.mark.parametrize("name", sorted(CASES) + ["chatterbot", "glaive"])
def test_fast_jsonl_records_are_datasets_records(tmp_path, monkeypatch, name):
    """The in-memory reader gives exactly what datasets' json loader gives (values, types, key order,
    each record's line, the malformed lines), or is not used (other keys or types across records)."""
    if name == "chatterbot":
        path = ROOT / "data/chat/chatterbot_en.jsonl"
    elif name == "glaive":
        path = ROOT / "tests/fixtures/glaive_toolcall_sample.jsonl"
    else:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(CASES[name]) + "\n", encoding="utf-8")
    try:
        slow = loaded(path, tmp_path, False, monkeypatch)
    except PR.DataError as e:              # datasets refuses the file (an int beyond int64): so must the fast path
        with pytest.raises(PR.DataError) as e2:
            loaded(path, tmp_path, True, monkeypatch)
        assert str(e2.value) == str(e)
        return
    fast = loaded(path, tmp_path, True, monkeypatch)
    assert fast[1:] == slow[1:]
    assert fast[0] == ("_Rows" if name in ("uniform", "chatterbot", "glaive", "bom_and_types", "nulls")
                       else "Dataset"), fast[0]


def test_tiny_chat_prepares_the_same_bytes_either_way(tmp_path, monkeypatch):
    """End to end: the prepared windows are the same with and without the in-memory reader."""
    from dataclasses import replace

    d = load.load_recipe("tiny_chat", (), None)
    d["data"]["path"] = str(ROOT / d["data"]["path"])
    d["data"]["tokenizer"] = str(ROOT / d["data"]["tokenizer"])
    plan = resolve_data_dict(d)
    assert not isinstance(plan, Err)
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(PR, "FAST_JSONL_BYTES", 64 << 20 if fast else 0)
        p = replace(plan, data=replace(plan.data, prepared_dir=str(tmp_path / str(fast))))
        folder = PR.prepare(p, quiet=True, log=lambda s: None)
        out[fast] = {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*.npy"))}
        idx = json.loads((folder / "index.json").read_text())
        out[fast]["splits"] = json.dumps(idx["splits"], sort_keys=True).encode()
    assert out[True] == out[False] and len(out[True]) == 9
