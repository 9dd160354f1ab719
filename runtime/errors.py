"""Failures the user fixes (data, paths, permissions, disk): one line, no traceback.

A UserError names the file, what is wrong with it and the fix. runtime/train.py catches it at
the top of main: the first rank to see it (claimed through the rendezvous store, no
collective) prints the one line; every rank exits with EXIT_USER, which launch.sh reports
without torchrun's failure summary. Stdlib only: runtime/data.py and runtime/export.py use it too.
"""
from __future__ import annotations

import errno
import os

EXIT_USER = 3          # 0 done, 1 a bug (traceback), 2 a bad plan/preflight, 3 the user's data/paths/disk


class UserError(Exception):
    def __init__(self, path: object, problem: str, fix: str):
        super().__init__(f"{path}: {problem}; {fix}")
        self.path, self.problem, self.fix = str(path), problem, fix

    def line(self) -> str:
        return f"meshbake: {self}"


_FIX = {
    errno.ENOSPC: "free space there (or lower checkpoint.keep), then run again: it resumes from the last committed checkpoint",
    errno.EDQUOT: "raise the quota or free space (or lower checkpoint.keep), then run again: it resumes from the "
                  "last committed checkpoint",
    errno.EROFS: "set MESHBAKE_RUN_DIR to a directory on a writable filesystem",
    errno.EACCES: "make it writable/readable for this user, or set MESHBAKE_RUN_DIR (data.path) to one that is",
    errno.EPERM: "make it writable/readable for this user, or set MESHBAKE_RUN_DIR (data.path) to one that is",
}


def from_os_error(e: BaseException) -> UserError | None:
    """An OSError that is about the user's disk or permissions (anywhere in e's cause chain,
    or in a DCP CheckpointException's per-rank failures) -> a UserError; anything else -> None."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _FIX:
            where = x.filename if x.filename is not None else "run dir"
            return UserError(where, os.strerror(x.errno).lower(), _FIX[x.errno])
    return None


def _chain(e: BaseException | None, depth: int = 0):
    """e, its causes, and the per-rank exceptions of a DCP CheckpointException (a
    BaseException whose .failures maps rank -> (exception, stack summary))."""
    if e is None or depth > 8:
        return
    yield e
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            yield from _chain(f[0] if isinstance(f, tuple) and f else f if isinstance(f, BaseException) else None,
                              depth + 1)
    yield from _chain(e.__cause__ or e.__context__, depth + 1)
