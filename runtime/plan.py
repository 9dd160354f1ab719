"""plan.json: the contract between the compiler and the runtime.

The compiler builds a `Plan` and writes `plan.json`; the runtime reads it back with
`load_plan`. This module is stdlib only, so a bundle runs with torch + transformers and
nothing of the compiler. Every field the runtime acts on is here; nothing is re-derived.

Placement styles (tp.placements maps a module fqn to one of these):
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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PLAN_VERSION = 1
STYLES = ("colwise", "rowwise", "sequence_parallel", "replicate", "colwise_qkv", "colwise_gate_up", "experts",
          "local_heads", "colwise_norm")
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # outer -> inner; tp innermost = one node


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


@dataclass(frozen=True)
class MeshPlan:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    nodes: int
    procs_per_node: int
    device: str                     # "cuda" or "cpu"
    backend: str                    # "nccl" or "gloo"
    ep: int = 1                     # expert parallel: carved from dp_shard (not a factor of world)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that see different data: dp_replicate * dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)


@dataclass(frozen=True)
class TPPlan:
    sequence_parallel: bool
    loss_parallel: bool
    placements: dict[str, str]      # module fqn -> style, every Linear/Embedding/norm


@dataclass(frozen=True)
class MixedPrecision:
    param_dtype: str                # dtype FSDP all-gathers and computes in
    reduce_dtype: str               # dtype of gradient reduce-scatter


@dataclass(frozen=True)
class TrainPlan:
    seq_len: int
    micro_batch_size: int           # sequences per dp rank per micro-step
    global_batch_size: int          # sequences per optimizer step, all ranks
    grad_accum: int                 # = global / (micro * dp), resolved by the compiler
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    lr_schedule: str                # "cosine" | "linear" | "constant"
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float                # 0 disables clipping
    seed: int
    dtype: str                      # dtype of the master weights and optimizer state
    mixed_precision: MixedPrecision
    activation_checkpointing: str   # "none" | "full" | "selective"
    compile: bool
    log_every: int
    grad_sync: str = "every_micro_step"   # FSDP reduce-scatter: "every_micro_step" | "last_micro_step"
    eval_every: int = 0             # eval loss every N steps (0: only at the end), with an eval split
    router_aux_loss_coef: float = 0.0   # MoE: loss += coef x transformers' load-balancing loss (0: off)


@dataclass(frozen=True)
class DataPlan:
    """What runtime/prepare.py turns into packed token windows (see its docstring)."""
    format: str                     # synthetic | text | completion | alpaca | chat | tokenized
    sources: tuple[dict[str, Any], ...]   # ({"path": file or folder, "weight": mixing weight}, ...)
    tokenizer: str | None           # HF tokenizer folder (its chat template for format chat)
    fields: dict[str, str]          # record field names: text, prompt, completion, messages, role, ...
    vocab_size: int                 # token ids must be < vocab_size (the model's)
    roles: dict[str, str] = field(default_factory=dict)   # record role value -> system/user/assistant/tool
    train_on: str = "assistant"     # chat: assistant | all | last_turn
    packing: bool = True            # several documents per window, attention kept within each
    overlong: str = "split"         # a document longer than seq_len: split | truncate | drop
    eval_fraction: float = 0.0      # seeded share of documents held out for eval
    eval_sources: tuple[dict[str, Any], ...] = ()   # or a separate eval set
    prepared_dir: str = "prepared"  # where tokenized data goes, relative to the launch directory
    fingerprint: str = ""           # options fingerprint (runtime/prepare.options_fingerprint)

@dataclass(frozen=True)
class CheckpointPlan:
    dir: str                        # relative to the run dir unless absolute
    every_steps: int                # 0 disables periodic saves
    keep: int
    resume: str                     # "auto" | "never" | a checkpoint path
    save_on_exit: bool


@dataclass(frozen=True)
class LoraPlan:
    rank: int                       # 0 disables LoRA
    alpha: float
    dropout: float
    targets: tuple[str, ...]        # leaf module names, e.g. ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrackingPlan:
    tensorboard: bool = False       # rank 0 writes <run_dir>/tensorboard/ (needs the tensorboard package)
    wandb_project: str | None = None  # None = W&B off (needs the wandb package)
    wandb_entity: str | None = None
    wandb_name: str | None = None   # None = plan.name
    wandb_mode: str = "offline"     # "offline" (no network) | "online"
    wandb_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    version: int
    name: str
    model: ModelPlan
    mesh: MeshPlan
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
    d = asdict(plan)
    d["mesh"]["world"] = plan.mesh.world   # derived, written for readers of plan.json
    return d


def dumps(plan: Plan) -> str:
    """Deterministic JSON text (sorted keys, fixed indent, trailing newline)."""
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"


def _build(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _data_plan(d: dict[str, Any]) -> DataPlan:
    d = dict(d)
    if "format" not in d:              # plan.json of meshbake before the data redesign (runs being exported)
        d = {"format": "synthetic" if d.get("source") == "synthetic" else "text", "tokenizer": d.get("tokenizer"),
             "sources": [{"path": d["path"], "weight": 1.0}] if d.get("path") else [],
             "fields": {"text": d.get("text_field", "text")}, "vocab_size": d["vocab_size"]}
    for k in ("sources", "eval_sources"):
        d[k] = tuple(d.get(k, ()))
    return _build(DataPlan, d)


def from_dict(d: dict[str, Any]) -> Plan:
    if d.get("version") != PLAN_VERSION:
        raise ValueError(f"plan.json version {d.get('version')!r}, this runtime reads {PLAN_VERSION}")
    t = dict(d["train"])
    t["betas"] = tuple(t["betas"])
    t["mixed_precision"] = _build(MixedPrecision, t["mixed_precision"])
    lora = dict(d["lora"])
    lora["targets"] = tuple(lora["targets"])
    return Plan(
        version=d["version"],
        name=d["name"],
        model=_build(ModelPlan, d["model"]),
        mesh=_build(MeshPlan, d["mesh"]),
        tp=_build(TPPlan, d["tp"]),
        train=_build(TrainPlan, t),
        data=_data_plan(d["data"]),
        checkpoint=_build(CheckpointPlan, d["checkpoint"]),
        lora=_build(LoraPlan, lora),
        run_dir=d["run_dir"],
        max_restarts=d["max_restarts"],
        estimate=d.get("estimate", {}),
        warnings=tuple(d.get("warnings", ())),
        versions=d.get("versions", {}),
        tracking=_tracking(d.get("tracking", {})),
    )


def _tracking(d: dict[str, Any]) -> TrackingPlan:
    t = _build(TrackingPlan, d)
    return TrackingPlan(**{**asdict(t), "wandb_tags": tuple(t.wandb_tags)})


def load_plan(path: str) -> Plan:
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))
