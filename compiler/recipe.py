"""The validated recipe as frozen dataclasses (defaults applied, nothing resolved yet).

Built by `validate.validate()` from the loaded dict once it passed the JSON Schema;
every later stage reads these, never the raw dict.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSection:
    config: str                         # catalog name | path/to/config.json | HF folder
    weights: str | None                 # HF folder with safetensors, None = random init
    dtype: str                          # master weights + optimizer state: float32 | bfloat16


@dataclass(frozen=True)
class MeshSection:
    dp_replicate: int                   # -1 = infer from world size (at most one -1)
    dp_shard: int
    cp: int
    tp: int
    allow_cross_node_tp: bool
    ep: int = 1                         # expert parallel, carved from dp_shard x cp (MoE only)


@dataclass(frozen=True)
class TPSection:
    sequence_parallel: bool
    loss_parallel: bool
    plan: str | Mapping[str, str]       # "auto" or {fqn glob pattern: style} applied over auto


@dataclass(frozen=True)
class ClusterSection:
    profile: str | None                 # clusters/<profile>.yaml it came from, if any
    nodes: int
    gpus_per_node: int                  # = processes per node (CPU processes when device=cpu)
    gpu_memory_gb: float
    device: str                         # cuda | cpu
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    time: str                           # Slurm time limit "HH:MM:SS" or "D-HH:MM:SS"
    cpus_per_task: int
    mem: str | None                     # Slurm --mem, e.g. "0" (all) or "480G"
    env_setup: str | None               # shell line run before torchrun, e.g. "source /opt/venv/bin/activate"
    env_pass: tuple[str, ...]           # env var NAMES forwarded to the job (HF_TOKEN, WANDB_API_KEY)
    max_restarts: int                   # torchrun --max-restarts
    signal_seconds: int                 # SIGUSR1 this long before the time limit (checkpoint + requeue)
    requeue: bool
    gpu_request: str = "gpus-per-node"  # gpus-per-node | gres | none: the #SBATCH spelling of the GPUs
    gpu_type: str | None = None         # gpu:TYPE:N
    exclusive: bool = False             # #SBATCH --exclusive
    container_image: str | None = None  # pyxis/enroot: srun --container-image
    container_mounts: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()   # (NAME, value) exported before srun, sorted by name
    # step-time model of `meshbake suggest` (H100 SXM defaults; see the schema descriptions)
    peak_tflops: float = 989.0          # dense bf16 TFLOP/s per GPU
    hbm_gbps: float = 3350.0            # HBM GB/s per GPU
    intra_node_gbps: float = 450.0      # NVLink GB/s per direction per GPU
    inter_node_gbps: float = 50.0       # GB/s per NIC (400 Gb/s)
    nics_per_node: int = 8


@dataclass(frozen=True)
class MixedPrecisionSection:
    param_dtype: str
    reduce_dtype: str


@dataclass(frozen=True)
class TrainSection:
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int | None              # None = derived; if given it must agree
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    lr_schedule: str                    # cosine | linear | constant
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float
    seed: int
    mixed_precision: MixedPrecisionSection
    activation_checkpointing: str       # none | full | selective
    compile: bool
    log_every: int
    grad_sync: str = "every_micro_step"  # every_micro_step | last_micro_step (FSDP + grad_accum > 1)
    eval_every: int = 0                 # 0: eval only at the end (when there is an eval split)
    router_aux_loss_coef: float | None = None   # MoE load-balancing loss; None = as config.json (HF)


@dataclass(frozen=True)
class DataSection:
    format: str                         # synthetic | text | completion | alpaca | chat | tokenized
    sources: tuple[Mapping[str, object], ...]   # ({"path", "weight"}, ...); data.path is one source
    tokenizer: str | None
    fields: Mapping[str, str]
    roles: Mapping[str, str]
    train_on: str                       # assistant | all | last_turn
    packing: bool
    overlong: str                       # split | truncate | drop (auto resolved by format)
    eval_fraction: float
    eval_sources: tuple[Mapping[str, object], ...]
    prepared_dir: str


@dataclass(frozen=True)
class CheckpointSection:
    dir: str
    every_steps: int
    keep: int
    resume: str                         # auto | never | path
    save_on_exit: bool


@dataclass(frozen=True)
class LoraSection:
    rank: int                           # 0 = off
    alpha: float
    dropout: float
    targets: tuple[str, ...]


@dataclass(frozen=True)
class TrackingSection:
    tensorboard: bool = False           # <run_dir>/tensorboard/ event files
    wandb_project: str | None = None    # None = W&B off
    wandb_entity: str | None = None
    wandb_name: str | None = None       # None = the recipe name
    wandb_mode: str = "offline"         # offline | online
    wandb_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSection
    mesh: MeshSection
    tp: TPSection
    cluster: ClusterSection
    train: TrainSection
    data: DataSection
    checkpoint: CheckpointSection
    lora: LoraSection
    run_dir: str                        # relative to the launch directory
    tracking: TrackingSection = TrackingSection()
