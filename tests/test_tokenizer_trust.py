"""data.tokenizer is a folder someone else wrote. Its tokenizer_config.json may carry
`fast_tokenizer_files`, a list transformers picks a tokenizer file from by version and then opens
joined to the folder as written: on main 111e863 `["../other/tokenizer.1.0.json"]` (or an absolute
path) made `meshbake prepare` tokenize the run's data with a tokenizer from outside the folder the
recipe names, while `meshbake check` judged the folder's own tokenizer.json. Now both refuse it
(check: data.tokenizer error; prepare: DataError, exit 3); a plain name inside the folder loads.
Real files: the repo's data/tokenizer (GPT-2 style BPE, 4096 ids), copied and edited."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from meshbake.runtime.prepare import DataError, prepare

from tests.helpers import ROOT, tiny_recipe
from tests.test_data import base, jsonl, with_data  # noqa: F401 (base: the compiled tiny plan fixture)
from tests.test_hub import compile_dict

QUIET = {"quiet": True, "log": lambda s: None}
MARK = "<FROM_ELSEWHERE>"


def _tokenizers(tmp: Path, name: str) -> Path:
    """victim/ (the recipe's tokenizer folder) whose config lists `name`, and other/ holding a
    tokenizer.1.0.json with one extra token, so a load from there is visible in the vocabulary."""
    victim, other = tmp / "victim", tmp / "other"
    shutil.copytree(ROOT / "data/tokenizer", victim)
    other.mkdir()
    tj = json.loads((victim / "tokenizer.json").read_text())
    n = max(tj["model"]["vocab"].values()) + 1 + len(tj.get("added_tokens") or [])
    tj.setdefault("added_tokens", []).append({"id": n, "content": MARK, "single_word": False, "lstrip": False,
                                              "rstrip": False, "normalized": False, "special": True})
    for where in (other, victim):
        (where / "tokenizer.1.0.json").write_text(json.dumps(tj))
    cfg = json.loads((victim / "tokenizer_config.json").read_text())
    cfg["fast_tokenizer_files"] = [name.replace("OTHER", str(other))]
    (victim / "tokenizer_config.json").write_text(json.dumps(cfg))
    return victim


@pytest.mark.parametrize("name", ["../other/tokenizer.1.0.json", "OTHER/tokenizer.1.0.json"],
                         ids=["parent", "absolute"])
def test_fast_tokenizer_files_outside_the_folder_are_refused_by_check_and_prepare(tmp_path, base, name):  # noqa: F811
    victim = _tokenizers(tmp_path, name)
    src = jsonl(tmp_path / "t.jsonl", [{"text": f"To be or not to be, record {i}."} for i in range(20)])
    d = tiny_recipe("t", 1, data={"format": "text", "path": str(src), "tokenizer": str(victim)})
    b = compile_dict(d)
    errs = [e for e in b.errors if e.path == "data.tokenizer"] if not hasattr(b, "files") else []
    assert len(errs) == 1 and "fast_tokenizer_files" in errs[0].message, getattr(b, "errors", "compiled")
    plan = with_data(base, tmp_path, "text", src, tokenizer=str(victim), vocab_size=8192)
    with pytest.raises(DataError, match="fast_tokenizer_files names .*not a file name inside the tokenizer folder"):
        prepare(plan, **QUIET)


def test_a_plain_fast_tokenizer_file_inside_the_folder_still_loads(tmp_path):
    from meshbake.runtime import hub

    victim = _tokenizers(tmp_path, "tokenizer.1.0.json")
    assert hub.tokenizer_config_problem(victim) is None
    from transformers import AutoTokenizer

    assert MARK in AutoTokenizer.from_pretrained(str(victim), trust_remote_code=False).get_vocab()
