"""Issue 9, findings 5-7: hostile but fair input to the compiler. Each was a traceback, a hang
or a silently wrong plan; each must be a RecipeError at its JSON path with a hint (exit 2)."""
from __future__ import annotations

import contextlib
import io
import json
import time

import pytest
import yaml
from meshbake.compiler.cli import main
from meshbake.compiler.errors import Err
from meshbake.compiler.load import read_model_config

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
    cfg = {**read_model_config("tiny-llama"), key: value}
    msgs = errors_at(with_config(tmp_path, cfg), "model.config")
    assert any(says in m for m in msgs), msgs


@pytest.mark.parametrize("cfg,says", [
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 4096}, "not one meshbake runs"),
    ({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 4096}, "not one meshbake"),
    ({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 4096}, "not one meshbake runs"),     # was a runtime failure
    ({"model_type": "gptj", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 4096}, "not one meshbake runs"),
    ({"model_type": "gemma3", "text_config": {"hidden_size": 64}}, "not one meshbake runs"),
    ({"model_type": "t5", "d_model": 64}, "not a causal LM"),
    ({"model_type": "lama", "hidden_size": 64}, "did you mean 'llama'"),
])
def test_unsupported_model_types_are_refused_at_compile_time(tmp_path, cfg, says):
    msgs = errors_at(with_config(tmp_path, cfg), "model.config")
    assert any(says in m for m in msgs), msgs


def test_a_model_without_model_layers_is_refused_after_the_build():
    """The structural check behind the allow-list: BertLMHeadModel has bert.encoder.layer, not model.layers."""
    from meshbake.compiler.model import _meta_model, _structure_error

    cfg = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 4096}
    err = _structure_error(_meta_model(cfg), 2, "bert", "x.json")
    assert err is not None and "BertLMHeadModel" in err.message
    assert _structure_error(_meta_model(read_model_config("tiny-llama")), 2, "llama", "x") is None


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


@pytest.mark.parametrize("text", ['{"model_type": "llama", "rope_theta": NaN}', '[' * 100000 + ']' * 100000])
def test_config_json_with_nan_or_deep_nesting_is_an_error(tmp_path, text):
    """json.loads reads NaN (plan.json then held NaN, which is not JSON) and recurses on nesting."""
    p = tmp_path / "config.json"
    p.write_text(text)
    msgs = errors_at(resolve(tiny_text(model={"config": str(p)})), "model.config")
    assert any("cannot read config.json" in m for m in msgs), msgs


@pytest.mark.parametrize("text,says", [
    ("name: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than"),   # PyYAML's scanner: quadratic, 2.5 s
    ("name: x\n" + "# pad\n" * 100000, "a recipe is a few KB"),
])
def test_pathological_yaml_is_refused_before_parsing(text, says):
    from meshbake.compiler.load import parse_yaml

    t0 = time.perf_counter()
    r = parse_yaml(text, "r.yaml")
    assert isinstance(r, Err) and says in str(r.errors[0]), r
    assert time.perf_counter() - t0 < 2.0       # generous: it is a linear pre-scan (measured 0.05 s)


def test_huge_config_json_is_refused_unread(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "llama", "pad": "' + "x" * 2_000_000 + '"}')
    msgs = errors_at(resolve(tiny_text(model={"config": str(p)})), "model.config")
    assert any("is not a config.json" in m for m in msgs), msgs


def test_cli_deeply_nested_file_exits_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")       # RecursionError in PyYAML's composer
    rc, err = cli(["check", str(p)])
    assert rc == 2 and "nested more than" in err, err


# ---- finding 6: hangs ------------------------------------------------------------------------

def test_hundred_thousand_layers_is_refused_quickly(tmp_path):
    """The meta-device module tree of 100000 layers took minutes; the bound is checked first."""
    t0 = time.perf_counter()
    msgs = errors_at(with_config(tmp_path, {**read_model_config("tiny-llama"), "num_hidden_layers": 100000}),
                     "model.config")
    assert any("num_hidden_layers is 100000" in m for m in msgs), msgs
    assert time.perf_counter() - t0 < 30        # generous: the machine is shared; it was minutes


# ---- finding 7: bad values accepted ----------------------------------------------------------

@pytest.mark.parametrize("key", ["vocab_size", "num_hidden_layers"])
def test_zero_sizes_are_errors(tmp_path, key):
    msgs = errors_at(with_config(tmp_path, {**read_model_config("tiny-llama"), key: 0}), "model.config")
    assert any(f"{key} is 0" in m for m in msgs), msgs


def test_bare_model_type_names_the_missing_facts(tmp_path):
    """{"model_type": "llama"} silently became a 6.7B Llama-2 from transformers' defaults."""
    msgs = errors_at(with_config(tmp_path, {"model_type": "llama"}), "model.config")
    assert any("lacks hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size" in m
               for m in msgs), msgs


