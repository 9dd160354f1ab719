"""mesh.pp at compile time (compiler/pp.py, the mesh / estimate / render stages): rank order,
plan.json's pp section, the stage split, the per-stage estimate, and what a pp-1 bundle keeps.
The parity of the runtime is tests/test_pp.py; each pp rule's error is a tests/recipes/invalid
fixture (pp_*.yaml)."""
from __future__ import annotations

import json
from dataclasses import replace

import yaml
from meshbake.compiler.errors import Err
from meshbake.runtime import plan as P

from tests.helpers import ROOT, compiled, resolve, tiny_recipe

R405 = (ROOT / "tests/recipes/valid/llama405b_pp16_fsdp4_tp8.yaml").read_text()


def pp_recipe(world=4, **pp) -> dict:
    return tiny_recipe("pp", world, mesh={"pp": 2, "dp_shard": -1}, model=str(ROOT / "tests/dist/configs/tiny-llama-4l.json"),
                       **({"pp": pp} if pp else {}))


def test_pp_is_the_outermost_axis_so_tp_stays_in_a_node():
    """torchtitan's order [pp, dp_replicate, dp_shard, cp, tp]: tp stride 1 (consecutive ranks,
    one node), pp stride world / pp (a stage group is whole nodes: 405B pp 16 on 64 x 8 GPUs ->
    32 consecutive ranks = 4 nodes per stage)."""
    r = resolve(R405)
    assert not isinstance(r, Err), r
    m = r.plan.mesh
    assert m.mesh_dims == ("pp", "dp_replicate", "dp_shard", "cp", "tp") and m.shape == (16, 1, 4, 1, 8)
    assert m.world == 512 == 16 * 4 * 8
    assert m.strides == {"pp": 32, "dp_replicate": 32, "dp_shard": 8, "cp": 8, "tp": 1}
    assert m.strides["pp"] % 8 == 0 and 8 % m.tp == 0


def test_plan_json_carries_the_split_and_reads_back():
    b = compiled(pp_recipe(split=[3, 1]))
    d = json.loads(b.files["plan.json"])
    assert d["mesh"]["pp"] == 2 and d["mesh"]["dp_shard"] == 2 and d["mesh"]["world"] == 4
    assert d["pp"] == {"schedule": "1F1B", "microbatches": 2, "stages_per_rank": 1, "split": [3, 1],
                       "stages": [[0, 3], [3, 4]]}
    assert d["train"]["grad_accum"] == 2            # 8 / (2 x 2): the micro-batches are the accumulation
    plan = P.from_dict(d)
    assert plan.pp.stages == ((0, 3), (3, 4)) and plan.mesh.pp == 2
    md = b.files["PLAN.md"].decode()
    assert "= pp 2 x dp_replicate 1 x dp_shard 2" in md
    assert "| 0 | 0 | embedding, blocks 0-2 | 3 |" in md and "| 1 | 1 | block 3, final norm + lm_head + loss | 1 |" in md
    assert "micro_batch_size 2 x pp.microbatches 2 x dp 2" in md


def test_even_split_and_v_shape():
    from meshbake.compiler.pp import even_split, stage_ranks

    assert even_split(126, 16) == (8,) * 14 + (7, 7) and sum(even_split(32, 3)) == 32
    assert stage_ranks(4, 2, "Interleaved1F1B") == (0, 1, 2, 3, 0, 1, 2, 3)
    assert stage_ranks(4, 2, "ZBVZeroBubble") == (0, 1, 2, 3, 3, 2, 1, 0)


def test_pp1_bundle_has_no_pp_keys():
    """Without a pipeline plan.json, recipe.yaml and PLAN.md are as before pp (the goldens hold the bytes)."""
    b = compiled(tiny_recipe("nopp", 2))
    d = json.loads(b.files["plan.json"])
    assert "pp" not in d and "pp" not in d["mesh"] and "pp_rank_rows" not in d["estimate"]
    r = yaml.safe_load(b.files["recipe.yaml"])
    assert "pp" not in r and "pp" not in r["mesh"]
    assert "## Pipeline" not in b.files["PLAN.md"].decode()


