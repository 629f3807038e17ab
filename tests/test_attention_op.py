"""nanochat::attention (csrc/attn, nanochat/ops/attention.py): the C++ forward and backward,
against autograd through float64 masked softmax attention: full and windowed,
grouped-query, strided inputs, every ISA, thread counts, Collider's kept rows, opcheck,
errors, and that training runs it."""

from __future__ import annotations

import math

import pytest
import torch
from nanochat.config import ModelConfig
from nanochat.model.gpt import GPT
from nanochat.ops import attention, ternary
from nanochat.ops import rows as row_subset


def _problem(B=2, H=4, Hkv=2, T=37, D=16, seed=0):
    """q as a transposed view of (B, T, H, D), like the model's; k, v contiguous."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    go = torch.randn(B, H, T, D, generator=g)
    return q, k, v, go


def _reference(q, k, v, go, window):
    """(out, dq, dk, dv) in float64 by autograd through softmax(q k^T / sqrt(D) + mask) v."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    ok = (j <= i) & ((i - j < window) if window else True)
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = s.masked_fill(~ok, float("-inf")).softmax(-1) @ vr
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.double())
    return out.detach(), dq, dk, dv


def _ours(q, k, v, go, window, keep=None):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    B, _, T, _ = q.shape
    with row_subset.armed((B, T)):
        if keep is not None:
            row_subset.set_keep(keep)
        out, _ = torch.ops.nanochat.attention(q, k, v, window, True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    return out.detach(), dq, dk, dv


def _close(got, ref):
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 1, 5, 40])
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 16), (3, 3, 64), (4, 1, 24)])
def test_matches_autograd(isa, window, H, Hkv, D):
    """Every row kept: the dense backward (head_dim off the 16-lane grid included)."""
    q, k, v, go = _problem(H=H, Hkv=Hkv, D=D, seed=window + D)
    _close(_ours(q, k, v, go, window), _reference(q, k, v, go, window))


@pytest.mark.parametrize("window", [0, 6])
def test_kept_rows_equal_the_masked_dense_backward(isa, window):
    """Collider: dropped rows carry no output gradient; dq equals the dense backward's on
    every row (zero on dropped ones), dk and dv on the kept rows, and the dropped rows' dk,
    dv are 0 (their k / v projections drop them anyway)."""
    B, T = 3, 50
    q, k, v, go = _problem(B=B, T=T, seed=7)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(8)) < 0.65
    keep[1] = False  # a batch row with nothing kept
    masked = go * keep[:, None, :, None]
    out_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, masked, window)
    out, dq, dk, dv = _ours(q, k, v, go, window, keep)  # unmasked go: the op drops the rows
    kf = keep[:, None, :, None]
    _close((out, dq, dk * kf, dv * kf), (out_ref, dq_ref, dk_ref * kf, dv_ref * kf))
    assert not dq[~kf.expand_as(dq)].any()
    assert not dk[~kf.expand_as(dk)].any() and not dv[~kf.expand_as(dv)].any()


def test_thread_count_does_not_change_results():
    q, k, v, go = _problem(B=3, T=70, seed=2)
    runs = []
    for t in (1, 2, 3):
        ternary.set_num_threads(t)
        try:
            runs.append(_ours(q, k, v, go, 0))
        finally:
            ternary.set_num_threads(0)
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)


def test_opcheck():
    q, k, v, go = _problem(T=9, D=8)
    torch.library.opcheck(torch.ops.nanochat.attention.default, (q, k, v, 0, False))
    torch.library.opcheck(torch.ops.nanochat.attention.default, (q, k, v, 3, False))
    out, lse = torch.ops.nanochat.attention(q, k, v, 0, False)
    for rows in (None, torch.tensor([0, 4, 8, 12])):
        torch.library.opcheck(torch.ops.nanochat.attention_backward.default,
                              (go, q, k, v, out, lse, rows, 0))


def test_bad_input_names_the_argument():
    q, k, v, go = _problem(T=8, D=8)
    out, lse = torch.ops.nanochat.attention(q, k, v, 0, False)
    bwd = torch.ops.nanochat.attention_backward
    for rows in ([3, 1], [0, 16], [-1], [2, 2]):
        with pytest.raises(ValueError, match=r"rows\["):
            bwd(go, q, k, v, out, lse, torch.tensor(rows), 0)
    with pytest.raises(ValueError, match="logsumexp"):
        bwd(go, q, k, v, out, lse[:, :, :4], None, 0)
    with pytest.raises(ValueError, match="kv_heads"):
        bwd(go, q, k[:, :1].expand(2, 3, 8, 8), v[:, :1].expand(2, 3, 8, 8), out, lse, None, 0)
    with pytest.raises(ValueError, match="window"):
        bwd(go, q, k, v, out, lse, None, -1)
    with pytest.raises(ValueError, match="attention_forward: heads .* kv_heads"):
        torch.ops.nanochat.attention(q[:, :3], k, v, 0, False)


def test_applies_only_to_float32_cpu_training(monkeypatch):
    monkeypatch.setenv("NANOCHAT_ATTENTION", "cpp")
    q, k, v, _ = _problem(T=8, D=8)
    assert attention.op_applies(q, k, v)
    assert not attention.op_applies(q.double(), k.double(), v.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not attention.op_applies(q, k, v)


def test_auto_takes_the_op_on_isas_with_vector_tiles(isa, monkeypatch):
    """NANOCHAT_ATTENTION=auto (the default): the op where its tiles are vector code (it beats
    SDPA there), SDPA on the scalar reference tiles (slower than SDPA)."""
    monkeypatch.delenv("NANOCHAT_ATTENTION", raising=False)
    q, k, v, _ = _problem(T=8, D=8)
    assert attention.op_applies(q, k, v) == (isa in attention.FAST_ISAS)
    assert attention.op_applies(q, k, v) == (isa != "scalar" and not isa.startswith("neon"))
    monkeypatch.setenv("NANOCHAT_ATTENTION", "torch")
    assert not attention.op_applies(q, k, v)


def _model_grads(monkeypatch, impl):
    monkeypatch.setenv("NANOCHAT_ATTENTION", impl)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=32)
    torch.manual_seed(0)
    model = GPT(cfg, bitlinear="torch")
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile() as prof:
        _, loss = model(idx, idx)
        loss.backward()
    names = {e.name for e in prof.events()}
    return {n: p.grad.clone() for n, p in model.named_parameters()}, names


def test_model_trains_with_the_op(monkeypatch):
    """GPT's training forward runs nanochat::attention and its C++ backward; gradients equal
    those of torch's SDPA path (NANOCHAT_ATTENTION=torch) up to float rounding."""
    ours, names = _model_grads(monkeypatch, "cpp")
    assert "nanochat::attention" in names and "nanochat::attention_backward" in names
    ref, names = _model_grads(monkeypatch, "torch")
    assert "nanochat::attention_backward" not in names
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
