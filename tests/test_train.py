"""The trainer end to end on a small real corpus: bit-exact resume, metrics readable by
TensorBoard's own reader, checkpoints (atomic, last N kept), SIGINT, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from nanochat import checkpoint
from nanochat.config import RunConfig, apply_overrides
from nanochat.data import corpus
from nanochat.train.loop import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py",
         "colorsys.py", "bisect.py", "heapq.py", "keyword.py", "glob.py", "queue.py",
         "sched.py"]
VOCAB = 512


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A dozen real stdlib modules, tokenized with a 512-token BPE (about a second)."""
    src = tmp_path_factory.mktemp("src")
    for f in FILES:
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    out = tmp_path_factory.mktemp("data")
    m = corpus.prepare([str(src)], out, vocab_size=VOCAB, val_fraction=0.2, progress=False)
    return Path(m.out_dir)


def small_config(**train) -> RunConfig:
    cfg = RunConfig()
    sets = [f"model.vocab_size={VOCAB}", "model.d_model=256", "model.n_layers=2",
            "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=512",
            "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=64",
            "train.eval_tokens=1024", "train.log_every=1", "train.eval_every=4",
            "train.checkpoint_every=4", "train.keep_checkpoints=2", "schedule.warmup_steps=2",
            "train.max_steps=8"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return apply_overrides(cfg, sets)


def quiet(*_a, **_k):
    pass


def test_resume_is_bit_exact(data_dir, tmp_path):
    cfg = small_config(max_steps=8, grad_accum=2)
    straight = train(cfg, data_dir, tmp_path / "a", progress_bar=False, log=quiet)
    first = train(cfg, data_dir, tmp_path / "b", progress_bar=False, stop_at_step=4, log=quiet)
    assert first.interrupted and first.step == 4
    second = train(cfg, data_dir, tmp_path / "b", resume=True, progress_bar=False, log=quiet)
    assert second.step == 8
    assert first.losses + second.losses == straight.losses  # exact, not approximate
    a = checkpoint.load(tmp_path / "a")["model"]
    b = checkpoint.load(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's log has each step once, in order
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").open()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_loss_falls_and_metrics_are_logged(data_dir, tmp_path):
    cfg = small_config(max_steps=12)
    cfg.optim.lr = cfg.optim.embed_lr = 3e-3
    r = train(cfg, data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    assert r.losses[-1] < r.losses[0] - 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_rows = [x for x in rows if "loss" in x]
    eval_rows = [x for x in rows if "val_bpb" in x]
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "data_wait_s",
                "peak_memory_bytes"):
        assert key in train_rows[-1], key
    assert [x["step"] for x in eval_rows] == [4, 8, 12]
    assert eval_rows[-1]["val_bpb"] > 0 and eval_rows[-1]["val_loss"] > 0
    # train_s: time in training steps only, growing, and the throughput windows use it
    # (evals fall between windows), so tokens/s times the window's train_s is its tokens
    t = [x["train_s"] for x in eval_rows]
    assert 0 < t[0] < t[1] < t[2]
    step_tokens = cfg.train.batch_size * cfg.train.seq_len
    prev_step, prev_t = 0, 0.0
    for x in train_rows:
        assert x["tokens_per_s"] * (x["train_s"] - prev_t) == pytest.approx(
            (x["step"] - prev_step) * step_tokens, rel=1e-6)
        prev_step, prev_t = x["step"], x["train_s"]

    # TensorBoard's own reader sees the same numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s",
            "data_wait_s", "peak_memory_bytes"} <= tags
    tb_loss = {e.step: e.value for e in acc.Scalars("loss")}
    for x in train_rows:
        assert tb_loss[x["step"]] == pytest.approx(x["loss"], rel=1e-6)
    tb_bpb = {e.step: e.value for e in acc.Scalars("val_bpb")}
    assert tb_bpb[12] == pytest.approx(eval_rows[-1]["val_bpb"], rel=1e-6)


def test_checkpoints_keep_last_n_and_are_complete(data_dir, tmp_path):
    cfg = small_config(max_steps=12, checkpoint_every=2, keep_checkpoints=2)
    train(cfg, data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    kept = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step_000010", "step_000012"]
    leftovers = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for p in kept:
        assert (p / "config.json").is_file() and (p / "tokenizer" / "tokenizer.json").is_file()
    state = checkpoint.load(tmp_path / "run")
    assert state["step"] == 12 and state["loader"]["step"] == 12


def test_resume_with_another_model_config_is_refused(data_dir, tmp_path):
    train(small_config(max_steps=2), data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    other = apply_overrides(small_config(max_steps=4), ["model.n_layers=3"])
    with pytest.raises(ValueError, match=r"different model config"):
        train(other, data_dir, tmp_path / "run", resume=True, progress_bar=False, log=quiet)


def test_vocab_mismatch_is_explained(data_dir, tmp_path):
    cfg = apply_overrides(small_config(), ["model.vocab_size=1024"])
    with pytest.raises(ValueError, match=r"model.vocab_size = 1024 but the tokenizer .* has 512"):
        train(cfg, data_dir, tmp_path / "run", progress_bar=False, log=quiet)


def test_resume_without_checkpoint(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in"):
        train(small_config(), data_dir, tmp_path / "empty", resume=True, progress_bar=False,
              log=quiet)


def test_corrupt_checkpoint_is_a_clear_error(data_dir, tmp_path):
    train(small_config(max_steps=2), data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    state = checkpoint.list_checkpoints(tmp_path / "run")[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*state\.pt"):
        checkpoint.load(tmp_path / "run")


def _cli(*args, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    return subprocess.run([sys.executable, "-m", "nanochat", *args], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def _small_sets():
    return [
        "--set", f"model.vocab_size={VOCAB}", "--set", "model.n_layers=2",
        "--set", "model.ffn_hidden=512", "--set", "model.max_seq_len=64",
        "--set", "train.batch_size=4", "--set", "train.seq_len=64",
        "--set", "train.eval_tokens=1024", "--set", "train.eval_every=2",
        "--set", "train.sample_tokens=16", "--set", "schedule.warmup_steps=1"]


def test_cli_train_then_sample(data_dir, tmp_path):
    run = tmp_path / "run"
    r = _cli("train", "--data", str(data_dir), "--out", str(run), "--steps", "3",
             "--time-budget", "0", "--no-progress", *_small_sets())
    assert r.returncode == 0, r.stderr
    assert f"run directory: {run}" in r.stdout
    assert "held-out bits/byte" in r.stdout and "unigram" in r.stdout and "bigram" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and summary["val_bpb"] > 0
    s = _cli("sample", "--checkpoint", str(run), "--prompt", "def f(", "--max-tokens", "8",
             "--seed", "1")
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("def f(")
    bad = _cli("sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert bad.returncode == 2 and "no checkpoint in" in bad.stderr


def test_cli_bad_config_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nbatch_sise = 4\n")
    r = _cli("train", "--config", str(p), "--data", str(tmp_path))
    assert r.returncode == 2
    assert "bad.toml" in r.stderr and "batch_sise" in r.stderr


def test_cli_missing_data_dir(tmp_path):
    r = _cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
             *_small_sets())
    assert r.returncode == 2 and "missing" in r.stderr


def test_sigint_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    p = subprocess.Popen([sys.executable, "-m", "nanochat", "train", "--data", str(data_dir),
                          "--out", str(run), "--steps", "100000", "--no-progress",
                          *_small_sets(), "--set", "train.log_every=1",
                          "--set", "train.eval_every=100000",
                          "--set", "train.checkpoint_every=100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists()
                                          and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "SIGINT" in err
    state = checkpoint.load(run)
    assert 2 <= state["step"] < 100000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] is True


def test_optimizer_groups_by_parameter_kind():
    from nanochat.model.gpt import GPT
    from nanochat.train.loop import build_optimizer

    cfg = small_config()
    model = GPT(cfg.model, bitlinear="torch")
    lines = []
    opt = build_optimizer(model, cfg, log=lines.append)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"matrix", "embedding", "scalar"}
    assert groups["matrix"]["weight_decay"] == cfg.optim.weight_decay
    assert groups["embedding"]["weight_decay"] == 0 and groups["scalar"]["weight_decay"] == 0
    assert [p for p in groups["embedding"]["params"]] == [model.token_embd.weight]
    assert all(p.ndim == 1 for p in groups["scalar"]["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert len(lines) == 3 and all("AdamW" in line for line in lines)  # logged at start-up
