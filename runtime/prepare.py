"""Tokenize once:  python -m runtime.prepare PLAN_JSON   (meshbake prepare RECIPE; launch.sh runs it)

One process, before torchrun (never inside a process group that could time out while it works):
sources (Hugging Face `datasets` reads jsonl/json/parquet/csv/text files, folders of them, or a
`save_to_disk` folder) -> documents (token ids + loss mask, by format) -> over-long documents split /
truncated / dropped (counted) -> packed into seq_len windows (best-fit decreasing) -> memory-mapped
numpy arrays, written under a temporary name and renamed into place:

    <prepared_dir>/<name>-<fingerprint[:16]>/
        index.json                 fingerprint, sources (size, mtime, sha256), counts, packing efficiency
        train/input_ids.npy        (W, T) int32   W windows of T = seq_len tokens
        train/labels.npy           (W, T) int32   next token of the same document, -100 = no loss
        train/position_ids.npy     (W, T) int32   0.. per document: attention never crosses a restart
        train/docs.npy             (D, 4) int64   per document: window, offset, length, source index
        eval/...                   the held-out split, same layout (when there is one)
    <prepared_dir>/<name>-<options fingerprint[:16]>.current   -> the directory above (the ranks read it)

A document of n tokens gives n - 1 (input, label) pairs: input = ids[:-1], label = ids[1:] where the
loss mask of the label token is on. The fingerprint covers the source contents, the tokenizer files
(the chat template included), every data option, seq_len, the seed and the meshbake version; the
ranks check it, and the size + mtime of every source, so stale data is an error, never used.
Imports: stdlib + numpy at module level; `datasets`, `transformers`, `rich` inside functions.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import safeio
from .errors import EXIT_USER, UserError
from .plan import DataPlan, Plan, Source, epoch_steps, load_plan

PREPARE_VERSION = 2        # bump when the on-disk layout or the tokenization rules change
IGNORE = -100              # label of a position without loss (torch cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool", "tool_call")   # tool_call: ShareGPT function_call (JSON {name, arguments})
FILE_KINDS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".tsv": "csv", ".txt": "text", ".md": "text", ".text": "text"}
ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class DataError(UserError):
    """One line for the user: which file / record / key, what is wrong and what to do (a
    UserError: runtime.train and the CLI print it without a traceback)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        where, _, rest = message.partition(": ")
        self.path, self.problem, self.fix = where, rest or message, ""


class TemplateLimitError(DataError):
    """The chat template ran past its per-record bound: the tokenizer's fault, not the record's,
    so it stops the prepare at once whatever data.bad_records says (every record would cost the
    full time bound, 2 s each, before the bad-record list gave up)."""


# ------------------------------------------------------------------------------ fingerprints
def options_fingerprint(data: DataPlan, seq_len: int, seed: int, version: str) -> str:
    """Everything about the prepared data that the plan decides (not the file contents)."""
    d = asdict(replace(data, fingerprint=""))
    blob = json.dumps({"data": d, "seq_len": seq_len, "seed": seed, "meshbake": version,
                       "prepare": PREPARE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_facts(paths: Iterable[Path], cache: dict[str, dict]) -> list[dict]:
    """[{path, size, mtime_ns, sha256}]; a file whose size and mtime match the cache (the last
    prepare's index) is not hashed again: relaunching a job over 100 GB of data costs a stat."""
    out = []
    for p in paths:
        st = p.stat()
        old = cache.get(str(p))
        same = old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": old["sha256"] if same else _sha256(p)})
    return out


def stale_files(facts: list[dict]) -> list[str]:
    bad = []
    for f in facts:
        p = Path(f["path"])
        if not p.is_file():
            bad.append(f"{p} (missing)")
        elif (p.stat().st_size, p.stat().st_mtime_ns) != (f["size"], f["mtime_ns"]):
            bad.append(f"{p} (changed)")
    return bad


# ----------------------------------------------------------------------------------- sources
def source_files(path: str, key: str) -> tuple[str, list[Path]]:
    """('disk', [folder]) for a save_to_disk folder, else ('files', sorted data files): a file, or
    a folder's data files by the datasets library's own rules (_folder_files). A Hub dataset id
    (org/name@sha, runtime/hub.py) is its snapshot, read by the same rules (not its README.md)."""
    from . import hub

    # its data files only (what `meshbake pull` fetched: offline, huggingface_hub refuses a snapshot
    # that lacks a file the patterns ask for, so they must be the same ones)
    path, _ = _hub_path(path, key, "dataset", hub.DATASET_FILES)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{key}: {path!r} not found (relative to {os.getcwd()})")
    if p.is_dir() and (p / "dataset_info.json").is_file() and (p / "state.json").is_file():
        return "disk", [p]
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        return "disk", [p]
    files = _folder_files(p, path, key) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{key}: no data files in {path!r} (looked for {', '.join(sorted(FILE_KINDS))})")
    if files[0].suffix not in FILE_KINDS:
        raise DataError(f"{key}: {path!r}: unknown file type {files[0].suffix!r}; "
                        f"use one of {', '.join(sorted(FILE_KINDS))} or a datasets.save_to_disk folder")
    return "files", files


# datasets' order when two kinds have as many files (infer_module_for_data_files_list): parquet first
_KIND_RANK = {".parquet": 5, ".jsonl": 4, ".json": 3, ".ndjson": 3, ".csv": 2, ".tsv": 2}


def _folder_files(p: Path, path: str, key: str) -> list[Path]:
    """A folder as `datasets.load_dataset(folder)` reads it (a Hugging Face dataset folder, e.g.
    README.md + data/train-00000-of-00001.parquet): the files of the default config's data_files
    in its dataset card (README.md YAML `configs:`), else datasets' split patterns
    (get_data_patterns: data/train-*-of-*, train.jsonl, a train/ folder, else every file).
    README.md, dataset_info.json, hidden files and folders are not data (datasets' own ignore
    rules). Split: data.sources read `train`, data.eval_sources `validation`, `test`, then `train`;
    a folder with one split reads that one. Of those files, the most common kind (the datasets
    order on a tie: parquet, jsonl, json, csv, then text files) is read, as load_dataset infers
    one builder per dataset: a CHANGELOG.md beside the .jsonl files is not a record."""
    datasets = _datasets()
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns, sanitize_patterns

    base = str(p.resolve())
    try:
        patterns = _card_patterns(p) or get_data_patterns(base)
        splits = DataFilesDict.from_patterns(sanitize_patterns(patterns), base_path=base)
    except (EmptyDatasetError, FileNotFoundError):
        return []
    except Exception as e:  # noqa: BLE001 - a dataset card datasets cannot parse, a bad pattern in it
        raise DataError(f"{key}: {path!r}: datasets cannot resolve its data files "
                        f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}); fix its README.md "
                        f"`configs:` or name the data file itself") from None
    del datasets
    want = ("validation", "test", "train") if key.startswith("data.eval_sources") else ("train",)
    split = next((w for w in want if w in splits), next(iter(splits)) if len(splits) == 1 else None)
    if split is None:
        raise DataError(f"{key}: {path!r} holds the splits {', '.join(map(str, splits))} and no "
                        f"{' / '.join(want)}; name the split's files (e.g. {path}/data/) instead")
    files = [p / os.path.relpath(f, base) for f in splits[split]]
    files = [f for f in files if f.suffix in FILE_KINDS and f.is_file()]
    kinds = {FILE_KINDS[f.suffix] for f in files}
    if len(kinds) > 1:
        count = {k: sum(FILE_KINDS[f.suffix] == k for f in files) for k in kinds}
        rank = {k: max(_KIND_RANK.get(f.suffix, 0) for f in files if FILE_KINDS[f.suffix] == k) for k in kinds}
        best = max(kinds, key=lambda k: (k != "text", count[k], rank[k]))
        files = [f for f in files if FILE_KINDS[f.suffix] == best]
    return sorted(files)


def _card_patterns(p: Path):
    """The data_files of the dataset card's default config (README.md YAML, as datasets reads it), or None."""
    readme = p / "README.md"
    if not readme.is_file():
        return None
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data)
    if not configs:
        return None
    name = configs.get_default_config_name() or next(iter(configs))
    return configs[name].get("data_files")


def load_records(kind: str, path: Path, fmt: str, cache_dir: Path):
    """One file (or save_to_disk folder) as a datasets.Dataset; a jsonl file with malformed
    lines raises the first as a DataError (prepare itself reads through _load, which collects them)."""
    ds, _, bad = _load(kind, path, fmt, cache_dir)
    if bad:
        raise DataError(bad[0][1])
    return ds


_DISK_JSON_LIMIT = 16 << 20     # state.json / dataset_dict.json: a name per arrow file or split


def _disk_files_inside(path: Path, depth: int = 0) -> None:
    """A save_to_disk folder names its own files: state.json `_data_files[].filename` (the .arrow
    shards) and dataset_dict.json `splits` (subfolders), which datasets.load_from_disk joins to the
    folder as written. A folder someone else wrote could name `../x.arrow`, `/abs/y.arrow` or a
    split `../../z`: the run would train on data the recipe never named. Every name must be a plain
    name inside the folder (DataError otherwise); the JSON is read bounded, as a regular file."""
    def names(file: str, get) -> list:
        try:
            obj = json.loads(safeio.read_bounded(path / file, _DISK_JSON_LIMIT, follow=True))
            got = get(obj)
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError, RecursionError, UserError):
            return []            # not such a folder after all: load_from_disk's own message says why
        return got if isinstance(got, list) else list(got) if isinstance(got, dict) else [got]

    files = names("state.json", lambda o: [f.get("filename") if isinstance(f, dict) else f for f in o["_data_files"]])
    splits = names("dataset_dict.json", lambda o: o["splits"])
    bad = [(w, n) for w, ns in (("state.json _data_files", files), ("dataset_dict.json splits", splits))
           for n in ns if not (isinstance(n, str) and safeio.plain_name(n))]
    if bad:
        where, name = bad[0]
        raise DataError(f"{path}: its {where} names {safeio.printable(repr(name))[:200]}, not a name inside the "
                        "folder (datasets would read it from wherever it points); re-save the dataset with "
                        "save_to_disk, or name its data files instead")
    if depth == 0:
        for split in splits:
            _disk_files_inside(path / split, 1)


