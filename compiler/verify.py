"""`meshbake verify BUNDLE_DIR`: is this bundle exactly what its own recipe.yaml compiles to?

Why: a bundle in a PR is reviewed as PLAN.md and recipe.yaml, but what runs is launch.sh,
job.sbatch, plan.json and runtime/. Anyone can edit those by hand (or plant a file next to them)
and the PLAN.md a reviewer reads stays the same. verify recompiles the bundle from the
normalized recipe inside it and compares every file byte for byte, both ways, so a reviewer's
CI can run `meshbake verify out/` in the PR's checkout and trust PLAN.md again.

Reading the bundle never follows a symlink and never opens anything but a regular file (a FIFO
would block, a symlink could point anywhere): such an entry is recorded as `Odd` and is always a
difference, since a bundle meshbake writes holds only regular files.

`read_bundle` touches the disk; `differences` is a pure function of the two {path: content} maps.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from meshbake.runtime.safeio import printable

# the largest bundle file is a runtime module of tens of KB; anything near this is not meshbake's
MAX_FILE_BYTES = 16 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Odd:
    """A bundle entry that is not a regular file meshbake could have written; never read."""
    kind: str


@dataclass(frozen=True)
class Difference:
    path: str
    what: str                       # "differs", "only in the bundle", "missing from the bundle", "is ..."
    line: int | None = None         # text files: the first differing line (1-based)
    bundle: str | None = None       # that line in the bundle (None: the file ends before it)
    expected: str | None = None     # that line as recompiled

    def lines(self) -> list[str]:
        """Human lines; every string from disk through printable (an escape sequence in a
        planted file name or line must not reach the terminal raw)."""
        out = [f"{printable(self.path)}: {self.what}"]
        if self.line is not None:
            def show(s: str | None) -> str:
                return "(end of file)" if s is None else repr(printable(s[:200]) + ("..." if len(s) > 200 else ""))
            out.append(f"  line {self.line}: bundle {show(self.bundle)}")
            out.append(f"  line {self.line}: recompiled {show(self.expected)}")
        return out


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def _read(path: str) -> bytes | Odd:
    """A regular file's bytes: opened without following a symlink and without blocking on a FIFO
    swapped in after the scan, checked regular on the open descriptor itself."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as e:
        st = os.lstat(path)             # gone or unreadable: OSError, the caller's "cannot read"
        if stat.S_ISLNK(st.st_mode):
            return Odd(f"a symbolic link to {os.readlink(path)!r}")
        if not stat.S_ISREG(st.st_mode):
            return Odd(_kind(st.st_mode))
        raise e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Odd(_kind(st.st_mode))
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        return Odd(f"more than {MAX_FILE_BYTES:,} bytes (not read)")
    return data


def read_bundle(root: str | os.PathLike) -> dict[str, bytes | Odd]:
    """{relative posix path: bytes, or Odd for a symlink / FIFO / device / huge file} of every
    entry below root. Directories are descended only when they are real ones; a symlinked
    directory is one Odd entry. Raises OSError when root or an entry cannot be read."""
    out: dict[str, bytes | Odd] = {}

    def walk(dir_: str, prefix: str) -> None:
        with os.scandir(dir_) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{prefix}{e.name}"
            if e.is_symlink():
                out[rel] = Odd(f"a symbolic link to {os.readlink(e.path)!r}")
            elif e.is_dir(follow_symlinks=False):
                walk(e.path, rel + "/")
            else:
                out[rel] = _read(e.path)

    walk(os.fspath(root), "")
    return out


def _first_line_diff(a: bytes, b: bytes) -> tuple[int, str | None, str | None] | None:
    """(1-based line, bundle line, recompiled line) of the first difference when both are UTF-8
    text; None for binary files."""
    try:
        la, lb = a.decode("utf-8").split("\n"), b.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x != y:
            return i + 1, x, y
    return None                         # same lines: the difference is not a line's text


def differences(files: Mapping[str, bytes | Odd], expected: Mapping[str, bytes]) -> list[Difference]:
    """Every path whose bundle content is not exactly the recompiled one, sorted: changed files
    (with the first differing line of a text file), files only in the bundle (a planted
    file, a __pycache__/ — a .pyc can run code), files missing from it, non-regular entries."""
    out = []
    for path in sorted(set(files) | set(expected)):
        have, want = files.get(path), expected.get(path)
        if have is None:
            out.append(Difference(path, "missing from the bundle"))
        elif isinstance(have, Odd):
            out.append(Difference(path, f"is {have.kind}" + ("" if want is not None else "; only in the bundle")))
        elif want is None:
            out.append(Difference(path, "only in the bundle (meshbake does not write it)"))
        elif have != want:
            ld = _first_line_diff(have, want)
            if ld is None:
                out.append(Difference(path, f"differs ({len(have):,} bytes, recompiled {len(want):,})"))
            else:
                out.append(Difference(path, "differs", *ld))
    return out


def version_mismatch(recorded: Mapping[str, object], installed: Mapping[str, str]) -> list[str]:
    """'torch 2.5.1 (installed 2.6.0)' for every version plan.json records that differs from the
    one installed here: the recompiled plan.json (and PLAN.md's header) then differ whatever else
    is equal, and transformers' module names and the runtime sources may too."""
    return [f"{k} {printable(recorded.get(k))} (installed {v})" for k, v in sorted(installed.items())
            if recorded.get(k) != v]


def is_bundle(files: Mapping[str, bytes | Odd]) -> bool:
    """What every bundle holds as regular files: its normalized recipe and its plan."""
    return all(isinstance(files.get(k), bytes) for k in ("recipe.yaml", "plan.json"))


__all__ = ["Difference", "MAX_FILE_BYTES", "Odd", "differences", "is_bundle", "read_bundle", "version_mismatch"]
