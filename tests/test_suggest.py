"""meshbake suggest: candidates through the compiler's own stages, ranked by the step-time model
(compile-level: no process groups)."""
from __future__ import annotations

import json
import re

import pytest
from meshbake.compiler import estimate as E
from meshbake.compiler import load
from meshbake.compiler.cli import main
from meshbake.compiler.errors import Err
from meshbake.compiler.pipeline import resolve_dict
from meshbake.compiler.suggest import Candidate, suggest_dict

RECIPE = "recipes/70b_hsdp_tp.yaml"


@pytest.fixture(scope="module")
def sg():
    d = load.load_recipe(RECIPE, (), None)
    s = suggest_dict(d)
    assert not isinstance(s, Err), s
    return d, s


def test_own_mesh_is_feasible_and_ranked(sg):
    d, s = sg
    res = resolve_dict(d)
    m, t, tp = res.plan.mesh, res.plan.train, res.plan.tp
    own = Candidate(m.dp_replicate, m.dp_shard, m.cp, m.tp, t.activation_checkpointing, t.micro_batch_size,
                    tp.sequence_parallel, tp.loss_parallel)
    assert s.own == own
    hit = [r for r in s.ranked if r.cand == own]
    assert len(hit) == 1
    # the candidate's memory is the pipeline's own estimate for the recipe
    assert hit[0].mem_bytes == res.estimate.total_bytes
    assert own not in {x.cand for x in s.dropped}


def test_infeasible_dropped_with_reason(sg):
    _, s = sg
    cross = [x for x in s.dropped if x.cand.tp == 16]       # 8 GPUs per node: TP 16 crosses nodes
    assert cross and all(x.path == "mesh.tp" and "does not divide cluster.gpus_per_node" in x.reason for x in cross)
    assert not any(r.cand.tp > 8 for r in s.ranked)
    # 70B in fp32 on one TP group x no FSDP cannot fit 80 GB: the memory check drops it
    oom = [x for x in s.dropped if x.cand.tp == 1 and x.cand.dp_shard == 1 and x.cand.cp == 1 and x.cand.pp == 1]
    assert oom and all("GB" in x.reason for x in oom), oom[:2]
    # (pp 64 x 1 block per stage does fit without FSDP: the recipe's instruct data runs under pp now)
    assert not any(r.cand.tp == 1 and r.cand.dp_shard * r.cand.cp == 1 and r.cand.pp == 1 for r in s.ranked)


def test_ranked_by_tokens_per_s(sg):
    _, s = sg
    tps = [r.tokens_per_s_gpu for r in s.ranked]
    assert len(tps) > 10 and tps == sorted(tps, reverse=True) and tps[0] > tps[-1]
    assert s.ranked[0].lost_because == "" and all(r.lost_because for r in s.ranked[1:])
    # "why not first": the net gap, then the terms, largest first (full AC: its recompute)
    full = [r for r in s.ranked if r.cand.activation_checkpointing == "full" and ": recompute +" in r.lost_because]
    assert full and " ms (+" in full[0].lost_because


def test_why_not_first_splits_the_net_gap_by_term(sg):
    """Issue 25: the terms of "why not first" sum to the net gap (not one term beside a 0.5% net)."""
    import re

    from meshbake.compiler.suggest import _TERMS, gap_terms

    _, s = sg
    best = s.ranked[0].time
    for r in s.ranked[1:]:
        d = gap_terms(best, r.time)
        assert set(d) == set(_TERMS)
        assert sum(d.values()) == pytest.approx(r.time.step_s - best.step_s, abs=1e-9)
        if not r.lost_because or r.lost_because.startswith(("same speed", "ties")):
            continue
        head, _, terms = r.lost_because.partition(": ")
        net = float(head.split(" ms")[0].replace(",", ""))
        shown = [float(v.replace(",", "")) for v in re.findall(r" ([+-][\d,.]+)(?:,|$)", terms)]
        assert shown and net == pytest.approx((r.time.step_s - best.step_s) * 1e3, abs=0.5)
        # rounding of each shown term (to 1 ms, 0.1 ms under 10 ms) is all that separates them
        assert sum(shown) == pytest.approx(net, abs=0.5 * len(shown) + 0.05), r.lost_because


