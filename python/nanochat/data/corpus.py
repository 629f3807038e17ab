"""Corpus discovery and preparation: source trees -> tokenizer + sharded token files.

    nanochat data prepare                      # the Python standard library, vocab 4096
    nanochat data prepare --source ~/src/proj --ext .py --ext .md --vocab-size 8192

`collect` walks the sources (sorted, so deterministic), keeps files with the given
extensions, skips binary (NUL byte), undecodable (not UTF-8) and empty files, drops exact
duplicates by content hash, and splits train/val by file: a file goes to val when the sha1
of its path relative to its source root, read as a fraction of 2**64, is below
val_fraction. The split does not depend on where the tree lives on disk or on which other
files exist.

`prepare` trains the tokenizer on the train split only, tokenizes every document with
<|bos|> before it, and writes into out_dir the same layout as parquet/JSONL records:

    train_00000.bin, ...  token shards of at most shard_tokens tokens (uint16 when
    val_00000.bin, ...    vocab_size <= 65536, else uint32), in document order
    tokenizer/            tokenizer.json
    manifest.json         settings, counts, tokenizer hash, the shard list (schema 2); last

Each file is written under a temporary name and renamed, and the old manifest is removed
first (then the old token files, whose count may differ), so an interrupted run never
leaves a manifest describing other files. A second
`prepare` with the same settings and unchanged sources (same relative paths, sizes and
mtimes) returns the existing manifest. The default out_dir is
$NANOCHAT_CACHE/data/<hash of the settings>, where NANOCHAT_CACHE defaults to
$XDG_CACHE_HOME/nanochat, else ~/.cache/nanochat.

Sources that are, or hold, parquet / JSON lines files go to records.py instead (read record
by record in worker processes; docs/data.md). Both write schema 2. Directories of the flat
layout (schema 1: train.bin, val.bin), what source trees were prepared into before, are
still read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nanochat import atomic
from nanochat.data import records
from nanochat.data.records import split_fraction
from nanochat.data.tokenizer import MIN_VOCAB, Tokenizer

SCHEMA_VERSION = 2  # 2: sharded token files listed in "shards" (records.ShardWriter)
FLAT_SCHEMA = 1  # train.bin/val.bin, what source trees were prepared into; still read
READABLE_SCHEMAS = (FLAT_SCHEMA, SCHEMA_VERSION)
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# Directory names never descended into below a source root (a root itself may be one).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git", ".hg",
                           ".svn", ".tox", ".venv", "node_modules"})
ENCODE_CHUNK = 64  # documents per encode_batch call
SHARD_TOKENS = 1 << 28  # default tokens per shard file (512 MiB of uint16)


def default_sources() -> list[str]:
    """The running interpreter's standard library directory. Walking it skips
    site-packages/dist-packages (EXCLUDED_DIRS), so installed packages are not included.
    Its test/ package stays in: it is ordinary, idiomatic Python (about 60% of the ~31 MB
    of CPython 3.11's .py files); its few deliberately mis-encoded files are skipped as
    undecodable like any other."""
    return [sysconfig.get_paths()["stdlib"]]


def cache_dir() -> Path:
    """$NANOCHAT_CACHE, else $XDG_CACHE_HOME/nanochat, else ~/.cache/nanochat."""
    if os.environ.get("NANOCHAT_CACHE"):
        return Path(os.environ["NANOCHAT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nanochat"


# ---- discovery ------------------------------------------------------------------------


@dataclass
class Document:
    source: str  # absolute source root
    rel: str  # path relative to the source root, "/"-separated
    text: str
    nbytes: int


@dataclass
class CorpusFiles:
    """What `collect` found: kept documents per split, and what was skipped."""

    train: list[Document]
    val: list[Document]
    matched: int = 0  # files with a wanted extension
    binary: int = 0
    undecodable: int = 0
    empty: int = 0
    duplicates: int = 0

    def summary(self) -> dict:
        return {
            "matched": self.matched, "binary": self.binary, "undecodable": self.undecodable,
            "empty": self.empty, "duplicates": self.duplicates,
        }


def _normalize_extensions(extensions) -> list[str]:
    exts = [e if e.startswith(".") else "." + e for e in extensions]
    if not exts or any(e == "." for e in exts):
        raise ValueError(f"extensions must be non-empty suffixes such as .py, got {extensions!r}")
    return sorted(set(exts))


def _given_tokenizer(tokenizer, vocab_size: int):
    """(the given tokenizer or None, the vocabulary size prepare builds for), checked."""
    given = Tokenizer.load(tokenizer) if tokenizer is not None else None
    if given is not None:
        vocab_size = given.vocab_size
    if not MIN_VOCAB <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (5 special tokens + 256 bytes) "
                         f"and fit in uint32, got {vocab_size}")
    return given, vocab_size


def _resolve_sources(sources) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out = []
    for s in sources:
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"source {p} does not exist")
        out.append(p.resolve())
    if not out:
        raise ValueError("no sources given")
    return out


def _walk(root: Path, exts: list[str]):
    """(path, rel) of the files under root with a wanted extension, sorted."""
    if root.is_file():
        if root.name.endswith(tuple(exts)):
            yield root, root.name
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(tuple(exts)):
                p = Path(dirpath) / name
                if p.is_file():
                    yield p, p.relative_to(root).as_posix()


def _scan(sources: list[Path], exts: list[str]) -> list[tuple[Path, Path, str]]:
    """(root, path, rel) of every matching file; errors for a source with none."""
    found = []
    for root in sources:
        files = [(root, p, rel) for p, rel in _walk(root, exts)]
        if not files:
            raise ValueError(f"source {root} has no files with extension {', '.join(exts)}")
        found += files
    return found


def collect(sources, extensions=(".py",), val_fraction: float = 0.05,
            progress: bool = False) -> CorpusFiles:
    """Read, filter, deduplicate and split the files under `sources` (see module doc)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    exts = _normalize_extensions(extensions)
    found = _scan(_resolve_sources(sources), exts)
    out = CorpusFiles(train=[], val=[], matched=len(found))
    seen: set[bytes] = set()
    docs: list[tuple[float, Document]] = []
    for root, path, rel in _progress(found, progress, "reading", "files"):
        data = path.read_bytes()
        if not data:
            out.empty += 1
            continue
        if b"\0" in data:
            out.binary += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            out.undecodable += 1
            continue
        digest = hashlib.sha1(data).digest()
        if digest in seen:
            out.duplicates += 1
            continue
        seen.add(digest)
        docs.append((split_fraction(rel), Document(str(root), rel, text, len(data))))
    where = ", ".join(str(s) for s in sources)
    if not docs:
        raise ValueError(f"nothing usable under {where}: {out.matched} file(s) matched "
                         f"{', '.join(exts)} but all were skipped ({out.summary()})")
    if len(docs) == 1:
        raise ValueError(f"only one usable file under {where} ({docs[0][1].rel}): need at "
                         "least 2 files to have both a train and a val split")
    for frac, d in docs:
        (out.val if frac < val_fraction else out.train).append(d)
    # Too few files for the fraction: move the file nearest the boundary (deterministic).
    if not out.val:
        i = min(range(len(docs)), key=lambda k: docs[k][0])
        out.val.append(docs[i][1])
        out.train.remove(docs[i][1])
    elif not out.train:
        i = max(range(len(docs)), key=lambda k: docs[k][0])
        out.train.append(docs[i][1])
        out.val.remove(docs[i][1])
    return out


# ---- manifest -------------------------------------------------------------------------


@dataclass
class SplitStats:
    files: int = 0
    bytes: int = 0
    tokens: int = 0
    records: int = 0  # records of parquet/JSONL sources (0 for a source tree)


@dataclass
class Manifest:
    """manifest.json of a prepared data directory."""

    schema: int
    sources: list[str]
    extensions: list[str]
    vocab_size: int
    val_fraction: float
    dtype: str
    train: SplitStats
    val: SplitStats
    skipped: dict  # binary, undecodable, empty
    duplicates: int
    matched: int
    tokenizer_sha256: str
    settings_hash: str
    fingerprint: str  # of the source files' relative paths, sizes and mtimes
    created: str
    prepare_s: float = 0.0
    # schema 2: split -> [{"file": "train_00000.bin", "tokens": n}, ...]
    shards: dict | None = None
    text_field: str | None = None  # records (parquet/JSONL) only
    bad_records: dict | None = None  # per kind, "total" and "first" (file:line: reason)
    out_dir: str = field(default="", compare=False)  # where it lives; not serialized

    def split(self, name: str) -> SplitStats:
        if name not in SPLITS:
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("out_dir")
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)} - {"out_dir"}
        optional = {"prepare_s", "shards", "text_field", "bad_records"}
        missing = sorted(n for n in names if n not in d and n not in optional)
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        kw = {k: d[k] for k in names if k in d}
        try:
            kw["train"], kw["val"] = SplitStats(**d["train"]), SplitStats(**d["val"])
        except TypeError as e:
            raise ValueError(f"{where}: bad split stats: {e}") from None
        m = cls(**kw)
        if m.schema >= 2:
            m.check_shards(where)
        return m

    def check_shards(self, where: str) -> None:
        """Schema 2: a non-empty shard list per split whose token counts sum to the split's."""
        if not isinstance(self.shards, dict):
            raise ValueError(f"{where}: schema {self.schema} needs a 'shards' object")
        for name in SPLITS:
            lst = self.shards.get(name)
            ok = isinstance(lst, list) and lst and all(
                isinstance(s, dict) and isinstance(s.get("file"), str)
                and s["file"] == Path(s["file"]).name and s["file"].endswith(".bin")
                and isinstance(s.get("tokens"), int) and s["tokens"] > 0 for s in lst)
            if not ok:
                raise ValueError(f"{where}: shards.{name} must be a non-empty list of "
                                 '{"file": "NAME.bin", "tokens": N > 0}')
            if sum(s["tokens"] for s in lst) != self.split(name).tokens:
                raise ValueError(f"{where}: shards.{name} hold "
                                 f"{sum(s['tokens'] for s in lst)} tokens, {name}.tokens "
                                 f"says {self.split(name).tokens}")

    def files_of(self, name: str) -> list[tuple[str, int]]:
        """(file name, tokens) of the split's token files, in order."""
        if self.shards is None:
            return [(f"{name}.bin", self.split(name).tokens)]
        return [(s["file"], s["tokens"]) for s in self.shards[name]]

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest":
        f = Path(out_dir) / MANIFEST
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist (run `nanochat data prepare`)")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{f}: expected a JSON object")
        if d.get("schema") not in READABLE_SCHEMAS:
            raise ValueError(f"{f}: schema {d.get('schema')!r}, this version reads "
                             f"{' and '.join(map(str, READABLE_SCHEMAS))} (prepare the data "
                             "again)")
        m = cls.from_dict(d, str(f))
        m.out_dir = str(Path(out_dir))
        return m


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _settings(sources: list[Path], exts: list[str], vocab_size: int,
              val_fraction: float, shard_tokens: int = SHARD_TOKENS) -> dict:
    return {"schema": SCHEMA_VERSION, "sources": [str(s) for s in sources], "extensions": exts,
            "vocab_size": vocab_size, "val_fraction": val_fraction,
            "shard_tokens": shard_tokens}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _fingerprint(found: list[tuple[Path, Path, str]]) -> str:
    h = hashlib.sha256()
    for root, path, rel in found:
        st = path.stat()
        h.update(f"{root}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_out_dir(sources, vocab_size: int, val_fraction: float,
                    extensions=(".py",), shard_tokens: int = SHARD_TOKENS) -> Path:
    """cache_dir()/data/<first 12 hex of the settings hash>."""
    s = _settings(_resolve_sources(sources), _normalize_extensions(extensions), vocab_size,
                  val_fraction, shard_tokens)
    return cache_dir() / "data" / _hash(s)[:12]


