"""The whole pipeline as one function: recipe dict -> Plan -> Bundle {path: bytes}.

load -> validate -> model -> mesh -> placements -> estimate -> plan -> render. Each stage
returns its value or Err; the first stage that fails stops the pipeline (later stages need
its value), but every stage reports all of its own errors at once.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.compiler.estimate import Estimate, check_memory, estimate
from meshbake.compiler.mesh import MeshSpec, resolve_mesh
from meshbake.compiler.model import ModelSpec, model_spec
from meshbake.compiler.moe import router_aux_coef
from meshbake.compiler.placements import Placements, resolve_placements
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import plan as P


@dataclass(frozen=True)
class Resolved:
    recipe: Recipe
    model: ModelSpec
    mesh: MeshSpec
    placements: Placements
    estimate: Estimate
    plan: P.Plan


@dataclass(frozen=True)
class Bundle:
    resolved: Resolved
    files: Mapping[str, bytes]     # relative path -> content, sorted


def _warnings(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> tuple[str, ...]:
    from meshbake.compiler.moe import aux_note

    w = list(aux_note(recipe, model)) + list(pl.warnings)
    if model.max_position_embeddings and recipe.train.seq_len > model.max_position_embeddings:
        w.append(f"train.seq_len: {recipe.train.seq_len} > max_position_embeddings "
                 f"{model.max_position_embeddings} of {model.source}")
    if mesh.tp == 1 and (recipe.tp.sequence_parallel or recipe.tp.loss_parallel):
        w.append("tp: sequence_parallel / loss_parallel have no effect with tp = 1 (turned off in plan.json)")
    if model.tie_word_embeddings and mesh.tp > 1:
        w.append(f"tied embeddings: lm_head uses {model.block_prefix.rsplit('.', 1)[0]}.embed_tokens.weight, "
                 f"one parameter sharded on the vocab dim (vocab {model.vocab_size} / tp {mesh.tp} = "
                 f"{model.vocab_size // mesh.tp} rows per rank) for both uses")
    return tuple(w)


# Assumptions for the save-time risk (not facts of any cluster; stated in the warning itself):
# Slurm's default KillWait (slurm.conf) is 30 s between SIGTERM and SIGKILL; a node writes a
# checkpoint to a parallel filesystem at ~2 GB/s; sha256 runs at ~1.5 GB/s per core (SHA-NI).
KILL_WAIT_S, WRITE_GBPS_PER_NODE, SHA256_GBPS = 30, 2.0, 1.5


def _save_warning(recipe: Recipe, mesh: MeshSpec, est: Estimate) -> tuple[str, ...]:
    """A save that outlasts KillWait is SIGKILLed on preemption/scancel (SIGTERM to every
    process, then SIGKILL KillWait later): its step is lost and the run resumes from the one
    before. recipes/70b_fsdp_tp: params + AdamW 26.5 GB per rank x 8 per node = 212 GB per node
    / 2 GB/s = 106 s, + 26.5 GB / 1.5 GB/s = 18 s of hashing: ~123 s > 30 s."""
    ck = recipe.checkpoint
    if not (ck.every_steps > 0 or ck.save_on_exit):
        return ()
    per_rank = est.params_bytes + est.optimizer_bytes          # what DCP writes per rank
    save_s = per_rank * mesh.procs_per_node / (WRITE_GBPS_PER_NODE * 1e9) + per_rank / (SHA256_GBPS * 1e9)
    if save_s <= KILL_WAIT_S:
        return ()
    limit = recipe.cluster.signal_seconds + KILL_WAIT_S
    return (f"checkpoint save ~{save_s:.0f} s ({per_rank / 1e9:.1f} GB per rank x {mesh.procs_per_node} per node, "
            f"assuming {WRITE_GBPS_PER_NODE:g} GB/s per node and sha256 at {SHA256_GBPS:g} GB/s) outlasts Slurm's "
            f"KillWait (assumed default {KILL_WAIT_S} s): a preemption or scancel (SIGTERM) SIGKILLs it and the "
            f"run resumes from the checkpoint before; the time limit (USR1 at cluster.signal_seconds "
            f"{recipe.cluster.signal_seconds} + KillWait = {limit} s) "
            + ("leaves room for it" if save_s <= limit else "does not leave room for it either: raise signal_seconds"),)


def build_plan(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements, est: Estimate,
               versions: Mapping[str, str]) -> P.Plan:
    t, c, tpon = recipe.train, recipe.cluster, mesh.tp > 1
    # block_gather_bytes only feeds the compile-time OOM hint; plan.json keeps the terms themselves
    est_d = {k: getattr(est, k) for k in est.__dataclass_fields__ if k != "block_gather_bytes"}
    est_d["total_bytes"] = est.total_bytes
    est_d["phases"] = {name: b for name, b in est.phases}
    est_d["peak_phase"] = est.peak_phase
    return P.Plan(
        version=P.PLAN_VERSION,
        name=recipe.name,
        model=P.ModelPlan(dict(model.config), model.architecture, model.source, recipe.model.weights,
                          model.num_params, model.tie_word_embeddings, model.attn_implementation,
                          dict(model.layouts), model.active_params or model.num_params),
        mesh=P.MeshPlan(mesh.dp_replicate, mesh.dp_shard, mesh.cp, mesh.tp, mesh.nodes, mesh.procs_per_node,
                        c.device, "nccl" if c.device == "cuda" else "gloo", mesh.ep),
        tp=P.TPPlan(recipe.tp.sequence_parallel and tpon, recipe.tp.loss_parallel and tpon, dict(pl.styles)),
        train=P.TrainPlan(
            seq_len=t.seq_len, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
            grad_accum=mesh.grad_accum, steps=t.steps, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
            lr_schedule=t.lr_schedule, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps,
            grad_clip=t.grad_clip, seed=t.seed, dtype=recipe.model.dtype,
            mixed_precision=P.MixedPrecision(t.mixed_precision.param_dtype, t.mixed_precision.reduce_dtype),
            activation_checkpointing=t.activation_checkpointing, compile=t.compile, log_every=t.log_every,
            grad_sync=t.grad_sync, eval_every=t.eval_every, router_aux_loss_coef=router_aux_coef(recipe, model)),
        data=data_plan(recipe, model.vocab_size, versions.get("meshbake", "")),
        checkpoint=P.CheckpointPlan(recipe.checkpoint.dir, recipe.checkpoint.every_steps, recipe.checkpoint.keep,
                                    recipe.checkpoint.resume, recipe.checkpoint.save_on_exit),
        lora=P.LoraPlan(recipe.lora.rank, recipe.lora.alpha, recipe.lora.dropout, tuple(recipe.lora.targets)),
        run_dir=recipe.run_dir,
        max_restarts=c.max_restarts,
        estimate=est_d,
        warnings=_warnings(recipe, model, mesh, pl) + _save_warning(recipe, mesh, est),
        versions=dict(versions),
        tracking=P.TrackingPlan(**vars(recipe.tracking)),
    )


def data_plan(recipe: Recipe, vocab_size: int, version: str) -> P.DataPlan:
    from meshbake.runtime.prepare import options_fingerprint

    da = recipe.data
    d = P.DataPlan(da.format, tuple(dict(s) for s in da.sources), da.tokenizer, dict(da.fields), vocab_size,
                   dict(da.roles), da.train_on, da.packing, da.overlong, da.eval_fraction,
                   tuple(dict(s) for s in da.eval_sources), da.prepared_dir)
    if d.format == "synthetic":
        return d
    return replace(d, fingerprint=options_fingerprint(d, recipe.train.seq_len, recipe.train.seed, version))


def versions() -> dict[str, str]:
    import torch
    import transformers
    from meshbake.compiler import __version__
    return {"meshbake": __version__, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__}


def resolve(recipe: Recipe, model_config: Mapping[str, Any], source: str) -> Result[Resolved]:
    model = model_spec(model_config, source)
    if isinstance(model, Err):
        return model
    mesh = resolve_mesh(recipe, model)
    if isinstance(mesh, Err):
        return mesh
    pl = resolve_placements(recipe, model, mesh)
    if isinstance(pl, Err):
        return pl
    est = check_memory(estimate(recipe, model, mesh, pl), recipe, mesh)
    if isinstance(est, Err):
        return est
    return Resolved(recipe, model, mesh, pl, est, build_plan(recipe, model, mesh, pl, est, versions()))


def resolve_dict(d: Mapping[str, Any]) -> Result[Resolved]:
    """Validated-or-not recipe dict -> Resolved (reads the model config.json / catalog)."""
    from meshbake.compiler import load
    from meshbake.compiler import validate as validate_mod

    recipe, errs = validate_mod.validate_all(dict(d))
    if recipe is None:
        return Err(tuple(errs))
    cfg = load.read_model_config(recipe.model.config)
    if not isinstance(cfg, Err):
        errs = tuple(errs) + load.tokenizer_errors(recipe.data.format, recipe.data.tokenizer, cfg)
    res = cfg if isinstance(cfg, Err) else resolve(recipe, cfg, recipe.model.config)
    if isinstance(res, Err):
        return Err(tuple(errs) + res.errors)
    return Err(tuple(errs)) if errs else res


def compile_recipe(text: str, overrides: tuple[str, ...] = (), cluster: str | None = None,
                   source: str = "<recipe>") -> Result[Bundle]:
    """Recipe text -> Bundle, without writing anything (tests call this)."""
    from meshbake.compiler.render import render_bundle

    res = resolve_text(text, overrides, cluster, source)
    if isinstance(res, Err):
        return res
    return Bundle(res, render_bundle(res))


def resolve_text(text: str, overrides: tuple[str, ...] = (), cluster: str | None = None,
                 source: str = "<recipe>") -> Result[Resolved]:
    """Recipe text -> Resolved or Err (no rendering)."""
    from meshbake.compiler import load

    d = load.recipe_from_text(text, source, tuple(overrides), cluster)
    return d if isinstance(d, Err) else resolve_dict(d)


__all__ = ["Bundle", "Resolved", "RecipeError", "compile_recipe", "resolve", "resolve_dict", "resolve_text", "build_plan"]
