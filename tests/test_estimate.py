"""estimate stage: per-rank bytes from placements and sharding; over budget is an error."""
import pytest
from meshbake.compiler.errors import Err

from tests.helpers import paths, recipe_text, resolve

N70 = 70_553_706_496


def test_70b_full_finetune_on_one_node_is_refused_naming_the_largest_term():
    r = resolve(recipe_text(model={"config": "llama-3.1-70b"}, mesh={"dp_shard": 4, "tp": 2},
                            train={"seq_len": 4096, "global_batch_size": 8}))
    assert isinstance(r, Err) and paths(r) == ["cluster.gpu_memory_gb"]
    e = r.errors[0]
    # 80 layers x 4096 tokens x ~265 KB saved per token and layer (tp 2, no SP) = 87 GB of
    # activations, more than AdamW's 70.6e9 x 8 B / 8 = 70.6 GB
    assert "activations" in e.message
    # no activation checkpointing: the activations do not shard with FSDP, the hint says so
    assert "activation_checkpointing: full" in e.hint
    # 70.6e9 x 16 B / 8 = 141 GB of state alone
    assert float(e.message.split("estimated ")[1].split(" GB")[0]) > 141


def test_state_bytes_follow_the_sharding():
    r = resolve(recipe_text(model={"config": "llama-3.1-70b"}, mesh={"dp_shard": 16, "tp": 2},
                            cluster={"nodes": 4, "gpus_per_node": 8, "gpu_memory_gb": 80},
                            train={"seq_len": 4096, "global_batch_size": 16, "activation_checkpointing": "full"}))
    assert not isinstance(r, Err), r
    e = r.estimate
    # everything but 2 x 80 + 1 norms (8192 each, replicated over tp) is split over 32 ranks
    norms = (2 * 80 + 1) * 8192
    assert e.params_per_rank == -(-((N70 - norms) // 2 + norms) // 16)
    assert e.params_bytes == e.params_per_rank * 4 and e.optimizer_bytes == 2 * e.params_bytes
    assert abs(e.params_bytes + e.grads_bytes + e.optimizer_bytes - N70 * 16 / 32) / (N70 * 16 / 32) < 0.001


def test_lora_has_no_optimizer_state_for_the_base():
    r = resolve(recipe_text(model={"config": "llama-3.1-70b", "dtype": "bfloat16"}, mesh={"dp_shard": 4, "tp": 2},
                            lora={"rank": 16}, train={"seq_len": 4096, "global_batch_size": 8,
                                                      "activation_checkpointing": "full"}))
    assert not isinstance(r, Err), r
    e = r.estimate
    assert e.trainable_total == 80 * 16 * ((8192 + 8192) * 2 + (8192 + 1024) * 2)   # q,o + k,v adapters
    assert e.optimizer_bytes < 0.01 * e.params_bytes


def test_full_activation_checkpointing_lowers_activations():
    text = recipe_text(tp={"sequence_parallel": True})
    none = resolve(text)
    full = resolve(text, "train.activation_checkpointing=full")
    assert full.estimate.activations_bytes < none.estimate.activations_bytes / 5


def test_oom_hint_names_the_smallest_node_count_that_fits():
    """70B full fine-tune, tp 8 on one node: the hint's node count fits, one node fewer does not."""
    import re

    text = recipe_text(model={"config": "llama-3.1-70b"}, mesh={"dp_shard": -1, "tp": 8},
                       tp={"sequence_parallel": True, "loss_parallel": True},
                       train={"seq_len": 4096, "global_batch_size": 48, "activation_checkpointing": "full"})
    r = resolve(text)
    assert isinstance(r, Err) and paths(r) == ["cluster.gpu_memory_gb"]
    nodes = int(re.search(r"cluster\.nodes: (\d+)", r.errors[0].hint).group(1))
    assert nodes > 1
    assert not isinstance(resolve(text, f"cluster.nodes={nodes}"), Err)
    fewer = resolve(text, f"cluster.nodes={nodes - 1}")
    assert isinstance(fewer, Err) and paths(fewer) == ["cluster.gpu_memory_gb"]


def test_a_save_longer_than_killwait_is_a_plan_warning():
    """Preemption/scancel: SIGTERM to every process, SIGKILL KillWait (30 s by default) later.
    8B on tp 8: 12.0 GB per rank x 8 per node / 2 GB/s + 12.0 GB / 1.5 GB/s of sha256 = ~56 s."""
    from meshbake.compiler.plan import KILL_WAIT_S

    def save_warnings(*overrides):
        r = resolve(recipe_text(), *overrides)
        assert not isinstance(r, Err), r
        return [w for w in r.plan.warnings if "KillWait" in w]

    (w,) = save_warnings()
    s = int(w.split("checkpoint save ~")[1].split(" s ")[0])
    assert 40 < s < 70 and s > KILL_WAIT_S and "leaves room for it" in w, w
    (w,) = save_warnings("cluster.signal_seconds=10")      # 10 + 30 s < ~56 s
    assert "does not leave room for it either: raise signal_seconds" in w
    assert save_warnings("checkpoint.every_steps=0", "checkpoint.save_on_exit=false") == []
    assert save_warnings("model.config=tiny-llama", "mesh.tp=1", "mesh.dp_shard=8") == []


def test_grad_sync_trades_held_gradients_for_reduce_scatter_traffic():
    """grad_sync last_micro_step: every rank holds its unsharded TP-local gradients between
    micro-steps (70B / tp 8 x 4 B = 35 GB) and reduce-scatters once; every_micro_step keeps
    them sharded and reduce-scatters grad_accum times."""
    text = recipe_text(model={"config": "llama-3.1-70b"}, mesh={"dp_replicate": 2, "dp_shard": 4, "tp": 8},
                       tp={"sequence_parallel": True, "loss_parallel": True},
                       cluster={"nodes": 8, "gpus_per_node": 8, "gpu_memory_gb": 80},
                       train={"seq_len": 8192, "global_batch_size": 64, "activation_checkpointing": "full"})
    every = resolve(text).estimate
    last = resolve(text, "train.grad_sync=last_micro_step", "cluster.gpu_memory_gb=200").estimate
    assert every.accum_grads_bytes == 0
    tp_local = N70 // 8 + (2 * 80 + 1) * 8192 * 7 // 8     # norms are replicated over tp
    assert abs(last.accum_grads_bytes - tp_local * 4) < 4 * 8192 * 8
    # reduce-scatter of the fp32 TP-local grads (padded rows) after each of the 8 micro-steps vs
    # once, and HSDP's all-reduce of the reduce-scattered quarter across the 2 replicas likewise
    def comm(e, axis, op):
        return sum(c.bytes for c in e.traffic if c.axis == axis and c.op == op)

    assert comm(every, "dp_shard", "reduce_scatter") == 8 * comm(last, "dp_shard", "reduce_scatter")
    assert abs(comm(last, "dp_shard", "reduce_scatter") / (tp_local * 4) - 1) < 1e-3
    assert comm(every, "dp_replicate", "all_reduce") == 8 * comm(last, "dp_replicate", "all_reduce")
    assert abs(comm(last, "dp_replicate", "all_reduce") / (tp_local * 4 / 4) - 1) < 1e-3
    # on the wire: a ring reduce-scatter moves 3/4 of it per rank, the 2-rank all-reduce 2 x 1/2
    assert every.fsdp_comm_bytes - last.fsdp_comm_bytes == pytest.approx(7 * tp_local * 4 * (3 / 4 + 1 / 4), rel=1e-3)
    # the held grads are all alive at the last micro-step's loss backward: that is the peak now
    assert last.peak_phase == "loss backward" and every.peak_phase == "optimizer step"
    # ... in place of the sharded grads, which every_micro_step holds from the second micro-step on
    assert (dict(last.phases)["loss backward"] - dict(every.phases)["loss backward"]
            == last.accum_grads_bytes - every.grads_bytes)


def test_one_flops_per_token_for_plan_and_mfu():
    """torchtitan's 6 N + 12 L H Dh T with N = every parameter but the input embedding; the
    runtime's MFU reads the same number from plan.json (and its fallback gives it too)."""
    from meshbake.runtime import plan as P
    from meshbake.runtime.metrics import flops_per_token

    r = resolve(recipe_text(train={"seq_len": 8192, "global_batch_size": 8}))
    n = 8_030_261_248 - 128256 * 4096
    want = 6 * n + 12 * 32 * 32 * 128 * 8192
    assert r.estimate.flops_per_token == want          # 57.91e9 (PLAN.md said 61.07e9 before)
    assert flops_per_token(r.plan) == want
    bare = P.from_dict({**P.plan_to_dict(r.plan), "estimate": {}})
    assert flops_per_token(bare) == want


def test_lora_flops_skip_the_frozen_weight_gradients():
    """The unmerged form (runtime/lora.py): every base weight 4 per parameter (forward + input
    gradient, adapted or not: no weight gradient, no s B A temporary); the adapters 6 per
    parameter, r (in + out) per adapted Linear, like any trained Linear."""
    r = resolve(recipe_text(model={"config": "llama-3.1-8b", "dtype": "bfloat16"}, lora={"rank": 16, "targets": ["q_proj"]},
                            train={"seq_len": 4096, "global_batch_size": 8, "activation_checkpointing": "full"}))
    n = 8_030_261_248 - 128256 * 4096
    want = 4 * n + 6 * 32 * 16 * (4096 + 4096) + 12 * 32 * 4096 * 4096
    assert r.estimate.flops_per_token == want
    # the micro-batch no longer matters (the merged form spread 6 out r in per micro-step over it)
    r2 = resolve(recipe_text(model={"config": "llama-3.1-8b", "dtype": "bfloat16"}, lora={"rank": 16, "targets": ["q_proj"]},
                             train={"seq_len": 4096, "global_batch_size": 8, "micro_batch_size": 2,
                                    "activation_checkpointing": "full"}))
    assert r2.estimate.flops_per_token == want


def _rows(est, axis: str, op: str) -> tuple[int, int]:
    got = [c for c in est.traffic if c.axis == axis and c.op == op]
    return sum(c.count for c in got), sum(c.bytes for c in got)


def test_traffic_of_70b_hsdp_tp_by_hand():
    """recipes/70b_hsdp_tp (dp_replicate 2 x dp_shard 4 x tp 8, SP + LP, full AC, 8 micro-steps
    of 1 x 8192 tokens, bf16 compute over fp32 masters), re-derived from the rules in
    estimate.traffic (which tests/test_measured.py holds to every collective of CPU runs)."""
    from meshbake.compiler import load
    from meshbake.compiler.pipeline import resolve_dict

    res = resolve_dict(load.load_recipe("recipes/70b_hsdp_tp.yaml", (), None))
    est, L, ga, h = res.estimate, 80, 8, 8192
    a = 8192 * h * 2                                   # one activation collective: tokens x hidden x bf16
    # per micro-step: forward the embedding RS, 2 AG + 2 RS per layer, lm_head's input AG; backward
    # the transposes (the embedding's AG included: it trains); full AC +2 AG +1 RS per layer
    ag, rs = 1 + 2 * L + 1 + 2 * L + 2 * L, 1 + 2 * L + 2 * L + 1 + L
    assert _rows(est, "tp", "all_gather") == (ga * ag, ga * ag * a)
    assert _rows(est, "tp", "reduce_scatter") == (ga * rs, ga * rs * a)
    # FSDP over dp_shard 4 (every TP-local dim 0 divides by 4: no padding), params in bf16
    block = (h * h * 2 + 1024 * h * 2 + 3 * 28672 * h) // 8 + 2 * h   # q, o, k, v, gate, up, down / tp; 2 norms
    root = 2 * 128256 // 8 * h + h                                   # embedding + lm_head / tp; final norm
    assert _rows(est, "dp_shard", "all_gather") == (ga * (1 + L + L - 1), ga * (root + 2 * L * block - block) * 2)
    # every micro-step reduce-scatters (grad_sync every_micro_step) in fp32; the second all_reduce
    # row on dp_shard is the clipping norm of the 723 parameter tensors
    assert _rows(est, "dp_shard", "reduce_scatter") == (ga * (1 + L), ga * (root + L * block) * 4)
    assert _rows(est, "dp_replicate", "all_reduce") == (ga * (1 + L), ga * (root + L * block) // 4 * 4)
    assert _rows(est, "dp_shard", "all_reduce") == (1, (2 + L * 9 + 1) * 4)
    # 161 replicated norms' Partial grads per synced micro-step; 3 loss-parallel all-reduces per micro-step
    tp_ar = [c for c in est.traffic if c.axis == "tp" and c.op == "all_reduce"]
    assert sorted((c.count, c.bytes) for c in tp_ar) == sorted(
        [(1, (2 + L * 9 + 1) * 4), (3 * ga, 3 * ga * 8192 * 4), (ga * (2 * L + 1), ga * (2 * L + 1) * h * 2)])
    # what the step-time model reads: ring bytes per rank
    assert est.tp_comm_bytes == sum(c.bytes * (2 if c.op == "all_reduce" else 1) * 7 // 8
                                    for c in est.traffic if c.axis == "tp")


def test_lora_frozen_first_layer_skips_its_input_gradient_collectives():
    """LoRA freezes the embedding and the norms: layer 0's attention input needs no gradient, so
    its backward reduce-scatter (SP) is not issued, nor the embedding's all-gather; with
    activation checkpointing transformers makes the embedding output require grad and layer 0
    computes it again (measured: tests/test_measured.py comm_lora_ac_full)."""
    text = recipe_text(model={"config": "tiny-llama"}, mesh={"dp_shard": 2, "tp": 2},
                       tp={"sequence_parallel": True, "loss_parallel": True},
                       cluster={"nodes": 1, "gpus_per_node": 4, "device": "cpu", "gpu_memory_gb": 8},
                       train={"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 4},
                       lora={"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]})
    full = resolve(text, "lora.rank=0").estimate
    lora = resolve(text).estimate
    ac = resolve(text, "train.activation_checkpointing=full").estimate
    L = 2
    assert _rows(full, "tp", "reduce_scatter")[0] == 1 + 2 * L + 2 * L + 1
    assert _rows(lora, "tp", "reduce_scatter")[0] == 1 + 2 * L + (2 * L - 1) + 1
    assert _rows(full, "tp", "all_gather")[0] == 2 * L + 1 + 2 * L + 1
    assert _rows(lora, "tp", "all_gather")[0] == 2 * L + 1 + 2 * L
    assert _rows(ac, "tp", "reduce_scatter")[0] == 1 + 2 * L + 2 * L + 1 + L
    # LoRA: the root (embedding, final norm, lm_head) has no trainable params: no reduce-scatter for it
    assert _rows(lora, "dp_shard", "reduce_scatter")[0] == L and _rows(full, "dp_shard", "reduce_scatter")[0] == L + 1
