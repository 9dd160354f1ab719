"""One memo rule for the compiler's per-model caches.

`meshbake suggest` runs thousands of candidates through the same stages for one model; the
few walks over every module that depend only on (model, placements, a few recipe values) are
cached here. Keys hold `id()`s of the objects they were computed from, so each entry also
keeps those objects (`owners`): an id is never reused while its entry lives, and a hit is
taken only when the owners are the very same objects. A full cache is simply cleared.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


def cached(cache: dict[Hashable, Any], key: Hashable, owners: tuple[object, ...], compute: Callable[[], T],
           size: int = 256) -> T:
    hit = cache.get(key)
    if hit is None or len(hit[0]) != len(owners) or any(a is not b for a, b in zip(hit[0], owners)):
        if len(cache) >= size:
            cache.clear()
        hit = cache[key] = (owners, compute())
    return hit[1]
