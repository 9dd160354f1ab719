"""Packing never leaks attention across documents: one packed row (5 documents, positions
restarting at 0 each, some labels masked as prompts) gives the same per-document losses and
the same gradients as running each document alone, fp32 on CPU, rtol 1e-5:
  - single process, HF sdpa with position_ids (transformers builds the block-causal mask);
  - torchrun world 4: dp_shard 2 x tp 2 with sequence + loss parallel, dp_shard 2 x cp 2 and
    cp 2 x tp 2 (runtime/cp.py's document-aware mask), one launch for all three.
A control without position_ids (one causal sequence) must differ, so the test can fail.
The same launch resumes a run on prepared data after a dp reshard (dp_shard 4 -> dp_shard 2 x
tp 2): the resumed steps read the next unseen samples (losses equal the uninterrupted run's)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from meshbake.runtime import plan as P

from tests.helpers import ROOT, plan_of, tiny_recipe, torchrun

T = 64
LENGTHS = [9, 17, 6, 20, 12]           # positions per document: 64 = one full window
RTOL = 1e-5


def plan_for(name: str, world: int, **mesh) -> dict:
    sp, lp = mesh.pop("sp", False), mesh.pop("lp", False)
    return plan_of(tiny_recipe(name, world, mesh={"dp_shard": 1, **mesh}, sp=sp, lp=lp, data=None,
                               train={"seq_len": T, "micro_batch_size": 1, "global_batch_size": mesh.get("dp_shard", 1),
                                      "steps": 1}))


def documents() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (n+1,), labels (n,)) per document; the first 3 labels of every other document
    masked (-100), as a prompt would be."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i, n in enumerate(LENGTHS):
        tok = torch.randint(4096, (n + 1,), generator=g)
        lab = tok[1:].clone()
        if i % 2:
            lab[:3] = -100
        out.append((tok, lab))
    return out


def packed_row() -> dict[str, list[list[int]]]:
    docs = documents()
    return {"input_ids": [torch.cat([t[:-1] for t, _ in docs]).tolist()],
            "labels": [torch.cat([lab for _, lab in docs]).tolist()],
            "position_ids": [torch.cat([torch.arange(n) for n in LENGTHS]).tolist()]}


def per_doc(tok_loss: torch.Tensor) -> torch.Tensor:
    return torch.stack([c.sum() for c in torch.split(tok_loss, LENGTHS)])


def alone(plan_d: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document by itself through the plain HF model: per-document loss sums, summed grads."""
    from tests.dist.reference import hf_model

    model = hf_model(P.from_dict(plan_d))
    losses = []
    for tok, lab in documents():
        logits = model(input_ids=tok[None, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits[0].float(), lab, reduction="sum", ignore_index=-100)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| relative to the largest |b| of the same parameter, over all parameters."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.fixture(scope="module")
def reference():
    plan_d = plan_for("ref", 1)
    return plan_d, alone(plan_d)


def test_packed_row_equals_documents_alone_single_process(reference):
    from tests.dist.reference import hf_model

    plan_d, (want_loss, want_grads) = reference
    row = {k: torch.tensor(v) for k, v in packed_row().items()}
    model = hf_model(P.from_dict(plan_d))
    logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
    tok = F.cross_entropy(logits[0].float(), row["labels"][0], reduction="none", ignore_index=-100)
    tok.sum().backward()
    got_grads = {n: p.grad for n, p in model.named_parameters()}
    rel_loss = float(((per_doc(tok.detach()) - want_loss).abs() / want_loss.abs()).max())
    rel_grad = max_rel(got_grads, want_grads)
    print(f"single process: max rel per-document loss diff {rel_loss:.1e}, grad diff {rel_grad:.1e}")
    assert rel_loss < RTOL and rel_grad < RTOL
    with torch.no_grad():                         # control: one causal sequence leaks across documents
        leak = model(input_ids=row["input_ids"], use_cache=False).logits
    leak_tok = F.cross_entropy(leak[0].float(), row["labels"][0], reduction="none", ignore_index=-100)
    assert float(((per_doc(leak_tok) - want_loss).abs() / want_loss.abs())[1:].min()) > 1e-3


CASES = {"dp_shard2_tp2_sp_lp": dict(dp_shard=2, tp=2, sp=True, lp=True), "dp_shard2_cp2": dict(dp_shard=2, cp=2),
         "cp2_tp2_sp": dict(cp=2, tp=2, sp=True)}


def resume_plans(tmp: Path) -> list[dict]:
    """Three plans over one prepared chat dataset (seq 64): 6 steps on dp_shard 4; 3 steps on
    dp_shard 4 with a checkpoint; 6 steps on dp_shard 2 x tp 2 resuming from it. A constant LR:
    a cosine over 3 steps would differ from one over 6 whatever the data."""
    from meshbake.runtime.prepare import prepare

    def one(steps: int, mesh: dict, sp: bool) -> dict:
        recipe = tiny_recipe(
            "resume", 4, mesh=mesh, sp=sp, lp=sp,
            train={"seq_len": T, "steps": steps, "lr": 2e-3, "lr_schedule": "constant"},
            data={"format": "chat", "path": str(ROOT / "data/chat/chatterbot_en.jsonl"),
                  "tokenizer": str(ROOT / "data/chat_tokenizer")},
            checkpoint={"every_steps": 3, "keep": 1, "save_on_exit": False})
        recipe["model"]["weights"] = "random"      # chat fine-tuning from scratch, on purpose
        plan = plan_of(recipe)
        # a recipe's prepared_dir stays inside the launch directory; the test's is in tmp
        plan["data"]["prepared_dir"] = str(tmp / "prepared")
        return plan
    plans = [one(6, {"dp_shard": 4}, False), one(3, {"dp_shard": 4}, False),
             one(6, {"dp_shard": 2, "tp": 2}, True)]
    prepare(P.from_dict(plans[0]), quiet=True, log=lambda s: None)    # one dataset: the options are equal
    return plans


@pytest.mark.dist
def test_packed_row_equals_documents_alone_under_tp_sp_and_cp(reference, tmp_path):
    _, (want_loss, want_grads) = reference
    cases = [{"name": n, "plan": plan_for(n, 4, **kw), **packed_row()} for n, kw in CASES.items()]
    cases.append({"name": "resume", "kind": "resume", "plans": resume_plans(tmp_path), "dir": str(tmp_path / "runs")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(4, ROOT / "tests/dist/packed_worker.py", str(tmp_path / "cases.json"), str(tmp_path), cwd=tmp_path)
    for name in CASES:
        got = torch.load(tmp_path / f"{name}.pt")
        rel_loss = float(((per_doc(got["tok_loss"]) - want_loss).abs() / want_loss.abs()).max())
        rel_grad = max_rel(got["grads"], want_grads)
        print(f"{name}: max rel per-document loss diff {rel_loss:.1e}, grad diff {rel_grad:.1e}")
        assert rel_loss < RTOL and rel_grad < RTOL, (name, rel_loss, rel_grad)
        if got["lp_sum"] is not None:     # loss parallel's vocab-sharded CE skips the -100 labels too
            assert abs(got["lp_sum"] - float(want_loss.sum())) / float(want_loss.sum()) < RTOL, got["lp_sum"]
    r = json.loads((tmp_path / "resume.json").read_text())
    full, resumed = r["full"], r["resumed"]
    assert sorted(resumed) == ["4", "5", "6"]                         # it resumed at step 4, on dp 2
    rel = max(abs(resumed[k] - full[k]) / full[k] for k in resumed)
    print(f"resume after dp reshard: max rel loss diff vs uninterrupted {rel:.1e}")
    assert rel < 1e-4
    state = json.loads((tmp_path / "runs/split/checkpoints/step-6/train_state.json").read_text())
    assert state["data"]["samples_consumed"] == 6 * 8
