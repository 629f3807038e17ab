"""Datasets people ship: parquet shards and JSON lines -> tokenizer + sharded token files.

    nanochat data prepare --source fineweb/ --vocab-size 32768          # *.parquet, `text`
    nanochat data prepare --source dump.jsonl.zst --text-field content --workers 8

A source that is, or is a directory holding, files named *.parquet, *.jsonl, *.jsonl.gz or
*.jsonl.zst (also .ndjson) is read record by record: parquet by row group in batches of
rows (pyarrow), JSON lines one line at a time (gzip from the standard library, zstd through
the `zstandard` package). Nothing holds more than a bounded window of the corpus:

1. the tokenizer trains on the first `tokenizer_sample_bytes` of train text, in file order;
2. the main process reads records into chunks of about CHUNK_BYTES and hands them to
   `workers` spawned processes (at most 2 per worker in flight); each decodes, parses,
   checks and tokenizes its chunk (<|bos|> before every record) and returns the token ids;
3. the main process writes the results in chunk order into `train_00000.bin`, ... of at
   most `shard_tokens` tokens (same for val), so the bytes do not depend on `workers`.

A record goes to val when split_fraction("<relative path>:<record index>") < val_fraction
(the index counts lines of a JSONL file from 0, rows of a parquet file from 0), so the split
is a function of the record alone. Bad records (a JSON line that is not valid JSON or not an
object, a missing or null text field, a value that is not a string, bytes that are not UTF-8)
are counted by kind, and the first MAX_REPORTED are listed as "file:line: reason" (parquet:
"file:row N") in the manifest's `bad_records`; empty texts are counted as `empty`. A file
that cannot be read at all (no such column, a truncated gzip, a missing optional package) is
an error naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from nanochat import atomic

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst")
RECORD_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES
CHUNK_BYTES = 1 << 20  # raw bytes of records per task handed to a worker
CHUNK_RECORDS = 4096  # and at most this many records
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow batch (a row group is read a batch at a time)
MAX_REPORTED = 20  # bad records listed by file:line in the manifest
BAD_KINDS = ("invalid_json", "not_object", "missing_field", "wrong_type", "undecodable")


def split_fraction(rel: str) -> float:
    """The file's position in [0, 1) for the train/val split: sha1 of its relative path."""
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big") / 2**64


def is_record_file(path: str | Path) -> bool:
    return str(path).endswith(RECORD_SUFFIXES)


def record_files(root: Path, excluded: frozenset) -> list[tuple[Path, str]]:
    """(path, rel) of the record files at or under root, sorted; rel is "/"-separated."""
    if root.is_file():
        return [(root, root.name)] if is_record_file(root) else []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_record_file(name) and p.is_file():
                out.append((p, p.relative_to(root).as_posix()))
    return out


# ---- reading --------------------------------------------------------------------------


def _zstd_lines(path: Path) -> Iterator[bytes]:
    """The lines of a .zst file (one or more frames). zstandard's stream reader ends quietly
    at a truncated frame, so this feeds a decompressor block by block and checks that the
    last frame ended."""
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{path}: reading .zst needs the zstandard package "
                         "(pip install zstandard)") from None
    dctx = zstandard.ZstdDecompressor()
    dobj, pending, started = dctx.decompressobj(), b"", False
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            while block:
                if dobj.eof:  # the previous frame ended: the rest is the next frame
                    dobj = dctx.decompressobj()
                data = dobj.decompress(block)
                started = True
                block = dobj.unused_data if dobj.eof else b""
                *lines, pending = (pending + data).split(b"\n")
                yield from (x + b"\n" for x in lines)
    if started and not dobj.eof:
        raise EOFError("zstd stream ends inside a frame (truncated file)")
    if pending:
        yield pending


def _jsonl_lines(path: Path) -> Iterator[bytes]:
    name = str(path)
    if name.endswith(".zst"):
        yield from _zstd_lines(path)
        return
    with gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb") as f:
        yield from f