def _load(kind: str, path: Path, fmt: str, cache_dir: Path):
    """(datasets.Dataset, line of each record or None, [(line, message)] of malformed jsonl lines).
    Text files are read as UTF-8 with or without a byte-order mark (utf-8-sig: Excel and Windows
    tools write one); an empty CSV cell is an empty string, as "" is in JSON (pandas would make
    it NaN, i.e. a missing field), and "NA" / "null" in a cell stay text. A jsonl file with
    malformed lines is read without them (a copy in cache_dir): they are bad records."""
    if kind == "disk":
        _disk_files_inside(path)
        datasets = _datasets()
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
            ds = ds["train"]
        return ds, None, []
    builder = FILE_KINDS[path.suffix]
    if builder == "text" and fmt != "text":
        raise DataError(f"{path}: a plain text file holds no {fmt!r} records; use jsonl/json/parquet/csv")
    kw: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    if builder in ("json", "csv", "text"):
        kw["encoding"] = "utf-8-sig"
    if builder == "csv":
        kw.update(na_filter=False, sep="\t" if path.suffix == ".tsv" else ",")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (no records)")
    lines, bad, read = None, [], path
    # a small jsonl file's records are the objects the line check parses anyway (no datasets import,
    # no arrow cache: ~1.5 s of a prepare's start-up); only when datasets would give the same
    # records (_uniform: same keys in the same order and one type per field everywhere)
    kept: list | None = [] if path.suffix in (".jsonl", ".ndjson") and path.stat().st_size <= FAST_JSONL_BYTES else None
    if builder in ("json", "csv", "text"):
        lines, bad = _check_text(path, collect=True, records=kept)   # datasets' errors name neither byte nor line
        if bad and not lines:
            return None, None, bad
        if lines and (rows := _Rows.uniform(kept)) is not None:
            return rows, lines, bad
        if bad:
            read = _without_lines(path, {n for n, _ in bad}, cache_dir)
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(builder, data_files=str(read), split="train", cache_dir=str(cache_dir), **kw)
    except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in several types
        raise DataError(f"{path}: cannot be read as {builder}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    if lines is not None and len(lines) != len(ds):
        lines = None                   # datasets counted records otherwise: number them, not lines
    return ds, lines, bad


FAST_JSONL_BYTES = 64 << 20    # a jsonl file up to this size is read by _Rows when it can be (a module constant: tests set 0)


def _datasets():
    """The datasets module, its progress bars and info logs off (imported only when a file needs it: ~1.3 s)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


class _Mixed(Exception):
    """Two records give one field different shapes: datasets (arrow) would unify or refuse them."""


_DATE = re.compile(r"\s*[+-]?\d{4,}-\d\d-\d\d")


def _shape(v: Any):
    """A JSON value's arrow-like type: None (null, fits any), 'bool' / 'int' / 'float' / 'str',
    ('list', element) or ('dict', ((key, shape), ...)) in key order; _Mixed for what arrow would
    change or refuse (an int beyond int64, NaN / Infinity, an empty object, a lone surrogate, a date)."""
    if v is None or isinstance(v, (bool, str)):
        if isinstance(v, str):
            if len(v) <= 40 and _DATE.match(v):
                raise _Mixed                  # arrow reads an ISO 8601 string as a timestamp
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise _Mixed from None
            return "str"
        return None if v is None else "bool"
    if isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise _Mixed
        return "int"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise _Mixed
        return "float"
    if isinstance(v, list):
        el = None
        for x in v:
            el = _merge(el, _shape(x))
        return ("list", el)
    if isinstance(v, dict) and v:
        return ("dict", tuple((k, _shape(x)) for k, x in v.items()))
    raise _Mixed


def _merge(a, b):
    """One shape for two values at the same place, or _Mixed: int and float (arrow makes the ints
    floats), other key sets or key orders (arrow fills in None / reorders the keys)."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        if a[0] == "list":
            return ("list", _merge(a[1], b[1]))
        if [k for k, _ in a[1]] == [k for k, _ in b[1]]:
            return ("dict", tuple((k, _merge(x, y)) for (k, x), (_, y) in zip(a[1], b[1])))
    raise _Mixed


class _Rows:
    """A jsonl file's records in memory, as much of a datasets.Dataset as prepare uses: len,
    iter(batch_size) -> {column: [values]}, select(range). Made only when datasets' json loader
    would give the same values (uniform): every record with the same keys in the same order and
    one type per field, nested lists and objects included."""

    def __init__(self, columns: dict[str, list], n: int):
        self.columns, self.n = columns, n

    @classmethod
    def uniform(cls, records: list | None) -> _Rows | None:
        if not records:
            return None
        try:
            shape = None
            for r in records:
                shape = _merge(shape, _shape(r))
        except _Mixed:
            return None
        if not (isinstance(shape, tuple) and shape[0] == "dict"):
            return None
        return cls({k: [r[k] for r in records] for k, _ in shape[1]}, len(records))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):             # one record at a time, as iterating a datasets.Dataset gives
        keys = list(self.columns)
        for i in range(self.n):
            yield {k: self.columns[k][i] for k in keys}

    def iter(self, batch_size: int):
        for i in range(0, self.n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.columns.items()}

    def select(self, idx: range) -> _Rows:
        return _Rows({k: v[idx.start:idx.stop] for k, v in self.columns.items()}, len(idx))


