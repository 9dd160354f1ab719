"""The zoo sweep (`make zoo`, not part of `make test`): every causal-LM model type of the
installed transformers that has a base_model_tp_plan, as a tiny config built by its own config
class (sizes shrunk, family fields kept), compiled at dp_shard 2 x tp 2 with sequence and loss
parallel; those that compile train 3 steps on CPU (torchrun world 4, one launch per type, so a
crash stays with its type) and their losses are held to a single-process HF run of the same
weights and data (fp32, rel 1e-4, tests/dist/reference.py). Writes docs/MODELS.md and
compiler/zoo.json: the compiler accepts a model_type the matrix (tests/models) covers or this
sweep trained with parity, and refuses the others with the sweep's own reason (compiler/model.py).
The goal: zero compiled-then-crashed, every refusal structural.

    PYTHONPATH=. .venv/bin/python scripts/zoo.py [TYPE ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHRINK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, vocab_size=1024, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, moe_intermediate_size=64, num_experts=4, num_local_experts=4, n_routed_experts=4,
              num_experts_per_tok=2, shared_expert_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
              q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
              topk_group=1, sliding_window=16, attention_chunk_size=16, rotary_dim=8, partial_rotary_factor=0.5,
              linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)


def tiny_config(model_type: str) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    kw = {k: v for k, v in SHRINK.items() if hasattr(default, k) and not isinstance(getattr(default, k), (list, dict))}
    if "qk_rope_head_dim" in kw and getattr(default, "head_dim", None) == getattr(default, "qk_rope_head_dim", None):
        kw["head_dim"] = kw["qk_rope_head_dim"]     # MLA (Youtu): the rotary runs on head_dim = qk_rope_head_dim
    if "partial_rotary_factor" in kw and not getattr(default, "partial_rotary_factor", None):
        kw.pop("partial_rotary_factor")
    lt = getattr(default, "layer_types", None)
    if isinstance(lt, list) and lt:
        kw["layer_types"] = (lt * 2)[:SHRINK["num_hidden_layers"]] if len(set(lt)) == 1 else sorted(set(lt))[:2]
    # dropout off (Seed-OSS ships attention and residual dropout 0.1): random masks differ between
    # one process and four ranks, so no run with them could show parity
    kw.update({k: 0.0 for k, v in vars(default).items() if k.endswith("dropout") and isinstance(v, float) and v})
    cfg = AutoConfig.for_model(model_type, **kw)
    d = cfg.to_diff_dict()
    d["model_type"] = model_type
    return d


def compile_type(model_type: str, cfg_path: Path):
    """Compiled behind the model_type allow-list (compiler/model.py SUPPORTED_TYPES refuses every
    type outside the ten families with parity fixtures): the sweep checks that the structural
    rules under it would refuse what cannot run, should a type be added to the list."""
    from meshbake.compiler import model as M
    from meshbake.compiler.pipeline import compile_recipe

    from tests.test_models import recipe

    if model_type not in M.SUPPORTED_TYPES:
        M.SUPPORTED_TYPES = (*M.SUPPORTED_TYPES, model_type)

    r = recipe(f"zoo-{model_type}", "llama")
    r["model"]["config"] = str(cfg_path)
    r["train"]["steps"] = STEPS
    return compile_recipe(yaml.safe_dump(r), source=model_type)


STEPS, RTOL = 3, 1e-4


def train(plan: dict, tmp: Path) -> tuple[str, str]:
    """-> (run, detail): run "parity" (rel diff in detail), "no parity" or "CRASHED: ..."."""
    from meshbake.runtime import plan as P

    from tests.dist.reference import reference_losses

    (tmp / "cases.json").write_text(json.dumps([{"name": "zoo", "kind": "train", "plan": plan}]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(ROOT / "tests/dist/worker.py"), str(tmp / "cases.json"), str(tmp / "out.json")]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    except subprocess.TimeoutExpired:
        return "CRASHED: timeout after 300 s", ""
    if p.returncode != 0:
        errs = [ln.strip() for ln in p.stderr.splitlines() if "Error" in ln and "ChildFailedError" not in ln
                and "elastic" not in ln]
        return f"CRASHED: {(errs[0] if errs else p.stderr.strip().splitlines()[-1])[:200]}", ""
    got = {int(k): v for k, v in json.loads((tmp / "out.json").read_text())["zoo"]["losses"].items()}
    try:
        ref = reference_losses(P.from_dict(plan))[0]
    except Exception as e:  # noqa: BLE001 — the single-process HF run itself failed: no proof
        return "no parity", f"the single-process reference failed: {type(e).__name__}: {str(e)[:120]}"
    if sorted(got) != sorted(ref):
        return "no parity", f"steps {sorted(got)} vs {sorted(ref)}"
    rel = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    return ("parity" if rel < RTOL else "no parity"), f"max rel loss diff {rel:.1e} over {STEPS} steps"


def main(argv: list[str]) -> int:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = argv or [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                     if t in CONFIG_MAPPING and getattr(CONFIG_MAPPING[t], "base_model_tp_plan", None)]
    rows, plans = [], {}
    for t in types:                   # 1: compile every type (fast), table written at once
        try:
            cfg = tiny_config(t)
        except Exception as e:  # noqa: BLE001 — a family whose fields the generic shrink breaks
            rows.append([t, "no tiny config", f"{type(e).__name__}: {str(e)[:150]}", ""])
            continue
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.json").write_text(json.dumps(cfg))
            try:
                b = compile_type(t, Path(d) / "config.json")
            except Exception as e:  # noqa: BLE001 — a compiler traceback is a bug: record it, go on
                rows.append([t, "COMPILER TRACEBACK", f"{type(e).__name__}: {str(e)[:150]}", ""])
                print(*rows[-1], sep=" | ", flush=True)
                continue
        if hasattr(b, "files"):
            plans[t] = json.loads(b.files["plan.json"])
            rows.append([t, "compiled", "", "not run yet"])
        else:
            e = b.errors[0]
            # the compiler quotes it: the sweep's temporary folder is no fact of the type
            rows.append([t, "refused", f"{e.path}: {e.message.replace(d, '...')[:600]}", ""])
        print(*rows[-1], sep=" | ", flush=True)
    old = _previous_rows() if argv else {}
    rows = [*(r for t, r in sorted(old.items()) if t not in {row[0] for row in rows}), *rows]
    rows.sort(key=lambda r: r[0])
    write(rows)
    for row in rows:                  # 2: train what compiled, one torchrun per type
        if row[0] in plans:
            with tempfile.TemporaryDirectory() as d:
                row[3], detail = train(plans[row[0]], Path(d))
            row[2] = detail or row[2]
            print(*row, sep=" | ", flush=True)
            write(rows)               # partial results survive an interrupted sweep
    summary(rows)
    return 0


def summary(rows) -> None:
    """What the sweep saw, in counts: trained with parity, refused by reason, crashed."""
    from collections import Counter

    def why(reason: str) -> str:      # the rule, not the type: "mesh.tp: ... has no tensor-parallel form"
        path, _, msg = reason.partition(": ")
        for key in ("has no tensor-parallel form", "is a fused projection", "has no style in transformers",
                    "is not a Llama-style decoder", "by a recurrence, not attention", "transformers cannot build",
                    "lacks", "multimodal", "sequence parallel gathers", "router_jitter_noise"):
            if key in msg:
                return f"{path}: {key}"
        return f"{path}: {msg[:60]}"

    runs = Counter(r[3] if r[1] == "compiled" else r[1] for r in rows)
    print(f"zoo: {len(rows)} types seen; {runs.get('parity', 0)} trained with parity, "
          f"{runs.get('no parity', 0)} without, {sum(v for k, v in runs.items() if k.startswith('CRASHED'))} "
          f"crashed, {runs.get('refused', 0)} refused, {runs.get('no tiny config', 0)} without a tiny config")
    for reason, n in Counter(why(r[2]) for r in rows if r[1] == "refused").most_common():
        print(f"  refused {n:3d}  {reason}")


def _previous_rows() -> dict[str, list[str]]:
    """The last sweep's rows (compiler/zoo.json): `zoo.py TYPE ...` re-runs those types only."""
    f = ROOT / "compiler" / "zoo.json"
    if not f.is_file():
        return {}
    return {t: [t, r["compile"], r["reason"], r["run"]] for t, r in json.loads(f.read_text())["types"].items()}


