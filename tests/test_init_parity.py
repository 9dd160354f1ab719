"""Random init is a function of the recipe and seed only, never of the mesh (issue 26): every
family of the model matrix (tests/models, tied ones included), built with random init (no
model.weights) at world 1 and at dp_shard 2 x tp 2 + SP + LP, has the same full initial state,
bit for bit: every parameter under each of its names (a tied lm_head.weight too) and every
buffer. Two torchrun launches (world 1, world 4) at the same time, all families in each.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, plan_of
from tests.helpers import torchrun as launch
from tests.test_models import REFUSED, TYPES, recipe

pytestmark = pytest.mark.dist
FAMILIES = [t for t in TYPES if t not in REFUSED]
MESHES = {1: dict(dp_shard=1, tp=1, sp=False, lp=False), 4: dict(dp_shard=2, tp=2, sp=True, lp=True)}


def _states(world: int, tmp: Path) -> dict:
    cases = [{"name": t, "plan": plan_of(recipe(f"init-{t}-w{world}", t, **MESHES[world]))} for t in FAMILIES]
    (tmp / "cases.json").write_text(json.dumps(cases))
    launch(world, ROOT / "tests/dist/init_worker.py", str(tmp / "cases.json"), str(tmp / "out.pt"), cwd=tmp)
    return torch.load(tmp / "out.pt")


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> dict[int, dict]:
    with ThreadPoolExecutor(2) as pool:
        futs = {w: pool.submit(_states, w, tmp_path_factory.mktemp(f"init{w}")) for w in MESHES}
        return {w: f.result() for w, f in futs.items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_random_init_is_the_same_on_every_mesh(states, model_type):
    one, four = states[1][model_type], states[4][model_type]
    assert sorted(one["state"]) == sorted(four["state"])
    diff = max_abs_diff(one["state"], four["state"])
    print(f"{model_type}: {len(one['state'])} tensors, max abs diff {max(diff.values(), default=0.0):.3g}")
    assert not diff, f"{model_type}: tensors differ between world 1 and dp_shard 2 x tp 2: {diff}"


@pytest.mark.parametrize("model_type", [t for t in FAMILIES
                                        if json.loads((ROOT / f"tests/models/{t}/config.json").read_text())
                                        .get("tie_word_embeddings")])
def test_tied_embeddings_are_one_parameter_on_every_mesh(states, model_type):
    """A tied lm_head is the embedding's parameter on both meshes (one weight, one gradient)."""
    assert states[1][model_type]["tied"] is True and states[4][model_type]["tied"] is True, \
        {w: states[w][model_type]["tied"] for w in MESHES}
