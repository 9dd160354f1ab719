"""runtime/pp.split_model in one process, no torchrun: for every family pp accepts, the tiny
tests/models fixture split into pp 2 stages (two copies of one seeded model, each pruned to its
stage as a pp rank prunes its own) and run as a chain, stage 0 on the token ids, stage 1 on
stage 0's hidden states, gives the whole HF model's logits (fp32, 1e-5). This is the forward half
of tests/test_pp.py's parity (which trains each family under real pp 2); here it costs no launch,
and it shows what each part of the split is for: without runtime/pp.NEUTRAL_AFTER_FIRST Granite-
MoE's stage 1 scales the residual stream by embedding_multiplier again, and without the last
stage's CausalLM head (Stage.top) Gemma-2's logits miss the final soft-cap and Granite-MoE's the
division by logits_scaling."""
from __future__ import annotations

import copy

import pytest
import torch
from meshbake.compiler.pp import PP_MODEL_TYPES
from meshbake.runtime import plan as P

from tests.helpers import ROOT, plan_of, tiny_recipe

FIXTURES = sorted(p.name for p in (ROOT / "tests/models").iterdir() if (p / "config.json").is_file())


def _plan(model_type: str) -> P.Plan:
    rec = tiny_recipe("stages", 2, mesh={"pp": 2, "dp_shard": 1}, model=str(ROOT / f"tests/models/{model_type}/config.json"),
                      train={"steps": 1})
    return P.from_dict(plan_of(rec))


def _chain(plan: P.Plan, full: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(logits of stage 1 on stage 0's output, that output (mbs, T, H), stage 1)."""
    from meshbake.runtime.pp import split_model

    (first,) = split_model(copy.deepcopy(full), plan, [0])
    (last,) = split_model(copy.deepcopy(full), plan, [1])
    h = first(x)
    return last(h), h, last


def test_every_fixture_family_is_accepted_by_pp():
    assert set(FIXTURES) <= set(PP_MODEL_TYPES), sorted(set(FIXTURES) - set(PP_MODEL_TYPES))


@pytest.mark.parametrize("model_type", FIXTURES)
def test_stage_chain_gives_the_whole_models_logits(model_type):
    from tests.dist.reference import hf_model

    plan = _plan(model_type)
    assert plan.pp.stages == ((0, 1), (1, 2))
    full = hf_model(plan).eval()
    x = torch.arange(64).reshape(2, 32) * 37 % plan.model.config["vocab_size"]     # (mbs 2, T 32 > the windows 8)
    with torch.no_grad():
        want = full(input_ids=x, use_cache=False).logits
        got, h, last = _chain(plan, full, x)
        # the same chain with the last stage's head as a bare lm_head: what the CausalLM forward adds
        bare = last.lm_head(last.model(inputs_embeds=h, use_cache=False).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head_transform = not torch.allclose(bare, want, rtol=1e-4, atol=1e-4)
    assert head_transform == (model_type in ("gemma2", "granitemoe")), (model_type, float((bare - want).abs().max()))


def test_without_the_neutral_multiplier_granite_moe_stage_1_scales_again(monkeypatch):
    """The check above can fail: with NEUTRAL_AFTER_FIRST emptied, stage 1 multiplies the hidden
    states it receives by embedding_multiplier (12) once more, and the logits move: by 3.4e-3
    at most (measured; the final norm rescales the residual stream, so the sublayers' share, not
    the logits' size, changes), over 100x the tolerance the chain above holds."""
    from meshbake.runtime import pp

    from tests.dist.reference import hf_model

    plan = _plan("granitemoe")
    full = hf_model(plan).eval()
    x = torch.arange(64).reshape(2, 32) * 37 % 1024
    monkeypatch.setattr(pp, "NEUTRAL_AFTER_FIRST", {})
    with torch.no_grad():
        got, _, _ = _chain(plan, full, x)
        want = full(input_ids=x, use_cache=False).logits
    assert float((got - want).abs().max()) > 100 * 1e-5
