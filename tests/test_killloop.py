"""Kill loop: SIGKILL `nanochat train` at random moments (start-up, resume, mid-step, mid-save),
resume each time; every resume starts from an intact checkpoint at least as new as the one
before, the run ends bit-exact with an uninterrupted one, and no orphan file is left.

    NANOCHAT_KILLS=100 python -m pytest -m killloop -s   # the documented campaign (~5 min)
    python -m pytest -m killloop                         # 20 kills, as .ci/run runs it

Kill moments: a quarter are uniform in the first few seconds after launch (import, data,
recovery of the last kill's leftovers, checkpoint load); the rest wait for a random step to
be logged, then sleep a random fraction of a step (checkpoint_every = 1, so about half land
inside a save: torch.save, fsyncs, the renames, pruning with keep_checkpoints = 1).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from nanochat import checkpoint
from nanochat.data import corpus
from test_train import FILES, STDLIB

pytestmark = pytest.mark.killloop

KILLS = int(os.environ.get("NANOCHAT_KILLS", "20"))
SEED = int(os.environ.get("NANOCHAT_KILL_SEED", "0"))
VOCAB = 512
CONFIG = f"""
[model]
vocab_size = {VOCAB}
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
checkpoint_every = 1
keep_checkpoints = 1
sample_tokens = 1
[schedule]
warmup_steps = 2
"""


def _launch(cfg: Path, data: Path, run: Path, steps: int, resume: bool, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    # One thread each (torch and the C++ pool): on a loaded machine, two-thread barriers on
    # a model this small stall for scheduler ticks, and the straight run shares the setting.
    env.update(OMP_NUM_THREADS="1", NANOCHAT_NUM_THREADS="1")
    args = [sys.executable, "-m", "nanochat", "train", "--config", str(cfg), "--data",
            str(data), "--out", str(run), "--steps", str(steps), "--no-progress"]
    return subprocess.Popen(args + (["--resume"] if resume else []), stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), "a step logged twice or out of order"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _orphans(run: Path) -> list[str]:
    bad = [str(p) for p in run.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    for p in (run / "checkpoints").iterdir():  # only complete step dirs: none half-deleted
        if not (checkpoint._STEP_DIR.match(p.name) and (p / "state.pt").is_file()
                and (p / "config.json").is_file() and (p / "tokenizer").is_dir()):
            bad.append(str(p))
    return bad


def test_kill_loop(tmp_path):
    rng = random.Random(SEED)
    src = tmp_path / "src"
    src.mkdir()
    for f in FILES[:6]:
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    data = Path(corpus.prepare([str(src)], tmp_path / "data", vocab_size=VOCAB,
                               val_fraction=0.2, progress=False).out_dir)
    cfg = tmp_path / "kill.toml"
    cfg.write_text(CONFIG)
    steps = 5 * KILLS + 20  # kills land ~0-2 steps after the last resume point, more when idle

    log_path = tmp_path / "log.txt"
    with open(log_path, "ab") as log:
        t0 = time.perf_counter()
        p = _launch(cfg, data, tmp_path / "straight", steps, False, log)
        assert p.wait(timeout=1800) == 0, log_path.read_text()[-3000:]
        straight_s = time.perf_counter() - t0
        step_s = max(straight_s / steps, 0.02)

        run = tmp_path / "killed"
        kills, last_step, history = 0, 0, []
        while kills < KILLS:
            resume = bool(checkpoint.list_checkpoints(run))
            p = _launch(cfg, data, run, steps, resume, log)
            if rng.random() < 0.25:  # a few steps in at most: fast steps would end the run
                deadline = time.perf_counter() + rng.uniform(0.0, 4.0)
                while (time.perf_counter() < deadline and p.poll() is None
                       and _logged_step(run) <= last_step + 2):
                    time.sleep(0.01)
            else:
                target = last_step + rng.randint(0, 2)
                limit = time.perf_counter() + 600
                while (_logged_step(run) < target and p.poll() is None
                       and time.perf_counter() < limit):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 1.5) * step_s)
            if p.poll() is not None:  # it finished first: the loop needs more steps
                assert p.returncode == 0, log_path.read_text()[-3000:]
                break
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            found = checkpoint.list_checkpoints(run)
            if found:  # readers (no recovery) see an intact, never older checkpoint
                state = checkpoint.load(run, log=lambda m: pytest.fail(m))
                assert state["step"] >= last_step, (state["step"], last_step)
                last_step = state["step"]
            history.append(last_step)
        p = _launch(cfg, data, run, steps, bool(checkpoint.list_checkpoints(run)), log)
        assert p.wait(timeout=1800) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text(errors="replace")
    assert "falling back" not in text and "Traceback" not in text, text[-3000:]
    print(f"\nkill loop: {kills} kills survived, resume points {history}, "
          f"{steps} steps, seed {SEED}")
    assert kills == KILLS, f"the run finished after {kills} kills; raise its step count"

    assert _losses(run) == _losses(tmp_path / "straight")  # every step, bit for bit
    a = checkpoint.load(tmp_path / "straight")
    b = checkpoint.load(run)
    assert a["step"] == b["step"] == steps
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for n, v in sa[k].items():
            assert torch.equal(v, sb[k][n]) if torch.is_tensor(v) else v == sb[k][n], (k, n)
    assert _orphans(run) == []
    assert len(checkpoint.list_checkpoints(run)) == 1  # keep_checkpoints = 1
