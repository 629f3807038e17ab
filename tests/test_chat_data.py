"""Chat data (nanochat/data/chat.py): validation with bad rows reported by file:line, the
renderer and its loss mask, the Jinja chat template against the renderer, packing and the
conversation loader's determinism."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from nanochat.data import chat
from nanochat.data.tokenizer import SPECIAL_TOKENS, Tokenizer

CONVS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6\n"}],
    [{"role": "user", "content": "def f(x):\n    return x"},
     {"role": "assistant", "content": "It returns `x` unchanged. <|bos|> stays text"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["def f(x):\n    return x + 1\nhello there, brief answers\n" * 20],
                           300)


@pytest.fixture(scope="module")
def markers(tok):
    return chat.Markers.of(tok.special_tokens, "test")


def test_system_merges_into_the_first_user_turn():
    assert chat.turns(CONVS[1])[:2] == [("user", "Be brief.\n\n2+2?"), ("assistant", "4")]


@pytest.mark.parametrize("msgs,why", [
    ([], "empty"),
    ("hi", "must be a list"),
    ([{"role": "assistant", "content": "x"}], "the first turn must be the user's"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected a assistant"),
    ([{"role": "tool", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "user", "content": ""}], "empty content"),
    (["hi"], "must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "must come first"),
])
def test_bad_conversations_say_why(msgs, why):
    with pytest.raises(chat.BadConversation, match=re.escape(why)):
        chat.turns(msgs)


def test_render_and_loss_mask(tok, markers):
    """Token layout of the template, and the mask: on assistant text and <|assistant_end|>
    only; targets_of shifts it onto the previous position."""
    ids, mask = chat.render(CONVS[0], tok.encode, markers)
    hi, hello = tok.encode("hi"), tok.encode("hello there")
    assert ids == [markers.bos, markers.user_start, *hi, markers.user_end,
                   markers.assistant_start, *hello, markers.assistant_end]
    assert mask == [False] * (len(hi) + 4) + [True] * (len(hello) + 1)
    tgt = chat.targets_of(ids, mask)
    n = len(hi) + 3  # the position of <|assistant_start|> predicts the reply's first token
    assert tgt[:n] == [-1] * n and tgt[n:-1] == ids[n + 1:] and tgt[-1] == -1
    with pytest.raises(chat.BadConversation, match="no assistant"):
        chat.render(CONVS[0][:1], tok.encode, markers)


def _parse_special(text: str, tok: Tokenizer) -> list[int]:
    """Tokenize template text the way llama.cpp does with parse_special: markers are
    special tokens, the text between them plain text."""
    sp = tok.special_tokens
    out = []
    for piece in re.split("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")", text):
        out += [sp[piece]] if piece in sp else tok.encode(piece) if piece else []
    return out


def test_text_template_tokenizes_to_the_rendered_ids(tok, markers):
    for msgs in CONVS[:2]:  # the third types a marker inside a message: text vs special
        ids, _ = chat.render(msgs, tok.encode, markers)
        assert _parse_special(chat.render_text(msgs), tok) == ids


@pytest.mark.skipif(importlib.util.find_spec("jinja2") is None, reason="jinja2 not installed")
@pytest.mark.parametrize("gen", [False, True])
def test_jinja_template_equals_the_renderer(gen):
    import jinja2

    env = jinja2.Environment()
    tmpl = env.from_string(chat.CHAT_TEMPLATE)
    prompts = CONVS + [CONVS[1][:2], CONVS[1][:4]]  # prompts ending on a user turn
    for msgs in prompts:
        got = tmpl.render(messages=msgs, bos_token="<|bos|>", add_generation_prompt=gen)
        assert got == chat.render_text(msgs, add_generation_prompt=gen)


def test_load_counts_and_reports_bad_rows_by_line(tmp_path, tok, markers):
    f = tmp_path / "chat.jsonl"
    long_conv = [{"role": "user", "content": "hello " * 200}, {"role": "assistant", "content": "x"}]
    lines = [json.dumps({"messages": CONVS[0]}), "{not json", json.dumps({"msgs": []}),
             "", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),
             json.dumps({"messages": long_conv}), json.dumps({"messages": CONVS[1]})]
    f.write_text("\n".join(lines) + "\n")
    cs = chat.load([f], chat.renderer(tok.encode, markers), max_tokens=64)
    assert len(cs.ids) == 2 and cs.rows == 6
    assert [(line, why.split(":")[0]) for _, line, why in cs.bad] == [
        (2, "not JSON"), (3, 'expected an object with a "messages" list'),
        (5, "message 0"), (6, cs.bad[3][2].split(":")[0])]
    assert "longer than the context of 64" in cs.bad[3][2]
    report = cs.report()
    assert report.startswith("2 conversations, 4 bad row(s) of 6")
    assert f"{f}:2: not JSON" in report and f"{f}:5: message 0" in report
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.load([tmp_path / "nope.jsonl"], chat.renderer(tok.encode, markers), 64)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        chat.load([tmp_path / "bin.jsonl"], chat.renderer(tok.encode, markers), 64)


def test_parquet(tmp_path, tok, markers):
    f = tmp_path / "chat.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        f.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="needs pyarrow"):
            chat.load([f], chat.renderer(tok.encode, markers), 64)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": CONVS}), f)
    cs = chat.load([f], chat.renderer(tok.encode, markers), 256)
    assert len(cs.ids) == 3 and not cs.bad


def test_foreign_tokenizer_is_refused():
    with pytest.raises(ValueError, match="cannot hold nanochat.s chat template"):
        chat.Markers.of({"<s>": 1, "</s>": 2}, "run")


def _chatset(tok, markers, n=9):
    msgs = [[{"role": "user", "content": "q" * (i + 1)},
             {"role": "assistant", "content": "hello there " * (i % 3 + 1)}] for i in range(n)]
    cs = chat.ChatSet()
    for m in msgs:
        ids, mask = chat.render(m, tok.encode, markers)
        cs.ids.append(np.asarray(ids, np.int32))
        cs.masks.append(np.asarray(mask))
    return cs


def test_pack_rows_and_targets(tok, markers):
    """Every conversation lands whole in a row; doc_start marks its start; targets are its
    assistant tokens only; padding is its own document with no targets."""
    cs = _chatset(tok, markers)
    T = 40
    loader = chat.ConversationLoader(cs, 3, T, seed=0, pad=markers.bos, prefetch=0)
    x, y, doc = loader.build_batch(0)
    assert x.shape == y.shape == doc.shape == (3, T) and x.dtype == y.dtype == torch.int64
    for b in range(3):
        starts = sorted(set(doc[b].tolist()))
        for s in starts:
            seg = (doc[b] == s).nonzero().flatten()
            assert seg[0] == s and seg[-1] - seg[0] + 1 == len(seg)  # contiguous
        valid = y[b] >= 0
        assert valid.any()
        # every valid target is an assistant token or <|assistant_end|> of the same conversation
        for t in valid.nonzero().flatten().tolist():
            assert x[b, t + 1] == y[b, t] if t + 1 < T else True
            assert y[b, t] not in (markers.bos, markers.user_start, markers.user_end,
                                   markers.assistant_start)


def test_loader_is_a_pure_function_of_the_step(tok, markers):
    cs = _chatset(tok, markers)
    a = chat.ConversationLoader(cs, 2, 40, seed=1, pad=markers.bos, prefetch=2)
    batches = [a.next() for _ in range(7)]  # crosses epochs
    a.close()
    b = chat.ConversationLoader(cs, 2, 40, seed=1, pad=markers.bos, start_step=5, prefetch=0)
    for want in batches[5:]:
        for u, v in zip(b.next(), want):
            assert torch.equal(u, v)
    with pytest.raises(ValueError, match="no conversations"):
        chat.ConversationLoader(chat.ChatSet(), 2, 40, seed=1, pad=0)
    with pytest.raises(ValueError, match="exceeds seq_len"):
        chat.ConversationLoader(cs, 2, 5, seed=1, pad=0)