def _without_lines(path: Path, drop: set[int], cache_dir: Path) -> Path:
    """A copy of a jsonl file without the given (1-based, split on \n only) lines."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"clean-{os.urandom(4).hex()}-{path.name}"
    with path.open("rb") as f, _create(out) as g:
        for n, raw in enumerate(f, 1):
            if n not in drop:
                g.write(raw)
    return out


_CHUNK = 1 << 20           # bytes per read in _check_text (a module constant: the linearity test shrinks it)


def _check_text(path: Path, collect: bool = False, records: list | None = None):
    """UTF-8 throughout, a leading byte-order mark allowed (the byte offset and line of the first
    bad byte: a DataError), and for jsonl one JSON object per line (the file's own line number:
    split on \n only, as str.splitlines would also split on U+2028 or a form feed inside a
    record's text and the numbers would drift). jsonl: returns (the line of each record, blank
    lines skipped as datasets skips them; [(line, message)] of malformed lines), the first
    malformed line raised unless collect; other files: (None, []). records: a list the jsonl
    records (the parsed objects) are appended to."""
    dec, off, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    # pending: the pieces of the current (unfinished) line, joined once when its newline comes.
    # Re-joining `pending + text` per 1 MiB chunk copied the whole line so far each time: a line
    # of n MiB cost n^2 / 2 MiB of copying and splitting (128 MiB: 8 GiB, 49 s; 10 GB: days).
    jsonl, pending = path.suffix in (".jsonl", ".ndjson"), []
    lines, bad = array("q"), []

    def one(n: int, rec: str) -> None:
        problem = _json_line(path, n, rec, records)
        if problem is None:
            if rec.strip():
                lines.append(n)
        elif collect:
            bad.append((n, problem))
        else:
            raise DataError(problem)

    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            held = len(dec.getstate()[0])      # bytes of a split character from the last chunk
            try:
                text = dec.decode(chunk)
            except UnicodeDecodeError as e:
                at = off - held + e.start      # e.start counts from the held bytes
                lines_, left = 1, at            # counted in 1 MiB blocks: the bad byte may be 10 GB in
                with path.open("rb") as g:
                    while left > 0 and (block := g.read(min(left, 1 << 20))):
                        lines_, left = lines_ + block.count(b"\n"), left - len(block)
                    bad_ = g.read(4)
                raise DataError(f"{path}: not valid UTF-8 at byte {at} (line {lines_}: {bad_!r}); "
                                f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove that byte") from None
            if off == 0 and text.startswith("\ufeff"):
                text = text[1:]                # a byte-order mark: datasets reads the file as utf-8-sig
            off += len(chunk)
            if jsonl:
                if "\n" not in text:          # the middle of a long line: keep the piece, copy nothing
                    pending.append(text)
                    continue
                first, *done, last = text.split("\n")
                pending.append(first)
                for rec in ["".join(pending), *done]:
                    one(line, rec)
                    line += 1
                pending = [last]
    if jsonl:
        one(line, "".join(pending))
        return lines, bad
    return None, []


def _json_line(path: Path, n: int, rec: str, records: list | None = None) -> str | None:
    """The message for a malformed jsonl line, None for a record (appended to records) or a blank line."""
    if not rec.strip():
        return None
    try:
        obj = json.loads(rec)
    except ValueError as e:
        return (f"{path}:{n}: not a JSON record ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')}); "
                f"fix or remove that line (one JSON object per line)")
    if not isinstance(obj, dict):
        return f"{path}:{n}: a JSON {type(obj).__name__}, not a record (an object); fix or remove that line"
    if records is not None:
        records.append(obj)
    return None


# --------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Where:
    """A record's place for error messages: file:line of a jsonl record (its line in the file,
    blank and malformed lines counted), else the file and record number."""
    file: str
    jsonl: bool
    lines: Any = None              # the line of each record (jsonl: _check_text), or None

    def __call__(self, i: int) -> str:
        if not self.jsonl:
            return f"{self.file} record {i + 1}"
        return f"{self.file}:{self.lines[i] if self.lines is not None and i < len(self.lines) else i + 1}"


class Encoder:
    """Records -> (ids int32, mask bool) per document; mask[j] = token j is a loss target."""

    def __init__(self, data: DataPlan, tok):
        self.data, self.tok, self.f = data, tok, data.fields
        self._template: _BoundedTemplate | None = None
        self._facts: _TemplateFacts | None = None
        self._special_text = None
        self.eos = None if tok is None else (tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id)
        self.special: set[int] = set()
        if tok is not None:
            self.special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        if data.format == "chat" and (tok is None or not tok.chat_template):
            raise DataError(f"data.tokenizer {data.tokenizer!r} has no chat template, which format 'chat' needs; "
                            f"add chat_template to its tokenizer_config.json (or a chat_template.jinja) or use "
                            f"format completion / alpaca")

    def field(self, batch: dict, key: str, where: Where, start: int, optional: bool = False) -> list:
        name = getattr(self.f, key)
        col = batch.get(name)
        if col is None:
            if optional:
                return [None] * len(next(iter(batch.values())))
            raise DataError(f"{where(start)}: no field {name!r} (data.fields.{key}); the records have "
                            f"{', '.join(sorted(batch))}")
        for i, v in enumerate(col):
            if v is None and not optional:
                raise DataError(f"{where(start + i)}: no field {name!r} (data.fields.{key})")
        return col

    def batch(self, batch: dict, where: Where, start: int) -> list[tuple[np.ndarray, np.ndarray]]:
        fmt = self.data.format
        if fmt == "tokenized":
            return self._tokenized(batch, where, start)
        if fmt == "text":
            texts = [str(t) for t in self.field(batch, "text", where, start)]
            return [self._with_eos(ids, None) for ids in self._ids(texts, True)]
        if fmt == "completion":
            prompts = [str(p) for p in self.field(batch, "prompt", where, start)]
            comps = [str(c) for c in self.field(batch, "completion", where, start)]
            return self._prompt_completion(prompts, comps)
        if fmt == "alpaca":
            ins = self.field(batch, "instruction", where, start)
            inp = self.field(batch, "input", where, start, optional=True)
            out = [str(o) for o in self.field(batch, "output", where, start)]
            prompts = [ALPACA.format(ctx=", paired with an input that provides further context" if x else "",
                                     instruction=i, input=f"### Input:\n{x}\n\n" if x else "")
                       for i, x in zip(ins, inp)]
            return self._prompt_completion(prompts, out)
        tools = batch.get(CHAT_TOOLS) or [None] * len(batch.get(self.f.messages) or [])
        return [self.chat(m, where(start + i), t)
                for i, (m, t) in enumerate(zip(self.field(batch, "messages", where, start), tools))]

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=special)["input_ids"] if texts else []

    def _with_eos(self, ids: list[int], mask: list[bool] | None) -> tuple[np.ndarray, np.ndarray]:
        m = [True] * len(ids) if mask is None else mask
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids, m = ids + [self.eos], m + [True]
        return np.asarray(ids, np.int32), np.asarray(m, bool)

    def _prompt_completion(self, prompts: list[str], comps: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The prompt (with the tokenizer's BOS, if it adds one) gets no loss; the completion and
        EOS do. Tokenized apart, as axolotl does, so the boundary is exact."""
        out = []
        everything = self.data.train_on == "all"
        for p, c in zip(self._ids(prompts, True), self._ids(comps, False)):
            out.append(self._with_eos(p + c, [everything] * len(p) + [True] * len(c)))
        return out

    def _tokenized(self, batch: dict, where: Where, start: int) -> list[tuple[np.ndarray, np.ndarray]]:
        ids_col = self.field(batch, "input_ids", where, start)
        labels = batch.get(self.f.labels)
        out = []
        for i, ids in enumerate(ids_col):
            a = np.asarray(ids, np.int64)
            if a.ndim != 1 or (a.size and a.min() < 0):
                raise DataError(f"{where(start + i)}: {self.f.input_ids!r} must be a list of token ids >= 0")
            m = np.ones(len(a), bool) if labels is None else np.asarray(labels[i]) != IGNORE
            out.append((a.astype(np.int32) if a.size and a.max() < 2**31 else a, m))
        return out

    # ------------------------------------------------------------------------------ chat
    def _messages(self, raw, where: str) -> list[dict]:
        """The record's messages as the template expects them (transformers' form): role mapped,
        content a string (OpenAI text parts joined), tool_calls / tool role kept, a `tool_call`
        message (ShareGPT's function_call: content = JSON {name, arguments}) made an assistant
        message with tool_calls."""
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: {self.f.messages!r} must be a non-empty list of messages")
        out = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or self.f.role not in m or (self.f.content not in m and not m.get("tool_calls")):
                raise DataError(f"{where}: message {j + 1} has no {self.f.role!r} / {self.f.content!r} "
                                f"(data.fields.role / data.fields.content)")
            role = self.data.roles.get(m[self.f.role], m[self.f.role])
            if role not in ROLES:
                raise DataError(f"{where}: message {j + 1}: unknown role {m[self.f.role]!r}; map it with "
                                f"data.roles (e.g. {{human: user, gpt: assistant}}) to one of {', '.join(ROLES)}")
            msg = {"role": role, "content": _content_text(m.get(self.f.content), f"{where}: message {j + 1}")}
            if role == "tool_call":
                msg = {"role": "assistant", "content": "",
                       "tool_calls": [_tool_call(msg["content"], f"{where}: message {j + 1}")]}
            elif m.get("tool_calls"):
                if role != "assistant":
                    raise DataError(f"{where}: message {j + 1}: tool_calls in a {role!r} message (only assistant "
                                    f"messages call tools)")
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}: message {j + 1}")
            for k in ("name", "tool_call_id", "reasoning_content", "thinking"):
                if isinstance(m.get(k), str) and k != self.f.content:
                    msg[k] = m[k]
            out.append(msg)
        return out

    def _render(self, msgs: list[dict], gen: bool, where: str, tools: list | None = None,
                track: list | None = None) -> str:
        if self._template is None:
            self._template = _BoundedTemplate(self.tok)
        chars = sum(len(m["role"]) + len(m["content"] or "") + len(json.dumps(m.get("tool_calls") or ""))
                    for m in msgs) + (len(json.dumps(tools)) if tools else 0)
        cap = max(RENDER_CHARS_PER_INPUT * chars, RENDER_MIN_CHARS)
        try:
            return self._template.render(msgs, gen, cap, RENDER_SECONDS, tools=tools, track=track)
        except RenderLimit as e:
            raise TemplateLimitError(f"{where}: the chat template {e} rendering this conversation (the cap per record: "
                            f"{RENDER_CHARS_PER_INPUT} x its characters, at least {RENDER_MIN_CHARS:,}; "
                            f"{RENDER_SECONDS:g} s); fix the chat_template of data.tokenizer (it loops without "
                            f"bound) or remove that record") from None
        except Exception as e:  # noqa: BLE001 - a template's raise_exception() (e.g. roles must alternate)
            raise DataError(f"{where}: the chat template refused this conversation: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None

    def _try(self, msgs: list[dict], gen: bool, tools: list | None) -> str | None:
        try:
            return self._render(msgs, gen, "probe", tools)
        except DataError:
            return None

    def _probe(self) -> _TemplateFacts:
        """What the template does, learnt once from small conversations through the same sandbox:
        its generation prompt, the special tokens that end an assistant turn (the first after a
        reply: <|im_end|>, <|eot_id|>, gpt-oss's <|end|> and <|return|>), whether it renders
        tool calls (with content "" or, DeepSeek's, None) and tool schemas."""
        if self._facts is not None:
            return self._facts
        u1, u2 = {"role": "user", "content": "Name a city."}, {"role": "user", "content": "Another one."}
        a1, a2 = {"role": "assistant", "content": "Paris"}, {"role": "assistant", "content": "Rome"}
        gen = ""
        with_gen, without = self._try([u1], True, None), self._try([u1], False, None)
        if with_gen is not None and without is not None and with_gen.startswith(without):
            gen = with_gen[len(without):]
        ends = {self.eos} - {None}
        for conv in ([u1, a1, u2, a2], [{"role": "system", "content": "Be brief."}, u1, a1, u2, a2], [u1, a1]):
            full = self._try(conv, False, None)
            if full is None:
                continue
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
            at = 0
            for reply in ("Paris", "Rome"):
                k = full.find(reply, at)
                if k < 0:
                    break
                at = k + len(reply)
                after = [t for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]) if s >= at and t in self.special]
                if after:
                    ends.add(after[0])
        call = {"type": "function", "function": {"name": "meshbake_probe_call", "arguments": '{"x": 1}'}}
        call_content: Any = False
        for empty in ("", None):
            out = self._try([u1, {"role": "assistant", "content": empty, "tool_calls": [call]}], False, None)
            if out is not None and "meshbake_probe_call" in out:
                call_content = empty
                break
        schema = {"type": "function", "function": {"name": "meshbake_probe_tool", "description": "d",
                                                   "parameters": {"type": "object", "properties": {}}}}
        out = self._try([u1], False, [schema])
        self._facts = _TemplateFacts(gen, frozenset(ends), call_content, out is not None and "meshbake_probe_tool" in out,
                                     _GENERATION_TAG.search(self._template.source) is not None)
        return self._facts

    def _tools(self, raw, where: str) -> list | None:
        """A record's tools column (a list of JSON schemas, or its JSON text) in transformers' form:
        {"type": "function", "function": {name, description, parameters}}."""
        if raw is None or raw == "" or raw == []:
            return None
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise DataError(f"{where}: 'tools' is not JSON (a list of function schemas)") from None
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise DataError(f"{where}: 'tools' must be a list of function schemas ({{name, description, parameters}})")
        return [t if "function" in t or "name" not in t else {"type": "function", "function": t} for t in raw] or None

    def chat(self, raw, where: str, tools=None) -> tuple[np.ndarray, np.ndarray]:
        """ids = the conversation through the chat template (= apply_chat_template(..., tokenize=True)
        but that message text is never read as control tokens); mask = the assistant turns as the
        template writes them, each up to its end-of-turn token (see _turns), per train_on."""
        msgs = self._messages(raw, where)
        tools = self._tools(tools, where)
        facts = self._probe()
        if tools and not facts.tools:
            raise DataError(f"{where}: the record has tools but the chat template of data.tokenizer does not render "
                            f"them (the model would learn to call functions it was never shown); use a tokenizer "
                            f"whose template does, or drop the tools column")
        for j, m in enumerate(msgs):
            if m.get("tool_calls"):
                if facts.call_content is False:
                    raise DataError(f"{where}: message {j + 1} calls a tool but the chat template of data.tokenizer "
                                    f"does not render tool calls; use a tokenizer whose template does, or remove them")
                if not m["content"] and facts.call_content is None:
                    m["content"] = None
        marked: list | None = [] if facts.generation else None
        full = self._render(msgs, False, where, tools, marked)
        ids, offs = self._tokenize(full, msgs, where)
        mask = np.full(len(ids), self.data.train_on == "all")
        if self.data.train_on == "all":
            return ids, mask
        if marked is not None:          # {% generation %}: the template's own spans
            turns = [(s, e, e) for s, e in marked]
            if not turns:
                raise DataError(f"{where}: the chat template marks {{% generation %}} spans but rendered none for "
                                f"this conversation")
        else:
            turns = self._turns(msgs, tools, full, facts, where)
        ends = np.isin(ids, list(facts.ends))
        for s, b, stop in turns[-1:] if self.data.train_on == "last_turn" else turns:
            inside = np.flatnonzero((offs[:, 0] >= s) & (offs[:, 1] <= b) & (offs[:, 1] > offs[:, 0]))
            if marked is None:       # the turn up to its (last) end-of-turn token, not the newline after it
                fin = inside[ends[inside]]
                inside = inside[inside <= fin[-1]] if fin.size else inside[offs[inside, 1] <= stop]
            mask[inside] = True
        return ids, mask

    def _turns(self, msgs: list[dict], tools, full: str, facts: _TemplateFacts, where: str) -> list[tuple[int, int, int]]:
        """Per assistant message (start, bound, stop) in characters of `full`: the turn's tokens are
        [start, bound) up to the last end-of-turn token there (else up to `stop`).
        By prefix rendering (TRL, Axolotl): turn i is what rendering messages 0..i adds to 0..i-1 with
        the generation prompt, used when both renderings are prefixes of the whole (the spans then
        concatenate to it). A template that renders a turn differently once more follows (Qwen3's
        think block on the last reply, gpt-oss's <|return|>, DeepSeek's system prompt moved to the
        front) or a reply that opens the conversation (before it: BOS, a default system prompt) are
        located in the whole rendering instead: the rendering with that message emptied differs from
        the whole exactly where the template wrote it, and the turn starts after the generation
        prompt before that (never earlier than the previous turn's end)."""
        out: list[tuple[int, int, int]] = []
        lo = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            span = None
            if i:
                head = self._render(msgs[:i], True, where, tools)
                upto = full if i == len(msgs) - 1 else self._render(msgs[:i + 1], False, where, tools)
                if full.startswith(upto) and upto.startswith(head) and len(head) >= lo:
                    span = (len(head), len(upto), len(upto))
            if span is None:
                span = self._located(msgs, i, tools, full, facts, lo, where)
            if span is not None:      # None: an empty reply the template writes nothing for
                out.append(span)
                lo = span[2]
        return out

    def _located(self, msgs, i, tools, full, facts, lo, where) -> tuple[int, int, int] | None:
        blank = [dict(m) if j != i else {"role": "assistant", "content": ""} for j, m in enumerate(msgs)]
        other = self._render(blank, False, where, tools)
        a = _common_prefix(full, other)
        e = len(full) - _common_prefix(full[a:][::-1], other[a:][::-1])
        if e <= a:
            return None
        g = full.rfind(facts.gen, lo, a) if facts.gen else -1
        start = g + len(facts.gen) if g >= 0 else a
        bound = len(full)
        for m in msgs[i + 1:]:        # the next message the template writes bounds this turn
            text = m["content"] if isinstance(m.get("content"), str) else ""
            k = full.find(text, e) if text else -1
            if k >= 0:
                bound = k
                break
        return start, bound, e

    def _tokenize(self, full: str, msgs: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
        """The rendering tokenized once with offsets, as apply_chat_template(tokenize=True) does;
        but control-token text inside a message (a reply quoting <|eot_id|>) stays text: such a
        message's text is tokenized with split_special_tokens, the template's scaffolding with its
        special tokens parsed, so a reply can never end its own turn early."""
        pieces = []
        if self._special_text is None:
            self._special_text = _special_pattern(self.tok)
        if self._special_text:
            at = 0
            for j, m in enumerate(msgs):
                text = m.get("content")
                if not isinstance(text, str) or not self._special_text.search(text):
                    continue
                for t in (text, text.strip()):
                    k = full.find(t, at)
                    if k < 0:
                        k = full.find(t)
                    if k >= 0 and not any(s < k + len(t) and k < e for s, e in pieces):
                        pieces.append((k, k + len(t)))
                        at = k + len(t)
                        break
                else:
                    raise DataError(f"{where}: message {j + 1} contains control-token text "
                                    f"({self._special_text.search(text).group(0)!r}) and the chat template changes "
                                    f"the message, so it cannot be kept as text; remove that text or the record")
        if not pieces:
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
            return (np.asarray(enc["input_ids"], np.int32),
                    np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2))
        ids: list[int] = []
        offs: list[tuple[int, int]] = []
        at = 0
        for s, e, split in _pieces(sorted(pieces), len(full)):
            enc = self.tok(full[s:e], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split)
            ids += enc["input_ids"]
            offs += [(a + s, b + s) for a, b in enc["offset_mapping"]]
            at = e
        return np.asarray(ids, np.int32), np.asarray(offs, np.int64).reshape(-1, 2)


