"""Random init is a function of the recipe and seed only, never of the mesh (issue 26): every
family of the model matrix (tests/models, tied ones included), built with random init (no
model.weights) at world 1 and at dp_shard 2 x tp 2 + SP + LP, has the same full initial state,
bit for bit: every parameter under each of its names (a tied lm_head.weight too) and every
buffer. The dp_shard 2 x tp 2 builds are cases of the world-4 torchrun launch this file shares
with test_models.py and test_ep_mesh.py (tests/world4.py); the world-1 builds run in this
process, through the same runtime build() in a 1-rank gloo process group, while the launch runs
(they were a world-1 torchrun of their own: a rank's start-up for builds that take ~0.1 s each).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ROOT, plan_of
from tests.test_models import REFUSED, TYPES, recipe

pytestmark = pytest.mark.dist
FAMILIES = [t for t in TYPES if t not in REFUSED]
MESHES = {1: dict(dp_shard=1, tp=1, sp=False, lp=False), 4: dict(dp_shard=2, tp=2, sp=True, lp=True)}


def _plan(t: str, world: int) -> dict:
    return plan_of(recipe(f"init-{t}-w{world}", t, **MESHES[world]))


def launch_cases(weights: dict[str, str]) -> list[dict]:
    """This file's cases of the shared world-4 launch: each family built at dp_shard 2 x tp 2."""
    return [{"name": f"init-{t}", "kind": "init", "plan": _plan(t, 4), "part": __name__} for t in FAMILIES]


def references(cases: list[dict]) -> dict[str, dict]:
    """init-<family> -> the world-1 build's {"state", "tied"} (tests/dist/worker.py init_state)."""
    from meshbake.runtime import plan as P

    from tests.dist.worker import init_state
    from tests.helpers import one_process_group

    with one_process_group():
        return {c["name"]: init_state(P.from_dict(_plan(c["name"].removeprefix("init-"), 1))) for c in cases}


@pytest.fixture(scope="module")
def states(world4) -> dict[int, dict]:
    four = {}
    for t in FAMILIES:
        r = world4["out"][f"init-{t}"]
        four[t] = {"state": torch.load(r["state"]), "tied": r["tied"]}
    return {1: {t: world4["refs"][f"init-{t}"] for t in FAMILIES}, 4: four}


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
