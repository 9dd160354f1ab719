"""Issue 21, prepared data: trust nothing in <prepared_dir> we did not write, and bound the work a
recipe's inputs can ask for. The .current pointer names one real directory inside prepared_dir
(not /etc, not ../x, not a symlink); an index that lists fewer (or no) files than the sources
resolve to is stale, never 'fresh'; writes there follow no planted symlink; a chat template that
loops without bound is refused per record within seconds; the jsonl line check is linear."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshbake.runtime import plan as P
from meshbake.runtime import prepare as PR
from meshbake.runtime.data import load_data
from meshbake.runtime.errors import UserError
from meshbake.runtime.prepare import DataError, locate, pointer_path, prepare

from tests import test_data as TD
from tests.test_data import CHAT_TOK, jsonl, with_data

base = TD.base                          # the compiled tiny plan (a module-scoped fixture)
QUIET = {"quiet": True, "log": lambda s: None}


# ------------------------------------------------------------------- jsonl line check: linear
def _check_seconds(path: Path) -> float:
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        PR._check_text(path)
        best = min(best, time.perf_counter() - t)
    return best


def test_the_jsonl_line_check_is_linear_in_line_length(tmp_path, monkeypatch):
    """One n-byte line read in c-byte chunks: re-joining the line so far per chunk copied n^2 / 2c
    bytes. With 64 KiB chunks that is 2 GiB for 16 MiB (seconds), against 128 MiB for 4 MiB: the
    ratio 16 MiB / 4 MiB is ~16 when quadratic, ~4 when linear. A ratio, not an absolute time."""
    monkeypatch.setattr(PR, "_CHUNK", 64 << 10)
    times = {}
    for mb in (4, 16):
        p = tmp_path / f"long{mb}.jsonl"
        p.write_text('{"text": "' + "a" * (mb << 20) + '"}\n{"text": "b"}\n')
        times[mb] = _check_seconds(p)
        p.unlink()
    assert times[16] < 6 * times[4] + 0.3, times


# ------------------------------------------------------------------------- prepared data trust


def prepared(tmp_path, base):
    src = jsonl(tmp_path / "t.jsonl", [{"text": f"To be or not to be, record {i}."} for i in range(50)])
    plan = with_data(base, tmp_path, "text", src)
    return plan, prepare(plan, **QUIET), src


@pytest.mark.parametrize("target", ["/etc", "../x", "d-0123456789abcdef/../../etc"])
def test_a_pointer_naming_a_directory_outside_prepared_dir_is_refused(tmp_path, base, target):
    plan, d, _ = prepared(tmp_path, base)
    fp = json.loads(pointer_path(plan).read_text())["fingerprint"]
    pointer_path(plan).write_text(json.dumps({"dir": target, "fingerprint": fp}))
    with pytest.raises(DataError, match=r"\.current: does not name a prepared directory .*run `meshbake prepare") as e:
        locate(plan)
    assert "\n" not in str(e.value)


def test_a_pointer_naming_a_symlinked_directory_is_refused(tmp_path, base):
    plan, d, _ = prepared(tmp_path, base)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(d, elsewhere)
    d.symlink_to(elsewhere)                        # same name, now a symlink to a directory elsewhere
    with pytest.raises(DataError, match=r"is a symbolic link, not a directory meshbake prepared"):
        locate(plan)


def test_an_index_listing_no_files_is_stale_not_fresh(tmp_path, base):
    plan, d, src = prepared(tmp_path, base)
    idx = json.loads((d / "index.json").read_text())
    for files in ([], idx["files"][:0], [dict(idx["files"][0], path=str(tmp_path / "other.jsonl"))]):
        (d / "index.json").write_text(json.dumps(dict(idx, files=files)))
        jsonl(src, [{"text": "changed"}] * 50)      # the source changed: the check must see it
        with pytest.raises(DataError, match="is stale"):
            locate(plan)
    (d / "index.json").write_text(json.dumps(dict(idx, tokenizer_files=[])))
    with pytest.raises(DataError, match="is stale"):
        locate(plan)


def test_a_symlink_at_the_old_pointer_temp_is_not_written_through(tmp_path, base):
    src = jsonl(tmp_path / "t.jsonl", [{"text": f"record {i}."} for i in range(50)])
    plan = with_data(base, tmp_path, "text", src)
    root = Path(plan.data.prepared_dir)
    root.mkdir(parents=True)
    victim = tmp_path / "victim.pth"
    victim.write_text("untouched\n")
    pointer_path(plan).with_suffix(f".tmp{os.getpid()}").symlink_to(victim)   # the old, guessable temp name
    prepare(plan, **QUIET)
    assert victim.read_text() == "untouched\n"
    assert locate(plan).parent == root


def test_a_symlink_planted_as_the_pointer_or_the_prepared_dir_is_refused(tmp_path, base):
    plan, d, src = prepared(tmp_path, base)
    ptr = pointer_path(plan)
    victim = tmp_path / "victim.pth"
    victim.write_text("untouched\n")
    ptr.unlink()
    ptr.symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        prepare(plan, **QUIET)
    assert victim.read_text() == "untouched\n"
    ptr.unlink()
    # the content-named directory replaced by a symlink to a copy (index.json and all): the next
    # prepare of the same content must neither write its index there nor point at it
    copy = tmp_path / "copy"
    shutil.move(d, copy)
    d.symlink_to(copy)
    before = (copy / "index.json").read_text()
    with pytest.raises(DataError, match="is a symbolic link"):
        prepare(plan, **QUIET)
    assert (copy / "index.json").read_text() == before and not ptr.exists()


def test_npy_files_are_opened_only_as_regular_files_inside_the_prepared_dir(tmp_path, base):
    plan, d, _ = prepared(tmp_path, base)
    assert load_data(plan, 1)[0].windows > 0
    real = tmp_path / "labels.npy"
    shutil.move(d / "train/labels.npy", real)
    (d / "train/labels.npy").symlink_to(real)
    with pytest.raises(UserError, match=r"labels.npy: is a symbolic link"):
        load_data(plan, 1)


def test_prepare_cli_refuses_a_planted_pointer_in_one_line(tmp_path, base):
    plan, d, _ = prepared(tmp_path, base)
    (tmp_path / "plan.json").write_text(P.dumps(plan))
    pointer_path(plan).write_text(json.dumps({"dir": "/etc", "fingerprint": "0" * 64}))
    r = subprocess.run([sys.executable, "-m", "meshbake.runtime.prepare", str(tmp_path / "plan.json"), "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "does not name a prepared directory" in r.stderr


# ------------------------------------------------------------------- chat template: bounded
NESTED = ("{% for a in range(100000) %}{% for b in range(100000) %}{{ messages[0]['content'] }}"
          "{% endfor %}{% endfor %}")
SILENT = ("{% macro m() %}{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
          "{% endmacro %}{{ m() }}")
BIG = "{{ 'x' | center(10000000000) }}"


@pytest.mark.parametrize("template,match", [(NESTED, "built a string of more than 1,048,576 characters|took more|"
                                                     "looped over ranges"),
                                            (SILENT, "took more than 2 s|looped over ranges of more than"),
                                            (BIG, "a number beyond the 1,048,576-character cap")])
def test_a_chat_template_that_loops_without_bound_is_refused_per_record(tmp_path, base, template, match):
    """A real tokenizer (data/chat_tokenizer) whose chat template is replaced by one that loops:
    prepare refuses within seconds naming the record and the cap, in bounded memory (run in a
    subprocess so its peak RSS is its own)."""
    tok = tmp_path / "tok"
    shutil.copytree(CHAT_TOK, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in tok.glob("chat_template.jinja"):
        extra.write_text(template)
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}] * 3)
    plan = with_data(base, tmp_path, "chat", src, tokenizer=str(tok), vocab_size=8192)
    (tmp_path / "plan.json").write_text(P.dumps(plan))
    code = ("import resource, sys; from meshbake.runtime.prepare import main; rc = main(sys.argv[1:]); "
            "print('rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "plan.json"), "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    took = time.perf_counter() - t
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("meshbake:")]
    assert r.returncode == 3, r.stderr[-2000:]
    assert len(err) == 1 and "chat.jsonl:1: the chat template" in err[0], r.stderr[-2000:]
    assert re.search(match, err[0]) and "cap per record" in err[0]
    assert took < 30                                    # refused in seconds, not minutes (imports included)
    assert int(r.stdout.split()[-1]) < 2 << 20          # peak RSS (KiB) < 2 GiB: bounded, not 2.6 GB and growing
