"""Token batches as a pure function of (step, micro-step, dp rank): resumable by step alone.

Sample i of the stream is a window of seq_len + 1 tokens (inputs = [:-1], labels = [1:]).
Optimizer step s uses samples [s*G, (s+1)*G) of the stream (G = global batch); micro-step m
of dp rank r takes mbs of them at s*G + (m*dp + r)*mbs. A single process reading all G
samples at once sees exactly the same tokens, which the parity tests use.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime.errors import UserError
from runtime.plan import DataPlan, TrainPlan


class TokenData:
    def __init__(self, data: DataPlan, train: TrainPlan, dp: int):
        self.seq_len, self.mbs, self.dp = train.seq_len, train.micro_batch_size, dp
        self.global_batch, self.seed, self.vocab = train.global_batch_size, train.seed, data.vocab_size
        self.tokens = None if data.source == "synthetic" else tokenize(data)
        self.table = torch.randperm(self.vocab, generator=torch.Generator().manual_seed(self.seed))
        if self.tokens is not None:
            if len(self.tokens) < self.seq_len + 2:
                raise ValueError(f"data.path {data.path}: {len(self.tokens)} tokens, fewer than one sequence")
            top = int(self.tokens.max())
            if top >= self.vocab:
                raise ValueError(f"data.tokenizer {data.tokenizer}: token id {top} >= model vocab_size {self.vocab}")

    def sample(self, i: int) -> torch.Tensor:
        n = self.seq_len + 1
        if self.tokens is None:
            return synthetic(i, n, self.table, self.seed)
        span = len(self.tokens) - n            # windows wrap around the corpus
        start = (i * self.seq_len) % span
        return self.tokens[start:start + n]

    def micro_batch(self, step: int, micro: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = step * self.global_batch + (micro * self.dp + dp_rank) * self.mbs
        x = torch.stack([self.sample(first + j) for j in range(self.mbs)])   # (mbs, T+1)
        return x[:, :-1], x[:, 1:]

    def global_batch_tokens(self, step: int) -> torch.Tensor:
        first = step * self.global_batch
        return torch.stack([self.sample(first + j) for j in range(self.global_batch)])


def synthetic(i: int, n: int, table: torch.Tensor, seed: int) -> torch.Tensor:
    """A learnable stream: a fixed random successor table (a bigram language) with 10% noise."""
    vocab = len(table)
    g = torch.Generator().manual_seed(seed * 7919 + i)
    noise = (torch.rand(n, generator=g) < 0.1).tolist()
    rand = torch.randint(vocab, (n,), generator=g).tolist()
    succ = table.tolist()
    out = [rand[0]]
    for t in range(1, n):
        out.append(rand[t] if noise[t] else succ[out[-1]])
    return torch.tensor(out, dtype=torch.long)


def tokenize(data: DataPlan) -> torch.Tensor:
    """The whole corpus as one token tensor. Documents (jsonl records, text files) are joined
    with the tokenizer's EOS. Fine for the corpora this runs on here; a production corpus
    would be pre-tokenized once into a memory-mapped file with the same interface."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data.tokenizer)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    paths = sorted(Path(data.path).rglob("*")) if Path(data.path).is_dir() else [Path(data.path)]
    docs: list[str] = []
    for p in paths:
        if not p.is_file():
            continue
        text = read_utf8(p)
        if data.source == "jsonl":
            # split on \n only: str.splitlines also splits on \x0c, \x1c, \u2028 ... inside a
            # record's text, and the reported line numbers would drift from the file's
            for n, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    docs.append(jsonl_text(p, n, line, data.text_field))
        else:
            docs.append(text)
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def read_utf8(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(p, f"not valid UTF-8 at byte {e.start} (line {line}: {raw[e.start:e.start + 4]!r})",
                        "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove that byte") from None


def jsonl_text(p: Path, n: int, line: str, field: str) -> str:
    """Line n of a jsonl file -> its text field, or a UserError naming the file and line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{n}", f"not a JSON record ({e.msg}, column {e.colno})",
                        "fix or remove that line (one JSON object per line)") from None
    if not isinstance(rec, dict) or field not in rec:
        raise UserError(f"{p}:{n}", f"no field {field!r} (data.text_field) in this record",
                        "set data.text_field to the field holding the text, or fix the record")
    return str(rec[field])
