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
                     down columns); output all-reduced (reduce-scattered under sequence parallel).
                     GPT-OSS's (layout experts_hf, HF's (E, H, 2I) interleaved order kept): gate_up
                     and its bias split on the 2I dim (whole (gate_i, up_i) pairs), down on I, down's
                     bias whole (added once)
                     Llama-4's (layout experts_t, (E, H, 2I) [gate | up] stored as column pairs):
                     gate_up split on the 2I dim, down on I
  sinks              GPT-OSS attention sinks (one logit per q head): sharded with q_proj's heads
  local_heads        norm over head_dim on the rank's local heads (Qwen3 q/k norm): weight replicated,
                     gradient summed over tp
  colwise_norm       norm over a whole colwise projection (OLMo-2 q/k norm): weight sharded like the
                     projection's rows, variance all-reduced
  latent             MLA low-rank down-projection (DeepSeek-V3 q_a_proj, kv_a_proj_with_mqa): whole on
                     every tp rank, taking the gathered sequence as a local tensor; the shared rope key
                     columns' gradient summed over tp (runtime/parallel.py _latent)
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .dims import ParallelDims
from .errors import UserError
from .roles import ModelRoles
from .safeio import printable, read_text_bounded
from .sections import SCHEMA_OF, SchemaError, build, schema, section, show, to_dict

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
    # fused fqn -> "qkv" | "gate_up" | "experts" | "qkv_heads" | "experts_hf" | "experts_t"
    layouts: dict[str, str] = field(default_factory=dict)
    active_params: int = 0              # params a token goes through (MoE: k of E experts); 0 = num_params
    roles: ModelRoles | None = None     # embedding, lm_head, blocks, LoRA target fqns (runtime/roles.py;
                                        # None in plan.json before roles: roles.plan_roles derives them)
    hub: dict[str, str] | None = None   # model.config from the Hugging Face Hub: {repo, sha} (the commit it
                                        # was pinned to, runtime/hub.py); absent from plan.json otherwise


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


@dataclass(frozen=True, kw_only=True)
class PPPlan(section("pp")):
    """Pipeline parallelism as resolved (plan.json `pp`, only when mesh.pp > 1): microbatches is
    the number (train.grad_accum), stages the decoder blocks of each stage as [first, stop)
    ranges, first stage to last, chosen by the compiler (runtime/pp.py builds them; the
    runtime never re-derives a split)."""
    stages: tuple[tuple[int, int], ...]


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
    pp: PPPlan | None = None        # pipeline parallelism (mesh.pp > 1), else None and absent from plan.json


