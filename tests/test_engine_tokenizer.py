"""The engine's C++ tokenizer (nanochat._C.BpeTokenizer) against nanochat.data.tokenizer (HF
tokenizers), token for token, and the C++ sampler's Python binding.

    python -m pytest tests/test_engine_tokenizer.py -q      # ~10 s, ~6 MB of stdlib sources
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from nanochat import _C
from nanochat.data.tokenizer import PRE_TOKENIZER, Tokenizer

CASES = {
    "chinese": "机器学习是人工智能的一个分支。你好，世界！今天天气很好，我们去公园散步吧。",
    "japanese": "東京は日本の首都です。ひらがな、カタカナ、漢字を使います。ｶﾀｶﾅ（半角）",
    "arabic": "مرحبا بالعالم، هذا اختبار للنص العربي. الأرقام: ١٢٣٤٥",
    "hindi": "नमस्ते दुनिया, यह एक परीक्षण है। संख्या: १२३",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "korean": "안녕하세요 세계! 한국어 텍스트를 토큰화합니다. 한글 자모: ㄱㄴㄷ",
    "emoji": ("family 👨‍👩‍👧‍👦 couple 👩‍❤️‍💋‍👨, skin 👍🏻👍🏽👍🏿, flags 🇫🇷🇯🇵🇺🇳 🏴󠁧󠁢󠁳󠁣󠁴󠁿, "
              "rainbow 🏳️‍🌈, keycap 1️⃣ #️⃣ ok"),
    "whitespace": ("a" + " " * 300 + "b\n\n\n\n" + "\t" * 40 + "c" + " \n" * 20
                   + "  \u3000\u00a0x   "),
    "tabs_crlf": "line1\r\n\tline2\r\n\r\n\t\tline3\rend\x0b\x0c\x1c\x1d\x85\u2028\u2029 end",
    "digits": "0 12 345 6789 3.14159 1e-10 0x1F 1_000_000 ½ ⅔ Ⅻ ² ٣ १२ 42nd",
    "apostrophes": "it's It'S he'll I'M we've they're she'd don't DON'T ’s ’t ''s 'sup x' ' 's",
    "code": 'def f(x):\n    return {"a": [1, 2], \'b\': x ** 2}  # comment\n\n\nclass A:\n\tpass\n',
    "specials_text": "<|bos|>hello<|assistant_end|> <|reserved_0|> <|user_start|>",
    "control": "\x00\x01\x7f\u200b\ufeff\U0010ffff\ue000 \U000e0001",
    "combining": "e\u0301 a\u0308 n\u0303 \u1100\u1161\u11a8 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "empty": "",
    "single": " ",
}
MULTILINGUAL = "\n".join(CASES.values())


def stdlib_sources(max_bytes: int) -> list[str]:
    """Python files of the local standard library, sorted, up to max_bytes of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            s = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(s)
        total += len(s.encode("utf-8"))
        if total >= max_bytes:
            break
    return out


def cpp_of(tok: Tokenizer) -> _C.BpeTokenizer:
    types = [3 if tok.is_special(i) else 1 for i in range(tok.vocab_size)]
    return _C.BpeTokenizer(tok.tokens(), types, tok.merges())


@pytest.fixture(scope="module")
def sources() -> list[str]:
    return stdlib_sources(1_000_000)


@pytest.fixture(scope="module")
def tok(sources) -> Tokenizer:
    return Tokenizer.train(sources[:30] + [MULTILINGUAL] * 3, 2048)


@pytest.fixture(scope="module")
def ctok(tok) -> _C.BpeTokenizer:
    return cpp_of(tok)


# ---- equality with HF ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_cases_match_hf(tok, ctok, name):
    s = CASES[name]
    ids = ctok.encode(s)
    assert ids == tok.encode(s)
    assert ctok.decode(ids) == s.encode("utf-8")
    assert ctok.encode_bytes(s.encode("utf-8")) == ids


def test_stdlib_sources_match_hf(tok, ctok, sources):
    for s in sources:
        assert ctok.encode(s) == tok.encode(s)
    big = "".join(sources)
    ids = ctok.encode(big)
    assert ids == tok.encode(big)
    assert ctok.decode(ids) == big.encode("utf-8")


