"""model.weights is a folder someone else wrote (a Hub repo, a colleague's checkpoint): red-team
tests of what `meshbake check` and the runtime loader read from it (compiler/weights.py,
runtime/parallel.safetensors_index, runtime/hub.weight_map).

- model.safetensors.index.json's weight_map names each tensor's shard; a name `../x` or `/abs`
  made check say "verified" of a file outside the folder and the job load its tensors;
- a FIFO named *.safetensors made `meshbake check` hang forever in open() (and the loader in
  safe_open);
- a header the safetensors library refuses (overlapping offsets, bytes past the last tensor, a
  nested shape) was "verified" at compile time, or raised a TypeError out of check (exit 70).

A real checkpoint (save_pretrained of tests/models/llama, 21 tensors, ~0.5 MB) is written once;
every case is single-process and compile-only or a direct call of the loader's index function.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from meshbake.runtime import hub as H
from meshbake.runtime.errors import UserError

from tests.helpers import ROOT, no_hang, tiny_recipe
from tests.test_hub import compile_dict

LLAMA = ROOT / "tests/models/llama/config.json"       # hidden 64, 2 layers, vocab 1024, untied


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A sharded checkpoint (index + 2 shards) beside a single-file one: save_pretrained's own output."""
    from meshbake.runtime.parallel import hf_config
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(json.loads(LLAMA.read_text())))
    model.save_pretrained(root / "one")
    model.save_pretrained(root / "sharded", max_shard_size="300KB")
    assert (root / "sharded" / H.INDEX).is_file() and len(list((root / "sharded").glob("*.safetensors"))) >= 2
    return root


def _check(weights: Path):
    d = tiny_recipe("w", 1, model=str(LLAMA))
    d["model"]["weights"] = str(weights)
    with no_hang(60):
        b = compile_dict(d)
    return b


def _err(b) -> str:
    assert not hasattr(b, "files"), "compiled"
    errs = [e for e in b.errors if e.path == "model.weights"]
    assert len(errs) == 1, b.errors
    return errs[0].message


def _victim(ckpt: Path, tmp_path: Path, names) -> Path:
    """A model folder whose index sends every tensor to names(key): the attacker's index."""
    v = tmp_path / "victim"
    v.mkdir()
    (v / "config.json").write_bytes((ckpt / "one" / "config.json").read_bytes())
    keys = json.loads((ckpt / "sharded" / H.INDEX).read_text())["weight_map"]
    (v / H.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: names(k) for k in keys}}))
    return v


def test_sharded_and_linked_checkpoints_still_verify_and_index(ckpt, tmp_path):
    """The fixes refuse nothing save_pretrained writes or a Hub cache holds (shards as links to blobs)."""
    from meshbake.runtime.parallel import safetensors_index

    shards = len(list((ckpt / "sharded").glob("*.safetensors")))
    verified = f"verified: 21 parameters in {shards} files"
    assert _check(ckpt / "sharded").resolved.weights.line.startswith(verified)
    snap, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    snap.mkdir(), blobs.mkdir()
    for f in (ckpt / "sharded").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / "blobs" / f.name)
    assert _check(snap).resolved.weights.line.startswith(verified)
    index = safetensors_index(str(snap))
    assert len(index) == 21 and {p.parent for p in index.values()} == {snap}
    assert H.snapshot_problems(snap, "weights") == []


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(ckpt, tmp_path, where):
    """On main 111e863 check said "verified: 21 parameters ... of victim" and safetensors_index
    returned victim/../sharded/model-00001-of-00002.safetensors: the job would train from (and
    export) a checkpoint the user never named."""
    from meshbake.runtime.parallel import safetensors_index

    real = json.loads((ckpt / "sharded" / H.INDEX).read_text())["weight_map"]
    assert tmp_path.parent == ckpt.parent               # both in pytest's basetemp: ../../<ckpt> from victim
    name = {"parent": lambda k: f"../../{ckpt.name}/sharded/{real[k]}",
            "absolute": lambda k: str(ckpt / "sharded" / real[k])}[where]
    v = _victim(ckpt, tmp_path, name)
    assert (v / name(next(iter(real)))).is_file()       # the attacker's name does reach the real shard
    msg = _err(_check(v))
    assert "is not a file name inside the model folder" in msg and "verified" not in msg, msg
    with pytest.raises(UserError, match="is not a file name inside the model folder"):
        safetensors_index(str(v))
    assert any("not a usable index" in p for p in H.snapshot_problems(v, "weights"))


