"""`meshbake import axolotl`: real Axolotl example configs (tests/fixtures/axolotl, see SOURCE.md)
and the tutorial's configs become recipes; every key is accounted for; the result passes
`meshbake check` or the reasons are the expected ones."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from meshbake.compiler import load
from meshbake.compiler.errors import Err
from meshbake.compiler.importers.axolotl import STATUSES, guess_model, import_axolotl
from meshbake.compiler.importers.cli import check_text
from meshbake.compiler.model import catalog_names

FIX = Path(__file__).parent / "fixtures" / "axolotl"
CONFIGS = sorted(p for p in FIX.iterdir() if p.suffix in (".yml", ".yaml"))


def _import(path: Path, **kw):
    cfg = load.parse_yaml(path.read_text(encoding="utf-8"), path.name)
    assert not isinstance(cfg, Err), cfg
    ref = kw.pop("model_ref", None) or guess_model(cfg.get("base_model"), catalog_names(), lambda p: False)
    mc = load.read_model_config(ref) if ref else None
    imp = import_axolotl(cfg, path.stem, source=path.name, model_ref=ref,
                         model_config=None if isinstance(mc, Err) else mc, **kw)
    return cfg, imp


def _recipe(imp) -> dict:
    d = load.parse_yaml(imp.text, "imported")
    assert not isinstance(d, Err), d
    return d


def test_fixtures_are_a_dozen_real_configs_plus_the_tutorial():
    assert len([p for p in CONFIGS if not p.name.startswith("tutorial_")]) >= 12
    assert len([p for p in CONFIGS if p.name.startswith("tutorial_")]) == 3
    src = (FIX / "SOURCE.md").read_text()
    for p in CONFIGS:
        assert p.name in src or p.name.startswith("tutorial_"), p.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_key_is_accounted_for_and_the_recipe_checks(path):
    cfg, imp = _import(path)
    if imp.refused:      # quantized base weights / QLoRA / QAT: no recipe, every reason given
        assert imp.text == "" and all(n.status == "refused" and n.reason for n in imp.refused)
        assert {n.key for n in imp.refused} <= {"load_in_8bit", "load_in_4bit", "adapter", "gptq", "qat"}
        return
    top = {n.key.split(".")[0] for n in imp.notes}
    assert set(cfg) <= top | {k for k in cfg if k.startswith("fsdp_")}, set(cfg) - top
    assert {n.status for n in imp.notes} <= set(STATUSES)
    assert all(n.reason for n in imp.notes if n.status in ("not mapped", "approximated"))
    for n in imp.notes:          # each key is listed in the recipe file itself, with its status
        assert f"# {n.status:<12} {n.key}" in imp.text
    d = _recipe(imp)
    res = check_text(imp.text, path.name)
    if isinstance(res, Err):
        # the only reasons a real config may fail: a model meshbake's catalog lacks (no hub
        # access), or it really does not fit the 80 GB GPUs (the tutorial's 70B full fine-tunes)
        assert {e.path for e in res.errors} <= {"model.config", "cluster.gpu_memory_gb"}, res.errors
        if any(e.path == "model.config" for e in res.errors):
            assert "TODO" in imp.text and d["model"]["config"] == cfg["base_model"]
    else:
        assert res.plan.mesh.world == d["cluster"]["nodes"] * d["cluster"]["gpus_per_node"]


def test_guess_model_from_hub_ids():
    cat = ["llama-3.1-8b", "phi-3-mini-4k", "qwen3-8b"]
    assert guess_model("NousResearch/Meta-Llama-3.1-8B", cat, lambda p: False) == "llama-3.1-8b"
    assert guess_model("microsoft/Phi-3-mini-4k-instruct", cat, lambda p: False) == "phi-3-mini-4k"
    assert guess_model("Qwen/Qwen3-8B", cat, lambda p: False) == "qwen3-8b"
    assert guess_model("meta-llama/Llama-3.2-1B", cat, lambda p: False) is None
    assert guess_model("/models/my-llama", cat, lambda p: p == "/models/my-llama") == "/models/my-llama"


def test_hsdp_tp_example_maps_mesh_batch_and_optimizer_defaults():
    cfg, imp = _import(FIX / "distributed-parallel_llama-3_1-8b-hsdp-tp.yaml")
    d = _recipe(imp)
    assert d["model"]["config"] == "llama-3.1-8b"          # meta-llama/Llama-3.1-8B
    assert d["mesh"] == {"dp_replicate": 2, "dp_shard": -1, "cp": 1, "tp": 2}    # 4 = world / the other axes
    assert (d["cluster"]["nodes"], d["cluster"]["gpus_per_node"]) == (2, 8)   # world 16
    t = d["train"]
    assert t["global_batch_size"] == 1 * 1 * 2 * 4 and "grad_accum" not in t      # derived: 1
    assert t["lr"] == pytest.approx(2e-6)                   # the YAML 1.1 string '2e-6'
    assert t["lr_schedule"] == "constant" and t["warmup_ratio"] == 0.1     # of the run's steps, whatever they become
    assert t["epochs"] == 2 and "steps" not in t                # num_epochs: steps come from the prepared data
    assert t["betas"] == [0.9, 0.999] and t["weight_decay"] == 0.0 and t["seed"] == 42
    assert t["mixed_precision"]["param_dtype"] == "bfloat16"
    assert d["run_dir"] == "./outputs/ndp-out"
    status = {n.key: n.status for n in imp.notes}
    assert status["plugins"] == "not mapped" and status["datasets"] == "mapped"
    assert status["datasets[0].path"] == "mapped"        # tatsu-lab/alpaca: a Hub id, pinned and read from the cache
    assert d["data"] == {"format": "alpaca", "sources": [{"path": "tatsu-lab/alpaca"}],
                         "tokenizer": "meta-llama/Llama-3.1-8B", "packing": True, "prepared_dir": "last_run_prepared"}
    assert status["fsdp_config.reshard_after_forward"] == "implied"
    res = check_text(imp.text, "x")
    assert not isinstance(res, Err), res
    assert res.plan.mesh.shape == (2, 4, 1, 2) and res.mesh.grad_accum == 1
    # num_epochs 2, warmup_ratio 0.1: the runtime resolves both once it has the windows
    from meshbake.runtime.plan import resolve_steps

    assert (res.plan.train.steps, res.plan.train.epochs, res.plan.train.warmup_ratio) == (None, 2.0, 0.1)
    assert resolve_steps(res.plan, 8000).train.warmup_steps == 200      # 2 x 8000 / 8 = 2000 steps


def test_lora_target_linear_takes_every_block_linear_of_the_model():
    cfg = {**load.parse_yaml((FIX / "llama-3_instruct-lora-8b.yml").read_text(), "x"), "load_in_8bit": False}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="llama-3.1-8b",
                         model_config=load.read_model_config("llama-3.1-8b"))
    d = _recipe(imp)
    assert sorted(d["lora"]["targets"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    assert d["lora"] == {**d["lora"], "rank": 32, "alpha": 16.0, "dropout": 0.05}
    assert d["model"]["dtype"] == "bfloat16"
    status = {n.key: n.status for n in imp.notes}
    assert status["load_in_8bit"] == "implied" and status["optimizer"] == "approximated"
    assert status["lora_dropout"] == "mapped"        # the runtime drops out the adapter input
    assert not isinstance(check_text(imp.text, "x"), Err)


def test_lora_target_linear_on_mixtral_takes_the_experts_too_but_not_under_qlora():
    """Axolotl's real Mixtral-8x7B example (QLoRA, lora_target_linear, lora_dropout 0.05): the 4-bit
    base keeps the experts out (NF4 is 2-D Linear weights only) and the note says so; the same
    config as a bf16 LoRA adapts attention + the grouped experts (PEFT's target_parameters), never
    the router, and compiles."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    for name in ("mistral_mixtral_mixtral.yml", "mistral_mistral-qlora-fsdp.yml"):
        cfg, imp = _import(FIX / name)
        assert cfg["adapter"] == "qlora" and cfg["lora_target_linear"] is True
        d = _recipe(imp)
        assert d["model"]["config"] == "mixtral-8x7b" and d["lora"]["quantize_base"] == "nf4"
        assert d["lora"]["targets"] == attention and d["lora"]["dropout"] == 0.05
        notes = {n.key: n for n in imp.notes}
        assert notes["lora_target_linear"].status == "mapped" and "not the MoE experts" in notes["lora_target_linear"].reason
        assert notes["lora_dropout"].status == "mapped"
    cfg = {**load.parse_yaml((FIX / "mistral_mixtral_mixtral.yml").read_text(), "x"), "adapter": "lora",
           "load_in_4bit": False}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="mixtral-8x7b",
                         model_config=load.read_model_config("mixtral-8x7b"))
    d = _recipe(imp)
    assert d["lora"]["targets"] == [*attention, "experts.gate_up_proj", "experts.down_proj"]
    assert "quantize_base" not in d["lora"] and d["lora"]["dropout"] == 0.05
    reason = {n.key: n.reason for n in imp.notes}["lora_target_linear"]
    assert "experts.gate_up_proj" in reason and "router is no target" in reason
    res = check_text(imp.text, "x")
    assert not isinstance(res, Err), res.errors
    targets = res.plan.model.roles.lora_targets
    assert "model.layers.31.mlp.experts.down_proj" in targets and not any(t.endswith(".gate") for t in targets)
    # the example's commented-out lora_target_modules list (Mixtral's hub names and the router)
    cfg = {**cfg, "lora_target_linear": None, "lora_target_modules": ["gate", *attention, "w1", "w2", "w3"]}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="mixtral-8x7b",
                         model_config=load.read_model_config("mixtral-8x7b"))
    assert _recipe(imp)["lora"]["targets"] == [*attention, "experts.gate_up_proj", "experts.down_proj"]
    note = {n.key: n for n in imp.notes}["lora_target_modules"]
    assert note.status == "approximated" and "w2 -> experts.down_proj" in note.reason and "router" in note.reason
    assert not isinstance(check_text(imp.text, "x"), Err)


