"""Axolotl config -> commented meshbake recipe (`meshbake import axolotl CONFIG.yml -o RECIPE.yaml`).

`import_axolotl(cfg, name, ...)` is pure: it returns the recipe text and one `KeyNote` per
Axolotl key, so nothing is dropped silently. Statuses:
  mapped        same meaning in meshbake (the target key is written, with the source in a comment)
  implied       meshbake always does this; no key needed (fsdp_version: 2, auto_wrap, sdpa ...)
  approximated  written, but the run differs in a stated way (8-bit AdamW -> fp32 AdamW state)
  not mapped    no meshbake equivalent; the reason says what the run does instead
  empty         the key is present with no value (Axolotl's default applies): nothing to carry
Where Axolotl (and the HF Trainer under it) defaults differ from meshbake's, the Axolotl value is
written explicitly: AdamW betas (0.9, 0.999) not (0.9, 0.95), weight_decay 0.0 not 0.1, seed 42
not 0, lr_scheduler cosine, sequence_len 512.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml
from meshbake.runtime.roles import is_expert_target, target_name
from meshbake.runtime.safeio import printable

STATUSES = ("mapped", "implied", "approximated", "not mapped", "empty", "refused")
SECTIONS = ("name", "model", "mesh", "tp", "cluster", "train", "lora", "data", "checkpoint", "tracking", "run_dir")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class KeyNote:
    key: str            # Axolotl key, dotted for nested ones: "fsdp_config.offload_params"
    status: str         # one of STATUSES
    target: str = ""    # meshbake key(s) written for it
    reason: str = ""


@dataclass(frozen=True)
class Imported:
    name: str
    text: str                       # the recipe YAML with comments ("" when refused)
    notes: tuple[KeyNote, ...]
    refused: tuple[KeyNote, ...] = ()   # keys meshbake cannot train as written: no recipe (exit 2)

    def count(self, status: str) -> int:
        return sum(n.status == status for n in self.notes)


# ---------------------------------------------------------------------------------- tables
# Axolotl optimizer names -> how meshbake's AdamW (torch, foreach) relates to them
_ADAMW_SAME = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_apex_fused", "adamw_torch_xla",
               "adamw_torch_npu_fused"}
_ADAMW_LOWBIT = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_4bit",
                 "adamw_torch_8bit", "adamw_anyprecision", "paged_adamw"}
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}

_ATTN = "meshbake runs transformers' sdpa attention; PyTorch picks the flash kernel on GPU by itself"
_PLUGIN = ("Axolotl plugin / kernel option; meshbake computes the loss itself (vocab-parallel under tp with "
           "loss_parallel) and runs transformers' modules")
# keys with no meshbake equivalent, and what the meshbake run does instead
_NOT_MAPPED = {
    "plugins": _PLUGIN, "cut_cross_entropy": _PLUGIN, "fused_attn_kernel": _PLUGIN,
    "flex_attn_compile_kwargs": _ATTN, "s2_attention": _ATTN,
    "fp8": "float8 training is not supported; matmuls run in train.mixed_precision.param_dtype",
    "fp8_enable_fsdp_float8_all_gather": "float8 all-gather is not supported (FSDP gathers param_dtype)",
    "loss_watchdog_threshold": "no loss-threshold watchdog; meshbake stops on a non-finite loss or grad norm",
    "loss_watchdog_patience": "no loss-threshold watchdog; meshbake stops on a non-finite loss or grad norm",
    "early_stopping_patience": "no early stopping; the run trains all of train.steps or train.epochs",
    "debug": "Axolotl's data debug printout; no equivalent",
    "resize_token_embeddings_to_32x": ("embeddings are not resized; `meshbake check` reports a vocab that tp does "
                                       "not divide, with the padding fix"),
    "save_only_model": ("meshbake checkpoints always hold the optimizer state (needed to resume); "
                        "`meshbake export RUN_DIR` writes the model alone"),
    "resume_from_checkpoint": ("an HF Trainer checkpoint is not a DCP checkpoint; meshbake resumes from its own "
                               "run dir (checkpoint.resume: auto)"),
    "lora_model_dir": "loading existing adapters is not supported; adapters start at B = 0",
    "lora_modules_to_save": "modules_to_save (fully trained extra modules beside LoRA) is not supported",
    "lora_fan_in_fan_out": "adapters follow nn.Linear's (out, in) layout",
    "peft_use_dora": "DoRA is not supported (plain LoRA only)",
    "peft_use_rslora": "rsLoRA scaling is not supported (scale = alpha / rank)",
    "gptq": "quantized (GPTQ) base weights are not supported",
    "tf32": "TF32 matmul mode is not exposed; torch's default (off) applies to float32 matmuls",
    "eval_table_size": "generation-based eval is not supported; meshbake reports eval loss",
    "eval_max_new_tokens": "generation-based eval is not supported; meshbake reports eval loss",
    "eval_causal_lm_metrics": "generation-based eval is not supported; meshbake reports eval loss",
    "do_causal_lm_eval": "generation-based eval is not supported; meshbake reports eval loss",
    "include_tkps": "implied: meshbake logs tokens/s (and per device, MFU) every logged step",
    "hub_model_id": "meshbake does not push to the Hub; `meshbake export` writes a local HF folder",
    "hub_strategy": "meshbake does not push to the Hub",
    "push_to_hub": "meshbake does not push to the Hub",
    "torch_compile_backend": "meshbake compiles with the default inductor backend (train.compile)",
    "ddp_timeout": "process-group timeouts are fixed by the runtime",
    "lr_quadratic_warmup": "warmup is linear",
    "cosine_constant_lr_ratio": "no constant phase in the cosine schedule (decays to train.min_lr at the last step)",
    "lr_scheduler_kwargs": "schedule options beyond warmup and min_lr are not supported",
    "embedding_lr": "one learning rate for all parameters",
    "embedding_lr_scale": "one learning rate for all parameters",
    "lr_groups": "one learning rate for all parameters",
    "save_first_step": "no checkpoint after step 1; checkpoint.every_steps and save_on_exit decide",
    "unfrozen_parameters": "all weights train (or only the LoRA adapters)",
    "neftune_noise_alpha": "NEFTune embedding noise is not supported",
}
_KERNEL = ("a faster kernel / implementation of the same math (fused LoRA, MoE, attention, norm or loss kernels); "
           "meshbake runs transformers' modules with torch's kernels")
_LAUNCHER = "an Axolotl cloud / launcher option; meshbake renders job.sbatch and launch.sh from cluster.*"
_TRACKER = "tracker not supported (meshbake: TensorBoard and W&B, tracking.*)"
_LOADING = "how transformers loads the checkpoint; meshbake builds the model on the meta device and loads model.weights"
_EVAL_ONLY = "an evaluation-only option; training is unchanged"
# keys the sweep over Axolotl's examples met (scripts/import_sweep.py), each reviewed: nothing here
# changes the math of a run meshbake trains (objective-changing keys are refused: _objective)
_REVIEWED = {
    **dict.fromkeys(("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel", "use_kernels",
                     "use_scattermoe", "use_sonicmoe", "experts_implementation", "flash_attn_cross_entropy",
                     "flash_attn_fuse_mlp", "flash_attn_rms_norm", "flash_optimum", "use_dsv4_kernels",
                     "use_glm_dsa_kernels", "dsv4_fp4_grouped_mode", "gemma4_hybrid_attn_impl", "torch_compile_mode",
                     "expert_parallel_num_nvl_bytes", "llama4_linearized_experts"), _KERNEL),
    **dict.fromkeys(("provider", "gpu", "gpu_count", "node_count", "secrets", "volumes", "memory", "timeout",
                     "memory_preprocess", "timeout_preprocess", "use_ray", "ray_num_workers", "branch", "docker_image",
                     "spot", "project_name"), _LAUNCHER),
    **dict.fromkeys(("use_otel_metrics", "otel_metrics_host", "otel_metrics_port", "use_swanlab", "swanlab_project",
                     "swanlab_experiment_name", "swanlab_description", "swanlab_mode", "swanlab_log_completions",
                     "swanlab_completion_log_interval", "swanlab_completion_max_buffer"), _TRACKER),
    **dict.fromkeys(("device_map", "low_cpu_mem_usage", "base_model_ignore_patterns", "hf_use_auth_token",
                     "experimental_skip_move_to_device", "torch_dtype", "float16", "model_quantization_config",
                     "model_quantization_config_kwargs"), _LOADING + " (in model.dtype; trained in "
                                                                    "train.mixed_precision.param_dtype)"),
    **dict.fromkeys(("eval_batch_size", "evaluation_strategy"), _EVAL_ONLY),
    "revision_of_model": "base_model is a local folder (or already pinned with @): no Hub revision to apply",
    "use_wandb": "W&B is on when wandb_project is set (tracking.wandb)",
    "expert_parallel_token_capacity": ("meshbake's expert-parallel all-to-all sends every routed token (no capacity "
                                       "limit, no dropped tokens)"),
    "tiled_mlp": ("the MLP computed in sequence tiles to save activation memory (ALST): the same math; meshbake "
                  "computes it whole (the memory check counts it)"),
    "activation_offloading": ("activations stay on the GPU (or are recomputed: train.activation_checkpointing), not "
                              "offloaded to CPU: the same math, more GPU memory (the memory check counts it)"),
    "remove_unused_columns": "prepare reads only the fields the format needs",
    "skip_prepare_dataset": "meshbake always prepares (tokenizes and packs) the data once before training",
    "eot_tokens": ("meshbake finds the end-of-turn token by rendering the chat template (the special token after a "
                   "reply: <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, ...) and trains it with each assistant "
                   "reply; this list is not read"),
    "tokenizer_use_mistral_common": ("the mistral-common tokenizer is not used: data.tokenizer's Hugging Face files "
                                     "(tokenizer.json) tokenize, which can split a few strings differently"),
    "tokenizer_legacy": "the tokenizer folder's own legacy setting applies",
    "min_sample_len": "short records are kept (Axolotl drops records under this many tokens)",
    "max_packed_sequence_len": "packing fills train.seq_len windows",
    "ddp_find_unused_parameters": "a DDP option; meshbake shards with FSDP2",
    "ddp": "a DDP option; meshbake shards with FSDP2",
    "accelerator_config": "an HF Accelerate option; meshbake runs its own FSDP2 loop",
    "adam_eps": "not an Axolotl option (adam_epsilon is); Axolotl ignores it too",
    "context_parapllel_size": "not an Axolotl option (a misspelt context_parallel_size); Axolotl ignores it too",
    "eta_min": "not an Axolotl option (the min lr is cosine_min_lr_ratio x lr); Axolotl ignores it too",
    "peft": ("LoftQ initialization (adapters initialized from the quantization residual) is not supported: adapters "
             "start at B = 0"),
    "quantize_moe_experts": ("QLoRA's 4-bit base covers Linear layers only: MoE experts stay in model.dtype (more "
                             "memory, counted by the memory check)"),
    "bnb_config_kwargs": "meshbake's NF4 base: block 64, double-quantized scalers (bitsandbytes' nf4 with double quant)",
    "nvfp4_merge_aware": "NVFP4 base weights are not supported: the base is model.dtype or NF4 (QLoRA)",
    "full_finetune": "every weight trains unless adapter is set",
    "freeze_mm_modules": "meshbake builds the text model only: there are no vision / audio modules to freeze",
    "num_labels": "a classification head (reward models are refused)",
    "center_rewards_coefficient": "a reward-model option (reward models are refused)",
    "orpo_alpha": "an RL option (rl is refused)", "rl_beta": "an RL option (rl is refused)",
    "kto_desirable_weight": "an RL option (rl is refused)", "kto_undesirable_weight": "an RL option (rl is refused)",
    "trl": "an RL option (rl is refused)", "vllm": "RL generation server options (rl is refused)",
    "relora_prune_ratio": "a ReLoRA option (relora is refused)", "relora_cpu_offload": "a ReLoRA option",
    "relora_steps": "a ReLoRA option", "relora_warmup_steps": "a ReLoRA option",
    "jagged_restart_steps": "a ReLoRA restart schedule (relora is refused)",
    "jagged_restart_warmup_steps": "a ReLoRA restart schedule (relora is refused)",
    "jagged_restart_anneal_steps": "a ReLoRA restart schedule (relora is refused)",
    "lisa_step_interval": "a LISA option (lisa_n_layers is refused)",
    "lisa_layers_attribute": "a LISA option (lisa_n_layers is refused)",
    "eaft_alpha": "an EAFT option (use_eaft is refused)", "eaft_k": "an EAFT option (use_eaft is refused)",
    "cls_model_config": "a classification-model option; meshbake trains causal LMs",
}
_IMPLIED_TRUE = {   # key: why meshbake already behaves like `key: true`
    "flash_attention": _ATTN, "sdp_attention": _ATTN, "flex_attention": _ATTN, "xformers_attention": _ATTN,
    "auto_resume_from_checkpoints": "checkpoint.resume: auto resumes from the run dir's newest checkpoint",
    "save_safetensors": "`meshbake export` writes safetensors",
    "strict": "Axolotl's config leniency; a meshbake recipe is always validated strictly",
}
_ATTN_IMPLEMENTATIONS = {"flash_attention_2", "flash_attention_3", "sdpa", "flex_attention", "eager"}
_FSDP_IMPLIED = {   # fsdp_config keys (fsdp_ prefix stripped) meshbake's FSDP2 already does
    "auto_wrap_policy": "every decoder block is one FSDP2 unit, then the root",
    "transformer_layer_cls_to_wrap": "every decoder block is one FSDP2 unit, then the root",
    "state_dict_type": "DCP sharded checkpoints; `meshbake export` writes the full HF state dict",
    "final_state_dict_type": "DCP sharded checkpoints; `meshbake export` writes the full HF state dict",
    "cpu_ram_efficient_loading": "the model is built on the meta device and materialized sharded",
    "sync_module_states": "every rank materializes the same seeded init / loads the same weights",
    "use_orig_params": "FSDP2 keeps the original parameters (DTensors)",
    "limit_all_gathers": "FSDP2 bounds in-flight all-gathers itself",
    "backward_prefetch": "FSDP2 prefetches the next block in backward by default",
    "forward_prefetch": "FSDP2's default prefetching",
    "version": "meshbake runs FSDP2",
}


# --------------------------------------------------------------------------------- helpers
def _num(v: Any) -> Any:
    """Axolotl's pydantic turns '2e-5' (a string in YAML 1.1) into a float; so do we."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _name(stem: str) -> str:
    """A recipe name (schema: ^[A-Za-z0-9][A-Za-z0-9_.-]*$) from a file stem."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._")
    return s or "imported"


def guess_model(base_model: str | None, catalog: Sequence[str], is_dir: Callable[[str], bool],
                in_hub: Callable[[str], bool] = lambda ref: False) -> str | None:
    """base_model -> model.config: a local HF folder as is; a Hub id whose config.json the
    Hugging Face cache (or the Hub) has, as is (its real config: the catalog is a convenience, not
    a gate); else a catalog entry whose name is the hub id's basename
    ('NousResearch/Meta-Llama-3.1-8B' -> 'llama-3.1-8b'), else None."""
    if not base_model:
        return None
    if is_dir(base_model) or in_hub(base_model):
        return base_model
    base = PurePosixPath(str(base_model)).name.lower()
    # an -Instruct / -hf variant has its base model's architecture (config.json facts)
    for stem in (base, base.removesuffix("-instruct"), base.removesuffix("-hf")):
        for cand in (stem, stem.removeprefix("meta-")):
            if cand in catalog:
                return cand
    from meshbake.compiler.model import catalog_match

    return catalog_match(str(base_model), list(catalog))     # 'Mixtral-8x7B-v0.1' -> 'mixtral-8x7b'


class _Acc:
    """Values by dotted recipe path (insertion order kept) + comments + notes, built once."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Any, str]] = {}
        self.notes: list[KeyNote] = []

    def set(self, path: str, value: Any, comment: str = "") -> None:
        self.values[path] = (value, comment)

    def note(self, key: str, status: str, target: str = "", reason: str = "") -> None:
        self.notes.append(KeyNote(key, status, target, reason))


