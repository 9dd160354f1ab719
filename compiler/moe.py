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

from meshbake.compiler.errors import RecipeError
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.recipe import Recipe


def router_aux_coef(recipe: Recipe, model: ModelSpec) -> float:
    """The coefficient the runtime multiplies the aux loss by (0.0 = not added)."""
    if not model.num_experts:
        return 0.0
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
    return []


def aux_note(recipe: Recipe, model: ModelSpec) -> tuple[str, ...]:
    """PLAN.md line for MoE models: whether the aux loss is in the training loss, and why."""
    if not model.num_experts:
        return ()
    coef, c = router_aux_coef(recipe, model), model.config
    src = ("train.router_aux_loss_coef" if recipe.train.router_aux_loss_coef is not None
           else f"config.json output_router_logits {str(bool(c.get('output_router_logits'))).lower()}, as in transformers")
    if coef > 0:
        return (f"router aux loss: loss = cross-entropy + {coef:g} x load-balancing loss ({src}; transformers' "
                "formula over every rank's tokens of each micro-step)",)
    hint = c.get("router_aux_loss_coef") or 0.01
    return (f"router aux loss: off ({src}); the router trains on the cross-entropy only. To add "
            f"transformers' load-balancing loss set train.router_aux_loss_coef: {hint:g}",)
