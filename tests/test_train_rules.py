"""Pure rules of the training loop (no process group): when to checkpoint, the LR schedule."""
import dataclasses
import json

import pytest

from runtime import plan as P
from runtime.train import checkpoint_due, lr_factor
from tests.helpers import ROOT, compile_


@pytest.fixture(scope="module")
def plan() -> P.Plan:
    b = compile_((ROOT / "recipes/tiny_cpu.yaml").read_text())
    return P.from_dict(json.loads(b.files["plan.json"]))


def with_ckpt(plan: P.Plan, **kw) -> P.Plan:
    return dataclasses.replace(plan, checkpoint=dataclasses.replace(plan.checkpoint, **kw))


def saved_steps(plan: P.Plan, stop_at: int | None = None) -> list[int]:
    last = stop_at or plan.train.steps
    return [n for n in range(1, last + 1) if checkpoint_due(plan, n, n == stop_at)]


def test_defaults_save_the_finished_model(plan):
    """every_steps 0 + save_on_exit true (the schema defaults): one checkpoint, at the end."""
    p = with_ckpt(plan, every_steps=0, save_on_exit=True)
    assert saved_steps(p) == [p.train.steps]
    assert saved_steps(p, stop_at=7) == [7]                     # preempted at step 7


def test_periodic_plus_last_and_stop(plan):
    steps = plan.train.steps
    p = with_ckpt(plan, every_steps=25, save_on_exit=True)
    assert saved_steps(p) == sorted({*range(25, steps + 1, 25), steps})
    q = with_ckpt(plan, every_steps=25, save_on_exit=False)
    assert saved_steps(q) == list(range(25, steps + 1, 25))
    assert saved_steps(with_ckpt(plan, every_steps=0, save_on_exit=False)) == []


def test_lr_warms_up_then_decays_to_min_lr(plan):
    t = plan.train
    f = [lr_factor(i, plan) for i in range(t.steps)]
    assert f[0] == pytest.approx(1 / t.warmup_steps) and f[t.warmup_steps - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[t.warmup_steps:], f[t.warmup_steps + 1:]))     # monotone decay
    assert f[-1] == pytest.approx(t.min_lr / t.lr)