def test_estimate_per_stage_and_bubble():
    """Per pp rank its own parameters: 405B over pp 16 x fsdp 4 x tp 8; stage 0 (embedding + 8
    blocks) the largest, with 1F1B's pp micro-batches in flight; rank r holds pp - r in flight
    (full AC: one block input each). The peak is rank 1: torch.distributed.pipelining's receive
    buffers, one per micro-batch and direction (32 x mbs 1 x seq 4096 x 16384 x bf16 = 4.29 GB per
    direction), are the gradients only on stage 0 and activations + gradients from stage 1 on,
    8.6 GB against rank 0's one more micro-batch (8 block inputs, 1.07 GB) and embedding. The
    bubble 15 / (32 + 15) of the pipelined compute in the step time."""
    r = resolve(R405)
    est = r.estimate
    rows = {k: (n, b) for k, n, b in est.pp_rank_rows}
    assert len(rows) == 16 and est.pp_peak_rank == 1
    assert rows[0][0] == max(n for n, _ in rows.values())
    assert est.pp_buffers_bytes == 2 * 32 * 4096 * 16384 * 2 == est.terms["pp_buffers"]
    # rank 0: (embedding 128256 x 16384 + 8 blocks) / (tp 8 x fsdp 4); a block = (all - embedding -
    # lm_head - final norm) / 126
    emb = 128256 * 16384
    block = (r.model.num_params - 2 * emb - 16384) // 126
    assert abs(rows[0][0] - (emb + 8 * block) / 32) / rows[0][0] < 1e-3
    # acts: 1F1B rank 0 has pp = 16 micro-batches in flight, rank 13 has 3 (same 8 blocks each)
    assert rows[0][1] > rows[13][1]
    # + the grad norm's float64 scalar summed over the pp group once a step
    assert [(c.ranks, c.count, c.bytes) for c in est.traffic if c.axis == "pp" and c.op == "all_reduce"] == [(16, 1, 8)]
    pp_rows = [c for c in est.traffic if c.axis == "pp" and c.op != "all_reduce"]
    hidden = 4096 * 16384 * 2                       # mbs 1 x seq 4096 x hidden x bf16 per hop
    assert {c.op for c in pp_rows} == {"send", "recv"}
    assert all(c.bytes == c.count * hidden for c in pp_rows)
    assert pp_rows[0].count == 64                   # the peak rank, stage 1: forward + backward per micro-batch
    t = est.time
    bubble = 15 / (32 + 15)
    busy = t.compute_s + t.attention_s + t.memory_s + t.recompute_s      # the stage's whole compute
    assert abs(t.bubble_s - busy * bubble / (1 - bubble)) < 1e-9 and t.pp_s > 0


def test_sequence_parallel_sends_and_buffers_are_tp_times_smaller():
    """Under sequence parallel a stage sends its local Shard(1) slice (mbs, T / tp, H) and the next
    re-wraps it (runtime/pp.Stage): the receive buffers and the send rows are tp = 8 times those
    without SP (the 405B pp 16 row above: 2 x 32 x 4096 x 16384 x bf16 -> / 8). Counted whole, pp 8
    x tp 8 of Llama-3.1-405B on 64 H100 was 0.3 GB over the budget (docs/PERFORMANCE.md)."""
    off, on = resolve(R405).estimate, resolve(R405, "tp.sequence_parallel=true").estimate
    # the peak moves to rank 0 (its one more micro-batch in flight now outweighs rank 1's buffers):
    # rank 0 receives gradients only, 32 micro-batches x 4096 / 8 x 16384 x bf16
    assert (off.pp_peak_rank, on.pp_peak_rank) == (1, 0)
    assert on.pp_buffers_bytes == 1 * 32 * 4096 // 8 * 16384 * 2
    sends = {c.op: c for c in on.traffic if c.axis == "pp"}
    assert sends["send"].count == 32 and sends["send"].bytes == 32 * 4096 // 8 * 16384 * 2
    assert on.time.pp_s < off.time.pp_s


def _tiny_pp(world: int, **kw) -> dict:
    return tiny_recipe("ppn", world, model=str(ROOT / "tests/dist/configs/tiny-llama-4l.json"), **kw)


def _placement_line(md: str) -> str:
    return next(line for line in md.splitlines() if line.startswith("Node placement"))


def test_plan_md_says_which_axes_cross_nodes():
    """torchrun numbers ranks node by node, pp is outermost: 405B pp 16 x fsdp 4 x tp 8 on 64 x 8
    GPUs puts a stage group (32 ranks) on 4 whole nodes, dp_shard's groups (8 x 4 = 32 ranks)
    across them and tp (8) inside one."""
    from meshbake.compiler.render import render_bundle

    md = render_bundle(resolve(R405))["PLAN.md"].decode()
    assert _placement_line(md) == ("Node placement (rank r on node r // 8, torchrun's order): across nodes: pp, "
                                   "dp_shard; inside a node: tp. Stage group 0 = ranks 0-31 on nodes 0-3.")


