"""Byte-level BPE tokenizer (GPT-2 style), trained with HF `tokenizers`.

    nanochat data prepare --vocab-size 4096      # trains one on the corpus' train split

The pipeline is exactly GPT-2's: no normalizer, the ByteLevel pre-tokenizer with the GPT-2
split regex and add_prefix_space=False, a BPE model over the 256 byte symbols, and the
ByteLevel decoder. That is what llama.cpp implements for tokenizer.ggml.model = "gpt2" with
tokenizer.ggml.pre = "gpt-2" (`PRE_TOKENIZER`), so a GGUF export can ship `tokens()` and
`merges()` as they are and llama.cpp tokenizes the same text to the same ids.

Vocabulary layout: the special tokens take ids 0..4 (`SPECIAL_TOKENS`, in that order), then
the 256 byte symbols, then the learned merges. When the corpus is too small to learn
`vocab_size` tokens, the rest is filled with `<|reserved_N|>` special tokens so the size
asked for is always the size you get (the model's embedding matrix matches it).

Plain text never encodes to a special token: "<|bos|>" inside a source file is encoded as
ordinary bytes. Special ids are added by the code that builds documents (corpus.py puts
`bos_id` before every document). HF keeps that switch (encode_special_tokens) outside
tokenizer.json, so load through `Tokenizer.load`, not a bare `tokenizers.Tokenizer`, which
would split the special strings out of text (llama.cpp's parse_special=false matches ours).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

PRE_TOKENIZER = "gpt-2"  # tokenizer.ggml.pre for llama.cpp (with tokenizer.ggml.model = "gpt2")
BOS = "<|bos|>"
SPECIAL_TOKENS = (BOS, "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
RESERVED = "<|reserved_{}|>"
MIN_VOCAB = len(SPECIAL_TOKENS) + 256
FILENAME = "tokenizer.json"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable unicode character (how HF stores tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    """A trained byte-level BPE tokenizer. Build with `train` or `load`."""

    def __init__(self, hf):  # hf: tokenizers.Tokenizer
        self._hf = hf
        # Special-token strings inside text are encoded as plain bytes, never as specials.
        hf.encode_special_tokens = True
        self._special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        for i, t in enumerate(SPECIAL_TOKENS):
            if self._special[t] != i:
                raise ValueError(f"tokenizer: special token {t} has id {self._special[t]}, "
                                 f"expected {i}")
        self._special_ids = {i: a.content for i, a in hf.get_added_tokens_decoder().items()
                             if a.special}  # id -> text, the reserved fillers included
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn BPE merges on `texts`; deterministic for the same texts in the same order."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (5 special tokens + 256 "
                             f"bytes), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        short = vocab_size - hf.get_vocab_size(with_added_tokens=True)
        if short > 0:
            hf.add_special_tokens([RESERVED.format(i) for i in range(short)])
        if hf.get_vocab_size(with_added_tokens=True) != vocab_size:
            raise AssertionError("tokenizer: vocab size mismatch after training")
        return cls(hf)

    def save(self, path_dir: str | Path) -> Path:
        """Write `path_dir/tokenizer.json` (the directory is created)."""
        d = Path(path_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / FILENAME).write_text(self._serialized(), encoding="utf-8")
        return d

    @classmethod
    def load(cls, path_dir: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        f = Path(path_dir) / FILENAME
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer file {f} does not exist")
        try:
            hf = HFTokenizer.from_str(f.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{f}: not a valid tokenizer file: {e}") from None
        return cls(hf)

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never emits special tokens and adds no BOS."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel (HF's thread pool)."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens appear as their strings (e.g. "<|bos|>")."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special[BOS]

    @property
    def special_tokens(self) -> dict[str, int]:
        """The five fixed special tokens (not the reserved fillers), text -> id."""
        return dict(self._special)

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def tokens(self) -> list[str]:
        """Token strings by id, GPT-2 byte-to-unicode form for ordinary tokens
        (tokenizer.ggml.tokens)."""
        return [self._hf.id_to_token(i) for i in range(self.vocab_size)]

    def merges(self) -> list[str]:
        """BPE merges by rank as "left right" strings (tokenizer.ggml.merges). Byte-level
        token strings never contain a space (the space byte is "Ġ"), so this is unambiguous."""
        merges = json.loads(self._serialized())["model"]["merges"]
        return [m if isinstance(m, str) else " ".join(m) for m in merges]

    def id_to_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for; a special token gives its UTF-8 text."""
        t = self._hf.id_to_token(int(i))
        if t is None:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        if i in self._special_ids:
            return t.encode("utf-8")
        u2b = unicode_to_bytes()
        return bytes(u2b[c] for c in t)

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): bytes each token decodes to; 0 for special tokens. The
        denominator of bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if i not in self._special_ids:
                out[i] = len(self.id_to_bytes(i))
        return out

    def sha256(self) -> str:
        """Hash of the serialized tokenizer (identical merges and vocab <=> identical hash)."""
        return hashlib.sha256(self._serialized().encode("utf-8")).hexdigest()

    def _serialized(self) -> str:
        return self._hf.to_str(pretty=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pre={PRE_TOKENIZER!r})"
