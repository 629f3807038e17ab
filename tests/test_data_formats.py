"""Datasets people ship (nanochat/data/records.py): parquet and JSON lines (plain, .gz, .zst)
prepare into token shards whose tokens equal tokenizing the same texts directly; bad records
counted with file:line; 1 and 2 workers write identical shards; the shards read back as one
stream (ShardedTokens) that the loader and the ranks' slices use like a flat array. The
bounded-memory run on a few hundred MB is marked slow.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nanochat.data import corpus, records
from nanochat.data.corpus import Manifest, prepare, split_fraction
from nanochat.data.dataset import ShardedTokens, TokenData
from nanochat.data.loader import BatchLoader, eval_batches
from nanochat.data.tokenizer import Tokenizer
from nanochat.train.distributed import Group

VOCAB = 300
VAL = 0.2
WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "数据", "token", "shard", "ring",
         "(x)", "{y}", "  ", "\n", "42", "3.14"]


def texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for _ in range(n)]


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(x + b"\n" for x in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_records(root: Path, fmt: str, docs: list[str], field: str = "text") -> Path:
    """docs split over two files (so the split and order span files) under root."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for k, part in enumerate((docs[:half], docs[half:])):
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": list(range(len(part))), field: part}),
                           root / f"part{k}.parquet", row_group_size=40)
        else:
            write_jsonl(root / f"part{k}.{fmt}",
                        [json.dumps({field: t, "n": i}).encode() for i, t in enumerate(part)])
    return root


def expected_streams(docs: list[str], fmt: str, tok: Tokenizer) -> dict:
    """The token streams of the train/val splits, by tokenizing each text directly."""
    half = len(docs) // 2
    out = {"train": [], "val": []}
    for k, part in enumerate((docs[:half], docs[half:])):
        for i, t in enumerate(part):
            split = "val" if split_fraction(f"part{k}.{fmt}:{i}") < VAL else "train"
            out[split] += [tok.bos_id, *tok.encode(t)]
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl.gz", "jsonl.zst"])
def test_prepare_equals_direct_tokenization(tmp_path, fmt):
    docs = texts()
    src = write_records(tmp_path / "src", fmt, docs, field="body")
    m = prepare([src], tmp_path / "out", VOCAB, VAL, progress=False,
                record_options={"text_field": "body", "workers": 1, "shard_tokens": 1000})
    data = TokenData(tmp_path / "out")
    want = expected_streams(docs, fmt, data.tokenizer)
    assert m.schema == corpus.SCHEMA_VERSION == 2 and m.text_field == "body"
    for split in ("train", "val"):
        assert m.split(split).tokens == len(want[split])
        np.testing.assert_array_equal(np.asarray(getattr(data, split)), want[split])
    assert isinstance(data.train, ShardedTokens)  # several shards of <= 1000 tokens
    assert len(m.shards["train"]) == -(-m.train.tokens // 1000)
    assert all(s["tokens"] == 1000 for s in m.shards["train"][:-1])
    assert m.train.records + m.val.records == len(docs) and m.bad_records["total"] == 0
    assert m.train.bytes + m.val.bytes == sum(len(t.encode()) for t in docs)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(["manifest.json", "tokenizer"]
                           + [s["file"] for s in m.shards["train"] + m.shards["val"]])
    # unchanged sources and settings: the cached directory
    assert prepare([src], tmp_path / "out", VOCAB, VAL, progress=False,
                   record_options={"text_field": "body", "shard_tokens": 1000}) == m


def test_bad_records_counted_with_line_numbers(tmp_path):
    good = texts(40)
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines[2] = b'{"text": "unterminated'  # line 3
    lines[5] = json.dumps({"body": "no text key"}).encode()  # line 6
    lines[7] = json.dumps({"text": 7}).encode()  # line 8
    lines[9] = b'{"text": "caf\xe9"}'  # line 10: latin-1, not UTF-8
    lines[11] = b"[1, 2]"  # line 12
    lines[13] = json.dumps({"text": None}).encode()  # line 14
    lines[15] = json.dumps({"text": ""}).encode()  # line 16: empty, not bad
    lines.insert(20, b"   ")  # a blank line: no record, but it shifts the numbers after it
    lines[30] = b"{}"  # line 31
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    m = prepare([src], tmp_path / "out", VOCAB, VAL, progress=False,
                record_options={"workers": 1})
    b = m.bad_records
    assert {k: b[k] for k in records.BAD_KINDS} == {
        "invalid_json": 1, "not_object": 1, "missing_field": 3, "wrong_type": 1,
        "undecodable": 1}
    assert b["total"] == 7 and m.skipped["empty"] == 1
    assert b["first"] == [
        "bad.jsonl:3: invalid json", "bad.jsonl:6: missing field 'text'",
        "bad.jsonl:8: wrong type 'text'", "bad.jsonl:10: undecodable",
        "bad.jsonl:12: not object", "bad.jsonl:14: missing field 'text'",
        "bad.jsonl:31: missing field 'text'"]
    assert m.train.records + m.val.records == 41 - 1 - 7 - 1
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["bad_records"] == b
    assert any("bad records  : 7" in x for x in corpus.summary_lines(m))


def test_parquet_nulls_counted_and_bad_columns_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = texts(50)
    col = docs[:10] + [None] + docs[10:]
    pq.write_table(pa.table({"text": col}), tmp_path / "a.parquet", row_group_size=8)
    m = prepare([tmp_path / "a.parquet"], tmp_path / "out", VOCAB, VAL, progress=False,
                record_options={"workers": 1})
    assert m.bad_records["missing_field"] == 1
    assert m.bad_records["first"] == ["a.parquet:row 10: missing field 'text'"]
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'content' \(columns: text\)"):
        prepare([tmp_path / "a.parquet"], tmp_path / "o2", VOCAB, VAL, progress=False,
                record_options={"text_field": "content", "workers": 1})
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": list(range(20))}), tmp_path / "d" / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet: column 'text' has type int64"):
        prepare([tmp_path / "d"], tmp_path / "o3", VOCAB, VAL, progress=False,
                record_options={"workers": 1})


