"""make bench (prepare part): `meshbake prepare` tokens/s on real chat data beside
`datasets.map(tokenizer.apply_chat_template(..., tokenize=True))` over the same records and
tokenizer, in the same run, alternating, ROUNDS rounds (best of each: noise on a shared machine
only slows a round down).

- chatterbot: data/chat/chatterbot_en.jsonl (2,025 conversations, role/content messages) with
  data/chat_tokenizer (ChatML), as recipes/tiny_chat.yaml prepares it.
- glaive: tests/fixtures/glaive_toolcall_sample.jsonl (60 real function-calling records, ShareGPT
  from/value, a tools column) with data/tokenizer + Qwen3's chat template (tools rendered); the
  baseline maps the roles (human user, gpt assistant, function_call an assistant tool call,
  observation tool) and the tools column as apply_chat_template expects them.

meshbake prepare: runtime.prepare.prepare end to end in this process (read, render + tokenize, loss
masks, pack, write the memory-mapped windows; a fresh prepared_dir per round; overlong: split, so
every token is kept), its tokens counted over every window (an end-of-sequence token per document
where the template has none: its count differs from the baseline's by that). datasets.map:
load_dataset + map, nothing masked, packed or written.
ratio = meshbake tokens/s / datasets.map tokens/s (>= 1: prepare is faster). The start-up of a cold
`meshbake prepare tiny_chat` process (the same machine, alternating with nothing else) is not here:
imports dominate it and it is measured by hand (docs: issue 23). Writes bench/results/prepare.json.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
GLAIVE_ROLES = {"human": "user", "gpt": "assistant", "function_call": "tool_call", "observation": "tool"}


def qwen3_tokenizer(tmp: Path) -> str:
    """data/tokenizer + Qwen3's special tokens and chat template (tests/fixtures/chat_templates/qwen3)."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((ROOT / "tests/fixtures/chat_templates/qwen3/tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/tokenizer/tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": cfg["additional_special_tokens"]})
    for k in ("bos_token", "eos_token", "pad_token"):
        if cfg[k]:
            setattr(tok, k, cfg[k])
    tok.chat_template = cfg["chat_template"]
    tok.save_pretrained(tmp / "qwen3_tok")
    return str(tmp / "qwen3_tok")


def glaive_messages(conv: list[dict]) -> list[dict]:
    out = []
    for m in conv:
        role = GLAIVE_ROLES[m["from"]]
        if role == "tool_call":
            call = json.loads(m["value"])
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": {"name": call["name"],
                                                                         "arguments": call.get("arguments", {})}}]})
        else:
            out.append({"role": role, "content": m["value"]})
    return out


def glaive_tools(text: str | None):
    return [{"type": "function", "function": t} for t in json.loads(text or "[]")] or None


def datasets_map(path: Path, tokenizer: str, glaive: bool, cache: Path) -> tuple[int, float]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)

    def fn(b):
        if glaive:
            convs = [(glaive_messages(c), glaive_tools(t)) for c, t in zip(b["conversations"], b["tools"])]
        else:
            convs = [(m, None) for m in b["messages"]]
        ids = [tok.apply_chat_template(m, tools=t, tokenize=True) for m, t in convs]
        return {"input_ids": [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    ds = ds.map(fn, batched=True, remove_columns=ds.column_names)
    n = sum(len(x) for x in ds["input_ids"])
    return n, time.perf_counter() - t0


def meshbake_prepare(plan, out: Path) -> tuple[int, int, float]:
    from meshbake.runtime.prepare import prepare

    p = replace(plan, data=replace(plan.data, prepared_dir=str(out)))
    t0 = time.perf_counter()
    folder = prepare(p, quiet=True, log=lambda s: None)
    dt = time.perf_counter() - t0
    idx = json.loads((folder / "index.json").read_text())
    tokens = sum(s["tokens"] for s in idx["splits"].values())
    return tokens, idx["encode_tokens_per_s"], dt


def bench(name: str, plan, path: Path, tokenizer: str, glaive: bool, tmp: Path) -> dict:
    ours, theirs = [], []
    for r in range(ROUNDS):
        tokens, enc_tps, dt = meshbake_prepare(plan, tmp / f"{name}-prep-{r}")
        ours.append((dt, tokens, enc_tps))
        n, s = datasets_map(path, tokenizer, glaive, tmp / f"{name}-hf-{r}")
        theirs.append((s, n))
    (dt, tokens, enc_tps), (s, n) = min(ours), min(theirs)
    return {"records": sum(1 for line in path.read_text().splitlines() if line.strip()),
            "meshbake_prepare_tokens": tokens, "meshbake_prepare_s": [round(x[0], 2) for x in ours],
            "meshbake_prepare_tokens_per_s": round(tokens / dt), "meshbake_encode_tokens_per_s": enc_tps,
            "datasets_map_tokens": n, "datasets_map_s": [round(x[0], 2) for x in theirs],
            "datasets_map_tokens_per_s": round(n / s), "ratio": round((tokens / dt) / (n / s), 2)}


def main() -> int:
    from meshbake.runtime import plan as P

    from bench.data import base_plan
    from bench.run import machine

    plan = base_plan(256)
    out: dict = {"rounds": ROUNDS, "best_of": ROUNDS, "machine": machine(),
                 "ratio": "meshbake prepare tokens/s (end to end: read, template, masks, pack, write) / "
                          "datasets.map(apply_chat_template(tokenize=True)) tokens/s (load + map), best rounds",
                 "results": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        chat = ROOT / "data/chat/chatterbot_en.jsonl"
        p = replace(plan, data=replace(plan.data, sources=(P.Source(path=str(chat), weight=1.0),),
                                       tokenizer=str(ROOT / "data/chat_tokenizer"), eval_fraction=0.0,
                                       overlong="split"))
        out["results"]["chatterbot"] = bench("chatterbot", p, chat, p.data.tokenizer, False, tmp)
        gl = ROOT / "tests/fixtures/glaive_toolcall_sample.jsonl"
        tok = qwen3_tokenizer(tmp)
        plan = base_plan(2048)       # glaive records (tool schemas in the prompt) run to ~1,500 tokens: none dropped
        fields = replace(plan.data.fields, messages="conversations", role="from", content="value")
        p = replace(plan, data=replace(plan.data, sources=(P.Source(path=str(gl), weight=1.0),), tokenizer=tok,
                                       fields=fields, roles=dict(GLAIVE_ROLES), eval_fraction=0.0, overlong="split",
                                       vocab_size=max(plan.data.vocab_size, 8192)))
        out["results"]["glaive"] = bench("glaive", p, gl, tok, True, tmp)
    path = ROOT / "bench/results/prepare.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    for k, v in out["results"].items():
        print(f"prepare {k}: meshbake prepare {v['meshbake_prepare_tokens_per_s']:,} tok/s end to end; "
              f"datasets.map(apply_chat_template) {v['datasets_map_tokens_per_s']:,} tok/s; ratio {v['ratio']}")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