def test_qlora_maps_to_an_nf4_base_and_tutorial_70b_reports_why_it_does_not_fit():
    _, imp = _import(FIX / "llama-3_qlora-fsdp-70b.yaml", model_ref="llama-3.1-70b")
    assert not imp.refused                                  # QLoRA is a QLoRA, not silently a bf16 LoRA
    notes = {n.key: (n.status, n.target) for n in imp.notes}
    assert notes["adapter"] == ("mapped", "lora.rank, lora.quantize_base")
    assert notes["load_in_4bit"] == ("mapped", "lora.quantize_base")
    assert "quantize_base: nf4" in imp.text
    assert not isinstance(check_text(imp.text, "x"), Err)       # QLoRA 70B (NF4 base) on 8 x 80 GB fits
    cfg = {**load.parse_yaml((FIX / "llama-3_qlora-fsdp-70b.yaml").read_text(), "x"), "adapter": "lora",
           "load_in_4bit": False}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="llama-3.1-70b")
    assert {n.key: n.status for n in imp.notes}["adapter"] == "mapped"
    assert not isinstance(check_text(imp.text, "x"), Err)       # LoRA 70B on 8 x 80 GB fits
    _, imp = _import(FIX / "tutorial_fsdp-tp-combined.yaml")
    res = check_text(imp.text, "x")
    assert isinstance(res, Err) and res.errors[0].path == "cluster.gpu_memory_gb"
    assert "exceeds 72.0 GB" in res.errors[0].message        # 70B full fine-tune on 8 x 80 GB