def _jsonl_items(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line index from 0, raw line) of every non-blank line."""
    lineno = 0
    try:
        for lineno, line in enumerate(_jsonl_lines(path)):  # noqa: B007 (read in the except)
            if line.strip():
                yield lineno, line
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: unreadable after line {lineno + 1}: {e}") from None
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__module__.startswith("zstandard"):
            raise ValueError(f"{path}: unreadable after line {lineno + 1}: {e}") from None
        raise


def _parquet_items(path: Path, text_field: str) -> Iterator[tuple[int, object]]:
    """(row index from 0, value) of the text column, a batch of rows at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs the pyarrow package "
                         "(pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file: {e}") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: "
                         f"{', '.join(schema.names)}); choose one with --text-field")
    t = schema.field(text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        raise ValueError(f"{path}: column {text_field!r} has type {t}, not a string")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for v in batch.column(0).to_pylist():
                yield row, v
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: unreadable at row {row}: {e}") from None


def _items(path: Path, text_field: str) -> Iterator[tuple[int, object]]:
    if str(path).endswith(PARQUET_SUFFIXES):
        return _parquet_items(path, text_field)
    return _jsonl_items(path)


def _item_size(v) -> int:
    return len(v) if isinstance(v, (bytes, str)) else 0


def extract(v, text_field: str, is_jsonl: bool) -> tuple[str | None, str | None]:
    """(text, None) or (None, bad kind) for one raw item (a JSONL line or a parquet value)."""
    if is_jsonl:
        try:
            s = v.decode("utf-8")
        except UnicodeDecodeError:
            return None, "undecodable"
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            return None, "invalid_json"
        if not isinstance(obj, dict):
            return None, "not_object"
        v = obj.get(text_field)
    if v is None:
        return None, "missing_field"
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "undecodable"
    if not isinstance(v, str):
        return None, "wrong_type"
    return v, None


def iter_texts(files: list[tuple[Path, str]], text_field: str) -> Iterator[tuple[str, int, str]]:
    """(rel, index, text) of every good record, in file order (bad ones skipped)."""
    for path, rel in files:
        jsonl = not str(path).endswith(PARQUET_SUFFIXES)
        for i, v in _items(path, text_field):
            text, _ = extract(v, text_field, jsonl)
            if text:
                yield rel, i, text


# ---- tokenizing in worker processes ---------------------------------------------------


@dataclass
class Chunk:
    """Consecutive raw records of one file: what one worker task tokenizes."""

    rel: str
    jsonl: bool
    first: list = field(default_factory=list)  # record indices
    items: list = field(default_factory=list)
    nbytes: int = 0


@dataclass
class ChunkResult:
    tokens: dict  # split -> uint32 ndarray (bos + ids per record)
    records: dict  # split -> good records
    bytes: dict  # split -> UTF-8 bytes of their texts
    empty: int
    bad: list  # (rel, index, kind)


@lru_cache(maxsize=2)
def _tokenizer(path: str, sha256: str):
    """The tokenizer a worker encodes with, loaded once per process (keyed by its hash)."""
    from nanochat.data.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    if tok.sha256() != sha256:
        raise ValueError(f"{path}: tokenizer changed while preparing")
    return tok


def _worker_init() -> None:
    # One thread per worker process: `workers` sets the parallelism, not HF's rayon pool.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def tokenize_chunk(chunk: Chunk, text_field: str, val_fraction: float, tok_dir: str,
                   tok_sha: str) -> ChunkResult:
    tok = _tokenizer(tok_dir, tok_sha)
    texts = {"train": [], "val": []}
    nbytes = {"train": 0, "val": 0}
    bad, empty = [], 0
    for i, v in zip(chunk.first, chunk.items):
        text, kind = extract(v, text_field, chunk.jsonl)
        if kind is not None:
            bad.append((chunk.rel, i, kind))
            continue
        if not text:
            empty += 1
            continue
        split = "val" if split_fraction(f"{chunk.rel}:{i}") < val_fraction else "train"
        texts[split].append(text)
        nbytes[split] += len(text.encode("utf-8"))
    tokens = {}
    for split, ts in texts.items():
        flat: list[int] = []
        for x in tok.encode_batch(ts) if ts else []:
            flat.append(tok.bos_id)
            flat += x
        tokens[split] = np.array(flat, dtype=np.uint32)  # one conversion per chunk
    return ChunkResult(tokens, {k: len(v) for k, v in texts.items()}, nbytes, empty, bad)


def chunks(files: list[tuple[Path, str]], text_field: str) -> Iterator[Chunk]:
    """The raw records of files, in order, cut into chunks that never span two files."""
    for path, rel in files:
        jsonl = not str(path).endswith(PARQUET_SUFFIXES)
        c = Chunk(rel, jsonl)
        for i, v in _items(path, text_field):
            c.first.append(i)
            c.items.append(v)
            c.nbytes += _item_size(v)
            if c.nbytes >= CHUNK_BYTES or len(c.items) >= CHUNK_RECORDS:
                yield c
                c = Chunk(rel, jsonl)
        if c.items:
            yield c


def tokenized(chunk_iter: Iterator[Chunk], workers: int, args: tuple) -> Iterator[
        tuple[Chunk, ChunkResult]]:
    """(chunk, result) in chunk order, tokenized by `workers` spawned processes with at
    most 2 * workers chunks in flight (so memory does not grow with the corpus). A worker
    that dies (killed, out of memory) raises BrokenProcessPool here instead of a hang."""
    ctx = mp.get_context("spawn")  # no fork of a parent that already runs HF/torch threads
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        pending: deque = deque()
        try:
            for c in chunk_iter:
                pending.append((c, pool.submit(tokenize_chunk, c, *args)))
                if len(pending) >= 2 * workers:
                    c0, r = pending.popleft()
                    yield c0, r.result()
            while pending:
                c0, r = pending.popleft()
                yield c0, r.result()
        finally:
            for _, r in pending:  # on an error: drop the queued work, do not wait for it
                r.cancel()


# ---- sharded output -------------------------------------------------------------------


class ShardWriter:
    """Appends tokens to {split}_00000.bin, ... of at most shard_tokens tokens each; a shard
    is written under a temporary name and renamed when full (or at close)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out, self.split, self.cap, self.dtype = out, split, shard_tokens, dtype
        self.shards: list[dict] = []  # {"file", "tokens"}, the manifest's list
        self._ctx = None
        self._f = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._ctx = atomic.open_atomic(self.out / name)
        self._f = self._ctx.__enter__()
        self._name, self._n = name, 0

    def _finish(self) -> None:
        self._ctx.__exit__(None, None, None)
        self.shards.append({"file": self._name, "tokens": self._n})
        self._ctx = self._f = None

    def write(self, arr: np.ndarray) -> None:
        arr = arr.astype(self.dtype, copy=False)
        while len(arr):
            if self._f is None:
                self._open()
            take = min(len(arr), self.cap - self._n)
            arr[:take].tofile(self._f)
            self._n += take
            arr = arr[take:]
            if self._n == self.cap:
                self._finish()

    def close(self) -> list[dict]:
        if self._f is not None:
            self._finish()
        return self.shards

    def abort(self, exc: BaseException) -> None:
        if self._ctx is not None:  # removes the temp file
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            self._ctx = self._f = None
