"""nanochat::rms_norm (csrc/norm, nanochat/ops/rmsnorm.py) against torch's F.rms_norm: forward,
backward, every ISA, thread-count invariance, Collider's kept-row backward, opcheck, errors,
and that the model's RMSNorm runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nanochat.config import ModelConfig
from nanochat.model.gpt import GPT
from nanochat.ops import rmsnorm, ternary
from nanochat.ops import rows as row_subset

EPS = 1e-5


def _problem(rows=37, dim=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * 3
    w = torch.rand(dim, generator=g) + 0.5
    gy = torch.randn(rows, dim, generator=g)
    return x, w, gy


def _grads(fn, x, w, gy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    return y.detach(), gx, gw


def _torch(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def _ours(x, w):
    return rmsnorm.rms_norm(x, w, EPS)


@pytest.mark.parametrize("dim", [1, 16, 100, 256, 768])
def test_matches_torch(isa, dim):
    """The tails (dim % 16 != 0) included; torch.float64 as the reference."""
    x, w, gy = _problem(dim=dim, seed=dim)
    ref = _grads(_torch, x.double(), w.double(), gy.double())
    got = _grads(_ours, x, w, gy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=2e-5)


def test_thread_count_does_not_change_results():
    x, w, gy = _problem(rows=300, dim=256)
    runs = []
    for t in (1, 2, 3):
        ternary.set_num_threads(t)
        try:
            runs.append(_grads(_ours, x, w, gy))
        finally:
            ternary.set_num_threads(0)
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)


def test_kept_rows_backward_equals_masked():
    """Inside a Collider micro-batch the backward runs over the kept rows: grad_x equal to
    the dense backward of the masked gradient (dropped rows exactly 0), grad_w too."""
    B, T, d = 3, 20, 64
    x, w, gy = _problem(rows=B * T, dim=d, seed=3)
    x, gy = x.view(B, T, d), gy.view(B, T, d)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.6
    masked = gy * keep[..., None]
    _, gx_ref, gw_ref = _grads(_ours, x, w, masked)
    with row_subset.armed((B, T)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _ours(xx, ww)
        row_subset.set_keep(keep)
        gx, gw = torch.autograd.grad(y, (xx, ww), gy)  # unmasked: the dropped rows are skipped
    assert torch.equal(gx[keep], gx_ref[keep])
    assert torch.equal(gx[~keep], torch.zeros_like(gx[~keep]))
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-6)


def test_opcheck():
    x, w, gy = _problem(rows=8, dim=32)
    torch.library.opcheck(torch.ops.nanochat.rms_norm.default, (x, w, EPS, False))
    _, rstd = torch.ops.nanochat.rms_norm(x, w, EPS, False)
    for keep in (None, torch.tensor([0, 3, 7])):
        torch.library.opcheck(torch.ops.nanochat.rms_norm_backward.default,
                              (gy, x, w, rstd, keep))


def test_bad_keep_names_the_argument():
    x, w, gy = _problem(rows=8, dim=32)
    _, rstd = torch.ops.nanochat.rms_norm(x, w, EPS, False)
    for keep in ([3, 1], [0, 8], [-1], [2, 2]):
        with pytest.raises(ValueError, match=r"keep\["):
            torch.ops.nanochat.rms_norm_backward(gy, x, w, rstd, torch.tensor(keep))
    with pytest.raises(ValueError, match="weight"):
        torch.ops.nanochat.rms_norm(x, w[:4], EPS, False)


def test_falls_back_to_torch_off_the_cpu_float32_path():
    x, w, _ = _problem(rows=4, dim=16)
    assert rmsnorm.applies(x, w)
    assert not rmsnorm.applies(x.double(), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rmsnorm.applies(x, w)
    y = rmsnorm.rms_norm(x.double(), w.double(), EPS)  # float64 reference models
    assert y.dtype == torch.float64


def test_env_switch_selects_torch(monkeypatch):
    x, w, _ = _problem(rows=4, dim=16)
    monkeypatch.setenv("NANOCHAT_RMSNORM", "torch")
    assert not rmsnorm.applies(x, w)
    torch.testing.assert_close(rmsnorm.rms_norm(x, w, EPS), _torch(x, w))


def test_model_norms_run_the_op():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      ffn_hidden=64, max_seq_len=16)
    model = GPT(cfg, bitlinear="torch")
    idx = torch.randint(0, 64, (2, 8))
    with torch.profiler.profile() as prof:
        _, loss = model(idx, idx)
        loss.backward()
    names = {e.name for e in prof.events()}
    assert "nanochat::rms_norm" in names and "nanochat::rms_norm_backward" in names
