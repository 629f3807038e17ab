"""Limits as tests: 1 MiB adversarial prompts tokenize in under 0.5 s each with the engine's
C++ tokenizer, with and without special-token parsing, for a tokenizer with a handful of
special tokens and for one with 10^4 of them (from a GGUF file written here).

Special tokens used to be matched by trying every distinct special length at every
position (prompt length x sum of lengths: an 8 KiB prompt of "<" took seconds against a
file with many specials); they are now found by one automaton pass, linear in the prompt.

    pytest tests/test_tokenizer_limits.py
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import pytest
from nanochat import _C
from nanochat.data.tokenizer import PRE_TOKENIZER, bytes_to_unicode

MIB = 1 << 20
LIMIT_S = 0.5
EMOJI = "\U0001f600".encode()

B2U = bytes_to_unicode()


def sym(raw: bytes) -> str:
    return "".join(B2U[b] for b in raw)


def vocab(n_specials: int) -> tuple[list[str], list[int], list[str]]:
    """Byte symbols, merges that build long runs of one character (so BPE merges a lot),
    then special tokens: plain markers plus ones that start like the prompts ("<<<...",
    "aaa...") with many distinct lengths, the old matcher's worst case."""
    tokens = [sym(bytes([b])) for b in range(256)]
    types = [1] * 256
    merges: list[str] = []

    def merge(left: bytes, right: bytes) -> None:
        merges.append(f"{sym(left)} {sym(right)}")
        if sym(left + right) not in seen:
            seen.add(sym(left + right))
            tokens.append(sym(left + right))
            types.append(1)

    seen = set(tokens)
    merge(EMOJI[:1], EMOJI[1:2])
    merge(EMOJI[:2], EMOJI[2:3])
    merge(EMOJI[:3], EMOJI[3:])
    for unit in (b"a", b"7", b"<", b"\xff", b" ", EMOJI):
        run = unit
        for _ in range(10):
            merge(run, run)
            run += run
    specials = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>"]
    rng = random.Random(0)
    for k in range(n_specials - len(specials)):
        if k % 3 == 0:
            specials.append("<" * (2 + k % 97) + f"|x{k}")
        elif k % 3 == 1:
            specials.append("a" * (2 + k % 89) + f"#{k}")
        else:
            specials.append("<|" + "".join(rng.choice("abc|<>") for _ in range(k % 23)) + f"{k}|>")
    for s in specials:
        tokens.append(s)
        types.append(3)
    return tokens, types, merges


def write_gguf(path: Path, tokens, types, merges) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "nanochat")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@functools.lru_cache(maxsize=1)
def prompts() -> dict[str, bytes]:
    rng = random.Random(1)
    return {
        "one letter": b"a" * MIB,
        "invalid utf-8": b"\xff" * MIB,
        "digits": b"7" * MIB,
        "emoji": EMOJI * (MIB // 4),
        "less-than": b"<" * MIB,
        "spaces": b" " * MIB,
        "markers": b"<|user_start|>x" * (MIB // 15),
        "random bytes": rng.randbytes(MIB),
    }


@pytest.fixture(scope="module", params=[4, 10_000], ids=["4 specials", "10^4 specials"])
def tokenizer(request, tmp_path_factory):
    tokens, types, merges = vocab(request.param)
    path = tmp_path_factory.mktemp("toklimits") / "tok.gguf"
    write_gguf(path, tokens, types, merges)
    t = _C.BpeTokenizer.from_gguf(str(path))
    assert sum(t.is_special(i) for i in range(t.vocab_size)) == request.param
    return t


@pytest.mark.parametrize("name", list(prompts()))
def test_megabyte_prompt_tokenizes_fast(tokenizer, name):
    data = prompts()[name]
    for parse_special in (False, True):
        t0 = time.perf_counter()
        ids = tokenizer.encode_bytes(data, parse_special)
        dt = time.perf_counter() - t0
        assert dt < LIMIT_S, f"{name}, parse_special={parse_special}: {dt:.3f} s"
        if not parse_special:
            assert tokenizer.decode(ids) == data
            assert not any(tokenizer.is_special(i) for i in ids[:1000])


def test_specials_found_in_long_prompts(tokenizer):
    """The automaton finds every marker of a long prompt, leftmost-longest."""
    bos = tokenizer.find("<|bos|>")
    ids = tokenizer.encode_bytes(b"<|bos|>x" * 20000, True)
    assert ids.count(bos) == 20000
    deep = "<" * 62 + "|x60"  # a special of the 10^4 set (k = 60), inside a run of "<"
    run = tokenizer.encode_bytes(b"<" * 1000)
    got = tokenizer.encode_bytes(b"<" * 1000 + deep.encode() + b"<" * 1000, True)
    if tokenizer.find(deep) >= 0:
        assert got == run + [tokenizer.find(deep)] + run
    else:
        assert got == tokenizer.encode_bytes(b"<" * 1000 + deep.encode() + b"<" * 1000)
