"""estimate stage: per-rank bytes from placements and sharding; over budget is an error."""
from compiler.errors import Err

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
    from compiler.pipeline import KILL_WAIT_S

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
