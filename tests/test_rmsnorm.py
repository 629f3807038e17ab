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
from nanochat.ops.rows import RowSubset

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
    """Given a row subset the backward runs over the kept rows: grad_x equal to
    the dense backward of the masked gradient (dropped rows exactly 0), grad_w too."""
    B, T, d = 3, 20, 64
    x, w, gy = _problem(rows=B * T, dim=d, seed=3)
    x, gy = x.view(B, T, d), gy.view(B, T, d)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.6
    masked = gy * keep[..., None]
    _, gx_ref, gw_ref = _grads(_ours, x, w, masked)
    rows = RowSubset((B, T))
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm.rms_norm(xx, ww, EPS, rows)
    rows.keep(keep)
    gx, gw = torch.autograd.grad(y, (xx, ww), gy)  # unmasked: the dropped rows are skipped
    assert torch.equal(gx[keep], gx_ref[keep])
    assert torch.equal(gx[~keep], torch.zeros_like(gx[~keep]))
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-6)


def test_opcheck():
    x, w, gy = _problem(rows=8, dim=32)
    torch.library.opcheck(torch.ops.nanochat.rms_norm.default, (x, w, EPS))
    _, rstd = torch.ops.nanochat.rms_norm(x, w, EPS)
    for keep in (None, torch.tensor([0, 3, 7])):
        torch.library.opcheck(torch.ops.nanochat.rms_norm_backward.default,
                              (gy, x, w, rstd, keep))


def test_bad_keep_names_the_argument():
    x, w, gy = _problem(rows=8, dim=32)
    _, rstd = torch.ops.nanochat.rms_norm(x, w, EPS)
    for keep in ([3, 1], [0, 8], [-1], [2, 2]):
        with pytest.raises(ValueError, match=r"keep\["):
            torch.ops.nanochat.rms_norm_backward(gy, x, w, rstd, torch.tensor(keep))
    with pytest.raises(ValueError, match="weight"):
        torch.ops.nanochat.rms_norm(x, w[:4], EPS)


def test_torch_default_matches_torch_off_the_float32_path():
    """Dtypes the C++ kernel does not take run the op's torch default (the body every other
    device runs): float64 references, bf16 activations under autocast; kept rows too."""
    x, w, gy = _problem(rows=12, dim=48, seed=5)
    ref = _grads(_torch, x.double(), w.double(), gy.double())
    got = _grads(_ours, x.double(), w.double(), gy.double())
    assert got[0].dtype == torch.float64
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    xb = x.bfloat16()
    y = rmsnorm.rms_norm(xb, w, EPS)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _torch(xb.float(), w), rtol=1e-2, atol=1e-2)
    keep = torch.tensor([1, 4, 9])
    _, rstd = torch.ops.nanochat.rms_norm(x.double(), w.double(), EPS)
    gx, gw = torch.ops.nanochat.rms_norm_backward(gy.double(), x.double(), w.double(), rstd,
                                                  keep)
    gx32, gw32 = torch.ops.nanochat.rms_norm_backward(gy, x, w, rstd.float(), keep)
    torch.testing.assert_close(gx.float(), gx32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.float(), gw32, rtol=1e-5, atol=1e-5)


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


def test_torch_ops_model_runs_no_op_and_agrees():
    """build_model(ops="torch"), a bench's plain-torch baseline: torch's functions only, the
    same loss and gradients as the ops up to float rounding."""
    from nanochat.config import RunConfig
    from nanochat.model.build import build_model

    cfg = RunConfig(model=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                      n_kv_heads=1, ffn_hidden=64, max_seq_len=16))
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    runs = []
    for ops in ("auto", "torch"):
        model = build_model(cfg, bitlinear="torch", fused_loss="off", ops=ops)
        with torch.profiler.profile() as prof:
            _, loss = model(idx, idx)
            loss.backward()
        names = {e.name for e in prof.events()}
        assert any(n.startswith("nanochat::") for n in names) == (ops == "auto"), ops
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ops"):
        build_model(cfg, ops="cpp")
