"""Bytes for people: one rule for PLAN.md, the CLI summary and the compiler's messages.

Decimal units (1 GB = 1e9 B), as GPU memory (cluster.gpu_memory_gb) is sold. The unit steps
down below a tenth of the next one, so a tiny CPU plan reads "14.40 MB", never "0.00 GB".
Stdlib only: the runtime may use it too.
"""
from __future__ import annotations

_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"))


def fmt_bytes(n: float, digits: int = 1) -> str:
    """2.96e9 -> '3.0 GB'; 1.44e7 -> '14.4 MB'; 512 -> '512 B'."""
    for div, unit in _UNITS:
        if abs(n) >= div / 10:
            return f"{n / div:,.{digits}f} {unit}"
    return f"{int(n)} B"
