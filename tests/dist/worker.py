"""Runs under torchrun: many plans in one process group (a torchrun start costs 5-10 s here,
the tiny training loop well under 1 s), each through the real runtime.

    torchrun --standalone --nproc-per-node N tests/dist/worker.py CASES_JSON OUT_JSON

CASES_JSON: [{"name", "kind": "train" | "logits" | "shared_dir" | "diverge", "plan": plan.json dict, "input": [[ids]]}]
OUT_JSON (rank 0): {name: {"losses": {step: loss}, "grad_norms": {...}} | {"logits": file}}
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshbake.runtime import plan as P
from meshbake.runtime.parallel import build, decoder_layers
from meshbake.runtime.train import device_for, init_distributed, run, world_mesh

from tests.dist import watchdog


def train_case(plan: P.Plan, run_dir: Path, logits_input=None) -> dict:
    from meshbake.runtime import cp

    cp._STATE["calls"] = 0
    res = run(plan, run_dir)
    tied = None
    if plan.model.tie_word_embeddings:
        # under pp a rank holds the embedding (first stage) or lm_head (last stage, its weight
        # the rank's copy of the table, also held by an embedding module for its name) or both
        emb, head = res.model.get_input_embeddings(), res.model.get_output_embeddings()
        names = [n for n, _ in res.model.named_parameters()]
        tied = {"same_param": emb is not None and head is not None and emb.weight is head.weight,
                "n_params": len(names), "lm_head_listed": any(n.startswith("lm_head") for n in names),
                "held": [emb is not None, head is not None]}
    compiled = all(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(res.model, plan))
    ep_blocks = [m for m in res.model.modules() if hasattr(m, "_meshbake_ep")]
    out = {"losses": res.losses, "grad_norms": res.grad_norms, "tied": tied, "compiled": compiled,
           "cp_attention_calls": cp._STATE["calls"],
           # experts this rank holds (mesh.ep: E / ep), after FSDP's own dim-1 shard
           "ep_local_experts": ep_blocks[0].experts.gate_up_proj.to_local().shape[0] if ep_blocks else None}
    if logits_input is not None:     # the trained sharded model's logits, for the export test
        res.model.eval()
        with torch.no_grad():
            logits = res.model(input_ids=torch.tensor(logits_input), use_cache=False).logits
        logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
        if dist.get_rank() == 0:
            torch.save(logits, run_dir / "logits.pt")
            (run_dir / "plan.json").write_text(P.dumps(plan))
        out["run_dir"] = str(run_dir)
    return out


def logits_case(plan: P.Plan, ids: list[list[int]], out: Path) -> dict:
    model = build(plan, world_mesh(plan), device_for(plan))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), use_cache=False).logits
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if dist.get_rank() == 0:
        torch.save(logits, out)
    from meshbake.runtime.parallel import LOAD_STATS

    return {"logits": str(out), "load": dict(LOAD_STATS)}


def shared_dir_case(own_dir: Path, shared_dir: Path) -> dict:
    """own_dir differs per rank (a node-local disk); shared_dir is one directory for all."""
    from meshbake.runtime.train import check_shared_run_dir

    def error_of(d: Path) -> str | None:
        d.mkdir(parents=True, exist_ok=True)
        try:
            check_shared_run_dir(d, wait_s=1)
        except Exception as e:     # RuntimeError today, runtime.errors.UserError soon
            return str(e)
        return None

    # both outcomes recorded, so the test sees a wrongly refused shared dir as a failure
    return {"shared_error": error_of(shared_dir), "unshared_error": error_of(own_dir)}


def main(cases_path: str, out_path: str) -> int:
    cases = json.loads(Path(cases_path).read_text())
    init_distributed(cases[0]["plan"]["mesh"]["backend"])
    results = {}
    for case in cases:
        plan = P.from_dict(case["plan"])
        # a case that hangs ends the launch after watchdog.CASE_TIMEOUT_S naming the case (the barrier
        # after it is inside: a rank that skipped a collective is stuck there)
        with watchdog.case(case["name"]), tempfile.TemporaryDirectory() as d:
            try:
                if case["kind"] == "diverge":          # expected to stop with FloatingPointError
                    run_dir = Path(out_path).parent / case["name"]
                    try:
                        run(plan, run_dir)
                        results[case["name"]] = {"stopped": None}
                    except FloatingPointError as e:
                        results[case["name"]] = {"stopped": str(e), "run_dir": str(run_dir)}
                elif case["kind"] == "shared_dir":
                    results[case["name"]] = shared_dir_case(Path(d) / "run", Path(out_path).parent / case["name"])
                elif case["kind"] == "train":
                    keep = Path(out_path).parent / case["name"] if case.get("keep_run") else Path(d) / "run"
                    results[case["name"]] = train_case(plan, keep, case.get("input"))
                else:
                    results[case["name"]] = logits_case(plan, case["input"], Path(out_path).with_name(
                        f"{case['name']}.logits.pt"))
            except Exception:   # noqa: BLE001 — a failed rank must not leave the others in a collective
                print(f"case {case['name']} failed on rank {dist.get_rank()}:\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                os._exit(1)
            dist.barrier()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
