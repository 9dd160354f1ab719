"""bundle stage: write {path: bytes} to a directory atomically.

Everything goes to a temp dir next to the target, then one rename puts it in place, so an
interrupted or failed compile never leaves a half-written bundle (the old one stays).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

EXECUTABLE = {"launch.sh", "job.sbatch"}


def write_bundle(files: Mapping[str, bytes], out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