def test_stage_group_may_split_a_node_but_tp_may_not_cross_one():
    """world / pp not a multiple of the node's GPUs: 3 nodes x 4, pp 2 -> 6 ranks per stage group,
    so node 1 holds the end of group 0 (ranks 4-5) and the start of group 1 (6-7): compiled, and
    PLAN.md says so. tp 8 on 4-GPU nodes stays the mesh stage's error under pp too."""
    d = _tiny_pp(4, mesh={"pp": 2, "dp_shard": -1, "tp": 2}, cluster={"nodes": 3}, train={"global_batch_size": 12})
    b = compiled(d)
    assert json.loads(b.files["plan.json"])["mesh"]["dp_shard"] == 3
    assert _placement_line(b.files["PLAN.md"].decode()) == (
        "Node placement (rank r on node r // 4, torchrun's order): across nodes: pp, dp_shard; inside a node: tp. "
        "Stage group 0 = ranks 0-5 on nodes 0-1 (world / pp = 6 is not a multiple of 4: neighbouring stage groups "
        "share a node).")
    # one node holds both stage groups: nothing crosses a node
    one = compiled(_tiny_pp(4, mesh={"pp": 2, "dp_shard": -1, "tp": 2}))
    assert _placement_line(one.files["PLAN.md"].decode()).startswith(
        "Node placement (rank r on node r // 4, torchrun's order): across nodes: none; inside a node: pp, tp.")
    bad = resolve(yaml.safe_dump(_tiny_pp(4, mesh={"pp": 2, "dp_shard": -1, "tp": 8}, cluster={"nodes": 4})))
    assert isinstance(bad, Err)
    assert any(e.path == "mesh.tp" and "does not divide cluster.gpus_per_node=4" in e.message for e in bad.errors)