def test_unknown_keys_and_odd_values_are_listed_not_dropped():
    cfg = {"base_model": "meta-llama/Llama-3.1-8B", "learning_rate": "3e-5", "some_new_axolotl_key": 3,
           "optimizer": "lion_8bit", "lr_scheduler": "rex", "fsdp_config": {"offload_params": True, "weird": 1},
           "max_steps": 50, "warmup_ratio": 0.1, "save_steps": 10, "save_total_limit": 3, "seed": 7}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="llama-3.1-8b")
    notes = {n.key: n for n in imp.notes}
    assert notes["some_new_axolotl_key"].status == "not mapped"
    assert notes["optimizer"].status == "not mapped" and "AdamW" in notes["optimizer"].reason
    assert notes["lr_scheduler"].status == "approximated"
    assert notes["fsdp_config.offload_params"].status == "not mapped"
    assert notes["fsdp_config.weird"].status == "not mapped"
    d = _recipe(imp)
    assert d["train"]["steps"] == 50 and d["train"]["warmup_ratio"] == 0.1 and d["train"]["seed"] == 7
    assert check_text(imp.text, "t").plan.train.warmup_steps == 5
    assert d["checkpoint"] == {"every_steps": 10, "keep": 3}
    assert d["train"]["lr"] == pytest.approx(3e-5)


