"""Data-parallel training under torchrun (nanochat/train/distributed.py): each rank's data
shard, a 2-process gloo run launched by `nanochat train --nproc 2`, and its checkpoint
resumed by one process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from nanochat import checkpoint
from nanochat.data import corpus
from nanochat.train.distributed import Group
from test_train import FILES, STDLIB

CONFIG = """
[model]
vocab_size = 512
d_model = 64
n_layers = 2
n_heads = 2
n_kv_heads = 2
ffn_hidden = 128
max_seq_len = 32
[train]
batch_size = 4
seq_len = 32
grad_accum = 2
time_budget_s = 0.0
eval_every = 1000000
eval_tokens = 256
log_every = 1
checkpoint_every = 2
sample_tokens = 4
"""


def test_shards_are_disjoint_and_cover_the_tokens():
    tokens = np.arange(1003)
    parts = [Group(r, 3, r).shard(tokens, 16) for r in range(3)]
    assert [len(p) for p in parts] == [334] * 3
    assert len(set(np.concatenate(parts).tolist())) == 1002  # no overlap; 1 left over
    assert Group().shard(tokens, 16) is tokens  # one process: everything
    with pytest.raises(ValueError, match="3 ranks leave 1 each"):
        Group(0, 3, 0).shard(np.arange(3), 16)


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = Group.from_env()
    assert (g.rank, g.world, g.main) == (0, 1, True)
    m = torch.nn.Linear(2, 2)
    assert g.wrap(m) is m and g.mean(3.5, torch.device("cpu")) == 3.5


def test_torchrun_needs_an_out_dir(monkeypatch, capsys):
    from nanochat.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--steps", "1"]) != 0
    assert "--out RUN_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_train_and_one_resumes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in FILES[:6]:
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    data = corpus.prepare([str(src)], tmp_path / "data", vocab_size=512, val_fraction=0.2,
                          progress=False).out_dir
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    base = [sys.executable, "-m", "nanochat", "train", "--config", str(cfg), "--data",
            str(data), "--out", str(run), "--no-progress"]
    r = subprocess.run(base + ["--nproc", "2", "--steps", "4"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "2 ranks" in r.stdout and r.stdout.count("held-out bits/byte") == 1  # rank 0 only
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in rows if "loss" in x]
    assert steps == [1, 2, 3, 4]  # logged once per step, by rank 0
    state = checkpoint.load(run)
    assert (state["step"], state["world"]) == (4, 2)
    # 2 ranks x 4 x 32 x 2 accumulated: the logged throughput counts both ranks' tokens
    r = subprocess.run(base + ["--resume", "--steps", "6"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "saved with 2 rank(s), resumed with 1" in r.stdout
    assert checkpoint.load(run)["step"] == 6


RANK_STEP = """
import sys
import torch
from nanochat.train.distributed import Group

g = Group.from_env("cpu", timeout_s=120)
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
net = g.wrap(model)
x = torch.full((2, 4), float(g.rank + 1))  # each rank its own batch
net(x).square().mean().backward()
torch.save({"grad": model.weight.grad, "loss_mean": g.mean(float(g.rank), x.device),
            "agree": g.agree(g.rank == 0, x.device)}, f"{sys.argv[1]}/rank{g.rank}.pt")
g.close()
"""


def test_ranks_average_their_gradients(tmp_path):
    """Two gloo ranks under torchrun with different batches end with the same gradient: the
    mean of the two single-process gradients (what DDP promises; without the wrap each keeps
    its own)."""
    script = tmp_path / "rank_step.py"
    script.write_text(RANK_STEP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    want = []
    for r in range(2):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        m(torch.full((2, 4), float(r + 1))).square().mean().backward()
        want.append(m.weight.grad)
    avg = (want[0] + want[1]) / 2
    assert not torch.allclose(want[0], want[1])
    for r in range(2):
        torch.testing.assert_close(got[r]["grad"], avg)
        assert got[r]["loss_mean"] == 0.5 and got[r]["agree"] is True