def test_memory_fixes_under_pp_are_valid_under_pp():
    """A pp recipe over budget is offered fixes that pp accepts: never LoRA or loss parallel
    (both refused with mesh.pp > 1), a larger pp instead, and every fix re-run through the
    pipeline's rules too: 405B pp 16 on 40 GB -> pp 32 (65.6 GB, still over: the estimate drops; 17.2 GB of it the
    receive buffers of 64 micro-batches at dp 2);
    Interleaved1F1B x 2 at pp 32 cannot double pp (64 x 2 = 128 stages > 126 blocks)."""
    from meshbake.compiler.estimate import _fix_candidates, memory_fixes

    r = resolve(R405, "cluster.gpu_memory_gb=40")
    assert isinstance(r, Err) and [e.path for e in r.errors] == ["cluster.gpu_memory_gb"]
    hint = r.errors[0].hint
    assert "--set mesh.pp=32 --set mesh.dp_shard=-1" in hint
    assert "lora" not in hint and "loss_parallel" not in hint
    fixed = resolve(R405, "cluster.gpu_memory_gb=40", "mesh.pp=32", "mesh.dp_shard=-1")
    assert isinstance(fixed, Err) and [e.path for e in fixed.errors] == ["cluster.gpu_memory_gb"]   # pp rules pass
    assert "estimated 65.6 GB" in fixed.errors[0].message
    assert "per rank on pp rank 1 (per pp rank: 60.8 GB, 65.6 GB," in fixed.errors[0].message   # which stage peaks
    # the pp-doubling candidate is built, then dropped by the pipeline's rule (blocks >= stages)
    # (99.4 GB with the receive buffers of 64 micro-batches x 2 directions x 2 local stages: a larger GPU)
    ok = resolve(R405, "mesh.pp=32", "pp.schedule=Interleaved1F1B", "pp.stages_per_rank=2", "cluster.gpu_memory_gb=200")
    assert not isinstance(ok, Err), ok
    est = replace(ok.estimate, budget_bytes=ok.estimate.total_bytes // 2)
    cands = _fix_candidates(est, ok.recipe, ok.mesh, "activations")
    assert any(("mesh.pp", 64) in f.sets for f in cands)
    assert all(k not in ("lora.rank", "tp.loss_parallel") for f in cands for k, _ in f.sets)
    assert not any(("mesh.pp", 64) in f.sets for f in memory_fixes(est, ok.recipe, ok.mesh, ok.model))


def test_llama_family_types_compile_with_pp_tied_included():
    """Mistral / Qwen2 / Qwen3 run Llama's forward (parity: tests/test_pp.py's Qwen2 and Qwen3
    cases): each compiles at pp 2 with the blocks split 1 + 1, the tied Qwen fixtures too (the
    last stage holds a copy of the table: tests/test_pp.py's tied cases); Gemma2 (scales
    inputs_embeds) stays refused by type."""
    for mt in ("mistral", "qwen2", "qwen3"):
        rec = tiny_recipe("pp", 2, mesh={"pp": 2}, model=str(ROOT / f"tests/models/{mt}/config.json"))
        r = resolve(yaml.safe_dump(rec))
        assert not isinstance(r, Err), (mt, r)
        assert r.plan.pp.stages == ((0, 1), (1, 2)) and r.plan.model.config["model_type"] == mt
    assert {mt for mt in ("qwen2", "qwen3")
            if json.loads((ROOT / f"tests/models/{mt}/config.json").read_text())["tie_word_embeddings"]} == {"qwen2", "qwen3"}
    gemma = resolve(yaml.safe_dump(tiny_recipe("pp", 2, mesh={"pp": 2}, model=str(ROOT / "tests/models/gemma2/config.json"))))
    assert isinstance(gemma, Err) and any("model_type gemma2 has no pipeline stage split" in e.message for e in gemma.errors)


def test_tied_embeddings_estimate_the_last_stages_copy_and_its_all_reduce():
    """Tied embeddings under pp (tiny-qwen-mha: vocab 4096 x hidden 64 = 262,144, 2 blocks): the
    last stage's rank holds its own copy of the table as lm_head's weight, placed like lm_head
    (colwise: vocab / tp rows), so its parameters are the copy + block 1 + the final norm, not
    the block alone (and not the whole table as a replicated 'rest'); the peak rank's traffic
    has one all-reduce of the local gradient shard per step over the (first, last) pair, which
    the send/recv bytes leave out; the step time counts it. ZBV (rank 0 runs both): one
    parameter, no copy, no all-reduce."""
    model = str(ROOT / "tests/dist/configs/tiny-qwen-mha.json")
    table = 4096 * 64
    for mesh, shards in (({"pp": 2, "tp": 2}, 2), ({"pp": 2, "dp_shard": 2}, 1)):     # shards: tp
        r = resolve(yaml.safe_dump(tiny_recipe("pp", 4, mesh=mesh, model=model)))
        assert not isinstance(r, Err), r
        est = r.estimate
        rows = {k: n for k, n, _ in est.pp_rank_rows}
        # the two ranks differ by the final norm only (64, whole on each tp rank, halved by FSDP):
        # table / tp + block 0 against copy / tp + block 1 + norm (the copy counted whole: + 131,072)
        fsdp = mesh.get("dp_shard", 1)
        assert rows[1] - rows[0] == 64 // fsdp and rows[0] > table // (shards * fsdp), rows
        tied = [c for c in est.traffic if c.axis == "pp" and c.op == "all_reduce" and c.what.startswith("tied")]
        local = table // (mesh.get("tp", 1) * mesh.get("dp_shard", 1))
        assert [(c.ranks, c.count, c.bytes) for c in tied] == [(2, 1, local * 4)], tied
        assert est.pp_comm_bytes == sum(c.bytes for c in est.traffic if c.op in ("send", "recv"))
    zbv = resolve(yaml.safe_dump(tiny_recipe("pp", 2, mesh={"pp": 2}, pp={"schedule": "ZBVZeroBubble", "stages_per_rank": 2},
                                             model=str(ROOT / "tests/dist/configs/tiny-llama-4l-tied.json"))))
    assert not isinstance(zbv, Err), zbv
    # no tied all-reduce: only the grad norm's 8 B scalar over pp
    assert [(c.op, c.bytes) for c in zbv.estimate.traffic if c.axis == "pp" and c.op == "all_reduce"] == [("all_reduce", 8)]
    # rank 0 holds the table once (4 blocks, 2 per rank; rank 1: its 2 blocks, no table, no norm)
    rows = {k: n for k, n, _ in zbv.estimate.pp_rank_rows}
    assert rows[0] - rows[1] == table + 64, rows


def test_tied_pp_dry_run_holds_the_estimated_parameters_per_rank():
    """The dry run (each rank's own stages built on the meta device, a fake process group)
    holds exactly the estimate's per-rank parameters with a tied table: the last stage's copy
    counted once, vocab / tp rows (pp 2 x tp 2: 164,064 / 164,128), FSDP-sharded (pp 2 x
    dp_shard 2, Interleaved1F1B, 4 blocks: 192,640 / 192,672)."""
    import torch.distributed as dist
    from meshbake.runtime.dryrun import dryrun

    qwen, llama4 = (str(ROOT / f"tests/dist/configs/{n}.json") for n in ("tiny-qwen-mha", "tiny-llama-4l-tied"))
    # (pp 2 x dp_shard 2 1F1B and ZBV measured equal too; left out to keep this test cheap)
    for world, mesh, model, pp in ((4, {"pp": 2, "tp": 2}, qwen, None),
                                   (4, {"pp": 2, "dp_shard": 2}, llama4, {"schedule": "Interleaved1F1B", "stages_per_rank": 2})):
        r = resolve(yaml.safe_dump(tiny_recipe("pp", world, mesh=mesh, model=model, **({"pp": pp} if pp else {}))))
        assert not isinstance(r, Err), r
        built = dryrun(r.plan, [0, world - 1])
        assert not dist.is_initialized()
        assert all(b["ok"] for b in built), built
        # ranks 0 and world - 1: the first rank of stage group 0 and the last of stage group pp - 1
        assert [b["params"] for b in built] == [n for _, n, _ in r.estimate.pp_rank_rows], (mesh, pp, built)


def test_moe_types_compile_with_pp_and_ep_inside_the_stage_groups():
    """Qwen3-MoE and Mixtral (parity: tests/test_pp.py's MoE cases) compile at pp 2, with the
    router aux loss (exact under pp: runtime/pp.aux_carry) and with ep 2 carved from each stage
    group's dp_shard 2 (its all-to-all rows in the estimate). The per-stage memory counts each
    stage's own MLPs as they run (compiler/estimate._moe_mlp_activations over the stage's modules):
    the tiny Qwen3-MoE's block 0 is MoE and block 1 dense (mlp_only_layers [1]), so the two stages'
    per-layer bytes differ, and their sum over the stages is the whole model's."""
    from meshbake.compiler.estimate import _moe_mlp_activations, _pp_model, pp_ranks

    def moe(mt: str, world=2, **mesh):
        rec = tiny_recipe("pp", world, mesh={"pp": 2, **mesh}, model=str(ROOT / f"tests/models/{mt}/config.json"),
                          train={"router_aux_loss_coef": 0.1})
        return resolve(yaml.safe_dump(rec))

    for mt in ("qwen3_moe", "mixtral"):
        r = moe(mt)
        assert not isinstance(r, Err), (mt, r)
        assert r.plan.pp.stages == ((0, 1), (1, 2)) and r.plan.train.router_aux_loss_coef == 0.1
        ep = moe(mt, 4, dp_shard=2, ep=2)
        assert not isinstance(ep, Err), (mt, ep)
        # the rows are the peak pp rank's (stage 1, block 1): MoE in Mixtral, dense in the tiny Qwen3-MoE
        # (mlp_only_layers [1]), whose stage 1 issues no all-to-all
        assert (ep.plan.mesh.ep, ep.plan.mesh.experts_fsdp) == (2, 1) and ep.estimate.pp_peak_rank == 1
        assert (ep.estimate.ep_comm_bytes > 0) == (mt == "mixtral"), (mt, ep.estimate.ep_comm_bytes)
        assert r.estimate.ep_comm_bytes == 0
        # the dry run (fake process group, meta model) builds each rank's stages with ep inside the stage
        # group: ranks 0, 1 hold stage 0, ranks 2, 3 stage 1, each with the estimate's params per pp rank
        from meshbake.runtime.dryrun import dryrun

        built = dryrun(ep.plan, [0, 1, 2, 3])
        assert all(b["ok"] for b in built), built
        assert [b["params"] for b in built] == [ep.estimate.pp_rank_rows[i // 2][1] for i in range(4)], built
    r = moe("qwen3_moe")
    ranks = pp_ranks(r.recipe, r.model, r.mesh)
    per = [_moe_mlp_activations(_pp_model(r.model, k), r.mesh, 4) for k in ranks]
    whole = _moe_mlp_activations(r.model, r.mesh, 4)
    assert per[0][0] > per[1][0], per     # the MoE block: k = 2 copies of 64 wide vs the dense MLP, 128 wide
    assert per[0][0] + per[1][0] == 2 * whole[0]            # a stage's share scales with its own layers
    assert r.estimate.pp_rank_rows[0][2] != r.estimate.pp_rank_rows[1][2]
    # a model type without a stage split stays refused by type, with the path and the fix
    q2 = resolve(yaml.safe_dump(tiny_recipe("pp", 2, mesh={"pp": 2}, model=str(ROOT / "tests/models/qwen2_moe/config.json"))))
    assert isinstance(q2, Err) and any("model_type qwen2_moe has no pipeline stage split" in e.message
                                       and e.path == "model.config" for e in q2.errors)
