"""plan stage: Recipe + ModelSpec + MeshSpec + Placements + Estimate -> Plan (runtime/plan.py).

The recipe sections the runtime reads unchanged (checkpoint, lora, tracking) go into the plan
as they are: they are the same generated classes. train, data and tp are extended with what
the compiler resolved (grad_accum and the master dtype; vocab_size and the options
fingerprint; sequence/loss parallel as in effect and the placements). The warnings here are
the plan's own: facts of the combination, not errors of any one stage.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from meshbake.compiler.estimate import Estimate
from meshbake.compiler.mesh import MeshSpec
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.moe import aux_note, router_aux_coef
from meshbake.compiler.placements import Placements
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import plan as P
from meshbake.runtime.sections import derive, to_dict


def _warnings(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements) -> tuple[str, ...]:
    w = list(aux_note(recipe, model)) + list(pl.warnings)
    if model.max_position_embeddings and recipe.train.seq_len > model.max_position_embeddings:
        w.append(f"train.seq_len: {recipe.train.seq_len} > max_position_embeddings "
                 f"{model.max_position_embeddings} of {model.source}")
    if (recipe.tp.sequence_parallel, recipe.tp.loss_parallel) != (mesh.sequence_parallel, mesh.loss_parallel):
        w.append("tp: sequence_parallel / loss_parallel have no effect with tp = 1 (turned off in plan.json)")
    copy = mesh.pp_enabled and recipe.pp.schedule != "ZBVZeroBubble"     # runtime/pp.py: the last stage's copy
    if model.roles.tied and mesh.tp > 1:
        w.append(f"tied embeddings: {model.roles.lm_head} uses {model.roles.embedding}.weight, "
                 + ("the first stage's table and the last stage's copy each sharded on the vocab dim"
                    if copy else "one parameter sharded on the vocab dim")
                 + f" (vocab {model.vocab_size} / tp {mesh.tp} = {model.vocab_size // mesh.tp} rows per rank)"
                 + (", their gradients summed over the pair each step" if copy else " for both uses"))
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
    if not (ck.every_steps > 0 or ck.per_epoch > 0 or ck.save_on_exit):
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


def _estimate(est: Estimate) -> dict:
    # block_gather_bytes only feeds the compile-time OOM hint; plan.json keeps the terms themselves
    d = {k: getattr(est, k) for k in est.__dataclass_fields__ if k != "block_gather_bytes"}
    if not est.pp_rank_rows:       # no pipeline: plan.json's estimate as before pp existed
        for k in ("pp_comm_bytes", "pp_peak_rank", "pp_rank_rows", "pp_buffers_bytes"):
            d.pop(k)
        if est.time is not None:
            d["time"] = {k: v for k, v in to_dict(est.time).items() if k not in ("pp_s", "bubble_s")
                         and (k != "memory_s" or v)}      # memory_s: calibrated profiles only
    d["total_bytes"] = est.total_bytes
    d["phases"] = {name: b for name, b in est.phases}
    d["peak_phase"] = est.peak_phase
    return d


def build_plan(recipe: Recipe, model: ModelSpec, mesh: MeshSpec, pl: Placements, est: Estimate,
               versions: Mapping[str, str], pp: P.PPPlan | None = None) -> P.Plan:
    c = recipe.cluster
    return P.Plan(
        version=P.PLAN_VERSION,
        name=recipe.name,
        model=P.ModelPlan(config=dict(model.config), architecture=model.architecture, source=model.source,
                          weights=None if recipe.model.weights == "random" else recipe.model.weights,
                          hub=_hub(recipe.model.config), num_params=model.num_params,
                          tie_word_embeddings=model.tie_word_embeddings, attn_implementation=model.attn_implementation,
                          layouts=dict(model.layouts), active_params=model.active_params or model.num_params,
                          roles=model.roles.with_lora(pl.lora_targets)),
        mesh=mesh.dims,
        tp=derive(P.TPPlan, recipe.tp, sequence_parallel=mesh.sequence_parallel,
                  loss_parallel=mesh.loss_parallel, placements=dict(pl.styles)),
        train=derive(P.TrainPlan, recipe.train, grad_accum=mesh.grad_accum, dtype=recipe.model.dtype,
                     router_aux_loss_coef=router_aux_coef(recipe, model)),
        data=data_plan(recipe, model.vocab_size, versions.get("meshbake", "")),
        checkpoint=recipe.checkpoint,
        lora=recipe.lora,
        run_dir=recipe.run_dir,
        max_restarts=c.max_restarts,
        estimate=_estimate(est),
        warnings=_warnings(recipe, model, mesh, pl) + _save_warning(recipe, mesh, est),
        versions=dict(versions),
        tracking=recipe.tracking,
        pp=pp,
    )


def _hub(config: str) -> dict[str, str] | None:
    """{repo, sha} when model.config is a pinned Hub id (compiler/hub.py wrote org/name@<sha>)."""
    from meshbake.runtime.hub import parse

    h = parse(config)
    return {"repo": h.repo, "sha": h.revision} if h is not None and h.pinned else None


def data_plan(recipe: Recipe, vocab_size: int, version: str) -> P.DataPlan:
    from meshbake.runtime.prepare import options_fingerprint

    d = derive(P.DataPlan, recipe.data, vocab_size=vocab_size)
    if d.format == "synthetic":
        return d
    return replace(d, fingerprint=options_fingerprint(d, recipe.train.seq_len, recipe.train.seed, version))


def versions() -> dict[str, str]:
    import torch
    import transformers
    from meshbake.compiler import __version__
    return {"meshbake": __version__, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__}
