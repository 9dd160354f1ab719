"""Trust nothing you did not write (issue 21): export copies no secret out of a tokenizer folder,
a checkpoint's names stay inside its step dir, and checkpoint writes and logs cannot be steered
by what someone else planted in the run dir.

One real checkpoint per module (a 1-process gloo group saves the tiny-llama through
checkpoint.save, as in tests/test_integrity.py); each test works on a private copy. A FIFO
would hang an unguarded open(): those tests run under an alarm, so a hang is a failure.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from tests.helpers import no_hang, one_process_group
from tests.test_integrity import _rehash, export, fresh, make_run

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- not-for-upload"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trust")
    make_run(base / "runs/runA")
    return base


def _model_and_opt(run: Path):
    import torch
    from meshbake.runtime.parallel import hf_config
    from meshbake.runtime.plan import load_plan
    from transformers import AutoModelForCausalLM

    plan = load_plan(str(run / "plan.json"))
    m = AutoModelForCausalLM.from_config(hf_config(plan.model.config), dtype=torch.float32)
    return m, torch.optim.AdamW(m.parameters())


# ------------------------------------------------------------------ export copies secrets
def test_export_copies_no_link_and_nothing_but_tokenizer_files(saved, tmp_path):
    """The issue's folder: environ.txt -> /proc/self/environ and id_rsa -> a key beside the real
    tokenizer files; links under tokenizer names and a FIFO too. Only the regular tokenizer files
    are exported and listed; a model's config.json in the folder does not replace the export's."""
    w = fresh(saved, tmp_path)
    secret = tmp_path / "id_rsa"
    secret.write_text(SECRET + "\n")
    tok = w / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (tok / "config.json").write_text('{"base": "model"}\n')
    (tok / "environ.txt").symlink_to("/proc/self/environ")
    (tok / "id_rsa").symlink_to(secret)
    (tok / "tokenizer.model").symlink_to(secret)                 # a tokenizer name, a link
    (tok / "special_tokens_map.json").symlink_to("/proc/self/environ")
    os.mkfifo(tok / "vocab.json")                                # opened, it would block forever
    (tok / "evil\nmeshbake export: done").write_text("x")
    plan = json.loads((w / "runs/runA/plan.json").read_text())
    plan["data"]["tokenizer"] = str(tok)
    (w / "runs/runA/plan.json").write_text(json.dumps(plan))
    os.environ["MESHBAKE_TRUST_CANARY"] = "hf_canary_token_value"
    try:
        with no_hang(300):
            r = export("runs/runA", "-o", "hf", cwd=w)
    finally:
        del os.environ["MESHBAKE_TRUST_CANARY"]
    assert r.returncode == 0, r.stderr[-3000:]
    out = w / "hf"
    have = sorted(p.name for p in out.iterdir())
    listed = json.loads((out / "meshbake-export.json").read_text())["files"]
    assert listed == sorted(set(have) - {"meshbake-export.json"})
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(listed)
    for gone in ("environ.txt", "id_rsa", "tokenizer.model", "special_tokens_map.json", "vocab.json"):
        assert gone not in have, have
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}\n'
    assert json.loads((out / "config.json").read_text()).get("base") is None     # the model's own
    for p in out.iterdir():
        data = p.read_bytes()
        assert SECRET.encode() not in data and b"hf_canary_token_value" not in data, p.name
    lines = r.stderr.splitlines()
    assert any("not regular files" in x and "tokenizer.model (a symbolic link)" in x and "vocab.json (a FIFO)" in x
               for x in lines), r.stderr
    assert any("evil\\nmeshbake export: done" in x for x in lines), r.stderr
    assert not any(x.startswith("meshbake export: done") for x in lines), r.stderr


# ---------------------------------------------------------- checkpoint names stay inside
def _manifest_names(step: Path, **extra: dict) -> None:
    m = json.loads((step / "manifest.json").read_text())
    m["files"].update(extra)
    (step / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["outside", "fifo"])
def test_a_manifest_naming_outside_or_a_fifo_is_a_failing_step(saved, tmp_path, how):
    """manifest.json naming ../outside (with its right digest: a reader of any file) or a FIFO
    (declared 0 bytes, the size stat() gives a FIFO: hashing it blocked forever). The step fails
    verification in one line (resume: set aside, the previous step used; export: exit 3)."""
    from meshbake.runtime.checkpoint import find_resume, list_checkpoints, set_aside, sha256_file

    w = fresh(saved, tmp_path)
    root = w / "runs/runA/checkpoints"
    step = root / "step-3"
    if how == "outside":
        (root / "outside").write_text(SECRET)
        n, h = sha256_file(root / "outside")
        _manifest_names(step, **{"../outside": {"bytes": n, "sha256": h}})
        words = "manifest.json names '../outside', not a file name inside the step dir"
    else:
        os.mkfifo(step / "pipe")
        _manifest_names(step, pipe={"bytes": 0, "sha256": "0" * 64})
        words = "pipe is a FIFO, not a regular file"
    with no_hang(300):
        r = export("runs/runA", "-o", "hf", cwd=w)
        assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "step-3: failed verification" in r.stderr and words in r.stderr, r.stderr
        logs: list[str] = []
        assert find_resume(root, "auto", logs.append, discard=set_aside) == root / "step-2"
    assert len(logs) == 1 and words in logs[0] and "trying step-2" in logs[0], logs
    assert [s for s, _ in list_checkpoints(root)] == [1, 2] and (root / "step-3.corrupt").is_dir()


def _point_metadata(step: Path, rel: str, offset: int | None = None, length: int | None = None) -> None:
    """Rewrite one storage entry of step/.metadata (a real DCP Metadata, re-pickled with only the
    allowed classes) and the manifest's digest of it, as someone handing over a checkpoint would."""
    md = pickle.loads((step / ".metadata").read_bytes())     # our own file: a trusted load
    key = next(k for k in md.storage_data if k.fqn.startswith("model."))
    info = md.storage_data[key]
    md.storage_data[key] = type(info)(rel, info.offset if offset is None else offset,
                                      info.length if length is None else length, info.transform_descriptors)
    (step / ".metadata").write_bytes(pickle.dumps(md))
    _rehash(step, ".metadata")


