"""Golden bundles: tests/golden/<recipe>/ must equal a fresh compile. Refresh with `make golden`."""
import pytest

from tests.golden_refresh import GOLDEN, golden_files, recipe_names


@pytest.mark.parametrize("name", recipe_names())
def test_bundle_matches_golden(name):
    fresh = golden_files(name)
    stored = {p.relative_to(GOLDEN / name).as_posix(): p.read_bytes()
              for p in sorted((GOLDEN / name).rglob("*")) if p.is_file()}
    assert stored, f"tests/golden/{name}/ is missing: run `make golden` and review the diff"
    assert sorted(fresh) == sorted(stored), "file list changed: run `make golden` and review the diff"
    for rel in fresh:
        assert fresh[rel] == stored[rel], f"{name}/{rel} differs from golden: run `make golden`, review the diff"
