"""make bench (data part): prepare throughput vs a plain `datasets.map` tokenization of the same
records in the same run, and loader throughput vs what a training step consumes.

- prepare: `runtime.prepare` end to end (read with datasets, tokenize + loss masks, pack,
  write memory-mapped windows) on the chat demo data (chat template, masks) and on
  Shakespeare as text records (one per paragraph); tokens/s of its encode loop and of the whole
  step, beside `Dataset.map(tokenizer, batched=True)` (no masks, no packing, nothing written).
- loader: PackedData.micro_batch for one dp rank of 4 (mbs 4 x 256 tokens), tokens/s, against
  the runtime's training step on the same model (bench/results/runtime.json, world 4).
Writes bench/results/data.json.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def base_plan(seq_len: int):
    import yaml
    from meshbake.compiler.pipeline import compile_recipe
    from meshbake.runtime import plan as P

    r = yaml.safe_load((ROOT / "recipes/tiny_chat.yaml").read_text())
    r["train"]["seq_len"] = seq_len
    b = compile_recipe(yaml.safe_dump(r), source="bench")
    return P.from_dict(json.loads(b.files["plan.json"]))


def plain_map(path: Path, fmt: str, tokenizer: str) -> tuple[int, float]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
        if fmt == "chat":
            fn = lambda b: {"ids": [tok.apply_chat_template(m, tokenize=False) for m in b["messages"]]}  # noqa: E731
            ds = ds.map(fn, batched=True, remove_columns=ds.column_names)
            ds = ds.map(lambda b: tok(b["ids"], add_special_tokens=False), batched=True, remove_columns=["ids"])
        else:
            ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=ds.column_names)
        n = sum(len(x) for x in ds["input_ids"])
        return n, time.perf_counter() - t0


def bench_prepare(name: str, path: Path, fmt: str, tmp: Path) -> dict:
    from meshbake.runtime import plan as P
    from meshbake.runtime.prepare import prepare

    plan = base_plan(256)
    d = replace(plan.data, format=fmt, sources=(P.Source(path=str(path), weight=1.0),),
                tokenizer=str(ROOT / "data/chat_tokenizer"), prepared_dir=str(tmp / name),
                train_on="assistant" if fmt == "chat" else "assistant", eval_fraction=0.0)
    plan = replace(plan, data=d)
    n_map, s_map = plain_map(path, fmt, d.tokenizer)
    t0 = time.perf_counter()
    folder = prepare(plan, quiet=True, log=lambda s: None)
    total = time.perf_counter() - t0
    idx = json.loads((folder / "index.json").read_text())
    tr = idx["splits"]["train"]
    return {"records_tokens": n_map, "prepare_encode_tokens_per_s": idx["encode_tokens_per_s"],
            "prepare_total_tokens_per_s": round(tr["tokens"] / total), "prepare_seconds": round(total, 2),
            "datasets_map_tokens_per_s": round(n_map / s_map), "datasets_map_seconds": round(s_map, 2),
            "packing_efficiency": tr["packing_efficiency"], "windows": tr["windows"], "folder": folder}


def bench_loader(folder: Path) -> dict:
    from meshbake.runtime.data import PackedData
    from meshbake.runtime.plan import MixedPrecision, TrainPlan

    # the other fields are the schema's defaults (steps 1000, cosine, AdamW 0.9/0.95, clip 1.0, ...)
    t = TrainPlan(seq_len=256, micro_batch_size=4, global_batch_size=16, grad_accum=2, lr=1e-3, dtype="float32",
                  mixed_precision=MixedPrecision(param_dtype="float32", reduce_dtype="float32"))
    data = PackedData(folder / "train", t, dp=2)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        for m in range(2):
            data.micro_batch(steps, m, 1)
        data.loss_tokens(steps)
        steps += 1
    dt = time.perf_counter() - t0
    per_rank = steps * 2 * 4 * 256 / dt
    return {"loader_tokens_per_s_per_rank": round(per_rank), "loader_steps_per_s": round(steps / dt, 1)}


def main() -> int:
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paras = [p.strip() for p in (ROOT / "data/shakespeare.txt").read_text().split("\n\n") if p.strip()]
        text = tmp / "shakespeare.jsonl"
        text.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
        chat = bench_prepare("chat", ROOT / "data/chat/chatterbot_en.jsonl", "chat", tmp)
        txt = bench_prepare("text", text, "text", tmp)
        out["loader"] = bench_loader(chat.pop("folder"))
        txt.pop("folder")
        out["prepare_chat"], out["prepare_text"] = chat, txt
    rt = ROOT / "bench/results/runtime.json"
    if rt.is_file():
        step = json.loads(rt.read_text())["results"]["world4"]["ours_tokens_per_s"] / 4 * 2   # per dp rank (tp 2)
        out["train_step_tokens_per_s_per_dp_rank"] = round(step)
        out["loader_margin"] = round(out["loader"]["loader_tokens_per_s_per_rank"] / step, 1)
    path = ROOT / "bench/results/data.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    for k in ("prepare_chat", "prepare_text"):
        v = out[k]
        print(f"{k}: prepare {v['prepare_encode_tokens_per_s']:,} tok/s (encode), {v['prepare_total_tokens_per_s']:,} "
              f"tok/s end to end; plain datasets.map {v['datasets_map_tokens_per_s']:,} tok/s; packing "
              f"{v['packing_efficiency']:.1%}")
    print(f"loader: {out['loader']['loader_tokens_per_s_per_rank']:,} tok/s per rank"
          + (f", {out['loader_margin']}x what a training step consumes" if "loader_margin" in out else ""))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
