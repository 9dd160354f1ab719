"""model.weights' safetensors headers checked at compile time (issue 22 item 3, compiler/weights.py):
real checkpoints written by save_pretrained of tiny models from tests/models, then a tensor dropped
or altered by rewriting the file with safetensors.torch.save_file. The check maps names with the
runtime loader's own function (runtime/fused.checkpoint_sources), and the loader loads what the
check accepts (a base-model checkpoint without the `model.` prefix, tied lm_head absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import ROOT, cli, tiny_recipe
from tests.test_hub import compile_dict, hub, hub_cache, qwen_recipe  # noqa: F401 (fixtures)

LLAMA = ROOT / "tests/models/llama/config.json"       # hidden 64, 2 layers, vocab 1024, untied


def _save(folder: Path, cfg: dict, base: bool = False) -> Path:
    from meshbake.runtime.parallel import hf_config
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    (AutoModel if base else AutoModelForCausalLM).from_config(hf_config(cfg)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("llama"), json.loads(LLAMA.read_text()))


def _edit(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint with its tensors edited (dict in, dict out), rewritten by save_file."""
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


def _compile(weights: Path | str, config: Path | str = LLAMA):
    d = tiny_recipe("w", 1, model=str(config))
    d["model"]["weights"] = str(weights)
    return compile_dict(d)


def _err(b, hint: str = "F32 / F16 / BF16") -> str:
    assert not hasattr(b, "files"), "compiled"
    errs = [e for e in b.errors if e.path == "model.weights"]
    assert len(errs) == 1 and hint in errs[0].hint, b.errors
    return errs[0].message


def test_a_whole_checkpoint_is_verified_and_planmd_says_so(ckpt):
    b = _compile(ckpt)
    assert hasattr(b, "files"), b
    line = b.resolved.weights.line
    assert line.startswith("verified: 21 parameters in 1 file (F32; loaded as float32)"), line
    assert f"weights: {line}" in b.files["PLAN.md"].decode().replace("\\", "")


def test_a_missing_tensor_and_a_wrong_shape_are_named(ckpt, tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        return t

    msg = _err(_compile(_edit(ckpt, tmp_path / "drop", drop)))
    assert msg.endswith("has no tensor for parameter model.layers.1.mlp.up_proj.weight [128, 64]"), msg

    def shape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
        return t

    msg = _err(_compile(_edit(ckpt, tmp_path / "shape", shape)))
    assert "tensor model.layers.0.self_attn.k_proj.weight is [16, 64], the model's " \
           "model.layers.0.self_attn.k_proj.weight is [32, 64]" in msg, msg

    def both(t):
        return shape(drop(t))

    msg = _err(_compile(_edit(ckpt, tmp_path / "both", both)))          # the first in model order, and a count
    assert "k_proj.weight is [16, 64]" in msg and msg.endswith("(and 1 more)"), msg

    def untie(t):                       # lm_head absent while the config is untied: the loader would fail
        del t["lm_head.weight"]
        return t

    assert "has no tensor for parameter lm_head.weight [1024, 64]" in _err(_compile(_edit(ckpt, tmp_path / "nh", untie)))

    def quantized(t):
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 128, dtype=torch.int32)
        return t

    msg = _err(_compile(_edit(ckpt, tmp_path / "q", quantized)))
    assert "down_proj.weight is I32" in msg and "quantized" in msg, msg

    def bf16(t):                        # a float dtype is cast by the loader: accepted
        return {k: v.to(torch.bfloat16) for k, v in t.items()}

    b = _compile(_edit(ckpt, tmp_path / "bf16", bf16))
    assert b.resolved.weights.line.startswith("verified: 21 parameters in 1 file (BF16; loaded as float32)")


def test_truncated_and_sharded_checkpoints(ckpt, tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (ckpt / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _err(_compile(cut), hint="re-download")
    assert msg.startswith(f"{cut}: model.safetensors is 411,316 bytes but its header describes 822,632 (truncated"), msg
    # two shards and an index, as save_pretrained writes a big model; then one shard gone
    t = load_file(str(ckpt / "model.safetensors"))
    shards = tmp_path / "shards"
    shards.mkdir()
    names = sorted(t)
    wm = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    for f in sorted(set(wm.values())):
        save_file({k: t[k] for k in names if wm[k] == f}, str(shards / f))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert _compile(shards).resolved.weights.line.startswith("verified: 21 parameters in 2 files")
    (shards / "model-00002-of-00002.safetensors").unlink()
    msg = _err(_compile(shards), hint="re-download")
    assert "1 of the 2 files model.safetensors.index.json names are not here (model-00002-of-00002" in msg, msg


def test_base_model_checkpoint_tied_loads_as_the_check_says(tmp_path):
    """keys without `model.` (AutoModel.save_pretrained) and no lm_head (tied): verified, and the
    runtime loader reads every parameter from them (the same mapping)."""
    from meshbake.runtime import plan as P
    from meshbake.runtime.parallel import load_weights, meta_model

    cfg = {**json.loads(LLAMA.read_text()), "tie_word_embeddings": True}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/config.json").write_text(json.dumps(cfg))
    folder = _save(tmp_path / "base", cfg, base=True)
    saved = load_file(str(folder / "model.safetensors"))
    assert "layers.0.self_attn.q_proj.weight" in saved and "lm_head.weight" not in saved
    b = _compile(folder, tmp_path / "cfg/config.json")
    assert hasattr(b, "files"), b
    assert b.resolved.weights.line.startswith("verified: 20 parameters"), b.resolved.weights.line
    plan = P.loads(b.files["plan.json"].decode())
    model = meta_model(plan).to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, str(folder), seed=0)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name.removeprefix("model.")]), name
    # untied, the same base-model checkpoint lacks lm_head: refused before the queue
    assert "parameter lm_head.weight" in _err(_compile(folder))


def test_offline_and_not_cached_is_not_verified(hub, tmp_path):  # noqa: F811 (the fixture)
    """Qwen3-8B's config and tokenizer are cached, its weights are not; HF_HUB_OFFLINE=1."""
    b = compile_dict(qwen_recipe())
    assert hasattr(b, "files"), b
    assert not b.resolved.weights.verified
    md = b.files["PLAN.md"].decode()
    row = next(x for x in md.splitlines() if x.startswith("| weights |"))
    assert "weights: not verified (Qwen/Qwen3-8B@" in row and "HF_HUB_OFFLINE is set" in row, row
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(qwen_recipe()))
    ran = cli("check", str(r))
    lines = ran.stdout.strip().splitlines()
    assert ran.returncode == 0 and lines[-2].startswith("weights: not verified (Qwen/Qwen3-8B@"), ran.stdout
