"""`make golden`: rewrite tests/golden/<recipe>/ from recipes/*.yaml, and tests/golden/cluster_<profile>/
from the example cluster profiles (PROFILE_GOLDENS). Review the diff in the PR.

runtime/ and MANIFEST.sha256 are left out of the golden copies: they change with every runtime
edit and are covered by the determinism and manifest tests instead.
"""
from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


# each example cluster profile rendered with a recipe it suits: tests/golden/cluster_<profile>/
PROFILE_GOLDENS = {
    "nvidia-pyxis-h100": ("70b_hsdp_tp", ()),
    "aws-p5-efa": ("70b_fsdp_tp", ()),
    "gres-a100-modules": ("70b_lora_fsdp_tp", ("cluster.nodes=2", "cluster.gpus_per_node=4")),
}


@functools.cache
def golden_files(name: str) -> Mapping[str, bytes]:
    """The bundle of golden `name` as compiled now (once per process: test_golden and
    test_shell read the same compile, read-only)."""
    from meshbake.compiler.errors import Err
    from meshbake.compiler.pipeline import compile_recipe

    profile = name.removeprefix("cluster_") if name.startswith("cluster_") else None
    recipe, overrides = PROFILE_GOLDENS[profile] if profile else (name, ())
    path = ROOT / "recipes" / f"{recipe}.yaml"
    b = compile_recipe(path.read_text(), overrides=overrides, cluster=profile, source=str(path.relative_to(ROOT)))
    if isinstance(b, Err):
        raise SystemExit(f"{name}: " + "; ".join(map(str, b.errors)))
    return MappingProxyType({k: v for k, v in b.files.items() if not k.startswith("runtime/") and k != "MANIFEST.sha256"})


def recipe_names() -> list[str]:
    """The recipes, then one golden per example cluster profile (cluster_<profile>)."""
    return sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")) + [f"cluster_{p}" for p in PROFILE_GOLDENS]


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