# ---------------------------------------------------------------------------- the groups
def _model(cfg: Mapping[str, Any], acc: _Acc, model_ref: str | None, lora_on: bool, bf16: bool,
           is_dir: Callable[[str], bool]) -> None:
    base = cfg.get("base_model_config") or cfg.get("base_model")
    key = "base_model_config" if cfg.get("base_model_config") else "base_model"
    if model_ref:
        acc.set("model.config", model_ref, f"{key}: {base}" if base != model_ref else key)
    else:
        acc.set("model.config", str(base or "TODO"),
                "TODO: not in meshbake's catalog: point at its config.json or HF folder (or use --model)")
    weights = cfg.get("base_model")
    if cfg.get("reinit_weights"):
        acc.set("model.weights", "random", "reinit_weights: true (random init, explicitly)")
        acc.note("reinit_weights", "mapped", "model.weights", "random: random init")
    elif weights:
        # a local folder or a Hub id: the Hub id is pinned to its commit at compile time and read from
        # the Hugging Face cache (download it first where the compute nodes have no internet)
        rev = cfg.get("revision_of_model")
        if rev and "@" not in str(weights) and not is_dir(str(weights)):
            acc.set("model.weights", f"{weights}@{rev}", "base_model @ revision_of_model")
            acc.note("revision_of_model", "mapped", "model.weights", "the Hub revision, pinned as org/name@rev")
        else:
            acc.set("model.weights", str(weights), "base_model")
    else:
        acc.set("model.weights", "random", "TODO: no base_model: random init (set the weights' folder or Hub id)")
    if "reinit_weights" in cfg and not cfg.get("reinit_weights"):
        acc.note("reinit_weights", "implied", "", "weights are loaded from model.weights")
    for k in ("base_model", "base_model_config"):
        if k not in cfg:
            continue
        if k != key:
            acc.note(k, "implied", "", f"{key} names the model")
        elif model_ref == base or (model_ref and is_dir(str(base))):
            acc.note(k, "mapped", "model.config, model.weights")
        elif model_ref:
            acc.note(k, "approximated", "model.config, model.weights",
                     f"architecture from {model_ref!r} (--model, or the catalog's match for a base_model that is "
                     "no local folder and not in the Hugging Face cache); "
                     f"model.weights {base!r} is read from the cache at run time (`hf download {base}`)")
        else:
            acc.note(k, "not mapped", "model.config",
                     f"{base!r} is not in meshbake's catalog, not a local folder and not in the Hugging Face "
                     "cache: download it (`hf download ORG/NAME config.json`), set model.config to its config.json, "
                     "or pass --model; `meshbake check` fails until then")
    dtype = "bfloat16" if lora_on and bf16 else "float32"
    acc.set("model.dtype", dtype, "frozen LoRA base in bf16, as Axolotl loads it" if dtype == "bfloat16" else
            "fp32 master weights + AdamW state, as FSDP mixed precision keeps them")
    if "model_type" in cfg:
        acc.note("model_type", "implied", "", "the architecture comes from config.json")
    for k in ("load_in_8bit", "load_in_4bit"):
        if k == "load_in_4bit" and cfg.get(k) and lora_on:
            acc.note(k, "mapped", "lora.quantize_base", "the frozen base stored 4-bit NF4 (torchao's NF4Tensor, "
                     "block 64, double-quantized scalers) as bitsandbytes' nf4 with double quantization stores it")
        elif k in cfg:
            acc.note(k, "not mapped" if cfg[k] else "implied", "",
                     "quantized base weights (bitsandbytes) are not supported; the frozen base is kept in "
                     "model.dtype" if cfg[k] else "the base is not quantized")
    if "trust_remote_code" in cfg:
        acc.note("trust_remote_code", "not mapped" if cfg["trust_remote_code"] else "implied", "",
                 "meshbake builds transformers' own class for config.json's model_type; remote code never runs")


def _world(cfg: Mapping[str, Any], nodes: int | None, gpn: int | None) -> tuple[int, int, str]:
    """(nodes, gpus_per_node, why). Axolotl takes the world size from its launcher, so it is
    the product of the parallel sizes when dp_shard_size is given, else one 8-GPU node."""
    sizes = [int(cfg.get(k) or 1) for k in ("dp_replicate_size", "context_parallel_size", "tensor_parallel_size")]
    world = sizes[0] * sizes[1] * sizes[2] * int(cfg["dp_shard_size"]) if cfg.get("dp_shard_size") else None
    if nodes and gpn:
        return nodes, gpn, "from --nodes / --gpus-per-node"
    if world is None:
        g = gpn or 8
        return nodes or 1, g, "Axolotl takes the world size from its launcher: set your allocation"
    g = gpn or (8 if world % 8 == 0 else world)
    return nodes or max(1, world // g), g, f"world {world} = product of the Axolotl parallel sizes"


def _mesh(cfg: Mapping[str, Any], acc: _Acc, nodes: int | None, gpn: int | None,
          profile: tuple[str, Mapping[str, Any]] | None = None) -> dict[str, int]:
    axes = {"dp_replicate": "dp_replicate_size", "dp_shard": "dp_shard_size", "cp": "context_parallel_size",
            "tp": "tensor_parallel_size"}
    mesh = {}
    pgpn = int(profile[1].get("gpus_per_node") or 8) if profile else None
    n, g, why = _world(cfg, nodes, gpn or pgpn)
    for ax, key in axes.items():
        v = cfg.get(key)
        mesh[ax] = int(v) if v else (-1 if ax == "dp_shard" else 1)
    rest = mesh["dp_replicate"] * mesh["cp"] * mesh["tp"]
    for ax, key in axes.items():
        v = cfg.get(key)
        value, comment = mesh[ax], key if v else "inferred from the world size" if ax == "dp_shard" else ""
        if ax == "dp_shard" and v and mesh[ax] * rest == n * g:
            # the same mesh, but a changed tp / cp (`--set mesh.tp=4`) keeps the world whole
            value, comment = -1, f"{key} {mesh[ax]} = world / the other axes: inferred, so it follows mesh.tp / cp"
        acc.set(f"mesh.{ax}", value, comment)
        if key in cfg:
            acc.note(key, "mapped", f"mesh.{ax}")
    ep = cfg.get("expert_parallel_size")
    if ep:
        acc.set("mesh.ep", int(ep), "expert_parallel_size (experts split over ep ranks of dp_shard x cp)")
    if "expert_parallel_size" in cfg:
        acc.note("expert_parallel_size", "mapped" if ep else "empty", "mesh.ep" if ep else "")
    if mesh["tp"] > 1:
        acc.set("tp.sequence_parallel", True, "meshbake's choice, no Axolotl key: norms on sequence shards")
        acc.set("tp.loss_parallel", True, "meshbake's choice: vocab-parallel cross-entropy")
    if profile:          # the profile knows the hardware; the recipe only says how many nodes
        acc.set("cluster.profile", profile[0], "clusters/<profile>.yaml: GPUs, memory, container, network")
    acc.set("cluster.nodes", n, why)
    if not profile or g != pgpn:
        acc.set("cluster.gpus_per_node", g)
    if not profile or "gpu_memory_gb" not in profile[1]:
        acc.set("cluster.gpu_memory_gb", 80, "assumed A100/H100 80GB: set yours")
    world = n * g
    dp_shard = mesh["dp_shard"] if mesh["dp_shard"] > 0 else max(1, world // max(1, mesh["dp_replicate"] * mesh["cp"]
                                                                                   * mesh["tp"]))
    mesh["dp"] = mesh["dp_replicate"] * dp_shard
    _fsdp(cfg, acc)
    return mesh