def test_random_mixtures_match_hf(tok, ctok):
    alphabet = list("aZé 1٣'’sStlmdrevL\t\n\r\x0b\x0c\u00a0\u2028\u3000!?.,-_()[]{}<>|#") + [
        "😀", "👍🏽", "\u200d", "中", "日本", "\u0301", "Ⅻ", "½", "\x00", "\x85", "'s", "'re",
        "'ll", "'ve", " '", "  ", "\r\n", "<|bos|>", "def ", "    ", "\U0001f1eb\U0001f1f7"]
    rng = random.Random(0)
    for _ in range(400):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert ctok.encode(s) == tok.encode(s), repr(s)


def test_pre_tokenizer_matches_hf_on_every_code_point():
    """Each code point in contexts where its class (letter, number, space, other) changes
    the split, against HF's ByteLevel pre-tokenizer (Oniguruma's Unicode tables)."""
    from tokenizers import pre_tokenizers

    hf = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # planes 0-3 and 14 hold every assigned code point except private use
    cps = [c for c in [*range(0x40000), *range(0xE0000, 0xE1000)] if not 0xD800 <= c < 0xE000]
    for i in range(0, len(cps), 40000):
        s = "".join(f"a{c}1{c}!{c}\t{c} " for c in map(chr, cps[i:i + 40000]))
        want = [s[a:b].encode("utf-8") for _, (a, b) in hf.pre_tokenize_str(s)]
        assert _C.BpeTokenizer.pre_tokenize(s.encode("utf-8")) == want, hex(cps[i])


def test_parse_special_matches_hf_added_token_matching(tok, ctok, tmp_path):
    # A bare HF tokenizer from tokenizer.json splits special strings out of text.
    from tokenizers import Tokenizer as HF

    tok.save(tmp_path)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    for s in [CASES["specials_text"], "<|bos|><|bos|>x<|user_end|>\n<|reserved_|>",
              "a <|assistant_start|> b<|assistant_end|>", "<|bos", "<|bos|"]:
        ids = ctok.encode(s, parse_special=True)
        assert ids == hf.encode(s, add_special_tokens=False).ids, s
        assert ctok.encode(s) == tok.encode(s)  # off: plain text
    ids = ctok.encode("<|bos|>hi", parse_special=True)
    assert ids[0] == tok.bos_id and ctok.is_special(ids[0]) and not ctok.is_special(ids[1])
    assert ctok.decode(ids) == b"hi"  # control tokens decode to nothing


def test_vocab_lookups(tok, ctok):
    assert ctok.vocab_size == tok.vocab_size
    for i in range(tok.vocab_size):
        want = b"" if tok.is_special(i) else tok.id_to_bytes(i)
        assert ctok.token_bytes(i) == want
        assert ctok.find(tok.tokens()[i]) == i
        assert ctok.is_special(i) == tok.is_special(i)
    assert ctok.find("not a token at all") == -1


def test_invalid_utf8_bytes_round_trip(ctok):
    rng = random.Random(1)
    for _ in range(300):
        b = bytes(rng.randrange(256) for _ in range(rng.randint(0, 50)))
        assert ctok.decode(ctok.encode_bytes(b)) == b
    # each invalid byte is punctuation-like: it splits letters, joins "!" runs
    assert _C.BpeTokenizer.pre_tokenize(b"ab\xffcd !\xfe!") == [b"ab", b"\xff", b"cd", b" !\xfe!"]


# ---- a second tokenizer, and GGUF --------------------------------------------------------------


def test_second_tokenizer_larger_vocab(sources):
    big = Tokenizer.train(sources + [MULTILINGUAL], 8192)
    c = cpp_of(big)
    text = "".join(sources[-20:]) + MULTILINGUAL
    assert c.encode(text) == big.encode(text)
    for s in CASES.values():
        assert c.encode(s) == big.encode(s)


def _write_tokenizer_gguf(path: Path, tok: Tokenizer) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "nanochat")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tok.tokens())
    w.add_token_types([3 if tok.is_special(i) else 1 for i in range(tok.vocab_size)])
    w.add_token_merges(tok.merges())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_from_gguf_written_by_gguf_py(tok, ctok, tmp_path):
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, tok)
    g = _C.BpeTokenizer.from_gguf(str(path))
    assert g.vocab_size == tok.vocab_size
    for s in CASES.values():
        assert g.encode(s) == ctok.encode(s)
        assert g.encode(s, parse_special=True) == ctok.encode(s, parse_special=True)