def test_chat_dataset_maps_fields_roles_split_and_eval():
    _, imp = _import(FIX / "llama-3_fft-8b-liger-fsdp.yaml")       # FineTome: conversations / from / value
    d = _recipe(imp)["data"]
    assert d["format"] == "chat"
    assert d["sources"] == [{"path": "mlabonne/FineTome-100k", "split": "train[:20%]"}]   # the first 20%
    assert d["fields"] == {"messages": "conversations", "role": "from", "content": "value"}
    assert d["roles"] == {"human": "user", "gpt": "assistant"}
    assert d["eval_fraction"] == 0.02 and d["packing"] is True
    status = {n.key: n.status for n in imp.notes}
    assert status["chat_template"] == "approximated" and status["special_tokens"] == "not mapped"
    assert status["num_epochs"] == "mapped"           # train.epochs: steps resolved from the prepared windows
    assert status["evals_per_epoch"] == status["saves_per_epoch"] == "mapped"
    t, ck = _recipe(imp)["train"], _recipe(imp)["checkpoint"]
    assert (t["epochs"], t["evals_per_epoch"], ck["per_epoch"]) == (1, 2, 1) and "steps" not in t
    assert "eval_every" not in t and "every_steps" not in ck
    assert "TODO: num_epochs" not in imp.text                # no placeholder step count left to fix
    res = check_text(imp.text, "x")
    assert not isinstance(res, Err), res
    assert res.plan.data.format == "chat" and res.plan.data.eval_fraction == 0.02


def test_local_completion_file_and_pretraining_text():
    cfg = {"base_model": "meta-llama/Llama-3.1-8B", "max_steps": 100, "eval_steps": 20, "val_set_size": 0.1,
           "datasets": [{"path": "data/corpus.jsonl", "type": "completion", "field": "body"},
                        {"path": "org/chat", "type": "chat_template"}], "train_on_inputs": False}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="llama-3.1-8b")
    d = _recipe(imp)
    assert d["data"]["format"] == "text" and d["data"]["fields"] == {"text": "body"}     # Axolotl completion = raw text
    assert d["data"]["sources"] == [{"path": "data/corpus.jsonl"}] and d["train"]["eval_every"] == 20
    notes = {n.key: n for n in imp.notes}
    assert notes["datasets"].status == "approximated" and "org/chat (chat_template) left out" in notes["datasets"].reason
    assert "datasets[0].path" not in notes                     # a local file: nothing to download
    assert not isinstance(check_text(imp.text, "t"), Err)