CHAT_TOOLS = "tools"      # format chat: a record's column of function schemas (TRL's name), passed as tools=
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class _TemplateFacts:
    gen: str                  # the generation prompt ("<|im_start|>assistant\n"), "" if unknown
    ends: frozenset[int]      # token ids that end an assistant turn (eos + those seen after a reply)
    call_content: Any         # content of a tool-call-only message: "" or None; False: tool calls not rendered
    tools: bool               # the template renders tool schemas (tools=)
    generation: bool          # the template marks {% generation %} spans


def _content_text(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI content parts whose text parts are joined
    with newlines (as vLLM does); a non-text part (image, audio) is refused, never its repr trained."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for p in content:
            kind = p.get("type", "text" if "text" in p else None)
            if kind != "text" or not isinstance(p.get("text"), str):
                raise DataError(f"{where}: a content part of type {kind!r}; format chat trains text only (keep the "
                                f"text parts, or remove that record)")
            texts.append(p["text"])
        return "\n".join(texts)
    if isinstance(content, (int, float, bool)):
        return str(content)
    raise DataError(f"{where}: content must be text or a list of text parts ({{type: text, text: ...}}), not a "
                    f"{type(content).__name__}")


def _tool_call(text: str, where: str) -> dict:
    """ShareGPT's function_call message (JSON {name, arguments}) as one transformers tool call."""
    try:
        call = json.loads(text)
    except ValueError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError(f"{where}: a tool_call message must be JSON {{\"name\": ..., \"arguments\": {{...}}}}")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"type": "function", "function": {"name": call["name"], "arguments": args}}


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise DataError(f"{where}: tool_calls must be a list of {{type: function, function: {{name, arguments}}}}")
    out = []
    for c in calls:
        fn = c.get("function", c)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: a tool call without a function name")
        out.append({**c, "type": c.get("type", "function"), "function": fn})
    return out


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _special_pattern(tok):
    """A regex matching the text of every special token (added tokens marked special)."""
    texts = {t for t in tok.all_special_tokens} | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else False


def _pieces(content: list[tuple[int, int]], n: int):
    """[0, n) cut into scaffolding (special tokens parsed) and message text (split_special_tokens)."""
    at = 0
    for s, e in content:
        if s > at:
            yield at, s, False
        yield s, e, True
        at = e
    if at < n:
        yield at, n, False


# ------------------------------------------------------------------- bounded chat rendering
# A chat template is code from the tokenizer folder, run once per record (and per assistant turn).
# transformers renders it in a jinja2 sandbox, which stops it reaching Python internals but not
# looping: two nested range(100000) loops wrote 2.6 GB in 45 s before anything looked at it.
# Real templates write the messages plus a header per message: llama3's ~60 characters, ChatML's
# ~20, a tool-use preamble a few KB once. So the output of one render is capped at
# RENDER_CHARS_PER_INPUT (64) x the record's characters (a 3-character "hi" message still gets a
# header 20x its size) and never below RENDER_MIN_CHARS (1 MiB: long default system prompts,
# tool schemas), and each render gets RENDER_SECONDS (2 s; real templates take < 10 ms for 100
# messages). Memory stays within a small multiple of the cap: output is counted as it is
# produced (Template.generate, a StringIO), every string the template builds on the way (~, +,
# *, %, filters, method calls) is size-checked before or as it is made, and a loop that builds
# nothing is stopped by the clock (checked at every sandbox hook and output chunk, and by
# SIGALRM on the main thread for a loop with neither).
RENDER_CHARS_PER_INPUT = 64
RENDER_MIN_CHARS = 1 << 20
RENDER_SECONDS = 2.0


class RenderLimit(Exception):
    """A render passed its output cap or its time budget (str(): what it passed)."""


