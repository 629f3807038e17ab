"""nanochat.malloc.tune(): a training step's freed activation buffers are reused instead of
faulted in afresh.

Each case runs tiny-config training steps (batch 8 x 256, torch BitLinear, one thread) in
a fresh interpreter (malloc settings are process-wide) and counts the minor page faults of
a step after three warm-up steps (the median of five steps).
With glibc's defaults the step faults in about 180 MiB (the (8, 256, 768) activations and
the 32 MiB logits, every step); tuned, only blocks at or over the 32 MiB mmap threshold
(the logits) still are."""

from __future__ import annotations

import pytest
from nanochat.ops import ternary

_CHILD = """
import resource, torch
from nanochat import malloc
from nanochat.config import load_config
from nanochat.model.gpt import GPT
applied = malloc.tune()
torch.set_num_threads(1)
cfg = load_config("tiny")
torch.manual_seed(0)
m = GPT(cfg.model, bitlinear="torch")
x = torch.randint(0, cfg.model.vocab_size, (8, 257))
def step():
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    m.zero_grad(set_to_none=True)
for _ in range(3):
    step()
faults = []
for _ in range(5):  # which big blocks the heap happens to serve varies by step: the median
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(int(applied), sorted(faults)[2])
"""


def _faults(run_python, **env) -> tuple[bool, int]:
    r = run_python(_CHILD, **env)
    assert r.returncode == 0, r.stderr
    applied, faults = r.stdout.split()
    return applied == "1", int(faults)


def test_tune_stops_refaulting_activation_buffers(run_python):
    applied, tuned = _faults(run_python)
    if not applied:
        pytest.skip("not glibc: mallopt is unavailable, nothing is tuned")
    opted_out, default = _faults(run_python, NANOCHAT_MALLOC_TUNE="0")
    assert not opted_out  # NANOCHAT_MALLOC_TUNE=0 keeps glibc's defaults
    # Tuned, only the 32 MiB blocks (logits and their gradients: 8192 pages each; one to
    # four of them a step, as the heap's free space happens to serve the others) are faulted
    # in: medians measured 8,194-32,772. glibc's defaults re-fault the activations on top:
    # medians 38,900-54,700 (the lower ones since the C++ attention op, whose temporaries are
    # smaller than SDPA's and the k / v repeats).
    big = (8 * 256 * 4096 * 4) // 4096
    assert tuned <= 4 * big + 1024, (tuned, default)
    assert default >= tuned + 2048, (tuned, default)  # >= 8 MiB of activations re-faulted


@pytest.mark.parametrize("compare", ["malloc", "bitlinear", "fused"])
def test_bench_train_json_rows(run_nanochat, compare):
    """`nanochat bench train --json`: one row per variant, the ratios against the baseline
    (malloc: glibc's defaults, the child skipping tune(); bitlinear: torch's BitLinear;
    fused: torch's RMSNorm and SwiGLU)."""
    import json
    import math

    r = run_nanochat(["bench", "train", "--compare", compare, "--configs", "tiny", "--batch",
                      "1", "--seq", "32", "--steps", "1", "--rounds", "1", "--threads", "1",
                      "--json"], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    key = compare
    base, labels = ("glibc", ["tuned", "glibc"]) if compare == "malloc" else \
        ("torch", ["cpp", "torch"])
    assert [m[key] for m in rows] == labels
    by = {m[key]: m for m in rows}
    for m in rows:
        assert m["config"] == "tiny" and m["threads"] == 1 and m["params"] > 0
        assert m["cpu"] and m["isa"] == ternary.active_isa()  # what ran, as the child saw it
        assert math.isclose(m[f"speedup_vs_{base}"],
                            by[base]["step_seconds"] / m["step_seconds"], rel_tol=1e-9)
        assert math.isclose(m[f"memory_vs_{base}"],
                            m["peak_rss_bytes"] / by[base]["peak_rss_bytes"], rel_tol=1e-9)
    assert by[base][f"speedup_vs_{base}"] == 1.0
