"""Chat data as it really is (issue 23): for the real chat templates of six families (ChatML /
Qwen2, Llama 3, Qwen3 with its think block and tools, Gemma 3, gpt-oss's harmony format,
DeepSeek-V3), tests/fixtures/chat_templates/<family> on data/tokenizer's vocabulary:
the tokens are apply_chat_template(conversation, tokenize=True) and the trained tokens are exactly
each assistant turn as the model writes it (its content, and what the template puts between the
generation prompt and it) up to its end-of-turn token: multi-turn, with and without a system
message, a system message later on, a reply that opens the conversation, OpenAI content parts,
control-token text inside a message, tool calls + tools. Single process."""
from __future__ import annotations

import json

import pytest
from meshbake.runtime.prepare import DataError, Encoder

from tests.helpers import ROOT
from tests.test_data import CONV, data_plan, fixture_tokenizer

FAMILIES = ["chatml", "llama3", "qwen3", "gemma3", "gpt_oss", "deepseek_v3"]
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>",
       "gpt_oss": "<|end|>", "deepseek_v3": "<｜end▁of▁sentence｜>"}
TRIMS = {"llama3", "gemma3"}                  # templates that render content | trim
TOOLS = {"qwen3", "gpt_oss"}                  # templates that render tools= and tool_calls
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "the city"}},
                                                "required": ["city"]}}}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {f: fixture_tokenizer(tmp, f) for f in FAMILIES}


def enc(tok, train_on="assistant", **kw):
    return Encoder(data_plan("chat", tokenizer="x", vocab_size=8192, train_on=train_on, **kw), tok)


def reference(tok, conv, tools=None) -> list[int]:
    r = tok.apply_chat_template(conv, tools=tools, tokenize=True)
    return list(r["input_ids"] if hasattr(r, "keys") else r)


def turn(family: str, conv: list[dict], i: int) -> str:
    """Assistant message i as the model writes it after the generation prompt, up to its end of turn."""
    text = conv[i]["content"]
    text = text.strip() if family in TRIMS else text
    last = i == len(conv) - 1
    if family == "gpt_oss":
        return "<|channel|>final<|message|>" + text + ("<|return|>" if last else "<|end|>")
    if family == "qwen3" and last:
        return "<think>\n\n</think>\n\n" + text + EOT[family]
    return text + EOT[family]


def trained(tok, ids, mask) -> str:
    return tok.decode(ids[mask].tolist())


def check(family, tok, conv, tools=None, train_on="assistant"):
    ids, mask = enc(tok, train_on).chat(conv, "rec.jsonl:1", tools)
    assert ids.tolist() == reference(tok, conv, tools)
    want = [turn(family, conv, i) for i, m in enumerate(conv) if m["role"] == "assistant"]
    assert trained(tok, ids, mask) == "".join(want[-1:] if train_on == "last_turn" else want)
    return ids, mask


ASSISTANT_FIRST = [{"role": "assistant", "content": "Hello! Ask me anything about poems."},
                   {"role": "user", "content": "What is a haiku?"},
                   {"role": "assistant", "content": "Three lines of five, seven and five syllables."}]
SYSTEM_LATER = [CONV[1], CONV[2], {"role": "system", "content": "From now on, answer in one word."},
                CONV[3], {"role": "assistant", "content": "Shakespeare."}]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train_on", ["assistant", "last_turn"])
