"""LLaMA-3's tokenizer (byte-level BPE, llama.cpp's "llama-bpe" pre-tokenizer, ignore_merges)
in our Python tokenizer (an imported tokenizer.json) and the engine's C++ tokenizer (from a
GGUF with tokenizer.ggml.pre = "llama-bpe"), token for token against HF `tokenizers` (the
oracle) on a locally built LLaMA-3-style tokenizer.json.

    python -m pytest tests/test_llama_bpe.py -q
"""

from __future__ import annotations

import json
import random

import pytest
from nanochat import _C
from nanochat.data.tokenizer import LLAMA3_REGEX, Tokenizer
from nanochat.export import tokenizer_metadata
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTok

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
FRAGMENTS = [
    "1234567890", "3.14159", "x = 10_000_000;", "42nd", "٣٤٥ १२३", "½ ²",
    "it's", "IT'S", "they're", "THEY'RE", "we'll", "WE'LL", "I'm", "I'M", "she'd",
    "SHE'D", "you've", "YOU'VE", "'sup", "''s", "don't", "DON'T", "’s",
    "line1\r\nline2\r\n\r\n", "\n\n\n", "\t\tindent", "  \n  x", " \u00a0 ", "\u3000",
    "😀", "👨‍👩‍👧‍👦", "🇫🇷", "👍🏽", "机器学习是人工智能", "東京は日本の首都です", "안녕하세요",
    "Привет, мир!", "مرحبا", "def f(x):\n    return {'a': [1, 2]}  # c\n",
    "if (a && b) { y++; }",
    "   ", " ", "...!!!???", " (((", "a--b", "e\u0301", "\x00\x7f", "<|begin_of_text|>",
    "Hello", " world", "The", " quick brown fox", "MixedCASE words", "snake_case_name",
]


def llama3_json(vocab: int, texts: list[str]) -> str:
    tok = HFTok(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def strings(n: int) -> list[str]:
    """n varied strings: each fragment alone, then random concatenations with random joins."""
    rng = random.Random(0)
    out = list(FRAGMENTS)
    while len(out) < n:
        k = rng.randint(1, 6)
        out.append("".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", "\n", "  ", "\r\n", "\t"])
                           for _ in range(k)))
    return out[:n]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    text = llama3_json(1500, strings(1000) * 3)
    (d / "tokenizer.json").write_text(text, encoding="utf-8")
    ours = Tokenizer.load_foreign(d / "tokenizer.json", 0, 1)
    gguf = d / "tok.gguf"
    _C.gguf_write(str(gguf), tokenizer_metadata(ours), [])
    return d / "tokenizer.json", ours, gguf


def test_python_equals_hf(files):
    path, ours, _ = files
    assert ours.pre_tokenizer == "llama-bpe"
    hf = HFTok.from_str(path.read_text(encoding="utf-8"))
    hf.encode_special_tokens = True  # ours never splits special strings out of text
    texts = strings(1000)
    assert sum(len(hf.encode(t, add_special_tokens=False).ids) > 1 for t in texts) > 900
    for t in texts:
        assert ours.encode(t) == hf.encode(t, add_special_tokens=False).ids, repr(t)
    # saved into a run's tokenizer dir and loaded back: the same tokenizer
    again = Tokenizer.load(ours.save(path.parent / "saved"))
    assert again.bos_id == 0 and again.eos_id == 1 and again.pre_tokenizer == "llama-bpe"
    assert again.encode_batch(texts[:50]) == [ours.encode(t) for t in texts[:50]]


def test_cpp_equals_hf(files):
    path, _, gguf = files
    hf = HFTok.from_str(path.read_text(encoding="utf-8"))
    cpp = _C.BpeTokenizer.from_gguf(str(gguf))
    for t in strings(1000):
        want = hf.encode(t, add_special_tokens=False).ids  # HF splits specials out: parse_special
        assert list(cpp.encode(t, True)) == want, repr(t)
        assert cpp.decode(want) == t.encode("utf-8") or "<|" in t


def test_cpp_ignore_merges(files, tmp_path):
    """A piece that is itself a token encodes to that token even where the merges would
    build it differently: a vocab entry with no merge path at all shows it."""
    path, _, _ = files
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["ĠXQZ"] = max(max(vocab.values()), *(a["id"] for a in spec["added_tokens"])) + 1
    text = json.dumps(spec)
    (tmp_path / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.load_foreign(tmp_path / "tokenizer.json", 0, 1)
    _C.gguf_write(str(tmp_path / "t.gguf"), tokenizer_metadata(tok), [])
    cpp = _C.BpeTokenizer.from_gguf(str(tmp_path / "t.gguf"))
    hf = HFTok.from_str(text)
    assert hf.encode(" XQZ", add_special_tokens=False).ids == [vocab["ĠXQZ"]]
    assert list(cpp.encode(" XQZ", False)) == [vocab["ĠXQZ"]]


def test_unsupported_pre_tokenizer_named(tmp_path):
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS])
    (tmp_path / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    with pytest.raises(ValueError, match="pre_tokenizer"):
        Tokenizer.load_foreign(tmp_path / "tokenizer.json", 0)


def test_cpp_arbitrary_bytes_round_trip(files):
    """Any bytes (invalid UTF-8, lone CR, truncated sequences) split and decode back exactly
    under the llama-bpe split, as under GPT-2's."""
    _, _, gguf = files
    cpp = _C.BpeTokenizer.from_gguf(str(gguf))
    rng = random.Random(1)
    alphabet = b"\r\n\t '0aZ9.\xc3\xa9\xe6\x9c\xba\xf0\x9f\x98\x80\xff\x80"
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert cpp.decode(cpp.encode_bytes(data)) == data, data
