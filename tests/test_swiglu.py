"""nanochat::swiglu (csrc/act, nanochat/ops/swiglu.py) against torch's F.silu(gate) * up:
forward, backward, every ISA, thread-count invariance, Collider's kept-row backward,
opcheck, errors, and that the model's FFN runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nanochat.config import ModelConfig
from nanochat.model.gpt import GPT
from nanochat.ops import swiglu, ternary
from nanochat.ops.rows import RowSubset


def _problem(rows=37, dim=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(rows, dim, generator=g) * 4  # the sigmoid's tails included
    gate[0, : min(dim, 4)] = torch.tensor([-100.0, 100.0, 0.0, -20.0])[: min(dim, 4)]
    up = torch.randn(rows, dim, generator=g)
    gout = torch.randn(rows, dim, generator=g)
    return gate, up, gout


def _grads(fn, gate, up, gout):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = fn(gate, up)
    gg, gu = torch.autograd.grad(out, (gate, up), gout)
    return out.detach(), gg, gu


def _torch(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("dim", [1, 16, 100, 768])
def test_matches_torch(isa, dim):
    gate, up, gout = _problem(dim=dim, seed=dim)
    ref = _grads(_torch, gate.double(), up.double(), gout.double())
    got = _grads(swiglu.swiglu, gate, up, gout)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


def test_thread_count_does_not_change_results():
    gate, up, gout = _problem(rows=300, dim=256)
    runs = []
    for t in (1, 2, 3):
        ternary.set_num_threads(t)
        try:
            runs.append(_grads(swiglu.swiglu, gate, up, gout))
        finally:
            ternary.set_num_threads(0)
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)


def test_kept_rows_backward_equals_masked():
    B, T, d = 3, 20, 48
    gate, up, gout = (t.view(B, T, d) for t in _problem(rows=B * T, dim=d, seed=3))
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.6
    _, gg_ref, gu_ref = _grads(swiglu.swiglu, gate, up, gout * keep[..., None])
    rows = RowSubset((B, T))
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu.swiglu(g2, u2, rows)
    rows.keep(keep)
    gg, gu = torch.autograd.grad(out, (g2, u2), gout)  # unmasked: dropped rows skipped
    for got, ref in ((gg, gg_ref), (gu, gu_ref)):
        assert torch.equal(got[keep], ref[keep])
        assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


def test_opcheck():
    gate, up, gout = _problem(rows=8, dim=32)
    torch.library.opcheck(torch.ops.nanochat.swiglu.default, (gate, up))
    for keep in (None, torch.tensor([0, 3, 7])):
        torch.library.opcheck(torch.ops.nanochat.swiglu_backward.default,
                              (gout, gate, up, keep))


def test_errors_name_the_argument():
    gate, up, gout = _problem(rows=8, dim=32)
    for keep in ([3, 1], [0, 8], [-1]):
        with pytest.raises(ValueError, match=r"keep\["):
            torch.ops.nanochat.swiglu_backward(gout, gate, up, torch.tensor(keep))
    with pytest.raises(ValueError, match="up"):
        torch.ops.nanochat.swiglu(gate, up[:, :4])


def test_torch_default_matches_torch_off_the_float32_path():
    """float64 (and any dtype but float32) runs the op's torch default, the body every other
    device runs; its kept-row backward agrees with the C++ one."""
    gate, up, gout = _problem(rows=12, dim=48, seed=5)
    args = [t.double() for t in (gate, up, gout)]
    ref = _grads(_torch, *args)
    got = _grads(swiglu.swiglu, *args)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    keep = torch.tensor([0, 5, 11])
    g64 = torch.ops.nanochat.swiglu_backward(args[2], args[0], args[1], keep)
    g32 = torch.ops.nanochat.swiglu_backward(gout, gate, up, keep)
    for a, b in zip(g64, g32):
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)


def test_model_ffn_runs_the_op():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      ffn_hidden=64, max_seq_len=16)
    model = GPT(cfg, bitlinear="torch")
    idx = torch.randint(0, 64, (2, 8))
    with torch.profiler.profile() as prof:
        _, loss = model(idx, idx)
        loss.backward()
    names = {e.name for e in prof.events()}
    assert "nanochat::swiglu" in names and "nanochat::swiglu_backward" in names
