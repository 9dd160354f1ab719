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
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EXIT_USER, UserError
from .plan import DataPlan, Plan, Source, load_plan

PREPARE_VERSION = 1        # bump when the on-disk layout or the tokenization rules change
IGNORE = -100              # label of a position without loss (torch cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool")
FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
              ".md": "text", ".text": "text"}
ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class DataError(UserError):
    """One line for the user: which file / record / key, what is wrong and what to do (a
    UserError: runtime.train and the CLI print it without a traceback)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        where, _, rest = message.partition(": ")
        self.path, self.problem, self.fix = where, rest or message, ""


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
    """('disk', [folder]) for a save_to_disk folder, else ('files', sorted data files)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{key}: {path!r} not found (relative to {os.getcwd()})")
    if p.is_dir() and (p / "dataset_info.json").is_file() and (p / "state.json").is_file():
        return "disk", [p]
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        return "disk", [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_KINDS) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{key}: no data files in {path!r} (looked for {', '.join(sorted(FILE_KINDS))})")
    if files[0].suffix not in FILE_KINDS:
        raise DataError(f"{key}: {path!r}: unknown file type {files[0].suffix!r}; "
                        f"use one of {', '.join(sorted(FILE_KINDS))} or a datasets.save_to_disk folder")
    return "files", files


