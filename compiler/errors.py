"""Errors are values: every recipe problem is a RecipeError with a JSON path and a fix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RecipeError:
    path: str          # JSON path into the recipe, dotted: "mesh.tp", "tp.plan['model.x']"
    message: str       # what is wrong, with the numbers
    hint: str = ""     # how to fix it

    def __str__(self) -> str:
        s = f"{self.path}: {self.message}"
        return f"{s}; {self.hint}" if self.hint else s


@dataclass(frozen=True)
class Err:
    errors: tuple[RecipeError, ...]


# A stage returns its value or Err(all errors it found): `x = stage(...); if isinstance(x, Err): ...`
Result = T | Err


# A field with an error is set aside (validate.validate_fields): its value in the Recipe is a
# stand-in (the schema default), so the later stages can still run and report the errors of
# the other fields. Every check names the recipe fields it reads; a check that reads a
# set-aside field is skipped, so a stand-in never causes a follow-on error.
def reads(*fields: str):
    """Declare the fields a check reads: dotted recipe fields ('train.seq_len') or a whole
    section ('data'). The check's first argument is the recipe (the dict in validate, the
    Recipe after it); tests/test_carry_on.py checks the declarations against the reads."""
    def mark(check):
        check.reads = fields
        return check
    return mark


def _overlap(a: str, b: str) -> bool:
    """'train' and 'train.seq_len' overlap (one holds the other); 'train.seq' and 'train.seq_len' do not."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def skipped(check, aside: frozenset[str]) -> bool:
    """True when check reads a set-aside field."""
    return any(_overlap(f, a) for f in check.reads for a in aside)


def run(check, aside: frozenset[str], *args) -> list[RecipeError]:
    """check(*args) -> its errors, or none when it reads a set-aside field."""
    return [] if skipped(check, aside) else list(check(*args))
