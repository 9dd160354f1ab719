"""Data as users have it (issue 23): Hugging Face dataset folders, byte-order marks, empty CSV
cells, empty replies, bad records skipped and counted or all listed in one run, and `meshbake
prepare` checking only what preparing needs. Real rows: tests/fixtures/alpaca (Stanford Alpaca,
see its SOURCE.md)."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from meshbake.runtime import plan as P
from meshbake.runtime import prepare as PR
from meshbake.runtime.prepare import DataError, prepare

from tests.helpers import ROOT, cli
from tests.test_data import CHAT_TOK, base, jsonl, with_data  # noqa: F401 - base: the module fixture

ALPACA = json.loads((ROOT / "tests/fixtures/alpaca/alpaca_152.json").read_text())
GOOD = [r for r in ALPACA if r["output"].strip()]          # 150 rows; the other 2 have an empty output
QUIET = {"quiet": True, "log": lambda s: None}


def index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def documents(folder: Path, split: str = "train") -> int:
    return index(folder)["splits"][split]["documents"]


def data_opts(plan: P.Plan, **kw) -> P.Plan:
    return replace(plan, data=replace(plan.data, **kw))


CARD = """---
license: cc-by-nc-4.0
language:
- en
task_categories:
- text-generation
pretty_name: Alpaca sample
---
# Alpaca sample