def _fsdp(cfg: Mapping[str, Any], acc: _Acc) -> None:
    if "fsdp_version" in cfg:
        v = cfg["fsdp_version"]
        acc.note("fsdp_version", "implied" if str(v) == "2" else "approximated", "",
                 "meshbake runs FSDP2" + ("" if str(v) == "2" else f" (not FSDP{v})"))
    if "fsdp" in cfg:
        opts = cfg["fsdp"] if isinstance(cfg["fsdp"], list) else str(cfg["fsdp"]).split()
        odd = [o for o in opts if o not in ("full_shard", "auto_wrap", "hybrid_shard")]
        acc.note("fsdp", "not mapped" if odd else "implied", "",
                 f"{odd} not supported (meshbake: FSDP2 full sharding per block)" if odd else
                 "FSDP2 full sharding per decoder block (hybrid = mesh.dp_replicate)")
    fc = cfg.get("fsdp_config") if isinstance(cfg.get("fsdp_config"), Mapping) else {}
    # old style: top-level fsdp_* keys beside fsdp_config
    items = [(f"fsdp_config.{k}", k, v) for k, v in fc.items()]
    items += [(k, k, v) for k, v in cfg.items() if k.startswith("fsdp_") and k not in ("fsdp_config", "fsdp_version")]
    if "fsdp_config" in cfg and not fc:
        acc.note("fsdp_config", "empty")
    for key, k, v in items:
        k = k.removeprefix("fsdp_")
        if v is None:
            acc.note(key, "empty")
        elif k in _FSDP_IMPLIED:
            acc.note(key, "implied", "", _FSDP_IMPLIED[k])
        elif k == "reshard_after_forward":
            acc.note(key, "implied" if v else "not mapped", "",
                     "meshbake reshards after forward (ZeRO-3 style)" if v else
                     "meshbake always reshards after forward (keeping gathered params is not supported)")
        elif k == "offload_params":
            acc.note(key, "not mapped" if v else "implied", "",
                     "CPU offload is not supported: parameters stay on the GPU (the memory check counts them)"
                     if v else "no offload")
        elif k == "sharding_strategy":
            ok = str(v).upper() in ("FULL_SHARD", "HYBRID_SHARD", "1", "4")
            acc.note(key, "implied" if ok else "not mapped", "",
                     "full sharding over mesh.dp_shard (HYBRID = mesh.dp_replicate)" if ok else
                     f"{v} is not supported: meshbake shards parameters, grads and optimizer state (FULL_SHARD)")
        elif k == "activation_checkpointing":
            acc.set("train.activation_checkpointing", "full" if v else "none", key)
            acc.note(key, "mapped", "train.activation_checkpointing")
        else:
            acc.note(key, "not mapped", "", "FSDP option unknown to the importer")


@dataclass(frozen=True)
class _Length:
    """The run's length as Axolotl meant it: max_steps (exact steps), else num_epochs (train.epochs:
    steps resolved from the prepared windows), else, with no data meshbake reads, a placeholder."""
    steps: int | None           # None: train.epochs (steps known after prepare)
    epochs: float               # num_epochs (Axolotl's default 1)
    known: bool                 # steps is max_steps, not the placeholder


def _steps(cfg: Mapping[str, Any], acc: _Acc) -> _Length:
    epochs = float(_num(cfg.get("num_epochs") or 1))
    if cfg.get("max_steps"):
        steps = int(cfg["max_steps"])
        acc.set("train.steps", steps, "max_steps")
        acc.note("max_steps", "mapped", "train.steps")
        if "num_epochs" in cfg:
            acc.note("num_epochs", "implied", "", "max_steps takes precedence over num_epochs in Axolotl too")
        return _Length(steps, epochs, True)
    if _datasets(cfg)[3] is not None:
        acc.set("train.epochs", int(epochs) if epochs.is_integer() else epochs,
                ("num_epochs" if "num_epochs" in cfg else "Axolotl's default num_epochs")
                + ": steps = ceil(epochs x windows / global_batch_size), from the prepared data "
                "(`meshbake prepare` prints them)")
        acc.note("num_epochs", "mapped", "train.epochs")
        return _Length(None, epochs, False)
    steps = 1000                # synthetic data (no dataset meshbake reads) has no epochs
    acc.set("train.steps", steps, f"TODO: num_epochs {epochs:g} x windows / global_batch_size, once data is set "
            "(then write train.epochs instead)")
    acc.note("num_epochs", "not mapped", "train.steps",
             "no dataset meshbake reads, so no epochs (synthetic data is endless): train.steps is a placeholder "
             "(1000, TODO)")
    return _Length(steps, epochs, False)


def _schedule(cfg: Mapping[str, Any], acc: _Acc, lr: float) -> None:
    sched = cfg.get("lr_scheduler") or "cosine"
    ours = _SCHEDULES.get(str(sched))
    acc.set("train.lr_schedule", ours or "cosine", "lr_scheduler" if "lr_scheduler" in cfg else "Axolotl's default")
    if "lr_scheduler" in cfg:
        acc.note("lr_scheduler", "mapped" if ours else "approximated", "train.lr_schedule",
                 "" if ours else f"{sched!r} is not supported: linear warmup then cosine decay instead")
    ratio = cfg.get("cosine_min_lr_ratio")
    min_lr = lr * float(ratio) if ratio is not None and ours in (None, "cosine") else 0.0
    acc.set("train.min_lr", min_lr, f"= lr x cosine_min_lr_ratio {ratio}" if ratio is not None else
            "HF schedules decay to 0")
    if ratio is not None:
        acc.note("cosine_min_lr_ratio", "mapped" if ours in (None, "cosine") else "not mapped", "train.min_lr",
                 "" if ours in (None, "cosine") else "only applies to the cosine schedule")
    ws, wr = _num(cfg.get("warmup_steps")), _num(cfg.get("warmup_ratio"))
    # HF's Trainer reads a warmup_steps below 1 as a ratio of the run (Axolotl passes it on)
    if isinstance(ws, float) and 0 < ws < 1:
        ws, wr, ratio_key = None, ws, "warmup_steps"
    else:
        ratio_key = "warmup_ratio"
    if sched == "constant":                   # HF's `constant` has no warmup at all
        acc.set("train.warmup_steps", 0, "HF's constant schedule ignores warmup")
    elif ws is not None:
        acc.set("train.warmup_steps", int(ws), "warmup_steps")
    elif wr is not None:
        acc.set("train.warmup_ratio", float(wr), f"{ratio_key}: {wr} (a share of the run's steps)")
    else:
        acc.set("train.warmup_steps", 0, "")
    for k in ("warmup_steps", "warmup_ratio"):
        if k in cfg and cfg[k] is not None:
            ignored = sched == "constant" or (k == "warmup_ratio" and ws is not None)
            as_ratio = k == ratio_key and wr is not None and not ignored
            acc.note(k, "not mapped" if ignored else "mapped", "" if ignored else
                     "train.warmup_ratio" if as_ratio else "train.warmup_steps",
                     "HF's constant schedule has no warmup" if sched == "constant" else
                     "warmup_steps takes precedence (HF Trainer)" if ignored else
                     f"{wr} < 1 is a ratio of the run in the HF Trainer" if as_ratio and k == "warmup_steps" else "")


def _optimizer(cfg: Mapping[str, Any], acc: _Acc) -> None:
    opt = str(cfg.get("optimizer") or "adamw_torch_fused")
    if "optimizer" in cfg:
        if opt in _ADAMW_SAME:
            acc.note("optimizer", "mapped", "train (AdamW)", "meshbake's AdamW (torch, foreach kernels)")
        elif opt in _ADAMW_LOWBIT:
            acc.note("optimizer", "approximated", "train (AdamW)",
                     f"{opt}: low-bit / paged optimizer state is not supported; AdamW keeps fp32 state "
                     "(8 bytes per trainable param, counted by the memory check)")
        else:
            acc.note("optimizer", "not mapped", "train (AdamW)",
                     f"{opt} is not supported: meshbake trains with AdamW")
    b1, b2 = float(_num(cfg.get("adam_beta1") or 0.9)), float(_num(cfg.get("adam_beta2") or 0.999))
    acc.set("train.betas", [b1, b2], "adam_beta1/2 (HF Trainer default 0.9, 0.999)")
    eps = float(_num(cfg.get("adam_epsilon") or 1e-8))
    acc.set("train.eps", eps, "adam_epsilon" if "adam_epsilon" in cfg else "")
    wd = float(_num(cfg.get("weight_decay") or 0.0))
    acc.set("train.weight_decay", wd, "weight_decay (Axolotl default 0.0)")
    clip = cfg.get("max_grad_norm")
    acc.set("train.grad_clip", float(_num(clip)) if clip is not None else 1.0,
            "max_grad_norm" if clip is not None else "HF Trainer default max_grad_norm 1.0")
    for k, t in (("adam_beta1", "train.betas"), ("adam_beta2", "train.betas"), ("adam_epsilon", "train.eps"),
                 ("weight_decay", "train.weight_decay"), ("max_grad_norm", "train.grad_clip")):
        if k in cfg and cfg[k] is not None:
            acc.note(k, "mapped", t)


def _precision(cfg: Mapping[str, Any], acc: _Acc) -> bool:
    bf16, fp16 = cfg.get("bf16"), cfg.get("fp16")
    if bf16 in (True, "auto", "true"):
        dt, why = "bfloat16", "bf16: " + str(bf16).lower()
    elif fp16:
        dt, why = "float16", "fp16: true"
    else:
        dt, why = "float32", "no bf16/fp16: fp32 training"
    acc.set("train.mixed_precision.param_dtype", dt, why)
    acc.set("train.mixed_precision.reduce_dtype", "float32", "gradients reduce-scattered in fp32")
    if "bf16" in cfg and cfg["bf16"] is not None:
        acc.note("bf16", "approximated" if bf16 == "auto" else "mapped", "train.mixed_precision.param_dtype",
                 "auto = bf16 where the GPU has it (A100/H100 do): written as bfloat16" if bf16 == "auto" else "")
    if "fp16" in cfg and cfg["fp16"] is not None:
        acc.note("fp16", "mapped", "train.mixed_precision.param_dtype")
    return dt == "bfloat16"