def test_from_gguf_of_an_exported_model(tmp_path):
    export = pytest.importorskip("nanochat.export")
    from nanochat.config import ModelConfig
    from nanochat.model.gpt import GPT

    small = Tokenizer.train([CASES["code"] * 20, MULTILINGUAL], 512)
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_hidden=512, max_seq_len=64)
    path = tmp_path / "m.gguf"
    export.export_gguf(GPT(cfg, bitlinear="torch"), small, path)
    g, d = _C.BpeTokenizer.from_gguf(str(path)), cpp_of(small)
    assert g.vocab_size == d.vocab_size == 512
    for s in CASES.values():
        assert g.encode(s) == d.encode(s) == small.encode(s)
        assert g.encode(s, parse_special=True) == d.encode(s, parse_special=True)
    assert [g.token_bytes(i) for i in range(512)] == [d.token_bytes(i) for i in range(512)]


# ---- errors ---------------------------------------------------------------------------------


def test_errors(tok, tmp_path):
    tokens, merges = tok.tokens(), tok.merges()
    types = [3 if tok.is_special(i) else 1 for i in range(tok.vocab_size)]
    with pytest.raises(ValueError, match=r"merges\[2\] .*is not a token"):
        _C.BpeTokenizer(tokens, types, merges[:2] + ["Ġ zzzz"] + merges[2:])
    with pytest.raises(ValueError, match=r"duplicates tokens\[7\]"):
        _C.BpeTokenizer(tokens + [tokens[7]], types + [1], merges)
    with pytest.raises(ValueError, match="token_type"):
        _C.BpeTokenizer(tokens, types[:-1], merges)
    with pytest.raises(ValueError, match="not.gguf"):
        _C.BpeTokenizer.from_gguf(str(tmp_path / "not.gguf"))
    import gguf

    path = tmp_path / "notok.gguf"
    w = gguf.GGUFWriter(str(path), "nanochat")
    w.add_tokenizer_model("gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"notok\.gguf.*tokenizer\.ggml\.pre"):
        _C.BpeTokenizer.from_gguf(str(path))
    c = cpp_of(tok)
    with pytest.raises(UnicodeEncodeError):
        c.encode("bad \ud800 surrogate")
    with pytest.raises(ValueError, match="out of range"):
        c.decode([0, tok.vocab_size])


# ---- sampler --------------------------------------------------------------------------------


def test_sampler_binding():
    x = np.array([0.5, 3.0, 3.0, -1.0], dtype=np.float32)
    keep = x.copy()
    assert _C.Sampler(temperature=0).sample(x, [1, 1]) == 1
    assert _C.Sampler(temperature=0, repetition_penalty=2.0).sample(x, [1]) == 2
    np.testing.assert_array_equal(x, keep)  # the caller's logits are not touched
    assert _C.Sampler(temperature=0).sample(x[::-1], []) == 1  # strided views work
    a = [_C.Sampler(temperature=1.0, seed=7).sample(x, []) for _ in range(3)]
    s = _C.Sampler(temperature=1.0, top_k=2, top_p=0.9, seed=7)
    draws = [s.sample(x, []) for _ in range(200)]
    assert len(set(a)) == 1 and set(draws) == {1, 2}
    with pytest.raises(ValueError, match="float32"):
        s.sample(x.astype(np.float64), [])
    with pytest.raises(ValueError, match="1-d"):
        s.sample(x.reshape(2, 2), [])
    for kw, name in [({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"),
                     ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0.0},
                                                "repetition_penalty"),
                     ({"repetition_window": -2}, "repetition_window")]:
        with pytest.raises(ValueError, match=name):
            _C.Sampler(**kw)


# ---- big corpus ------------------------------------------------------------------------------


def test_big_corpus_two_vocab_sizes():
    """~5 MB of stdlib sources (+ the multilingual cases) with a 4k and a 16k vocabulary."""
    sources = stdlib_sources(5_000_000)
    for vocab in (4096, 16384):
        t = Tokenizer.train(sources[::3] + [MULTILINGUAL], vocab)
        c = cpp_of(t)
        for s in sources + [MULTILINGUAL]:
            assert c.encode(s) == t.encode(s)