Rows of the Stanford Alpaca data, as `datasets.Dataset.push_to_hub` lays them out.
"""


# ------------------------------------------------------------------- Hugging Face folders
def hf_folder(tmp: Path, ext: str) -> Path:
    """A dataset folder as the Hub has it: README.md (dataset card), data/{train,test}-00000-of-00001.EXT."""
    import datasets

    d = tmp / f"alpaca-{ext}"
    (d / "data").mkdir(parents=True)
    (d / "README.md").write_text(CARD)
    (d / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    for split, rows in (("train", GOOD[:120]), ("test", GOOD[120:])):
        path = d / f"data/{split}-00000-of-00001.{ext}"
        if ext == "jsonl":
            jsonl(path, rows)
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(path))
    return d


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_a_hugging_face_dataset_folder_reads_its_train_split_not_its_readme(tmp_path, base, ext):  # noqa: F811
    """README.md was read as a text file ("a plain text file holds no 'alpaca' records") and the
    test split trained on; datasets' own rules: the card is no data, data/train-* is train, and
    eval_sources naming the same folder read its test split."""
    d = hf_folder(tmp_path, ext)
    plan = with_data(base, tmp_path, "alpaca", d, seq_len=256)
    folder = prepare(plan, **QUIET)
    assert documents(folder) == 120
    files = [Path(f["path"]).name for f in index(folder)["files"]]
    assert files == [f"train-00000-of-00001.{ext}"]
    held = data_opts(plan, eval_sources=(P.Source(path=str(d), weight=1.0),))
    folder = prepare(held, **QUIET)
    assert documents(folder, "eval") == 30 and documents(folder) == 120
    assert PR.locate(held) == folder                   # the same resolution when the ranks check it


def test_a_dataset_card_configs_section_names_the_data_files(tmp_path, base):  # noqa: F811
    d = tmp_path / "carded"
    (d / "raw").mkdir(parents=True)
    jsonl(d / "raw/part-a.jsonl", GOOD[:40])
    jsonl(d / "raw/part-b.jsonl", GOOD[40:70])
    jsonl(d / "other.jsonl", GOOD[70:])               # not named by the card: not read
    (d / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                 "    path: raw/*.jsonl\n---\n# card\n")
    folder = prepare(with_data(base, tmp_path, "alpaca", d, seq_len=256), **QUIET)
    assert documents(folder) == 70


# ---------------------------------------------------------------------- encodings, CSV
def test_utf8_byte_order_marks_are_accepted_in_jsonl_json_and_csv(tmp_path, base):  # noqa: F811
    rows = GOOD[:20]
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + json.dumps(rows), encoding="utf-8")
    with (tmp_path / "a.csv").open("w", newline="", encoding="utf-8-sig") as f:     # what Excel writes
        w = csv.DictWriter(f, ["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    for name in ("a.jsonl", "a.json", "a.csv"):
        assert (tmp_path / name).read_bytes()[:3] == b"\xef\xbb\xbf"
        plan = with_data(base, tmp_path / name.replace(".", "_"), "alpaca", tmp_path / name, seq_len=256)
        assert documents(prepare(plan, **QUIET)) == 20, name


def test_an_empty_csv_cell_is_an_empty_string_as_in_json(tmp_path, base):  # noqa: F811
    """pandas reads an empty cell (and "NA", "null") as NaN: 'no field prompt' for what JSON
    accepts as "" and text that happens to read "NA"."""
    p = tmp_path / "c.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerows([["", "a completion without a prompt"], ["Say NA.", "NA"], ["q", "null"]])
    j = jsonl(tmp_path / "c.jsonl", [{"prompt": "", "completion": "a completion without a prompt"},
                                     {"prompt": "Say NA.", "completion": "NA"}, {"prompt": "q", "completion": "null"}])
    a = prepare(with_data(base, tmp_path / "csv", "completion", p), **QUIET)
    b = prepare(with_data(base, tmp_path / "json", "completion", j), **QUIET)
    for name in ("input_ids", "labels"):
        assert np.array_equal(np.load(a / f"train/{name}.npy"), np.load(b / f"train/{name}.npy"))


# --------------------------------------------------------------------------- empty replies
def test_an_empty_reply_is_a_bad_record_not_an_end_of_turn_token_to_train(tmp_path, base):  # noqa: F811
    """Two real Alpaca rows have output "": they trained the EOS token alone, silently."""
    src = ROOT / "tests/fixtures/alpaca/alpaca_152.json"
    plan = with_data(base, tmp_path, "alpaca", src, seq_len=256)
    with pytest.raises(DataError) as e:
        prepare(plan, **QUIET)
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"{src} record 151: empty reply") and "1 of 2 bad records" in lines[0]
    assert lines[1] == f"  {src} record 152: " + lines[1].split(": ", 1)[1] and "empty reply" in lines[1]
    with pytest.raises(DataError, match=r"2 of 152 records are bad \(1.3%, more than data.max_bad_fraction 0.01\)"):
        prepare(data_opts(plan, bad_records="skip"), **QUIET)
    folder = prepare(data_opts(plan, bad_records="skip", max_bad_fraction=0.02), **QUIET)
    idx = index(folder)
    assert documents(folder) == 150
    assert idx["bad_records"]["skipped"] == 2 and idx["bad_records"]["by_reason"] == {"empty reply": 2}
    assert prepare(data_opts(plan, train_on="all"), **QUIET)       # the prompt is trained: not empty


def test_a_conversation_whose_replies_are_all_empty_is_a_bad_record(tmp_path, base):  # noqa: F811
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": conv}] * 5 + [{"messages": [conv[0], {"role": "assistant",
                                                                                             "content": " "}]}])
    plan = with_data(base, tmp_path, "chat", src, tokenizer=CHAT_TOK, vocab_size=8192)
    with pytest.raises(DataError, match=r"chat.jsonl:6: empty reply \(every assistant message is empty\)"):
        prepare(plan, **QUIET)
    assert documents(prepare(data_opts(plan, bad_records="skip", max_bad_fraction=0.2), **QUIET)) == 5


# ---------------------------------------------------------------------------- bad records
def mixed(tmp: Path, n: int = 200, every: int = 0) -> Path:
    """n completion records as jsonl lines; record k is bad when every and k % every == 3:
    alternately a missing field, a malformed line, an empty completion."""
    lines = []
    for k in range(n):
        rec = {"prompt": f"question {k}", "completion": f"answer {k}"}
        kind = (k // every) % 3 if every and k % every == 3 else None
        if kind == 0:
            del rec["completion"]
        lines.append('{"prompt": "broken' if kind == 1 else json.dumps({**rec, "completion": ""} if kind == 2 else rec))
    p = tmp / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_skip_leaves_bad_records_out_counts_them_by_reason_and_shows_where(tmp_path, base):  # noqa: F811
    src = mixed(tmp_path, 200, every=70)               # records 4, 74, 144 (lines 4, 74, 144): three kinds
    logged = []
    plan = with_data(base, tmp_path, "completion", src, bad_records="skip", max_bad_fraction=0.02)
    folder = prepare(plan, quiet=True, log=logged.append)
    idx = index(folder)
    assert documents(folder) == 197
    assert idx["bad_records"]["skipped"] == 3
    assert idx["bad_records"]["by_reason"] == {"no field 'completion'": 1, "not a JSON record": 1, "empty reply": 1}
    report = "\n".join(logged)
    assert "skipped 3 bad records" in report
    for line in (4, 74, 144):
        assert f"{src}:{line}: " in report
    # the records after the malformed line keep their own line numbers
    assert [m.split(": ")[0] for m in idx["bad_records"]["first"]] == [f"{src}:74", f"{src}:4", f"{src}:144"]


def test_skip_fails_when_bad_records_exceed_max_bad_fraction(tmp_path, base):  # noqa: F811
    src = mixed(tmp_path, 200, every=70)               # 3 of 200 = 1.5%
    plan = with_data(base, tmp_path, "completion", src, bad_records="skip")      # default 0.01
    with pytest.raises(DataError, match=r"data.sources: (at least )?[23] of 200 records are bad .*more than "
                                        r"data.max_bad_fraction 0.01"):
        prepare(plan, **QUIET)
    assert not list((tmp_path / "prepared").glob("*.current"))


def test_error_mode_lists_every_bad_record_of_the_prepare_in_one_run(tmp_path, base, capsys):  # noqa: F811
    """One bad record stopped prepare, the next run found the next one (10-20 s each). Now exit 3
    with every bad record: the first line the first record, then 19 more, then how many more; the
    eval sources' bad records are in the same run."""
    src = mixed(tmp_path, 400, every=10)               # 40 bad records, lines 4, 14, ..., 394
    ev = jsonl(tmp_path / "ev.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    plan = with_data(base, tmp_path, "completion", src)
    plan = data_opts(plan, eval_sources=(P.Source(path=str(ev), weight=1.0),))
    (tmp_path / "plan.json").write_text(P.dumps(plan))
    assert PR.main([str(tmp_path / "plan.json"), "--quiet"]) == 3
    err = capsys.readouterr().err.splitlines()
    mine = [ln for ln in err if ln.startswith("meshbake: ")]
    assert len(mine) == 1 and err[0] == mine[0]
    assert "1 of 41 bad records (data.bad_records: error)" in err[0] and "data.bad_records: skip" in err[0]
    assert len(err) == 1 + 19 + 1 and err[-1] == "  ... and 21 more"
    # malformed lines are found first (the file check before datasets reads it), then the records in order
    assert err[0].startswith(f"meshbake: {src}:14: not a JSON record")
    listed = [ln.strip().split(": ")[0] for ln in err[1:-1]]
    assert listed[:3] == [f"{src}:{n}" for n in (44, 74, 104)] and f"{src}:4" in listed
    assert "not a JSON record" in "\n".join(err) and "empty reply" in "\n".join(err)


def test_one_bad_record_is_still_one_line(tmp_path, base):  # noqa: F811
    src = mixed(tmp_path, 50)
    src.write_text(src.read_text() + '{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:51: no field 'completion'.*data.bad_records: skip") as e:
        prepare(with_data(base, tmp_path, "completion", src), **QUIET)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------- prepare's own checks
def test_prepare_does_not_need_a_model_that_fits_check_and_bundle_do(tmp_path):
    """The GPU-memory check blocked `meshbake prepare`, which loads no model."""
    src = jsonl(tmp_path / "d.jsonl", [{"text": f"To be, or not to be, that is the question {i}."} for i in range(30)])
    r = yaml.safe_load((ROOT / "recipes/tiny_cpu.yaml").read_text())
    r["cluster"]["gpu_memory_gb"] = 0.001              # 1 MB per rank: far over the estimate
    r["data"] = {"format": "text", "path": str(src), "tokenizer": str(ROOT / "data/tokenizer"),
                 "prepared_dir": "prepared"}
    recipe = tmp_path / "over.yaml"
    recipe.write_text(yaml.safe_dump(r))
    checked = cli("check", str(recipe), cwd=tmp_path)
    assert checked.returncode == 2 and "cluster.gpu_memory_gb" in checked.stderr, checked.stderr
    prepared = cli("prepare", str(recipe), "--quiet", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert list((tmp_path / "prepared").glob("*.current"))
    bad = dict(r, data={**r["data"], "format": "chat"})  # prepare's own checks still run
    recipe.write_text(yaml.safe_dump(bad))
    again = cli("prepare", str(recipe), "--quiet", cwd=tmp_path)
    # a chat format without a chat template: the compiler's tokenizer check (exit 2), before any record
    assert again.returncode == 2 and "has no chat template" in again.stderr, again.stderr
    assert "model.weights" not in again.stderr         # random weights are the model's question, not prepare's
