"""Sharded checkpoints (torch.distributed.checkpoint) in one process: bit-exact resume, the
8-bit optimizer codes round-tripping, `nanochat export` equal to the gathered format's, and
bad shard directories refused with the path named. 2-rank save / 1-rank resume:
tests/test_distributed.py."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from nanochat import checkpoint
from nanochat.config import apply_overrides
from nanochat.export import export_checkpoint
from nanochat.train.loop import train
from test_train import data_dir, quiet, small_config  # noqa: F401  (data_dir: a fixture)


def _cfg(fmt: str, state: str = "fp32", **kw):
    kw = {"max_steps": 2, "checkpoint_every": 1000, "eval_every": 1000, "eval_tokens": 256,
          **kw}
    return apply_overrides(small_config(**kw),
                           [f"train.checkpoint_format={fmt}", f"optim.state={state}"])


@pytest.mark.parametrize("state", ["fp32", pytest.param("8bit", marks=pytest.mark.slow)])
def test_sharded_resume_is_bit_exact(data_dir, tmp_path, state):  # noqa: F811
    straight = train(_cfg("gathered", state), data_dir, tmp_path / "a", progress_bar=False,
                     log=quiet)
    first = train(_cfg("sharded", state), data_dir, tmp_path / "b", progress_bar=False,
                  stop_at_step=1, log=quiet)
    ckpt = checkpoint.list_checkpoints(tmp_path / "b")[-1]
    assert sorted(os.listdir(ckpt)) == ["config.json", "meta.pt", "shards", "tokenizer"]
    assert not (ckpt / "state.pt").exists()
    second = train(_cfg("sharded", state), data_dir, tmp_path / "b", resume=True,
                   progress_bar=False, log=quiet)
    assert first.losses + second.losses == straight.losses  # exact: model and optimizer
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert "shards" in b and "shards" not in a
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # consolidated optimizer state: the single-process format, codes in their own dtypes
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            got = b["optimizer"]["state"][i][k]
            assert got.dtype == v.dtype and torch.equal(got, v), (i, k)
    if state == "8bit":
        assert any(v.dtype in (torch.int8, torch.uint8)
                   for st in b["optimizer"]["state"].values() for v in st.values())
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    ga = export_checkpoint(tmp_path / "a", tmp_path / "a.gguf", name="m")
    gb = export_checkpoint(tmp_path / "b", tmp_path / "b.gguf", name="m")
    assert ga["checkpoint"] != gb["checkpoint"]
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_bad_shard_dirs_are_clear_errors(data_dir, tmp_path):  # noqa: F811
    train(_cfg("sharded", max_steps=1), data_dir, tmp_path / "run", progress_bar=False,
          log=quiet)
    ckpt = checkpoint.list_checkpoints(tmp_path / "run")[-1]
    shards = ckpt / "shards"
    # a save killed before its rename: a temp dir with shards but no meta.pt is no checkpoint
    half = ckpt.parent / ".step_000001.abcd"
    (half / "shards").mkdir(parents=True)
    (half / "shards" / "__0_0.distcp").write_bytes(b"partial")
    assert checkpoint.list_checkpoints(tmp_path / "run") == [ckpt]
    checkpoint.recover(tmp_path / "run")
    assert not half.exists()

    data = next(shards.glob("*.distcp"))
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # truncated shard
    with pytest.raises(ValueError, match=f"cannot read sharded checkpoint {shards}"):
        checkpoint.load(ckpt)
    with pytest.raises(ValueError, match=f"cannot read sharded checkpoint {shards}"):
        train(_cfg("sharded", max_steps=2), data_dir, tmp_path / "run", resume=True,
              progress_bar=False, log=quiet)
    data.write_bytes(good)

    index = shards / ".metadata"
    good = index.read_bytes()
    index.write_bytes(good[:40])
    with pytest.raises(ValueError, match=f"cannot read checkpoint index {index}"):
        checkpoint.load(tmp_path / "run")

    class Hostile:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    index.write_bytes(pickle.dumps(Hostile()))
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=f"refusing to load {index}"):
        checkpoint.load(ckpt)
    with pytest.raises(checkpoint.UnsafeCheckpointError):  # never falls back to an older one
        checkpoint.load(tmp_path / "run", consolidate=False)
    assert not (tmp_path / "pwned").exists()
    # a class that DCP's filesystem module imports from elsewhere is no index record
    index.write_bytes(b"ctorch.distributed.checkpoint.filesystem\nPath\n(S'/x'\ntR.")
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="filesystem.Path"):
        checkpoint.load(ckpt)
