"""Distributed checkpoints (torch.distributed.checkpoint): atomic, resumable on another mesh.

Layout under <run_dir>/<checkpoint.dir>/:
    step-40/             a committed checkpoint: DCP shards + .metadata, train_state.json,
                         rng-rank<r>.pt, COMMITTED (written last, before the rename)
    step-50.tmp/         being written, or left behind by a killed writer: never resumed from
    step-40.old/         the previous copy of a step saved again, renamed aside for the commit
                         and removed after it; never resumed from
    step-30.corrupt/     a committed step that failed verification at resume, renamed aside
                         (kept for inspection, never resumed from, never pruned)
Commit protocol: every rank writes its DCP shards into step-N.tmp -> barrier -> each rank
hashes the files it wrote (sha256) -> rank 0 writes train_state.json, manifest.json (name ->
bytes, sha256 of every file) and COMMITTED, fsyncs, renames step-N.tmp -> step-N -> barrier.
A crash at any point before the rename leaves only a .tmp directory; step-M is untouched.

Integrity: resume verifies the newest step first (every file listed, its size, and its sha256,
the files split over the ranks); a step that fails (bit rot, a truncated or missing shard, a
step holding only COMMITTED) is logged in one line, renamed to step-N.corrupt and the next
older one is tried. Export verifies too. Cost, for a 70B run with fp32 params and AdamW
moments: 70.6e9 x 12 B = 847 GB per checkpoint, 13.2 GB per rank on 64 ranks. Each rank hashes
only its own files right after writing them, from the page cache (no extra disk read): at
~1.5-2 GB/s per core with SHA-NI (0.4 GB/s measured on this shared 2-core box) that is 7-9 s
per rank in parallel, beside 847 GB / ~20 GB/s = 42 s of writing to a parallel filesystem.
At resume the same 847 GB are read once more, split over all ranks (the load reads them again).

Untrusted bytes: DCP writes .metadata with pickle, and its FileSystemReader reads it back with a
bare pickle.load; its default planner torch.load()s the non-tensor entries (the optimizer's
param_groups) with weights_only=False. A checkpoint someone else wrote (checkpoint.resume: PATH,
`meshbake export RUN_DIR`, a shared run dir) could so run any code on every rank; the sha256
manifest does not help, whoever wrote the pickle wrote the manifest too. Every load here goes
through `load_dcp`: .metadata is unpickled with only the classes a DCP metadata file holds
(SAFE_METADATA_GLOBALS; any other global is refused before it is imported or called) and
the byte entries with torch.load(weights_only=True). A refused checkpoint is a UserError (exit 3).

Untrusted names: every name a checkpoint holds (manifest.json's files, .metadata's storage paths,
the entries of the checkpoint dir) stays inside its step dir and names a regular file: DCP opens
step / relative_path and seeks to offset, so '../../x', '~/.ssh/id_rsa' (absolute) or a FIFO
(open() blocks forever) would be read; a verify() that fails on one is a failing step (skipped
as corrupt at resume, refused by export). Reads go through safeio.open_regular (no symlink, no
FIFO, bounded), writes through safeio (a planted symlink is refused, never written through), and
every name that reaches a log line goes through safeio.printable (a dir named "step-1\nok" cannot
forge a line of train.log).

Model and optimizer go through get_state_dict/set_state_dict, whose keys are the model's own
fqns whatever the FSDP/TP wrapping: a checkpoint saved on dp_shard 4 loads on dp_shard 2 x
tp 2 (DCP reshards on load). RNG states are per rank and restored only on the same world size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import stat
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from . import safeio
from .errors import UserError
from .safeio import printable

COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"       # {"step": N, "files": {name: {"bytes": n, "sha256": hex}}}
_STEP = re.compile(r"^step-(\d+)$")
_WRITER = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng-rank(\d+)\.pt)$")
_CHUNK = 16 << 20                # hashlib releases the GIL on buffers this size
_JSON_LIMIT = 64 << 20           # manifest.json / train_state.json: a line per file, a few numbers
_META_LIMIT = 1 << 30            # .metadata: an entry per chunk; a 70B FSDP x TP run's is tens of MB
_RNG_LIMIT = 1 << 20             # rng-rank<r>.pt: a CPU generator state, ~5 KB
_FIX = "resume or export only checkpoints meshbake wrote, from a directory only you can write"


def ckpt_root(run_dir: Path, dir_: str) -> Path:
    """checkpoint.dir: below the run dir every part of it is a real directory (or missing): a
    planted `checkpoints -> elsewhere` is refused, or saves would write and pruning delete there.
    An absolute checkpoint.dir is the user's own choice and may be a link (to scratch space):
    resolved here, so the checks at save see the directory it names."""
    p = Path(dir_)
    return p.resolve() if p.is_absolute() else safeio.subdir(run_dir, *p.parts, create=False)


def _mode(p: Path) -> int | None:
    try:
        return os.lstat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_regular(p: Path) -> bool:
    """A regular file itself, not a link to one (is_file() follows links)."""
    mode = _mode(p)
    return mode is not None and stat.S_ISREG(mode)


def list_checkpoints(root: Path, log: Callable[[str], None] = lambda s: None) -> list[tuple[int, Path]]:
    """Committed checkpoints (real step-N directories holding a regular COMMITTED), oldest first;
    incomplete ones and links are reported and skipped. Names are logged through printable:
    they are whatever someone could create in the directory."""
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        name, mode, m = printable(p.name), _mode(p), _STEP.fullmatch(p.name)
        if mode is None:
            continue
        if stat.S_ISLNK(mode):      # meshbake never makes one: resuming or pruning through it reads/deletes elsewhere
            log(f"checkpoint {name}: a symbolic link (meshbake writes real directories here), skipped")
        elif p.name.endswith(".tmp"):
            log(f"checkpoint {name}: incomplete (writer stopped before commit), skipped")
        elif m and stat.S_ISDIR(mode) and _is_regular(p / COMMITTED):
            out.append((int(m.group(1)), p))
        elif m:
            log(f"checkpoint {name}: no {COMMITTED} marker, skipped")
    return sorted(out)


def sha256_file(p: Path, size: int | None = None) -> tuple[int, str]:
    """(bytes, sha256) of a regular file (never a link or a FIFO: safeio.open_regular); with
    size, a larger file is refused and at most size bytes are read."""
    h, n = hashlib.sha256(), 0
    left = size if size is not None else float("inf")
    with safeio.open_regular(p, size) as f:
        while left > 0 and (chunk := f.read(int(min(_CHUNK, left)))):
            h.update(chunk)
            n += len(chunk)
            left -= len(chunk)
    return n, h.hexdigest()


def writer_rank(name: str) -> int:
    """The rank that wrote a file of a step: DCP names shards __<rank>_<i>.distcp; the rest
    (.metadata, train_state.json) is rank 0's."""
    m = _WRITER.fullmatch(name)
    return int(m.group(1) or m.group(2)) if m else 0


