"""WSD schedule: warmup, stable plateau, decay shapes, continuity, time-budget progress."""

import math

import pytest
from nanochat.config import ScheduleConfig
from nanochat.train.schedule import progress, wsd_factor


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_phases_and_continuity(shape):
    cfg = ScheduleConfig(warmup_steps=10, decay_fraction=0.2, decay_shape=shape,
                         final_lr_fraction=0.1)
    n = 100
    f = [wsd_factor(s, progress(s, n, 0, 0), cfg) for s in range(n + 1)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0       # linear warmup to the peak
    assert all(x == 1.0 for x in f[10:81])                   # stable phase
    assert f[n] == pytest.approx(0.1)                        # ends at the final fraction
    assert all(a >= b for a, b in zip(f[80:], f[81:]))       # monotone decay
    # continuous where the decay starts and where it ends
    assert wsd_factor(50, 0.8 + 1e-12, cfg) == pytest.approx(1.0, abs=1e-5)
    assert wsd_factor(50, 1 - 1e-12, cfg) == pytest.approx(0.1, abs=1e-5)


def test_shapes_at_midpoint():
    mid = 0.9  # halfway through a 20% decay
    vals = {s: wsd_factor(1000, mid, ScheduleConfig(warmup_steps=0, decay_shape=s)) for s in
            ("linear", "cosine", "1-sqrt")}
    assert vals["linear"] == pytest.approx(0.5)
    assert vals["cosine"] == pytest.approx(0.5)
    assert vals["1-sqrt"] == pytest.approx(1 - math.sqrt(0.5))


def test_time_budget_drives_progress():
    assert progress(10, 1000, 30.0, 60.0) == 0.5
    assert progress(900, 1000, 1.0, 60.0) == 0.9
    assert progress(10, 1000, 90.0, 60.0) == 1.0
    assert progress(10, 1000, 90.0, 0.0) == 0.01  # no budget: steps only