@pytest.mark.parametrize("named", [False, True])
def test_a_fifo_shard_neither_hangs_check_nor_the_loader(ckpt, tmp_path, named):
    """On main 111e863 `meshbake check` blocked forever in open() of the FIFO (a glob match, or
    named by the index); now it is a model.weights error and the loader a UserError (exit 3)."""
    from meshbake.runtime.parallel import safetensors_index

    v = tmp_path / "victim"
    v.mkdir()
    (v / "config.json").write_bytes((ckpt / "one" / "config.json").read_bytes())
    if named:
        for f in (ckpt / "sharded").iterdir():
            (v / f.name).write_bytes(f.read_bytes())
        shard = sorted(v.glob("*.safetensors"))[0]
        shard.unlink()
        os.mkfifo(shard)
    else:
        os.mkfifo(v / "model.safetensors")
    msg = _err(_check(v))
    assert "safetensors is a FIFO" in msg, msg
    with no_hang(30), pytest.raises(UserError, match="is a FIFO"):
        safetensors_index(str(v))


def _header_file(path: Path, head: dict, data: bytes) -> Path:
    hb = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def _variants(ckpt: Path) -> dict[str, tuple[dict, bytes]]:
    """Edits of a real file's header and data: (header, data) by name."""
    raw = (ckpt / "one" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    first, second = sorted((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"])[:2]

    def edit(f):
        h = json.loads(json.dumps(head))
        f(h)
        return h

    begin = head[second]["data_offsets"][0]
    return {
        "as saved": (head, data),
        "bytes after the last tensor": (head, data + b"\0" * 8),
        "truncated": (head, data[:-8]),
        "overlapping": (edit(lambda h: h[second].update(data_offsets=[begin - 4, h[second]["data_offsets"][1]])),
                        data),
        "huge end": (edit(lambda h: h[second].update(data_offsets=[begin, 10 ** 15])), data),
        "nested shape": (edit(lambda h: h[first].update(shape=[[h[first]["shape"][0]], h[first]["shape"][1]])),
                         data),
        "negative shape": (edit(lambda h: h[first].update(shape=[-1] + h[first]["shape"][1:])), data),
        "string offsets": (edit(lambda h: h[first].update(data_offsets="0-4")), data),
        "unknown dtype": (edit(lambda h: h[first].update(dtype="Q9")), data),
        "metadata not strings": (edit(lambda h: h.update(__metadata__={"format": 1})), data),
        "a tensor dropped": (edit(lambda h: h.pop(first)), data),
        "same bytes, other shape": (edit(lambda h: h[first].update(shape=h[first]["shape"][::-1])), data),
    }


def test_read_header_refuses_exactly_what_safetensors_refuses(ckpt, tmp_path):
    """Parity with the library the job loads with: for each edited header, compile's read_header
    raises ValueError iff safetensors.safe_open (+ reading every tensor) raises."""
    from meshbake.compiler.weights import read_header
    from safetensors import safe_open

    seen = {}
    for name, (head, data) in _variants(ckpt).items():
        f = _header_file(tmp_path / f"{name.replace(' ', '_')}.safetensors", head, data)
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    st.get_tensor(k)
            lib = "loads"
        except Exception:   # noqa: BLE001 — SafetensorError and its kin: the library refuses the file
            lib = "refused"
        try:
            read_header(f)
            ours = "loads"
        except ValueError:
            ours = "refused"
        seen[name] = (lib, ours)
    assert all(lib == ours for lib, ours in seen.values()), seen
    assert sum(lib == "refused" for lib, _ in seen.values()) == 10, seen     # the hostile cases are real ones


def test_a_nested_shape_is_a_model_weights_error_not_exit_70(ckpt, tmp_path):
    """On main 111e863 int([64]) raised a TypeError out of check_weights: `meshbake check` said
    "internal error" (exit 70) instead of naming model.weights."""
    head, data = _variants(ckpt)["nested shape"]
    v = tmp_path / "nested"
    v.mkdir()
    (v / "config.json").write_bytes((ckpt / "one" / "config.json").read_bytes())
    _header_file(v / "model.safetensors", head, data)
    msg = _err(_check(v))
    assert "which the safetensors loader refuses" in msg, msg
