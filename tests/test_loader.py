"""BatchLoader: deterministic per-step batches, bit-exact resume, measured prefetch overlap,
worker errors surfacing in the consumer; eval_batches covering each target once."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from nanochat.data.loader import BatchLoader, eval_batches

TOKENS = (np.arange(50_000) % 60_000).astype(np.uint16)  # token value == position


def take(loader, n):
    return [loader.next() for _ in range(n)]


def test_batches_are_windows_with_shifted_targets():
    with BatchLoader(TOKENS, 4, 16, seed=0) as ld:
        for x, y in take(ld, 5):
            assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
            assert x.is_contiguous() and y.is_contiguous()
            assert torch.equal(y, x + 1)  # contiguous windows, y shifted by one
            assert torch.equal(x[:, 1:], x[:, :-1] + 1)
            assert int(x.min()) >= 0 and int(y.max()) <= len(TOKENS) - 1


def test_deterministic_and_seed_dependent():
    with BatchLoader(TOKENS, 4, 16, seed=1) as a, BatchLoader(TOKENS, 4, 16, seed=1) as b, \
            BatchLoader(TOKENS, 4, 16, seed=2) as c:
        ba, bb, bc = take(a, 6), take(b, 6), take(c, 6)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ba, bb))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(ba, bc))
    assert not torch.equal(ba[0][0], ba[1][0])  # steps differ


def test_resume_is_bit_exact_and_prefetch_does_not_change_batches():
    with BatchLoader(TOKENS, 3, 8, seed=7, prefetch=4) as ld:
        full = take(ld, 10)
        assert ld.state_dict() == {"step": 10}
    with BatchLoader(TOKENS, 3, 8, seed=7, start_step=6) as ld:
        assert ld.state_dict() == {"step": 6}
        resumed = take(ld, 4)
    with BatchLoader(TOKENS, 3, 8, seed=7, prefetch=0) as ld:
        sync = take(ld, 10)
    for (x, y), (x2, y2) in zip(full[6:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, y), (x2, y2) in zip(full, sync):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_works_on_memmap(tmp_path):
    f = tmp_path / "t.bin"
    TOKENS.tofile(f)
    mm = np.memmap(f, dtype=np.uint16, mode="r")
    with BatchLoader(mm, 2, 8, seed=0) as a, BatchLoader(TOKENS, 2, 8, seed=0) as b:
        assert torch.equal(a.next()[0], b.next()[0])


def run_steps(prefetch: int, steps: int = 20, delay: float = 0.05, compute: float = 0.05):
    with BatchLoader(TOKENS, 2, 8, seed=0, prefetch=prefetch, source_delay_s=delay) as ld:
        waits = []
        t0 = time.perf_counter()
        for _ in range(steps):
            ld.next()
            waits.append(ld.last_wait_s)
            time.sleep(compute)  # the "training step"
        wall = time.perf_counter() - t0
        assert ld.total_wait_s == pytest.approx(sum(waits))
    return wall, waits


def test_prefetch_overlaps_a_slow_source_with_compute():
    """50 ms to build a batch, 50 ms to consume it: serial is 20 x 100 ms = 2 s."""
    wall, waits = run_steps(prefetch=4)
    assert wall < 0.7 * 20 * 0.1, wall  # overlap: ~1.05 s expected
    later = sorted(waits[1:])
    assert later[len(later) // 2] < 0.02, waits  # median wait after the first batch
    assert sum(waits[1:]) < 0.25 * sum([0.05] * 19), waits

    wall0, waits0 = run_steps(prefetch=0)
    assert wall0 >= 20 * 0.1 * 0.95, wall0  # synchronous: no overlap
    assert min(waits0) >= 0.045, waits0  # each step waits for the whole build


class Exploding(BatchLoader):
    def build_batch(self, step):
        if step == 3:
            raise RuntimeError("source broke at step 3")
        return super().build_batch(step)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_worker_exception_reaches_the_consumer(prefetch):
    ld = Exploding(TOKENS, 2, 8, seed=0, prefetch=prefetch)
    take(ld, 3)
    with pytest.raises(RuntimeError, match="step 3"):
        ld.next()
    ld.close()
    if ld._thread is not None:
        assert not ld._thread.is_alive()


def test_close_stops_the_thread_even_with_a_full_queue():
    ld = BatchLoader(TOKENS, 2, 8, seed=0, prefetch=2)
    time.sleep(0.05)  # the queue fills and the worker blocks on put
    assert ld._thread.daemon and ld._thread.is_alive()
    ld.close()
    assert not ld._thread.is_alive()
    ld.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ld.next()


def test_bad_arguments():
    with pytest.raises(ValueError, match="too few"):
        BatchLoader(TOKENS[:8], 2, 8, seed=0)
    with pytest.raises(ValueError):
        BatchLoader(TOKENS, 0, 8, seed=0)
    with pytest.raises(ValueError):
        BatchLoader(TOKENS, 2, 8, seed=0, prefetch=-1)


def test_smallest_token_array_still_works():
    with BatchLoader(TOKENS[:9], 3, 8, seed=0) as ld:  # exactly one window
        x, y = ld.next()
    assert x[:, 0].tolist() == [0, 0, 0] and y[:, -1].tolist() == [8, 8, 8]


def test_eval_batches_sweep_each_target_once():
    toks = TOKENS[:1000]
    batches = list(eval_batches(toks, batch_size=4, seq_len=10, max_tokens=200))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [len(x) for x, _ in batches] == [4, 4, 4, 4, 3]  # 199 // 10 = 19 windows
    assert torch.equal(ys, xs + 1)
    assert ys.flatten().tolist() == list(range(1, 191))  # in order, non-overlapping
    assert batches[0][0].dtype == torch.int64
    again = list(eval_batches(toks, 4, 10, 200))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    # max_tokens beyond the array: the whole array
    assert sum(len(x) for x, _ in eval_batches(toks, 8, 10, 10**9)) == 99


def test_eval_batches_too_short():
    with pytest.raises(ValueError, match="seq_len"):
        list(eval_batches(TOKENS[:10], 2, 10, 100))
