"""`make golden`: rewrite tests/golden/<recipe>/ from recipes/*.yaml. Review the diff in the PR.

runtime/ and MANIFEST.sha256 are left out of the golden copies: they change with every runtime
edit and are covered by the determinism and manifest tests instead.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def golden_files(name: str) -> dict[str, bytes]:
    from compiler.errors import Err
    from compiler.pipeline import compile_recipe

    path = ROOT / "recipes" / f"{name}.yaml"
    b = compile_recipe(path.read_text(), source=str(path.relative_to(ROOT)))
    if isinstance(b, Err):
        raise SystemExit(f"{name}: " + "; ".join(map(str, b.errors)))
    return {k: v for k, v in b.files.items() if not k.startswith("runtime/") and k != "MANIFEST.sha256"}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def main() -> int:
    shutil.rmtree(GOLDEN, ignore_errors=True)
    for name in recipe_names():
        for rel, data in golden_files(name).items():
            p = GOLDEN / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        print(f"tests/golden/{name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
