"""`meshbake suggest`: every mesh / AC / micro-batch / SP-LP choice for the recipe's cluster,
run through the compiler's own mesh, placements and estimate stages, ranked by a step-time model.

The model spec (the slow part: the meta-device build) is resolved once; each candidate is the
validated Recipe with its mesh, tp and train sections replaced, so the rules that drop a
candidate are exactly the ones `meshbake check` applies (the first error is its reason).

The step-time model is the estimate stage's (compiler/estimate.step_time: compute from FLOPs,
exposed communication per axis from the exact traffic rows, the optimizer's HBM passes), so a
candidate's time here is the one its PLAN.md shows.

Pipeline parallelism (mesh.pp, see pp_sizes / pp_schedules / candidates): a pp candidate also goes
through compiler/pp.resolve_pp (the rules `meshbake check` applies), and its step time carries the
bubble and the stage sends, its memory is the peak pp rank's.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshbake.compiler import estimate as E
from meshbake.compiler import memo, perf
from meshbake.compiler.errors import Err, RecipeError, Result
from meshbake.compiler.estimate import FSDP_OVERLAP, MFU_CEILING, SELECTIVE_RECOMPUTE, StepTime, check_memory, estimate
from meshbake.compiler.memo import evolve
from meshbake.compiler.mesh import divisors, resolve_mesh
from meshbake.compiler.model import ModelSpec
from meshbake.compiler.placements import resolve_placements
from meshbake.compiler.pp import resolve_pp
from meshbake.compiler.recipe import Recipe
from meshbake.runtime.dims import tp_flags

AC_MODES = ("none", "selective", "full")
__all__ = ["FSDP_OVERLAP", "MFU_CEILING", "SELECTIVE_RECOMPUTE", "StepTime", "step_time", "suggest", "suggest_dict"]


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
    pp: int = 1                      # mesh.pp (outermost); the two below only mean something when > 1
    schedule: str = "1F1B"           # pp.schedule
    stages_per_rank: int = 1         # pp.stages_per_rank (Interleaved1F1B: 2)
    ep: int = 1                      # mesh.ep (MoE models): carved from dp_shard x cp x tp, see ep_sizes

    @property
    def label(self) -> str:
        s = (f"pp{self.pp} {self.schedule} " if self.pp > 1 else "") + \
            f"r{self.dp_replicate} s{self.dp_shard} cp{self.cp} tp{self.tp} ac={self.activation_checkpointing} " \
            f"mbs{self.micro_batch_size}"
        s += f" sp={int(self.sequence_parallel)} lp={int(self.loss_parallel)}" if self.tp > 1 else ""
        return s + (f" ep{self.ep}" if self.ep > 1 else "")


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

    @property
    def own_rank(self) -> int | None:
        """1-based rank of the recipe's own choice among the feasible ones (None: not feasible)."""
        return next((i for i, r in enumerate(self.ranked, 1) if r.cand == self.own), None)

    @property
    def own_dropped(self) -> Dropped | None:
        return next((x for x in self.dropped if x.cand == self.own), None)

    def slower_than_best(self, r: Ranked) -> float:
        """How much longer r's step is than the best's, as a fraction (0.21 = 21% slower)."""
        return r.time.step_s / self.ranked[0].time.step_s - 1


def pp_sizes(world: int, layers: int) -> list[int]:
    """mesh.pp values tried: 1 and the powers of two that divide the world with at least one
    decoder block per stage (pp <= layers). The layers need not divide evenly: compiler/pp.py
    gives the first `layers % pp` stages one block more and the estimate charges the peak rank
    (Llama-3.1-405B's 126 blocks divide by 2 only; pp 8 is 16 blocks on ranks 0-5, 15 on 6-7)."""
    out, pp = [1], 2
    while pp <= min(world, layers):
        if world % pp == 0:
            out.append(pp)
        pp *= 2
    return out


def pp_schedules(pp: int, layers: int) -> list[tuple[str, int]]:
    """(pp.schedule, pp.stages_per_rank) tried at this pp: 1F1B (torch's default, the least
    activation memory of the single-stage schedules), and Interleaved1F1B with 2 stages per rank
    where 2 pp stages still hold a block each: the bubble (pp - 1) / (m v + pp - 1) shrinks with v
    at the cost of more sends. Its micro-batches must be a multiple of pp: the rule in
    compiler/pp.py drops the others with its reason. GPipe (more memory, same bubble) and ZBV
    (a bound on its memory only) are not enumerated."""
    if pp == 1:
        return [("1F1B", 1)]
    return [("1F1B", 1)] + ([("Interleaved1F1B", 2)] if 2 * pp <= layers else [])