def _train(cfg: Mapping[str, Any], acc: _Acc, mesh: Mapping[str, int]) -> _Length:
    seq = int(cfg.get("sequence_len") or 512)
    acc.set("train.seq_len", seq, "sequence_len" if cfg.get("sequence_len") else "Axolotl's default sequence_len")
    mbs, ga = int(cfg.get("micro_batch_size") or 1), int(cfg.get("gradient_accumulation_steps") or 1)
    acc.set("train.micro_batch_size", mbs, "micro_batch_size")
    # only the global batch is written: grad_accum is derived (global / (micro x dp)), so a
    # changed mesh (`--set mesh.tp=2`) keeps the same optimizer batch with more accumulation
    acc.set("train.global_batch_size", mbs * ga * mesh["dp"],
            f"= micro_batch_size {mbs} x gradient_accumulation_steps {ga} x dp {mesh['dp']}; grad_accum derived")
    for k, t in (("sequence_len", "train.seq_len"), ("micro_batch_size", "train.micro_batch_size"),
                 ("gradient_accumulation_steps", "train.global_batch_size")):
        if k in cfg and cfg[k] is not None:
            acc.note(k, "mapped", t, "train.grad_accum is derived from it (not written)" if k.startswith("grad") else "")
    if cfg.get("batch_size"):
        acc.note("batch_size", "not mapped", "",
                 "deprecated in Axolotl; meshbake derives the global batch from micro_batch_size and accumulation")
    length = _steps(cfg, acc)
    lr = float(_num(cfg.get("learning_rate") or 3e-4))
    acc.set("train.lr", lr, "learning_rate")
    if "learning_rate" in cfg:
        acc.note("learning_rate", "mapped", "train.lr")
    _schedule(cfg, acc, lr)
    _optimizer(cfg, acc)
    seed = cfg.get("seed")
    acc.set("train.seed", int(seed) if seed is not None else 42,
            "seed" if seed is not None else "HF Trainer default seed")
    if seed is not None:
        acc.note("seed", "mapped", "train.seed")
    gc = cfg.get("gradient_checkpointing")
    if "gradient_checkpointing" in cfg and gc is not None:
        acc.set("train.activation_checkpointing", "full" if gc else "none", "gradient_checkpointing")
        off = gc == "offload"
        acc.note("gradient_checkpointing", "approximated" if off else "mapped", "train.activation_checkpointing",
                 "activations are recomputed, not offloaded" if off else "")
    if "gradient_checkpointing_kwargs" in cfg:
        acc.note("gradient_checkpointing_kwargs", "implied", "",
                 "meshbake's activation checkpointing is torch's non-reentrant checkpoint per block")
    if "torch_compile" in cfg and cfg["torch_compile"] is not None:
        acc.set("train.compile", bool(cfg["torch_compile"]) and cfg["torch_compile"] != "auto", "torch_compile")
        acc.note("torch_compile", "mapped", "train.compile")
    if cfg.get("logging_steps"):
        acc.set("train.log_every", int(cfg["logging_steps"]), "logging_steps")
        acc.note("logging_steps", "mapped", "train.log_every")
    return length


def _lora(cfg: Mapping[str, Any], acc: _Acc, fqns: Sequence[str] | None) -> bool:
    adapter = cfg.get("adapter")
    if not adapter:
        for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear"):
            if k in cfg and cfg[k] is not None:
                acc.note(k, "implied", "", "no adapter: full fine-tuning")
        if "adapter" in cfg:
            acc.note("adapter", "empty")
        return False
    if adapter not in ("lora", "qlora") or not cfg.get("lora_r"):
        acc.note("adapter", "not mapped", "",
                 f"adapter {adapter!r} is not supported (LoRA only)" if adapter not in ("lora", "qlora") else
                 "lora_r is missing: no LoRA rank to carry over")
        return False
    acc.note("adapter", "mapped", "lora.rank, lora.quantize_base" if adapter == "qlora" else "lora.rank",
             "QLoRA: adapters over a 4-bit NF4 base (torchao's NF4Tensor, ~0.52 byte per frozen weight); "
             "needs mesh.tp 1 and no dp_replicate" if adapter == "qlora" else "")
    acc.set("lora.rank", int(cfg["lora_r"]), "lora_r")
    if adapter == "qlora" or cfg.get("load_in_4bit"):
        acc.set("lora.quantize_base", "nf4", "adapter: qlora" if adapter == "qlora" else "load_in_4bit")
    acc.note("lora_r", "mapped", "lora.rank")
    acc.set("lora.alpha", float(_num(cfg.get("lora_alpha") or cfg["lora_r"])),
            "lora_alpha" if cfg.get("lora_alpha") else "PEFT's default alpha = r")
    if cfg.get("lora_alpha") is not None:
        acc.note("lora_alpha", "mapped", "lora.alpha")
    acc.set("lora.dropout", float(_num(cfg.get("lora_dropout") or 0.0)),
            "lora_dropout" if cfg.get("lora_dropout") is not None else "PEFT's default lora_dropout = 0")
    if cfg.get("lora_dropout") is not None:
        acc.note("lora_dropout", "mapped", "lora.dropout")
    linears = _leaves(fqns)
    mods = cfg.get("lora_target_modules") or []
    why_rx = ""
    if isinstance(mods, str) and fqns is not None:      # PEFT: a string is a regex over module names
        mods, why_rx = regex_targets(mods, fqns)[0], (f"the regex {mods!r} selects every layer's "
                                                      f"{', '.join(regex_targets(mods, fqns)[0])}")
    mods = [mods] if isinstance(mods, str) else list(mods)
    mods, why_mods = _expert_modules(mods, linears)
    params = cfg.get("lora_target_parameters") or []
    params = [params] if isinstance(params, str) else list(params)
    experts = [n for n in linears if is_expert_target("." + n)]
    # PEFT's target_parameters name the grouped experts tensors (mlp.experts.gate_up_proj): the same
    # tensors lora.targets calls experts.gate_up_proj
    ptargets = [".".join(str(p).rsplit(".", 2)[-2:]) for p in params]
    if params:
        unknown = [p for p, t in zip(params, ptargets) if fqns is not None and t not in experts]
        acc.note("lora_target_parameters", "not mapped" if unknown else "mapped", "lora.targets",
                 f"{unknown} name no grouped experts parameter of this model" if unknown else
                 "PEFT's target_parameters on the grouped experts = lora.targets experts.*")
        ptargets = [t for p, t in zip(params, ptargets) if p not in unknown]
    every, why_every = _every_linear(linears, adapter == "qlora" or bool(cfg.get("load_in_4bit")))
    targets = list(dict.fromkeys(mods + (every if cfg.get("lora_target_linear") else []) + ptargets))
    if not targets:
        targets = ["q_proj", "v_proj"]          # PEFT's default for Llama-family models
    acc.set("lora.targets", targets, f"lora_target_linear: {why_every.partition(' (')[0]}" if cfg.get("lora_target_linear")
            else "lora_target_modules" if mods else "lora_target_parameters" if ptargets
            else "PEFT's default q_proj, v_proj")
    for k in ("lora_target_modules", "lora_target_linear"):
        if k in cfg and cfg[k] is not None:
            moe = k == "lora_target_linear" and cfg[k] and why_every != _EVERY
            if k == "lora_target_modules" and why_mods:
                acc.note(k, "approximated", "lora.targets", "; ".join(w for w in (why_rx, why_mods) if w))
            else:
                acc.note(k, "mapped" if cfg[k] else "implied", "lora.targets",
                         why_every if moe else why_rx if k == "lora_target_modules" else "")
    return True


# Mixtral's per-expert Linear names (transformers < 5, the hub checkpoint keys) and its router, as
# Axolotl's Mixtral example lists them for lora_target_modules
_MIXTRAL_EXPERT_NAMES = {"w1": "experts.gate_up_proj", "w3": "experts.gate_up_proj", "w2": "experts.down_proj"}


def _expert_modules(mods: list[str], names: Sequence[str]) -> tuple[list[str], str]:
    """lora_target_modules on a grouped-experts model: Mixtral's w1 / w3 (gate / up of each expert)
    are one grouped experts.gate_up_proj here, w2 is experts.down_proj, and the router `gate` is
    no target (PEFT cannot adapt a non-Linear router either). -> (targets, reason or "")."""
    if not any(is_expert_target("." + n) for n in names) or not set(mods) & {*_MIXTRAL_EXPERT_NAMES, "gate"}:
        return mods, ""
    out = list(dict.fromkeys(_MIXTRAL_EXPERT_NAMES.get(m, m) for m in mods if m != "gate"))
    why = ("Mixtral's per-expert w1 / w3 (gate / up) are one grouped experts.gate_up_proj in transformers 5, "
           "so one adapter covers both; w2 -> experts.down_proj" if set(mods) & set(_MIXTRAL_EXPERT_NAMES) else "")
    if "gate" in mods:
        why += ("; " if why else "") + "the router (gate) is no Linear and gets no adapter (left out)"
    return out, why


_EVERY = "every Linear of the blocks"


def _every_linear(names: Sequence[str], nf4: bool) -> tuple[list[str], str]:
    """What lora_target_linear adapts: every Linear of the blocks and, on a MoE model, the grouped
    experts (experts.gate_up_proj, experts.down_proj: PEFT's target_parameters; the router is no
    Linear and no target, as in PEFT). With a 4-bit base (QLoRA) the experts are left out: the
    NF4 base is 2-D Linear weights only (compiler/placements.py refuses nf4 on experts)."""
    experts = [n for n in names if is_expert_target("." + n)]
    if not experts:
        return list(names), _EVERY
    if nf4:
        return ([n for n in names if n not in experts],
                f"every Linear of the blocks, not the MoE experts ({', '.join(experts)}: QLoRA's 4-bit NF4 base "
                "is 2-D Linear weights only, so the experts stay frozen in model.dtype; for adapters on them use "
                "adapter: lora, no 4-bit base)")
    return list(names), (f"every Linear of the blocks + the MoE experts ({', '.join(experts)}: PEFT's "
                         "target_parameters; the router is no target, as in PEFT)")


# Axolotl dataset type -> meshbake data.format. Axolotl's `completion` is raw text trained on
# every token (split into sequence_len chunks): meshbake's `text`, not its prompt/completion format.
_FORMATS = {"alpaca": "alpaca", "chat_template": "chat", "completion": "text", "pretrain": "text"}
_AXOLOTL_ROLES = {"human": "user", "gpt": "assistant"}      # Axolotl's default role aliases (ShareGPT)


def _inside(path: str) -> bool:
    """A relative path that stays in its parent (what data.prepared_dir must be)."""
    norm = PurePosixPath(posixpath.normpath(path))
    return not path.startswith("/") and (not norm.parts or norm.parts[0] != "..")


def _local(path: str, is_dir: Callable[[str], bool]) -> bool:
    """A path meshbake can read: an existing folder, an absolute/relative path, or a file name
    with a data extension; 'org/name' alone is a Hugging Face Hub dataset id."""
    return (is_dir(path) or path.startswith(("/", "./", "../", "~"))
            or path.endswith((".jsonl", ".json", ".parquet", ".csv", ".txt", ".md")))


_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}        # datasets' file builders: path: json + data_files

def _files(v: Any) -> list[str]:
    return [str(x) for x in (v if isinstance(v, list) else [v] if v else [])]


