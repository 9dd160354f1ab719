"""Reading and writing files someone else may have planted: the one door every run-dir, step-dir,
export-dir and prepared-dir file goes through.

Why: a run dir is often shared, requeued or handed over (a colleague's run, a checkpoint from a
wiki). A file meshbake "appends to" may already be a symlink to `site-packages/x.pth` (every later
Python start then runs what we wrote into it), a FIFO (open() blocks forever) or a device. So:
- a write never follows a symlink at the final component and never opens a non-regular file:
  appends open with O_NOFOLLOW and fstat the result; whole-file writes go to a fresh temp file
  (O_CREAT|O_EXCL|O_NOFOLLOW) in the same directory and are os.replace()d over the name;
- a directory meshbake creates or enters below a root the user named is a real directory, never
  a symlink (`subdir`);
- reads of metadata files are bounded (`read_bounded`) and open with O_NONBLOCK (a FIFO neither
  blocks nor is read);
- any string that came from disk or a recipe goes through `printable` before it reaches a log line,
  the console, markdown or HTML: control characters and Unicode format characters (category Cf:
  U+202E right-to-left override, U+200B zero width space) are shown as escapes, so a newline cannot
  start a new line in a .pth file or a log, and an escape sequence cannot rewrite a terminal.

Refusals are UserErrors (exit 3, one line). Stdlib only: the runtime ships without meshbake.
"""
from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

from .errors import UserError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_FIX = "remove it (meshbake writes only regular files it creates itself), or use a run dir only you write to"


def printable(s: object) -> str:
    """s with every control character (Unicode Cc, incl. newline, tab, ESC, DEL, C1), format
    character (Cf) and line/paragraph separator shown as an escape: '\\n', '\\x1b', '\\u202e'.
    Idempotent on its output only in the sense that the result holds none of those characters."""
    text = str(s)
    if text.isprintable():               # fast path: str.isprintable is False for Cc, Cf, Zl, Zp (and Zs but ' ')
        return text
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x10000
                       else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def refuse_odd(path: Path) -> None:
    """UserError if something other than a regular file (a symlink, FIFO, dir, device) is at path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UserError(printable(path), f"is {_kind(st.st_mode)}, not a file meshbake wrote", _FIX)


def subdir(root: Path, *parts: str, create: bool = True) -> Path:
    """root/parts..., every component below root a real directory (created when missing and
    `create`), never a symlink: a planted `checkpoints -> /elsewhere` is refused, not written through.
    root itself is the user's choice (it may be a symlink to scratch space)."""
    p = Path(root)
    for part in parts:             # every name checked before any is used
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise UserError(printable(p / part), "is not a plain name inside its directory", _FIX)
    for part in parts:
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if not create:         # the whole path, not the first missing part of it
                return Path(root).joinpath(*parts)
            try:
                os.mkdir(p)
            except FileExistsError:
                pass
            st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(printable(p), f"is {_kind(st.st_mode)}, where meshbake keeps a directory", _FIX)
    return p


def _not_dir(path: Path) -> UserError:
    """ENOTDIR: something on the way to path that should be a directory is a file, FIFO or link to one."""
    return UserError(printable(path.parent), "is not a directory (a file, FIFO or link to one is in its place)", _FIX)


def _open_regular_fd(path: Path, flags: int, what: str, follow: bool = False) -> int:
    """os.open(path, flags) of a regular file only: O_NOFOLLOW (a symlink at the last component fails
    with ELOOP; follow=True lets a link to a regular file through), O_NONBLOCK (a FIFO neither blocks
    the open nor is opened for writing: ENXIO), then fstat to be sure; the descriptor goes back to
    blocking mode for the caller."""
    try:
        fd = os.open(path, flags | (0 if follow else _NOFOLLOW) | _CLOEXEC | _NONBLOCK, 0o644)
    except NotADirectoryError:
        raise _not_dir(path) from None
    except OSError as e:             # ELOOP, ENXIO, EEXIST (O_EXCL), EISDIR: say what is there, if odd
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError:
            raise e from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(printable(path), f"is {_kind(st.st_mode)}, {what}", _FIX) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(printable(path), f"is {_kind(st.st_mode)}, {what}", _FIX)
    if _NONBLOCK:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    return fd


def _open_write(path: Path, flags: int) -> int:
    return _open_regular_fd(path, flags | os.O_WRONLY, "not a file meshbake wrote")


def append_text(path: Path, text: str) -> None:
    """Append text to a regular file (created 0644 if missing); a symlink/FIFO/dir there is refused."""
    fd = _open_write(Path(path), os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


def write_atomic(path: Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Replace path's contents as a whole: a fresh temp file beside it (O_EXCL, no symlink followed),
    then os.replace. Something other than a regular file already at path is refused (not replaced:
    a planted symlink is a sign the directory is not ours alone)."""
    path = Path(path)
    refuse_odd(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = _open_write(tmp, os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def create_new(path: Path, data: bytes | str) -> None:
    """Write a file that must not exist yet (O_CREAT|O_EXCL|O_NOFOLLOW)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with os.fdopen(_open_write(Path(path), os.O_CREAT | os.O_EXCL), "wb") as f:
        f.write(raw)


def open_regular(path: Path, limit: int | None = None, follow: bool = False):
    """A binary file object for reading a regular file: no symlink followed at the last component
    (follow=True: a link to a regular file is read, as every file of a Hugging Face cache snapshot
    is one), a FIFO neither blocks nor is read, and (with limit) a file larger than limit bytes is
    refused."""
    path = Path(path)
    fd = _open_regular_fd(path, os.O_RDONLY, "not a regular file", follow)
    st = os.fstat(fd)
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise UserError(printable(path), f"is {st.st_size:,} bytes, more than the {limit:,} such a file can hold",
                        "it was not written by meshbake; remove it or use a run dir only you write to")
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, limit: int = 16 << 20, follow: bool = False) -> bytes:
    """The whole of a small regular file (metadata: plan.json, manifest.json, index.json, pointers),
    at most limit bytes (read limit + 1 to catch a file that grows)."""
    with open_regular(path, limit, follow) as f:
        # read(n) allocates n bytes up front: read the file's size (+1 to see growth), not the limit
        # (a 5 KB plan.json cost a 16 MiB buffer); a file that grew since its fstat is read on to the limit
        size = min(os.fstat(f.fileno()).st_size, limit)
        data = f.read(size + 1)
        if len(data) > size:
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise UserError(printable(path), f"is more than {limit:,} bytes", "it was not written by meshbake; remove it")
    return data


def read_text_bounded(path: Path, limit: int = 16 << 20) -> str:
    try:
        return read_bounded(path, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(printable(path), f"is not UTF-8 text ({e.reason} at byte {e.start})",
                        "it was not written by meshbake; remove it") from None


def plain_name(name: str) -> bool:
    """A name that stays inside its directory: no separator, not '.'/'..', no NUL, no control chars."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and printable(name) == name
