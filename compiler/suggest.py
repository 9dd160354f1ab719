"""`meshbake suggest`: every mesh / AC / micro-batch / SP-LP choice for the recipe's cluster,
run through the compiler's own mesh, placements and estimate stages, ranked by a step-time model.

The model spec (the slow part: the meta-device build) is resolved once; each candidate is the
validated Recipe with its mesh, tp and train sections replaced, so the rules that drop a
candidate are exactly the ones `meshbake check` applies (the first error is its reason).

Step-time model, per rank per optimizer step (cluster.* facts, H100 defaults in the schema):
  compute    flops_per_token x tokens per rank / (peak_tflops x MFU_CEILING)
             tokens per rank = global_batch_size x seq_len / world (dp splits the batch, cp the
             sequence, tp the matmuls of the same tokens)
  recompute  full AC repeats the forward: + 1/3 of the compute (forward 2N of 6N); selective
             recomputes no matmul, only element-wise ops: + SELECTIVE_RECOMPUTE of it
  TP         estimate.tp_comm_bytes (x 1.5 under full AC: the forward's 2 collectives per layer
             run again) over intra_node_gbps, not overlapped (the next matmul waits for it)
  FSDP       estimate.fsdp_comm_bytes over the bandwidth of the dp_shard x cp group: NVLink when
             it lies in one node (dp_shard x cp x tp <= gpus_per_node), else the node's NICs
             shared by its GPUs (nics_per_node x inter_node_gbps / gpus_per_node); prefetch hides
             at most FSDP_OVERLAP of it and never more than the compute it overlaps:
             exposed = max((1 - FSDP_OVERLAP) x t, t - compute)
  HSDP       the gradient all-reduce across dp_replicate, 2 (r-1)/r x the gradient shard in
             reduce_dtype, once per step at the end of backward: not overlapped
  CP         ring attention passes K and V around the cp ranks, 3 x (cp-1) x tokens x 2 kv_dim
             per layer and micro-step (forward + backward twice), overlapped like FSDP
  step = compute + recompute + exposed comm; tokens/s per GPU = tokens per rank / step;
  MFU = flops_per_token x tokens/s per GPU / peak (the recompute is not useful work).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.compiler.estimate import check_memory, estimate
from meshbake.compiler.mesh import divisors, resolve_mesh
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.placements import DTYPE_BYTES, resolve_placements
from meshbake.compiler.recipe import Recipe

MFU_CEILING = 0.6            # the best sustained fraction of peak a dense bf16 step reaches on H100
FSDP_OVERLAP = 0.8           # share of FSDP/CP traffic hidden behind compute by prefetching
SELECTIVE_RECOMPUTE = 0.02   # selective AC: element-wise recompute, ~2% of the step's FLOPs
AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    recompute_s: float
    tp_s: float
    fsdp_s: float            # exposed
    hsdp_s: float
    cp_s: float              # exposed
    tokens_per_rank: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.recompute_s + self.tp_s + self.fsdp_s + self.hsdp_s + self.cp_s


@dataclass(frozen=True)
class Candidate:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    activation_checkpointing: str
    micro_batch_size: int
    sequence_parallel: bool
    loss_parallel: bool

    @property
    def label(self) -> str:
        s = f"r{self.dp_replicate} s{self.dp_shard} cp{self.cp} tp{self.tp} ac={self.activation_checkpointing} " \
            f"mbs{self.micro_batch_size}"
        return s + (f" sp={int(self.sequence_parallel)} lp={int(self.loss_parallel)}" if self.tp > 1 else "")


@dataclass(frozen=True)
class Ranked:
    cand: Candidate
    grad_accum: int
    mem_bytes: int
    budget_bytes: int
    time: StepTime
    tokens_per_s_gpu: float
    mfu: float
    lost_because: str = ""


@dataclass(frozen=True)
class Dropped:
    cand: Candidate
    path: str
    reason: str


@dataclass(frozen=True)
class Suggestion:
    ranked: tuple[Ranked, ...]          # best first
    dropped: tuple[Dropped, ...]
    world: int
    own: Candidate                      # the recipe's own choice (resolved)
    device: str = "cuda"


def candidates(recipe: Recipe) -> list[Candidate]:
    """Every (dp_replicate, dp_shard, cp, tp) with product = world, x AC x micro-batch sizes
    that keep global_batch_size exact (mbs divides gbs / dp; when dp does not divide gbs the
    recipe's own mbs stays, for the mesh stage to say why) x SP/LP on/off where tp > 1. tp runs
    over every divisor of world: the mesh stage drops the cross-node ones with its reason."""
    c, t = recipe.cluster, recipe.train
    world = c.nodes * c.gpus_per_node
    out = []
    for tp in divisors(world):
        for cp in divisors(world // tp):
            for ds in divisors(world // tp // cp):
                dr = world // tp // cp // ds
                dp = dr * ds
                mbss = divisors(t.global_batch_size // dp) if t.global_batch_size % dp == 0 else [t.micro_batch_size]
                splp = list(itertools.product((False, True), repeat=2)) if tp > 1 else [(False, False)]
                for ac, mbs, (sp, lp) in itertools.product(AC_MODES, mbss, splp):
                    out.append(Candidate(dr, ds, cp, tp, ac, mbs, sp, lp))
    return out


def with_candidate(recipe: Recipe, k: Candidate) -> Recipe:
    return replace(recipe,
                   mesh=replace(recipe.mesh, dp_replicate=k.dp_replicate, dp_shard=k.dp_shard, cp=k.cp, tp=k.tp),
                   tp=replace(recipe.tp, sequence_parallel=k.sequence_parallel, loss_parallel=k.loss_parallel),
                   train=replace(recipe.train, activation_checkpointing=k.activation_checkpointing,
                                 micro_batch_size=k.micro_batch_size, grad_accum=None))


def _group_gbps(recipe: Recipe, span: int) -> float:
    """Per-rank bandwidth of a group spanning `span` consecutive ranks (inner axes included)."""
    c = recipe.cluster
    if span <= c.gpus_per_node:
        return c.intra_node_gbps
    return c.nics_per_node * c.inter_node_gbps / c.gpus_per_node


def step_time(recipe: Recipe, model: ModelSpec, mesh, est) -> StepTime:
    c, t = recipe.cluster, recipe.train
    world = mesh.world
    tokens_per_rank = t.global_batch_size * t.seq_len / world
    compute = est.flops_per_token * tokens_per_rank / (c.peak_tflops * 1e12 * MFU_CEILING)
    ac = t.activation_checkpointing
    recompute = compute / 3 if ac == "full" else compute * SELECTIVE_RECOMPUTE if ac == "selective" else 0.0
    tp = est.tp_comm_bytes * (1.5 if ac == "full" else 1.0) / (c.intra_node_gbps * 1e9)
    fsdp_t = est.fsdp_comm_bytes / (_group_gbps(recipe, mesh.dp_shard * mesh.cp * mesh.tp) * 1e9)
    fsdp = max((1 - FSDP_OVERLAP) * fsdp_t, fsdp_t - compute)
    r = mesh.dp_replicate
    grad_shard = est.grads_bytes * DTYPE_BYTES[t.mixed_precision.reduce_dtype] / DTYPE_BYTES[recipe.model.dtype]
    hsdp = 2 * (r - 1) / r * grad_shard / (_group_gbps(recipe, world) * 1e9) if r > 1 else 0.0
    cp_t = 0.0
    if mesh.cp > 1:
        kv_dim = model.num_kv_heads * model.head_dim
        tokens = t.micro_batch_size * t.seq_len // mesh.cp
        cp_bytes = 3 * (mesh.cp - 1) * model.num_layers * mesh.grad_accum * tokens * 2 * kv_dim * \
            DTYPE_BYTES[t.mixed_precision.param_dtype]
        cp_t = cp_bytes / (_group_gbps(recipe, mesh.cp * mesh.tp) * 1e9)
    cp = max((1 - FSDP_OVERLAP) * cp_t, cp_t - compute)
    return StepTime(compute, recompute, tp, fsdp, hsdp, cp, tokens_per_rank)


_TERMS = {"recompute_s": "recompute", "tp_s": "more exposed TP traffic", "fsdp_s": "more exposed FSDP traffic",
          "hsdp_s": "HSDP all-reduce across replicas", "cp_s": "more exposed CP traffic",
          "compute_s": "more compute per rank"}


def lost_because(best: StepTime, other: StepTime) -> str:
    """The step-time term that grew most against the winner, with its size ("" for a tie)."""
    diffs = {k: getattr(other, k) - getattr(best, k) for k in _TERMS}
    k = max(diffs, key=lambda k: diffs[k])
    if diffs[k] <= 1e-9:
        return ""
    if k == "recompute_s":
        return f"recompute costs {other.recompute_s / other.compute_s:.0%}"
    return f"{_TERMS[k]} +{diffs[k] * 1e3:.0f} ms"


def _short(e: RecipeError, n: int = 160) -> str:
    return e.message if len(e.message) <= n else e.message[:n - 3] + "..."


def suggest(recipe: Recipe, model: ModelSpec) -> Suggestion:
    ok: list[tuple[Candidate, Any, Any, StepTime]] = []
    dropped = []
    # placements read only tp, whether cp > 1, SP/LP and the recipe's fixed sections (tp.plan,
    # seq_len, model): one resolve per key instead of per candidate (60 ms each for 80 layers)
    placements: dict[tuple[int, bool, bool, bool], Any] = {}
    for k in candidates(recipe):
        r = with_candidate(recipe, k)
        mesh = resolve_mesh(r, model)
        if not isinstance(mesh, Err):
            key = (k.tp, k.cp > 1, k.sequence_parallel, k.loss_parallel)
            if key not in placements:
                placements[key] = resolve_placements(r, model, mesh)
            pl = placements[key]
            est = pl if isinstance(pl, Err) else check_memory(estimate(r, model, mesh, pl), r, mesh)
        res = mesh if isinstance(mesh, Err) else est
        if isinstance(res, Err):
            e = res.errors[0]
            dropped.append(Dropped(k, e.path, _short(e)))
            continue
        ok.append((k, mesh, res, step_time(r, model, mesh, res)))
    # best first; ties (CP or SP/LP often cost nothing in this model) go to less memory per rank
    ok.sort(key=lambda x: (x[3].step_s, x[2].total_bytes))
    best = ok[0][3] if ok else None
    c = recipe.cluster
    ranked = tuple(
        Ranked(k, mesh.grad_accum, est.total_bytes, est.budget_bytes, st, st.tokens_per_rank / st.step_s,
               est.flops_per_token * st.tokens_per_rank / st.step_s / (c.peak_tflops * 1e12),
               "" if i == 0 else lost_because(best, st) or
               ("same speed, more memory" if est.total_bytes > ok[0][2].total_bytes else "ties the best"))
        for i, (k, mesh, est, st) in enumerate(ok))
    own_mesh = resolve_mesh(recipe, model)
    m = own_mesh if not isinstance(own_mesh, Err) else recipe.mesh
    own = Candidate(m.dp_replicate, m.dp_shard, m.cp, m.tp, recipe.train.activation_checkpointing,
                    recipe.train.micro_batch_size, recipe.tp.sequence_parallel and m.tp > 1,
                    recipe.tp.loss_parallel and m.tp > 1)
    return Suggestion(ranked, tuple(dropped), c.nodes * c.gpus_per_node, own, c.device)


def suggest_dict(d: Mapping[str, Any]) -> Result[Suggestion]:
    """Recipe dict -> Suggestion; validation errors (and a model config that does not load) as Err."""
    from meshbake.compiler import load
    from meshbake.compiler import validate as validate_mod
    from meshbake.compiler.model import model_spec

    recipe, errs = validate_mod.validate_all(dict(d))
    if recipe is None or errs:
        return Err(tuple(errs))
    cfg = load.read_model_config(recipe.model.config)
    if isinstance(cfg, Err):
        return cfg
    model = model_spec(cfg, recipe.model.config)
    if isinstance(model, Err):
        return model
    return suggest(recipe, model)


def to_json(s: Suggestion) -> dict[str, Any]:
    def cand(k: Candidate) -> dict[str, Any]:
        return dict(vars(k))
    return {
        "world": s.world,
        "own": cand(s.own),
        "model": {"mfu_ceiling": MFU_CEILING, "fsdp_overlap": FSDP_OVERLAP,
                  "selective_recompute": SELECTIVE_RECOMPUTE},
        "ranked": [{**cand(r.cand), "grad_accum": r.grad_accum, "mem_bytes": r.mem_bytes,
                    "budget_bytes": r.budget_bytes, "tokens_per_s_gpu": round(r.tokens_per_s_gpu, 3),
                    "mfu": round(r.mfu, 4), "step_s": round(r.time.step_s, 6),
                    "terms_s": {k: round(getattr(r.time, k), 6) for k in _TERMS},
                    "lost_because": r.lost_because} for r in s.ranked],
        "dropped": [{**cand(x.cand), "path": x.path, "reason": x.reason} for x in s.dropped],
    }