class _Budget:
    def __init__(self) -> None:
        self.cap, self.deadline, self.seconds = 0, 0.0, 0.0
        self.items = 0             # range() items handed out this render

    def range(self, *args):
        """range() counted against the cap: nested loops over ranges grow a macro's or a list's
        memory without building one big string (3.2 GB in the 2 s time bound, measured), so the
        items of every range a render asks for add up, and past the cap (>= 1,048,576) it stops."""
        from jinja2.sandbox import safe_range

        r = safe_range(*args)
        self.items += len(r)
        if self.items > self.cap:
            raise RenderLimit(f"looped over ranges of more than {self.cap:,} items")
        return r

    def check(self, n: int = 0) -> None:
        if n > self.cap:
            raise RenderLimit(f"built a string of more than {self.cap:,} characters")
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"took more than {self.seconds:g} s")

    def size(self, v) -> None:
        if isinstance(v, (str, bytes, list, tuple, dict)):
            self.check(len(v))
        elif isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
            raise RenderLimit("computed an integer of more than 64 bits")
        else:
            self.check()

    def args(self, args, kwargs) -> None:
        """An integer argument beyond the cap (center(10**10), a width, a repeat count) would make
        one C call allocate that much before any check runs: refused before the call."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.cap:
                raise RenderLimit(f"passed a number beyond the {self.cap:,}-character cap ({a:,})")

    def _widths(self, fmt: str) -> None:
        """A width/precision in a format string ('%0999999999d', '{:999999999}') allocates it."""
        if any(int(d) > self.cap for d in re.findall(r"\d{7,}", fmt)):
            raise RenderLimit(f"used a format width beyond the {self.cap:,}-character cap")


def _bounded_env_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "%", "**", "//"})

        def call_binop(self, context, operator, left, right):
            b = self.budget
            b.check()
            if operator == "*":             # 'x' * n, [..] * n: predict the length before allocating
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    b.check(len(seq) * max(n, 0))
                elif isinstance(left, int) and isinstance(right, int):
                    if left.bit_length() + right.bit_length() > 128:
                        raise RenderLimit("computed an integer of more than 128 bits")
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
                b.check(len(left) + len(right))
            elif operator == "%" and isinstance(left, str):
                b._widths(left)
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right > 0 and (abs(left).bit_length() * right > 128):
                raise RenderLimit("computed an integer of more than 128 bits")
            out = super().call_binop(context, operator, left, right)
            b.size(out)
            return out

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            __self.budget.check()
            __self.budget.args(args, kwargs)
            fmt = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)   # the sandbox's str.format
            if isinstance(fmt, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
                __self.budget._widths(fmt)
            out = super().call(__context, __obj, *args, **kwargs)
            __self.budget.size(out)
            return out

        def getattr(self, obj, attribute):
            self.budget.check()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.budget.check()
            return super().getitem(obj, argument)

    return Env


def _guard_filter(f, budget: _Budget):
    import functools

    @functools.wraps(f)                 # keeps jinja_pass_arg (pass_context / pass_environment)
    def guarded(*args, **kwargs):
        budget.check()
        budget.args(args[1:], kwargs)   # args[0]: the value filtered (or the context)
        if f.__name__ == "do_format" and args and isinstance(args[0], str):
            budget._widths(args[0])     # "%0999999999d" | format(1)
        out = f(*args, **kwargs)
        budget.size(out)
        return out
    return guarded


class _BoundedTemplate:
    """The tokenizer's chat template, compiled as transformers compiles it (its sandbox, its
    extensions, filters and globals, copied from transformers' own environment so the output is
    the same as apply_chat_template's) into a sandbox whose hooks keep the _Budget."""

    def __init__(self, tok):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tok = tok
        self.source = src = tok.get_chat_template() if hasattr(tok, "get_chat_template") else tok.chat_template
        # transformers' environment, from an empty template: compiling `src` there would let jinja's
        # optimizer fold constants ('x' * 10**10, 'x' | center(10**10)) at compile time, unguarded.
        # Ours folds nothing big: intercepted operators are never folded, and a guarded filter
        # raises under the compile-time budget (cap 0, deadline passed), which jinja takes as
        # "not a constant"
        ref = _compile_jinja_template("").environment
        self.budget = _Budget()
        env = _bounded_env_class()(
            trim_blocks=ref.trim_blocks, lstrip_blocks=ref.lstrip_blocks, keep_trailing_newline=ref.keep_trailing_newline,
            extensions=[type(x) for x in ref.extensions.values()])
        env.budget = self.budget
        env.filters = {k: _guard_filter(f, self.budget) for k, f in ref.filters.items()}
        env.tests = dict(ref.tests)
        env.globals.update(ref.globals)
        env.globals["range"] = self.budget.range
        self.template = env.from_string(src)
        ns = self.template.root_render_func.__globals__      # the compiled module: `~` calls str_join
        for name in ("str_join", "markup_join"):
            if name in ns:
                ns[name] = self._joiner(ns[name])
        from transformers.utils.chat_template_utils import _plain_template_data

        self.extra = _plain_template_data(dict(tok.special_tokens_map))

    def _joiner(self, join):
        budget = self.budget

        def bounded(seq):
            parts = [str(x) for x in seq]
            budget.check(sum(map(len, parts)))
            return join(parts)
        return bounded

    def render(self, msgs: list[dict], gen: bool, cap: int, seconds: float, tools: list | None = None,
               track: list | None = None) -> str:
        """The rendering; with `track` (a list) the template's {% generation %} spans are appended
        to it as (start, end) characters, as apply_chat_template(return_assistant_tokens_mask=True)."""
        import contextlib

        from transformers.utils import chat_template_utils as ctu

        # as apply_chat_template passes them: keys whose value is None dropped, reasoning fields aliased
        msgs = [{k: v for k, v in m.items() if v is not None} for m in msgs]
        msgs = ctu._alias_reasoning_fields(msgs) if hasattr(ctu, "_alias_reasoning_fields") else msgs

        b = self.budget
        b.cap, b.seconds, b.deadline, b.items = cap, seconds, time.monotonic() + seconds, 0
        blocks: list[str] = []
        n = 0
        env = self.template.environment
        tracking = env.activate_tracker(blocks, track) if track is not None and hasattr(env, "activate_tracker") \
            else contextlib.nullcontext()
        with _alarm(seconds + 0.5), tracking:
            for chunk in self.template.generate(messages=ctu._plain_template_data(msgs),
                                                tools=ctu._plain_template_data(tools), documents=None,
                                                add_generation_prompt=gen, **self.extra):
                n += len(chunk)
                b.check(n)
                blocks.append(chunk)
        return "".join(blocks)


class _alarm:
    """SIGALRM after `seconds` raises RenderLimit: the backstop for a loop that calls, reads and
    writes nothing (no hook runs). Main thread only, and only if no other timer is armed."""

    def __init__(self, seconds: float):
        self.seconds, self.armed = seconds, False

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            if signal.getitimer(signal.ITIMER_REAL)[0] == 0:
                self.old = signal.signal(signal.SIGALRM, self._fire)
                signal.setitimer(signal.ITIMER_REAL, self.seconds)
                self.armed = True
        return self

    def _fire(self, signum, frame):
        raise RenderLimit(f"took more than {self.seconds:g} s")

    def __exit__(self, *exc):
        if self.armed:
            import signal

            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


# --------------------------------------------------------------------------------- packing
def fit_documents(lengths: np.ndarray, seq_len: int, overlong: str) -> tuple[list[tuple[int, int, int]], dict]:
    """Documents (of n tokens: n - 1 positions) -> pieces (doc, token start, tokens) of at most
    seq_len + 1 tokens. split: consecutive pieces sharing one boundary token; truncate: the first
    seq_len + 1 tokens; drop: left out. Counted for the report."""
    pieces, stats = [], {"documents": int(len(lengths)), "too_short": 0, "overlong": 0,
                         "overlong_tokens_lost": 0}
    for d, n in enumerate(lengths.tolist()):
        if n < 2:
            stats["too_short"] += 1
            continue
        if n - 1 <= seq_len:
            pieces.append((d, 0, n))
            continue
        stats["overlong"] += 1
        if overlong == "split":
            pieces.extend((d, s, min(seq_len + 1, n - s)) for s in range(0, n - 1, seq_len) if n - s >= 2)
        elif overlong == "truncate":
            pieces.append((d, 0, seq_len + 1))
            stats["overlong_tokens_lost"] += n - seq_len - 1
        else:
            stats["overlong_tokens_lost"] += n
    return pieces, stats


