"""The attention's T^2 tensors in the memory estimate (issue 25): packed documents and context
parallel pass SDPA an explicit mask, which it converts to the compute dtype and saves per layer;
causal synthetic rows pass none. Compile-level; tests/test_measured.py holds the packed case
to the measured CPU peak."""
from meshbake.compiler.errors import Err

from tests.helpers import recipe_text, resolve

DATA = {"format": "text", "path": "corpus.txt", "tokenizer": "tok"}


def _est(**kw):
    r = resolve(recipe_text(**kw))
    assert not isinstance(r, Err), r
    return r


def test_causal_synthetic_rows_have_no_mask():
    r = _est(train={"seq_len": 8192, "global_batch_size": 8})
    assert r.estimate.attn_mask_bytes == 0


def test_packed_rows_count_one_mask_per_layer_without_ac():
    """llama-3.1-8b, tp 8, bf16 compute, seq 8192, mbs 1, AC none: 32 layers x (1 x 8192^2 x 2 B
    of the converted mask + K/V repeated from 8 to 32 heads: 2 x 8192 x 24 x 128 x 2 B / tp)."""
    kw = dict(data=DATA, train={"seq_len": 8192, "global_batch_size": 8,
                                "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}})
    packed = _est(**kw).estimate
    per = 8192 ** 2 * 2 + 2 * 8192 * 24 * 128 * 2 // 8
    assert packed.attn_mask_bytes == 32 * per
    plain = _est(train=kw["train"]).estimate
    assert packed.total_bytes - plain.total_bytes == 32 * per


def test_ac_keeps_one_bool_mask_and_one_layer_copy():
    kw = dict(data=DATA, train={"seq_len": 8192, "global_batch_size": 8, "activation_checkpointing": "full",
                                "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}})
    e = _est(**kw).estimate
    assert e.attn_mask_bytes == 8192 ** 2 + 8192 ** 2 * 2 + 2 * 8192 * 24 * 128 * 2 // 8


def test_seq_131072_packed_mask_is_named_in_the_memory_error():
    """The finding: at seq 131072 a packed row's bool mask alone is 17 GB; without AC one bf16
    copy per layer is 34 GB each, and the over-budget error names the mask as the largest term."""
    r = resolve(recipe_text(data=DATA, cluster={"nodes": 2, "gpus_per_node": 8, "gpu_memory_gb": 80},
                            mesh={"tp": 8, "cp": 2},
                            train={"seq_len": 131072, "global_batch_size": 1,
                                   "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}))
    assert isinstance(r, Err)
    e = next(x for x in r.errors if x.path == "cluster.gpu_memory_gb")
    assert "largest term: attn_mask" in e.message and "activation_checkpointing" in e.hint


def test_context_parallel_mask_is_per_rank_rows_and_kept_all_step():
    """runtime/cp.py: a (Tq, T) bool mask of the global positions (Tq = T / cp) kept in its state,
    converted per layer; under AC full one converted copy while a layer is recomputed."""
    kw = dict(cluster={"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80}, mesh={"tp": 4, "cp": 2},
              train={"seq_len": 8192, "global_batch_size": 1, "activation_checkpointing": "full",
                     "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}})
    e = _est(**kw).estimate
    state = 4096 * 8192
    assert e.attn_mask_bytes == state + state * 2
    phases = dict(e.phases)
    assert phases["optimizer step"] == e.params_bytes + e.optimizer_bytes + 2 * e.grads_bytes + state


def test_plan_md_names_the_kernel_and_the_row():
    from tests.helpers import compile_

    b = compile_(recipe_text(data=DATA, train={"seq_len": 4096, "global_batch_size": 8}))
    md = b.files["PLAN.md"].decode()
    assert "runs as sdpa + explicit document mask (memory-efficient kernel)" in md
    assert "| attn_mask |" in md and "saved in each of the 32 layers" in md
    plain = compile_(recipe_text(train={"seq_len": 4096, "global_batch_size": 8})).files["PLAN.md"].decode()
    assert "runs as sdpa, is_causal (flash attention)" in plain
    assert "| attn_mask | 0" in plain or "none: causal rows" in plain


def test_schema_describes_selective_ac_as_the_runtime_does():
    """runtime/parallel.apply_ac: selective is op-level SAC in every block (matmul and attention
    outputs saved), not "every other block"."""
    import json

    from tests.helpers import ROOT

    schema = json.loads((ROOT / "runtime/recipe.schema.json").read_text())
    desc = schema["properties"]["train"]["properties"]["activation_checkpointing"]["description"]
    assert "every other block" not in desc and "op-level" in desc and "matmul" in desc
