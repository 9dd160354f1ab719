"""Data: formats and loss masks (real chat templates), packing, prepare (fingerprint, atomic,
stale data refused), one-line input errors, and the sample stream (sharding, epochs, resume
after a dp reshard). All single process; the distributed proofs are in test_packing.py."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from meshbake.runtime import plan as P
from meshbake.runtime.data import IGNORE, PackedData, TokenData, load_data
from meshbake.runtime.prepare import DataError, Encoder, fit_documents, locate, pack, prepare
from meshbake.runtime.sections import build

from tests.helpers import ROOT

TOK = str(ROOT / "data/tokenizer")
CHAT_TOK = str(ROOT / "data/chat_tokenizer")


def data_plan(fmt: str, paths=(), tokenizer=TOK, vocab_size=4096, **kw) -> P.DataPlan:
    """A DataPlan from plain values (sources as paths, fields as a dict), by the plan's own builder."""
    return build(P.DataPlan, {"format": fmt, "sources": [{"path": str(p), "weight": 1.0} for p in paths],
                              "tokenizer": tokenizer, "vocab_size": vocab_size, **kw})


@pytest.fixture(scope="module")
def base() -> P.Plan:
    import yaml
    from meshbake.compiler.pipeline import compile_recipe

    r = {"name": "d", "model": {"config": "tiny-llama", "dtype": "float32"}, "mesh": {"dp_shard": 2},
         "cluster": {"nodes": 1, "gpus_per_node": 2, "device": "cpu", "gpu_memory_gb": 8},
         "train": {"seq_len": 64, "micro_batch_size": 2, "global_batch_size": 8, "steps": 4}}
    b = compile_recipe(yaml.safe_dump(r))
    return P.from_dict(json.loads(b.files["plan.json"]))


