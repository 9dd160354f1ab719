"""One memo rule for the compiler's per-model caches.

`meshbake suggest` runs thousands of candidates through the same stages for one model; the
few walks over every module that depend only on (model, placements, a few recipe values) are
cached here. Keys hold `id()`s of the objects they were computed from, so each entry also
keeps those objects (`owners`): an id is never reused while its entry lives, and a hit is
taken only when the owners are the very same objects. A full cache is simply cleared.

A key must hold everything the cached value depends on; one that leaves a field out returns an
earlier candidate's answer (suggest's QLoRA placements once did). `off()` turns every cache of
its callers into a miss, so a test can show that suggest with and without them agrees
(tests/test_suggest.py test_caches_change_no_answer).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable, Iterator
from operator import is_
from typing import Any, TypeVar

T = TypeVar("T")


_ON = [True]


def on() -> bool:
    """False inside off(): callers with caches of their own (suggest's per-key dicts) skip them too."""
    return _ON[0]


@contextlib.contextmanager
def off() -> Iterator[None]:
    _ON[0] = False
    try:
        yield
    finally:
        _ON[0] = True


def cached(cache: dict[Hashable, Any], key: Hashable, owners: tuple[object, ...], compute: Callable[[], T],
           size: int = 256) -> T:
    if not _ON[0]:
        return compute()
    hit = cache.get(key)
    # the identity test in C (map over operator.is_), not a generator: suggest makes ~230,000
    # calls for 70B on 64 GPUs, and the generator's frames were ~10% of their time
    if hit is None or len(hit[0]) != len(owners) or not all(map(is_, hit[0], owners)):
        if len(cache) >= size:
            cache.clear()
        hit = cache[key] = (owners, compute())
    return hit[1]


_PLAIN: dict[type, bool] = {}


def evolve(obj: T, **changes: Any) -> T:
    """dataclasses.replace for the frozen dataclasses `suggest` copies per candidate (Recipe and its
    sections, RankParam, Estimate): the same object, built by copying the instance dict instead of
    re-running __init__ field by field (replace() is ~10 us for the 16-section Recipe; 70B on 64
    GPUs made ~240,000 of them, the largest single cost of a suggest run). Only for classes where
    the two agree: every field init=True, no __post_init__, an instance __dict__; any other class
    goes through dataclasses.replace."""
    cls = type(obj)
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = _PLAIN[cls] = (dataclasses.is_dataclass(cls) and not hasattr(cls, "__post_init__")
                               and not hasattr(cls, "__slots__")
                               and all(f.init for f in dataclasses.fields(cls))
                               and len(dataclasses.fields(cls)) == len(cls.__dataclass_fields__))   # no InitVar
    if not plain:
        return dataclasses.replace(obj, **changes)
    names = cls.__dataclass_fields__
    bad = [k for k in changes if k not in names]
    if bad:                                  # the TypeError replace() raises
        return dataclasses.replace(obj, **changes)
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new
