"""plan.json: the contract between the compiler and the runtime.

The compiler builds a `Plan` and writes `plan.json`; the runtime reads it back with
`load_plan`. This module is stdlib only, so a bundle runs with torch + transformers and
nothing of the compiler. Every field the runtime acts on is here; nothing is re-derived.

Placement styles (tp.placements maps a module fqn to one of these; runtime/roles.SHARD_DIM is the
table of which dim each splits):
  colwise            Linear sharded on its output dim (q/k/v/gate/up; lm_head = vocab dim)
  rowwise            Linear sharded on its input dim (o_proj/down_proj); Embedding on vocab dim 0
  sequence_parallel  norm computed on a sequence shard (only with tp.sequence_parallel)
  replicate          kept whole on every tp rank (its bytes are counted in the estimate)
  colwise_qkv        fused [q|k|v] Linear stored interleaved by kv group (runtime/fused.py), rows sharded:
                     each rank holds its own heads' q, k and v
  colwise_gate_up    fused [gate|up] Linear stored as (gate_i, up_i) row pairs, rows sharded
  experts            grouped MoE experts: each expert's intermediate dim sharded (gate_up rows as pairs,
                     down columns); output all-reduced (reduce-scattered under sequence parallel)
  local_heads        norm over head_dim on the rank's local heads (Qwen3 q/k norm): weight replicated,
                     gradient summed over tp
  colwise_norm       norm over a whole colwise projection (OLMo-2 q/k norm): weight sharded like the
                     projection's rows, variance all-reduced
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .dims import ParallelDims
from .roles import ModelRoles
from .sections import build, section, to_dict

PLAN_VERSION = 1


@dataclass(frozen=True)
class ModelPlan:
    config: dict[str, Any]          # the full HF config.json dict (model_type included)
    architecture: str               # e.g. "LlamaForCausalLM"
    source: str                     # catalog name or path the recipe gave (for humans)
    weights: str | None             # HF folder with *.safetensors, or None = random init
    num_params: int
    tie_word_embeddings: bool
    attn_implementation: str = "sdpa"   # transformers attention kernel for this class: sdpa | eager
    layouts: dict[str, str] = field(default_factory=dict)   # fused fqn -> "qkv" | "gate_up" | "experts"
    active_params: int = 0              # params a token goes through (MoE: k of E experts); 0 = num_params
    roles: ModelRoles | None = None     # embedding, lm_head, blocks, LoRA target fqns (runtime/roles.py;
                                        # None in plan.json before roles: roles.plan_roles derives them)


# Recipe sections the runtime reads as they are ARE the generated classes (runtime/sections.py);
# sections with facts the compiler resolved extend them with those fields (keyword-only).
MixedPrecision = section("train.mixed_precision")   # param_dtype (FSDP compute), reduce_dtype (grad reduce-scatter)
CheckpointPlan = section("checkpoint")        # dir (relative to the run dir), every_steps (0: off), keep, resume
LoraPlan = section("lora")                    # rank (0: off), alpha, dropout, targets (leaf module names)
TrackingPlan = section("tracking")            # tensorboard, wandb {project (None: off), entity, name, mode, tags}
Source = section("data.sources[]")            # one data source: path, weight (data.eval_sources items too)


@dataclass(frozen=True, kw_only=True)
class TPPlan(section("tp")):
    """sequence_parallel / loss_parallel as in effect (off when tp = 1); plan as the recipe gave it."""
    placements: dict[str, str]      # module fqn -> style, every Linear/Embedding/norm


@dataclass(frozen=True, kw_only=True)
class TrainPlan(section("train")):
    grad_accum: int                 # = global / (micro * dp), resolved by the compiler
    dtype: str                      # dtype of the master weights and optimizer state (recipe model.dtype)


@dataclass(frozen=True, kw_only=True)
class DataPlan(section("data")):
    """What runtime/prepare.py turns into packed token windows (see its docstring); format and
    overlong resolved (never None / auto), data.path already one of the sources."""
    vocab_size: int                 # token ids must be < vocab_size (the model's)
    fingerprint: str = ""           # options fingerprint (runtime/prepare.options_fingerprint)


@dataclass(frozen=True)
class Plan:
    version: int
    name: str
    model: ModelPlan
    mesh: ParallelDims             # runtime/dims.py: the mesh and its derived facts
    tp: TPPlan
    train: TrainPlan
    data: DataPlan
    checkpoint: CheckpointPlan
    lora: LoraPlan
    run_dir: str                    # where metrics/checkpoints go, relative to the launch cwd
    max_restarts: int
    estimate: dict[str, Any] = field(default_factory=dict)   # per-rank bytes etc., for humans
    warnings: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)  # torch/transformers the plan was made with
    tracking: TrackingPlan = field(default_factory=TrackingPlan)   # experiment trackers (rank 0)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    d = to_dict(plan)
    d["mesh"]["world"] = plan.mesh.world   # derived, written for readers of plan.json
    return d


def dumps(plan: Plan) -> str:
    """Deterministic JSON text (sorted keys, fixed indent, trailing newline)."""
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"


def _older(d: dict[str, Any]) -> dict[str, Any]:
    """plan.json of earlier meshbake versions (runs being exported) in today's shape."""
    d = dict(d)
    da = d["data"]
    if "format" not in da:             # before the data redesign: source/path/text_field
        d["data"] = {"format": "synthetic" if da.get("source") == "synthetic" else "text",
                     "tokenizer": da.get("tokenizer"),
                     "sources": [{"path": da["path"], "weight": 1.0}] if da.get("path") else [],
                     "fields": {"text": da.get("text_field", "text")}, "vocab_size": da["vocab_size"]}
    tr = d.get("tracking", {})
    if any(k.startswith("wandb_") for k in tr):   # before tracking.wandb was nested as in the recipe
        d["tracking"] = {"tensorboard": tr.get("tensorboard", False),
                         "wandb": {k.removeprefix("wandb_"): v for k, v in tr.items() if k.startswith("wandb_")}}
    return d


def from_dict(d: dict[str, Any]) -> Plan:
    if d.get("version") != PLAN_VERSION:
        raise ValueError(f"plan.json version {d.get('version')!r}, this runtime reads {PLAN_VERSION}")
    # keys this runtime does not know (mesh.world, derived) are dropped; missing ones take defaults
    return build(Plan, _older(d), strict=False)


def load_plan(path: str) -> Plan:
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))