def test_own_row_is_shown_outside_top_with_rank_and_gap(capsys):
    """8b_tp's own mesh (tp 8, no FSDP) ranks far below --top: its row is shown anyway, with its
    rank, and the summary says how much slower than #1 it is."""
    assert main(["suggest", "8b_tp", "--top", "2"]) == 0
    out = capsys.readouterr().out
    star = [ln for ln in out.splitlines() if re.match(r"^\d+\*", ln)]
    assert star and int(star[0].split("*")[0]) > 2, out
    rank = int(star[0].split("*")[0])
    assert re.search(rf"the recipe's own choice: #{rank} \(\d+\.\d%\s+slower\s+than\s+#1\)", out), out
    assert main(["suggest", "8b_tp", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["own_rank"] == rank and js["own_slower_than_best"] > 0.1 and js["own_dropped"] is None
    r = js["ranked"][rank - 1]
    assert sum(r["gap_terms_s"].values()) == pytest.approx(r["step_s"] - js["ranked"][0]["step_s"], abs=1e-5)


def test_infeasible_own_row_says_why(capsys):
    assert main(["suggest", "8b_tp", "--top", "2", "--set", "cluster.gpu_memory_gb=12"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^-\*\s+1x1x1x8 .*infeasible:", out, re.M), out
    assert "cluster.gpu_memor" in re.sub(r"\s+", "", out.split("infeasible:", 1)[1]), out


def test_step_time_arithmetic_by_hand(sg):
    """The recipe's own candidate, re-derived from the datasheet model (compiler/perf.py)."""
    from meshbake.compiler import perf

    d, s = sg
    res = resolve_dict(d)
    est, r = res.estimate, next(r for r in s.ranked if r.cand == s.own)
    c, mesh, t = res.recipe.cluster, res.mesh, res.recipe.train
    # 70b_hsdp_tp: 64 GPUs, gbs 64 x seq 8192 -> 8192 tokens per rank; H100 defaults (found by their peak)
    tokens = 64 * 8192 / 64
    assert (c.peak_tflops, c.hbm_gbps, c.intra_node_gbps, c.inter_node_gbps, c.nics_per_node) == (989, 3350, 450, 50, 8)
    frac, ridge = perf.FRACTION["h100"], 989e12 / 3350e9
    micro = mesh.grad_accum
    # every GEMM after TP: m = micro-batch tokens, n = rows, k = in; trained: 3 passes
    mm = fwd = 0.0
    thin = 0
    for m, n, k, p in E.gemm_shapes(res.recipe, mesh, E.rank_params(res.recipe, res.model, res.placements, 8)):
        eff = frac / (1 + perf.KAPPA * ridge / (1 / (1 / m + 1 / n + 1 / k)))
        one = 2 * m * n * k / (989e12 * eff)
        if min(m, n, k) <= perf.THIN_DIM:            # k_proj, v_proj: 1024 / tp 8 = 128 rows: memory-bound
            one, thin = 2 * (m * n + n * k + m * k) / 3350e9, thin + 1        # bf16 bytes at HBM
        mm += p * one
        fwd += one
    assert thin == 2 * 80                                           # k and v of every block
    L, H, Dh = 80, 64, 128                                      # Llama 3.1 70B
    # data.format chat packs documents: sdpa gets a document mask, the masked kernel runs
    assert "mask" in E.attention_memory(res.recipe, res.model, mesh).kernel
    attn = 12 * L * (H // 8) * Dh * 8192 * (t.micro_batch_size * 8192) / (
        989e12 * frac * perf.ATTN_FLASH * perf.ATTN["masked"] * 8192 / (8192 + perf.ATTN_T0))
    ew = (perf.EW_PASSES * L * 8192 * t.micro_batch_size * (8192 / 8 + (28672 + 8192 + 2 * 1024) / 8) * 2
          + perf.LOGIT_PASSES * 4 * 8192 * t.micro_batch_size * 128256 / 8) / 3350e9
    recompute = fwd + perf.ATTN_FWD * attn + ew / 3              # full AC: the forward again
    busy = (mm + attn + ew + recompute) * micro

    def ring(axis, gbps, lat):                                 # wire bytes / bus bandwidth + start-up each
        return sum(x.wire_bytes / gbps + x.count * lat(x.op) for x in est.traffic if x.axis == axis)

    # tp 8 consecutive ranks: NVLink at 80% bus efficiency, ring hops 7 (all-reduce 14), exposed
    tp = ring("tp", 450e9 * 0.8, lambda op: 3.6e-6 + (14 if op == "all_reduce" else 7) * 2.5e-6)
    # dp_shard 4 (ranks 8 apart) and dp_replicate 2 (32 apart): one GPU per node, so one rail's
    # NIC: 8 x 50 GB/s x 90% / 8; ring across 4 nodes 4 network hops, the tree across 2 nodes 2
    dp = (ring("dp_shard", 45e9, lambda op: 3.6e-6 + 4 * 7.5e-6)
          + ring("dp_replicate", 45e9, lambda op: 3.6e-6 + 2 * 7.5e-6))
    first = dp / (L + 1)                                       # the first all-gather waits
    exposed = first + max(0.0, dp - first - busy)
    optimizer = 12 * est.grads_bytes / 3350e9
    step = busy + tp + exposed + optimizer
    assert mesh.dp_replicate == 2 and mesh.dp_shard == 4 and mesh.tp == 8
    assert r.time.step_s == pytest.approx(step, rel=1e-9)
    assert r.time == est.time                                  # suggest and PLAN.md share the model
    assert r.tokens_per_s_gpu == pytest.approx(tokens / step, rel=1e-9)
    assert r.mfu == pytest.approx(est.flops_per_token * tokens / step / 989e12, rel=1e-9)


def test_json_and_table(sg, capsys, monkeypatch):
    """The CLI's two renderings of RECIPE's suggestion. suggest_dict is a pure function of the
    recipe dict, and the CLI hands it a dict equal to the fixture's: the fixture's Suggestion is
    what a cold call returns, so it is reused (two cold 70B suggests were ~2/3 of this file's
    time). The CLI's own call into suggest_dict runs in the 8b_tp tests above and below."""
    from meshbake.compiler import suggest as S

    d, s = sg
    calls = []

    def same(got):
        calls.append(got)
        assert got == d, "the CLI loaded another recipe dict than load_recipe(RECIPE)"
        return s
    monkeypatch.setattr(S, "suggest_dict", same)
    assert main(["suggest", RECIPE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world"] == 64 and out["ranked"] and out["dropped"]
    assert out["ranked"][0]["tokens_per_s_gpu"] >= out["ranked"][-1]["tokens_per_s_gpu"]
    assert {"path", "reason", "tp"} <= set(out["dropped"][0])
    assert main(["suggest", RECIPE, "--top", "3"]) == 0
    table = capsys.readouterr().out
    assert "tok/s/GPU" in table and "feasible" in table
    assert len(calls) == 2


def test_recipe_error_exits_2(capsys):
    assert main(["suggest", RECIPE, "--set", "train.seq_len=-5"]) == 2
    assert "train.seq_len" in capsys.readouterr().err


def test_cluster_hardware_keys_drive_the_model(sg):
    """A slower network (cluster.inter_node_gbps) moves FSDP traffic of the recipe's own mesh
    (its dp_shard group spans 4 nodes) up by exactly the bandwidth ratio; keys pass validation."""
    from dataclasses import replace

    from meshbake.compiler import validate
    from meshbake.compiler.suggest import step_time, with_candidate

    d, s = sg
    slow = {**d, "cluster": {**d["cluster"], "inter_node_gbps": 5}}
    recipe, errs = validate.validate_all(slow)
    assert recipe is not None and not errs and recipe.cluster.inter_node_gbps == 5.0
    res = resolve_dict(d)
    r = with_candidate(res.recipe, s.own)
    fast_t = step_time(r, res.model, res.mesh, res.estimate)
    slow_t = step_time(replace(r, cluster=replace(r.cluster, inter_node_gbps=5.0)), res.model, res.mesh, res.estimate)
    assert slow_t.compute_s == fast_t.compute_s and slow_t.tp_s == fast_t.tp_s
    # the all-reduce across replicas: 10x the wire time, the same start-up latencies
    from meshbake.compiler import perf
    from meshbake.compiler.estimate import comm_seconds

    rows = res.estimate.traffic
    g = perf.Group(2, 1, 2)                       # dp_replicate 2: one GPU on each of 2 nodes
    lat = sum(x.count * perf.latency_s(x.op, g) for x in rows if x.axis == "dp_replicate")
    fast_rep = comm_seconds(r, res.mesh, rows, ("dp_replicate",))
    slow_rep = comm_seconds(replace(r, cluster=replace(r.cluster, inter_node_gbps=5.0)), res.mesh, rows,
                            ("dp_replicate",))
    assert slow_rep - lat == pytest.approx(10 * (fast_rep - lat))
    assert slow_t.fsdp_s > fast_t.fsdp_s and slow_t.hsdp_s > fast_t.hsdp_s
    bad, errs = validate.validate_all({**d, "cluster": {**d["cluster"], "peak_tflops": -1}})
    assert bad is None and any(e.path == "cluster.peak_tflops" for e in errs)


# --- pipeline parallelism (issue 27): pp candidates, their rules and their step time -------------

def _tiny_pp(**kw):
    from tests.helpers import ROOT, tiny_recipe
    return tiny_recipe("pps", 4, model=str(ROOT / "tests/dist/configs/tiny-llama-4l.json"), **kw)


def test_pp_candidates_enumerated_only_where_pp_composes():
    """pp in {1, 2, 4} for world 4 and 4 blocks (powers of 2 dividing the world, <= the blocks);
    Interleaved1F1B (2 stages per rank) only where 2 pp <= blocks; cp over the divisors of
    world / pp / tp as without pp, SP/LP on and off where tp > 1 (compiler/pp.py decides: see the
    next test).
    Llama-3.1-405B's 126 blocks on 512 GPUs: pp up to 64 (2 pp <= 126 keeps Interleaved1F1B to pp <= 32)."""
    from meshbake.compiler.suggest import candidates, pp_schedules, pp_sizes
    from meshbake.compiler.validate import validate_all

    assert pp_sizes(4, 4) == [1, 2, 4] and pp_sizes(512, 126) == [1, 2, 4, 8, 16, 32, 64] and pp_sizes(24, 80) == [1, 2, 4, 8]
    assert pp_schedules(2, 4) == [("1F1B", 1), ("Interleaved1F1B", 2)] and pp_schedules(4, 4) == [("1F1B", 1)]
    assert pp_schedules(64, 126) == [("1F1B", 1)]
    recipe, errs = validate_all(_tiny_pp())
    assert not errs
    ks = candidates(recipe, 4)
    pp = [k for k in ks if k.pp > 1]
    assert {(k.pp, k.schedule, k.stages_per_rank) for k in pp} == {(2, "1F1B", 1), (2, "Interleaved1F1B", 2), (4, "1F1B", 1)}
    # cp under pp: pp 2 leaves 2 ranks, so cp 2 (x tp 1, dp 1) and cp 1; pp 4 leaves none for cp
    assert {(k.pp, k.cp, k.tp) for k in pp} == {(2, 1, 1), (2, 2, 1), (2, 1, 2), (4, 1, 1)}
    assert all(k.dp_replicate * k.dp_shard == 1 for k in pp if k.cp == 2)
    assert all(not (k.sequence_parallel or k.loss_parallel) for k in pp if k.tp == 1)
    assert {(k.sequence_parallel, k.loss_parallel) for k in pp if k.tp == 2} == {(a, b) for a in (0, 1) for b in (0, 1)}
    assert all(k.pp * k.dp_replicate * k.dp_shard * k.cp * k.tp == 4 for k in pp)
    assert candidates(recipe) == [k for k in ks if k.pp == 1]        # without the blocks: no pp, as before


@pytest.fixture(scope="module")
def pp_sg():
    s = suggest_dict(_tiny_pp())
    assert not isinstance(s, Err), s
    return s


def test_pp_candidates_ranked_with_the_bubble_and_dropped_by_the_pp_rules(pp_sg):
    """A ranked pp row's step time is its compiled plan's (bubble and sends included); too few
    micro-batches for the pipeline is the rule's drop (gbs 8 = mbs x microbatches x dp)."""
    from meshbake.compiler.suggest import with_candidate

    s = pp_sg
    ranked_pp = [r for r in s.ranked if r.cand.pp > 1]
    assert {r.cand.pp for r in ranked_pp} == {2, 4}
    assert all(r.grad_accum >= r.cand.pp and r.time.bubble_s > 0 and r.time.pp_s > 0 for r in ranked_pp)
    # 1F1B's bubble (pp - 1) / (m + pp - 1) of the pipelined time: bubble_s / (compute + recompute) = (pp - 1) / m
    for r in ranked_pp:
        if r.cand.schedule == "1F1B":
            t = r.time
            assert t.bubble_s == pytest.approx((t.compute_s + t.recompute_s) * (r.cand.pp - 1) / r.grad_accum, rel=1e-9)
    # the same candidate through the whole compile: the same step time and memory as PLAN.md's
    r = next(r for r in ranked_pp if r.cand.schedule == "Interleaved1F1B")
    res = resolve_dict(_tiny_pp(mesh={"pp": 2, "dp_replicate": r.cand.dp_replicate, "dp_shard": r.cand.dp_shard,
                                      "tp": r.cand.tp},
                                pp={"schedule": "Interleaved1F1B", "stages_per_rank": 2},
                                train={"micro_batch_size": r.cand.micro_batch_size,
                                       "activation_checkpointing": r.cand.activation_checkpointing}))
    assert not isinstance(res, Err), res
    from meshbake.compiler.estimate import step_time  # a cpu cluster's plan carries no time: the same model
    assert step_time(res.recipe, res.mesh, res.estimate).step_s == pytest.approx(r.time.step_s, rel=1e-12)
    assert res.estimate.total_bytes == r.mem_bytes and res.plan.pp.microbatches == r.grad_accum
    assert with_candidate(res.recipe, r.cand).mesh.pp == 2
    few = [x for x in s.dropped if x.cand.pp > 1 and x.path == "train.global_batch_size"]
    assert few and all("fewer than pp" in x.reason or "rounds" in x.reason for x in few)
    assert {(x.cand.pp, x.cand.dp_replicate * x.cand.dp_shard, x.cand.micro_batch_size) for x in few
            if "fewer than pp" in x.reason} >= {(2, 2, 4), (4, 1, 8), (4, 1, 4)}
    # SP / LP under pp: every such candidate is dropped with compiler/pp.py's reason while it refuses
    # them (decided on the first, the same error), and ranks once it accepts them
    from meshbake.compiler.mesh import resolve_mesh
    from meshbake.compiler.pp import resolve_pp
    flagged = [x for x in (*s.ranked, *s.dropped) if x.cand.pp > 1 and (x.cand.sequence_parallel or x.cand.loss_parallel)]
    assert flagged
    for x in flagged:
        rec = with_candidate(res.recipe, x.cand)
        mesh = resolve_mesh(rec, res.model)
        if isinstance(mesh, Err):
            continue
        errs = resolve_pp(rec, res.model, mesh)
        refused = [e.path for e in errs.errors if e.path.startswith("tp.")] if isinstance(errs, Err) else []
        if refused:
            assert x in s.dropped and x.path in refused, (x, refused)
    # the gap to #1 by term has the pipeline's terms, and the terms still sum to the net gap
    from meshbake.compiler.suggest import gap_terms
    gaps = [gap_terms(s.ranked[0].time, r.time) for r in s.ranked[1:]]
    assert any(g["bubble_s"] != 0 for g in gaps) and any(g["pp_s"] != 0 for g in gaps)
    assert all(sum(g.values()) == pytest.approx(r.time.step_s - s.ranked[0].time.step_s, abs=1e-12)
               for g, r in zip(gaps, s.ranked[1:]))


def test_pp_cp_candidates_rank_with_their_plan_step_time(pp_sg):
    """cp under pp (synthetic data here; packed data runs too, tests/test_pp.py): a pp 2 x cp 2
    row is ranked, and its step time and memory are those of the same recipe compiled."""
    rows = [r for r in pp_sg.ranked if r.cand.pp == 2 and r.cand.cp == 2]
    assert rows and all(r.time.cp_s > 0 and r.time.bubble_s > 0 for r in rows)
    r = rows[0]
    res = resolve_dict(_tiny_pp(mesh={"pp": 2, "cp": 2, "dp_shard": 1},
                                pp={"schedule": r.cand.schedule, "stages_per_rank": r.cand.stages_per_rank},
                                train={"micro_batch_size": r.cand.micro_batch_size,
                                       "activation_checkpointing": r.cand.activation_checkpointing}))
    assert not isinstance(res, Err), res
    assert E.step_time(res.recipe, res.mesh, res.estimate).step_s == pytest.approx(r.time.step_s, rel=1e-12)
    assert res.estimate.total_bytes == r.mem_bytes


def test_memory_first_estimate_of_a_pp_plan():
    """estimate(memory_first=True), suggest's call: a pp plan within the budget gets the very
    estimate of the plain call (time included); one over it gets the same memory, no traffic rows
    and no time, and check_memory refuses both with the same error (what suggest shows)."""
    from dataclasses import replace

    res = resolve_dict(_tiny_pp(mesh={"pp": 2, "cp": 2, "dp_shard": 1}, cluster={"device": "cuda", "gpu": "h100-sxm"}))
    assert not isinstance(res, Err), res
    full = E.estimate(res.recipe, res.model, res.mesh, res.placements)
    assert full.time is not None and full.traffic
    assert E.estimate(res.recipe, res.model, res.mesh, res.placements, memory_first=True) == full
    small = replace(res.recipe, cluster=replace(res.recipe.cluster, gpu_memory_gb=full.total_bytes / 1e9 / 2))
    over = E.estimate(small, res.model, res.mesh, res.placements)
    quick = E.estimate(small, res.model, res.mesh, res.placements, memory_first=True)
    assert quick.time is None and quick.traffic == () and over.time is not None
    assert (quick.phases, quick.total_bytes, quick.pp_rank_rows) == (over.phases, over.total_bytes, over.pp_rank_rows)
    a, b = E.check_memory(over, small, res.mesh), E.check_memory(quick, small, res.mesh)
    assert isinstance(a, Err) and a == b and a.errors[0].path == "cluster.gpu_memory_gb"


def test_memory_first_estimate_without_pp():
    """The same for a plan without pp (suggest drops most of those on memory too): within the
    budget the plain estimate, over it the same memory with no traffic rows, no time, the same error."""
    from dataclasses import replace

    res = resolve_dict(_tiny_pp(mesh={"pp": 1, "cp": 2, "dp_shard": 2}, cluster={"device": "cuda", "gpu": "h100-sxm"}))
    assert not isinstance(res, Err), res
    full = E.estimate(res.recipe, res.model, res.mesh, res.placements)
    assert full.time is not None and full.traffic and not res.mesh.pp_enabled
    assert E.estimate(res.recipe, res.model, res.mesh, res.placements, memory_first=True) == full
    small = replace(res.recipe, cluster=replace(res.recipe.cluster, gpu_memory_gb=full.total_bytes / 1e9 / 2))
    over = E.estimate(small, res.model, res.mesh, res.placements)
    quick = E.estimate(small, res.model, res.mesh, res.placements, memory_first=True)
    assert quick.time is None and quick.traffic == () and over.time is not None and over.traffic
    assert (quick.phases, quick.total_bytes, quick.terms) == (over.phases, over.total_bytes, over.terms)
    a, b = E.check_memory(over, small, res.mesh, hint=False), E.check_memory(quick, small, res.mesh, hint=False)
    assert isinstance(a, Err) and a == b and a.errors[0].path == "cluster.gpu_memory_gb"


def test_pp_refused_recipe_wide_drops_every_pp_candidate_with_one_reason():
    """A model type without a pipeline stage split is refused with pp (Phi-3's fixture): every pp
    candidate is dropped with that rule's path, decided once; the pp-1 candidates are unaffected.
    (Tied embeddings ran into this rule until pp gave the last stage a copy of the table: tiny-qwen
    now ranks pp candidates, its last stage charged the copy.)"""
    from tests.helpers import ROOT, tiny_recipe

    s = suggest_dict(tiny_recipe("pps", 4, model=str(ROOT / "tests/models/phi3/config.json")))
    assert not isinstance(s, Err), s
    assert s.ranked and all(r.cand.pp == 1 for r in s.ranked)
    pp = [x for x in s.dropped if x.cand.pp > 1]
    assert pp and {x.path for x in pp} == {"model.config"} and all(
        "not supported with mesh.pp > 1" in x.reason and "model_type phi3" in x.reason for x in pp)
    tied = suggest_dict(tiny_recipe("pps", 4, model="tiny-qwen"))
    assert not isinstance(tied, Err) and any(r.cand.pp > 1 for r in tied.ranked), tied


def test_caches_change_no_answer():
    """suggest's caches (compiler/memo.py cached(): per model, placements, params list, pp ranks...;
    its own per-key placements and mesh/pp rules; the pp refusal decided once; equal pp ranks'
    memory costed once) each assume their key holds all the value depends on. One that left a
    field out returned an earlier candidate's answer (QLoRA's placements: 0 feasible of 381).
    With memo.off() every candidate is resolved and estimated from scratch: the same ranking,
    drops and reasons, on recipes that reach every cache (QLoRA, LoRA, MoE with ep, GPT-OSS's
    biases and sinks, DeepSeek-V3's MLA, Gemma-2, tied embeddings under pp, a pp-refused model,
    Llama-3.1-8B's pp at tp 1, 2 and 4). Shown to fail with QLoRA's two placements key fields
    removed, and with tp removed from the pp rank lists' key."""
    from meshbake.compiler import memo
    from meshbake.compiler.suggest import to_json

    from tests.helpers import ROOT, tiny_recipe

    models = ROOT / "tests/models"
    recipes = [tiny_recipe("q", 4, lora={"rank": 8, "quantize_base": "nf4"}),
               tiny_recipe("l", 8, lora={"rank": 8}),
               tiny_recipe("m", 8, model=str(models / "qwen3_moe/config.json")),
               tiny_recipe("g", 8, model=str(models / "gpt_oss/config.json")),
               tiny_recipe("d", 8, model=str(models / "deepseek_v3/config.json")),
               tiny_recipe("t", 8, model=str(models / "gemma2/config.json")),
               tiny_recipe("pps", 4, model="tiny-qwen"),
               tiny_recipe("pps", 4, model=str(models / "phi3/config.json")),
               # Llama-3.1-8B on 8 GPUs: pp x tp 4 beside pp x tp 2 with the same placements content and
               # pp ranks (the tiny models reach pp at tp <= 2 only); ~10 s of the test's ~17
               load.load_recipe(str(ROOT / "recipes/8b_tp.yaml"), (), None)]
    for d in recipes:
        with memo.off():
            fresh = suggest_dict(d)
        cached = suggest_dict(d)
        assert not isinstance(cached, Err) and cached.ranked and cached.dropped, cached
        assert to_json(cached) == to_json(fresh), d["name"]


def test_qlora_candidates_each_get_their_own_refusal():
    """QLoRA's placement rules read dp_replicate and the FSDP shard count, which the per-key
    placements cache of suggest once left out: the first candidate's refusal ("mesh.dp_replicate 4")
    became every later one's, the recipe's own dp_shard 4 included (0 feasible of 381). Now the own
    mesh ranks, every tp 1 / pp 1 / dp_replicate 1 candidate is kept or dropped for its own reason,
    and each dp_replicate refusal names that candidate's own dp_replicate."""
    from tests.helpers import tiny_recipe

    s = suggest_dict(tiny_recipe("q", 4, lora={"rank": 8, "quantize_base": "nf4"}))
    assert not isinstance(s, Err), s
    assert s.own.dp_shard == 4 and any(r.cand == s.own for r in s.ranked), s.own
    flat = [x for x in s.dropped if x.cand.tp == 1 and x.cand.pp == 1 and x.cand.dp_replicate == 1]
    assert not any("dp_replicate" in x.reason for x in flat), flat[:3]
    hsdp = [x for x in s.dropped if x.path == "lora.quantize_base" and "dp_replicate" in x.reason]
    assert hsdp and all(f"mesh.dp_replicate {x.cand.dp_replicate}:" in x.reason for x in hsdp), hsdp[:3]


def test_ep_candidates_for_moe_models_where_ep_composes():
    """A MoE model's candidates run over mesh.ep too (compiler/suggest.py ep_sizes, the rules of
    compiler/moe.py ep_errors): 1 and every ep > 1 dividing the experts and dp_shard x tp that is a
    multiple of tp (ep carved from dp_shard x cp x tp; under pp from each stage group's), at every
    pp. A dense model's keep the
    recipe's mesh.ep. 128 experts (Qwen3-30B-A3B) on 32 GPUs."""
    from meshbake.compiler.suggest import candidates, ep_sizes
    from meshbake.compiler.validate import validate_all

    assert ep_sizes(128, 16, 1, 2) == [1, 2, 4, 8, 16, 32] and ep_sizes(128, 4, 1, 8) == [1, 8, 16, 32]
    assert ep_sizes(60, 8, 1, 1) == [1, 2, 4] and ep_sizes(8, 1, 1, 1) == [1]
    assert ep_sizes(128, 2, 2, 2) == [1, 2, 4, 8] and ep_sizes(4, 1, 2, 2) == [1, 2, 4]     # cp x tp
    d = load.load_recipe(RECIPE, ("model.config=qwen3-30b-a3b", "mesh.tp=4", "cluster.nodes=4"), None)
    recipe, errs = validate_all(d)
    assert not errs, errs
    ks = candidates(recipe, 48, 128)
    ep = [k for k in ks if k.ep > 1]
    assert ep and all(k.ep % k.tp == 0 and 128 % k.ep == 0 and (k.dp_shard * k.cp * k.tp) % k.ep == 0 for k in ep)
    assert {k.pp for k in ep} > {1}                  # ep inside the stage groups of pp candidates too
    assert any(k.cp > 1 and k.tp > 1 for k in ep)
    assert {(k.dp_shard, k.tp, k.ep) for k in ep} >= {(16, 2, 2), (16, 2, 32), (8, 4, 4), (1, 8, 8)}
    assert {k.ep for k in candidates(recipe, 48)} == {recipe.mesh.ep}     # experts unknown / dense: as written


def test_ep_with_tp_ranks_above_experts_over_tp_across_nodes():
    """Qwen3-30B-A3B (128 experts of 768 x 2048, k 8, bf16) on 4 nodes x 8 GPUs at dp_shard 16 x tp 2,
    seq 8192: with experts over tp (ep 1) every expert is FSDP-gathered over 16 ranks across nodes
    each MoE layer; with ep 8 (4 dp_shard ranks x the tp pair, ep carved from dp_shard x tp) a
    rank gathers 16 whole experts over 4 ranks and sends its 4,096 tokens x 8 copies out by
    all-to-all instead. The step-time model that ranks suggest's candidates puts ep 8 first."""
    from meshbake.compiler.pipeline import resolve_dict

    def step(ep: int):
        d = load.load_recipe(RECIPE, ("model.config=qwen3-30b-a3b", "model.weights=random", "model.dtype=bfloat16",
                                      "cluster.nodes=4", "mesh.dp_replicate=1", "mesh.dp_shard=16", "mesh.tp=2",
                                      f"mesh.ep={ep}", "train.activation_checkpointing=selective",
                                      "train.mixed_precision.param_dtype=bfloat16"), None)
        res = resolve_dict(d)
        assert not isinstance(res, Err), res
        return res.estimate.time
    with_ep, without = step(8), step(1)
    assert with_ep.ep_s > 0 and without.ep_s == 0
    assert with_ep.fsdp_s < without.fsdp_s and with_ep.step_s < without.step_s, (with_ep, without)


# --- expert parallelism (issue 26): ep sizes from dp_shard x cp, ranked --------------------------

def _tiny_moe(**kw):
    from tests.helpers import ROOT, tiny_recipe
    return tiny_recipe("eps", 4, model=str(ROOT / "tests/models/qwen3_moe/config.json"),
                       cluster={"device": "cuda"}, **kw)


@pytest.fixture(scope="module")
def ep_sg():
    s = suggest_dict(_tiny_moe())
    assert not isinstance(s, Err), s
    return s


def test_ep_sizes_enumerated_from_dp_shard_x_cp_x_tp():
    """A MoE model's candidates carry every ep > 1 dividing both its experts and dp_shard x cp x tp
    and a multiple of tp (4 experts at world 4: ep 2 and 4 wherever tp <= 2, ep 4 only at tp 4);
    at pp 2 from the stage group's 2 ranks (ep 1 or 2); a dense model's ep 1."""
    from meshbake.compiler.suggest import candidates, ep_sizes
    from meshbake.compiler.validate import validate_all

    assert ep_sizes(4, 2, 2) == [1, 2, 4] and ep_sizes(4, 1, 2) == [1, 2] and ep_sizes(4, 1, 1) == [1]
    assert ep_sizes(128, 6, 1) == [1, 2] and ep_sizes(0, 8, 1) == [1]
    recipe, errs = validate_all(_tiny_moe())
    assert not errs
    ks = candidates(recipe, 2, 4)
    eps = {(k.dp_shard, k.cp, k.tp): set() for k in ks if k.pp == 1}
    for k in ks:
        if k.pp == 1:
            eps[k.dp_shard, k.cp, k.tp].add(k.ep)
    assert eps[2, 2, 1] == eps[4, 1, 1] == eps[1, 4, 1] == eps[2, 1, 2] == eps[1, 2, 2] == {1, 2, 4}
    assert eps[1, 1, 4] == {1, 4} and {k.ep for k in ks if k.pp > 1} == {1, 2}
    assert {k.ep for k in candidates(recipe, 2)} == {1}


def test_ep_candidates_ranked_with_their_all_to_alls(ep_sg, capsys, tmp_path):
    """ep x cp candidates are ranked (feasible), with the EP term of the step-time model; a ranked
    ep row's step time and memory are its compiled plan's; the table shows the ep size."""
    s = ep_sg
    ranked = {(r.cand.dp_shard, r.cand.cp, r.cand.ep) for r in s.ranked if r.cand.tp == 1}
    assert {(2, 2, 2), (2, 2, 4), (4, 1, 2), (4, 1, 4), (1, 4, 4)} <= ranked
    # under pp the step time is the peak rank's: the tiny Qwen3-MoE's block 1 is dense
    # (mlp_only_layers [1]), so a pp 2 candidate whose peak is stage 1 has no all-to-all of its own
    assert all(r.time.ep_s > 0 for r in s.ranked if r.cand.ep > 1 and r.cand.pp == 1)
    assert any(r.cand.pp > 1 and r.cand.ep > 1 for r in s.ranked)
    assert all(r.time.ep_s == 0 for r in s.ranked if r.cand.ep == 1)
    r = next(r for r in s.ranked if (r.cand.dp_shard, r.cand.cp, r.cand.ep) == (2, 2, 4))
    res = resolve_dict(_tiny_moe(mesh={"dp_shard": 2, "cp": 2, "tp": 1, "ep": 4},
                                 train={"micro_batch_size": r.cand.micro_batch_size,
                                        "activation_checkpointing": r.cand.activation_checkpointing}))
    assert not isinstance(res, Err), res
    assert res.estimate.time.step_s == pytest.approx(r.time.step_s, rel=1e-12)
    assert res.estimate.total_bytes == r.mem_bytes
    import yaml
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_tiny_moe()))
    assert main(["suggest", str(tmp_path / "r.yaml"), "--top", str(len(s.ranked))]) == 0
    table = capsys.readouterr().out
    assert "1x2x2x1 ep4" in table and "[ep N: experts" in table