def _listed_problem(step: Path, name: str, size: int) -> str | None:
    """What is wrong with a file the manifest lists, short of its digest."""
    if not safeio.plain_name(name):
        return f"{MANIFEST} names '{printable(name)}', not a file name inside the step dir"
    mode = _mode(step / name)
    if mode is None:
        return f"{name} is missing"
    if not stat.S_ISREG(mode):
        return f"{name} is {safeio._kind(mode)}, not a regular file"
    have = os.lstat(step / name).st_size
    if have != size:
        return f"{name} is {have} bytes, {size} were written (truncated or replaced)"
    return None


def _read_metadata(path: Path) -> Metadata:
    """.metadata through the allow-list unpickler, opened as a regular file of bounded size."""
    with safeio.open_regular(path, _META_LIMIT) as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f".metadata holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def storage_problem(metadata: Metadata, step: Path) -> str | None:
    """None if every storage entry of .metadata is a slice of a regular file directly in the step
    dir, else what is not: DCP reads step / relative_path from offset for length bytes."""
    data = getattr(metadata, "storage_data", None)
    if not isinstance(data, dict):
        return ".metadata has no storage_data mapping"
    sizes: dict[str, int] = {}
    for info in data.values():
        rel, off, n = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not isinstance(rel, str) or not safeio.plain_name(rel):
            return f".metadata points DCP at '{printable(rel)}', not a file name inside the step dir"
        if rel not in sizes:
            mode = _mode(step / rel)
            if mode is None or not stat.S_ISREG(mode):
                return f".metadata points DCP at {rel}, which is " + (
                    "missing" if mode is None else f"{safeio._kind(mode)}, not a regular file")
            sizes[rel] = os.lstat(step / rel).st_size
        if type(off) is not int or type(n) is not int or off < 0 or n < 0 or off + n > sizes[rel]:
            return (f".metadata reads bytes {printable(off)}+{printable(n)} of {rel}, which holds "
                    f"{sizes[rel]} (not a slice of the file)")
    return None