# ---- preparation ----------------------------------------------------------------------


def _progress(it, enabled: bool, desc: str, unit: str, total=None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit=unit, total=total, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def _cached(out_dir: Path, settings_hash: str, fingerprint: str) -> Manifest | None:
    try:
        m = Manifest.load(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    if m.settings_hash != settings_hash or m.fingerprint != fingerprint:
        return None
    item = token_dtype(m.vocab_size).itemsize
    for name in SPLITS:
        for fname, ntok in m.files_of(name):
            f = out_dir / fname
            if not f.is_file() or f.stat().st_size != ntok * item:
                return None
    try:
        if Tokenizer.load(out_dir / "tokenizer").sha256() != m.tokenizer_sha256:
            return None
    except (FileNotFoundError, ValueError):
        return None
    return m


def _write_tokens(docs: list[Document], tok: Tokenizer, writer: records.ShardWriter,
                  progress: bool, desc: str) -> list[dict]:
    """Tokenize docs (BOS before each) into writer's shards; returns the manifest's shard
    list. On an error the shard being written is removed (no temp file is left)."""
    bar = _progress(None, progress, desc, "B", total=sum(d.nbytes for d in docs))
    try:
        for i in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[i:i + ENCODE_CHUNK]
            ids = tok.encode_batch([d.text for d in chunk])
            writer.write(np.concatenate([np.array([tok.bos_id, *x], dtype=writer.dtype)
                                         for x in ids]))
            if progress:
                bar.update(sum(d.nbytes for d in chunk))
        return writer.close()
    except BaseException as e:
        writer.abort(e)
        raise
    finally:
        if progress:
            bar.close()


def prepare(sources=None, out_dir: str | Path | None = None, vocab_size: int = 4096,
            val_fraction: float = 0.05, extensions=(".py",), progress: bool = True,
            tokenizer: str | Path | None = None, record_options: dict | None = None
            ) -> Manifest:
    """Collect, train the tokenizer on train, tokenize both splits; cached (module doc).
    `tokenizer`: a tokenizer directory to use as it is instead of training one (e.g. an
    imported model's, RUN/checkpoints/step_000000/tokenizer); vocab_size is then its size.
    Sources that are (or hold) parquet/JSONL files go to prepare_records, with
    record_options (text_field, workers, shard_tokens, tokenizer_sample_bytes); a source
    tree takes shard_tokens of those."""
    t0 = time.perf_counter()
    if sources:
        roots = _resolve_sources(sources)
        kinds = {r: bool(records.record_files(r, EXCLUDED_DIRS)) for r in roots}
        if all(kinds.values()):
            return prepare_records(roots, out_dir, vocab_size, val_fraction,
                                           progress=progress, tokenizer=tokenizer,
                                           **(record_options or {}))
        if any(kinds.values()):
            raise ValueError("sources mix record files (parquet/JSONL) with source trees: "
                             f"records in {', '.join(str(r) for r in roots if kinds[r])}; "
                             f"trees in {', '.join(str(r) for r in roots if not kinds[r])}; "
                             "prepare them separately")
    tree_options = dict(record_options or {})
    shard_tokens = tree_options.pop("shard_tokens", SHARD_TOKENS)
    if tree_options:  # a source tree: these options would be silently ignored
        raise ValueError(f"{', '.join(tree_options)}: only for parquet/JSONL sources")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    given, vocab_size = _given_tokenizer(tokenizer, vocab_size)
    roots = _resolve_sources(sources or default_sources())
    exts = _normalize_extensions(extensions)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    settings = _settings(roots, exts, vocab_size, val_fraction, shard_tokens)
    if given is not None:  # the cache key names the tokenizer used
        settings["tokenizer_sha256"] = given.sha256()
    settings_hash = _hash(settings)
    out = Path(out_dir).expanduser() if out_dir else cache_dir() / "data" / settings_hash[:12]
    fingerprint = _fingerprint(_scan(roots, exts))
    cached = _cached(out, settings_hash, fingerprint)
    if cached is not None:
        print(f"using cached data in {out}", file=sys.stderr)
        return cached

    files = collect(roots, exts, val_fraction, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for old in list(out.glob("train*.bin")) + list(out.glob("val*.bin")):
        old.unlink()  # the previous run's token files: flat, or shards of another count
    if progress:
        n = sum(d.nbytes for d in files.train)
        print(f"training tokenizer (vocab {vocab_size}) on {len(files.train)} files, "
              f"{n / 1e6:.1f} MB", file=sys.stderr)
    tok = given or Tokenizer.train((d.text for d in files.train), vocab_size)
    tmp_tok = out / "tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    tok.save(tmp_tok)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tmp_tok, out / "tokenizer")

    dtype = token_dtype(vocab_size)
    stats, shards = {}, {}
    for name in SPLITS:
        docs = getattr(files, name)
        shards[name] = _write_tokens(docs, tok,
                                     records.ShardWriter(out, name, shard_tokens, dtype),
                                     progress, f"tokenizing {name}")
        stats[name] = SplitStats(len(docs), sum(d.nbytes for d in docs),
                                 sum(sh["tokens"] for sh in shards[name]))

    m = Manifest(
        schema=SCHEMA_VERSION, sources=settings["sources"], extensions=exts,
        vocab_size=vocab_size, val_fraction=val_fraction, dtype=dtype.name,
        train=stats["train"], val=stats["val"],
        skipped={"binary": files.binary, "undecodable": files.undecodable,
                 "empty": files.empty},
        duplicates=files.duplicates, matched=files.matched, tokenizer_sha256=tok.sha256(),
        settings_hash=settings_hash, fingerprint=fingerprint,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        prepare_s=round(time.perf_counter() - t0, 2), shards=shards, out_dir=str(out),
    )
    atomic.write_text(out / MANIFEST, json.dumps(m.to_dict(), indent=2) + "\n")
    return m


# ---- records: parquet / JSONL (readers, workers, shard writer in records.py) ------


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _sample(files, text_field: str, val_fraction: float, limit: int) -> Iterator[str]:
    """The train texts in file order, until `limit` UTF-8 bytes (the tokenizer's sample)."""
    n = 0
    for rel, i, text in records.iter_texts(files, text_field):
        if split_fraction(f"{rel}:{i}") < val_fraction:
            continue
        yield text
        n += len(text.encode("utf-8"))
        if n >= limit:
            return


def prepare_records(roots: list[Path], out_dir=None, vocab_size: int = 4096,
                    val_fraction: float = 0.05, progress: bool = True, tokenizer=None,
                    text_field: str = "text", workers: int | None = None,
                    shard_tokens: int = SHARD_TOKENS, tokenizer_sample_bytes: int = 100_000_000):
    """Prepare parquet/JSONL sources into out_dir (module doc); cached like prepare."""
    t0 = time.perf_counter()
    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if tokenizer_sample_bytes < 1:
        raise ValueError(f"tokenizer_sample_bytes must be >= 1, got {tokenizer_sample_bytes}")
    if not text_field:
        raise ValueError("text_field must be a non-empty name")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    given, vocab_size = _given_tokenizer(tokenizer, vocab_size)
    files = [(p, rel) for r in roots for p, rel in records.record_files(r, EXCLUDED_DIRS)]
    suffixes = sorted({next(s for s in sorted(records.RECORD_SUFFIXES, key=len, reverse=True)
                            if str(p).endswith(s)) for p, _ in files})
    settings = {"schema": SCHEMA_VERSION, "sources": [str(r) for r in roots],
                "vocab_size": vocab_size, "val_fraction": val_fraction,
                "text_field": text_field, "shard_tokens": shard_tokens,
                "tokenizer_sample_bytes": tokenizer_sample_bytes}
    if given is not None:
        settings["tokenizer_sha256"] = given.sha256()
    settings_hash = _hash(settings)
    out = (Path(out_dir).expanduser() if out_dir
           else cache_dir() / "data" / settings_hash[:12])
    fingerprint = _fingerprint([(r, p, rel) for r in roots
                                       for p, rel in records.record_files(r, EXCLUDED_DIRS)])
    cached = _cached(out, settings_hash, fingerprint)
    if cached is not None:
        print(f"using cached data in {out}", file=sys.stderr)
        return cached

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for old in list(out.glob("train*.bin")) + list(out.glob("val*.bin")):
        old.unlink()  # the previous run's shards (their count may differ)
    if given is None:
        if progress:
            print(f"training tokenizer (vocab {vocab_size}) on up to "
                  f"{tokenizer_sample_bytes / 1e6:.0f} MB of train text", file=sys.stderr)
        tok = Tokenizer.train(_sample(files, text_field, val_fraction, tokenizer_sample_bytes),
                              vocab_size)
    else:
        tok = given
    tmp_tok = out / "tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    tok.save(tmp_tok)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tmp_tok, out / "tokenizer")

    dtype = token_dtype(vocab_size)
    writers = {s: records.ShardWriter(out, s, shard_tokens, dtype) for s in SPLITS}
    stats = {s: SplitStats() for s in SPLITS}
    split_files = {s: set() for s in SPLITS}
    counts = dict.fromkeys(records.BAD_KINDS, 0)
    first, empty = [], 0
    total = sum(p.stat().st_size for p, _ in files)
    bar = _progress(None, progress, "tokenizing", "B", total=total)
    args = (text_field, val_fraction, str(out / "tokenizer"), tok.sha256())
    try:
        for c, r in records.tokenized(records.chunks(files, text_field), workers, args):
            for s in SPLITS:
                writers[s].write(r.tokens[s])
                stats[s].tokens += len(r.tokens[s])
                stats[s].records += r.records[s]
                stats[s].bytes += r.bytes[s]
                if r.records[s]:
                    split_files[s].add(c.rel)
            empty += r.empty
            for rel, i, kind in r.bad:
                counts[kind] += 1
                if len(first) < records.MAX_REPORTED:
                    where = f"{rel}:{i + 1}" if c.jsonl else f"{rel}:row {i}"
                    first.append(f"{where}: {kind.replace('_', ' ')}"
                                 + (f" {text_field!r}" if kind in ("missing_field",
                                                                   "wrong_type") else ""))
            if progress:
                bar.update(c.nbytes)
        shards = {s: writers[s].close() for s in SPLITS}
    except BaseException as e:
        for w in writers.values():
            w.abort(e)
        raise
    finally:
        if progress:
            bar.close()
    nbad = sum(counts.values())
    for s in SPLITS:
        stats[s].files = len(split_files[s])
        if not stats[s].records:
            where = ", ".join(str(r) for r in roots)
            raise ValueError(f"{where}: no {s} records ({stats['train'].records} train, "
                             f"{stats['val'].records} val, {nbad} bad, {empty} empty; "
                             f"val_fraction {val_fraction})")
    if nbad and progress:
        print(f"{nbad} bad record(s) skipped: " + "; ".join(first[:5]), file=sys.stderr)
    m = Manifest(
        schema=SCHEMA_VERSION, sources=settings["sources"], extensions=suffixes,
        vocab_size=vocab_size, val_fraction=val_fraction, dtype=dtype.name,
        train=stats["train"], val=stats["val"],
        skipped={"binary": 0, "undecodable": counts["undecodable"], "empty": empty},
        duplicates=0, matched=len(files), tokenizer_sha256=tok.sha256(),
        settings_hash=settings_hash, fingerprint=fingerprint,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        prepare_s=round(time.perf_counter() - t0, 2), shards=shards, text_field=text_field,
        bad_records={**counts, "total": nbad, "first": first}, out_dir=str(out))
    atomic.write_text(out / MANIFEST, json.dumps(m.to_dict(), indent=2) + "\n")
    return m


def summary_lines(m: Manifest) -> list[str]:
    """Human-readable summary of a manifest (what `nanochat data prepare` prints)."""
    sk = m.skipped
    if m.text_field is not None:  # parquet / JSONL records (records.py)
        b = m.bad_records or {}
        bad = ", ".join(f"{b.get(k, 0)} {k.replace('_', ' ')}" for k in
                        ("invalid_json", "not_object", "missing_field", "wrong_type",
                         "undecodable"))
        lines = [
            f"data dir     : {m.out_dir}",
            f"sources      : {', '.join(m.sources)}  ({m.matched} files: "
            f"{', '.join(m.extensions)}; text field {m.text_field!r})",
            f"records      : train {m.train.records:,}, val {m.val.records:,}; "
            f"{sk['empty']} empty",
            f"bad records  : {b.get('total', 0)} ({bad})",
            *(f"               {x}" for x in b.get("first", [])[:5]),
            f"bytes        : train {m.train.bytes:,}, val {m.val.bytes:,}",
            f"tokens       : train {m.train.tokens:,} in {len(m.shards['train'])} shard(s), "
            f"val {m.val.tokens:,} in {len(m.shards['val'])}  ({m.dtype}, "
            f"{m.train.bytes / max(m.train.tokens, 1):.2f} bytes/token on train)",
            f"tokenizer    : vocab {m.vocab_size}, sha256 {m.tokenizer_sha256[:16]}",
            f"prepared in  : {m.prepare_s:.1f} s  ({m.created})",
        ]
        return lines
    def shards(split: str) -> str:  # a flat schema-1 directory has none
        return f" in {len(m.shards[split])} shard(s)" if m.shards is not None else ""

    return [
        f"data dir     : {m.out_dir}",
        f"sources      : {', '.join(m.sources)}  ({', '.join(m.extensions)})",
        f"files        : {m.matched} matched; train {m.train.files}, val {m.val.files}",
        f"skipped      : {sk['binary']} binary, {sk['undecodable']} undecodable, "
        f"{sk['empty']} empty; {m.duplicates} duplicates dropped",
        f"bytes        : train {m.train.bytes:,}, val {m.val.bytes:,}",
        f"tokens       : train {m.train.tokens:,}{shards('train')}, val {m.val.tokens:,}"
        f"{shards('val')}  ({m.dtype}, "
        f"{m.train.bytes / max(m.train.tokens, 1):.2f} bytes/token on train)",
        f"tokenizer    : vocab {m.vocab_size}, sha256 {m.tokenizer_sha256[:16]}",
        f"prepared in  : {m.prepare_s:.1f} s  ({m.created})",
    ]