def pack(lengths: list[int], seq_len: int, packing: bool) -> list[list[int]]:
    """Piece lengths (positions) -> windows (lists of piece indices). Best-fit decreasing: the
    longest piece first, into the open window with the least room that still fits it (bins are
    bucketed by free room, 0..seq_len, so a fit is one vectorized search). Deterministic."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    windows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    nonempty = np.zeros(seq_len + 1, bool)
    for i in order:
        n = lengths[i]
        hit = np.flatnonzero(nonempty[n:])
        if hit.size:
            room = n + int(hit[0])
            w = by_room[room].pop()
            nonempty[room] = bool(by_room[room])
        else:
            w, room = len(windows), seq_len
            windows.append([])
        windows[w].append(i)
        left = room - n
        if left:
            by_room[left].append(w)
            nonempty[left] = True
    return windows


# ---------------------------------------------------------------------------------- writing
@dataclass
class Docs:
    """All documents of a split, flat: ids/mask concatenated, doc d = [starts[d], starts[d+1])."""
    ids: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    source: np.ndarray            # source index per document

    @staticmethod
    def join(parts: list[tuple[np.ndarray, np.ndarray]], source: list[int]) -> Docs:
        lens = np.array([len(i) for i, _ in parts], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int32)
        mask = np.concatenate([m for _, m in parts]) if parts else np.zeros(0, bool)
        return Docs(ids, mask, starts, np.asarray(source, np.int64))

    def take(self, which: np.ndarray) -> Docs:
        return Docs.join([(self.ids[self.starts[d]:self.starts[d + 1]], self.mask[self.starts[d]:self.starts[d + 1]])
                          for d in which.tolist()], self.source[which].tolist())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)


_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create(path: Path):
    """A file that did not exist, opened read/write: O_EXCL fails on anything already there (a
    planted symlink included, which O_CREAT alone would follow), O_NOFOLLOW says it twice."""
    try:
        return os.fdopen(os.open(path, _NEW_FILE, 0o644), "w+b")
    except FileExistsError:
        raise DataError(f"{safeio.printable(path)}: something else created this file while prepare wrote it; "
                        f"use a data.prepared_dir only you write to") from None


def _new_npy(path: Path, dtype, shape: tuple[int, ...]):
    """(file, array) for a new .npy file of that dtype and shape, memory-mapped for writing (the
    windows of a large dataset do not fit in memory); the file is ours (_create), not a path
    numpy opens itself (np.lib.format.open_memmap would follow a symlink planted there)."""
    f = _create(path)
    dt = np.dtype(dtype)
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                                             "shape": shape})
    offset, nbytes = f.tell(), int(np.prod(shape)) * dt.itemsize
    f.truncate(offset + nbytes)
    if not nbytes:                     # mmap cannot map 0 bytes; an empty split is refused later anyway
        return f, np.zeros(shape, dt)
    return f, np.memmap(f, dtype=dt, mode="r+", offset=offset, shape=shape)


def write_split(out: Path, docs: Docs, seq_len: int, packing: bool, overlong: str, pad_id: int) -> dict:
    pieces, stats = fit_documents(docs.lengths, seq_len, overlong)
    kept = [p for p in pieces if docs.mask[docs.starts[p[0]] + p[1] + 1:docs.starts[p[0]] + p[1] + p[2]].any()]
    stats["no_loss_pieces"] = len(pieces) - len(kept)    # e.g. a chat without an assistant turn
    pieces = kept
    windows = pack([n - 1 for _, _, n in pieces], seq_len, packing)
    os.mkdir(out)                      # inside our fresh .tmp-* dir: fails rather than enter anything there
    shape = (len(windows), seq_len)
    files, mm = {}, {}
    for k in ("input_ids", "labels", "position_ids"):
        files[k], mm[k] = _new_npy(out / f"{k}.npy", np.int32, shape)
    index = np.zeros((len(pieces), 4), np.int64)
    used = 0
    for w, members in enumerate(windows):
        row_ids = np.full(seq_len, pad_id, np.int32)
        row_lab = np.full(seq_len, IGNORE, np.int32)
        row_pos = np.zeros(seq_len, np.int32)
        off = 0
        for p in members:
            d, s, n = pieces[p]
            a = docs.starts[d] + s
            tok, m = docs.ids[a:a + n], docs.mask[a:a + n]
            row_ids[off:off + n - 1] = tok[:-1]
            row_lab[off:off + n - 1] = np.where(m[1:], tok[1:], IGNORE)
            row_pos[off:off + n - 1] = np.arange(n - 1)
            index[p] = (w, off, n - 1, docs.source[d])
            off += n - 1
        row_pos[off:] = np.arange(seq_len - off)      # padding: a "document" of its own, no loss
        used += off
        mm["input_ids"][w], mm["labels"][w], mm["position_ids"][w] = row_ids, row_lab, row_pos
    for k, a in mm.items():
        if isinstance(a, np.memmap):
            a.flush()
        files[k].close()
    with _create(out / "docs.npy") as f:
        np.save(f, index)
    total = len(windows) * seq_len
    stats.update(windows=len(windows), pieces=len(pieces), tokens=int(used), slots=int(total),
                 loss_tokens=int(sum(int((mm["labels"][w] != IGNORE).sum()) for w in range(len(windows)))),
                 packing_efficiency=round(used / total, 4) if total else 0.0)
    return stats


# -------------------------------------------------------------------------------- the step
def _progress(total: int, quiet: bool):
    """A rich progress bar (records, tokens/s) on stderr; a no-op object when quiet / no rich."""
    class Null:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, records: int, tokens: int) -> None:
            pass
    if quiet:
        return Null()
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return Null()

    class Bar(Null):
        def __enter__(self):
            self.p = Progress(TextColumn("[bold]prepare[/]"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("records  {task.fields[tok]:>12} tokens  {task.fields[tps]:>10} tok/s"),
                              TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.p.__enter__()
            self.t0, self.tokens = time.perf_counter(), 0
            self.task = self.p.add_task("prepare", total=total, tok="0", tps="-")
            return self

        def __exit__(self, *a):
            return self.p.__exit__(*a)

        def update(self, records: int, tokens: int) -> None:
            self.tokens += tokens
            rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
            self.p.update(self.task, advance=records, tok=f"{self.tokens:,}", tps=f"{rate:,.0f}")
    return Bar()


def encode_sources(data: DataPlan, sources: tuple[Source, ...], enc: Encoder, cache_dir: Path, key: str,
                   quiet: bool, bad: BadRecords | None = None,
                   ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int], list[Path], float]:
    """Every record of the sources as documents. A record prepare cannot use is a bad record
    (bad: data.bad_records decides; without `bad` the first is raised)."""
    bad = bad if bad is not None else BadRecords(data, first=True)
    bad.start(key)
    loaded = []
    for s_idx, src in enumerate(sources):
        kind, files = source_files(src.path, _source_key(key, s_idx, len(sources)))
        picked = source_selection(src, kind, files, f"{key}[{s_idx}]",
                                  lambda f, kind=kind: _load(kind, f, data.format, cache_dir), s_idx)
        for _, f, (ds, lines, broken) in picked:
            loaded.append((s_idx, f, ds, lines, broken))
    bad.total = sum((len(ds) if ds is not None else 0) + len(broken) for *_, ds, _, broken in loaded)
    for _, f, _, _, broken in loaded:
        for n, message in broken:
            bad.add(f"{f}:{n}", message)
    loaded = [x[:4] for x in loaded]
    parts, src_of, t0, tokens = [], [], time.perf_counter(), 0
    with _progress(sum(len(ds) for _, _, ds, _ in loaded if ds is not None), quiet) as bar:
        for s_idx, f, ds, lines in loaded:
            if ds is None:
                continue
            where = Where(str(f), f.suffix in (".jsonl", ".ndjson"), lines)
            start = 0
            for batch in ds.iter(batch_size=512):
                docs = _encode_batch(enc, batch, where, start, bad)
                n = len(next(iter(batch.values()))) if batch else 0
                start += n
                parts.extend(docs)
                src_of.extend([s_idx] * len(docs))
                k = sum(len(i) for i, _ in docs)
                tokens += k
                bar.update(n, k)
    bad.check(done=True)
    files = [g for _, f, _, _ in loaded for g in (_all_files(str(f)) if f.is_dir() else [f])]
    return parts, src_of, files, tokens / max(1e-9, time.perf_counter() - t0)


def source_selection(src: Source, kind: str, files: list[Path], key: str, load: Callable[[Path], Any],
                     s_idx: int) -> list[tuple[int, Path, tuple]]:
    """A source's data_files and split (issue 22; all of it in this one function): only the files
    matching data_files (paths or globs relative to the source's folder), then the split's slice
    over the records of those files in order (train[:20%] = the first 20%, datasets' own slice
    semantics via ReadInstruction), not a random share. Local files are all the train split.
    load(f) -> (Dataset or None, line of each record or None, malformed lines) as _load returns;
    a slice keeps its records' lines (malformed lines are reported whatever the slice)."""
    import fnmatch

    if src.data_files:
        root = Path(src.path)
        rel = {f: f.relative_to(root).as_posix() if f != root else f.name for f in files}
        files = [f for f in files if any(fnmatch.fnmatchcase(rel[f], pat) or rel[f] == pat.lstrip("./")
                                         for pat in src.data_files)]
        if not files:
            raise DataError(f"{key}.data_files: none of {list(src.data_files)} matches a data file under "
                            f"{src.path!r}")
    base, _, sl = src.split.partition("[")
    if base != "train":
        raise DataError(f"{key}.split: {src.split!r}: local files hold one split, train (write train or train[...])")
    loaded = [(s_idx, f, load(f)) for f in files]
    if not sl:
        return loaded
    total = sum(len(ds) for _, _, (ds, _, _) in loaded if ds is not None)
    import datasets

    try:
        (absolute,) = datasets.ReadInstruction.from_spec(src.split).to_absolute({"train": total})
        start, stop = absolute.from_, absolute.to
    except (ValueError, AssertionError) as e:
        raise DataError(f"{key}.split: {src.split!r} is not a datasets split slice ({e})") from None
    out, seen = [], 0
    for i, f, (ds, lines, broken) in loaded:
        n = len(ds) if ds is not None else 0
        lo, hi = max(start - seen, 0), min(stop - seen, n)
        if hi > lo or broken:
            out.append((i, f, (ds.select(range(lo, hi)) if hi > lo else None,
                               lines[lo:hi] if lines is not None and hi > lo else None, broken)))
        seen += n
    return out


def _encode_batch(enc: Encoder, batch: dict, where: Where, start: int, bad: BadRecords,
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """enc.batch, and when a record of the batch is bad, record by record: the bad ones go to
    `bad` (which raises at once when it must), the others are encoded."""
    empty = _empty_replies(enc.data, batch)
    if not empty:
        try:
            return enc.batch(batch, where, start)
        except TemplateLimitError:
            raise
        except DataError:
            pass
    out = []
    for i in range(len(next(iter(batch.values()))) if batch else 0):
        w = where(start + i)
        if i in empty:
            bad.add(w, f"{w}: {empty[i]}")
            continue
        t = time.perf_counter()
        try:
            out.extend(enc.batch({k: v[i:i + 1] for k, v in batch.items()}, where, start + i))
        except TemplateLimitError:
            raise
        except DataError as e:
            bad.seconds += time.perf_counter() - t
            bad.add(w, str(e))
    return out


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, (list, dict)) and not v)


def _empty_replies(data: DataPlan, batch: dict) -> dict[int, str]:
    """{record: problem} for records whose trained reply is empty (or only whitespace): they would
    train the end-of-sequence / end-of-turn token alone, i.e. teach the model to answer nothing.
    train_on: all trains the prompt too, so nothing is refused there. A chat assistant message with
    more than its text (tool_calls, ...) is not empty."""
    f, fmt, out = data.fields, data.format, {}
    if data.train_on == "all" or fmt not in ("completion", "alpaca", "chat"):
        return out
    if fmt != "chat":
        key = "completion" if fmt == "completion" else "output"
        name = getattr(f, key)
        for i, v in enumerate(batch.get(name) or ()):
            if isinstance(v, str) and not v.strip():
                out[i] = (f"empty reply (data.fields.{key} {name!r} is {v!r}); only the end-of-sequence token would "
                          f"be trained: fill it in or remove the record")
        return out
    for i, msgs in enumerate(batch.get(f.messages) or ()):
        if not isinstance(msgs, list):
            continue
        replies = []
        for m in msgs:
            role = m.get(f.role) if isinstance(m, dict) else None
            if isinstance(role, str) and data.roles.get(role, role) == "assistant":
                replies.append(m)
        trained = replies[-1:] if data.train_on == "last_turn" else replies
        if trained and all(_blank(m.get(f.content)) and all(_blank(v) for k, v in m.items()
                                                           if k not in (f.role, f.content)) for m in trained):
            out[i] = (f"empty reply (every {'last ' if data.train_on == 'last_turn' else ''}assistant message is "
                      f"empty); only the end-of-turn token would be trained: fill it in or remove the record")
    return out


# ------------------------------------------------------------------------------ bad records
BAD_LISTED = 20            # data.bad_records: error lists this many bad records, then "... and N more"
BAD_SHOWN = 5              # skip: the first few shown in the report (all are counted by reason)
BAD_SECONDS = 60.0         # error: with the list full, stop counting after this long spent on bad records
#                            (a chat template that times out on every record costs 2 s each)


def _reason(problem: str) -> str:
    """What kind of bad record, to count by: the problem without its fix, details in
    parentheses or the message number ("no field 'output'", "unknown role 'gpt'", "empty reply")."""
    head = re.sub(r"\s*\([^)]*\)", "", problem.split("; ")[0])
    return re.sub(r"^message \d+: ", "", head).strip()[:120] or "bad record"


