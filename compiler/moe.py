"""Mixture-of-experts choices the compiler resolves: the router's auxiliary loss and expert
parallelism (mesh.ep). Pure functions of (Recipe, ModelSpec[, MeshSpec]); the pipeline
stages call them (mesh rules from compiler/mesh.py, the coefficient from build_plan).

Router auxiliary (load-balancing) loss, as transformers 5 computes it for Mixtral and
Qwen3-MoE (`load_balancing_loss_func`): over the router logits of all L MoE layers of one
forward, N token rows each,
    f_e = (top-k slots routed to e, summed over layers) / (L N)
    P_e = (softmax probability of e, summed over layers and tokens) / (L N)
    aux = E * sum_e f_e P_e
and `loss += router_aux_loss_coef * aux` only when `output_router_logits` is true (false in
Mixtral-8x7B's and Qwen3-30B-A3B's config.json, so HF fine-tunes without it by default).
"""
from __future__ import annotations

import math

from meshbake.compiler.errors import RecipeError, reads
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.recipe import Recipe


def router_aux_coef(recipe: Recipe, model: ModelSpec) -> float:
    """The coefficient the runtime multiplies the aux loss by (0.0 = not added)."""
    if not model.num_experts or "experts_t" in model.layouts.values():
        return 0.0                    # Llama-4: transformers has no load-balancing loss for it
    given = recipe.train.router_aux_loss_coef
    if given is not None:
        return float(given)
    c = model.config
    return float(c.get("router_aux_loss_coef") or 0.0) if c.get("output_router_logits") else 0.0


def aux_errors(recipe: Recipe, model: ModelSpec) -> list[RecipeError]:
    given = recipe.train.router_aux_loss_coef
    if given and not model.num_experts:
        return [RecipeError("train.router_aux_loss_coef", f"{given}: {model.architecture} has no router "
                            "(not a mixture-of-experts model)", "remove train.router_aux_loss_coef")]
    if given and "experts_t" in model.layouts.values():
        return [RecipeError("train.router_aux_loss_coef", f"{given}: {model.architecture}'s sigmoid router has no "
                            "load-balancing loss in transformers (Llama4ForCausalLM adds none), so there is no "
                            "formula to match", "remove train.router_aux_loss_coef")]
    if given and not model.router_aux_loss:
        return [RecipeError("train.router_aux_loss_coef", f"{given}: {model.architecture} is trained without an "
                            "auxiliary load-balancing loss (transformers computes none for it; its router balances "
                            "by the e_score_correction_bias instead), so meshbake has no loss of its to add",
                            "remove train.router_aux_loss_coef")]
    return []


def aux_note(recipe: Recipe, model: ModelSpec) -> tuple[str, ...]:
    """PLAN.md line for MoE models: whether the aux loss is in the training loss, and why."""
    if not model.num_experts:
        return ()
    if "experts_t" in model.layouts.values():
        return ("router aux loss: none (transformers' Llama-4 has no load-balancing loss); the router trains on "
                "the cross-entropy only",)
    if not model.router_aux_loss:
        return (f"router aux loss: none ({model.architecture} trains aux-loss-free, as in transformers); the "
                "router's e_score_correction_bias comes from the checkpoint and is held fixed (transformers does "
                "not update it; docs/EXPERT_PARALLEL.md)",)
    coef, c = router_aux_coef(recipe, model), model.config
    src = ("train.router_aux_loss_coef" if recipe.train.router_aux_loss_coef is not None
           else f"config.json output_router_logits {str(bool(c.get('output_router_logits'))).lower()}, as in transformers")
    if coef > 0:
        return (f"router aux loss: loss = cross-entropy + {coef:g} x load-balancing loss ({src}; transformers' "
                "formula over every rank's tokens of each micro-step)",)
    hint = c.get("router_aux_loss_coef") or 0.01
    return (f"router aux loss: off ({src}); the router trains on the cross-entropy only. To add "
            f"transformers' load-balancing loss set train.router_aux_loss_coef: {hint:g}",)


