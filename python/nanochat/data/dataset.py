"""A prepared data directory, opened read-only, and the n-gram baselines for bits per byte.

    nanochat data prepare        # writes the directory this opens
    python -c "from nanochat.data.dataset import *; d = TokenData('DIR'); print(unigram_bigram_bpb(d))"

`TokenData(dir)` validates manifest.json against the files next to it (dtype, sizes, the
tokenizer hash), memory-maps the token files (no copy) and checks every token id against
the vocabulary in one chunked pass (a prepared directory may come from someone else). Every
check names the file it is about. A split is one np.memmap when it is one file (a single
shard, or train.bin of a flat schema-1 directory) and a `ShardedTokens` over the shards'
memmaps otherwise: the same token stream as their concatenation, indexed like an array
(len, slices, integer arrays), so the loader's windows, the ranks' slices
(train/distributed.py) and their checkpointed position work the same across shard
boundaries.

Bits per byte convention (the same as the trainer's held-out eval): the targets are the
val tokens after the first; bits/byte = sum over targets of -ln p(target), divided by
ln 2 times the UTF-8 bytes of the targets (token_bytes). <|bos|> targets count in the nats
(predicting a document boundary is part of the job) and add 0 bytes. Being per byte, the
number compares across tokenizers and vocab sizes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nanochat.data.corpus import SPLITS, Manifest, token_dtype
from nanochat.data.tokenizer import Tokenizer

_CHECK_CHUNK = 1 << 24  # tokens per pass of the id check (64 MiB of uint32 at most)


def _check_ids(tokens: np.ndarray, vocab_size: int, f: Path) -> None:
    """Every id < vocab_size: an out-of-range id would index past the embedding table."""
    if vocab_size >= np.iinfo(tokens.dtype).max + 1:
        return  # the dtype cannot hold a bad id
    for i in range(0, len(tokens), _CHECK_CHUNK):
        chunk = tokens[i:i + _CHECK_CHUNK]
        if int(chunk.max()) >= vocab_size:
            j = int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"{f}: token id {int(chunk[j])} at position {i + j} is out of "
                             f"range for the vocabulary of {vocab_size} tokens")


class ShardedTokens:
    """Read-only concatenation of 1-D token arrays (the shards' memmaps), without copying:
    len(), [a:b] (a view, step 1), [int] and [integer array of any shape] (a gather), and
    np.asarray (materializes the whole range)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        if not self.parts:
            raise ValueError("ShardedTokens needs at least one non-empty array")
        self.dtype = self.parts[0].dtype
        self.ends = np.cumsum([len(p) for p in self.parts])  # (P,) exclusive ends
        self.starts = self.ends - [len(p) for p in self.parts]

    def __len__(self) -> int:
        return int(self.ends[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens: slices with a step are not supported")
            parts = [p[max(a - s, 0):max(min(b - s, len(p)), 0)]
                     for p, s in zip(self.parts, self.starts.tolist())]
            parts = [p for p in parts if len(p)]
            return ShardedTokens(parts) if parts else np.empty(0, self.dtype)
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"ShardedTokens: index must be integers, got {idx.dtype}")
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"ShardedTokens: index out of range for {n} tokens")
        flat = idx.reshape(-1)
        which = np.searchsorted(self.ends, flat, side="right")  # the part holding each index
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(which).tolist():
            m = which == k
            out[m] = self.parts[k][flat[m] - self.starts[k]]
        return out.reshape(idx.shape) if idx.ndim else out[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype, copy=False)


class TokenData:
    """train/val token arrays (read-only np.memmap), tokenizer, manifest, token_bytes."""

    def __init__(self, path: str | Path):
        self.dir = Path(path).expanduser()
        if not self.dir.is_dir():
            raise FileNotFoundError(f"data directory {self.dir} does not exist "
                                    "(run `nanochat data prepare`)")
        self.manifest = Manifest.load(self.dir)
        mf = self.dir / "manifest.json"
        dtype = token_dtype(self.manifest.vocab_size)
        if self.manifest.dtype != dtype.name:
            raise ValueError(f"{mf}: dtype {self.manifest.dtype!r} does not match vocab_size "
                             f"{self.manifest.vocab_size} (expected {dtype.name})")
        self.dtype = dtype
        arrays = {}
        for name in SPLITS:
            parts = []
            for fname, ntok in self.manifest.files_of(name):
                f = self.dir / fname
                if not f.is_file():
                    raise FileNotFoundError(f"{f} does not exist (listed in {mf})")
                size = f.stat().st_size
                if size != ntok * dtype.itemsize:
                    raise ValueError(f"{f}: {size} bytes, but {mf} says {ntok} {dtype.name} "
                                     f"tokens ({ntok * dtype.itemsize} bytes)")
                if ntok == 0:
                    raise ValueError(f"{f}: the {name} split is empty")
                parts.append(np.memmap(f, dtype=dtype, mode="r", shape=(ntok,)))
                _check_ids(parts[-1], self.manifest.vocab_size, f)
            arrays[name] = parts[0] if len(parts) == 1 else ShardedTokens(parts)
        self.train: np.ndarray | ShardedTokens = arrays["train"]
        self.val: np.ndarray | ShardedTokens = arrays["val"]
        self.tokenizer = Tokenizer.load(self.dir / "tokenizer")
        if self.tokenizer.sha256() != self.manifest.tokenizer_sha256:
            raise ValueError(f"{self.dir / 'tokenizer'}: tokenizer hash does not match {mf}")
        if self.tokenizer.vocab_size != self.manifest.vocab_size:
            raise ValueError(f"{self.dir / 'tokenizer'}: vocab size {self.tokenizer.vocab_size}"
                             f" != {self.manifest.vocab_size} in {mf}")
        self.token_bytes: np.ndarray = self.tokenizer.token_bytes()  # (V,) int32

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def __repr__(self) -> str:
        return (f"TokenData({str(self.dir)!r}, train={len(self.train):,}, "
                f"val={len(self.val):,}, vocab={self.vocab_size})")


def unigram_bigram_bpb(data: TokenData, max_tokens: int | None = None) -> tuple[float, float]:
    """Bits per byte on val of add-one smoothed unigram and bigram models fit on train.

    max_tokens: evaluate on the first max_tokens val tokens only (the region the trainer's
    eval_batches sweep covers with the same max_tokens); None: the whole val split.
    """
    V = data.vocab_size
    train = np.asarray(data.train, dtype=np.int64)
    val = np.asarray(data.val[:max_tokens], dtype=np.int64)
    if len(val) < 2:
        raise ValueError(f"{data.dir}: need at least 2 val tokens, got {len(val)}")
    tb = data.token_bytes.astype(np.int64)
    prev, tgt = val[:-1], val[1:]  # (N-1,) each
    nbytes = int(tb[tgt].sum())
    if nbytes == 0:
        raise ValueError(f"{data.dir}: the val split has no byte-bearing tokens")
    denom = math.log(2) * nbytes

    uni = np.bincount(train, minlength=V).astype(np.float64)  # (V,)
    uni_nats = -np.log((uni[tgt] + 1) / (len(train) + V)).sum()

    # Bigram counts over the pair codes a*V+b: sorted unique codes, looked up by bisection.
    codes, counts = np.unique(train[:-1] * V + train[1:], return_counts=True)
    ctx = np.bincount(train[:-1], minlength=V).astype(np.float64)  # times a is a context
    q = prev * V + tgt
    pos = np.minimum(np.searchsorted(codes, q), len(codes) - 1)
    pair = np.where(codes[pos] == q, counts[pos], 0).astype(np.float64)
    bi_nats = -np.log((pair + 1) / (ctx[prev] + V)).sum()
    return float(uni_nats / denom), float(bi_nats / denom)
