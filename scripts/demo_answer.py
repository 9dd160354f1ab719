"""The end of `make demo`: export the fine-tuned chat model and answer one question with it.

    python scripts/demo_answer.py RUN_DIR HF_DIR "What is AI?"

Exports the run's last checkpoint to HF_DIR (a plain Hugging Face folder, tokenizer and
chat template included), then greedy-decodes one reply through the chat template, as a user of
the exported model would. Also prints the first and last train / eval losses of metrics.jsonl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def losses(run_dir: Path) -> str:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r.get("eval_loss") is not None]
    out = f"train loss {recs[0]['loss']:.3f} (step {recs[0]['step']}) -> {recs[-1]['loss']:.3f} (step {recs[-1]['step']})"
    if evals:
        out += "; eval loss " + " -> ".join(f"{r['eval_loss']:.3f} (step {r['step']})" for r in evals)
    return out


def main(run_dir: str, hf_dir: str, question: str) -> int:
    import torch
    from meshbake.runtime.export import export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Path(run_dir)
    hf = export(run, None, Path(hf_dir), force=True)
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(losses(run))
    print(f"user:      {question}\nassistant: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
