"""runtime/data.py: batches are a pure function of (step, micro-step, dp rank), and together
the ranks' micro-batches are exactly the global batch a single process would read."""
from __future__ import annotations

import json

import pytest
import torch

from runtime.data import TokenData
from runtime.errors import UserError
from runtime.plan import DataPlan, MixedPrecision, TrainPlan
from tests.helpers import ROOT

TOK = str(ROOT / "data/tokenizer")


def train(mbs=2, gbs=8, accum=2, seq=32) -> TrainPlan:
    return TrainPlan(seq, mbs, gbs, accum, 10, 1e-3, 0.0, 0, "cosine", 0.1, (0.9, 0.95), 1e-8, 1.0, 0, "float32",
                     MixedPrecision("float32", "float32"), "none", False, 1)


@pytest.mark.parametrize("source", ["synthetic", "text"])
def test_ranks_partition_the_global_batch(source):
    d = DataPlan(source, str(ROOT / "data/shakespeare.txt") if source == "text" else None,
                 TOK if source == "text" else None, "text", 4096)
    dp, t = 2, train()
    data = TokenData(d, t, dp=dp)
    for step in (0, 3):
        parts = [torch.cat(data.micro_batch(step, m, r)[0:1] + (data.micro_batch(step, m, r)[1][:, -1:],), dim=1)
                 for m in range(t.grad_accum) for r in range(dp)]
        assert torch.equal(torch.cat(parts), data.global_batch_tokens(step))
    x, y = data.micro_batch(1, 0, 1)
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])        # labels are inputs shifted by one
    assert torch.equal(TokenData(d, t, dp=dp).micro_batch(5, 1, 0)[0], data.micro_batch(5, 1, 0)[0])


def test_jsonl_records_joined_with_eos(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"To be or not to be, record {i}."}) for i in range(40)) + "\n")
    data = TokenData(DataPlan("jsonl", str(f), TOK, "text", 4096), train(), dp=1)
    assert int((data.tokens == 0).sum()) == 40                           # <|endoftext|> after every record
    bad = DataPlan("jsonl", str(f), TOK, "content", 4096)
    with pytest.raises(UserError, match="no field 'content'"):
        TokenData(bad, train(), dp=1)


def test_tokenizer_larger_than_model_vocab_is_refused():
    d = DataPlan("text", str(ROOT / "data/shakespeare.txt"), TOK, "text", 1000)
    with pytest.raises(ValueError, match="vocab_size 1000"):
        TokenData(d, train(), dp=1)
