"""Data-parallel training under torchrun (nanochat/train/distributed.py): each rank's data
shard, a 2-process gloo run launched by `nanochat train --nproc 2`, and its checkpoint
resumed by one process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


def _losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in rows if "loss" in x]


def _same_state(a: dict, b: dict) -> None:
    """Two checkpoints' model and optimizer state (single-process format), exactly."""
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel,state", [("ddp", "fp32"), ("fsdp", "fp32"),
                                            ("ddp", "8bit")])  # 8-bit: refused under FSDP
def test_two_ranks_save_shards_that_reshard(tmp_path, parallel, state):
    """2 ranks write a sharded (DCP) checkpoint, each rank its own file; resumed by 2 ranks
    the losses are the uninterrupted run's; one process loads it (2 -> 1) and two ranks
    load one process's (1 -> 2) with the model and optimizer state unchanged; `nanochat
    export` of the sharded dir equals that of the same state in the gathered format."""
    data = _prepared(tmp_path)
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(CONFIG)

    def run(out, *args):
        r = subprocess.run([sys.executable, "-m", "nanochat", "train", "--config", str(cfg),
                            "--data", str(data), "--out", str(out), "--no-progress", "--set",
                            f"train.parallel={parallel}", "--set", f"optim.state={state}",
                            *args],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout

    run(tmp_path / "straight", "--nproc", "2", "--steps", "6")
    out = run(tmp_path / "run", "--nproc", "2", "--steps", "4")
    assert "2 ranks" in out and out.count("held-out bits/byte") == 1  # rank 0 only
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4]  # once each, by rank 0
    ckpt = checkpoint.list_checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own file
    if parallel == "fsdp":  # each rank holds half the parameters
        sizes = [(ckpt / "shards" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
        assert min(sizes) > 0.4 * sum(sizes)
    saved = tmp_path / "saved4"
    shutil.copytree(ckpt, saved)
    shutil.copytree(tmp_path / "run", tmp_path / "one")
    st = checkpoint.load(tmp_path / "run")
    assert (st["step"], st["world"]) == (4, 2)
    codes = {v.dtype for s in st["optimizer"]["state"].values() for v in s.values()}
    assert (torch.int8 in codes or torch.uint8 in codes) == (state == "8bit")

    out = run(tmp_path / "run", "--resume", "--nproc", "2", "--steps", "6")
    assert "at step 4" in out and "resumed with" not in out
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")  # exact

    # 2 -> 1: one process loads the shards and, with no step to run, writes them back in the
    # single-process format (state.pt)
    out = run(tmp_path / "one", "--resume", "--steps", "4")
    assert "saved with 2 rank(s), resumed with 1" in out
    gathered = checkpoint.list_checkpoints(tmp_path / "one")[-1]
    assert (gathered / "state.pt").is_file() and not (gathered / "shards").exists()
    _same_state(checkpoint.load(saved), checkpoint.load(gathered))
    # (GGUF export needs d_model % 256 == 0: tests/test_sharded_checkpoint.py compares it)
    sample = [sys.executable, "-m", "nanochat", "sample", "--prompt", "def ", "--max-tokens",
              "16", "--seed", "0", "--checkpoint"]
    texts = []
    for src in (saved, gathered):
        r = subprocess.run(sample + [str(src)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        texts.append(r.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > len("def ")

    # 1 -> 2: one process trains on and writes shards; two ranks load them
    run(tmp_path / "one", "--resume", "--steps", "6", "--set", "train.checkpoint_format=sharded")
    one6 = tmp_path / "one6"
    shutil.copytree(checkpoint.list_checkpoints(tmp_path / "one")[-1], one6)
    assert checkpoint.load(one6)["world"] == 1
    out = run(tmp_path / "one", "--resume", "--nproc", "2", "--steps", "6")
    assert "saved with 1 rank(s), resumed with 2" in out
    _same_state(checkpoint.load(one6), checkpoint.load(tmp_path / "one"))
    out = run(tmp_path / "one", "--resume", "--nproc", "2", "--steps", "8")
    st = checkpoint.load(tmp_path / "one")
    assert (st["step"], st["world"]) == (8, 2)
    losses = _losses(tmp_path / "one")
    assert len(losses) == 8 and all(np.isfinite(losses))


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


TRAIN_STEPS = """
import sys
import torch
from nanochat.config import ModelConfig, RunConfig, apply_overrides
from nanochat.model.build import build_model
from nanochat.optim import build_optimizer
from nanochat.train.distributed import Group

g = Group.from_env("cpu", timeout_s=120)
cfg = apply_overrides(RunConfig(model=ModelConfig(**MODEL)), sys.argv[2:])
model = build_model(cfg, seed=0)
net = g.wrap(model, cfg.train.parallel)
opt = build_optimizer(model, cfg, log=lambda *a: None)
losses = []
for x in BATCHES:
    xr = x[g.rank]  # each rank its own micro-batch
    with g.gradient_sync(net, True):
        _, loss = net(xr[:, :-1], xr[:, 1:])
        loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(g.mean(float(loss), xr.device))
full = g.full_state(net, opt)
if g.main:
    torch.save({"losses": losses, "model": full[0], "optimizer": full[1]},
               f"{sys.argv[1]}/result.pt")
g.close()
"""
SMALL_MODEL = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                   ffn_hidden=128, max_seq_len=16)


def _batches():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 2, 4, 17), generator=g)  # steps, ranks, batch, seq+1


def _one_process(overrides):
    """The same steps in one process: both ranks' micro-batches accumulated, each / 2."""
    from nanochat.config import ModelConfig, RunConfig, apply_overrides
    from nanochat.model.build import build_model
    from nanochat.optim import build_optimizer

    cfg = apply_overrides(RunConfig(model=ModelConfig(**SMALL_MODEL)), overrides)
    model = build_model(cfg, seed=0)
    opt = build_optimizer(model, cfg, log=lambda *a: None)
    losses = []
    for x in _batches():
        total = 0.0
        for xr in x:
            _, loss = model(xr[:, :-1], xr[:, 1:])
            (loss / 2).backward()
            total += float(loss) / 2
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model.state_dict(), opt.state_dict()


def _two_ranks(tmp_path, overrides):
    torch.save(_batches(), tmp_path / "b.pt")
    script = tmp_path / "train_steps.py"
    script.write_text(TRAIN_STEPS.replace(
        "g = Group.from_env", f"MODEL = {SMALL_MODEL!r}\n"
        f"BATCHES = torch.load({str(tmp_path / 'b.pt')!r}, weights_only=True)\n"
        "g = Group.from_env"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), str(tmp_path), *overrides],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return torch.load(tmp_path / "result.pt", weights_only=True)


PARALLEL = [pytest.param("fsdp", "muon", id="fsdp-muon"),
            pytest.param("fsdp", "adamw", id="fsdp-adamw", marks=pytest.mark.slow),
            pytest.param("fsdp", "lion", id="fsdp-lion", marks=pytest.mark.slow),
            pytest.param("ddp", "muon", id="ddp-muon", marks=pytest.mark.slow)]


@pytest.mark.parametrize("parallel,optimizer", PARALLEL)
def test_two_ranks_step_like_one_process_accumulating(tmp_path, parallel, optimizer):
    """2 gloo ranks (each its own micro-batch) end 3 optimizer steps with the losses and
    parameters of one process accumulating both micro-batches; FSDP's gathered optimizer
    state is the one process's too (single-process format, same keys)."""
    # Newton-Schulz in float32: in bf16 the sharded matmuls' other summation order alone
    # moves the losses by ~5e-4
    overrides = [f"train.parallel={parallel}", f"optim.name={optimizer}", "train.seq_len=16",
                 "optim.muon.ns_dtype=float32"]
    got = _two_ranks(tmp_path, overrides)
    losses, model_sd, opt_sd = _one_process(overrides)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-4)
    assert got["model"].keys() == model_sd.keys()
    for k, v in model_sd.items():
        _mostly_close(got["model"][k], v, k)
    assert got["optimizer"]["state"].keys() == opt_sd["state"].keys()
    for i, st in opt_sd["state"].items():
        for k, v in st.items():
            _mostly_close(torch.as_tensor(got["optimizer"]["state"][i][k]), torch.as_tensor(v),
                          f"optimizer state {i} {k}")


def _mostly_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Every value within half the LR (3e-3) of the one process's, and on average within a
    hundredth of it. The ranks' gradients
    are summed in another order than one process's, and both optimizers amplify that float
    noise: Adam where a gradient is near its eps (seen: 82 of 16384 embedding values off by
    3.7e-4), Muon's Newton-Schulz in the directions of the gradient's smallest singular
    values (seen: up to 8.4e-5 over a quarter of a matrix). A rank that skipped the
    averaging, or updated with another rank's rows, is off by ~lr nearly everywhere."""
    diff = (got.double() - want.double()).abs()
    assert diff.max() < 1.5e-3 and diff.mean() < 3e-5, (what, float(diff.max()),
                                                         float(diff.mean()))


@pytest.mark.parametrize("override", ["optim.state=8bit", "optim.galore.enabled=true"])
def test_fsdp_refuses_whole_tensor_optimizer_state(override):
    from nanochat.config import RunConfig, apply_overrides
    from nanochat.train.distributed import check_parallel

    cfg = apply_overrides(RunConfig(), ["train.parallel=fsdp", override])  # defaults fit
    with pytest.raises(ValueError, match="train.parallel = 'fsdp'"):
        check_parallel(cfg, Group(0, 2))
    check_parallel(cfg, Group())  # one process: nothing is sharded
    check_parallel(apply_overrides(cfg, ["train.parallel=ddp"]), Group(0, 2))


def _prepared(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in FILES[:6]:
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    return corpus.prepare([str(src)], tmp_path / "data", vocab_size=512, val_fraction=0.2,
                          progress=False).out_dir


def _descendants(pid: int) -> list[int]:
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            parent[int(p)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, stack = [], [pid]  # depth-first over the process tree below pid
    while stack:
        top = stack.pop()
        kids = [c for c, pp in parent.items() if pp == top]
        found += kids
        stack += kids
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def test_killing_one_rank_ends_the_job_with_its_error(tmp_path):
    """SIGKILL of rank 1 mid-run: the job (launched by `nanochat train --nproc 2`) exits
    non-zero within seconds, naming the killed rank, instead of rank 0 waiting in its next
    collective until the process group's timeout."""
    data = _prepared(tmp_path)
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(CONFIG.replace("checkpoint_every = 2", "checkpoint_every = 1000000"))
    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "nanochat", "train", "--config", str(cfg),
                            "--data", str(data), "--out", str(run), "--no-progress",
                            "--nproc", "2", "--steps", "100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").is_file()
                   and "loss" in (run / "metrics.jsonl").read_text()):  # training under way
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        victim = _rank_pid(job.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = job.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if job.poll() is None:
            for pid in _descendants(job.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            job.kill()
            job.wait()
    assert job.returncode != 0
    assert "SIGKILL" in out and f"pid: {victim}" in out, out[-3000:]
    print(f"job ended {took:.1f} s after the kill")
    assert took < 30, (took, out[-3000:])