def test_missing_optional_packages_name_the_file(tmp_path, monkeypatch):
    src = write_records(tmp_path / "src", "parquet", texts(20))
    zst = write_records(tmp_path / "z", "jsonl.zst", texts(20))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ValueError, match=r"part0\.parquet: reading parquet needs the pyarrow"):
        prepare([src], tmp_path / "o", VOCAB, VAL, progress=False)
    with pytest.raises(ValueError, match=r"part0\.jsonl\.zst: reading \.zst needs the zstandard"):
        prepare([zst], tmp_path / "o", VOCAB, VAL, progress=False)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_truncated_compressed_file_is_an_error_naming_it(tmp_path, fmt):
    f = write_records(tmp_path / "src", fmt, texts(200)) / f"part1.{fmt}"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(ValueError, match=rf"part1\.{fmt}: unreadable after line"):
        prepare([tmp_path / "src"], tmp_path / "o", VOCAB, VAL, progress=False,
                record_options={"workers": 1})
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


def test_one_and_two_workers_write_identical_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "CHUNK_RECORDS", 16)  # many chunks, so order matters
    src = write_records(tmp_path / "src", "jsonl", texts(400))
    tok = tmp_path / "tok"
    Tokenizer.train(texts(100, seed=1), VOCAB).save(tok)
    outs = []
    for w in (1, 2):
        m = prepare([src], tmp_path / f"out{w}", VOCAB, VAL, progress=False, tokenizer=tok,
                    record_options={"workers": w, "shard_tokens": 2000})
        outs.append((m, {s["file"]: (tmp_path / f"out{w}" / s["file"]).read_bytes()
                         for s in m.shards["train"] + m.shards["val"]}))
    (m1, f1), (m2, f2) = outs
    assert len(f1) > 2 and f1 == f2 and m1.shards == m2.shards


def test_record_options_are_checked(tmp_path):
    src = write_records(tmp_path / "src", "jsonl", texts(20))
    for opts, match in [({"workers": 0}, "workers"), ({"shard_tokens": 0}, "shard_tokens"),
                        ({"text_field": ""}, "text_field")]:
        with pytest.raises(ValueError, match=match):
            prepare([src], tmp_path / "o", VOCAB, VAL, progress=False, record_options=opts)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.py").write_text("a = 1\n")
    with pytest.raises(ValueError, match="mix record files"):
        prepare([src, tree], tmp_path / "o", VOCAB, VAL, progress=False)
    with pytest.raises(ValueError, match="workers: only for parquet/JSONL sources"):
        prepare([tree], tmp_path / "o", VOCAB, VAL, progress=False, record_options={"workers": 2})


