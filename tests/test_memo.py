"""compiler/memo.evolve and estimate.pl_key: the shortcuts suggest takes per candidate give what
the slow paths give (pure, no model build)."""
from __future__ import annotations

import dataclasses

from meshbake.compiler.estimate import RankParam, pl_key
from meshbake.compiler.memo import evolve
from meshbake.compiler.placements import Placements


@dataclasses.dataclass(frozen=True)
class _Derived:
    a: int
    b: int = 0

    def __post_init__(self) -> None:          # evolve must not skip this: it falls back to replace
        object.__setattr__(self, "b", self.a * 2)


def test_evolve_equals_replace():
    p = RankParam(8, 4, "block", True, routed=2)
    e, r = evolve(p, where="last"), dataclasses.replace(p, where="last")
    assert e == r and e is not p and p.where == "block" and e.routed == 2 and hash(e) == hash(r)
    assert evolve(_Derived(3), a=5) == _Derived(5) == _Derived(5, b=10)    # __post_init__ ran


def test_pl_key_by_content():
    a = Placements({"x.q": "colwise", "x.o": "rowwise"}, ("warn a",))
    b = Placements({"x.q": "colwise", "x.o": "rowwise"}, ())           # warnings are not read by estimate
    c = Placements({"x.q": "colwise", "x.o": "replicate"}, ())
    d = Placements({"x.q": "colwise", "x.o": "rowwise"}, (), ("x.q",))  # LoRA targets are
    assert pl_key(a) == pl_key(b) == pl_key(a)
    assert len({pl_key(a), pl_key(c), pl_key(d)}) == 3