def metadata_problem(step: Path) -> str | None:
    """verify()'s look at .metadata: where its storage entries point. A .metadata naming a global
    outside the allow-list is left to load_dcp, which refuses it loudly (exit 3, naming it), as
    is a missing one (DCP's load says so)."""
    try:
        return storage_problem(_read_metadata(step / ".metadata"), step)
    except FileNotFoundError:        # nothing points anywhere; the manifest (or the legacy check) vouches for presence
        return None
    except UserError as e:                       # a link, a FIFO, too large
        return f".metadata {e.problem}"
    except UnsafeCheckpoint:
        return None
    except Exception as e:                       # any bytes reach the unpickler: any error can come out
        return f".metadata does not unpickle as DCP metadata ({type(e).__name__})"


def verify(path: Path, part: tuple[int, int] = (0, 1)) -> str | None:
    """None if the step is whole, else what is wrong (a short phrase). Every rank checks that
    every listed file exists with its size; rank r of world hashes every world-th file."""
    if not _is_regular(path / COMMITTED):
        return f"no {COMMITTED}"
    try:
        files = json.loads(safeio.read_text_bounded(path / MANIFEST, _JSON_LIMIT))["files"]
        items = sorted((str(k), int(v["bytes"]), str(v["sha256"])) for k, v in files.items())
    except FileNotFoundError:
        # a step saved before digests existed (an older meshbake) is whole when DCP's metadata and
        # the train state are there: loaded unverified rather than skipped, or upgrading meshbake
        # would send a run back to step 0 and `keep` would then prune its real checkpoints
        if _is_regular(path / ".metadata") and _is_regular(path / "train_state.json") and not any(
                p.name.endswith(".tmp") for p in path.iterdir()):
            return metadata_problem(path)
        return f"no {MANIFEST} and no DCP .metadata / train_state.json (only {COMMITTED})"
    except UserError as e:
        return f"{MANIFEST} {e.problem}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return printable(f"{MANIFEST} unreadable ({type(e).__name__}: {e})")
    # every rank checks every name, kind and size (cheap) and where .metadata points, before any
    # byte is hashed: a FIFO or a name outside the step dir is never opened
    problem = next((p for name, size, _ in items if (p := _listed_problem(path, name, size))), None)
    if problem is None:
        problem = metadata_problem(path)
    if problem is not None:
        return problem
    rank, world = part
    for i, (name, size, digest) in enumerate(items):
        if i % world == rank:
            try:
                if sha256_file(path / name, size)[1] != digest:
                    return f"{name} differs from the sha256 written at save (corrupted)"
            except UserError as e:               # replaced by a link or a FIFO since the check above
                return f"{name} {e.problem}"
            except OSError as e:
                return f"{name} unreadable ({e.strerror})"
    return None