# ------------------------------------------------------------------ the run's length (train.epochs)
def epoch_steps(train: TrainPlan, windows: int) -> int:
    """Optimizer steps of train.epochs passes over `windows` prepared windows:
    ceil(ceil(epochs x windows) / global_batch_size). The epoch count is read as the decimal it was
    written as (Fraction(repr)): 0.1 x 30 windows is 3 samples, not 3.0000000000000004 -> 4. The
    last step may run into the next epoch by up to global_batch_size - 1 samples (the stream has no
    partial batches); e.g. 2 epochs x 37 windows / 8 = 9.25 -> 10 steps, 80 samples, epoch 2.16."""
    samples = math.ceil(Fraction(repr(float(train.epochs))) * windows)
    return max(1, -(-samples // train.global_batch_size))


def resolve_steps(plan: Plan, windows: int | None) -> Plan:
    """The plan with train.steps and warmup_steps known: with train.epochs the steps come from the
    prepared windows (epoch_steps) and warmup_ratio becomes round(ratio x steps), as the compiler
    does with train.steps; a plan with steps is returned as it is. The runtime calls it once it has
    the training windows, before the optimizer's schedule and the console total are built."""
    t = plan.train
    if t.steps is not None and t.warmup_ratio is None:
        return plan
    if t.steps is None and not windows:
        raise UserError("plan.json", f"train.epochs {t.epochs} with no prepared windows (data.format "
                        f"{plan.data.format}) has no step count", "give train.steps, or prepare real data")
    steps = t.steps if t.steps is not None else epoch_steps(t, windows)
    warmup = round(t.warmup_ratio * steps) if t.warmup_ratio is not None else t.warmup_steps
    return dataclasses.replace(plan, train=dataclasses.replace(t, steps=steps, warmup_steps=warmup, warmup_ratio=None))


def crossed(before: int, after: int, windows: int | None, per_epoch: int) -> bool:
    """Did the samples consumed go from `before` to `after` past one of the per_epoch marks of an
    epoch (k x windows / per_epoch for an integer k)? floor(after x per / W) > floor(before x per / W)
    in integers: per_epoch 1 marks the step that completes each epoch; 4 with W = 10 the steps whose
    samples pass 2.5, 5, 7.5, 10, 12.5, ... No windows (synthetic) or per_epoch 0: never."""
    if not per_epoch or not windows:
        return False
    return after * per_epoch // windows > before * per_epoch // windows


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    d = to_dict(plan)
    d["mesh"]["world"] = plan.mesh.world   # derived, written for readers of plan.json
    if d["model"].get("hub") is None:        # only a Hub model says where it came from
        d["model"].pop("hub", None)
    if not plan.mesh.pp_enabled:             # a plan without pipeline parallelism reads as before pp existed
        d["mesh"].pop("pp", None)
        d.pop("pp", None)
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


# ------------------------------------------------------------------------ reading plan.json back
# plan.json is read back from a run dir (report, export, resume, a requeued job): a file someone
# else may have written or edited. Every value is held to the schema node it came from (the
# recipe's: name, run_dir, train.*, data.*, ...; a `name` of "x\nimport os" is a str, and is then
# written into scripts, logs and HTML) and every plan-only field to its own node below, so a
# string the runtime builds names, paths or log lines from holds no control character.
PLAN_MAX_BYTES = 8 << 20        # the largest golden plan.json (70B, 80 blocks of placements) is 60 KB
# one line of text: no control characters (C0, DEL, C1), no line separators, no bidi overrides
_LINE = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]*$(?!\\n)"
_FQN = "^[A-Za-z0-9_.]*$(?!\\n)"                    # a module name ("" = none, e.g. final_norm)
_WORD = "^[A-Za-z0-9_]+$(?!\\n)"                    # a class name, a style, an attention kernel
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_AXIS = {"type": "integer", "minimum": 1, "maximum": 2**20}      # one mesh axis, nodes, processes per node
_TEXT = {"type": "string", "maxLength": 4096, "pattern": _LINE}
_PATH = {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": _LINE}


def _with(path: str, **extra: Any) -> dict[str, Any]:
    """The recipe schema's node at path (dotted) with plan-only properties added."""
    node: Any = schema()
    for part in path.split(".") if path else ():
        node = node["properties"][part]
    return {**node, "properties": {**node.get("properties", {}), **extra}}


def _declare() -> None:
    """The schema nodes of the plan's classes (sections.SCHEMA_OF; the generated ones are there)."""
    recipe = schema()["properties"]
    SCHEMA_OF[ParallelDims] = {"type": "object", "properties": {
        **{k: _AXIS for k in ("dp_replicate", "dp_shard", "cp", "tp", "nodes", "procs_per_node", "ep", "pp")},
        "device": recipe["cluster"]["properties"]["device"], "backend": {"enum": ["nccl", "gloo"]}}}
    SCHEMA_OF[ModelRoles] = {"type": "object", "properties": {
        **{k: {"type": "string", "maxLength": 512, "pattern": _FQN}
           for k in ("embedding", "lm_head", "final_norm", "block_prefix")},
        "num_blocks": {"type": "integer", "minimum": 0, "maximum": 2**20},
        "lora_targets": {"type": "array", "items": {"type": "string", "maxLength": 512, "pattern": _FQN}}}}
    SCHEMA_OF[ModelPlan] = {"type": "object", "properties": {
        "config": {"type": "object", "propertyNames": {"maxLength": 256, "pattern": _LINE}},
        "architecture": {"type": "string", "maxLength": 256, "pattern": _WORD},
        "source": _PATH, "weights": {**_PATH, "type": ["string", "null"]},
        "num_params": _COUNT, "active_params": _COUNT,
        "attn_implementation": {"type": "string", "maxLength": 64, "pattern": _WORD},
        "layouts": {"type": "object", "propertyNames": {"maxLength": 512, "pattern": _FQN},
                    "additionalProperties": {"enum": ["qkv", "gate_up", "experts", "qkv_heads", "experts_hf", "experts_t"]}},
        "hub": {"type": ["object", "null"], "additionalProperties": False, "required": ["repo", "sha"],
                "properties": {"repo": {"type": "string", "maxLength": 200, "pattern": "^[A-Za-z0-9][A-Za-z0-9_./-]*$(?!\\n)"},
                               "sha": {"type": "string", "pattern": "^[0-9a-f]{40}$(?!\\n)"}}}}}
    SCHEMA_OF[TPPlan] = _with("tp", placements={
        "type": "object", "propertyNames": {"maxLength": 512, "pattern": _FQN},
        "additionalProperties": {"type": "string", "maxLength": 64, "pattern": _WORD}})
    SCHEMA_OF[TrainPlan] = _with("train", grad_accum={"type": "integer", "minimum": 1, "maximum": 2**30},
                                 dtype=recipe["model"]["properties"]["dtype"])
    SCHEMA_OF[PPPlan] = _with("pp", stages={
        "type": "array", "minItems": 2, "maxItems": 65536,
        "items": {"type": "array", "prefixItems": [_COUNT, _COUNT], "minItems": 2, "maxItems": 2}})
    SCHEMA_OF[DataPlan] = _with("data", vocab_size={"type": "integer", "minimum": 1, "maximum": 2**31},
                                fingerprint={"type": "string", "maxLength": 128, "pattern": "^[0-9a-f]*$(?!\\n)"})
    SCHEMA_OF[Plan] = {"type": "object", "properties": {
        "version": {"const": PLAN_VERSION}, "name": recipe["name"], "run_dir": recipe["run_dir"],
        "max_restarts": recipe["cluster"]["properties"]["max_restarts"],
        "estimate": {"type": "object", "propertyNames": {"maxLength": 256, "pattern": _LINE}},
        "warnings": {"type": "array", "maxItems": 1000, "items": {**_TEXT, "maxLength": 65536}},
        "versions": {"type": "object", "maxProperties": 64, "propertyNames": {"maxLength": 64, "pattern": _WORD},
                     "additionalProperties": {**_TEXT, "maxLength": 256}}}}


_declare()


class PlanError(UserError, ValueError):
    """plan.json is not one meshbake wrote: one line naming the file and the JSON path. A
    UserError (report and export: exit 3) and a ValueError (callers that caught ValueError)."""

    def __init__(self, where: object, problem: str):
        super().__init__(printable(where), problem,
                         "it is not a plan.json this meshbake wrote (or was edited): compile the recipe again "
                         "(meshbake bundle), or use a run dir only you write to")


def _free_form(v: Any, path: str, depth: int = 0) -> None:
    """The fields without a schema of their own (model.config, estimate): plain JSON, nested at
    most 32 deep, integers within int64 (10**4000 parses, then overflows float() downstream), keys
    and strings of printable text (json.loads already refused NaN/Infinity)."""
    if depth > 32:
        raise SchemaError(path, "is nested more than 32 deep")
    if isinstance(v, Mapping):
        for k, x in v.items():
            _free_form(x, f"{path}.{printable(k)}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _free_form(x, f"{path}[{i}]", depth + 1)
    elif isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
        raise SchemaError(path, f"{show(v)} is outside the 64-bit integers")
    elif isinstance(v, str) and len(v) > 65536:
        raise SchemaError(path, f"is a string of {len(v):,} characters")


def from_dict(d: Any, where: object = "plan.json") -> Plan:
    """A Plan from plan.json's parsed dict, every value held to its schema node (see _declare);
    anything else is a PlanError naming `where` and the JSON path."""
    if not isinstance(d, Mapping):
        raise PlanError(where, f"holds {show(d)}, not an object")
    if d.get("version") != PLAN_VERSION:
        raise PlanError(where, f"version {show(d.get('version'))}, this runtime reads {PLAN_VERSION}")
    try:
        d = _older(d)
        for key in ("estimate",):
            _free_form(d.get(key), key)
        if isinstance(d.get("model"), Mapping):
            _free_form(d["model"].get("config"), "model.config")
        # keys this runtime does not know (mesh.world, derived) are dropped; missing ones take defaults
        return build(Plan, d, strict=False, validate=True)
    except SchemaError as e:
        raise PlanError(where, str(e)) from None
    except (TypeError, KeyError, AttributeError) as e:     # wrong shapes (build's TypeError names the path)
        msg = str(e) if isinstance(e, TypeError) else f"wrong shape ({type(e).__name__}: {e})"
        raise PlanError(where, printable(msg)[:300]) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):       # 1e999 parses to inf: as much a non-number as Infinity
        raise ValueError(f"{text[:40]} overflows a float")
    return v


def loads(text: str, where: object = "plan.json") -> Plan:
    """plan.json text -> Plan: strict JSON (NaN, Infinity, -Infinity and numbers that overflow
    to inf refused; json.loads takes them by default) then from_dict."""
    try:
        d = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise PlanError(where, "is nested too deep to be a plan") from None
    except ValueError as e:        # JSONDecodeError, our refusals, an int of more than 4300 digits
        raise PlanError(where, f"is not valid JSON ({printable(str(e))[:200]})") from None
    return from_dict(d, where)


def load_plan(path: str) -> Plan:
    """plan.json at path: a regular file (no symlink followed, a FIFO does not block), at most
    PLAN_MAX_BYTES, UTF-8, strict JSON, every value within its schema. Refusals are PlanErrors
    (UserError: one line naming the file and the JSON path)."""
    return loads(read_text_bounded(path, PLAN_MAX_BYTES), path)