@pytest.mark.parametrize("where", ["parent", "absolute", "beyond"])
def test_metadata_storage_paths_are_confined_before_any_read(saved, tmp_path, where):
    """.metadata's relative_path '../x' and an absolute path (both a FIFO here: DCP's reader
    would block in open()), and an offset+length past the shard's end: verify fails the step,
    and load_dcp (what resume and export call after verify) refuses before opening any file."""
    from meshbake.runtime import checkpoint as ck
    from meshbake.runtime.errors import UserError

    w = fresh(saved, tmp_path)
    root = w / "runs/runA/checkpoints"
    step = root / "step-3"
    os.mkfifo(root / "x")
    if where == "parent":
        _point_metadata(step, "../x")
        words = ".metadata points DCP at '../x', not a file name inside the step dir"
    elif where == "absolute":
        _point_metadata(step, str(root / "x"))
        words = f".metadata points DCP at '{root / 'x'}', not a file name"
    else:
        size = (step / "__0_0.distcp").stat().st_size
        _point_metadata(step, "__0_0.distcp", size - 8, 4096)
        words = f"of __0_0.distcp, which holds {size} (not a slice of the file)"
    problem = ck.verify(step)
    assert problem is not None and words in problem, problem
    m, _ = _model_and_opt(w / "runs/runA")
    with no_hang(120), pytest.raises(UserError) as e:
        ck.load_dcp({"model": m.state_dict()}, step, allow_partial_load=True)
    assert words in str(e.value) and "refusing to read it" in str(e.value) and "\n" not in str(e.value), e.value


# -------------------------------------------------------- names that reach train.log
def test_checkpoint_dir_names_are_logged_escaped_and_links_skipped(saved, tmp_path):
    """A dir whose name holds a newline cannot put a line of its own into train.log; `step-7\\n`
    is not step 7 (Python's $ matches before a final newline); a step-N link to a committed
    checkpoint elsewhere is not resumed from (nor pruned through)."""
    from meshbake.runtime.checkpoint import COMMITTED, list_checkpoints

    w = fresh(saved, tmp_path)
    root = w / "runs/runA/checkpoints"
    (root / "x\nmeshbake: step 99 | loss 0.0000.tmp").mkdir()
    (root / "step-7\n").mkdir()
    (root / f"step-7\n/{COMMITTED}").write_text("7\n")
    (root / "step-9").symlink_to(root / "step-2")
    logs: list[str] = []
    found = [s for s, _ in list_checkpoints(root, logs.append)]
    assert found == [1, 2, 3], found
    assert all("\n" not in x for x in logs), logs
    assert any("x\\nmeshbake: step 99" in x and "incomplete" in x for x in logs), logs
    assert any(x.startswith("checkpoint step-9: a symbolic link") for x in logs), logs


# ------------------------------------------------------------ writes never go through a link
def test_a_planted_checkpoints_link_is_refused(saved, tmp_path):
    """`checkpoints -> elsewhere`: export refuses it in one line (it would read, and a save write
    and prune, there); save refuses it too, and writes nothing through it."""
    from meshbake.runtime import checkpoint as ck
    from meshbake.runtime.errors import UserError

    w = fresh(saved, tmp_path)
    run = w / "runs/runA"
    (run / "checkpoints").rename(w / "elsewhere")
    (run / "checkpoints").symlink_to(w / "elsewhere")
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "checkpoints: is a symbolic link" in r.stderr and not (w / "hf").exists(), r.stderr
    before = sorted(p.name for p in (w / "elsewhere").iterdir())
    m, opt = _model_and_opt(run)
    with one_process_group():
        with pytest.raises(UserError, match="is a symbolic link"):
            ck.save(run / "checkpoints", 4, m, opt, {"step": 4, "scheduler": {}}, keep=1)
    assert sorted(p.name for p in (w / "elsewhere").iterdir()) == before


def test_a_planted_step_tmp_link_is_refused_not_written_through(saved, tmp_path):
    """step-4.tmp -> a directory of the user's: the old save rmtree'd it (a link: silently not)
    and DCP then wrote the shards through it."""
    from meshbake.runtime import checkpoint as ck
    from meshbake.runtime.errors import UserError

    w = fresh(saved, tmp_path)
    run = w / "runs/runA"
    mine = w / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    (run / "checkpoints/step-4.tmp").symlink_to(mine)
    m, opt = _model_and_opt(run)
    with one_process_group():
        with pytest.raises(UserError, match="step-4.tmp: is a symbolic link"):
            ck.save(run / "checkpoints", 4, m, opt, {"step": 4, "scheduler": {}}, keep=1)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert [s for s, _ in ck.list_checkpoints(run / "checkpoints")] == [1, 2, 3]