def _source(d: Mapping[str, Any], i: int, key: str, acc: _Acc, is_dir: Callable[[str], bool]) -> dict[str, Any]:
    """One Axolotl dataset -> one data.sources item: path (a local path or the Hub id) and
    data_files kept apart, the split (with its slice) and the config name carried as they are."""
    path, files = str(d.get("path")), _files(d.get("data_files"))
    if path in _BUILDERS and files:            # `path: json, data_files: x.jsonl`: the files are the data
        if len(files) == 1:
            path, files = files[0], []
        else:
            parent = posixpath.dirname(files[0])
            if all(posixpath.dirname(f) == parent for f in files) and parent:
                path, files = parent, [posixpath.basename(f) for f in files]
            else:
                acc.note(f"{key}[{i}].data_files", "approximated", f"data.sources[{i}].path",
                         f"files in different folders: only {files[0]!r} is read (one path per source)")
                path, files = files[0], []
    src: dict[str, Any] = {"path": path}
    if files:
        src["data_files"] = files
    if d.get("data_files") is not None and f"{key}[{i}].data_files" not in {n.key for n in acc.notes}:
        acc.note(f"{key}[{i}].data_files", "mapped", f"data.sources[{i}].data_files" if files else
                 f"data.sources[{i}].path")
    split = str(d.get("split") or "train")
    if split != "train":
        src["split"] = split            # train[:20%] = the first 20% in file order, as datasets slices it
    if d.get("split") is not None:
        acc.note(f"{key}[{i}].split", "mapped", f"data.sources[{i}].split")
    if d.get("name"):
        src["name"] = str(d["name"])
        acc.note(f"{key}[{i}].name", "mapped", f"data.sources[{i}].name")
    if not _local(path, is_dir):
        acc.note(f"{key}[{i}].path", "mapped", f"data.sources[{i}].path",
                 f"{path!r} is a Hub dataset id: pinned to its commit at compile time and read from the Hugging "
                 f"Face cache (`hf download --repo-type dataset {path}` where the nodes have no internet)")
    if d.get("ds_type"):
        acc.note(f"{key}[{i}].ds_type", "implied", "", "the file type comes from the file name's extension")
    return src


def _source_fields(d: Mapping[str, Any], fmt: str) -> dict[str, str]:
    """A dataset's own record field names, as data.fields keys."""
    if fmt == "text":
        f = d.get("field") or d.get("text_column")
        return {"text": str(f)} if f else {}
    if fmt != "chat":
        return {}
    mp = d.get("message_property_mappings") or {}
    fields = {"messages": d.get("field_messages"), "role": mp.get("role") or d.get("message_field_role"),
              "content": mp.get("content") or d.get("message_field_content")}
    return {k: str(v) for k, v in fields.items() if v}


_FIELD_KEYS = {"text": "field", "messages": "field_messages", "role": "message_property_mappings.role",
               "content": "message_property_mappings.content"}


def _field_notes(ds: Sequence[Mapping[str, Any]], keep: Sequence[int], fmt: str, key: str, acc: _Acc) -> None:
    """data.fields is one mapping for every source (the first dataset's): a later dataset whose
    own field names differ is noted, key by key, with what the recipe reads instead."""
    if not keep:
        return
    first = _source_fields(ds[keep[0]], fmt)
    defaults = {"text": "text", "messages": "messages", "role": "role", "content": "content"}
    for i in keep[1:]:
        mine = _source_fields(ds[i], fmt)
        for f in sorted(set(first) | set(mine)):
            theirs, ours = mine.get(f, defaults[f]), first.get(f, defaults[f])
            if theirs != ours:
                acc.note(f"{key}[{i}].{_FIELD_KEYS[f]}", "not mapped", f"data.fields.{f}",
                         f"meshbake reads one field mapping for every source: this dataset's {f} field is "
                         f"{theirs!r}, the recipe reads {ours!r} (of {key}[{keep[0]}]); rename it in the file or "
                         f"import the dataset as a recipe of its own")


def _chat_fields(d: Mapping[str, Any], acc: _Acc, key: str) -> None:
    mp = d.get("message_property_mappings") or {}
    fields = {"messages": d.get("field_messages"), "role": mp.get("role") or d.get("message_field_role"),
              "content": mp.get("content") or d.get("message_field_content")}
    for k, v in fields.items():
        if v:
            acc.set(f"data.fields.{k}", str(v), key)
    roles = dict(_AXOLOTL_ROLES)
    for ours, theirs in (d.get("roles") or {}).items():
        for t in theirs if isinstance(theirs, list) else [theirs]:
            if ours in ("system", "user", "assistant", "tool"):
                roles[str(t)] = ours
    acc.set("data.roles", roles, "Axolotl's role aliases" + (" + roles" if d.get("roles") else ""))
    rtt = d.get("roles_to_train")
    if rtt and sorted(rtt) != ["assistant"]:
        acc.note(f"{key}.roles_to_train", "approximated", "data.train_on",
                 f"{rtt}: meshbake trains on assistant replies, all tokens, or the last reply")


_DS_MAPPED = {"field": "data.fields.text", "text_column": "data.fields.text", "field_messages": "data.fields.messages",
              "message_property_mappings": "data.fields.role, data.fields.content",
              "message_field_role": "data.fields.role", "message_field_content": "data.fields.content",
              "roles": "data.roles"}


def _dataset_key_notes(ds: Sequence[Mapping[str, Any]], keep: Sequence[int], key: str, fmt: str, acc: _Acc) -> None:
    """A note for every key of every dataset item that _source and _field_notes left without one,
    so a per-dataset option that changes the data is never dropped unseen."""
    seen = {n.key for n in acc.notes}
    for i, d in enumerate(ds):
        for k, v in d.items():
            nk = f"{key}[{i}].{k}"
            if k in ("path", "type") or nk in seen:
                continue
            if i not in keep:
                acc.note(nk, "not mapped", "", f"this dataset is left out (type {d.get('type')!r}: one format per "
                         "recipe)")
            elif v is None:
                acc.note(nk, "empty")
            elif k in _DS_MAPPED and (fmt == "chat" or k in ("field", "text_column")):
                acc.note(nk, "mapped", _DS_MAPPED[k])
            elif k == "roles_to_train":
                acc.note(nk, "mapped", "data.train_on", "assistant replies are what meshbake trains (train_on: "
                         "assistant)")
            elif k == "train_on_eos":
                turn = str(v) == "turn"
                acc.note(nk, "implied" if turn else "approximated", "data.train_on",
                         "meshbake trains each assistant reply with its end-of-turn token" if turn else
                         f"train_on_eos {v!r}: meshbake trains the end-of-turn token of every trained reply (turn)")
            elif k in ("field_thinking", "template_thinking_key"):
                f, t = d.get("field_thinking") or "reasoning_content", d.get("template_thinking_key") or "reasoning_content"
                same = f == t and f in ("reasoning_content", "thinking")
                acc.note(nk, "implied" if same else "approximated", "",
                         f"meshbake passes a message's {f!r} field to the chat template under that name" if same else
                         "meshbake passes a message's reasoning_content / thinking field to the chat template under "
                         f"its own name, not {f!r} as {t!r}: rename the field in the data to {t!r}")
            elif k == "drop_system_message" and v:
                acc.note(nk, "not mapped", "", "system messages are kept (rendered by the chat template): delete them "
                         "from the data to match")
            elif k == "drop_system_message":
                acc.note(nk, "implied", "", "system messages are kept")
            else:
                acc.note(nk, "not mapped", "", "dataset option not supported by meshbake's prepare")


def _datasets(cfg: Mapping[str, Any]) -> tuple[str, list, list[str], str | None]:
    """(key, datasets with a path, their types, the meshbake format of the first or None)."""
    key = "datasets" if cfg.get("datasets") else "pretraining_dataset"
    ds = cfg.get(key) or []
    ds = [d for d in (ds if isinstance(ds, list) else [ds]) if isinstance(d, Mapping) and d.get("path")]
    types = [str(d.get("type") or ("pretrain" if key == "pretraining_dataset" else "alpaca")) for d in ds]
    # the first dataset meshbake reads sets the format (one format per recipe; the others are left out)
    fmts = [_FORMATS[t.split(":")[0]] for t in types if t.split(":")[0] in _FORMATS]
    return key, ds, types, fmts[0] if fmts else None


def _data(cfg: Mapping[str, Any], acc: _Acc, is_dir: Callable[[str], bool], length: _Length) -> None:
    """datasets / pretraining_dataset -> data.format + data.sources (local files only), with the
    field names, roles, packing, eval split and prepared dir."""
    key, ds, types, fmt = _datasets(cfg)
    if fmt:
        keep = [i for i, t in enumerate(types) if _FORMATS.get(t.split(":")[0]) == fmt]
        acc.set("data.format", fmt, f"{key}[].type: {types[keep[0]]}")
        acc.set("data.sources", [_source(ds[i], i, key, acc, is_dir) for i in keep], f"{key}[].path")
        field = ds[keep[0]].get("field") or ds[keep[0]].get("text_column")
        if fmt == "text" and field:
            acc.set("data.fields.text", str(field), f"{key}[{keep[0]}]." + ("field" if ds[keep[0]].get("field")
                                                                           else "text_column"))
        if fmt == "chat":
            _chat_fields(ds[keep[0]], acc, f"{key}[{keep[0]}]")
        _field_notes(ds, keep, fmt, key, acc)
        dropped = [f"{ds[i].get('path')} ({types[i]})" for i in range(len(ds)) if i not in keep]
        variant = ":" in types[keep[0]]
        acc.note(key, "approximated" if dropped or variant else "mapped", "data.format, data.sources",
                 (f"one format per recipe: {', '.join(dropped)} left out; " if dropped else "")
                 + (f"{types[keep[0]]}: the {types[keep[0]].split(':')[1]} prompt variant is not supported "
                    "(meshbake's alpaca prompt)" if variant else ""))
        _dataset_key_notes(ds, keep, key, fmt, acc)
    elif key in cfg:
        acc.set("data.format", "synthetic", f"TODO: {key} type {types[0] if types else '?'} has no meshbake format: "
                "until set, this trains on seeded random tokens")
        acc.note(key, "not mapped", "data.format", f"dataset type {types[0] if types else '(none)'} is not "
                 "supported (meshbake: text, completion, alpaca, chat, tokenized)")
    if fmt:
        tok = cfg.get("tokenizer_config") or cfg.get("base_model_config") or cfg.get("base_model")
        local = bool(tok) and is_dir(str(tok))
        acc.set("data.tokenizer", str(tok or "TODO"), "tokenizer_config" if cfg.get("tokenizer_config") else
                "base_model's tokenizer" + ("" if local else " (a Hub id: pinned and read from the Hugging Face cache)"))
    _data_keys(cfg, acc, fmt, length)