def test_multi_turn_with_and_without_a_system_message(toks, family, train_on):
    """Qwen3's think block on the last reply only and gpt-oss's <|return|> on the last made every
    conversation with two replies fail to prepare (prefix rendering): located in the whole instead."""
    check(family, toks[family], CONV, train_on=train_on)
    check(family, toks[family], CONV[1:], train_on=train_on)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_system_message_later_in_the_conversation(toks, family):
    """DeepSeek-V3 moves every system message to the front: prefix rendering cannot locate the
    replies after it. Gemma 3 refuses it (roles must alternate): one line naming the record."""
    if family == "gemma3":
        with pytest.raises(DataError, match=r"^rec.jsonl:1: the chat template refused"):
            enc(toks[family]).chat(SYSTEM_LATER, "rec.jsonl:1")
        return
    check(family, toks[family], SYSTEM_LATER)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reply_that_opens_the_conversation_is_trained(toks, family):
    """Llama 3's BOS at position 0 was taken for the end of that turn: the reply went untrained."""
    if family == "gemma3":
        with pytest.raises(DataError, match=r"^rec.jsonl:1: the chat template refused.*alternate"):
            enc(toks[family]).chat(ASSISTANT_FIRST, "rec.jsonl:1")
        return
    ids, mask = check(family, toks[family], ASSISTANT_FIRST)
    assert ASSISTANT_FIRST[0]["content"] in trained(toks[family], ids, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_content_parts_are_their_text(toks, family):
    tok = toks[family]
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in CONV]
    ids, mask = enc(tok).chat(parts, "rec.jsonl:1")
    ref, ref_mask = enc(tok).chat(CONV, "rec.jsonl:1")
    assert ids.tolist() == ref.tolist() == reference(tok, CONV) and mask.tolist() == ref_mask.tolist()
    two = [CONV[1], {"role": "assistant", "content": [{"type": "text", "text": "A poem"},
                                                      {"type": "text", "text": "of fourteen lines."}]}]
    ids, mask = enc(tok).chat(two, "rec.jsonl:1")
    assert "A poem\nof fourteen lines." in trained(tok, ids, mask)
    img = [CONV[1], {"role": "assistant", "content": [{"type": "image", "url": "x.png"}]}]
    with pytest.raises(DataError, match=r"^rec.jsonl:7: message 2: a content part of type 'image'") as e:
        enc(tok).chat(img, "rec.jsonl:7")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_control_token_text_in_a_message_stays_text(toks, family):
    """A reply quoting its template's end-of-turn (and eos) is trained whole, up to its real end of
    turn; the quoted text is never a control token (the user's neither)."""
    tok = toks[family]
    quoted = sorted({EOT[family], tok.eos_token} | ({"<|return|>"} if family == "gpt_oss" else set()))
    reply = "Models end a turn with " + " or ".join(quoted) + " and then stop."
    conv = [{"role": "user", "content": f"What does {quoted[0]} mean?"}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    ids, mask = enc(tok).chat(conv, "rec.jsonl:1")
    want = turn(family, conv, 1) + turn(family, conv, 3)
    assert trained(tok, ids, mask) == want
    special = {tok.convert_tokens_to_ids(t) for t in quoted}
    n_real = sum(int(t in special) for t in ids.tolist())
    plain = reference(tok, [dict(conv[0], content="What does it mean?"), dict(conv[1], content="x"), *conv[2:]])
    assert n_real == sum(int(t in special) for t in plain)  # as many control tokens as with nothing quoted
    assert tok.decode(ids.tolist()).count(quoted[0]) == sum(int(t == tok.convert_tokens_to_ids(quoted[0]))
                                                            for t in plain) + 2    # the quotes: text


def tool_conv(family):
    args = '{"city": "Paris"}' if family == "deepseek_v3" else {"city": "Paris"}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": args}}
    return [{"role": "user", "content": "Is it raining in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"rain": false, "celsius": 21}'},
            {"role": "assistant", "content": "No, it is dry and 21 degrees."}]


CALL_TURN = {"qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
             "gpt_oss": ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'}


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_calls_and_tools_reach_the_tokens(toks, family):
    """tools= and tool_calls as transformers passes them: the schemas are in the tokens, the call
    turn is trained, the tool's result is not. A template that renders neither refuses the record
    in one line (never trains an empty turn, never hides the tools)."""
    tok, conv = toks[family], tool_conv(family)
    if family not in TOOLS:
        with pytest.raises(DataError, match=r"^rec.jsonl:2: the record has tools but the chat template"):
            enc(tok).chat(conv, "rec.jsonl:2", [WEATHER])
        # DeepSeek-V3's renders a call only for content None, a key apply_chat_template drops: it cannot either
        with pytest.raises(DataError, match=r"^rec.jsonl:2: message 2 calls a tool but the chat template"):
            enc(tok).chat(conv, "rec.jsonl:2")
        return
    ids, mask = enc(tok).chat(conv, "rec.jsonl:2", [WEATHER])
    assert ids.tolist() == reference(tok, conv, [WEATHER])
    assert "The weather in a city" in tok.decode(ids[~mask].tolist())     # the schema: in the tokens, untrained
    assert trained(tok, ids, mask) == CALL_TURN[family] + turn(family, conv, 3)
    # the tools column as records hold it: JSON text of bare schemas (glaive), wrapped as transformers does
    ids2, mask2 = enc(tok).chat(conv, "rec.jsonl:2", json.dumps([WEATHER["function"]]))
    assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()


def glaive():
    return [json.loads(x) for x in (ROOT / "tests/fixtures/glaive_toolcall_sample.jsonl").read_text().splitlines()]


GLAIVE_ROLES = {"human": "user", "gpt": "assistant", "function_call": "tool_call", "observation": "tool"}


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_real_function_calling_records(toks, family):
    """Real glaive function-calling records (ShareGPT form, a tools column): every one prepared
    through Encoder.batch, its schemas in the tokens, every reply and call trained, no user or
    tool text trained."""
    tok = toks[family]
    recs = glaive()
    e = enc(tok, fields={"messages": "conversations", "role": "from", "content": "value"}, roles=GLAIVE_ROLES)
    docs = e.batch({"conversations": [r["conversations"] for r in recs], "tools": [r["tools"] for r in recs]},
                   lambda i: f"glaive:{i + 1}", 0)
    for r, (ids, mask) in zip(recs, docs):
        got = trained(tok, ids, mask)
        text = tok.decode(ids.tolist())
        for t in json.loads(r["tools"] or "[]"):
            assert t["name"] in text
        for m in r["conversations"]:
            if m["from"] == "gpt":
                assert m["value"].strip() in got
            elif m["from"] == "function_call":
                assert json.loads(m["value"])["name"] in got
            elif len(m["value"]) > 12:
                assert m["value"] not in got


def test_generation_markers_are_the_spans(toks):
    """A template that marks {% generation %} spans (return_assistant_tokens_mask) is taken at its word."""
    tok = toks["chatml"]
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                         "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
                         "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    try:
        e = enc(tok)
        ids, mask = e.chat(CONV, "rec.jsonl:1")
        ref = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert e._probe().generation and ids.tolist() == list(ref["input_ids"])
        assert mask.tolist() == [bool(x) for x in ref["assistant_masks"]]
        assert trained(tok, ids, mask) == "".join(m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant")
    finally:
        tok.chat_template = json.loads((ROOT / "tests/fixtures/chat_templates/chatml/tokenizer_config.json")
                                       .read_text())["chat_template"]
