"""model stage: facts come from the real transformers classes built on the meta device."""
import pytest
from meshbake.compiler.errors import Err
from meshbake.compiler.load import read_model_config
from meshbake.compiler.model import catalog_names, model_spec


@pytest.fixture(scope="module")
def llama70b():
    return model_spec(read_model_config("llama-3.1-70b"), "llama-3.1-70b")


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
    assert llama70b.hf_tp_plan["model.layers.*.self_attn.o_proj"] == "rowwise"


def test_roles_are_read_off_the_transformers_model(llama70b):
    """Decided once here, carried in plan.json: the runtime and the later stages read them."""
    r = llama70b.roles
    assert (r.embedding, r.lm_head, r.final_norm, r.block_prefix, r.num_blocks, r.tied) == (
        "model.embed_tokens", "lm_head", "model.norm", "model.layers", 80, False)
    assert r.blocks[-1] == "model.layers.79" and r.lora_targets == ()
    assert [r.where(f) for f in ("model.embed_tokens", "model.layers.3.mlp.up_proj", "model.layers.79.mlp.up_proj",
                                 "model.layers.7", "lm_head")] == ["root", "block", "last", "block", "root"]
    # LoRA targets by leaf name, resolved to fqns; the lm_head never, even if asked for
    assert llama70b.lora_targets(("q_proj", "lm_head"))[:2] == ("model.layers.0.self_attn.q_proj",
                                                                "model.layers.1.self_attn.q_proj")
    assert len(llama70b.lora_targets(("q_proj", "lm_head"))) == 80
    assert len(llama70b.lora_targets(None)) == 80 * 7


def test_qwen_tied_embeddings_counted_once():
    m = model_spec(read_model_config("qwen2.5-0.5b"), "qwen2.5-0.5b")
    assert m.tie_word_embeddings and m.roles.tied and m.architecture == "Qwen2ForCausalLM"
    assert m.num_params == 494_032_768        # the published 0.49B: the tied lm_head is not counted twice
    assert (m.num_heads, m.num_kv_heads) == (14, 2)


def test_unknown_model_type_is_an_error_at_model_config():
    r = model_spec({"model_type": "not-a-model", "hidden_size": 8}, "x.json")
    assert isinstance(r, Err) and r.errors[0].path == "model.config"
    r = model_spec({"hidden_size": 8}, "x.json")
    assert isinstance(r, Err) and "model_type" in r.errors[0].message
