"""bundle stage: write {path: bytes} to a directory atomically.

Everything goes to a temp dir next to the target, then one rename puts it in place, so an
interrupted or failed compile never leaves a half-written bundle (the old one stays).

Only a previous bundle is ever replaced: `-o .` or `-o ~/project` must not delete a user's
directory. A directory is a previous bundle when every file in it is listed in its
MANIFEST.sha256 (plus the `__pycache__/` Python writes when the bundle's runtime runs).

Nothing is written through a symlink planted in a previous bundle (`out/launch.sh ->
~/.bashrc`): files are written only into a fresh mkdtemp directory (mode 0700, no entry in it
but ours), which one rename puts in place; the old directory is renamed aside and removed with
rmtree, which unlinks symlinks and never follows them. The scan of the old directory does not
follow symlinks either: a symlink is an entry of its own that the manifest must list.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.runtime.errors import UserError
from meshbake.runtime.safeio import read_text_bounded

EXECUTABLE = {"launch.sh", "job.sbatch"}
MANIFEST = "MANIFEST.sha256"


def _present(out: Path) -> list[str]:
    """Every entry of `out` that is not a real directory, as a relative path, without following a
    symlink: a symlink (to a file or a directory) is one entry of its own, never walked through.
    Python's own `__pycache__/` directories are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out, followlinks=False):
        # os.walk lists a symlink to a directory under dirnames and does not enter it: an entry
        dirnames[:] = [d for d in dirnames if d != "__pycache__" or os.path.islink(os.path.join(dirpath, d))]
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        rel = Path(dirpath).relative_to(out)
        found += [(rel / n).as_posix() for n in (*filenames, *links)]
    return sorted(found)


def _listed(manifest: Path) -> set[str] | None:
    """The paths MANIFEST.sha256 lists, or None when it is not a small regular file (a symlink or
    a FIFO planted under that name is not a manifest: read through, it could block or lie)."""
    try:
        text = read_text_bounded(manifest, 1 << 20)
    except (OSError, UserError):
        return None
    return {line.split("  ", 1)[1] for line in text.splitlines() if "  " in line}


def _foreign_files(out: Path) -> list[str]:
    """Files in `out` that no bundle wrote (empty list: safe to replace)."""
    present = _present(out)
    if not present:
        return []
    listed = _listed(out / MANIFEST)
    if listed is None:
        return present
    return [p for p in present if p not in listed and p != MANIFEST]


def check_target(out: str | os.PathLike) -> RecipeError | None:
    """Why `out` cannot receive a bundle, or None."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return RecipeError("-o", f"{out} exists and is not a directory", "choose a new directory, e.g. -o out/")
    if out.is_dir():
        foreign = _foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            return RecipeError("-o", f"{out} holds files meshbake did not write ({shown}); replacing the "
                               "directory would delete them", "choose another -o, or move those files away")
    return None


def write_bundle(files: Mapping[str, bytes], out: str | os.PathLike) -> Result[Path]:
    out = Path(out)
    refused = check_target(out)
    if refused is not None:
        return Err((refused,))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        return Err((RecipeError("-o", f"cannot create {out} ({e.strerror})", "choose a writable directory"),))
    try:
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(0o755 if rel in EXECUTABLE else 0o644)
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):       # disk full, permissions: the old bundle is untouched
            return Err((RecipeError("-o", f"cannot write {out} ({e.strerror or e})", "check the disk and "
                                    "permissions; the previous bundle, if any, is unchanged"),))
        raise
    return out
