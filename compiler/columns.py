"""data columns stage: each data source that is here, its first record against data.format and
data.fields, before the queue (runtime/prepare.py would stop on the cluster at the same field).

Only what is on this machine is read: a local file or folder, or a Hub dataset's pinned snapshot
already in the cache (never a download). The files are the ones prepare reads (its own
source_files and the source's data_files); of the first few, the first record's field names
(jsonl / json: the first object's keys, csv / tsv: the header, parquet: the schema, text files:
`text`). A source that cannot be read here, or whose files prepare itself would refuse, is left to
prepare (its message is the better one); this stage only says "these records have no field X".
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from meshbake.compiler.errors import RecipeError
from meshbake.runtime import hub as H

# format -> the data.fields keys prepare requires (runtime/prepare.Encoder.batch; alpaca's input is optional)
REQUIRED = {"text": ("text",), "completion": ("prompt", "completion"), "alpaca": ("instruction", "output"),
            "chat": ("messages",), "tokenized": ("input_ids",)}
FILES_READ = 4                 # the first few data files: a mapping fits all of them or none
MAX_JSON = 50_000_000          # a .json file is read whole; a bigger one is prepare's to read


def first_record(f: Path) -> dict | set | None:
    """The first record (jsonl / json: a dict) or the field names (csv / parquet / text); None
    when it cannot be told cheaply."""
    try:
        if f.suffix in (".jsonl", ".ndjson"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                for _, line in zip(range(1000), fh):
                    if line.strip():
                        rec = json.loads(line)
                        return rec if isinstance(rec, dict) else None
            return None
        if f.suffix == ".json" and f.stat().st_size <= MAX_JSON:
            obj = json.loads(f.read_text(encoding="utf-8"))
            return obj[0] if isinstance(obj, list) and obj and isinstance(obj[0], dict) else None
        if f.suffix in (".csv", ".tsv"):
            with open(f, encoding="utf-8", errors="replace", newline="") as fh:
                head = next(csv.reader(fh, delimiter="\t" if f.suffix == ".tsv" else ","), None)
            return set(head) if head else None
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(f).names)
        if f.suffix in (".txt", ".md", ".text"):
            return {"text"}
    except (OSError, ValueError, RecursionError, ImportError):
        return None
    return None


def _here(path: str, pin) -> str | None:
    if pin is not None:
        return pin.folder if Path(pin.folder).is_dir() else None
    if H.hub_ref(path) is not None or not Path(path).exists():
        return None
    return path


def _files(path: str, src, key: str) -> list[Path]:
    import fnmatch

    from meshbake.runtime.prepare import source_files

    try:
        kind, files = source_files(path, key)
    except Exception:          # noqa: BLE001 prepare's own refusal (no data files, a bad card): its message
        return []
    if kind != "files":
        return []
    if src.data_files:
        root = Path(path)
        rel = {f: f.relative_to(root).as_posix() if f != root else f.name for f in files}
        files = [f for f in files if any(fnmatch.fnmatchcase(rel[f], p) or rel[f] == p.lstrip("./")
                                         for p in src.data_files)]
    return files[:FILES_READ]


def _missing(rec: dict | set, fmt: str, fields) -> tuple[str, str] | None:
    """(data.fields key, field name) the record lacks, or None."""
    names = set(rec)
    for k in REQUIRED.get(fmt, ()):
        if getattr(fields, k) not in names:
            return k, getattr(fields, k)
    if fmt == "chat" and isinstance(rec, dict):
        msgs = rec.get(fields.messages)
        first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else None
        for k in ("role", "content"):       # a tool-call message may have no content (prepare accepts it)
            if first is not None and getattr(fields, k) not in first and not (k == "content" and
                                                                             first.get("tool_calls")):
                return k, getattr(fields, k)
    return None


def column_errors(recipe, pinned) -> list[RecipeError]:
    d = recipe.data
    if d.format not in REQUIRED or d.bad_records == "skip":
        return []          # skip: a record without the field is one prepare leaves out (up to max_bad_fraction)
    out = []
    for group, srcs in (("data.sources", d.sources), ("data.eval_sources", d.eval_sources)):
        for i, src in enumerate(srcs):
            key = f"{group}[{i}].path"
            here = _here(src.path, pinned.pin(key))
            for f in (_files(here, src, key) if here else []):
                rec = first_record(f)
                gap = None if rec is None else _missing(rec, d.format, d.fields)
                if gap is None:
                    continue
                k, name = gap
                inside = f" (in {d.fields.messages}[0])" if k in ("role", "content") else ""
                have = ", ".join(sorted(map(str, rec if k not in ("role", "content") else
                                            rec[d.fields.messages][0])))[:300]
                out.append(RecipeError(key, f"{src.path}: {f.name}'s first record has no field {name!r}{inside}, "
                                       f"which data.format {d.format} reads as data.fields.{k}; it has {have}",
                                       f"set data.fields.{k} to the field that holds it, or the data.format "
                                       "these records are"))
                break
    return out
