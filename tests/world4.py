"""ONE world-4 torchrun (tests/dist/worker.py, gloo) for four test files that each had their own:
the model matrix (test_models.py), expert parallelism on the general mesh (test_ep_mesh.py),
random init on the mesh (test_init_parity.py's world-4 side) and the mesh parity matrix
(test_parity.py's world-4 side). Each file still owns its cases and its single-process references;
tests/conftest.py's session fixture `world4` runs this once for whichever of the files are
collected (running one of them alone runs the whole launch).

Why one: a torchrun start costs every rank the torch + transformers imports and each model
family's modeling module (~3-5 CPU s a rank, 4 ranks on 2 cores), and the launches imported
the same families; their cases are all dp_replicate x dp_shard x cp x tp x ep over 4 ranks, so
one process group runs them in a row (114 cases, 15 mesh layouts: tests/dist/worker.py reuses
one mesh per layout, see one_mesh_per_layout). Measured, the four files in one pytest on a quiet
2-core machine: 279 s wall / 507 CPU s with four launches, 171 s / 290 CPU s with this one; the
same 218 tests, the same losses, gradient norms, logits and initial states bit for bit.

When something fails: a wrong result fails the one test that asserts it, named by its case; a
case that raises or hangs (the per-case watchdog, tests/dist/watchdog.py) ends the launch, and
every test of the four files that reads it errors with the rank's traceback or the watchdog's
line naming the case (with four launches only that case's file did).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers import torchrun as launch

PARTS = ("tests.test_models", "tests.test_ep_mesh", "tests.test_init_parity", "tests.test_parity")


def run(tmp: Path, weights: dict[str, str]) -> dict:
    """{"cases": {case name: case}, "out": {case name: the worker's result}, "refs": {case name:
    the part's reference}}. The references (single process, in this process) are computed while
    the ranks run: a launch leaves cores idle while its ranks wait for each other."""
    import importlib

    parts = [importlib.import_module(p) for p in PARTS]
    cases = [c for part in parts for c in part.launch_cases(weights)]
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
    (tmp / "cases.json").write_text(json.dumps(cases))
    with ThreadPoolExecutor(1) as pool:
        # one launch carries what four did (each had 900 s): 1,800 s bounds it on a loaded machine,
        # and a case that hangs still ends it within tests/dist/watchdog.py's 300 s, naming the case
        launched = pool.submit(launch, 4, ROOT / "tests/dist/worker.py", str(tmp / "cases.json"),
                               str(tmp / "out.json"), cwd=tmp, timeout=1800)
        refs = {}
        for part in parts:
            refs.update(part.references([c for c in cases if c["part"] == part.__name__]))
        launched.result()
    return {"cases": dict(zip(names, cases)), "out": json.loads((tmp / "out.json").read_text()), "refs": refs,
            "dir": tmp}
