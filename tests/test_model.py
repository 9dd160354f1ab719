"""model stage: facts come from the real transformers classes built on the meta device."""
import pytest
from meshbake.compiler.errors import Err
from meshbake.compiler.model import catalog_config, catalog_names, model_spec


@pytest.fixture(scope="module")
def llama70b():
    return model_spec(catalog_config("llama-3.1-70b"), "llama-3.1-70b")


def test_catalog_has_the_real_architectures():
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen2.5-0.5b", "qwen2.5-7b",
                 "mistral-7b-v0.3", "tiny-llama", "tiny-qwen"):
        assert name in catalog_names()


def test_llama70b_facts(llama70b):
    m = llama70b
    assert m.architecture == "LlamaForCausalLM"
    assert m.num_params == 70_553_706_496     # 70.6e9, the number every memory estimate starts from
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads) == (80, 8192, 64, 8)
    assert m.intermediate_size == 28672 and m.vocab_size == 128256 and m.head_dim == 128
    assert not m.tie_word_embeddings


def test_module_tree_from_transformers(llama70b):
    kinds = {}
    for mod in llama70b.modules:
        kinds[mod.kind] = kinds.get(mod.kind, 0) + 1
    # 7 Linear per block + lm_head; 2 norms per block + final norm; one embedding
    assert kinds == {"linear": 80 * 7 + 1, "norm": 80 * 2 + 1, "embedding": 1}
    by = {mod.fqn: mod for mod in llama70b.modules}
    assert by["model.layers.0.self_attn.k_proj"].shape == (1024, 8192)      # 8 kv heads x 128
    assert by["model.layers.79.mlp.down_proj"].shape == (8192, 28672)
    assert by["lm_head"].shape == (128256, 8192)
    assert llama70b.block_params == 4 * 8192 * 8192 // 4 * 2 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    assert llama70b.hf_tp_plan["model.layers.*.self_attn.o_proj"] == "rowwise"


def test_qwen_tied_embeddings_counted_once():
    m = model_spec(catalog_config("qwen2.5-0.5b"), "qwen2.5-0.5b")
    assert m.tie_word_embeddings and m.architecture == "Qwen2ForCausalLM"
    assert m.num_params == 494_032_768        # the published 0.49B: the tied lm_head is not counted twice
    assert (m.num_heads, m.num_kv_heads) == (14, 2)


def test_unknown_model_type_is_an_error_at_model_config():
    r = model_spec({"model_type": "not-a-model", "hidden_size": 8}, "x.json")
    assert isinstance(r, Err) and r.errors[0].path == "model.config"
    r = model_spec({"hidden_size": 8}, "x.json")
    assert isinstance(r, Err) and "model_type" in r.errors[0].message
