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
# An imported (foreign) tokenizer's own special tokens and pre-tokenizer, beside FILENAME:
# {"bos": text, "eos": text, "pre": name}. Absent: the nanochat layout above.
FOREIGN = "special.json"
# An imported tokenizer's own chat template (Jinja; nanochat/data/template.py), beside FILENAME
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a few KB; a bigger file is not one
# LLaMA-3's split regex (llama.cpp's "llama-bpe" pre-tokenizer), as in its tokenizer.json
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


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

    def __init__(self, hf, foreign: dict | None = None, chat_template: str | None = None):
        # hf: tokenizers.Tokenizer; chat_template: an imported tokenizer's Jinja template
        self._hf = hf
        # Special-token strings inside text are encoded as plain bytes, never as specials.
        hf.encode_special_tokens = True
        self._foreign = foreign
        self._hf_special = None  # built by encode_special on first use
        if chat_template is not None and foreign is None:
            raise ValueError("tokenizer: only an imported tokenizer keeps a chat template "
                             "(ours is nanochat/data/chat.py's)")
        self.chat_template = chat_template
        if foreign is not None:  # an imported tokenizer: its own BOS/EOS (FOREIGN)
            self._special = {t: hf.token_to_id(t) for t in (foreign["bos"], foreign["eos"])}
            for t, i in self._special.items():
                if i is None:
                    raise ValueError(f"tokenizer: special token {t!r} is not in the vocabulary")
        else:
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
        if self._foreign is not None:
            (d / FOREIGN).write_text(json.dumps(self._foreign) + "\n", encoding="utf-8")
        if self.chat_template is not None:
            (d / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        return d

    def save_hf(self, path_dir: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json as transformers' AutoTokenizer reads them."""
        d = Path(path_dir)
        (d / FILENAME).write_text(self._serialized(), encoding="utf-8")
        conf = {"tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": self._hf.id_to_token(self.bos_id),
                "eos_token": self._hf.id_to_token(self.eos_id)}
        if self.chat_template is not None:
            conf["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n",
                                                 encoding="utf-8")

    @classmethod
    def load_foreign(cls, file: str | Path, bos_id, eos_id=None,
                     chat_template: str | None = None) -> "Tokenizer":
        """Another project's byte-level BPE tokenizer.json (e.g. LLaMA-3's), with the BOS
        (and EOS, default BOS) ids its model config names. Only pipelines we reproduce in
        every tokenizer of ours are accepted: no normalizer, BPE, a ByteLevel decoder, and
        the GPT-2 ("gpt-2") or LLaMA-3 ("llama-bpe") pre-tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer

        f = Path(file)
        try:
            text = f.read_text(encoding="utf-8")
            spec = json.loads(text)
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{f}: not a valid tokenizer file: {e}") from None
        pre = pre_tokenizer_name(spec, f)
        ids = {"bos_token_id": bos_id, "eos_token_id": bos_id if eos_id is None else eos_id}
        names = {}
        for key, i in ids.items():
            t = hf.id_to_token(i) if isinstance(i, int) and not isinstance(i, bool) else None
            if t is None:
                raise ValueError(f"{f}: the model's {key} {i!r} is not a token of this file")
            names[key] = t
        return cls(hf, {"bos": names["bos_token_id"], "eos": names["eos_token_id"], "pre": pre},
                   chat_template)

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
        foreign = None
        if (Path(path_dir) / FOREIGN).is_file():
            fs = Path(path_dir) / FOREIGN
            try:
                foreign = json.loads(fs.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{fs}: not valid JSON: {e}") from None
            if (not isinstance(foreign, dict) or set(foreign) != {"bos", "eos", "pre"}
                    or not all(isinstance(v, str) for v in foreign.values())
                    or foreign["pre"] not in ("gpt-2", "llama-bpe")):
                raise ValueError(f"{fs}: expected {{\"bos\", \"eos\", \"pre\"}} strings, "
                                 f"pre 'gpt-2' or 'llama-bpe'")
        template = None
        ft = Path(path_dir) / CHAT_TEMPLATE_FILE
        if foreign is not None and ft.is_file():
            if ft.stat().st_size > MAX_TEMPLATE_BYTES:
                raise ValueError(f"{ft}: {ft.stat().st_size} bytes, larger than any chat "
                                 f"template")
            try:
                template = ft.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{ft}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls(hf, foreign, template)

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never emits special tokens and adds no BOS."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_special(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of `text` with special-token strings parsed to their
        ids, as transformers tokenizes a rendered chat template (nanochat/data/template.py);
        only for text a template built, never for a document's plain text."""
        if self._hf_special is None:  # a second instance: `encode` keeps specials as text
            from tokenizers import Tokenizer as HFTokenizer

            self._hf_special = HFTokenizer.from_str(self._serialized())
        e = self._hf_special.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

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
        return self._special[self._foreign["bos"] if self._foreign else BOS]

    @property
    def eos_id(self) -> int:
        """End of a document: training puts BOS before every document, so our own
        tokenizers end one with BOS; an imported one with its model's EOS."""
        return self._special[self._foreign["eos"]] if self._foreign else self.bos_id

    @property
    def foreign(self) -> bool:
        """An imported tokenizer (its own special tokens, no nanochat chat markers)."""
        return self._foreign is not None

    @property
    def pre_tokenizer(self) -> str:
        """llama.cpp's name of the pre-tokenizer (tokenizer.ggml.pre)."""
        return self._foreign["pre"] if self._foreign else PRE_TOKENIZER

    @property
    def special_tokens(self) -> dict[str, int]:
        """The five fixed special tokens (not the reserved fillers), text -> id; an
        imported tokenizer's BOS and EOS."""
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


def pre_tokenizer_name(spec: dict, where) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json's pipeline, or an error naming the
    field we do not reproduce."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise ValueError(f"{where}: only byte-level BPE without a normalizer is supported "
                         f"(model.type {model.get('type')!r}, normalizer "
                         f"{spec.get('normalizer')!r})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: decoder must be ByteLevel, got {spec.get('decoder')!r}")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get(
            "add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern") == {"Regex": LLAMA3_REGEX}
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space", False)):
        return "llama-bpe"
    raise ValueError(f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is neither GPT-2's "
                     f"ByteLevel nor LLaMA-3's llama-bpe split")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pre={PRE_TOKENIZER!r})"
