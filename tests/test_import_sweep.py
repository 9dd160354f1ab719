"""What the sweep over every Axolotl example config (scripts/import_sweep.py, docs/IMPORT_SWEEP.md)
found and fixed, each on the real config it was found on (tests/fixtures/axolotl/sweep, SOURCE.md
gives the upstream path): keys that silently made the run another one are refused with the key and
a fix, keys that were dropped or mis-mapped now map, and the sweep's own audit (every key noted, no
catch-all reason, recipe values equal to their Axolotl source) holds on every one of them.
Import only (one `check`): cheap."""
from __future__ import annotations

from pathlib import Path

import pytest
from meshbake.compiler import load
from meshbake.compiler.errors import Err
from meshbake.compiler.importers.axolotl import guess_model, import_axolotl, regex_targets
from meshbake.compiler.importers.cli import check_text
from meshbake.compiler.model import catalog_names, model_spec

from scripts.import_sweep import CATCH_ALL, mismatches, unaccounted

SWEEP = Path(__file__).parent / "fixtures" / "axolotl" / "sweep"
CONFIGS = sorted(p for p in SWEEP.iterdir() if p.suffix in (".yml", ".yaml"))


def _cfg(name: str | Path) -> dict:
    path = SWEEP / name if isinstance(name, str) else name
    cfg = load.parse_yaml(path.read_text(encoding="utf-8"), path.name)
    assert not isinstance(cfg, Err), cfg
    return cfg


def _import(cfg: dict, model_ref: str | None = None):
    ref = model_ref or guess_model(cfg.get("base_model"), catalog_names(), lambda p: False)
    mc = load.read_model_config(ref) if ref else None
    return import_axolotl(cfg, "t", source="t.yml", model_ref=ref, model_config=None if isinstance(mc, Err) else mc)


def _notes(imp) -> dict:
    return {n.key: n for n in imp.notes}


def _recipe(imp) -> dict:
    d = load.parse_yaml(imp.text, "imported")
    assert isinstance(d, dict), d
    return d


def test_the_fixtures_are_the_real_configs_named_in_source_md():
    src = (SWEEP.parent / "SOURCE.md").read_text(encoding="utf-8")
    assert len(CONFIGS) >= 12
    for p in CONFIGS:
        assert f"sweep/{p.name}" in src, p.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_sweeps_audit_holds_on_each(path):
    """Refused with a reason for every key, or imported with every key (top level and each
    dataset's) noted, none with the catch-all reason, and no recipe value off its Axolotl value."""
    cfg = _cfg(path)
    imp = _import(cfg)
    if imp.refused:
        assert imp.text == "" and all(n.status == "refused" and n.key in cfg and len(n.reason) > 40
                                      for n in imp.refused), imp.refused
        return
    assert unaccounted(cfg, imp.notes) == []
    assert [n.key for n in imp.notes if CATCH_ALL in n.reason] == []
    assert mismatches(cfg, _recipe(imp)) == []


@pytest.mark.parametrize("name, keys", [
    ("mistral_dpo_mistral-dpo-qlora.yml", {"rl"}),                      # was SFT on random tokens
    ("llama-2_relora.yml", {"relora"}),                                 # was plain LoRA
    ("qwen2_5-vl_lora-7b.yaml", {"processor_type"}),                    # was the text model, no images
    ("mistral_bigstral_bigstral-ds-zero3.yaml", {"unfrozen_parameters", "tokens"}),   # was a full FT, no new token
    ("archived_jeopardy-bot_config.yml", {"datasets"}),                 # was synthetic data
])
def test_keys_that_change_the_run_are_refused_with_the_key_and_a_fix(name, keys):
    imp = _import(_cfg(name))
    assert {n.key for n in imp.refused} == keys and imp.text == ""
    for n in imp.refused:
        assert any(w in n.reason for w in ("remove", "set ", "convert", "write", "save")), n.reason


def test_unfrozen_parameters_over_the_whole_text_model_is_a_full_fine_tune():
    # qwen3.5/27b-fft.yaml unfreezes model.language_model.* and lm_head.*: every weight of the text model
    imp = _import(_cfg("qwen3.5_27b-fft.yaml"))
    assert not imp.refused and _notes(imp)["unfrozen_parameters"].status == "implied"
    assert "lora" not in _recipe(imp)


