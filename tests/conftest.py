"""Shared fixtures: dispatch state (ISA, threads) is process-global in the C++ core,
so every test gets it restored afterwards, and subprocess helpers get a clean env.

A per-test watchdog turns a hang (the kernels run a C++ thread pool; a pool start-up
deadlock was fixed in 377f92a) into a stack dump and a failed run instead of a stall.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys

import pytest
from nanochat.ops import ternary

SUPPORTED_ISAS = ternary.supported_isas()
DEFAULT_THREADS = ternary.num_threads()
# per test: a hang, not a slow test on a loaded machine (train tests took >120 s there)
HANG_TIMEOUT_S = 900

_watchdog_fd: list[int] = []


def pytest_configure(config):
    # Output capture is suspended here, so fd 2 is the real stderr: dup it for the
    # watchdog so its traceback is visible even though the test's stderr is captured.
    _watchdog_fd.append(os.dup(2))


@pytest.fixture(autouse=True)
def hang_watchdog():
    """Dump all threads' stacks and exit if one test runs past HANG_TIMEOUT_S."""
    if _watchdog_fd:
        faulthandler.dump_traceback_later(HANG_TIMEOUT_S, exit=True, file=_watchdog_fd[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def set_threads(n: int) -> None:
    """ternary.set_num_threads(n) (n <= 0: the default)."""
    ternary.set_num_threads(n)


def _reset_dispatch() -> None:
    ternary.set_isa(None)
    if ternary.num_threads() != DEFAULT_THREADS:  # each set builds a new pool: skip no-ops
        set_threads(0)


@pytest.fixture(autouse=True)
def reset_dispatch():
    """Restore the default ISA and thread count after every test, pass or fail."""
    _reset_dispatch()
    try:
        yield
    finally:
        _reset_dispatch()


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Pins each supported kernel path in turn (restored by reset_dispatch)."""
    ternary.set_isa(request.param)
    assert ternary.active_isa() == request.param
    return request.param


@pytest.fixture
def threads():
    """threads(n): set the kernel thread count (restored by reset_dispatch)."""
    return set_threads


def clean_env(**overrides: str | None) -> dict[str, str]:
    """os.environ without the NANOCHAT_* knobs (so the caller's shell cannot leak in),
    then `overrides` applied (None removes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _run(argv: list[str], env: dict[str, str | None], timeout: float,
         stdin_path: str | None = None):
    with open(stdin_path or os.devnull) as stdin:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=clean_env(**env), stdin=stdin)


@pytest.fixture
def run_nanochat():
    """run_nanochat(args, **env): `python -m nanochat ARGS` -> CompletedProcess (text).
    stdin_path: a file fed as standard input (default: empty)."""

    def run(args: list[str], timeout: float = 120, stdin_path: str | None = None,
            **env: str | None):
        return _run([sys.executable, "-m", "nanochat", *args], env, timeout, stdin_path)

    return run


@pytest.fixture
def run_python():
    """run_python(code, **env): `python -c CODE` -> CompletedProcess (text)."""

    def run(code: str, timeout: float = 120, **env: str | None):
        return _run([sys.executable, "-c", code], env, timeout)

    return run


@pytest.fixture
def one_thread():
    """Small shapes: one torch and one kernel thread. On a loaded 2-core machine, two-thread
    barriers on tiny ops stall for scheduler ticks (a 0.2 s test once took 45 s)."""
    import torch
    from nanochat.ops import ternary

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    ternary.set_num_threads(1)  # reset_dispatch restores the default afterwards
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- a trained model, shared by the engine/interop/CLI tests ------------------------------

TRAINED_FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py",
                 "colorsys.py", "bisect.py", "heapq.py", "keyword.py", "glob.py", "queue.py",
                 "sched.py", "string.py", "tokenize.py", "dataclasses.py", "argparse.py",
                 "csv.py", "calendar.py", "pprint.py", "difflib.py"]


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """The `tiny` architecture (vocab 1024) trained ~1 minute on 20 stdlib modules, exported.

    Random weights leave logits nearly tied, so greedy-token comparisons between two correct
    implementations could still flip; a trained model has the peaked logits real use has.
    Returns a dict: run (dir), model (GPT), tok (Tokenizer), gguf (f16 head), gguf_q8 (Q8_0),
    data (the prepared data dir it trained on).
    """
    import sysconfig
    from pathlib import Path

    import torch
    from nanochat.config import apply_overrides, load_config
    from nanochat.data import corpus
    from nanochat.export import export_gguf
    from nanochat.model.load import load_model
    from nanochat.train.loop import train

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path_factory.mktemp("trained-src")
    for f in TRAINED_FILES:
        (src / f.replace("/", "_")).write_text((stdlib / f).read_text())
    data = Path(corpus.prepare([str(src)], tmp_path_factory.mktemp("trained-data"),
                               vocab_size=1024, val_fraction=0.1, progress=False).out_dir)
    cfg = apply_overrides(load_config("tiny"), [
        "model.vocab_size=1024", "train.seq_len=128", "train.max_steps=160",
        "train.time_budget_s=0", "train.eval_every=1000", "train.eval_tokens=4096",
        "train.checkpoint_every=1000", "train.log_every=1000", "schedule.warmup_steps=20",
        "train.sample_tokens=1"])
    run = tmp_path_factory.mktemp("trained-run")
    torch.manual_seed(0)
    train(cfg, data, run, progress_bar=False, log=lambda *a, **k: None)
    model, tok, _ = load_model(run)
    out = {"run": run, "model": model, "tok": tok, "gguf": run / "model.gguf",
           "gguf_q8": run / "model-q8.gguf", "data": data}
    export_gguf(model, tok, out["gguf"], embd_type="f16")
    export_gguf(model, tok, out["gguf_q8"], embd_type="q8_0")
    return out


def assert_greedy_agrees(model, ids: list[int], got: list[int], want: list[int],
                         tie: float) -> None:
    """The engine's greedy tokens `got` equal torch's `want`, or they part only where torch
    itself is at a near-tie: the engine's token is within `tie` (a fraction of torch's
    logit range) of torch's top logit there. The two agree to ~1e-3 relative, so a closer
    pair can rank either way, and after it the continuations differ legitimately."""
    from nanochat.validate import greedy_divergence

    part = greedy_divergence(model, ids, got, want)
    assert part is None or part[1] < tie, (part, got, want)