def _data_keys(cfg: Mapping[str, Any], acc: _Acc, fmt: str | None, length: _Length) -> None:
    def note(k: str, status: str, target: str = "", reason: str = "") -> None:
        if k in cfg:
            acc.note(k, "empty" if cfg[k] is None else status, target, reason)

    vs = cfg.get("val_set_size")
    if vs:
        frac = float(_num(vs))
        acc.set("data.eval_fraction", min(frac, 0.5), "val_set_size" + (" (a count in Axolotl)" if frac >= 1 else ""))
        note("val_set_size", "approximated" if frac > 0.5 else "mapped", "data.eval_fraction",
             "a count or a share above 0.5: written as the largest share, 0.5" if frac > 0.5 else "")
    elif "val_set_size" in cfg:
        note("val_set_size", "mapped", "data.eval_fraction", "0: no eval split")
    if cfg.get("sample_packing") is not None:
        acc.set("data.packing", bool(cfg["sample_packing"]), "sample_packing (documents never attend across)")
        note("sample_packing", "mapped", "data.packing")
    prep = cfg.get("dataset_prepared_path")
    if prep and not _inside(str(prep)):
        note("dataset_prepared_path", "not mapped", "data.prepared_dir", "meshbake keeps prepared data in a "
             "folder inside the launch directory (default prepared/): launch from the filesystem that should hold it")
    elif prep:
        acc.set("data.prepared_dir", str(prep), "dataset_prepared_path")
        note("dataset_prepared_path", "mapped", "data.prepared_dir")
    prompts = fmt in ("alpaca", "chat", "completion")      # formats with a prompt to mask
    if cfg.get("train_on_inputs") and prompts:
        acc.set("data.train_on", "all", "train_on_inputs: true")
    note("train_on_inputs", "mapped" if prompts else "implied", "data.train_on" if prompts else "",
         "" if prompts else "format text trains on every token")
    _eval_cadence(cfg, acc, bool(vs), length, note)
    note("eval_sample_packing", "implied", "", "eval windows are packed like the training windows")
    note("pad_to_sequence_len", "implied", "", "every window is seq_len tokens")
    note("tokenizer_type", "implied", "", "the tokenizer folder's own class (AutoTokenizer)")
    note("tokenizer_use_fast", "implied", "", "the tokenizer folder's fast tokenizer")
    note("tokenizer_config", "mapped", "data.tokenizer")
    note("shuffle_merged_datasets", "implied", "", "a seeded shuffle per epoch over all sources")
    note("chat_template", "approximated" if fmt == "chat" else "implied", "data.tokenizer",
         "meshbake applies the tokenizer's own chat template; Axolotl's built-in template of that name is the "
         "model family's, so keep the tokenizer of the model it names" if fmt == "chat" else "no chat format")
    for k in ("special_tokens", "tokens"):
        note(k, "not mapped", "", "tokens are not added or changed: the tokenizer folder's own (padding is masked "
             "with ignore labels, packing needs no pad token)")
    for k in ("streaming", "streaming_multipack_buffer_size"):
        note(k, "not mapped", "", "meshbake tokenizes once (meshbake prepare) into memory-mapped files; no streaming")
    for k in ("dataset_processes", "dataset_num_proc"):
        note(k, "not mapped", "", "prepare runs once, in one process, before torchrun")
    note("group_by_length", "not mapped", "", "windows are packed, not grouped by length")
    note("sample_packing_sequentially", "not mapped", "", "packing is best-fit decreasing")
    note("sample_packing_eff_est", "implied", "", "prepare reports the packing efficiency it measured")
    note("test_datasets", "not mapped", "data.eval_sources", "set data.eval_sources to the local eval files")
    rtt = cfg.get("roles_to_train")
    note("roles_to_train", "implied" if not rtt or sorted(rtt) == ["assistant"] else "approximated", "data.train_on",
         "meshbake trains assistant replies (data.train_on: assistant)" if not rtt or sorted(rtt) == ["assistant"]
         else f"{rtt}: meshbake trains assistant replies, all tokens, or the last reply")
    eos = cfg.get("train_on_eos")
    note("train_on_eos", "implied" if eos in (None, "turn") else "approximated", "data.train_on",
         "meshbake trains each assistant reply with its end-of-turn token" if eos in (None, "turn") else
         f"{eos!r}: meshbake trains the end-of-turn token of every trained reply (turn)")
    note("default_system_message", "not mapped", "", "no system message is added: the data's own, or the chat "
         "template's default")
    note("chat_template_jinja", "not mapped", "data.tokenizer", "a custom chat template is not read: meshbake renders "
         "with data.tokenizer's own template; save the tokenizer with this template (tokenizer_config.json "
         "chat_template) and set tokenizer_config to that folder")
    note("dataset_exact_deduplication", "not mapped", "", "duplicate records are kept")
    pma = cfg.get("pretrain_multipack_attn")
    note("pretrain_multipack_attn", "implied" if pma else "not mapped", "data.packing",
         "packed documents never attend across one another" if pma else
         "meshbake never lets packed documents attend across one another")


def _count(v: Any) -> int | None:
    """A positive integer count (saves_per_epoch, evals_per_epoch), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def _share_per_epoch(share: float, epochs: float) -> tuple[int, bool]:
    """A share of the run (HF's save_steps / eval_steps < 1) as a count per epoch: the run is
    `epochs` epochs, so 1 / (share x epochs) per epoch; (rounded count, whether it was whole)."""
    x = 1.0 / (share * epochs)
    n = max(1, round(x))
    return n, abs(x - n) < 1e-9


def _per_epoch(cfg: Mapping[str, Any], key: str, length: _Length) -> tuple[int, str, str] | None:
    """saves_per_epoch / evals_per_epoch with a step count (max_steps or the placeholder) ->
    (every_steps, comment, status). Axolotl turns them into a share of the run, 1 / (per_epoch x
    num_epochs), which the HF Trainer multiplies by the total steps: exact with max_steps, relative to
    the placeholder train.steps otherwise. (With num_epochs they map to the per-epoch keys as they are.)"""
    per = _count(cfg.get(key))
    if per is None or length.steps is None:
        return None
    every = max(1, round(length.steps / (per * length.epochs)))
    why = f"= train.steps {length.steps} / ({key} {per} x num_epochs {length.epochs:g})"
    if length.known:
        return every, why, "mapped"
    return every, f"TODO {why}: recompute with the real train.steps", "approximated"


def _eval_cadence(cfg: Mapping[str, Any], acc: _Acc, evals: bool, length: _Length,
                  note: Callable[..., None]) -> None:
    """eval_steps / evals_per_epoch / eval_strategy -> train.eval_every or train.evals_per_epoch
    (both need an eval split, val_set_size). With train.epochs a share of the run (eval_steps < 1)
    becomes evaluations per epoch, and evals_per_epoch is itself."""
    es, per, by_epoch = cfg.get("eval_steps"), _count(cfg.get("evals_per_epoch")), length.steps is None
    if isinstance(es, int) and es >= 1:
        acc.set("train.eval_every", es, "eval_steps")
        note("eval_steps", "mapped", "train.eval_every")
    elif isinstance(es, float) and 0 < es < 1 and evals and by_epoch:
        n, whole = _share_per_epoch(es, length.epochs)
        acc.set("train.evals_per_epoch", n, f"= 1 / (eval_steps {es} x num_epochs {length.epochs:g})"
                + ("" if whole else ", rounded"))
        note("eval_steps", "mapped" if whole else "approximated", "train.evals_per_epoch",
             "" if whole else f"a share of the run: {1 / (es * length.epochs):.3g} evaluations per epoch, rounded")
    elif isinstance(es, float) and 0 < es < 1 and evals:
        acc.set("train.eval_every", max(1, round(es * length.steps)), f"= eval_steps {es} x train.steps")
        note("eval_steps", "mapped" if length.known else "approximated", "train.eval_every",
             "" if length.known else "a share of the placeholder train.steps: recompute it")
    else:
        note("eval_steps", "not mapped", "", "no eval split (val_set_size)" if not evals else "not a step count")
    pe = _per_epoch(cfg, "evals_per_epoch", length)
    if per and evals and not es and by_epoch:
        acc.set("train.evals_per_epoch", per, "evals_per_epoch")
        note("evals_per_epoch", "mapped", "train.evals_per_epoch")
    elif pe and evals and not es:
        acc.set("train.eval_every", pe[0], pe[1])
        note("evals_per_epoch", pe[2], "train.eval_every", "" if pe[2] == "mapped" else
             "computed from the placeholder train.steps: recompute with the real step count")
    else:
        note("evals_per_epoch", "not mapped", "train.evals_per_epoch",
             "no eval split (val_set_size): nothing to evaluate" if not evals else
             "eval_steps takes precedence" if es else "not a positive count")
    strat = cfg.get("eval_strategy")
    if strat == "epoch" and evals and not (es or per) and _datasets(cfg)[3] is not None:
        acc.set("train.evals_per_epoch", 1, "eval_strategy: epoch")
    note("eval_strategy", "mapped" if strat in ("epoch", "steps") and evals else "not mapped",
         "train.evals_per_epoch" if strat == "epoch" else "train.eval_every",
         "" if strat in ("epoch", "steps") and evals else
         "no eval split (val_set_size)" if not evals else
         "meshbake evaluates at the end whenever there is an eval split" if strat == "no" else "unknown strategy")


def _checkpoint(cfg: Mapping[str, Any], acc: _Acc, length: _Length) -> None:
    """output_dir, save_* -> run_dir and the checkpoint section."""
    if cfg.get("output_dir"):
        acc.set("run_dir", str(cfg["output_dir"]).rstrip("/") or ".", "output_dir (metrics + DCP checkpoints; "
                "`meshbake export` writes the HF folder)")
        acc.note("output_dir", "mapped", "run_dir")
    save_steps, strat = cfg.get("save_steps"), cfg.get("save_strategy")
    per, by_epoch = _count(cfg.get("saves_per_epoch")), length.steps is None
    frac = isinstance(save_steps, float) and 0 < save_steps < 1
    whole = False
    if strat == "no":
        acc.set("checkpoint.every_steps", 0, "save_strategy: no (the final model is still saved)")
    elif isinstance(save_steps, int) and save_steps >= 1:
        acc.set("checkpoint.every_steps", save_steps, "save_steps")
    elif frac and by_epoch:
        n, whole = _share_per_epoch(save_steps, length.epochs)
        acc.set("checkpoint.per_epoch", n, f"= 1 / (save_steps {save_steps} x num_epochs {length.epochs:g})"
                + ("" if whole else ", rounded"))
    elif frac:
        acc.set("checkpoint.every_steps", max(1, round(save_steps * length.steps)),
                f"= save_steps {save_steps} x train.steps" + ("" if length.known else
                                                               " (TODO: recompute with the real train.steps)"))
    elif per and save_steps is None and by_epoch:
        acc.set("checkpoint.per_epoch", per, "saves_per_epoch")
    elif (pe := _per_epoch(cfg, "saves_per_epoch", length)) and save_steps is None:
        acc.set("checkpoint.every_steps", pe[0], pe[1])
    elif strat == "epoch" and _datasets(cfg)[3] is not None:
        acc.set("checkpoint.per_epoch", 1, "save_strategy: epoch")
    if save_steps is not None:
        ok = isinstance(save_steps, int) or length.known or whole
        acc.note("save_steps", "mapped" if ok else "approximated" if frac else "not mapped",
                 "checkpoint.per_epoch" if frac and by_epoch else "checkpoint.every_steps",
                 "" if ok else f"a share of the run: {1 / (save_steps * length.epochs):.3g} saves per epoch, rounded"
                 if frac and by_epoch else "a share of the placeholder train.steps: recompute it"
                 if frac else "not a step count")
    if strat is not None:
        ok = strat in ("no", "steps") or (strat == "epoch" and _datasets(cfg)[3] is not None)
        acc.note("save_strategy", "mapped" if ok else "not mapped",
                 "checkpoint.per_epoch" if strat == "epoch" else "checkpoint.every_steps",
                 "" if ok else "no dataset meshbake reads: synthetic data has no epochs" if strat == "epoch"
                 else "unknown strategy")
    if cfg.get("saves_per_epoch") is not None:
        pe = _per_epoch(cfg, "saves_per_epoch", length)
        if (per is None and pe is None) or save_steps is not None:
            acc.note("saves_per_epoch", "not mapped", "checkpoint.per_epoch",
                     "save_steps takes precedence" if save_steps is not None else "not a positive count")
        elif by_epoch:
            acc.note("saves_per_epoch", "mapped", "checkpoint.per_epoch")
        else:
            acc.note("saves_per_epoch", pe[2], "checkpoint.every_steps",
                     "" if pe[2] == "mapped" else "computed from the placeholder train.steps (no dataset meshbake "
                     "reads, so no epochs): recompute with the real step count")
    if cfg.get("save_total_limit"):
        acc.set("checkpoint.keep", int(cfg["save_total_limit"]), "save_total_limit")
        acc.note("save_total_limit", "mapped", "checkpoint.keep")


def _tracking(cfg: Mapping[str, Any], acc: _Acc) -> None:
    keys = sorted(k for k in cfg if k.startswith("wandb_") or k in ("use_tensorboard", "use_mlflow",
                                                                     "mlflow_tracking_uri", "use_comet"))
    project, mode = cfg.get("wandb_project"), str(cfg.get("wandb_mode") or "online")
    if cfg.get("use_tensorboard"):
        acc.set("tracking.tensorboard", True, "use_tensorboard (<run_dir>/tensorboard/)")
    on = bool(project) and mode != "disabled"
    if on:
        acc.set("tracking.wandb.project", str(project), "wandb_project")
        for k in ("entity", "name"):
            if cfg.get(f"wandb_{k}"):
                acc.set(f"tracking.wandb.{k}", str(cfg[f"wandb_{k}"]), f"wandb_{k}")
        acc.set("tracking.wandb.mode", "offline" if mode == "offline" else "online",
                "wandb_mode" if cfg.get("wandb_mode") else
                "Axolotl's default: online (WANDB_API_KEY via cluster.env_pass)")
    direct = {"use_tensorboard": "tracking.tensorboard", "wandb_project": "tracking.wandb.project",
              "wandb_entity": "tracking.wandb.entity", "wandb_name": "tracking.wandb.name",
              "wandb_mode": "tracking.wandb.mode"}
    for k in keys:
        v = cfg[k]
        if v is None or v is False or v == "":
            acc.note(k, "empty")
        elif k in direct and (on or k == "use_tensorboard"):
            approx = k == "wandb_mode" and mode not in ("online", "offline")
            acc.note(k, "approximated" if approx else "mapped", direct[k],
                     f"mode {mode!r} written as online" if approx else "")
        elif k == "wandb_mode" and mode == "disabled":
            acc.note(k, "mapped", "", "W&B off: no tracking.wandb section")
        elif k == "wandb_log_model":
            acc.note(k, "not mapped", "", "models are not uploaded to W&B; `meshbake export` writes the HF folder")
        elif k == "wandb_watch":
            acc.note(k, "not mapped", "", "gradient / parameter histograms are not logged (grad norm is)")
        else:
            acc.note(k, "not mapped", "", "tracker option not supported (meshbake: TensorBoard and W&B)")


def _linear_fqns(model_config: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The fqn of every Linear layer but lm_head (Axolotl's lora_target_linear targets all of
    them) and of a MoE model's grouped experts parameters (".experts.gate_up_proj"); None when
    the model is unknown."""
    if not model_config:
        return None
    from meshbake.compiler.errors import Err
    from meshbake.compiler.model import model_spec

    spec = model_spec(model_config, "import")
    return None if isinstance(spec, Err) else tuple(spec.lora_targets(None))


def _leaves(fqns: Sequence[str] | None) -> tuple[str, ...]:
    """Their lora.targets names ("q_proj", "experts.gate_up_proj"); a Llama-family list when unknown."""
    return LLAMA_LINEARS if fqns is None else tuple(dict.fromkeys(target_name(f) for f in fqns))


# how a multimodal / wrapped model names its text decoder's modules, which the text-only model
# meshbake builds calls model.layers.N...: a PEFT regex written for those names is tried on each
_REGEX_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "model.text_model.",
                   "base_model.model.model.")


