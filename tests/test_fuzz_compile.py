"""Issue 9: the compiler never prints a traceback and never hangs, whatever it is given.

Seeded random recipes (mutated structures, raw YAML snippets: aliases, tags, odd keys), random
`--set` values and random config.json values go through the real CLI entry point in-process;
each must return 0 or 2 within a time bound. Deterministic: the same cases on every run.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import signal
import time

import pytest
import yaml
from meshbake.compiler.cli import main
from meshbake.compiler.load import read_model_config

SEED = 20269
CASE_SECONDS = 20          # generous: the machine is shared; a hang was minutes (billion laughs > 120 s)

BASE = {"name": "fz", "model": {"config": "tiny-llama"}, "mesh": {"tp": 2, "dp_shard": -1},
        "tp": {"sequence_parallel": True, "loss_parallel": True},
        "cluster": {"nodes": 1, "gpus_per_node": 2, "device": "cpu", "gpu_memory_gb": 2, "time": "01:00:00"},
        "train": {"seq_len": 64, "micro_batch_size": 1, "global_batch_size": 2, "steps": 4, "lr": 1e-3},
        "checkpoint": {"every_steps": 2}}

SCALARS = [0, 1, -1, 2, 3, 7, 64, 2**31, 2**63, 10**30, -(10**12), 0.0, -0.0, 0.5, 1e-300, 1e300, float("inf"),
           float("nan"), True, False, None, "", "auto", "Auto", "cpu", "24:00:00", "2024-01-01", "1e5", "０",
           "$(touch PWNED)", "a\nb", "'\"`;|&", "-x", "é" * 50, "x" * 2000, "none", "[1, 2]", "{a: 1}"]
YAML_SNIPPETS = ["&a [1, 2]", "*a", "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14",
                 "!!python/object:os.system {}", "!!omap [a: 1]", "[[[[[[[[[[]]]]]]]]]]", "{1: 2}", "{on: 1}",
                 "? [a]\n  : 1", "<<: {x: 1}", "'unterminated", "\t- tab", "9" * 5000, "0x10", "0o17", "1_000",
                 ".inf", "-.nan", "~", "null", "yes", "2024-01-01 10:00:00", "\"\\u0000\"", "|\n  a\n  b"]
KEYS = ["name", "run_dir", "model.config", "model.weights", "model.dtype", "mesh.tp", "mesh.dp_shard", "mesh.cp",
        "mesh.dp_replicate", "tp.plan", "tp.sequence_parallel", "cluster.nodes", "cluster.gpus_per_node",
        "cluster.gpu_memory_gb", "cluster.time", "cluster.mem", "cluster.partition", "cluster.env_setup",
        "cluster.env_pass", "cluster.signal_seconds", "train.seq_len", "train.seed", "train.lr", "train.betas",
        "train.global_batch_size", "train.micro_batch_size", "train.steps", "data.source", "data.tokenizer",
        "checkpoint.resume", "checkpoint.keep", "lora.rank", "lora.targets", "x.y", "train", "mesh"]
FACTS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
         "vocab_size", "head_dim", "max_position_embeddings", "tie_word_embeddings", "rope_theta", "model_type",
         "rms_norm_eps", "rope_scaling", "hidden_act"]
MODEL_TYPES = ["llama", "qwen2", "mistral", "gemma3_text", "gpt2", "bert", "mamba", "t5", "gemma3", "", "x" * 300]


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_cli(argv: list[str]) -> tuple[int, str, float]:
    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS * 3)        # a hang fails the test instead of stalling the suite
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, err.getvalue(), time.perf_counter() - t0


def rand_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and r < 0.3:
        return {rng.choice(["a", "tp", "1", "on", "plan"]): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(SCALARS)


def mutate_structure(rng: random.Random) -> str:
    d = copy.deepcopy(BASE)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(KEYS).split(".")
        node = d
        for p in path[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[path[-1]] = rand_value(rng)
    if rng.random() < 0.2:
        d[rng.choice([1, True, None, 2.5])] = rand_value(rng)        # non-string keys
    text = yaml.safe_dump(d, sort_keys=False, allow_unicode=rng.random() < 0.5)
    if rng.random() < 0.5:                                            # raw YAML a dump cannot make
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        key = lines[i].split(":")[0] if ":" in lines[i] else "extra"
        lines[i] = f"{key}: {rng.choice(YAML_SNIPPETS)}"
        if rng.random() < 0.3:
            lines.insert(rng.randrange(len(lines)), rng.choice(["a: &a [1]", "b: *a", "name: dup", "%YAML 1.1",
                                                                "---", "...", "- item"]))
        text = "\n".join(lines) + "\n"
    if rng.random() < 0.1:
        text = text[: rng.randrange(len(text))]                       # truncated file
    return text


def rand_set(rng: random.Random) -> str:
    value = rng.choice(YAML_SNIPPETS + [json.dumps(v) if isinstance(v, str) else str(v) for v in SCALARS])
    return f"{rng.choice(KEYS + ['', '.', 'a..b', 'mesh.tp.x'])}{rng.choice(['=', '=', '=', ''])}{value}"


def rand_config(rng: random.Random) -> dict:
    cfg = read_model_config("tiny-llama")
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(FACTS)
        if rng.random() < 0.1:
            cfg.pop(key, None)
        elif key == "model_type":
            cfg[key] = rng.choice(MODEL_TYPES)
        else:
            cfg[key] = rng.choice(SCALARS + [100000, 4096, 2, 4, {"rope_type": "linear", "factor": 0}])
    return cfg


def test_fuzz_cli_exits_0_or_2_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHBAKE_DEBUG", "1")     # a bug raises here (with its traceback), not exit 70
    rng = random.Random(SEED)
    recipe, cfg_path = tmp_path / "r.yaml", tmp_path / "config.json"
    recipe.write_text(yaml.safe_dump(BASE))
    rc, err, _ = run_cli(["check", str(recipe)])                       # warm-up: imports torch, transformers
    assert rc == 0, err
    counts = {0: 0, 2: 0}
    slowest = 0.0
    t_all = time.perf_counter()
    for i in range(150):
        kind = i % 3
        sets: list[str] = []
        if kind == 0:
            recipe.write_text(mutate_structure(rng), encoding="utf-8")
        elif kind == 1:
            recipe.write_text(yaml.safe_dump(BASE))
            sets = [rand_set(rng) for _ in range(rng.randint(1, 3))]
        else:
            recipe.write_text(yaml.safe_dump(BASE))
            cfg_path.write_text(json.dumps(rand_config(rng)))
            sets = [f"model.config={cfg_path}"]
        # every 4th case also renders: plan.json text (json.dumps of every value) or the whole bundle
        cmd = ["check"] if i % 4 else ["plan", "--json"] if i % 8 else ["bundle", "-o", str(tmp_path / "out")]
        argv = [cmd[0], str(recipe), *cmd[1:]] + [a for s in sets for a in ("--set", s)]
        try:
            rc, err, dt = run_cli(argv)
        except SystemExit as e:                  # argparse: only for argv the CLI itself refuses
            pytest.fail(f"case {i}: SystemExit {e.code} for {argv}")
        except BaseException as e:               # noqa: BLE001 the point: nothing may escape
            pytest.fail(f"case {i}: {type(e).__name__}: {e}\nrecipe:\n{recipe.read_text()[:2000]}\nset: {sets}")
        assert rc in (0, 2), (i, rc, err)
        assert "Traceback" not in err, (i, err)
        assert dt < CASE_SECONDS, (i, dt, argv, recipe.read_text()[:500])
        counts[rc] += 1
        slowest = max(slowest, dt)
    print(f"fuzz: {counts} slowest case {slowest:.2f} s, all {time.perf_counter() - t_all:.1f} s")
    assert counts[2] > 50 and counts[0] > 0, counts      # the generator reaches both outcomes