def test_cli_prepare_records(tmp_path, capsys):
    from nanochat import cli

    src = write_records(tmp_path / "src", "jsonl", texts(80), field="body")
    assert cli.main(["data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"),
                     "--vocab-size", str(VOCAB), "--text-field", "body", "--workers", "1",
                     "--shard-tokens", "700", "--tokenizer-sample-bytes", "2000",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = Manifest.load(tmp_path / "out")
    assert m.text_field == "body" and len(m.shards["train"]) == -(-m.train.tokens // 700)
    assert f"records      : train {m.train.records:,}, val {m.val.records:,}" in out
    assert "bad records  : 0" in out


def test_manifest_shards_validated(tmp_path):
    src = write_records(tmp_path / "src", "jsonl", texts(60))
    prepare([src], tmp_path / "out", VOCAB, VAL, progress=False,
            record_options={"workers": 1, "shard_tokens": 500})
    mf = tmp_path / "out" / "manifest.json"
    d = json.loads(mf.read_text())
    mf.write_text(json.dumps({**d, "shards": {**d["shards"], "val": [
        {"file": "../x.bin", "tokens": 3}]}}))
    with pytest.raises(ValueError, match="shards.val must be a non-empty list"):
        TokenData(tmp_path / "out")
    d["shards"]["train"][0]["tokens"] += 1
    mf.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="shards.train hold"):
        TokenData(tmp_path / "out")


# ---- reading shards: the loader and the ranks ------------------------------------------


def test_sharded_tokens_index_like_the_concatenation():
    flat = np.arange(1000, dtype=np.uint16)
    st = ShardedTokens([flat[:7], flat[7:300], flat[300:301], flat[301:]])
    assert len(st) == 1000 and st.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(st), flat)
    idx = np.random.default_rng(0).integers(0, 1000, size=(5, 33))
    np.testing.assert_array_equal(st[idx], flat[idx])
    for a, b in [(0, 1000), (5, 9), (6, 8), (7, 7), (299, 302), (950, 2000), (-10, None)]:
        np.testing.assert_array_equal(np.asarray(st[a:b]), flat[a:b])
    assert st[-1] == 999 and st[300] == 300
    with pytest.raises(IndexError):
        st[np.array([1000])]


def test_rank_slices_over_shards_are_disjoint_and_deterministic():
    flat = np.arange(10_007, dtype=np.uint32)
    st = ShardedTokens([flat[i:i + 1500] for i in range(0, len(flat), 1500)])
    T, B = 16, 4
    ranks = [Group(r, 2, r).shard(st, T) for r in range(2)]
    seen = [set(np.asarray(p).tolist()) for p in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 2 * (len(flat) // 2)
    for r, part in enumerate(ranks):
        ref = Group(r, 2, r).shard(flat, T)  # the flat array's slice: the same batches
        with BatchLoader(part, B, T, seed=3, prefetch=0) as a, \
                BatchLoader(ref, B, T, seed=3, prefetch=0) as b:
            for _ in range(5):
                xa, ya = a.next()
                xb, yb = b.next()
                assert (xa == xb).all() and (ya == yb).all()
            state = a.state_dict()
        # a resumed loader (the checkpointed step) continues with the same batches
        with BatchLoader(part, B, T, seed=3, prefetch=2, start_step=state["step"]) as c, \
                BatchLoader(ref, B, T, seed=3, prefetch=0, start_step=5) as d:
            assert (c.next()[0] == d.next()[0]).all()
    for (xa, ya), (xb, yb) in zip(eval_batches(st, 3, T, 2000), eval_batches(flat, 3, T, 2000)):
        assert (xa == xb).all() and (ya == yb).all()


# Source trees write the same shards; a flat schema-1 directory still loads:
# tests/test_data.py::test_flat_schema_1_directory_still_loads.


# ---- a corpus of a few hundred MB, in bounded memory -----------------------------------


# A tiny launcher runs the prepare and prints its children's peak RSS: getrusage of a child
# started straight from pytest would count pytest's own pages (torch included), because
# Linux carries the pre-exec image's high-water mark over exec into the child's ru_maxrss.
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


@pytest.mark.slow
def test_large_corpus_prepares_in_bounded_memory(tmp_path):
    """256 MB of JSON lines through `nanochat data prepare --workers 2`: the peak RSS of the
    largest process (the main one or a worker: ru_maxrss of the children, which the kernel
    folds up from grandchildren) stays far below the corpus size, since nothing holds more
    than a few chunks. Measured on 2 loaded vCPUs: about 70 MiB per process, ~5 minutes."""
    base = texts(2000, seed=7)
    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in base)
    f = tmp_path / "big.jsonl"
    with open(f, "wb") as out:
        n = 0
        while n < 256 << 20:
            out.write(lines)
            n += len(lines)
    env = {**os.environ, "NANOCHAT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "nanochat",
                        "data", "prepare", "--source", str(f), "--out", str(tmp_path / "out"),
                        "--vocab-size", "512", "--workers", "2", "--tokenizer-sample-bytes",
                        "10000000", "--no-progress"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1]) * 1024  # KiB -> bytes
    # what the process holds before reading anything: the interpreter and the CLI's imports
    # (torch among them, ~240 MiB on a quiet machine), which do not grow with the corpus
    b = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c",
                        "from nanochat import cli; cli.build_parser()"], env=env,
                       capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    base = int(b.stdout.strip().splitlines()[-1]) * 1024
    m = Manifest.load(tmp_path / "out")
    print(f"corpus {n / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB (imports alone "
          f"{base / 2**20:.0f} MiB), {m.prepare_s} s")
    assert m.train.bytes + m.val.bytes > 0.7 * n  # the texts, without the JSON around them
    assert peak - base < n / 2, (peak, base, n)