def load_records(kind: str, path: Path, fmt: str, cache_dir: Path):
    """One file (or save_to_disk folder) as a datasets.Dataset."""
    import datasets

    if kind == "disk":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
            ds = ds["train"]
        return ds
    builder = FILE_KINDS[path.suffix]
    if builder == "text" and fmt != "text":
        raise DataError(f"{path}: a plain text file holds no {fmt!r} records; use jsonl/json/parquet/csv")
    kw: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (no records)")
    if builder in ("json", "csv", "text"):
        _check_text(path)              # datasets' own errors name neither the byte nor the line
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir), **kw)
    except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in several types
        raise DataError(f"{path}: cannot be read as {builder}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None


def _check_text(path: Path) -> None:
    """UTF-8 throughout (the byte offset and line of the first bad byte), and for jsonl one JSON
    object per line (the file's own line number: split on \n only, as str.splitlines would also
    split on U+2028 or a form feed inside a record's text and the numbers would drift)."""
    dec, off, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    jsonl, pending = path.suffix == ".jsonl", ""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            held = len(dec.getstate()[0])      # bytes of a split character from the last chunk
            try:
                text = dec.decode(chunk)
            except UnicodeDecodeError as e:
                at = off - held + e.start      # e.start counts from the held bytes
                with path.open("rb") as g:
                    head = g.read(at + 4)
                lines = head.count(b"\n", 0, at) + 1
                raise DataError(f"{path}: not valid UTF-8 at byte {at} (line {lines}: {head[at:at + 4]!r}); "
                                f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove that byte") from None
            off += len(chunk)
            if jsonl:
                *done, pending = (pending + text).split("\n")
                for rec in done:
                    _json_line(path, line, rec)
                    line += 1
    if jsonl:
        _json_line(path, line, pending)


def _json_line(path: Path, n: int, rec: str) -> None:
    if not rec.strip():
        return
    try:
        obj = json.loads(rec)
    except ValueError as e:
        raise DataError(f"{path}:{n}: not a JSON record ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')}); "
                        f"fix or remove that line (one JSON object per line)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{n}: a JSON {type(obj).__name__}, not a record (an object); fix or remove that line")


# --------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Where:
    """A record's place for error messages: file and record number (= line of a jsonl file
    without blank lines)."""
    file: str
    jsonl: bool

    def __call__(self, i: int) -> str:
        return f"{self.file}:{i + 1}" if self.jsonl else f"{self.file} record {i + 1}"


class Encoder:
    """Records -> (ids int32, mask bool) per document; mask[j] = token j is a loss target."""

    def __init__(self, data: DataPlan, tok):
        self.data, self.tok, self.f = data, tok, data.fields
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
        return [self.chat(m, where(start + i)) for i, m in enumerate(self.field(batch, "messages", where, start))]

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
    def _messages(self, raw, where: str) -> list[dict[str, str]]:
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: {self.f.messages!r} must be a non-empty list of messages")
        out = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or self.f.role not in m or self.f.content not in m:
                raise DataError(f"{where}: message {j + 1} has no {self.f.role!r} / {self.f.content!r} "
                                f"(data.fields.role / data.fields.content)")
            role = self.data.roles.get(m[self.f.role], m[self.f.role])
            if role not in ROLES:
                raise DataError(f"{where}: message {j + 1}: unknown role {m[self.f.role]!r}; map it with "
                                f"data.roles (e.g. {{human: user, gpt: assistant}}) to one of {', '.join(ROLES)}")
            out.append({"role": role, "content": str(m[self.f.content] or "")})
        return out

    def _render(self, msgs: list[dict], gen: bool, where: str) -> str:
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - a template's raise_exception() (e.g. roles must alternate)
            raise DataError(f"{where}: the chat template refused this conversation: {str(e).splitlines()[0]}") from None

    def chat(self, raw, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Loss mask by prefix rendering (works for templates without {% generation %} markers):
        the text of assistant turn i is [render(msgs[:i], add_generation_prompt), render(msgs[:i+1]))
        in characters. The whole conversation is tokenized once with offsets and a token is in
        that turn if its characters are; within a turn, tokens after the first special token
        (the end-of-turn: <|im_end|>, <|eot_id|>) are not trained (ChatML's newline after it)."""
        msgs = self._messages(raw, where)
        full = self._render(msgs, False, where)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            try:
                head = self._render(msgs[:i], True, where) if i else ""
            except DataError:
                head = self._render(msgs[:i], False, where) if i else ""
            upto = full if i == len(msgs) - 1 else self._render(msgs[:i + 1], False, where)
            if not (full.startswith(upto) and upto.startswith(head)):
                raise DataError(f"{where}: the chat template does not render a conversation's prefix as a prefix of "
                                f"it (at message {i + 1}), so assistant turns cannot be located; use train_on: all")
            spans.append((len(head), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        mask = np.full(len(ids), self.data.train_on == "all")
        special = np.isin(ids, list(self.special))
        for s, e in spans[-1:] if self.data.train_on == "last_turn" else spans:
            inside = np.flatnonzero((offs[:, 0] >= s) & (offs[:, 1] <= e) & (offs[:, 1] > offs[:, 0]))
            ends = inside[special[inside]]
            last = ends[0] if ends.size else (inside[-1] if inside.size else -1)
            mask[inside[inside <= last]] = True      # the reply up to its end-of-turn token
        return ids, mask


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


def write_split(out: Path, docs: Docs, seq_len: int, packing: bool, overlong: str, pad_id: int) -> dict:
    pieces, stats = fit_documents(docs.lengths, seq_len, overlong)
    kept = [p for p in pieces if docs.mask[docs.starts[p[0]] + p[1] + 1:docs.starts[p[0]] + p[1] + p[2]].any()]
    stats["no_loss_pieces"] = len(pieces) - len(kept)    # e.g. a chat without an assistant turn
    pieces = kept
    windows = pack([n - 1 for _, _, n in pieces], seq_len, packing)
    out.mkdir(parents=True)
    shape = (len(windows), seq_len)
    mm = {k: np.lib.format.open_memmap(out / f"{k}.npy", mode="w+", dtype=np.int32, shape=shape)
          for k in ("input_ids", "labels", "position_ids")}
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
    for a in mm.values():
        a.flush()
    np.save(out / "docs.npy", index)
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
                   quiet: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int], list[Path], float]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    loaded = []
    for s_idx, src in enumerate(sources):
        kind, files = source_files(src.path, f"{key}[{s_idx}].path" if len(sources) > 1 else
                                   "data.path" if key == "data.sources" else f"{key}[0].path")
        loaded += source_selection(src, kind, files, f"{key}[{s_idx}]",
                                   lambda f, kind=kind: load_records(kind, f, data.format, cache_dir), s_idx)
    parts, src_of, t0, tokens = [], [], time.perf_counter(), 0
    with _progress(sum(len(ds) for _, _, ds in loaded), quiet) as bar:
        for s_idx, f, ds in loaded:
            where = Where(str(f), f.suffix == ".jsonl")
            start = 0
            for batch in ds.iter(batch_size=512):
                docs = enc.batch(batch, where, start)
                n = len(next(iter(batch.values())))
                start += n
                parts.extend(docs)
                src_of.extend([s_idx] * len(docs))
                k = sum(len(i) for i, _ in docs)
                tokens += k
                bar.update(n, k)
    files = [g for _, f, _ in loaded for g in (_all_files(str(f)) if f.is_dir() else [f])]
    return parts, src_of, files, tokens / max(1e-9, time.perf_counter() - t0)


def source_selection(src: Source, kind: str, files: list[Path], key: str, load: Callable[[Path], Any],
                     s_idx: int) -> list[tuple[int, Path, Any]]:
    """A source's data_files and split (issue 22; all of it in this one function): only the files
    matching data_files (paths or globs relative to the source's folder), then the split's slice
    over the records of those files in order (train[:20%] = the first 20%, datasets' own slice
    semantics via ReadInstruction), not a random share. Local files are all the train split."""
    import fnmatch

    import datasets

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
    total = sum(len(ds) for _, _, ds in loaded)
    try:
        (absolute,) = datasets.ReadInstruction.from_spec(src.split).to_absolute({"train": total})
        start, stop = absolute.from_, absolute.to
    except (ValueError, AssertionError) as e:
        raise DataError(f"{key}.split: {src.split!r} is not a datasets split slice ({e})") from None
    out, seen = [], 0
    for i, f, ds in loaded:
        lo, hi = max(start - seen, 0), min(stop - seen, len(ds))
        if hi > lo:
            out.append((i, f, ds.select(range(lo, hi))))
        seen += len(ds)
    return out


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


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def current(plan: Plan) -> Path | None:
    """The prepared directory of this plan, if complete and up to date (sources and tokenizer
    unchanged by size and mtime), else None."""
    ptr = _read_json(pointer_path(plan))
    if not ptr:
        return None
    d = prepared_root(plan.data) / ptr["dir"]
    idx = _read_json(d / "index.json")
    if not idx or idx.get("options_fingerprint") != plan_options_fingerprint(plan):
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
    """Prepare the plan's data unless an up-to-date copy exists; returns its directory."""
    data = plan.data
    if data.format == "synthetic":
        raise DataError("data.format is synthetic: nothing to prepare")
    have = current(plan)
    if have is not None:
        log(f"prepared data up to date: {have}")
        return have
    root = prepared_root(data)
    root.mkdir(parents=True, exist_ok=True)
    old = _read_json(pointer_path(plan)) or {}
    old_idx = _read_json(root / old.get("dir", "-") / "index.json") or {}
    cache = {f["path"]: f for f in old_idx.get("files", []) + old_idx.get("tokenizer_files", [])}
    tmp = root / f".tmp-{plan.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        tmp.mkdir()
        return _prepare_into(plan, tmp, cache, quiet, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(data: DataPlan):
    if not data.tokenizer:
        return None
    if not Path(data.tokenizer).exists():
        raise DataError(f"data.tokenizer: {data.tokenizer!r} not found (relative to {os.getcwd()})")
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False, said: left unset, transformers asks "run the custom code? [y/N]"
        # on a terminal when the folder's tokenizer_config.json has an auto_map (a tokenizer.py
        # beside it), and one keystroke runs code from the data folder
        return AutoTokenizer.from_pretrained(data.tokenizer, trust_remote_code=False)
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
    parts, src, files, tps = encode_sources(data, data.sources, enc, tmp / ".hf-cache", "data.sources", quiet)
    docs = Docs.join(parts, src)
    if not len(docs.lengths):
        raise DataError(f"data.sources: no records in {', '.join(s.path for s in data.sources)} (empty dataset)")
    if docs.ids.size and int(docs.ids.max()) >= data.vocab_size:
        bad = int(docs.ids.max())
        raise DataError(f"token id {bad} >= the model's vocab_size {data.vocab_size} (data.tokenizer "
                        f"{data.tokenizer!r} does not fit the model; use the model's own tokenizer)")
    eval_docs = None
    if data.eval_sources:
        e_parts, e_src, e_files, _ = encode_sources(data, data.eval_sources, enc, tmp / ".hf-cache",
                                                    "data.eval_sources", quiet)
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
    tok_facts = file_facts(_all_files(data.tokenizer), cache)
    opts = plan_options_fingerprint(plan)
    fp = hashlib.sha256(json.dumps({"options": opts, "files": [f["sha256"] for f in facts],
                                    "tokenizer": [(Path(f["path"]).name, f["sha256"]) for f in tok_facts]},
                                   sort_keys=True).encode()).hexdigest()
    idx = {"fingerprint": fp, "options_fingerprint": opts, "seq_len": T, "format": data.format,
           "files": facts, "tokenizer_files": tok_facts, "splits": stats, "prepare_version": PREPARE_VERSION,
           "encode_tokens_per_s": round(tps), "seconds": round(time.perf_counter() - t0, 3)}
    (tmp / "index.json").write_text(json.dumps(idx, indent=1, sort_keys=True) + "\n")
    final = prepared_root(data) / f"{plan.name}-{fp[:16]}"
    try:
        os.rename(tmp, final)           # atomic: a reader sees all of it or nothing
    except OSError:                     # the same content was prepared before (or by another node)
        if _read_json(final / "index.json") is None:
            raise
        # same fingerprint = same bytes in; only the files' mtimes moved (a source rewritten with
        # the same content): record them, or every later locate() would call this dir stale
        idx_tmp = final / f"index.json.tmp{os.getpid()}"
        idx_tmp.write_text(json.dumps(idx, indent=1, sort_keys=True) + "\n")
        os.replace(idx_tmp, final / "index.json")
    ptr_tmp = pointer_path(plan).with_suffix(f".tmp{os.getpid()}")
    ptr_tmp.write_text(json.dumps({"dir": final.name, "fingerprint": fp}) + "\n")
    os.replace(ptr_tmp, pointer_path(plan))
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
    if args.wait is not None:
        deadline = time.monotonic() + args.wait
        while current(plan) is None:
            if time.monotonic() > deadline:
                print(f"meshbake: prepared data did not appear at {pointer_path(plan)} within {args.wait:.0f} s "
                      f"(node 0 prepares it; see its log)", file=sys.stderr)
                return 2
            time.sleep(5)
        return 0
    try:
        prepare(plan, quiet=args.quiet, log=lambda s: print(s, file=sys.stderr))
    except DataError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USER
    return 0


if __name__ == "__main__":
    sys.exit(main())