def regex_targets(pattern: str, fqns: Sequence[str]) -> tuple[list[str], str]:
    """A PEFT target_modules regex (a string: re.fullmatch on every module name) -> (lora.targets
    leaf names, "" ) when it selects whole leaf groups (every layer's q_proj, ...), else ([], why):
    a regex over some layers only, or over no module of this model, cannot be said as leaf names."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        return [], f"not a regular expression ({e})"
    hit: set[str] = set()
    for f in fqns:
        rest = f.removeprefix("model.")
        names = [p + rest for p in _REGEX_PREFIXES] + [f]
        if any(rx.fullmatch(n) or rx.fullmatch(n.replace(".layers.", ".layers._checkpoint_wrapped_module.", 1))
               for n in names):
            hit.add(f)
    if not hit:
        return [], "matches no Linear layer of this model"
    leaves = list(dict.fromkeys(target_name(f) for f in fqns if f in hit))
    partial = sorted({target_name(f) for f in fqns if f not in hit and target_name(f) in leaves})
    if partial:
        return [], (f"selects {', '.join(partial)} in some layers only ({len(hit)} of "
                    f"{sum(target_name(f) in leaves for f in fqns)} modules); lora.targets adapts a leaf name in "
                    "every layer")
    return leaves, ""


# ------------------------------------------------------------------------------ entry point
def import_axolotl(cfg: Mapping[str, Any], name: str, *, source: str, model_ref: str | None,
                   model_config: Mapping[str, Any] | None = None, nodes: int | None = None,
                   gpus_per_node: int | None = None, is_dir: Callable[[str], bool] = lambda p: False,
                   profile: tuple[str, Mapping[str, Any]] | None = None) -> Imported:
    """Axolotl config dict -> Imported (recipe text + a note for every key). `model_ref` is
    the model.config to write (guess_model's answer or --model), `model_config` its config.json,
    `profile` (name, its cluster dict) a cluster profile the recipe names instead of hardware keys."""
    acc = _Acc()
    name = _name(name)
    fqns = _linear_fqns(model_config)
    refused = refusals(cfg) + _target_refusals(cfg, fqns)
    if refused:
        return Imported(name, "", refused, refused)
    acc.set("name", name, f"from {source}")
    lora_on = bool(cfg.get("adapter") in ("lora", "qlora") and cfg.get("lora_r"))
    bf16 = cfg.get("bf16") in (True, "auto", "true")
    _model(cfg, acc, model_ref, lora_on, bf16, is_dir)
    mesh = _mesh(cfg, acc, nodes, gpus_per_node, profile)
    length = _train(cfg, acc, mesh)
    _precision(cfg, acc)
    _lora(cfg, acc, fqns)
    _data(cfg, acc, is_dir, length)
    _checkpoint(cfg, acc, length)
    _tracking(cfg, acc)
    _model_config_overrides(cfg, acc, model_config)
    _rest(cfg, acc)
    notes = _complete(cfg, acc.notes)
    return Imported(name, render(acc.values, notes, source), notes)


_QUANT = ("meshbake keeps a frozen base in model.dtype or, for QLoRA, 4-bit NF4, never 8-bit; importing this as "
          "a bf16 base would silently change the run (memory per frozen param x{x}, other numerics)")


def _target_refusals(cfg: Mapping[str, Any], fqns: Sequence[str] | None) -> tuple[KeyNote, ...]:
    """A lora_target_modules regex that lora.targets cannot say (some layers only, or no module of
    the model): refused with the matched names, rather than adapters on other layers."""
    mods = cfg.get("lora_target_modules")
    if cfg.get("adapter") not in ("lora", "qlora") or not isinstance(mods, str) or fqns is None:
        return ()
    targets, why = regex_targets(mods, fqns)
    if targets:
        return ()
    return (KeyNote("lora_target_modules", "refused", "", f"the regex {mods!r} {why}; write lora_target_modules as a "
                    "list of module names (q_proj, v_proj, ...: adapted in every layer) and import again"),)


def refusals(cfg: Mapping[str, Any]) -> tuple[KeyNote, ...]:
    """Keys that make the run something meshbake does not do: 8-bit or GPTQ-quantized base weights,
    a 4-bit base without an adapter, quantization-aware training, another training objective (RL,
    reward models, diffusion), partial fine-tuning (unfrozen_parameters, LISA), an adapter other
    than LoRA, new vocabulary, images, and datasets none of which meshbake can read. Refused, not
    downgraded: an imported recipe would train something else and pass `meshbake check`. QLoRA
    (adapter: qlora / load_in_4bit with an adapter) maps to lora.quantize_base: nf4."""
    out = []
    if cfg.get("load_in_8bit"):
        out.append(KeyNote("load_in_8bit", "refused", "", "8-bit (bitsandbytes) base weights: " + _QUANT.format(x=2)
                           + "; to train a bf16 LoRA instead, set load_in_8bit: false and import again"))
    if cfg.get("load_in_4bit") and cfg.get("adapter") not in ("lora", "qlora"):
        out.append(KeyNote("load_in_4bit", "refused", "", "4-bit base weights without an adapter: meshbake "
                           "trains a 4-bit base only as QLoRA's frozen base (lora.quantize_base: nf4); set "
                           "adapter: qlora (with lora_r) or load_in_4bit: false and import again"))
    if cfg.get("gptq"):
        out.append(KeyNote("gptq", "refused", "", "GPTQ-quantized base weights are not supported"))
    if cfg.get("qat"):
        out.append(KeyNote("qat", "refused", "", "quantization-aware training (fake-quantized weights / "
                           "activations) is not supported; meshbake trains in train.mixed_precision.param_dtype"))
    out += [KeyNote(k, "refused", "", why) for k, why in _objective(cfg)]
    return tuple(out)


_SFT = "meshbake trains causal LMs with next-token cross-entropy (supervised fine-tuning / pretraining) only"


# a text decoder's parameters as transformers names them (layer 0, 1 and a deep one), and the
# multimodal wrappers' names for the same weights (Gemma-3, Mistral-3, Qwen3.5: model.language_model.*)
_TEXT_PARAMS = tuple(f"model.layers.{i}.{m}.weight" for i in (0, 1, 47) for m in
                     ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "input_layernorm")) \
    + ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def unfreezes_all(patterns: Any) -> bool:
    """Whether Axolotl's unfrozen_parameters (re.match on each parameter name; a trailing [a:b]
    row range unfreezes part of a tensor) leave every weight of the text model trainable, under
    the plain or the multimodal names: then freezing only touches towers meshbake never builds."""
    pats = [patterns] if isinstance(patterns, str) else [str(p) for p in patterns or []]
    if any(re.search(r"\[[0-9]*:[0-9]*\]$", p) for p in pats):
        return False
    try:
        rxs = [re.compile(p) for p in pats]
    except re.error:
        return False
    for names in (_TEXT_PARAMS, tuple(n.replace("model.", "model.language_model.", 1) for n in _TEXT_PARAMS)):
        if all(any(rx.match(n) for rx in rxs) for n in names):
            return True
    return False


def _objective(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, reason with a fix) for every key that changes what is trained, or on what, beyond
    what a meshbake recipe can say: importing them would silently train plain SFT instead."""
    out: list[tuple[str, str]] = []
    if cfg.get("rl"):
        out.append(("rl", f"rl: {cfg['rl']} is a preference / reinforcement objective (chosen and rejected replies, "
                    f"a reference model or rewards): {_SFT}; to train the SFT stage with meshbake, remove rl and point "
                    "datasets at SFT data (type chat_template or alpaca), and run this stage in Axolotl / TRL"))
    for k, what in (("reward_model", "a reward model (a scalar head trained on preference pairs)"),
                    ("process_reward_model", "a process reward model (a per-step classification head)"),
                    ("diffusion", "diffusion language-model training (masked-token denoising loss)"),
                    ("relora", "ReLoRA (adapters merged into the base and restarted every relora_steps)"),
                    ("lisa_n_layers", "LISA (a few randomly chosen layers unfrozen per interval)"),
                    ("ebft", "EBFT (an energy-based fine-tuning objective)"),
                    ("use_eaft", "EAFT (an entropy-weighted token loss)"),
                    ("llmcompressor", "sparse fine-tuning (llmcompressor keeps the 2:4 sparsity mask while training)"),
                    ("use_onebitllms", "1.58-bit (ternary) training of BitNet-style weights")):
        if cfg.get(k):
            out.append((k, f"{what}: {_SFT}; remove {k} to train that way, or keep this run in Axolotl"))
    if cfg.get("unfrozen_parameters") and not cfg.get("adapter") and not unfreezes_all(cfg["unfrozen_parameters"]):
        out.append(("unfrozen_parameters", f"only the parameters matching {list(cfg['unfrozen_parameters'])} train in "
                    "Axolotl; meshbake trains every weight or LoRA adapters; remove unfrozen_parameters to fine-tune "
                    "all weights, or set adapter: lora with lora_target_modules"))
    adapter = cfg.get("adapter")
    if adapter and adapter not in ("lora", "qlora"):
        out.append(("adapter", f"adapter {adapter!r} is not supported (meshbake: LoRA and QLoRA); without it the "
                    "run would be a full fine-tune: set adapter: lora (with lora_r) or remove adapter"))
    elif adapter and not cfg.get("lora_r"):
        out.append(("adapter", f"adapter: {adapter} without lora_r: no LoRA rank to carry over (and no adapter "
                    "would be a full fine-tune); set lora_r"))
    if adapter in ("lora", "qlora") and cfg.get("peft_use_dora"):
        out.append(("peft_use_dora", "DoRA (a learned magnitude vector per adapted layer beside the low-rank update) "
                    "is not supported; set peft_use_dora: false to train plain LoRA"))
    toks = cfg.get("tokens")
    if isinstance(toks, list) and toks:
        out.append(("tokens", f"{toks} are added to the vocabulary (the embeddings and lm_head grow a trained row "
                    "each where the tokenizer lacks them); meshbake never resizes embeddings: remove tokens if "
                    "data.tokenizer already has them (Axolotl adds nothing then either), or save a tokenizer and "
                    "checkpoint that have them and point base_model / tokenizer_config at those"))
    if cfg.get("processor_type"):
        out.append(("processor_type", f"processor_type {cfg['processor_type']}: a vision / audio-language run "
                    "(images or audio through the model's processor); meshbake trains text-only causal LMs: "
                    "remove processor_type (and image / audio columns) to fine-tune the language model on text"))
    key, ds, types, fmt = _datasets(cfg)
    if ds and fmt is None and not cfg.get("rl"):
        out.append((key, f"{key}[0].type {types[0]!r} has no meshbake format (meshbake reads text / completion, "
                    "alpaca, chat_template and pre-tokenized data); imported, the run would train on random tokens: "
                    "convert the data to chat_template (messages) or alpaca JSONL and import again"))
    return out


