"""Byte-level BPE tokenizer: lossless round trips, fixed special ids, save/load, GGUF lists."""

from __future__ import annotations

import numpy as np
import pytest
from nanochat.data.tokenizer import (
    MIN_VOCAB,
    PRE_TOKENIZER,
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_to_unicode,
)

CODE = '''import os, sys

def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        print(f"Hello, {self.name}!")  # comment
'''

CASES = {
    "code": CODE,
    "chinese": "机器学习是人工智能的一个分支。你好，世界！",
    "arabic": "مرحبا بالعالم، هذا اختبار للنص العربي.",
    "hindi": "नमस्ते दुनिया, यह एक परीक्षण है।",
    "emoji_zwj": "family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin 👍🏽, rainbow 🏳️‍🌈 ok",
    "whitespace": "a" + " " * 300 + "b\n\n\n\n" + "\t" * 40 + "c" + " \n" * 20,
    "tabs_crlf": "line1\r\n\tline2\r\n\r\n\t\tline3\rend\x0b\x0c",
    "specials": "".join(SPECIAL_TOKENS) + " <|bos|>x<|assistant_end|> <|reserved_0|>",
    "control": "\x00\x01\x7f\u200b\ufeff\U0010ffff",
    "empty": "",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [CODE * 3] + [v for k, v in CASES.items() if k != "specials"] * 2
    return Tokenizer.train(texts, 400)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(tok, name):
    s = CASES[name]
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert b"".join(tok.id_to_bytes(i) for i in ids) == s.encode("utf-8")
    assert int(tok.token_bytes()[ids].sum()) == len(s.encode("utf-8"))


def test_plain_text_never_gives_special_ids(tok):
    for s in CASES.values():
        ids = tok.encode(s)
        assert not any(tok.is_special(i) for i in ids)
    assert tok.encode("<|bos|>") != [tok.bos_id]


def test_special_ids_fixed_and_decode(tok):
    assert tok.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tok.bos_id == 0
    assert tok.decode([tok.bos_id] + tok.encode("hi")) == "<|bos|>hi"
    assert tok.token_bytes()[: len(SPECIAL_TOKENS)].tolist() == [0] * len(SPECIAL_TOKENS)


def test_encode_batch_matches_encode(tok):
    texts = list(CASES.values())
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["tokenizer.json"]
    tok2 = Tokenizer.load(tmp_path / "t")
    assert tok2.sha256() == tok.sha256()
    assert tok2.vocab_size == tok.vocab_size
    for s in CASES.values():
        assert tok2.encode(s) == tok.encode(s)
    assert tok2.encode(CASES["specials"]) == tok.encode(CASES["specials"])  # still plain bytes


def test_training_is_deterministic():
    texts = [CODE, CASES["chinese"], CODE.upper()]
    a, b = Tokenizer.train(texts, 330), Tokenizer.train(list(texts), 330)
    assert a.sha256() == b.sha256()
    assert a.merges() == b.merges()


def test_vocab_size_honoured_with_reserved_padding():
    tok = Tokenizer.train(["ab ab ab ab"], 300)  # far too little text for 39 merges
    assert tok.vocab_size == 300
    toks = tok.tokens()
    n_reserved = sum(t.startswith("<|reserved_") for t in toks)
    assert n_reserved > 0 and toks[-n_reserved:] == [f"<|reserved_{i}|>" for i in range(n_reserved)]
    assert tok.is_special(299) and tok.token_bytes()[299] == 0
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match=str(MIN_VOCAB)):
        Tokenizer.train(["abc"], MIN_VOCAB - 1)


def test_gguf_lists(tok):
    """tokens() / merges() are what tokenizer.ggml.tokens / .merges need (pre = gpt-2)."""
    assert PRE_TOKENIZER == "gpt-2"
    toks = tok.tokens()
    assert len(toks) == tok.vocab_size
    assert toks[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    alphabet = set(bytes_to_unicode().values())
    assert set(toks[len(SPECIAL_TOKENS): MIN_VOCAB]) == alphabet  # the 256 byte symbols
    merges = tok.merges()
    assert len(merges) == tok.vocab_size - MIN_VOCAB  # no reserved fillers needed here
    index = {t: i for i, t in enumerate(toks)}
    for rank, m in enumerate(merges):
        left, right = m.split(" ")
        assert left in index and right in index
        assert index[left + right] == MIN_VOCAB + rank  # merge r creates token 261 + r
    # Byte-level token strings use only alphabet characters (so no literal spaces).
    assert all(set(t) <= alphabet for t in toks[MIN_VOCAB:])
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    assert tb[len(SPECIAL_TOKENS): MIN_VOCAB].tolist() == [1] * 256


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
