"""Deterministic random-window batches with a background prefetch thread; eval sweeps.

    nanochat train ...                    # the trainer draws every batch from BatchLoader
    python -m pytest tests/test_loader.py # determinism, resume, measured overlap

Batch `s` is a pure function of (seed, s): an RNG seeded with [seed, s] picks batch_size
window starts in [0, len(tokens) - seq_len - 1], x = tokens[start : start + T] and
y = tokens[start + 1 : start + T + 1]. So a run resumed with start_step=k sees exactly the
batches k, k+1, ... that the uninterrupted run saw.

With prefetch > 0 a daemon thread builds batches ahead into a queue of that size while the
trainer computes; `last_wait_s` / `total_wait_s` record how long the trainer actually
waited in `next()` (the data-wait time the trainer logs). prefetch = 0 builds each batch
synchronously inside `next()`. Exceptions in the worker are re-raised by `next()`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

_STOP_POLL_S = 0.05


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PrefetchLoader:
    """The stepping, prefetch thread and device transfer of a deterministic loader:
    next() -> build_batch(step) (a tuple of CPU tensors) on `device`. A subclass sets up what
    build_batch reads, then calls this __init__, which starts the worker."""

    def __init__(self, batch_size: int, seq_len: int, start_step: int = 0, prefetch: int = 4,
                 device: str | torch.device = "cpu", pin_memory: bool = False):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be > 0, got {batch_size}, {seq_len}")
        if prefetch < 0 or start_step < 0:
            raise ValueError(f"prefetch and start_step must be >= 0, got {prefetch}, {start_step}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.step = start_step  # the step the next next() returns
        self.prefetch = prefetch
        self.device = torch.device(device)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._worker, args=(start_step,),
                                            name="nanochat-batch-loader", daemon=True)
            self._thread.start()

    def build_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """The CPU batch of `step`, a pure function of it (each subclass defines it)."""
        raise NotImplementedError(f"{type(self).__name__}.build_batch")

    def _worker(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, self.build_batch(step))
            except BaseException as e:  # handed to the consumer, which re-raises
                item = _Failure(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_STOP_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return
            step += 1

    # ---- consumer -----------------------------------------------------------------------

    def next(self) -> tuple[torch.Tensor, ...]:
        """The batch for the current step; advances the step."""
        t0 = time.perf_counter()
        if self._queue is None:
            batch = self.build_batch(self.step)
        else:
            if self._stop.is_set():
                raise RuntimeError("BatchLoader is closed")
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("BatchLoader worker thread died") from None
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            step, batch = item
            assert step == self.step, (step, self.step)
        if self.device.type != "cpu":
            batch = tuple(t.to(self.device, non_blocking=self.pin_memory) for t in batch)
        self.last_wait_s = time.perf_counter() - t0
        self.total_wait_s += self.last_wait_s
        self.step += 1
        return batch

    __next__ = next

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self

    def state_dict(self) -> dict:
        """{"step": next step}; pass it back as start_step to resume bit-exactly."""
        return {"step": self.step}

    def close(self) -> None:
        """Stop the worker thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a worker waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5.0)

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class BatchLoader(PrefetchLoader):
    """next() -> (x, y), int64 tensors (B, T) on `device`; see the module doc."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 start_step: int = 0, prefetch: int = 4, device: str | torch.device = "cpu",
                 pin_memory: bool = False, source_delay_s: float = 0.0):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be > 0, got {batch_size}, {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens is too few for one window of seq_len "
                             f"{seq_len} (+1 for the shifted target)")
        self.tokens = tokens
        self.seed = seed
        self.source_delay_s = source_delay_s  # test hook: make the source slow
        self._offsets = np.arange(seq_len + 1)  # (T+1,)
        super().__init__(batch_size, seq_len, start_step, prefetch, device, pin_memory)

    # ---- batch construction -------------------------------------------------------------

    def starts(self, step: int) -> np.ndarray:
        """Window starts of batch `step`, (B,) int64."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def build_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU batch for `step` (runs on the worker thread when prefetching)."""
        if self.source_delay_s:
            time.sleep(self.source_delay_s)
        idx = self.starts(step)[:, None] + self._offsets  # (B, T+1)
        buf = np.asarray(self.tokens[idx], dtype=np.int64)  # (B, T+1)
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))  # (B, T)
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (x, y) windows over the first max_tokens tokens, in order.

    Window i predicts targets tokens[i*T + 1 : (i+1)*T + 1]; every target appears once.
    The last batch may hold fewer than batch_size rows. Deterministic.
    """
    n = min(int(max_tokens), len(tokens))
    nwin = (n - 1) // seq_len
    if nwin < 1:
        raise ValueError(f"eval needs at least seq_len + 1 = {seq_len + 1} tokens, "
                         f"got {n} (val split has {len(tokens)})")
    offsets = np.arange(seq_len + 1)
    for i in range(0, nwin, batch_size):
        starts = np.arange(i, min(i + batch_size, nwin)) * seq_len
        buf = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64)  # (b, T+1)
        yield (torch.from_numpy(np.ascontiguousarray(buf[:, :-1])),
               torch.from_numpy(np.ascontiguousarray(buf[:, 1:])))