def find_resume(root: Path, resume: str, log: Callable[[str], None],
                check: Callable[[Path], str | None] = verify,
                discard: Callable[[Path], None] = lambda p: None) -> Path | None:
    """auto: the run's newest committed checkpoint that passes `check` (older ones are tried
    in turn; each failing one is logged and handed to `discard`). A path: where a NEW run
    starts from (a warm start, or another mesh's checkpoint); once this run has committed
    checkpoints of its own, a restart or a requeue continues from those (torchtitan's
    initial_load_path), or every preemption would throw the progress since that path away."""
    found = list_checkpoints(root, log)
    if resume == "never":
        if found:   # training on would prune and overwrite them, mixing two runs in one dir
            raise FileExistsError(f"checkpoint.resume: never, but {root} holds committed checkpoints "
                                  f"({', '.join(p.name for _, p in found)}) of an earlier run; set "
                                  f"MESHBAKE_RUN_DIR to a new run dir, or remove them")
        return None
    for i, (_, p) in enumerate(reversed(found)):
        problem = check(p)
        if problem is None:
            if resume != "auto":
                log(f"checkpoint.resume {resume}: this run has its own {p.name}, continuing from it")
            return p
        older = found[-2 - i][1].name if i + 1 < len(found) else None
        log(f"checkpoint {p.name} failed verification: {printable(problem)}; renamed to {p.name}.corrupt, "
            + (f"trying {older}" if older else "no older checkpoint: starting from "
               + ("step 0" if resume == "auto" else resume)))
        discard(p)
    if resume == "auto":
        return None
    p = Path(resume)
    if not _is_regular(p / COMMITTED):
        raise FileNotFoundError(f"checkpoint.resume: {resume} is not a committed checkpoint (no {COMMITTED})")
    problem = check(p)
    if problem is not None:
        raise UserError(printable(p), f"failed verification: {printable(problem)}",
                        "point checkpoint.resume at an intact checkpoint")
    return p


def _remove(p: Path) -> None:
    """Remove what meshbake put at p (a name it computed inside the checkpoint root): a real
    directory with everything in it; a link or a file only itself (rmtree never goes through one)."""
    mode = _mode(p)
    if mode is None:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        os.unlink(p)


def set_aside(p: Path) -> None:
    """step-N -> step-N.corrupt (replacing an older one): out of resume and pruning, kept."""
    aside = p.with_name(p.name + ".corrupt")
    _remove(aside)
    os.replace(p, aside)


def verify_all_ranks(path: Path) -> str | None:
    """verify() with the hashing split over the process group; every rank gets the same
    answer (the lowest rank's problem), so all of them skip or load the same step."""
    mine = verify(path, (dist.get_rank(), dist.get_world_size()))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return next((p for p in every if p is not None), None)


def set_aside_on_rank0(p: Path) -> None:
    if dist.get_rank() == 0:
        set_aside(p)