def test_cluster_profile_replaces_the_hardware_keys(tmp_path, capsys):
    from meshbake.compiler.cli import main

    out = tmp_path / "r.yaml"
    rc = main(["import", "axolotl", str(FIX / "distributed-parallel_llama-3_1-8b-hsdp-tp.yaml"), "-o", str(out),
               "--cluster", "gres-a100-modules"])
    assert rc == 0, capsys.readouterr()
    d = yaml.safe_load(out.read_text())
    assert d["cluster"] == {"profile": "gres-a100-modules", "nodes": 4}       # world 16 on 4-GPU nodes
    res = check_text(out.read_text(), "r")
    assert res.recipe.cluster.gpu_request == "gres" and res.plan.mesh.procs_per_node == 4


def test_wandb_and_tensorboard_keys_become_the_tracking_section():
    _, imp = _import(FIX / "qwen2_adamw-pretrain-fsdp2.yaml")      # wandb_project: dist_muon, wandb_name: adamw
    d = _recipe(imp)
    assert d["tracking"] == {"wandb": {"project": "dist_muon", "name": "adamw", "mode": "online"}}
    status = {n.key: n.status for n in imp.notes}
    assert status["wandb_project"] == status["wandb_name"] == "mapped" and status["wandb_entity"] == "empty"
    cfg = {"base_model": "meta-llama/Llama-3.1-8B", "use_tensorboard": True, "wandb_project": "p",
           "wandb_mode": "offline", "wandb_watch": "gradients"}
    imp = import_axolotl(cfg, "t", source="t.yml", model_ref="llama-3.1-8b")
    assert _recipe(imp)["tracking"] == {"tensorboard": True, "wandb": {"project": "p", "mode": "offline"}}
    assert {n.key: n.status for n in imp.notes}["wandb_watch"] == "not mapped"
    res = check_text(imp.text, "t")
    assert not isinstance(res, Err) and res.plan.tracking.wandb.mode == "offline"


def test_cli_writes_the_recipe_and_exit_code_follows_check(tmp_path, capsys):
    from meshbake.compiler.cli import main

    out = tmp_path / "tp.yaml"
    rc = main(["import", "axolotl", str(FIX / "tutorial_tensor-parallel-simple.yaml"), "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "passes `meshbake check` (world 8" in text
    assert yaml.safe_load(out.read_text())["mesh"]["tp"] == 2
    assert main(["check", str(out)]) == 0
    # the tutorial runs it on 2 GPUs: 8B with fp32 master weights + AdamW (16 B/param) / tp 2
    # = 64 GB per rank, not the tutorial's 28 GB (it counts bf16 weights)
    rc = main(["import", "axolotl", str(FIX / "tutorial_tensor-parallel-simple.yaml"), "-o", str(out),
               "--gpus-per-node", "2", "--force"])
    text = "".join(capsys.readouterr())
    # 64 GB of state + activations and the loss-parallel logits at the peak phase: over the
    # 72 GB budget of an 80 GB GPU, so the import reports it instead of a plan that OOMs
    gb = float(re.search(r"estimated ([\d.]+) GB per rank exceeds", text).group(1))
    assert rc == 2 and 72 < gb < 90 and "largest term: optimizer" in text, text
    # refuses to overwrite; a config with an unknown model is written but exits 2 with the reason
    assert main(["import", "axolotl", str(FIX / "streaming_sft.yaml"), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    rc = main(["import", "axolotl", str(FIX / "streaming_sft.yaml"), "-o", str(out), "--force"])
    assert rc == 2 and "model.config" in capsys.readouterr().out
    rc = main(["import", "axolotl", str(FIX / "streaming_sft.yaml"), "-o", str(out), "--force",
               "--model", "tiny-llama", "--gpus-per-node", "1"])
    assert rc == 0, capsys.readouterr()
    assert main(["import", "axolotl", str(tmp_path / "missing.yml")]) == 2