def write(rows) -> None:
    import transformers

    ok = sum(r[1] == "compiled" and r[3] == "parity" for r in rows)
    nopar = sum(r[1] == "compiled" and r[3] == "no parity" for r in rows)
    crashed = sum(r[1] == "compiled" and r[3].startswith("CRASHED") for r in rows)
    pending = sum(r[3] == "not run yet" for r in rows)
    refused = sum(r[1] == "refused" for r in rows)
    nocfg = sum(r[1] == "no tiny config" for r in rows)
    tb = sum(r[1] == "COMPILER TRACEBACK" for r in rows)
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# Model zoo (transformers {transformers.__version__})", "",
             "`make zoo` (scripts/zoo.py): every causal-LM model type with a `base_model_tp_plan`, as a tiny config",
             "from its own config class, compiled at dp_shard 2 x tp 2 with sequence and loss parallel; the ones that",
             f"compile train {STEPS} steps on CPU (torchrun, world 4) and their losses are held to a single-process HF",
             f"run of the same weights and data (fp32, rel {RTOL:g}). The compiler accepts exactly the types with",
             "`parity` here plus the families of `tests/models` (the parity matrix of `make test`); every other",
             "type is refused at `model.config` with its row's reason (compiler/zoo.json, written with this page).", "",
             f"{len(rows)} types: **{ok} trained with parity, {nopar} trained without parity, {refused} refused at compile "
             f"time, {crashed} compiled then crashed**, {tb} compiler tracebacks, {nocfg} without a tiny config (the "
             "generic shrink broke a family field)"
             + (f"; {pending} compiled but not run yet (sweep interrupted)." if pending else "."), "",
             "| type | compile | reason | run |", "|---|---|---|---|"]
    lines += [f"| {t} | {c} | {esc(r[:160])} | {esc(run)} |" for t, c, r, run in rows]
    (ROOT / "docs" / "MODELS.md").write_text("\n".join(lines) + "\n")
    types = {t: {"compile": c, "reason": r, "run": run} for t, c, r, run in rows}
    (ROOT / "compiler" / "zoo.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "steps": STEPS, "rtol": RTOL,
         "mesh": "dp_shard 2 x tp 2 + sequence parallel + loss parallel vs one process", "types": types},
        indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
