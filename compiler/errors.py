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