def with_data(base: P.Plan, tmp: Path, fmt: str, paths, seq_len=64, gbs=8, **kw) -> P.Plan:
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    d = data_plan(fmt, paths, prepared_dir=str(tmp / "prepared"), **kw)
    return replace(base, data=d, train=replace(base.train, seq_len=seq_len, global_batch_size=gbs,
                                               grad_accum=gbs // (base.train.micro_batch_size * 2)))


def jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ------------------------------------------------------------------------------ chat masks
def fixture_tokenizer(tmp: Path, name: str):
    """data/tokenizer + the special tokens and chat template of a real model's
    tokenizer_config.json (tests/fixtures/chat_templates/NAME), saved and loaded back with
    AutoTokenizer as prepare does."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = json.loads((ROOT / f"tests/fixtures/chat_templates/{name}/tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/tokenizer/tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": cfg["additional_special_tokens"]})
    for k in ("bos_token", "eos_token", "pad_token"):
        if cfg[k]:
            setattr(tok, k, cfg[k])
    tok.chat_template = cfg["chat_template"]
    tok.save_pretrained(tmp / name)
    return AutoTokenizer.from_pretrained(tmp / name)


CONV = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a sonnet?"},
        {"role": "assistant", "content": "A poem of fourteen lines."},
        {"role": "user", "content": "Who wrote the most famous ones?"},
        {"role": "assistant", "content": "Shakespeare wrote 154 of them."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."}]


@pytest.mark.parametrize("name,eot", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
@pytest.mark.parametrize("train_on", ["assistant", "last_turn", "all"])
def test_chat_mask_is_exactly_the_assistant_replies_and_their_end_of_turn(tmp_path, name, eot, train_on):
    tok = fixture_tokenizer(tmp_path, name)
    plan_data = data_plan("chat", tokenizer="x", vocab_size=8192, train_on=train_on)
    for conv in (CONV, CONV[1:]):                          # with and without a system message
        ids, mask = Encoder(plan_data, tok).chat(conv, "rec")
        full = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        assert ids.tolist() == full                         # the whole conversation, tokenized once
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        if train_on == "all":
            assert mask.all()
            continue
        want = "".join(r + eot for r in (replies[-1:] if train_on == "last_turn" else replies))
        assert tok.decode(ids[mask].tolist()) == want
        assert int(mask.sum()) == sum(len(tok(r + eot, add_special_tokens=False)["input_ids"])
                                      for r in (replies[-1:] if train_on == "last_turn" else replies))


def test_chat_without_a_template_and_unknown_roles_are_one_line_errors(tmp_path):
    from transformers import AutoTokenizer

    d = data_plan("chat")
    with pytest.raises(DataError, match="has no chat template"):
        Encoder(d, AutoTokenizer.from_pretrained(TOK))
    tok = AutoTokenizer.from_pretrained(CHAT_TOK)
    with pytest.raises(DataError, match=r"f.jsonl:3: message 1: unknown role 'human'.*data.roles"):
        Encoder(d, tok).chat([{"role": "human", "content": "hi"}], "f.jsonl:3")
    mapped = replace(d, roles={"human": "user", "gpt": "assistant"})
    ids, mask = Encoder(mapped, tok).chat([{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}], "x")
    assert tok.decode(ids[mask].tolist()) == "yo<|im_end|>"


def test_completion_and_alpaca_mask_the_prompt(tmp_path, base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOK)
    comp = Encoder(data_plan("completion"), tok)
    [(ids, mask)] = comp.batch({"prompt": ["Q: who wrote Hamlet?\nA:"], "completion": [" Shakespeare."]}, None, 0)
    assert tok.decode(ids[mask].tolist()) == " Shakespeare.<|endoftext|>"
    assert tok.decode(ids[~mask].tolist()) == "Q: who wrote Hamlet?\nA:"
    alp = Encoder(data_plan("alpaca", fields={"output": "answer"}), tok)
    [(ids, mask)] = alp.batch({"instruction": ["Name a play."], "input": [""], "answer": ["Hamlet"]}, None, 0)
    assert tok.decode(ids[mask].tolist()) == "Hamlet<|endoftext|>"
    assert "### Instruction:\nName a play." in tok.decode(ids[~mask].tolist())
    assert "### Input" not in tok.decode(ids.tolist())


# -------------------------------------------------------------------------------- packing
def test_best_fit_packing_places_every_piece_once_within_the_window():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 500).tolist()
    windows = pack(lengths, 64, True)
    assert sorted(i for w in windows for i in w) == list(range(500))
    assert all(sum(lengths[i] for i in w) <= 64 for w in windows)
    assert len(windows) <= sum(lengths) / 64 * 1.1 + 1          # best-fit: within 10% of the bound
    assert pack(lengths, 64, False) == [[i] for i in range(500)]


def test_overlong_documents_split_truncate_or_drop_and_are_counted():
    lengths = np.array([10, 200, 1, 65])                        # seq_len 64: 65 tokens = 64 positions fit
    split, s = fit_documents(lengths, 64, "split")
    assert [p for p in split if p[0] == 1] == [(1, 0, 65), (1, 64, 65), (1, 128, 65), (1, 192, 8)]
    assert s["overlong"] == 1 and s["too_short"] == 1 and s["overlong_tokens_lost"] == 0
    trunc, s = fit_documents(lengths, 64, "truncate")
    assert (1, 0, 65) in trunc and s["overlong_tokens_lost"] == 135
    drop, s = fit_documents(lengths, 64, "drop")
    assert [p[0] for p in drop] == [0, 3] and s["overlong_tokens_lost"] == 200


def test_prepared_windows_keep_documents_apart(tmp_path, base):
    recs = [{"prompt": f"Question {i}?" + " more" * (i % 7), "completion": f" Answer {i}." * (1 + i % 3)}
            for i in range(60)]
    plan = with_data(base, tmp_path, "completion", jsonl(tmp_path / "c.jsonl", recs))
    folder = prepare(plan, quiet=True, log=lambda s: None)
    idx = json.loads((folder / "index.json").read_text())
    tr = idx["splits"]["train"]
    assert tr["documents"] == 60 and tr["pieces"] == 60 and tr["packing_efficiency"] > 0.8
    ids, lab, pos = (np.load(folder / f"train/{k}.npy") for k in ("input_ids", "labels", "position_ids"))
    docs = np.load(folder / "train/docs.npy")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOK)
    seen = []
    for w, off, n, _ in docs.tolist():
        assert pos[w, off:off + n].tolist() == list(range(n))          # positions restart per document
        assert lab[w, off + n - 1] != IGNORE                           # its last label: EOS, same document
        assert off + n == 64 or pos[w, off + n] == 0                   # the next token starts a new one
        x, y = ids[w, off:off + n], lab[w, off:off + n]
        assert (y[:-1][y[:-1] != IGNORE] == x[1:][y[:-1] != IGNORE]).all()   # labels = next input token
        seen.append(tok.decode(y[y != IGNORE].tolist()))
    assert sorted(seen) == sorted(r["completion"] + "<|endoftext|>" for r in recs)
    assert tr["loss_tokens"] == int((lab != IGNORE).sum())


# --------------------------------------------------------------------- prepare: fingerprint
def test_prepare_is_keyed_by_contents_and_stale_data_is_refused(tmp_path, base):
    src = jsonl(tmp_path / "t.jsonl", [{"text": f"To be or not to be, record {i}."} for i in range(50)])
    plan = with_data(base, tmp_path, "text", src)
    with pytest.raises(DataError, match="prepared data for d is missing"):
        locate(plan)
    a = prepare(plan, quiet=True, log=lambda s: None)
    assert locate(plan) == a and prepare(plan, quiet=True, log=lambda s: None) == a     # up to date: reused
    jsonl(src, [{"text": f"To sleep, perchance to dream {i}."} for i in range(50)])
    with pytest.raises(DataError, match="is stale"):
        locate(plan)
    b = prepare(plan, quiet=True, log=lambda s: None)
    assert b != a and locate(plan) == b                    # new contents, new fingerprint, new folder
    other = replace(plan, train=replace(plan.train, seq_len=32))
    with pytest.raises(DataError, match="missing"):        # another seq_len is other data
        locate(other)
    # a half-written folder (killed before the rename) is never picked up
    (Path(plan.data.prepared_dir) / ".tmp-d-123-ab").mkdir()
    assert locate(plan) == b
    assert not list(Path(plan.data.prepared_dir).glob(".tmp-*"))[0].joinpath("index.json").exists()


def test_sources_mix_by_weight_and_eval_fraction_holds_documents_out(tmp_path, base):
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(40)])
    bdir = tmp_path / "b"
    bdir.mkdir()
    jsonl(bdir / "b1.jsonl", [{"text": f"beta {i}"} for i in range(10)])
    import datasets
    datasets.Dataset.from_dict({"text": [f"gamma {i}" for i in range(20)]}).save_to_disk(str(tmp_path / "g"))
    plan = with_data(base, tmp_path, "text", [a, bdir, tmp_path / "g"], eval_fraction=0.1)
    plan = replace(plan, data=replace(plan.data, sources=(P.Source(path=str(a), weight=0.5),
                                                          P.Source(path=str(bdir), weight=2.0),
                                                          P.Source(path=str(tmp_path / "g"), weight=1.0))))
    folder = prepare(plan, quiet=True, log=lambda s: None)
    idx = json.loads((folder / "index.json").read_text())
    docs = np.load(folder / "train/docs.npy")
    per_source = np.bincount(docs[:, 3], minlength=3)
    held = np.bincount(np.load(folder / "eval/docs.npy")[:, 3], minlength=3)
    assert held.sum() == idx["splits"]["eval"]["documents"] == 7            # 10% of 70 documents
    kept = np.array([40, 10, 20]) - held
    assert per_source.tolist() == [int(round(0.5 * kept[0])), 2 * kept[1], kept[2]]   # a halved, b twice


# ---------------------------------------------------------------------------- bad input
def bad(tmp_path, base, fmt, recs_or_path, match, **kw):
    path = recs_or_path if isinstance(recs_or_path, (str, Path)) else jsonl(tmp_path / "bad.jsonl", recs_or_path)
    with pytest.raises(DataError, match=match) as e:
        prepare(with_data(base, tmp_path, fmt, path, **kw), quiet=True, log=lambda s: None)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "prepared").glob("*")) or all(p.suffix != ".current"
                                                               for p in (tmp_path / "prepared").iterdir())


def test_bad_input_is_one_line_before_any_process_group(tmp_path, base):
    bad(tmp_path, base, "text", tmp_path / "nope.jsonl", r"nope.jsonl' not found")
    (tmp_path / "empty.jsonl").write_text("")
    bad(tmp_path, base, "text", tmp_path / "empty.jsonl", r"empty|cannot be read")
    bad(tmp_path, base, "completion", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
        r"bad.jsonl:2: no field 'completion' \(data.fields.completion\)")
    bad(tmp_path, base, "text", [{"body": "x"}], r"bad.jsonl:1: no field 'text'.*records have body")
    bad(tmp_path, base, "chat", [{"messages": [{"role": "user", "content": "hi"}]}], "has no chat template")
    bad(tmp_path, base, "chat", [{"messages": [{"role": "robot", "content": "hi"}]}], "unknown role 'robot'",
        tokenizer=CHAT_TOK)
    bad(tmp_path, base, "tokenized", [{"input_ids": [1, 2, 5000]}], r"token id 5000 >= the model's vocab_size 4096")
    bad(tmp_path, base, "text", [{"text": "word " * 200}] * 3, r"3 of 3 are longer than seq_len 64", overlong="drop")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    bad(tmp_path, base, "text", tmp_path / "broken.jsonl", r"broken.jsonl:2: not a JSON record")


# ------------------------------------------------------------------- the sample stream
@pytest.fixture(scope="module")
def packed(tmp_path_factory, base) -> tuple[P.Plan, Path]:
    tmp = tmp_path_factory.mktemp("stream")
    src = jsonl(tmp / "s.jsonl", [{"text": "word " * (5 + i % 40)} for i in range(300)])
    plan = with_data(base, tmp, "text", src)
    return plan, prepare(plan, quiet=True, log=lambda s: None)


@pytest.mark.parametrize("kind", ["synthetic", "packed"])
def test_ranks_partition_the_global_batch(base, packed, kind):
    plan = base if kind == "synthetic" else packed[0]
    t = plan.train
    for dp in (1, 2, 4):
        accum = t.global_batch_size // (t.micro_batch_size * dp)
        t2 = replace(t, grad_accum=accum)
        data = load_data(replace(plan, train=t2), dp)[0]
        for step in (0, 3, 40):
            parts = [data.micro_batch(step, m, r) for m in range(accum) for r in range(dp)]
            want = data.rows(data.global_batch_rows(step))
            assert torch.equal(torch.cat([p.input_ids for p in parts]), want.input_ids)
            assert torch.equal(torch.cat([p.labels for p in parts]), want.labels)


def test_an_epoch_covers_every_window_once_and_reshuffles(packed):
    plan, folder = packed
    data = PackedData(folder / "train", plan.train, dp=2)
    W, G = data.windows, plan.train.global_batch_size
    epoch0 = [data.window(g) for g in range(W)]
    epoch1 = [data.window(g) for g in range(W, 2 * W)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(W)) and epoch0 != epoch1
    by_rank = [[i for s in range(W // G) for m in range(2) for i in
                [data.window(data.first_sample(s, m, r) + j) for j in range(2)]] for r in range(2)]
    assert not set(by_rank[0]) & set(by_rank[1])            # dp ranks never read the same window


def test_resume_after_a_dp_reshard_continues_with_the_next_unseen_samples(packed):
    plan, folder = packed
    a = PackedData(folder / "train", replace(plan.train, grad_accum=2), dp=2)
    state = json.loads(json.dumps(a.state(7)))              # what train_state.json holds after step 7
    seen = [a.window(g) for g in range(7 * 8)]
    b = PackedData(folder / "train", replace(plan.train, micro_batch_size=1, grad_accum=2), dp=4)
    b.restore(state, 7)
    nxt = [b.window(b.first_sample(7, m, r)) for m in range(2) for r in range(4)]
    assert sorted(nxt) == sorted(a.window(g) for g in range(56, 64))
    assert state["samples_consumed"] == 56 and not set(nxt) & set(seen[-(a.windows - 8):] if a.windows > 64 else [])


def test_loss_tokens_count_the_whole_global_batch(packed):
    plan, folder = packed
    data = PackedData(folder / "train", plan.train, dp=2)
    rows = data.global_batch_rows(2)
    assert data.loss_tokens(2) == int((np.load(folder / "train/labels.npy")[rows] != IGNORE).sum())
    syn = TokenData(plan.data, plan.train, dp=2)
    assert syn.loss_tokens(0) == plan.train.global_batch_size * plan.train.seq_len


def test_training_refuses_missing_prepared_data_before_any_process_group(tmp_path, base, capsys, monkeypatch):
    import torch.distributed as dist
    from meshbake.runtime.train import main

    plan = with_data(base, tmp_path, "text", jsonl(tmp_path / "t.jsonl", [{"text": "a b c d e"}] * 20))
    (tmp_path / "plan.json").write_text(P.dumps(plan))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main([str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meshbake: prepared data for d is missing" in err and "Traceback" not in err
    assert not dist.is_initialized()


def test_old_plan_json_data_section_still_loads(base):
    d = json.loads(P.dumps(base))
    d["data"] = {"source": "text", "path": "data/shakespeare.txt", "tokenizer": "data/tokenizer",
                 "text_field": "text", "vocab_size": 4096}
    old = P.from_dict(d).data
    assert (old.format, old.sources[0].path, old.tokenizer) == ("text", "data/shakespeare.txt", "data/tokenizer")


def test_tokenized_parquet_and_completion_csv_sources(tmp_path, base):
    import pandas as pd

    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * 2 + list(range(7, 5 + n))} for n in (6, 9, 12)]
    pd.DataFrame(rows).to_parquet(tmp_path / "tok.parquet")
    folder = prepare(with_data(base, tmp_path, "tokenized", tmp_path / "tok.parquet", tokenizer=None),
                     quiet=True, log=lambda s: None)
    lab = np.load(folder / "train/labels.npy")
    assert sorted(lab[lab != IGNORE].tolist()) == sorted(t for r in rows for t in r["labels"][2:])
    pd.DataFrame({"q": ["Who wrote Hamlet?", "Who wrote Faust?"], "a": [" Shakespeare", " Goethe"]}).to_csv(
        tmp_path / "c.csv", index=False)
    plan = with_data(base, tmp_path / "csv", "completion", tmp_path / "c.csv", fields={"prompt": "q", "completion": "a"})
    folder = prepare(plan, quiet=True, log=lambda s: None)
    from transformers import AutoTokenizer

    lab = np.load(folder / "train/labels.npy")
    text = AutoTokenizer.from_pretrained(TOK).decode(lab[lab != IGNORE].tolist())
    assert sorted(text.split("<|endoftext|>")) == ["", " Goethe", " Shakespeare"]


def test_a_source_rewritten_with_the_same_content_is_not_stale_forever(base, tmp_path):
    """Rewriting a source with the same bytes moves its mtime: prepare re-hashes it, finds the
    content-keyed folder already there and must record the new mtime, or locate() calls the
    data stale on every launch (a real loop: prepare says done, train says stale)."""
    src = jsonl(tmp_path / "d.jsonl", [{"text": f"To be or not to be, record {i}."} for i in range(50)])
    plan = with_data(base, tmp_path, "text", src)
    first = prepare(plan, quiet=True, log=lambda s: None)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    again = prepare(plan, quiet=True, log=lambda s: None)
    assert again == first and locate(plan) == first


def test_a_tokenizer_with_custom_code_is_refused_and_never_run(tmp_path, base):
    """A tokenizer folder whose tokenizer_config.json has an auto_map (a tokenizer.py beside it):
    transformers would ask on a terminal to run it (one 'y' runs code from the data folder) and
    otherwise raise, which meshbake reported as its own bug. Now one line naming data.tokenizer,
    no prompt, the module never imported; a tokenizer folder that does not load is one line too."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(TOK, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "pwned"
    (tok / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    corpus = jsonl(tmp_path / "t.jsonl", [{"text": "a b c d e"}] * 20)
    bad(tmp_path, base, "text", corpus, r"data.tokenizer: .* asks to run its own Python code .* never runs",
        tokenizer=str(tok))
    assert not marker.exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/tokenizer_config.json").write_text("{}")
    bad(tmp_path, base, "text", corpus, r"data.tokenizer: .* does not load as a tokenizer", tokenizer=str(tmp_path / "junk"))