def test_tokenizer_larger_than_model_vocab_is_a_compile_error(tmp_path):
    """data/tokenizer has 4096 ids; a model with vocab 1024 failed only at run time."""
    from tests.helpers import ROOT

    data = {"source": "text", "path": str(ROOT / "data/shakespeare.txt"), "tokenizer": str(ROOT / "data/tokenizer")}
    msgs = errors_at(with_config(tmp_path, {**read_model_config("tiny-llama"), "vocab_size": 1024}, data=data),
                     "data.tokenizer")
    assert any("up to 4095" in m and "vocab_size is 1024" in m for m in msgs), msgs
    ok = with_config(tmp_path, read_model_config("tiny-llama"), data=data)
    assert not isinstance(ok, Err), ok


def test_special_token_past_the_embedding_counts_only_when_the_run_emits_it(tmp_path):
    """Gemma 3's tokenizer carries <image_soft_token> (id 262144) one past the text model's
    262,144-row embedding; only its image processor inserts it, and counting it refused every
    gemma-3 text recipe. A special token the chat template or eos names is still an error."""
    import shutil

    from meshbake.compiler.load import tokenizer_vocab

    from tests.helpers import ROOT

    tok = tmp_path / "tok"
    shutil.copytree(ROOT / "data/tokenizer", tok)
    tj = json.loads((tok / "tokenizer.json").read_text())
    n = tokenizer_vocab(str(tok))
    tj["added_tokens"].append({"id": n, "content": "<image_soft_token>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((tok / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {str(n): {"content": "<image_soft_token>", "special": True}}
    (tok / "tokenizer_config.json").write_text(json.dumps(tc))
    assert tokenizer_vocab(str(tok)) == n              # listed in added_tokens_decoder: not emitted
    (tok / "chat_template.jinja").write_text("{% for m in messages %}<image_soft_token>{{ m.content }}{% endfor %}")
    assert tokenizer_vocab(str(tok)) == n + 1          # the template emits it
    (tok / "chat_template.jinja").unlink()
    (tok / "tokenizer_config.json").write_text(json.dumps({**tc, "eos_token": {"content": "<image_soft_token>"}}))
    assert tokenizer_vocab(str(tok)) == n + 1          # eos: appended to every document
    tj["added_tokens"][-1]["special"] = False          # a plain added token: ordinary text produces it
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    (tok / "tokenizer_config.json").write_text(json.dumps(tc))
    assert tokenizer_vocab(str(tok)) == n + 1


def test_slow_tokenizer_vocab_json_is_read(tmp_path):
    from meshbake.compiler.load import tokenizer_vocab

    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 7}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": 9}))
    assert tokenizer_vocab(str(tmp_path)) == 10
    assert tokenizer_vocab(str(tmp_path / "absent")) is None


def test_plan_md_cannot_be_hidden_by_html_or_markdown(tmp_path):
    """An unclosed `<!--` in model.weights hid the rest of PLAN.md when rendered."""
    from markdown_it import MarkdownIt
    from meshbake.compiler.pipeline import compile_recipe

    b = compile_recipe(tiny_text(model={"config": "tiny-llama", "weights": "w<!--`x|y"},
                                 run_dir="runs/<!-- `|` *a* -->", lora={"rank": 0, "targets": ["q_proj<b>"]}))
    assert not isinstance(b, Err), b
    html = MarkdownIt("commonmark").enable("table").render(b.files["PLAN.md"].decode())
    assert "<!--" not in html and "<b>" not in html, html
    for heading in ("Mesh", "Per-rank memory", "Warnings", "Launch"):
        assert f"<h2>{heading}" in html
    assert "w&lt;!--`x|y" in html                  # the value itself is shown, literally, once
    assert "runs/&lt;!-- `|` *a* --&gt;" in html


def test_hf_folder_private_keys_stay_out_of_plan_json(tmp_path):
    """`_name_or_path` (a user's home path) was copied into plan.json."""
    from meshbake.compiler.pipeline import compile_recipe

    cfg = {**read_model_config("tiny-llama"), "_name_or_path": "/home/alice/models/secret",
           "_commit_hash": "abc", "transformers_version": "4.44.0"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    b = compile_recipe(tiny_text(model={"config": str(tmp_path)}))
    assert not isinstance(b, Err), b
    plan = json.loads(b.files["plan.json"])
    assert not {"_name_or_path", "_commit_hash", "transformers_version"} & set(plan["model"]["config"])
    assert b"/home/alice" not in b"".join(b.files.values())


def test_an_internal_bug_is_one_line_and_exit_70(tmp_path, monkeypatch):
    """The last resort: whatever slips past the checks is one line naming it a bug, no traceback."""
    import meshbake.compiler.cli as cli_mod

    def boom(args):
        raise KeyError("x")
    monkeypatch.setattr(cli_mod, "_resolve", boom)
    monkeypatch.delenv("MESHBAKE_DEBUG", raising=False)
    p = tmp_path / "r.yaml"
    p.write_text(tiny_text())
    rc, err = cli(["check", str(p)])
    assert rc == 70 and "internal error (KeyError" in err and len(err.strip().splitlines()) == 1, err


def test_every_supported_type_has_a_model_fixture():
    """The allow-list and the parity matrix (tests/models/<model_type>/) name the same families."""
    from meshbake.compiler.model import SUPPORTED_TYPES

    from tests.helpers import ROOT

    fixtures = sorted(p.name for p in (ROOT / "tests/models").iterdir() if (p / "config.json").is_file())
    assert sorted(SUPPORTED_TYPES) == fixtures