class BadRecords:
    """The bad records of one prepare (data.bad_records, data.max_bad_fraction). error: all of
    them are read and listed at the end in one DataError (raise_if_any). skip: counted by reason,
    left out; more than max_bad_fraction of a split's records is an error, raised as soon as it is
    certain. first=True (encode_sources without a collector): the first bad record is raised."""

    def __init__(self, data: DataPlan, first: bool = False):
        self.skip, self.fraction, self.first = data.bad_records == "skip", data.max_bad_fraction, first
        self.listed: list[str] = []
        self.reasons: Counter[str] = Counter()
        self.n, self.seconds = 0, 0.0
        self.key, self.total, self.split_bad = "data.sources", 0, 0
        self.splits: dict[str, dict] = {}

    def start(self, key: str) -> None:
        self.key, self.total, self.split_bad = key, 0, 0

    def add(self, where: str, message: str) -> None:
        if self.first:
            raise DataError(message)
        problem = message[len(where) + 2:] if message.startswith(where + ": ") else message
        self.n += 1
        self.split_bad += 1
        self.reasons[_reason(problem)] += 1
        if len(self.listed) < (BAD_SHOWN if self.skip else BAD_LISTED):
            self.listed.append(safeio.printable(message))
        self.check()

    def check(self, done: bool = False) -> None:
        if self.skip:
            if self.split_bad > self.fraction * self.total:
                raise DataError(self._message(
                    f"{self.key}: {'' if done else 'at least '}{self.split_bad:,} of {self.total:,} records are bad "
                    f"({self.split_bad / max(1, self.total):.1%}, more than data.max_bad_fraction "
                    f"{self.fraction:g}): fix the data (or data.fields / data.roles / the chat template), or raise "
                    f"data.max_bad_fraction"))
            if done and self.split_bad:
                self.splits[self.key] = {"records": self.total, "skipped": self.split_bad}
        elif len(self.listed) >= BAD_LISTED and self.seconds > BAD_SECONDS:
            self.raise_if_any(stopped=True)

    def raise_if_any(self, stopped: bool = False) -> None:
        """error mode: every bad record so far in one DataError. Its first line is the first bad
        record's own message (alone when it is the only one), then how many and the fix; the next
        lines list the others (BAD_LISTED in all, then "... and N more")."""
        if self.skip or not self.n:
            return
        if self.n == 1:
            raise DataError(f"{self.listed[0]} (or data.bad_records: skip leaves such records out)")
        count = f"{self.n:,}{'+' if stopped else ''}"
        raise DataError(self._message(
            f"{self.listed[0]} [1 of {count} bad records (data.bad_records: error): fix or remove them, or set "
            f"data.bad_records: skip to leave them out (at most data.max_bad_fraction of the records)"
            + (f"; stopped looking after {BAD_SECONDS:g} s on bad records" if stopped else "") + "]",
            self.listed[1:], self.n - 1))

    def _message(self, head: str, listed: list[str] | None = None, n: int | None = None) -> str:
        listed = self.listed if listed is None else listed
        n = self.n if n is None else n
        by = "; ".join(f"{c:,} {r}" for r, c in self.reasons.most_common(5))
        more = n - len(listed)
        return "\n".join([f"{head}; by reason: {by}", *(f"  {m}" for m in listed),
                          *([f"  ... and {more:,} more"] if more > 0 else [])])

    def summary(self) -> dict:
        """index.json's bad_records (skip mode): how many, by reason, the first few."""
        return {"skipped": self.n, "by_reason": dict(self.reasons.most_common()), "first": self.listed,
                "splits": self.splits}


def weigh(docs: Docs, weights: list[float], seed: int) -> Docs:
    """Mixing: source s contributes weight_s x its documents per epoch: floor(w) full copies plus
    a seeded random (w - floor(w)) share (weight 0.5 = half of it, 2 = every document twice)."""
    if all(w == 1.0 for w in weights):
        return docs
    rng = np.random.default_rng(seed)
    pick = []
    for s, w in enumerate(weights):
        mine = np.flatnonzero(docs.source == s)
        pick += [mine] * int(w)
        extra = int(round((w - int(w)) * len(mine)))
        if extra:
            pick.append(np.sort(rng.choice(mine, extra, replace=False)))
    return docs.take(np.concatenate(pick) if pick else np.zeros(0, np.int64))


def _hub_path(path: str, key: str, repo_type: str, files: tuple[str, ...] | None) -> tuple[str, bool]:
    """(local path, whether it is a Hub snapshot): a Hub id (pinned by the compiler to its
    commit) is read from the Hugging Face cache, or the Hub when reachable; a path that exists wins."""
    from . import hub

    if hub.hub_ref(path) is None:
        return path, False
    try:
        return hub.local_folder(path, repo_type, files), True
    except hub.HubMiss as e:
        raise DataError(f"{key}: {e}") from None


def _tokenizer_files(tokenizer: str | None) -> list[Path]:
    """The files the tokenizer is read from (index.json records them): the folder's, or a Hub
    snapshot's tokenizer files (not the weights beside them)."""
    from . import hub

    if not tokenizer:
        return []
    folder, from_hub = _hub_path(tokenizer, "data.tokenizer", "model", hub.TOKENIZER_FILES)
    return hub.tokenizer_files(folder) if from_hub else _all_files(folder)


def _all_files(folder: str | None) -> list[Path]:
    if not folder:
        return []
    p = Path(folder)
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]


def prepared_root(data: DataPlan) -> Path:
    return Path(data.prepared_dir)


def pointer_path(plan: Plan) -> Path:
    return prepared_root(plan.data) / f"{plan.name}-{plan_options_fingerprint(plan)[:16]}.current"


def plan_options_fingerprint(plan: Plan) -> str:
    return options_fingerprint(plan.data, plan.train.seq_len, plan.train.seed, plan.versions.get("meshbake", ""))


_POINTER_LIMIT = 4096        # {"dir": "<name>-<16 hex>", "fingerprint": "<64 hex>"}: ~150 bytes
_INDEX_LIMIT = 64 << 20      # index.json: ~200 bytes per source/tokenizer file, i.e. ~300k files
_REMOVE = "remove it and run `meshbake prepare RECIPE` again (meshbake writes only what it names itself)"


def _source_key(key: str, i: int, n: int) -> str:
    return f"{key}[{i}].path" if n > 1 else "data.path" if key == "data.sources" else f"{key}[0].path"


def source_paths(data: DataPlan) -> list[str]:
    """Every file the plan's sources resolve to now, as prepare records them in index.json
    ("files"): a save_to_disk folder counts as all the files in it."""
    out = []
    for key, srcs in (("data.sources", data.sources), ("data.eval_sources", data.eval_sources)):
        for i, src in enumerate(srcs):
            _, files = source_files(src.path, _source_key(key, i, len(srcs)))
            out += [str(g) for f in files for g in (_all_files(str(f)) if f.is_dir() else [f])]
    return out


def _read_pointer(plan: Plan) -> dict | None:
    """The pointer's {"dir", "fingerprint"}, None if there is none. Its "dir" is one plain name of
    the shape prepare writes (<name>-<16 hex> = the fingerprint's head): a pointer naming
    /etc, ../x or anything else was not written by meshbake and is refused, not followed."""
    p = pointer_path(plan)
    try:
        text = safeio.read_text_bounded(p, _POINTER_LIMIT)        # a symlink/FIFO/device: refused
    except FileNotFoundError:
        return None
    try:
        ptr = json.loads(text)
    except ValueError:
        ptr = None
    name, fp = (ptr.get("dir"), ptr.get("fingerprint")) if isinstance(ptr, dict) else (None, None)
    if not (isinstance(name, str) and isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp)
            and safeio.plain_name(name) and name == f"{plan.name}-{fp[:16]}"):
        raise DataError(f"{safeio.printable(p)}: does not name a prepared directory of {plan.name} inside "
                        f"{safeio.printable(prepared_root(plan.data))} (it holds {safeio.printable(text[:80])!r}); "
                        f"{_REMOVE}")
    return {"dir": name, "fingerprint": fp}


def _prepared_dir(plan: Plan, name: str) -> Path | None:
    """prepared_dir/name if it is a real directory (lstat: a symlink there is refused), None if missing."""
    d = prepared_root(plan.data) / name
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise DataError(f"{safeio.printable(d)}: is {kind}, not a directory meshbake prepared; {_REMOVE}")
    return d


def _facts_ok(facts) -> bool:
    return isinstance(facts, list) and all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("size")) is int
        and type(f.get("mtime_ns")) is int and isinstance(f.get("sha256"), str) for f in facts)


def read_index(d: Path) -> dict | None:
    """d/index.json (bounded, a regular file), None if missing; a file that is not an index
    meshbake wrote (not JSON, files / tokenizer_files not lists of facts) is refused."""
    p = d / "index.json"
    try:
        text = safeio.read_text_bounded(p, _INDEX_LIMIT)
    except FileNotFoundError:
        return None
    try:
        idx = json.loads(text)
    except ValueError:
        idx = None
    if not (isinstance(idx, dict) and _facts_ok(idx.get("files")) and _facts_ok(idx.get("tokenizer_files"))
            and isinstance(idx.get("splits"), dict)):
        raise DataError(f"{safeio.printable(p)}: is not an index meshbake wrote (files / tokenizer_files / splits); "
                        f"remove {safeio.printable(d)} and run `meshbake prepare RECIPE` again")
    return idx


def current(plan: Plan) -> Path | None:
    """The prepared directory of this plan, if complete and up to date, else None. Up to date:
    its index covers exactly the files the sources and the tokenizer resolve to now (an index
    listing fewer, more or no files is stale: an empty list must not switch the check off) and
    each of them has the size and mtime recorded. Planted pointers/dirs/indexes: DataError."""
    ptr = _read_pointer(plan)
    if ptr is None:
        return None
    d = _prepared_dir(plan, ptr["dir"])
    idx = None if d is None else read_index(d)
    if not idx or idx.get("options_fingerprint") != plan_options_fingerprint(plan) \
            or idx.get("fingerprint") != ptr["fingerprint"]:
        return None
    if sorted(f["path"] for f in idx["files"]) != sorted(source_paths(plan.data)) \
            or sorted(f["path"] for f in idx["tokenizer_files"]) != sorted(map(str, _tokenizer_files(plan.data.tokenizer))):
        return None
    if stale_files(idx["files"] + idx["tokenizer_files"]):
        return None
    return d


def locate(plan: Plan) -> Path:
    """What the ranks call: the prepared directory or a one-line error (never stale data)."""
    d = current(plan)
    if d is None:
        ptr = pointer_path(plan)
        why = "is missing" if not ptr.is_file() else "is stale (a source or the tokenizer changed since)"
        raise DataError(f"prepared data for {plan.name} {why} ({ptr}); run `meshbake prepare RECIPE` or "
                        f"`python -m runtime.prepare plan.json` (launch.sh does) before training")
    return d


def prepare(plan: Plan, quiet: bool = False, log: Callable[[str], None] = print) -> Path:
    """Prepare the plan's data unless an up-to-date copy exists; returns its directory. Then says
    what an epoch is in optimizer steps, and the run's length (train.epochs resolves here)."""
    folder = _prepare(plan, quiet, log)
    idx = read_index(folder) or {}
    windows = ((idx.get("splits") or {}).get("train") or {}).get("windows")
    if isinstance(windows, int) and windows > 0:
        log(length_line(plan.train, windows))
    return folder


def length_line(train: Any, windows: int) -> str:
    """'37 training windows = 4.62 steps of global_batch_size 8 per epoch; train.epochs 2 -> 10 steps
    (epoch 2.16 at the end)': the numbers the runtime resolves the run from (runtime/plan.epoch_steps)."""
    g = train.global_batch_size
    head = f"{windows:,} training windows = {windows / g:,.2f} steps of global_batch_size {g} per epoch; "
    if train.epochs is not None:
        steps = epoch_steps(train, windows)
        return head + f"train.epochs {train.epochs:g} -> {steps:,} steps (epoch {steps * g / windows:.2f} at the end)"
    return head + f"train.steps {train.steps:,} = {train.steps * g / windows:,.2f} epochs"