def ep_sizes(experts: int, dp_shard: int, cp: int, tp: int = 1) -> list[int]:
    """mesh.ep values tried for a MoE model (the rules of compiler/moe.py ep_errors): 1 (its
    experts split over tp, or whole with FSDP) and every ep > 1 that divides both the experts and
    dp_shard x cp x tp, the ranks ep is carved from, and is a multiple of tp (torchtitan's etp 1:
    the ep group spans every tp rank; runtime/ep.py: each ep rank holds experts / ep of them
    whole, FSDP-sharded over dp_shard x cp x tp / ep). A dense model (experts 0): [1]."""
    import math

    return [1] + [d for d in divisors(math.gcd(experts, dp_shard * cp * tp)) if d > 1 and d % tp == 0] \
        if experts else [1]


def candidates(recipe: Recipe, layers: int | None = None, experts: int = 0) -> list[Candidate]:
    """Every (pp, dp_replicate, dp_shard, cp, tp) with product = world, x AC x micro-batch sizes
    that keep global_batch_size exact (mbs divides gbs / dp; when dp does not divide gbs the
    recipe's own mbs stays, for the mesh stage to say why) x SP/LP on/off where tp > 1. tp runs
    over every divisor of world: the mesh stage drops the cross-node ones with its reason.
    pp (see pp_sizes; only with `layers`, the model's decoder blocks) x its schedules: with pp > 1
    cp runs over the divisors of world / pp / tp as without pp (long sequences: a stage's in-flight
    activations shrink cp times), SP/LP on/off are enumerated like without pp and ranked
    (without SP a 405B stage's activations and sends are tp times larger: torchtitan's pp 8 x
    tp 8 runs SP); the micro-batches per step are
    gbs / (mbs x dp), so the mbs choice is the microbatches choice, and the rule drops mbs values
    that leave fewer micro-batches than pp.
    MoE models (`experts`, the routed experts per layer, 0 for a dense model): x
    ep_sizes(experts, dp_shard, cp, tp), at any pp (ep is carved inside each stage group); a dense
    model's candidates keep the recipe's mesh.ep, for the rules to say why."""
    c, t = recipe.cluster, recipe.train
    world = c.nodes * c.gpus_per_node
    out = []
    for pp in pp_sizes(world, layers) if layers else [1]:
        scheds = pp_schedules(pp, layers or 1)
        rest = world // pp
        for tp in divisors(rest):
            for cp in divisors(rest // tp):
                for ds in divisors(rest // tp // cp):
                    dr = rest // tp // cp // ds
                    dp = dr * ds
                    mbss = (divisors(t.global_batch_size // dp) if t.global_batch_size % dp == 0
                            else [t.micro_batch_size])
                    splp = list(itertools.product((False, True), repeat=2)) if tp > 1 else [(False, False)]
                    eps = ep_sizes(experts, ds, cp, tp) if experts else [recipe.mesh.ep]
                    for (sc, v), ep, ac, mbs, (sp, lp) in itertools.product(scheds, eps, AC_MODES, mbss, splp):
                        out.append(Candidate(dr, ds, cp, tp, ac, mbs, sp, lp, pp, sc, v, ep))
    return out


def with_candidate(recipe: Recipe, k: Candidate) -> Recipe:
    # pp.microbatches and pp.split null: derived (= grad_accum; even split), as a recipe would leave them
    # (evolve: dataclasses.replace without re-running __init__, five per candidate, see compiler/memo.py)
    pp = evolve(recipe.pp, schedule=k.schedule, stages_per_rank=k.stages_per_rank, microbatches=None, split=None) \
        if k.pp > 1 else type(recipe.pp)()
    return evolve(recipe,
                  mesh=evolve(recipe.mesh, dp_replicate=k.dp_replicate, dp_shard=k.dp_shard, cp=k.cp, tp=k.tp,
                              pp=k.pp, ep=k.ep),
                  pp=pp,
                  tp=evolve(recipe.tp, sequence_parallel=k.sequence_parallel, loss_parallel=k.loss_parallel),
                  train=evolve(recipe.train, activation_checkpointing=k.activation_checkpointing,
                               micro_batch_size=k.micro_batch_size, grad_accum=None))


def step_time(recipe: Recipe, model: ModelSpec, mesh, est) -> StepTime:
    """The estimate stage's model (kept here under its old signature): the datasheet model with the
    plan's GEMM shapes and attention kernel, as estimate() computes it."""
    pl = resolve_placements(recipe, model, mesh)
    if isinstance(pl, Err):
        return E.step_time(recipe, mesh, est)
    gemms = E.gemm_shapes(recipe, mesh, E.rank_params(recipe, model, pl, mesh.tp))
    return E.step_time(recipe, mesh, est, gemms, E._work(recipe, model, mesh, gemms), model)


_TERMS = {"compute_s": "compute", "attention_s": "attention", "memory_s": "element-wise",
          "recompute_s": "recompute", "tp_s": "TP", "cp_s": "CP", "fsdp_s": "FSDP",
          "hsdp_s": "HSDP", "ep_s": "EP", "optimizer_s": "optimizer",
          "pp_s": "PP", "bubble_s": "bubble"}   # StepTime.step_s is their sum


def gap_terms(best: StepTime, other: StepTime) -> dict[str, float]:
    """Seconds per step `other` spends beyond `best`, per step-time term; they sum to the net gap
    (other.step_s - best.step_s), a term where `other` is faster negative."""
    return {k: getattr(other, k) - getattr(best, k) for k in _TERMS}


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:+,.0f}" if abs(ms) >= 10 else f"{ms:+.1f}"


def lost_because(best: StepTime, other: StepTime) -> str:
    """The net step-time gap to the winner in ms and percent, split by term in ms, largest first
    ("+753 ms (+26.3%): TP +801, FSDP -48"): the terms shown sum to the net (terms under 0.05 ms
    are folded into "other" when they add up to that much); "" for a tie."""
    d = gap_terms(best, other)
    if all(abs(v) <= 1e-9 for v in d.values()):
        return ""
    net = other.step_s - best.step_s
    shown = sorted(((k, v) for k, v in d.items() if abs(v) >= 5e-5), key=lambda kv: -abs(kv[1]))
    rest = net - sum(v for _, v in shown)
    parts = [f"{_TERMS[k]} {_ms(v)}" for k, v in shown] + ([f"other {_ms(rest)}"] if abs(rest) >= 5e-5 else [])
    return f"{_ms(net)} ms ({net / best.step_s:+.1%}): " + ", ".join(parts)


# paths of compiler/pp.py refusals that hold for every pp candidate of a recipe (none reads a mesh axis)
_PP_GLOBAL = ("model.config", "lora.quantize_base", "train.compile")


def _short(e: RecipeError, n: int = 160) -> str:
    return e.message if len(e.message) <= n else e.message[:n - 3] + "..."


def suggest(recipe: Recipe, model: ModelSpec) -> Suggestion:
    ok: list[tuple[Candidate, Any, Any, StepTime]] = []
    dropped = []
    # placements read only tp, whether cp > 1, SP/LP, whether ep > 1 (QLoRA's refusal; under ep
    # the experts are not tp-split) and the recipe's fixed sections (tp.plan, seq_len, model): one
    # resolve per key instead of per candidate (60 ms each for 80 layers). QLoRA's rules read two
    # more (placements._quantize_errors): whether dp_replicate > 1, and the FSDP shard count its NF4
    # blocks must divide into (without them the first candidate's refusal, e.g. "dp_replicate 4",
    # was every later candidate's, the recipe's own dp_shard 4 included: 0 feasible of 381)
    placements: dict[tuple, Any] = {}
    qlora = recipe.lora.quantize_base != "none"
    # pp rules that read no mesh axis (model type, QLoRA, compile): decided
    # once on the first pp candidate, every other pp candidate dropped with the same reason
    pp_refused: RecipeError | None = None
    # the mesh and pp rules read no activation_checkpointing (compiler/mesh.py, compiler/pp.py
    # @reads): the three AC candidates of one mesh share its [resolve_mesh, resolve_pp] results
    # (70B on 64 GPUs: 13,840 resolve_mesh calls, ~10% of a run, become 4,614)
    rules: dict[tuple, list] = {}
    for k in candidates(recipe, model.num_layers, model.num_experts or 0):
        r = with_candidate(recipe, k)
        rk = (k.dp_replicate, k.dp_shard, k.cp, k.tp, k.micro_batch_size, k.sequence_parallel, k.loss_parallel,
              k.pp, k.schedule, k.stages_per_rank, k.ep)
        done = rules.get(rk) if memo.on() else None
        if done is None:
            done = rules[rk] = [resolve_mesh(r, model), None]
        mesh = done[0]
        if not isinstance(mesh, Err) and k.pp > 1 and pp_refused is not None and memo.on():   # check's order: mesh, then pp
            dropped.append(Dropped(k, pp_refused.path, _short(pp_refused)))
            continue
        if not isinstance(mesh, Err) and k.pp > 1:
            if done[1] is None:
                done[1] = resolve_pp(r, model, mesh)
            ppr = done[1]
            if isinstance(ppr, Err):
                if pp_refused is None:
                    pp_refused = next((e for e in ppr.errors if e.path in _PP_GLOBAL), None)
                mesh = ppr
        if not isinstance(mesh, Err):
            key = (k.tp, k.cp > 1, k.sequence_parallel, k.loss_parallel, k.pp > 1, k.ep > 1)
            if qlora:
                key += (k.dp_replicate > 1, mesh.fsdp if mesh.fsdp_enabled else 1)
            if key not in placements or not memo.on():
                placements[key] = resolve_placements(r, model, mesh)
            pl = placements[key]
            # the JSON shows a drop's message only: no hint (memory_fixes) per dropped candidate
            est = pl if isinstance(pl, Err) else \
                check_memory(estimate(r, model, mesh, pl, memory_first=True), r, mesh, hint=False)
        res = mesh if isinstance(mesh, Err) else est
        if isinstance(res, Err):
            e = res.errors[0]
            dropped.append(Dropped(k, e.path, _short(e)))
            continue
        ok.append((k, mesh, res, res.time or E.step_time(r, mesh, res)))
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
    # the recipe's own mesh may not resolve (then its axes as written): SP/LP by the one rule
    sp, lp = tp_flags(m.tp, recipe.tp.sequence_parallel, recipe.tp.loss_parallel)
    mpp = getattr(m, "pp", 1)
    own = Candidate(m.dp_replicate, m.dp_shard, m.cp, m.tp, recipe.train.activation_checkpointing,
                    recipe.train.micro_batch_size, sp, lp, mpp,
                    recipe.pp.schedule if mpp > 1 else "1F1B", recipe.pp.stages_per_rank if mpp > 1 else 1,
                    recipe.mesh.ep)
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
        # the datasheet model's constants (compiler/perf.py) and how sure it is: its error on the
        # held-out published runs of bench/published_runs.json
        "model": {"fraction": dict(perf.DEFAULT.fraction), "kappa": perf.KAPPA, "attn_flash": perf.ATTN_FLASH,
                  "attn_t0": perf.ATTN_T0, "ew_passes": perf.EW_PASSES, "compile_fusion": perf.COMPILE_FUSION,
                  "held_out_within_20pct": perf.HELD_OUT_WITHIN, "held_out_rows": perf.HELD_OUT_ROWS,
                  "held_out_median_error": perf.HELD_OUT_MEDIAN},
        # the recipe's own choice: its rank and how much slower than #1, or why it is infeasible
        "own_rank": s.own_rank,
        "own_slower_than_best": None if s.own_rank is None else round(s.slower_than_best(s.ranked[s.own_rank - 1]), 6),
        "own_dropped": None if s.own_dropped is None else {"path": s.own_dropped.path, "reason": s.own_dropped.reason},
        "ranked": [{**cand(r.cand), "grad_accum": r.grad_accum, "mem_bytes": r.mem_bytes,
                    "budget_bytes": r.budget_bytes, "tokens_per_s_gpu": round(r.tokens_per_s_gpu, 3),
                    "mfu": round(r.mfu, 4), "step_s": round(r.time.step_s, 6),
                    "terms_s": {k: round(getattr(r.time, k), 6) for k in _TERMS},
                    # beyond #1's step, per term: they sum to step_s - #1's step_s
                    "gap_terms_s": {k: round(v, 9) for k, v in gap_terms(s.ranked[0].time, r.time).items()},
                    "lost_because": r.lost_because} for r in s.ranked],
        "dropped": [{**cand(x.cand), "path": x.path, "reason": x.reason} for x in s.dropped],
    }
