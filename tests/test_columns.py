"""A data source's columns against data.format / data.fields at compile time (issue 22 item 3,
compiler/columns.py): the first record of each source that is on this machine; a source that is
not here is prepare's to read on the cluster."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tests.helpers import ROOT, tiny_recipe

TOK = str(ROOT / "data/chat_tokenizer")


def _compile(tmp, fmt: str, path, **data):
    from meshbake.compiler.pipeline import compile_recipe

    r = tiny_recipe("cols", 1, data={"format": fmt, "path": str(path), "tokenizer": TOK, **data})
    r["model"]["weights"] = "random"
    return compile_recipe(yaml.safe_dump(r), source="cols")


def _only(b) -> str:
    assert not hasattr(b, "files"), "compiled"
    assert [e.path for e in b.errors] == ["data.sources[0].path"], b.errors
    return b.errors[0].message


def test_missing_fields_are_named_with_the_fields_the_records_have(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"question": "q", "output": "o"}) + "\n")
    msg = _only(_compile(tmp_path, "alpaca", a))
    assert msg.endswith("a.jsonl's first record has no field 'instruction', which data.format alpaca reads as "
                        "data.fields.instruction; it has output, question"), msg
    assert hasattr(_compile(tmp_path, "alpaca", a, fields={"instruction": "question"}), "files")
    assert "no field 'text'" in _only(_compile(tmp_path, "text", a))

    c = tmp_path / "sharegpt.jsonl"
    c.write_text(json.dumps({"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n")
    assert "no field 'role' (in messages[0])" in _only(_compile(tmp_path, "chat", c))
    assert hasattr(_compile(tmp_path, "chat", c, fields={"role": "from", "content": "value"}), "files")


def test_parquet_csv_and_folders(tmp_path):
    pq.write_table(pa.table({"prompt": ["p"], "answer": ["a"]}), tmp_path / "d.parquet")
    msg = _only(_compile(tmp_path, "completion", tmp_path / "d.parquet"))
    assert "no field 'completion'" in msg and "it has answer, prompt" in msg, msg
    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    (folder / "train-00000-of-00001.csv").write_text("prompt,completion\np,c\n")
    assert hasattr(_compile(tmp_path, "completion", tmp_path / "ds"), "files")
    # not here: prepare reads it on the cluster (check lists it as missing)
    assert hasattr(_compile(tmp_path, "completion", "data/not-here.jsonl"), "files")
