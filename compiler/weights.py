"""weights stage: model.weights' safetensors headers against the parameters the model stage built.

Before the queue and without reading a weight: every parameter of the meta-device model
(ModelSpec.params, named_parameters: a tied lm_head appears once, as the embedding) must be in
the checkpoint under the key the runtime loader reads it by (runtime/fused.checkpoint_sources:
its own name, Mixtral's / GPT-NeoX's / per-expert hub names, or the name without the CausalLM's
`model.` prefix of a base-model checkpoint) with the same shape, else an error at model.weights
naming the first parameter in model order that is missing or mismatched.

Headers only: a .safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({tensor: {dtype, shape, data_offsets}}), then the data; reading 8 + N bytes per file (plus
model.safetensors.index.json) checks a 141 GB 70B checkpoint in milliseconds. The headers come
from a local folder, from the pinned Hub revision's snapshot in the Hugging Face cache, or (the
weights not cached, the Hub reachable) from the Hub itself: huggingface_hub's
HfApi.get_safetensors_metadata reads the same headers by HTTP range requests. When none of them
can be read (offline and not cached, a path that is not on this machine) the check is not an
error: check says "weights: not verified" and why, and so does PLAN.md.

dtype: the loader copies every tensor into a parameter of model.dtype (copy_ / .to cast), so any
float checkpoint dtype loads (a bf16 checkpoint into an fp32 run is the usual case, and it is
exact). Integer, bool and 8-bit-float tensors are refused: those are quantized checkpoints
(GPTQ / AWQ int32 packs, FP8 with separate scales) that a cast would turn into wrong numbers.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshbake.compiler.errors import RecipeError
from meshbake.runtime import hub as H
from meshbake.runtime import safeio
from meshbake.runtime.errors import UserError
from meshbake.runtime.fused import checkpoint_sources, n_experts
from meshbake.runtime.safeio import printable

INDEX = H.INDEX
# safetensors refuses headers over 100 MB (its own limit); a 70B index header is ~60 KB per shard
MAX_HEADER = 100_000_000
CASTS = {"F64", "F32", "F16", "BF16"}          # float dtypes the loader's cast carries exactly enough


@dataclass(frozen=True)
class Tensor:
    dtype: str                      # safetensors dtype: "BF16", "F32", "I32", ...
    shape: tuple[int, ...]
    file: str                       # the file that holds it (for messages)


@dataclass(frozen=True)
class WeightsCheck:
    verified: bool
    line: str                       # "verified: 291 tensors in 4 files (BF16, cast to float32)" | "not verified (why)"
    error: RecipeError | None = None

    @property
    def text(self) -> str:
        return f"weights: {self.line}"


class _Unreadable(Exception):
    """The headers cannot be read here (not an error in the recipe): why, in one phrase."""


# bits per element of each safetensors dtype (its Dtype enum, 0.8: F4 / F6 pack below a byte)
_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
         "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
         "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


def read_header(path: Path) -> dict[str, Tensor]:
    """One file's tensors from its header: 8 + N bytes, never the data. ValueError: not a
    safetensors file, one the safetensors library would refuse to load (_tensors), or a file
    shorter than its header says (a truncated download). Opened as a regular file (or a link to
    one: a cache snapshot's shards are links to blobs): a FIFO named *.safetensors neither blocks
    the check nor is read."""
    try:
        f = safeio.open_regular(path, follow=True)
    except UserError as e:
        raise ValueError(f"{path.name} {e.problem}") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is {len(head)} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise ValueError(f"{path.name}: header length {n:,} bytes is not a safetensors header")
        raw = f.read(n)
        size = os.fstat(f.fileno()).st_size
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"{path.name}: its header is not JSON (not a safetensors file)") from None
    out, end = _tensors(meta, path.name)
    if size < 8 + n + end:
        raise ValueError(f"{path.name} is {size:,} bytes but its header describes {8 + n + end:,} (truncated: "
                         "an interrupted download or copy)")
    if size > 8 + n + end:        # safetensors: "incomplete metadata, file not fully covered"
        raise ValueError(f"{path.name} is {size:,} bytes but its header describes {8 + n + end:,}: bytes no tensor "
                         "covers, which the safetensors loader refuses (not a file save_file wrote)")
    return out


def _uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensors(meta: object, file: str) -> tuple[dict[str, Tensor], int]:
    """({key: Tensor}, bytes of data) of a parsed header, by the rules safetensors' loader applies
    (Metadata::validate): a known dtype, a shape of non-negative ints, data_offsets [begin, end]
    that tile the data from byte 0 with no gap or overlap, each span exactly shape x dtype bytes.
    A header that breaks one loads nowhere, so "verified" would be a promise the job breaks."""
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: its header is not a JSON object")
    extra = meta.get("__metadata__")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
        raise ValueError(f"{file}: its header's __metadata__ is not a map of strings (not a safetensors file)")
    out, spans = {}, []
    for k, t in meta.items():
        if k == "__metadata__":
            continue
        if not (isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)):
            raise ValueError(f"{file}: header entry {printable(k)!r} has no dtype / shape")
        shape, span = t["shape"], t.get("data_offsets")
        if t["dtype"] not in _BITS or not all(_uint(x) for x in shape) or not (
                isinstance(span, list) and len(span) == 2 and all(_uint(x) for x in span)):
            raise ValueError(f"{file}: header entry {printable(k)!r} has dtype {printable(t['dtype'])!r}, shape "
                             f"{printable(shape)[:80]}, data_offsets {printable(span)[:80]}, which the safetensors "
                             "loader refuses (not a safetensors file)")
        out[k] = Tensor(t["dtype"], tuple(shape), file)
        spans.append((span[0], span[1], k, math.prod(shape) * _BITS[t["dtype"]]))
    end = 0
    for begin, stop, k, bits in sorted(spans):
        if begin != end or stop < begin or bits % 8 or stop - begin != bits // 8:
            raise ValueError(f"{file}: header entry {printable(k)!r} spans bytes [{begin:,}, {stop:,}) where the "
                             f"loader expects [{end:,}, {end + bits // 8:,}) (its shape x dtype, right after the "
                             "tensor before it): overlapping or misplaced tensors, which the safetensors loader "
                             "refuses")
        end = stop
    return out, end


def local_headers(folder: Path) -> dict[str, Tensor]:
    """{key: Tensor} as runtime/parallel.safetensors_index reads the folder: the index's
    weight_map (each key where the index says), else every *.safetensors, sorted, a later file's
    key winning. _Unreadable when a file the index names is absent; ValueError for a broken file."""
    wm = H.weight_map(folder)          # BadWeights (a ValueError): not an index, or a shard outside folder
    if wm is not None:
        files = sorted(set(wm.values()))
        absent = [f for f in files if not (folder / f).exists()]     # a FIFO there: read_header says so
        if absent:
            raise _Unreadable(f"{len(absent)} of the {len(files)} files {INDEX} names are not here "
                              f"({absent[0]}{', ...' if len(absent) > 1 else ''})")
        heads = {f: read_header(folder / f) for f in files}
        return {k: heads[f][k] for k, f in wm.items() if k in heads[f]}
    out: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(read_header(f))
    return out


def remote_headers(pin) -> dict[str, Tensor]:
    """The pinned revision's headers from the Hub (HTTP range reads; HF_TOKEN from the
    environment for a gated repo)."""
    from huggingface_hub import HfApi

    try:
        meta = HfApi().get_safetensors_metadata(pin.repo, revision=pin.sha)
    except Exception as e:      # noqa: BLE001 network, gated, not a safetensors repo: all "cannot read here"
        name = type(e).__name__
        why = "gated: set HF_TOKEN" if "Gated" in name else (str(e).splitlines() or [name])[0][:160]
        raise _Unreadable(f"the Hub's safetensors headers of {pin.ref} could not be read ({name}: {why})") from None
    out = {}
    for k, f in meta.weight_map.items():
        t = meta.files_metadata.get(f) and meta.files_metadata[f].tensors.get(k)
        if t is not None:
            out[k] = Tensor(t.dtype, tuple(t.shape), f)
    return out


def _headers(weights: str, pin) -> tuple[dict[str, Tensor], str]:
    """({key: Tensor}, where they were read) or _Unreadable."""
    if pin is not None:
        folder = Path(pin.folder)
        cached = (folder / INDEX).is_file() or any(folder.glob("*.safetensors"))
        if cached:
            try:
                return local_headers(folder), f"{pin.ref} (Hugging Face cache)"
            except _Unreadable:
                if H.offline():
                    raise
        if H.offline():
            raise _Unreadable(f"{pin.ref} has no *.safetensors in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                              f"`meshbake pull` fetches them")
        return remote_headers(pin), f"{pin.ref} (Hub metadata)"
    if H.hub_ref(weights) is not None:
        raise _Unreadable(f"{weights} is neither a folder here nor a Hub repo in the Hugging Face cache")
    p = Path(weights)
    if not p.exists():
        raise _Unreadable(f"{weights} is not on this machine (the job reads it relative to its launch directory)")
    if p.is_file():
        raise ValueError(f"{weights} is a file; model.weights is a folder of *.safetensors (a Hugging Face model folder)")
    try:
        return local_headers(p), weights
    except _Unreadable as e:          # a folder here that lacks a shard its index names: the load would fail
        raise ValueError(f"{weights}: {e}") from None


def _shape(src: list[list[str]], heads: Mapping[str, Tensor]) -> tuple[int, ...] | None:
    """The shape the loader assembles (runtime/fused.assemble): one key as it is; per-expert keys
    concatenated on dim 0 per expert, then stacked: (E, sum of rows, *rest). None: the parts disagree."""
    if len(src) == 1 and len(src[0]) == 1:
        return heads[src[0][0]].shape
    groups = [[heads[k].shape for k in ks] for ks in src]
    rest = {g[1:] for ks in groups for g in ks}
    rows = {sum(g[0] for g in ks) for ks in groups}
    return (len(groups), rows.pop(), *rest.pop()) if len(rest) == 1 and len(rows) == 1 else None


def compare(params, config: Mapping, heads: Mapping[str, Tensor], where: str, dtype: str) -> WeightsCheck:
    """params: ModelSpec.params; the first parameter (model order) missing, of another shape or of
    a dtype the loader cannot cast is the error; the count of the others goes with it."""
    names = [n for n, _ in params]
    srcs = checkpoint_sources(names, n_experts(config.get), heads.__contains__)
    bad: list[str] = []
    for name, shape in params:
        src = srcs[name]
        if src is None:
            bad.append(f"has no tensor for parameter {name} {list(shape)}")
            continue
        keys = [k for ks in src for k in ks]
        got = _shape(src, heads)
        key = keys[0] if len(keys) == 1 else f"{keys[0]} (+{len(keys) - 1} per-expert tensors)"
        if got != tuple(shape):
            bad.append(f"tensor {key} is {list(got) if got else 'of mismatched parts'}, the model's {name} is "
                       f"{list(shape)}")
        elif (odd := next((heads[k].dtype for k in keys if heads[k].dtype not in CASTS), None)) is not None:
            bad.append(f"tensor {key} is {odd}, which the loader would cast to {dtype} without its scales (a "
                       "quantized checkpoint)")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return WeightsCheck(False, f"mismatched: {bad[0]}", RecipeError(
            "model.weights", f"{where} {bad[0]}{more}",
            "model.weights must be the checkpoint of model.config (the same architecture and sizes), in float "
            "safetensors (F32 / F16 / BF16)"))
    dts = sorted({heads[k].dtype for ks in srcs.values() for k in (x for g in ks for x in g)})
    files = len({heads[k].file for ks in srcs.values() for k in (x for g in ks for x in g)})
    return WeightsCheck(True, f"verified: {len(names)} parameters in {files} file{'s' if files != 1 else ''} "
                        f"({', '.join(dts)}; loaded as {dtype}) of {where}")


def check_weights(weights: str | None, pin, params, config: Mapping, dtype: str) -> WeightsCheck | None:
    """None when there are no weights to check (random init)."""
    if weights in (None, "random"):
        return None
    try:
        heads, where = _headers(weights, pin)
    except _Unreadable as e:
        return WeightsCheck(False, f"not verified ({e})")
    except (OSError, ValueError) as e:
        why = str(e) if isinstance(e, ValueError) else (e.strerror or str(e))
        msg = why if why.startswith(weights) else f"{weights}: {why}"
        return WeightsCheck(False, f"unreadable: {msg}", RecipeError(
            "model.weights", msg, "re-download or re-save the checkpoint (`meshbake pull` resumes a Hub download)"))
    if not heads:
        return WeightsCheck(False, "no tensors", RecipeError(
            "model.weights", f"{where} holds no *.safetensors tensors (the runtime reads only safetensors)",
            "point model.weights at a Hugging Face model folder with *.safetensors (save_pretrained writes them)"))
    return compare(params, config, heads, where, dtype)
