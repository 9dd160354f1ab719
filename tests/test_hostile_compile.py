"""Issue 9, findings 5-7: hostile but fair input to the compiler. Each was a traceback, a hang
or a silently wrong plan; each must be a RecipeError at its JSON path with a hint (exit 2)."""
from __future__ import annotations

import contextlib
import io
import json
import time

import pytest
import yaml

from compiler.cli import main
from compiler.errors import Err
from compiler.model import catalog_config
from tests.helpers import resolve

TINY = {"name": "t", "model": {"config": "tiny-llama"}, "mesh": {"tp": 2},
        "cluster": {"nodes": 1, "gpus_per_node": 2, "device": "cpu", "gpu_memory_gb": 2},
        "train": {"seq_len": 64, "global_batch_size": 2, "steps": 2}}


def tiny_text(**sections) -> str:
    return yaml.safe_dump({**TINY, **sections}, sort_keys=False)


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def with_config(tmp_path, cfg: dict, **sections):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return resolve(tiny_text(model={"config": str(p)}, **sections))


def errors_at(res, path: str) -> list[str]:
    assert isinstance(res, Err), "compiled"
    return [f"{e.message} | {e.hint}" for e in res.errors if e.path == path]


# ---- finding 5: tracebacks -------------------------------------------------------------------

@pytest.mark.parametrize("key,value,says", [
    ("num_attention_heads", 0, "num_attention_heads is 0"),          # ZeroDivisionError
    ("num_key_value_heads", 0, "num_key_value_heads is 0"),          # ZeroDivisionError
    ("head_dim", 0, "head_dim is 0"),                                # ZeroDivisionError in rope
    ("hidden_size", "64", 'hidden_size is "64"'),                    # StrictDataclassFieldValidationError
    ("hidden_size", None, "hidden_size is null"),
    ("hidden_size", -64, "hidden_size is -64"),                      # RuntimeError: negative dimension
    ("intermediate_size", True, "intermediate_size is true"),
    ("num_hidden_layers", 2.5, "num_hidden_layers is 2.5"),
])
def test_bad_size_facts_are_errors(tmp_path, key, value, says):
    cfg = {**catalog_config("tiny-llama"), key: value}
    msgs = errors_at(with_config(tmp_path, cfg), "model.config")
    assert any(says in m for m in msgs), msgs


@pytest.mark.parametrize("cfg,says", [
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 4096}, "not a Llama-style decoder"),
    ({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 4096}, "not a Llama-style"),
    ({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 4096}, "builds BertLMHeadModel"),     # was a runtime failure
    ({"model_type": "gemma3", "text_config": {"hidden_size": 64}}, "multimodal"),
    ({"model_type": "t5", "d_model": 64}, "not a causal LM"),
    ({"model_type": "lama", "hidden_size": 64}, "did you mean 'llama'"),
])
def test_unsupported_model_types_are_refused_at_compile_time(tmp_path, cfg, says):
    msgs = errors_at(with_config(tmp_path, cfg), "model.config")
    assert any(says in m for m in msgs), msgs


def test_unknown_model_type_hint_is_short(tmp_path):
    """It printed transformers' list of all 800+ model types (12 KB)."""
    msgs = errors_at(with_config(tmp_path, {"model_type": "zzzz-nothing", "hidden_size": 8}), "model.config")
    assert msgs and all(len(m) < 400 for m in msgs), msgs
    assert "model types" in msgs[0]


@pytest.mark.parametrize("sets,path", [
    (["run_dir=2024-01-01"], None),                                  # a date is a fine directory name
    (["train.steps=2024-01-01"], "train.steps"),                     # was json.dumps(date) TypeError
    (["tp.plan={1: colwise}"], "--set"),                             # a non-string key inside a value
    (["train.lr=[" * 200 + "]" * 200], "--set"),                      # deep nesting inside a value
    (["cluster.gpu_memory_gb=1e300"], "cluster.gpu_memory_gb"),      # OverflowError int(inf)
])
def test_cli_set_values_exit_2_or_0_never_raise(tmp_path, sets, path):
    p = tmp_path / "r.yaml"
    p.write_text(tiny_text())
    rc, err = cli(["check", str(p)] + [a for s in sets for a in ("--set", s)])
    if path is None:
        assert rc == 0, err
    else:
        assert rc == 2 and f"  {path}:" in err, err


def test_cli_deeply_nested_file_exits_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")       # RecursionError in PyYAML's composer
    rc, err = cli(["check", str(p)])
    assert rc == 2 and "nested more than" in err, err