def _fsync_dir(p: Path) -> None:
    fd = os.open(str(p), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_step_dir(root: Path, name: str) -> Path:
    """root/name as a new, empty real directory, the root a real directory too (both created by
    safeio.subdir): a stale one of a killed writer is removed first; a link planted at either
    name is refused, never written or deleted through."""
    root.parent.mkdir(parents=True, exist_ok=True)
    safeio.subdir(root.parent, root.name)
    mode = _mode(root / name)
    if mode is not None and stat.S_ISDIR(mode):
        shutil.rmtree(root / name)
    return safeio.subdir(root, name)


def _rng_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(torch.get_rng_state(), buf)
    return buf.getvalue()


def save(root: Path, step: int, model, optim, train_state: dict[str, Any], keep: int,
         fault: Callable[[str], None] = lambda where: None) -> Path:
    rank = dist.get_rank()
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if rank == 0:
        _fresh_step_dir(root, tmp.name)
    dist.barrier()
    msd, osd = get_state_dict(model, optim, options=_options(model))
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        safeio.create_new(tmp / f"rng-rank{rank}.pt", _rng_bytes())
    except BaseException as e:          # DCP raises CheckpointException (a BaseException) on every rank
        _disk_full(e, root, tmp, step)
        raise
    fault("save")                       # test hook: a rank dying mid-write
    dist.barrier()
    # each rank hashes what it wrote while it is in its page cache (see the module docstring)
    mine = {n: sha256_file(tmp / n) for n in sorted(os.listdir(tmp)) if writer_rank(n) == rank and n != COMMITTED}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank == 0:
        state = dict(train_state, world=dist.get_world_size())
        safeio.write_atomic(tmp / "train_state.json", json.dumps(state, indent=2, sort_keys=True) + "\n")
        files = {k: v for d in every for k, v in d.items()}
        files["train_state.json"] = sha256_file(tmp / "train_state.json")
        manifest = {"step": step, "files": {k: {"bytes": n, "sha256": h} for k, (n, h) in sorted(files.items())}}
        for name, text in ((MANIFEST, json.dumps(manifest, indent=1) + "\n"), (COMMITTED, f"{step}\n")):
            safeio.write_atomic(tmp / name, text, fsync=True)
        _fsync_dir(tmp)
        aside = root / f"step-{step}.old"
        if os.path.lexists(final):       # the same step saved again (a resume from an older step)
            # renamed aside, never rmtree'd in place: a crash mid-rmtree could leave a step-N
            # that still has COMMITTED but lost shards, and resume would pick it
            _remove(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        _remove(aside)
        for old in prunable(root, step, keep):   # real step-N dirs of root only (list_checkpoints)
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _disk_full(e: BaseException, root: Path, tmp: Path, step: int) -> None:
    """Disk full / quota while writing step-N.tmp: remove the partial step (frees what it took;
    never resumed from anyway) and raise a UserError saying that the last commit is intact."""
    from .errors import UserError, from_os_error

    user = from_os_error(e)
    try:
        st = os.statvfs(root)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    # torch.save's zip writer loses the errno ("RuntimeError: [enforce fail at
    # inline_container.cc] unexpected pos"): a failed save with < 64 MiB left is the disk
    full = user is not None and any(w in user.problem for w in ("space", "quota"))
    if not (full or (user is None and free is not None and free < 64 << 20)):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    found = list_checkpoints(root)
    kept = (f"the last committed checkpoint {found[-1][1].name} is intact" if found
            else "no checkpoint was committed yet")
    what = user.problem if user is not None else "no space left on device"
    left = f"{free / 1e6:.1f} MB were free; " if free is not None else ""
    raise UserError(root, f"{what} while saving step {step} ({left}{tmp.name} removed); {kept}",
                    "free space there (or lower checkpoint.keep), then run again: it resumes from the last "
                    "committed checkpoint") from None


def prunable(root: Path, step: int, keep: int) -> list[Path]:
    """What `keep` lets go after committing `step`: never `step` itself, the newest verified
    checkpoint (its digests were just computed from its bytes), even when a higher-numbered
    step exists; of the others the keep-1 newest stay. keep <= 0 keeps everything."""
    if keep <= 0:
        return []
    others = [p for s, p in list_checkpoints(root) if s != step]
    return others[:max(0, len(others) - (keep - 1))]


# what torch 2.13's DCP pickles into .metadata (found by tracing find_class over real FSDP x TP
# checkpoints with AdamW state); torch dtypes are let through by type, not by name
SAFE_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict")})


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file asked to unpickle something no checkpoint holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f".metadata names {module}.{name}, which no DCP checkpoint's metadata holds")


class UnconfinedCheckpoint(Exception):
    """.metadata points DCP outside its step dir, at something not a regular file, or past a
    file's end."""


class _RegularFilesOnly(FileSystem):
    """DCP's file system for reading: every file it opens is a regular file, opened without
    following a link and without blocking on a FIFO (the check in read_metadata ran first; this
    holds even if a name is swapped after it)."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        if mode != "rb":
            raise UnconfinedCheckpoint(f"DCP asked to open {printable(path)} with mode {mode!r} while loading")
        with safeio.open_regular(Path(path)) as f:
            yield f


class SafeReader(FileSystemReader):
    """FileSystemReader whose .metadata is unpickled with the allow-list above and whose storage
    paths are confined to the step dir before any shard is opened. A refusal is kept in
    `refused` too: DCP re-raises a failed metadata read as an AssertionError of strings."""
    refused: Exception | None = None

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.fs = _RegularFilesOnly()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            metadata = _read_metadata(path)
            problem = storage_problem(metadata, Path(self.path))
            if problem is not None:
                raise UnconfinedCheckpoint(problem)
        except (UnsafeCheckpoint, UnconfinedCheckpoint, UserError) as e:
            self.refused = e
            raise
        if getattr(metadata, "storage_meta", None) is None:       # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, *args: Any, **kwargs: Any):
        try:
            return super().read_data(*args, **kwargs)
        except (UnconfinedCheckpoint, UserError) as e:      # a name swapped for a link or FIFO after the check
            self.refused = e
            raise


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose byte entries (param_groups: numbers, bools, strings, lists) are
    read with torch.load(weights_only=True) instead of a full unpickle (a refusal is kept in
    `refused`, like SafeReader's)."""
    refused: UnsafeCheckpoint | None = None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message names the global it refused, e.g. "Unsupported global: GLOBAL posix.system"
            what = next((x.strip() for x in str(e).splitlines() if "Unsupported global" in x), "")
            self.refused = UnsafeCheckpoint(f"entry {read_item.dest_index.fqn} is not plain data"
                                            + (f" ({what[:200]})" if what else ""))
            raise self.refused from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(sd: dict[str, Any], path: Path, allow_partial_load: bool = False) -> None:
    """dcp.load through SafeReader and SafeLoadPlanner; a refused file is a UserError."""
    reader, planner = SafeReader(str(path)), SafeLoadPlanner(allow_partial_load=allow_partial_load)
    try:
        dcp.load(sd, storage_reader=reader, planner=planner)
    except BaseException:
        unsafe = reader.refused or planner.refused
        if unsafe is None:
            raise
        if isinstance(unsafe, UserError):
            raise unsafe from None
        if isinstance(unsafe, UnconfinedCheckpoint):
            raise UserError(printable(path), f"{unsafe}: refusing to read it", _FIX) from None
        raise UserError(printable(path), f"{unsafe}: refusing to unpickle it (it could run code)",
                        _FIX + " (its manifest cannot vouch for it: whoever wrote the pickle wrote the digests)") from None


def _options(model) -> StateDictOptions:
    """QLoRA (runtime/quant.py): the checkpoint holds the adapters only. The NF4 base is frozen
    and rebuilt exactly from model.weights (or the seeded init) on resume and export; DCP has
    no planner for torchao's NF4Tensor shards."""
    return StateDictOptions(ignore_frozen_params=bool(getattr(model, "_meshbake_nf4", False)))


def own_param_groups(loaded: list[dict], own: list[dict]) -> list[dict]:
    """The optimizer's param groups to set: one per group of this rank (`own`, its FQNs), with the
    hyperparameters of the checkpoint's group that holds them. DCP writes a non-tensor entry such
    as optim.param_groups.0.params once, from one rank: under pipeline parallelism each stage's
    ranks list other FQNs, so the saved lists name one stage's parameters only, and torch's
    set_state_dict leaves the other stages' groups without lr / betas (KeyError 'betas' at the
    first step after a pp resume). A group none of whose FQNs were saved takes its own
    hyperparameters (this plan's, the same on every rank) and the saved lr / initial_lr (one
    LambdaLR factor for all groups: every group's lr is the same)."""
    out = []
    for g in own:
        mine = set(g["params"])
        src = next((lg for lg in loaded if mine & set(lg["params"])), None)
        if src is None:
            src = dict(g, **{k: loaded[0][k] for k in ("lr", "initial_lr") if loaded and k in loaded[0]})
        out.append(dict(src, params=list(g["params"])))
    return out


def load(path: Path, model, optim) -> dict[str, Any]:
    opts = _options(model)
    msd, osd = get_state_dict(model, optim, options=opts)
    own = [dict(g, params=list(g["params"])) for g in osd["param_groups"]]
    sd = {"model": msd, "optim": osd}
    load_dcp(sd, path)
    sd["optim"]["param_groups"] = own_param_groups(sd["optim"]["param_groups"], own)
    if opts.ignore_frozen_params:    # the frozen base is not in sd; DCP already required every adapter key
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)
    state = json.loads(safeio.read_text_bounded(path / "train_state.json", _JSON_LIMIT))
    rng = path / f"rng-rank{dist.get_rank()}.pt"
    if state.get("world") == dist.get_world_size() and _is_regular(rng):
        with safeio.open_regular(rng, _RNG_LIMIT) as f:
            torch.set_rng_state(torch.load(f, weights_only=True))
    return state