def test_output_router_logits_is_the_router_aux_loss_and_checks():
    imp = _import(_cfg("mistral_mixtral_mixtral-qlora-fsdp.yml"))
    d = _recipe(imp)
    assert d["train"]["router_aux_loss_coef"] == 0.02          # Mixtral-8x7B config.json's coefficient
    assert _notes(imp)["model_config"].status == "mapped"
    res = check_text(imp.text, "mixtral-qlora-fsdp")
    assert not isinstance(res, Err), res.errors
    assert res.recipe.train.router_aux_loss_coef == 0.02


def test_deepspeed_says_which_zero_stage_fsdp2_replaces_and_the_offload():
    n = _notes(_import(_cfg("alst_llama3-8b-deepspeed-alst.yaml")))["deepspeed"]
    assert n.status == "approximated" and n.target == "mesh.dp_shard"
    assert "ZeRO-3 is replaced by FSDP2" in n.reason and "CPU offload is not supported" in n.reason
    zero2 = _import({**_cfg("alst_llama3-8b-deepspeed-alst.yaml"), "deepspeed": "deepspeed_configs/zero2.json"})
    reason = _notes(zero2)["deepspeed"].reason
    assert "ZeRO-2" in reason and "also shards the parameters" in reason and "offload" not in reason


def test_pretraining_text_column_is_the_text_field():
    cfg = _cfg("streaming_pretrain.yaml")
    imp = _import(cfg)
    notes = _notes(imp)
    assert notes["pretraining_dataset[0].text_column"].status == "mapped"
    assert notes["pretrain_multipack_attn"].status == "implied"
    renamed = {**cfg, "pretraining_dataset": [{**cfg["pretraining_dataset"][0], "text_column": "body"}]}
    assert _recipe(_import(renamed))["data"]["fields"] == {"text": "body"}


def test_lora_target_parameters_adapt_the_grouped_experts():
    # the base here is NVFP4 (no offline config): its architecture is Qwen3-30B-A3B's (--model)
    imp = _import(_cfg("qwen3_30b-a3b-nvfp4-lora.yaml"), model_ref="qwen3-30b-a3b")
    targets = _recipe(imp)["lora"]["targets"]
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"]
    assert _notes(imp)["lora_target_parameters"].status == "mapped"


def test_revision_of_model_pins_the_weights():
    imp = _import(_cfg("mimo_mimo-7b-qlora.yaml"))
    assert _recipe(imp)["model"]["weights"] == "XiaomiMiMo/MiMo-7B-RL@6299b5a"
    assert _notes(imp)["revision_of_model"].status == "mapped"


def test_thinking_fields_and_every_dataset_key_are_noted():
    notes = _notes(_import(_cfg("gpt-oss_gpt-oss-20b-fft-fsdp2.yaml")))
    # field_thinking: thinking passed to the template as `thinking`: meshbake passes the message's thinking field
    assert notes["datasets[0].field_thinking"].status == "implied"
    assert notes["datasets[0].template_thinking_key"].status == "implied"


def test_a_lora_target_modules_regex_is_resolved_or_refused():
    fqns = model_spec(load.read_model_config("llama-3.1-8b"), "t").lora_targets(None)
    # LiquidAI/lfm2-8b-a1b-lora.yaml's regex: every layer's attention and MLP projections
    every = r"model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"
    assert sorted(regex_targets(every, fqns)[0]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    # qwen2_5-vl/lora-7b.yaml's, written for the multimodal names (model.language_model.layers...)
    vl = r"model.language_model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"
    assert len(regex_targets(vl, fqns)[0]) == 7
    # ebft/qwen35-4b-ebft-structured.yaml's: attention of 8 layers only, MLP of all: not leaf names
    some = r".*\.layers\.(3|7|11|15|19|23|27|31)\.self_attn\.(q|k|v|o)_proj|.*\.mlp\.(gate|up|down)_proj"
    targets, why = regex_targets(some, fqns)
    assert targets == [] and "some layers only" in why
    cfg = {"base_model": "meta-llama/Llama-3.1-8B", "adapter": "lora", "lora_r": 8, "lora_target_modules": some,
           "datasets": [{"path": "a.jsonl", "type": "alpaca"}]}
    assert [n.key for n in _import(cfg).refused] == ["lora_target_modules"]
    d = _recipe(_import({**cfg, "lora_target_modules": every}))
    assert sorted(d["lora"]["targets"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