@reads("mesh.ep", "train.compile")
def ep_errors(recipe: Recipe, model: ModelSpec, axes: dict[str, int]) -> list[RecipeError]:
    """mesh.ep: experts split by expert index over ep ranks carved from the flattened
    (dp_shard, cp, tp) index, tp innermost (runtime/ep.py; torchtitan's ParallelDims with etp = 1:
    an ep group is ep consecutive ranks, ep / tp coordinates of dp_shard x cp times every tp
    rank; the experts whole on each, the rest of the block tp-split). Built and parity-tested with
    dp_shard, dp_replicate, cp and tp and their composition (tests/test_ep_mesh.py); refused with
    torch.compile. Under pp the same rules, on the axes of each stage group (runtime/ep.py carves
    ep inside it; parity: tests/test_pp.py's pp 2 x dp_shard 2 x ep 2)."""
    from meshbake.compiler.mesh import divisors

    ep = recipe.mesh.ep
    if ep == 1:
        return []
    if not model.num_experts:
        return [RecipeError("mesh.ep", f"ep={ep}: {model.architecture} has no experts (not a mixture-of-experts "
                            "model)", "remove mesh.ep")]
    if not {"experts", "experts_hf", "experts_t"} & set(model.layouts.values()):
        return [RecipeError("mesh.ep", f"ep={ep}: {model.architecture}'s MoE blocks are not the plain router + "
                            "grouped experts form the expert-parallel dispatch runs", "remove mesh.ep")]
    # ep is carved from dp_shard x cp x tp (flattened, tp inner): the MoE block is token-wise, so
    # a cp rank's chunk of a sequence is dispatched exactly like a dp rank's tokens, and a tp
    # group's ranks each dispatch a disjoint 1/tp of the group's tokens (so ep spans every tp rank:
    # a multiple of tp). ep must also divide the experts (E / ep whole experts per rank).
    errs, e, ds, cp, tp = [], model.num_experts, axes["dp_shard"], axes["cp"], axes["tp"]
    n = ds * cp * tp
    ok = [d for d in divisors(math.gcd(e, n)) if d > 1 and d % tp == 0] or [1]
    carved, of = "dp_shard x cp x tp", f"dp_shard x cp x tp = {ds} x {cp} x {tp} = {n}"
    if e % ep:
        errs.append(RecipeError("mesh.ep", f"ep={ep} does not divide the {e} experts of {model.source} (each ep "
                                "rank holds num_experts / ep of them)", f"use mesh.ep in {ok}"))
    if tp > 1 and ep % tp:
        errs.append(RecipeError("mesh.ep", f"ep={ep} with tp={tp}: ep is carved from {carved} and spans every "
                                "tp rank (torchtitan's expert_tensor_parallel_degree 1: the tp ranks dispatch "
                                "disjoint 1/tp shares of the block's tokens, each expert whole on its rank); "
                                "expert-TP inside ep (experts also split over tp, etp = tp) is not built",
                                f"use mesh.ep in {ok} (a multiple of tp), or mesh.ep: 1 (experts sharded over tp)"))
    elif n % ep:
        errs.append(RecipeError("mesh.ep", f"ep={ep} does not divide {of}: ep is carved from {carved} "
                                "(ep ranks see different tokens and hold different experts; FSDP shards each "
                                f"expert over {carved} / ep)", f"use mesh.ep in {ok}, or a dp_shard x cp that ep / tp divides"
                                if tp > 1 else f"use mesh.ep in {ok}, or a dp_shard x cp that ep divides"))
    if recipe.train.compile:
        errs.append(RecipeError("train.compile", f"mesh.ep={ep}: the all-to-all dispatch has data-dependent "
                                "split sizes (a graph break per MoE layer) and is not tested under torch.compile",
                                "set train.compile: false with mesh.ep"))
    return errs