def _rest(cfg: Mapping[str, Any], acc: _Acc) -> None:
    """Every key no group handled: empty, implied, or not mapped with the reason."""
    seen = {n.key for n in acc.notes}
    for k in cfg:
        if k in seen or k.startswith("fsdp_"):
            continue
        v = cfg[k]
        if v is None or v == "" or v == [] or v == {}:
            acc.note(k, "empty")
        elif k in _IMPLIED_TRUE:
            acc.note(k, "implied" if v else "not mapped", "", _IMPLIED_TRUE[k])
        elif k == "attn_implementation":
            acc.note(k, "implied" if v in _ATTN_IMPLEMENTATIONS else "not mapped", "", _ATTN)
        elif k.startswith("liger_"):
            acc.note(k, "not mapped", "", _PLUGIN)
        elif k == "unfrozen_parameters" and unfreezes_all(v):
            acc.note(k, "implied", "", "its patterns cover every weight of the text model meshbake builds (the "
                     "vision / audio towers they leave frozen are not built)")
        elif k in _NOT_MAPPED:
            implied = _NOT_MAPPED[k].startswith("implied")
            acc.note(k, "implied" if implied else "not mapped", "", _NOT_MAPPED[k].removeprefix("implied: "))
        elif k == "deepspeed":
            acc.note(k, "approximated", "mesh.dp_shard", _deepspeed(v))
        elif k in _REVIEWED:
            acc.note(k, "not mapped", "", _REVIEWED[k])
        else:
            acc.note(k, "not mapped", "", "no meshbake equivalent known to the importer")


def _deepspeed(path: Any) -> str:
    """What a DeepSpeed config becomes: its ZeRO stage from the JSON when it is here, else from
    Axolotl's file names (deepspeed_configs/zero3_bf16_cpuoffload_params.json)."""
    import json
    from pathlib import Path

    name, stage, offload = str(path), None, "offload" in str(path)
    try:
        zo = json.loads(Path(name).read_text(encoding="utf-8")).get("zero_optimization") or {}
        stage, offload = zo.get("stage"), bool(zo.get("offload_param") or zo.get("offload_optimizer"))
    except (OSError, ValueError, AttributeError):
        m = re.search(r"zero([0-3])", name)
        stage = int(m.group(1)) if m else None
    zero = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    how = ("the same sharding of parameters, gradients and optimizer state" if stage == 3 else
           "FSDP2 also shards the parameters (ZeRO-3's layout), all-gathering each block for its forward and "
           "backward: less memory per rank, more communication" if stage in (1, 2) else
           "parameters, gradients and optimizer state sharded over the data-parallel ranks")
    return (f"{zero} is replaced by FSDP2 over mesh.dp_shard ({how}); the optimizer step and the global batch are "
            "the same data-parallel math" + ("; CPU offload is not supported: parameters and optimizer state stay on "
                                             "the GPU (the memory check counts them)" if offload else ""))


def _model_config_overrides(cfg: Mapping[str, Any], acc: _Acc, config_json: Mapping[str, Any] | None) -> None:
    """model_config (config.json overrides): output_router_logits turns on the MoE router's
    load-balancing loss, which meshbake carries as train.router_aux_loss_coef; other overrides
    are not applied (config.json is read as it is)."""
    mc = cfg.get("model_config")
    if not isinstance(mc, Mapping) or not mc:
        return
    rest = [k for k in mc if k not in ("output_router_logits", "router_aux_loss_coef")]
    coef = mc.get("router_aux_loss_coef", (config_json or {}).get("router_aux_loss_coef"))
    if mc.get("output_router_logits") and coef is not None:
        acc.set("train.router_aux_loss_coef", float(coef),
                "model_config.output_router_logits: true (coef " + ("model_config's" if "router_aux_loss_coef" in mc
                                                                    else "config.json's") + ")")
        acc.note("model_config", "approximated" if rest else "mapped", "train.router_aux_loss_coef",
                 f"the router's load-balancing loss, coef {coef}" + (f"; {rest} not applied (config.json is read as "
                                                                     "it is)" if rest else ""))
    elif mc.get("output_router_logits"):
        acc.note("model_config", "not mapped", "train.router_aux_loss_coef", "the model's config.json is unknown here: "
                 "set train.router_aux_loss_coef to its router_aux_loss_coef (Mixtral: 0.02)")
    else:
        acc.note("model_config", "not mapped", "", f"config.json overrides {list(mc)} are not applied (config.json "
                 "is read as it is)")


def _complete(cfg: Mapping[str, Any], notes: list[KeyNote]) -> tuple[KeyNote, ...]:
    """One note per top-level key (nested fsdp_config.* notes kept too), in the config's order."""
    by_key: dict[str, KeyNote] = {}
    for n in notes:
        by_key.setdefault(n.key, n)
    order = {k: i for i, k in enumerate(cfg)}
    return tuple(sorted(by_key.values(), key=lambda n: (order.get(n.key.split(".")[0], len(order)), n.key)))


# -------------------------------------------------------------------------------- rendering
def _fmt(v: Any, flow: bool = False) -> str:
    """One YAML flow value that meshbake's strict loader reads back as the same value (`flow`:
    inside [...] / {...}, where a plain 'train[:20%]' would end the collection: quoted)."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        mant, e, exp = r.partition("e")
        return f"{mant}.0e{exp}" if e and "." not in mant else r
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x, True) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_fmt(str(k), True)}: {_fmt(x, True)}" for k, x in v.items()) + "}"
    text = _yaml_str(str(v))
    if flow and not text.startswith(("'", '"')) and any(c in text for c in "[]{},"):
        text = yaml.safe_dump(str(v), width=float("inf"), default_style='"').rstrip("\n")
    return text


def _yaml_str(s: str) -> str:
    """s as one YAML scalar on one line, written by yaml.safe_dump: plain or quoted as it
    chooses, double-quoted (every line break an escape) when its choice spans lines. Nothing
    in an Axolotl value can end the line and start a key of its own."""
    text = yaml.safe_dump(s, width=float("inf")).removesuffix("\n...\n").rstrip("\n")
    if "\n" in text:
        text = yaml.safe_dump(s, width=float("inf"), default_style='"').rstrip("\n")
    return text


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\[\]-]+")


def shown(key: str) -> str:
    """An Axolotl key as the recipe's comments and the terminal list show it: as is when plain
    (dotted / indexed identifiers), else quoted with every control character escaped, so a key
    holding a newline cannot start a live line of the recipe (or move the cursor in a terminal)."""
    return key if _PLAIN_KEY.fullmatch(key) else printable(repr(key))


def note_line(n: KeyNote, reason: bool = True) -> str:
    """'key -> target: reason', one line whatever the Axolotl file held."""
    tgt = f" -> {n.target}" if n.target else ""
    why = f": {printable(n.reason)}" if n.reason and reason else ""
    return f"{shown(n.key)}{tgt}{why}"


def render(values: Mapping[str, tuple[Any, str]], notes: Sequence[KeyNote], source: str) -> str:
    tree: dict[str, Any] = {}
    for path, vc in values.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = vc
    counts = {s: sum(n.status == s for n in notes) for s in STATUSES}
    lines = [f"# imported from the Axolotl config {printable(source)} by `meshbake import axolotl`.",
             f"# {len(notes)} Axolotl keys: " + ", ".join(f"{c} {s}" for s, c in counts.items() if c) + ";",
             "# each is listed at the end with the reason. Lines marked TODO need your input.",
             "# Check the result with: meshbake check THIS_FILE"]
    for sec in SECTIONS:
        if sec in tree:
            lines += _render_node(sec, tree[sec], 0)
    lines += ["", "# ---- Axolotl keys and what became of them ----"]
    for s in STATUSES:
        for n in (n for n in notes if n.status == s):
            lines.append(f"# {s:<12} {note_line(n)}")
    return "\n".join(lines) + "\n"


def _render_node(key: str, node: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(node, dict):
        out = [f"{pad}{key}:"]
        for k, v in node.items():
            out += _render_node(k, v, depth + 1)
        return out
    value, comment = node
    line = f"{pad}{key}: {_fmt(value)}"
    return [f"{line:<34}  # {printable(comment)}" if comment else line]


__all__ = ["Imported", "KeyNote", "STATUSES", "guess_model", "import_axolotl", "note_line", "refusals", "render",
           "shown"]
