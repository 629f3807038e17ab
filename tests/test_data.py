"""Corpus collection, `prepare` (manifest counts, split, cache, atomic outputs, errors),
TokenData validation, the n-gram baselines and `nanochat data prepare`.

Small generated corpora under tmp_path with tiny vocabularies keep these fast; the one
test on the real standard library is marked slow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from nanochat.data import corpus
from nanochat.data.corpus import Manifest, collect, prepare, split_fraction
from nanochat.data.dataset import TokenData, unigram_bigram_bpb
from nanochat.data.tokenizer import Tokenizer

VOCAB = 320
VAL_FRACTION = 0.3


def py_source(i: int) -> str:
    return (f'"""Module {i}."""\n\nimport os\n\n\ndef func_{i}(x, y={i}):\n'
            f'    """Add things."""\n    total = x + y * {i}\n'
            f'    for k in range({i % 7 + 2}):\n        total += k  # loop {i}\n'
            f'    return total\n\n\nclass Thing{i}:\n    value = "{"ab" * (i % 5)}"\n')


def make_corpus(root: Path) -> dict:
    """A tree with 12 good .py files, 1 .txt, and one of each thing that must be skipped."""
    root.mkdir(parents=True)
    good = {}
    for i in range(12):
        rel = ["", "pkg/", "pkg/sub/"][i % 3] + f"mod{i}.py"
        good[rel] = py_source(i)
    for rel, text in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "notes.txt").write_text("plain notes 你好\n" * 5, encoding="utf-8")
    (root / "pkg" / "__init__.py").write_text("")  # empty
    (root / "blob.py").write_bytes(b"x = 1\n\x00\x01\x02")  # binary
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    (root / "pkg" / "sub" / "copy.py").write_text(good["mod0.py"], encoding="utf-8")  # dup
    for d in ("site-packages", "__pycache__", ".git"):  # never descended into
        (root / "pkg" / d).mkdir()
        (root / "pkg" / d / "hidden.py").write_text(f"# {d}\n")
    return good


@pytest.fixture
def src(tmp_path) -> Path:
    make_corpus(tmp_path / "src")
    return tmp_path / "src"


@pytest.fixture
def prepared(src, tmp_path) -> Manifest:
    return prepare([src], tmp_path / "out", VOCAB, VAL_FRACTION, [".py"], progress=False)


# ---- collect ---------------------------------------------------------------------------


def test_collect_counts_and_exclusions(src):
    files = collect([src], [".py"], VAL_FRACTION)
    assert files.summary() == {"matched": 16, "binary": 1, "undecodable": 1, "empty": 1,
                               "duplicates": 1}
    rels = sorted(d.rel for d in files.train + files.val)
    assert len(rels) == 12  # the 12 good files; copy.py duplicates mod0.py
    assert not any("site-packages" in r or "__pycache__" in r or ".git" in r for r in rels)
    assert "mod0.py" in rels and "pkg/sub/copy.py" not in rels  # the first in walk order stays
    files2 = collect([src], ["py", ".txt"], VAL_FRACTION)
    assert files2.matched == 17 and "notes.txt" in {d.rel for d in files2.train + files2.val}


def test_split_is_by_relative_path_hash_and_location_independent(src, tmp_path):
    a = collect([src], [".py"], VAL_FRACTION)
    moved = tmp_path / "elsewhere" / "deeper" / "copy_of_src"
    shutil.copytree(src, moved)
    b = collect([moved], [".py"], VAL_FRACTION)
    assert [d.rel for d in a.val] == [d.rel for d in b.val] and a.val
    assert [d.rel for d in a.train] == [d.rel for d in b.train] and a.train
    for d in a.val:
        assert split_fraction(d.rel) < VAL_FRACTION
    for d in a.train:
        assert split_fraction(d.rel) >= VAL_FRACTION
    # A file's split does not depend on other files: drop half, the rest keep their side.
    for p in sorted(moved.rglob("mod*.py"))[::2]:
        p.unlink()
    c = collect([moved], [".py"], VAL_FRACTION)
    val_a = {d.rel for d in a.val}
    assert all(d.rel in val_a for d in c.val)
    assert not any(d.rel in val_a for d in c.train)


def test_val_fallback_with_two_files_and_error_with_one(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.py").write_text("a = 1\n")
    (two / "b.py").write_text("b = 2\n")
    files = collect([two], [".py"], 0.001)  # fraction too small for either file
    assert len(files.val) == 1 and len(files.train) == 1
    files = collect([two], [".py"], 0.999)  # or too large: train keeps one
    assert len(files.val) == 1 and len(files.train) == 1
    (two / "b.py").unlink()
    with pytest.raises(ValueError, match=r"only one usable file.*a\.py.*at least 2"):
        collect([two], [".py"], 0.1)


# ---- prepare ---------------------------------------------------------------------------


def test_prepare_manifest_and_files(prepared, src, tmp_path):
    out = tmp_path / "out"
    m = Manifest.load(out)
    assert m == prepared and m.out_dir == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "tokenizer", "train_00000.bin", "val_00000.bin"]  # no temp files left
    assert m.schema == corpus.SCHEMA_VERSION and m.text_field is None
    assert m.shards == {s: [{"file": f"{s}_00000.bin", "tokens": m.split(s).tokens}]
                        for s in ("train", "val")}
    assert m.sources == [str(src.resolve())] and m.extensions == [".py"]
    assert m.vocab_size == VOCAB and m.dtype == "uint16"
    assert m.skipped == {"binary": 1, "undecodable": 1, "empty": 1} and m.duplicates == 1
    assert m.matched == 16 and m.train.files + m.val.files == 12
    assert m.val.files >= 1 and m.train.files >= 1
    files = collect([src], [".py"], VAL_FRACTION)
    for name in ("train", "val"):
        docs = getattr(files, name)
        st = m.split(name)
        assert st.files == len(docs) and st.bytes == sum(len(d.text.encode()) for d in docs)
        assert (out / f"{name}_00000.bin").stat().st_size == 2 * st.tokens
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.sha256() == m.tokenizer_sha256 and tok.vocab_size == VOCAB
    json.loads((out / "manifest.json").read_text())  # plain JSON


def test_token_files_hold_bos_then_each_document(prepared, src, tmp_path):
    data = TokenData(tmp_path / "out")
    files = collect([src], [".py"], VAL_FRACTION)
    for name in ("train", "val"):
        arr = np.asarray(getattr(data, name))
        assert arr.dtype == np.uint16 and arr[0] == data.tokenizer.bos_id
        bos = np.flatnonzero(arr == data.tokenizer.bos_id)
        docs = np.split(arr, bos[1:])
        assert [data.tokenizer.decode(d[1:]) for d in docs] == [d.text for d in
                                                                 getattr(files, name)]
        # bits-per-byte denominator: token_bytes over the tokens == the UTF-8 bytes
        assert int(data.token_bytes[arr].sum()) == prepared.split(name).bytes


def test_source_tree_shards_hold_the_same_tokens(prepared, src, tmp_path):
    """Small shards: the same token stream as one shard and as encoding each document with
    <|bos|> before it; every shard full but the last; the shard count in the summary."""
    one = TokenData(tmp_path / "out")
    tok = one.tokenizer
    files = collect([src], [".py"], VAL_FRACTION)
    m = prepare([src], tmp_path / "small", VOCAB, VAL_FRACTION, [".py"], progress=False,
                record_options={"shard_tokens": 100})
    assert m.settings_hash != prepared.settings_hash  # shard_tokens is a setting
    assert m.tokenizer_sha256 == prepared.tokenizer_sha256
    many = TokenData(tmp_path / "small")
    for name in ("train", "val"):
        direct = np.concatenate([np.array([tok.bos_id, *ids], dtype=np.uint16) for ids in
                                 tok.encode_batch([d.text for d in getattr(files, name)])])
        assert np.array_equal(np.asarray(getattr(one, name)), direct)
        assert np.array_equal(np.asarray(getattr(many, name)), direct)
        sizes = [n for _, n in m.files_of(name)]
        assert len(sizes) == -(-len(direct) // 100) and set(sizes[:-1]) <= {100}
        assert [f for f, _ in m.files_of(name)] == [f"{name}_{i:05d}.bin"
                                                    for i in range(len(sizes))]
    assert f"in {len(m.shards['train'])} shard(s)" in "\n".join(corpus.summary_lines(m))
    # prepared again with one shard: the old shards go, the manifest lists what is there
    again = prepare([src], tmp_path / "small", VOCAB, VAL_FRACTION, [".py"], progress=False)
    assert sorted(p.name for p in (tmp_path / "small").glob("*.bin")) == [
        "train_00000.bin", "val_00000.bin"] and again.shards == prepared.shards


def test_source_tree_shards_split_into_disjoint_rank_slices(src, tmp_path):
    """Each of 2 ranks reads its own contiguous slice of the sharded stream: disjoint,
    together the whole of it, crossing shard boundaries like the flat array."""
    from nanochat.data.dataset import ShardedTokens
    from nanochat.train.distributed import Group

    m = prepare([src], tmp_path / "o", VOCAB, VAL_FRACTION, [".py"], progress=False,
                record_options={"shard_tokens": 64})
    train = TokenData(m.out_dir).train
    assert isinstance(train, ShardedTokens) and len(m.shards["train"]) > 4
    flat = np.asarray(train)
    seq = 8
    parts = [Group(rank, 2, rank).shard(train, seq) for rank in range(2)]
    n = len(flat) // 2
    assert [len(p) for p in parts] == [n, n]
    assert np.array_equal(np.asarray(parts[0]), flat[:n])
    assert np.array_equal(np.asarray(parts[1]), flat[n:2 * n])  # starts where rank 0 ends


def test_flat_schema_1_directory_still_loads(prepared, tmp_path):
    """A directory a source tree was prepared into before shards (train.bin, val.bin,
    schema 1, shards null) reads as before, and preparing into it again replaces it."""
    out = tmp_path / "out"
    mf = out / "manifest.json"
    d = json.loads(mf.read_text())
    for name in ("train", "val"):
        (out / f"{name}_00000.bin").rename(out / f"{name}.bin")
    old_settings = {"schema": 1, "sources": d["sources"], "extensions": d["extensions"],
                    "vocab_size": d["vocab_size"], "val_fraction": d["val_fraction"]}
    mf.write_text(json.dumps({**d, "schema": 1, "shards": None,
                              "settings_hash": corpus._hash(old_settings)}))
    old = TokenData(out)
    assert old.manifest.schema == corpus.FLAT_SCHEMA and old.manifest.files_of("train") == [
        ("train.bin", prepared.train.tokens)]
    assert isinstance(old.train, np.memmap) and len(old.val) == prepared.val.tokens
    assert "train.bin" not in "\n".join(corpus.summary_lines(old.manifest))
    new = prepare([prepared.sources[0]], out, VOCAB, VAL_FRACTION, [".py"], progress=False)
    assert new.schema == corpus.SCHEMA_VERSION  # settings changed with the schema: redone
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]
    assert np.array_equal(np.asarray(TokenData(out).train), np.asarray(old.train))


def test_tokenizer_is_trained_on_train_only(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    names = [f"f{i}.py" for i in range(40)]
    val_name = next(n for n in names if split_fraction(n) < 0.2)
    for n in names:
        (root / n).write_text(py_source(len(n)) + f"# {n}\n")
    (root / val_name).write_text("zqxjvw = 'zqxjvw'\n" * 200)  # only in a val file
    m = prepare([root], tmp_path / "out", 400, 0.2, progress=False)
    tok = Tokenizer.load(Path(m.out_dir) / "tokenizer")
    assert not any("zqx" in t for t in tok.tokens())
    assert len(tok.encode("zqxjvw")) >= 4


def test_cache_reuse_and_invalidation(prepared, src, tmp_path, capsys):
    again = prepare([src], tmp_path / "out", VOCAB, VAL_FRACTION, [".py"], progress=False)
    assert again == prepared and again.created == prepared.created
    assert "using cached data in" in capsys.readouterr().err
    # different settings -> a fresh preparation
    other = prepare([src], tmp_path / "out", VOCAB + 8, VAL_FRACTION, [".py"], progress=False)
    assert other.vocab_size == VOCAB + 8 and other.settings_hash != prepared.settings_hash
    # a changed source file -> prepared again
    base = prepare([src], tmp_path / "out", VOCAB, VAL_FRACTION, [".py"], progress=False)
    f = src / "mod3.py"
    f.write_text(f.read_text() + "extra = 1\n")
    changed = prepare([src], tmp_path / "out", VOCAB, VAL_FRACTION, [".py"], progress=False)
    assert changed.fingerprint != base.fingerprint
    assert changed.train.bytes + changed.val.bytes == base.train.bytes + base.val.bytes + 10
    # a damaged output -> prepared again
    with open(tmp_path / "out" / "val_00000.bin", "ab") as fh:
        fh.write(b"\0\0")
    capsys.readouterr()
    repaired = prepare([src], tmp_path / "out", VOCAB, VAL_FRACTION, [".py"], progress=False)
    assert "using cached" not in capsys.readouterr().err
    TokenData(repaired.out_dir)


def test_default_out_dir_follows_env(src, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "nc"))
    m = prepare([src], None, VOCAB, VAL_FRACTION, progress=False)
    assert Path(m.out_dir).parent == tmp_path / "nc" / "data"
    assert Path(m.out_dir) == corpus.default_out_dir([src], VOCAB, VAL_FRACTION)
    monkeypatch.delenv("NANOCHAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "nanochat"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpus.cache_dir() == Path.home() / ".cache" / "nanochat"


def test_uint32_for_large_vocab():
    assert corpus.token_dtype(65536) == np.uint16
    assert corpus.token_dtype(65537) == np.uint32


def test_interrupted_prepare_leaves_no_stale_manifest(prepared, src, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(corpus, "_write_tokens", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, VOCAB + 16, VAL_FRACTION, progress=False)
    assert not (out / "manifest.json").exists()  # removed before anything was rewritten
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TokenData(out)
    monkeypatch.undo()
    m = prepare([src], out, VOCAB + 16, VAL_FRACTION, progress=False)
    assert not list(out.glob("*.tmp")) and TokenData(out).vocab_size == VOCAB + 16 == m.vocab_size


def test_write_tokens_is_atomic(prepared, src, tmp_path, monkeypatch):
    """A failure while writing a shard leaves the previous one untouched and no temp file."""
    from nanochat.data.records import ShardWriter

    out = tmp_path / "out"
    before = (out / "train_00000.bin").read_bytes()
    tok = Tokenizer.load(out / "tokenizer")

    class Bad:
        text = property(lambda self: (_ for _ in ()).throw(OSError("disk full")))
        nbytes = 1

    good = collect([src], [".py"], VAL_FRACTION).train
    docs = (good * corpus.ENCODE_CHUNK)[:corpus.ENCODE_CHUNK] + [Bad()]  # fails in chunk 2
    with pytest.raises(OSError, match="disk full"):
        corpus._write_tokens(docs, tok, ShardWriter(out, "train", 1 << 20, np.dtype(np.uint16)),
                             False, "x")
    assert (out / "train_00000.bin").read_bytes() == before
    assert not list(out.glob("*.tmp"))


# ---- bad input -------------------------------------------------------------------------


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        prepare([tmp_path / "nope"], tmp_path / "out", VOCAB, progress=False)


def test_source_without_matching_files(src, tmp_path):
    with pytest.raises(ValueError, match=rf"{src}.*no files with extension \.rs"):
        prepare([src], tmp_path / "out", VOCAB, extensions=[".rs"], progress=False)


def test_nothing_decodable(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "a.py").write_bytes(b"\x00\x01")
    (d / "b.py").write_bytes(b"\xff\xfe bad")
    msg = rf"nothing usable under {d}.*'binary': 1.*'undecodable': 1"
    with pytest.raises(ValueError, match=msg):
        prepare([d], tmp_path / "out", VOCAB, progress=False)


def test_bad_settings(src, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([src], tmp_path / "o", VOCAB, val_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare([src], tmp_path / "o", 100, progress=False)


# ---- TokenData -------------------------------------------------------------------------


def test_token_data_opens_read_only(prepared, tmp_path):
    data = TokenData(tmp_path / "out")
    assert isinstance(data.train, np.memmap) and len(data.train) == prepared.train.tokens
    assert len(data.val) == prepared.val.tokens and data.manifest == prepared
    assert data.token_bytes.shape == (VOCAB,)
    with pytest.raises((ValueError, OSError)):
        data.train[0] = 1


@pytest.mark.parametrize("damage, exc, match", [
    ("no_manifest", FileNotFoundError, "manifest.json"),
    ("corrupt_manifest", ValueError, "manifest.json: not valid JSON"),
    ("dtype", ValueError, "dtype 'uint32' does not match"),
    ("truncated", ValueError, r"train_00000.bin: \d+ bytes, but .*manifest.json says"),
    ("missing_bin", FileNotFoundError, "val_00000.bin does not exist"),
    ("schema", ValueError, "schema 99"),
    # an id past the vocabulary would index past the embedding table
    ("bad_id", ValueError, rf"val_00000.bin: token id {VOCAB + 5} at position 3 is out of range "
                           rf"for the vocabulary of {VOCAB} tokens"),
])
def test_token_data_validation(prepared, tmp_path, damage, exc, match):
    out = tmp_path / "out"
    mf = out / "manifest.json"
    d = json.loads(mf.read_text())
    if damage == "no_manifest":
        mf.unlink()
    elif damage == "corrupt_manifest":
        mf.write_text(mf.read_text()[:50])
    elif damage == "dtype":
        mf.write_text(json.dumps({**d, "dtype": "uint32"}))
    elif damage == "truncated":
        with open(out / "train_00000.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 2)
    elif damage == "missing_bin":
        (out / "val_00000.bin").unlink()
    elif damage == "schema":
        mf.write_text(json.dumps({**d, "schema": 99}))
    elif damage == "bad_id":
        val = np.fromfile(out / "val_00000.bin", dtype=d["dtype"])
        val[3] = VOCAB + 5
        val.tofile(out / "val_00000.bin")
    with pytest.raises(exc, match=match):
        TokenData(out)


def test_token_data_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        TokenData(tmp_path / "none")


# ---- n-gram baselines ------------------------------------------------------------------


def reference_bpb(data: TokenData) -> tuple[float, float]:
    """Plain-Python add-one unigram and bigram models (the reference for the numpy one)."""
    train, val = data.train.tolist(), data.val.tolist()
    V = data.vocab_size
    uni = Counter(train)
    bi = Counter(zip(train[:-1], train[1:]))
    ctx = Counter(train[:-1])
    nu = nb = 0.0
    nbytes = 0
    for a, b in zip(val[:-1], val[1:]):
        nu -= math.log((uni[b] + 1) / (len(train) + V))
        nb -= math.log((bi[(a, b)] + 1) / (ctx[a] + V))
        nbytes += int(data.token_bytes[b])
    return nu / (math.log(2) * nbytes), nb / (math.log(2) * nbytes)


def test_unigram_bigram_bpb_matches_reference(prepared, tmp_path):
    data = TokenData(tmp_path / "out")
    uni, bi = unigram_bigram_bpb(data)
    ru, rb = reference_bpb(data)
    assert uni == pytest.approx(ru, rel=1e-9) and bi == pytest.approx(rb, rel=1e-9)
    assert 0 < bi < uni < 8  # context helps on code; below 8 bits per byte
    u2, b2 = unigram_bigram_bpb(data, max_tokens=50)
    assert u2 > 0 and b2 > 0


# ---- CLI -------------------------------------------------------------------------------


def test_cli_prepare(run_nanochat, src, tmp_path):
    out = tmp_path / "out"
    r = run_nanochat(["data", "prepare", "--source", str(src), "--out", str(out),
                      "--vocab-size", str(VOCAB), "--val-fraction", str(VAL_FRACTION),
                      "--no-progress"])
    assert r.returncode == 0, r.stderr
    for needle in ("train", "val", "1 binary, 1 undecodable", "1 duplicates", "uint16",
                   str(out), TokenData(out).manifest.tokenizer_sha256[:16]):
        assert needle in r.stdout, (needle, r.stdout)
    r2 = run_nanochat(["data", "prepare", "--source", str(src), "--out", str(out),
                       "--vocab-size", str(VOCAB), "--val-fraction", str(VAL_FRACTION)])
    assert r2.returncode == 0 and "using cached data in" in r2.stderr


@pytest.mark.parametrize("args, needle", [
    (["--source", "{tmp}/missing"], "{tmp}/missing does not exist"),
    (["--source", "{src}", "--ext", ".rs"], "{src} has no files with extension .rs"),
    (["--source", "{src}", "--vocab-size", "10"], "vocab_size must be >= 261"),
])
def test_cli_bad_input_exits_2(run_nanochat, src, tmp_path, args, needle):
    fmt = {"tmp": tmp_path, "src": src.resolve()}
    r = run_nanochat(["data", "prepare", *[a.format(**fmt) for a in args],
                      "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.returncode == 2
    assert needle.format(**fmt) in r.stderr and "Traceback" not in r.stderr


# ---- the real default corpus -----------------------------------------------------------


@pytest.mark.slow
def test_prepare_default_stdlib(tmp_path):
    t0 = time.perf_counter()
    m = prepare(None, tmp_path / "stdlib", 512, progress=False)
    took = time.perf_counter() - t0
    assert m.sources == [str(Path(corpus.default_sources()[0]).resolve())]
    assert m.train.files + m.val.files > 1000
    assert 10e6 < m.train.bytes + m.val.bytes < 200e6  # tens of MB of Python
    assert m.val.files > 10 and 0.01 < m.val.bytes / (m.train.bytes + m.val.bytes) < 0.15
    assert 2.0 < m.train.bytes / m.train.tokens < 5.0  # bytes per token at vocab 512
    data = TokenData(m.out_dir)
    uni, bi = unigram_bigram_bpb(data)
    assert 0 < bi < uni < 8
    assert took < 120, took
    assert sum(os.path.getsize(Path(m.out_dir) / f) for f, _ in m.files_of("train")) == (
        2 * m.train.tokens)