def _prepare(plan: Plan, quiet: bool, log: Callable[[str], None]) -> Path:
    data = plan.data
    if data.format == "synthetic":
        raise DataError("data.format is synthetic: nothing to prepare")
    have = current(plan)
    if have is not None:
        log(f"prepared data up to date: {have}")
        return have
    root = prepared_root(data)
    # data.prepared_dir is the user's path, all of it (it may be a symlink to scratch space); what
    # meshbake keeps inside it (pointers, <name>-<fp>/, .tmp-*) is checked and never followed
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):     # a file, FIFO or link to one where the directory goes
        raise DataError(f"data.prepared_dir {safeio.printable(root)} is not a directory; remove what is there, "
                        "or set data.prepared_dir to a directory") from None
    old = _read_pointer(plan)           # the last prepare's hashes, by size + mtime (a planted pointer: refused)
    old_dir = _prepared_dir(plan, old["dir"]) if old else None
    old_idx = (read_index(old_dir) if old_dir else None) or {}
    cache = {f["path"]: f for f in old_idx.get("files", []) + old_idx.get("tokenizer_files", [])}
    tmp = root / f".tmp-{plan.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        # fresh (mkdir fails on anything already there, a symlink included) and 0700 while we
        # write: nobody else can put a symlink where numpy / datasets are about to create a file;
        # opened to the umask's mode just before the rename (colleagues may read prepared data)
        os.mkdir(tmp, 0o700)
    except FileExistsError:
        raise DataError(f"{safeio.printable(tmp)}: already exists (a fresh random name); "
                        f"use a data.prepared_dir only you write to") from None
    try:
        return _prepare_into(plan, tmp, cache, quiet, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)     # refuses (ignored) to follow a symlink


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tokenizer(data: DataPlan):
    from . import hub

    if not data.tokenizer:
        return None
    folder, _ = _hub_path(data.tokenizer, "data.tokenizer", "model", hub.TOKENIZER_FILES)
    if not Path(folder).exists():
        raise DataError(f"data.tokenizer: {data.tokenizer!r} not found (relative to {os.getcwd()})")
    problem = hub.tokenizer_config_problem(folder)
    if problem is not None:
        raise DataError(f"data.tokenizer: {data.tokenizer!r}: {problem}; remove that key (save_pretrained "
                        "writes tokenizer.json beside it) or use a tokenizer folder you trust")
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False, said: left unset, transformers asks "run the custom code? [y/N]"
        # on a terminal when the folder's tokenizer_config.json has an auto_map (a tokenizer.py
        # beside it), and one keystroke runs code from the data folder
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError) as e:
        if isinstance(e, ValueError) and ("custom code" in str(e) or "trust_remote_code" in str(e)):
            raise DataError(f"data.tokenizer: {data.tokenizer!r} asks to run its own Python code (auto_map in "
                            "tokenizer_config.json), which meshbake never runs; use a folder with the "
                            "tokenizer.json (fast tokenizer) and a tokenizer_config.json without auto_map") from None
        raise DataError(f"data.tokenizer: {data.tokenizer!r} does not load as a tokenizer "
                        f"({(str(e).splitlines() or [''])[0][:200]}); point it at a folder written by "
                        "save_pretrained (tokenizer.json + tokenizer_config.json)") from None


def _prepare_into(plan: Plan, tmp: Path, cache: dict, quiet: bool, log: Callable[[str], None]) -> Path:
    data, T, seed = plan.data, plan.train.seq_len, plan.train.seed
    t0 = time.perf_counter()
    enc = Encoder(data, _tokenizer(data))
    bad = BadRecords(data)
    parts, src, files, tps = encode_sources(data, data.sources, enc, tmp / ".hf-cache", "data.sources", quiet, bad)
    if data.eval_sources:                   # before any check: every bad record of the prepare in one run
        e_parts, e_src, e_files, _ = encode_sources(data, data.eval_sources, enc, tmp / ".hf-cache",
                                                    "data.eval_sources", quiet, bad)
    bad.raise_if_any()
    docs = Docs.join(parts, src)
    if not len(docs.lengths):
        raise DataError(f"data.sources: no records in {', '.join(s.path for s in data.sources)} (empty dataset)")
    if docs.ids.size and int(docs.ids.max()) >= data.vocab_size:
        bad = int(docs.ids.max())
        raise DataError(f"token id {bad} >= the model's vocab_size {data.vocab_size} (data.tokenizer "
                        f"{data.tokenizer!r} does not fit the model; use the model's own tokenizer)")
    eval_docs = None
    if data.eval_sources:
        eval_docs, files = Docs.join(e_parts, e_src), files + e_files
    elif data.eval_fraction > 0:
        rng = np.random.default_rng(seed)
        n = len(docs.lengths)
        k = min(n - 1, max(1, int(round(n * data.eval_fraction))))
        held = np.sort(rng.choice(n, k, replace=False))
        keep = np.setdiff1d(np.arange(n), held)
        docs, eval_docs = docs.take(keep), docs.take(held)
    docs = weigh(docs, [s.weight for s in data.sources], seed)
    pad = enc.eos if enc.eos is not None else 0
    stats = {"train": write_split(tmp / "train", docs, T, data.packing, data.overlong, pad)}
    if stats["train"]["windows"] == 0:
        s = stats["train"]
        raise DataError(f"data: no trainable document left: {s['overlong']} of {s['documents']} are longer than "
                        f"seq_len {T} (data.overlong: {data.overlong}), {s['too_short']} too short, "
                        f"{s['no_loss_pieces']} without any trained token; use overlong: truncate or split")
    if eval_docs is not None:
        stats["eval"] = write_split(tmp / "eval", eval_docs, T, data.packing, data.overlong, pad)
        if stats["eval"]["windows"] == 0:
            raise DataError(f"data: the eval split is empty ({len(eval_docs.lengths)} documents held out of "
                            f"{len(eval_docs.lengths) + len(docs.lengths)}, none trainable); a text file is one "
                            f"document: give data.eval_sources, or more documents")
    shutil.rmtree(tmp / ".hf-cache", ignore_errors=True)
    facts = file_facts(files, cache)
    tok_facts = file_facts(_tokenizer_files(data.tokenizer), cache)
    opts = plan_options_fingerprint(plan)
    fp = hashlib.sha256(json.dumps({"options": opts, "files": [f["sha256"] for f in facts],
                                    "tokenizer": [(Path(f["path"]).name, f["sha256"]) for f in tok_facts]},
                                   sort_keys=True).encode()).hexdigest()
    idx = {"fingerprint": fp, "options_fingerprint": opts, "seq_len": T, "format": data.format,
           "files": facts, "tokenizer_files": tok_facts, "splits": stats, "prepare_version": PREPARE_VERSION,
           "encode_tokens_per_s": round(tps), "seconds": round(time.perf_counter() - t0, 3)}
    if bad.n:
        idx["bad_records"] = bad.summary()
    idx_text = json.dumps(idx, indent=1, sort_keys=True) + "\n"
    safeio.create_new(tmp / "index.json", idx_text)
    final = prepared_root(data) / f"{plan.name}-{fp[:16]}"
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        os.rename(tmp, final)           # atomic: a reader sees all of it or nothing
    except OSError:                     # the same content was prepared before (or by another node)
        # (a symlink at final: rename says ENOTDIR and _prepared_dir refuses it, never writes through)
        if (d := _prepared_dir(plan, final.name)) is None or read_index(d) is None:
            raise
        # same fingerprint = same bytes in; only the files' mtimes moved (a source rewritten with
        # the same content): record them, or every later locate() would call this dir stale
        safeio.write_atomic(final / "index.json", idx_text)
    safeio.write_atomic(pointer_path(plan), json.dumps({"dir": final.name, "fingerprint": fp}) + "\n")
    log(report(idx, final))
    return final


def report(idx: dict, where: Path) -> str:
    tr = idx["splits"]["train"]
    lines = [f"prepared {where}: {tr['windows']:,} windows of {idx['seq_len']} from {tr['documents']:,} documents, "
             f"{tr['tokens']:,} tokens ({tr['loss_tokens']:,} with loss), packing efficiency "
             f"{tr['packing_efficiency']:.1%}, {idx['encode_tokens_per_s']:,} tok/s"]
    if tr["overlong"]:
        lines.append(f"  {tr['overlong']} documents longer than seq_len {idx['seq_len']}: "
                     f"{tr['overlong_tokens_lost']:,} tokens lost (data.overlong)")
    if tr["too_short"] or tr["no_loss_pieces"]:
        lines.append(f"  skipped: {tr['too_short']} with < 2 tokens, {tr['no_loss_pieces']} without trained tokens")
    if idx.get("bad_records"):
        b = idx["bad_records"]
        lines.append(f"  skipped {b['skipped']:,} bad records (data.bad_records: skip): "
                     + ", ".join(f"{c:,} {r}" for r, c in b["by_reason"].items()))
        lines += [f"    {m}" for m in b["first"]] + ([f"    ... and {b['skipped'] - len(b['first']):,} more"]
                                                      if b["skipped"] > len(b["first"]) else [])
    if "eval" in idx["splits"]:
        ev = idx["splits"]["eval"]
        lines.append(f"  eval: {ev['windows']:,} windows from {ev['documents']:,} documents, {ev['loss_tokens']:,} "
                     f"tokens with loss")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                    help="do not prepare: wait until another process (node 0) has, or fail after SECONDS")
    args = ap.parse_args(argv)
    plan = load_plan(args.plan)
    if plan.data.format == "synthetic":
        return 0
    try:
        return _main(plan, args)
    except UserError as e:              # DataError and safeio's refusals (a planted symlink): one line
        print(e.line(), file=sys.stderr)
        return EXIT_USER


def _main(plan: Plan, args: argparse.Namespace) -> int:
    if args.wait is not None:
        deadline = time.monotonic() + args.wait
        while current(plan) is None:
            if time.monotonic() > deadline:
                print(f"meshbake: prepared data did not appear at {pointer_path(plan)} within {args.wait:.0f} s "
                      f"(node 0 prepares it; see its log)", file=sys.stderr)
                return 2
            time.sleep(5)
        return 0
    prepare(plan, quiet=args.quiet, log=lambda s: print(s, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
