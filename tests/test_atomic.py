"""Crash-safe writes (nanochat/atomic.py and the C++ GGUF writer): unique temp files created
exclusively, never through a planted symlink, fsynced with their directory, removed on
error; metrics.jsonl's purge goes through them and survives a line torn by a crash."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from nanochat import atomic
from nanochat._core import core
from nanochat.train.metrics import MetricsLogger


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_replaces_and_leaves_no_temp(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    f = tmp_path / "a.json"
    f.write_text("old")
    atomic.write_text(f, "new")
    assert f.read_text() == "new" and _entries(tmp_path) == ["a.json"]
    assert len(synced) == 2  # the file, then its directory


def test_error_keeps_the_old_file_and_removes_the_temp(tmp_path):
    f = tmp_path / "state.pt"
    f.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.open_atomic(f) as out:
        out.write(b"half")
        raise RuntimeError("disk full")
    assert f.read_bytes() == b"old" and _entries(tmp_path) == ["state.pt"]


def test_planted_symlink_at_the_temp_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    os.symlink(victim, tmp_path / ".out.aaaa.tmp")  # the name the first try would use
    atomic.write_text(tmp_path / "out", "data")
    assert victim.read_text() == "precious"
    assert (tmp_path / "out").read_text() == "data" and not (tmp_path / "out").is_symlink()


def _gguf(path: Path, value: int) -> None:
    core().gguf_write(str(path), [("k", "u32", value)], [])


def test_gguf_writer_never_follows_a_planted_tmp_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "m.gguf"
    os.symlink(victim, tmp_path / "m.gguf.tmp")  # the fixed temp name of the old writer
    _gguf(out, 1)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and core().GgufFile(str(out)).kv()["k"] == 1
    assert _entries(tmp_path) == ["m.gguf", "m.gguf.tmp", "victim"]  # no temp of ours left


def test_gguf_writer_concurrent_writes_of_one_path(tmp_path):
    out = tmp_path / "m.gguf"
    errors = []

    def write(v):
        try:
            for _ in range(20):
                _gguf(out, v)
        except Exception as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert core().GgufFile(str(out)).kv()["k"] in (1, 2, 3, 4)
    assert _entries(tmp_path) == ["m.gguf"]


def test_gguf_writer_failure_leaves_no_temp(tmp_path):
    (tmp_path / "m.gguf").mkdir()  # rename onto a directory fails
    with pytest.raises(Exception, match="m.gguf"):
        _gguf(tmp_path / "m.gguf", 1)
    assert _entries(tmp_path) == ["m.gguf"]


def test_metrics_purge_is_atomic_and_survives_a_torn_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 7)]
    f.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # killed mid-write
    inode = f.stat().st_ino
    m = MetricsLogger(tmp_path, purge_step=4)
    m.close()
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4]
    assert f.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
