"""nanochat::attention (csrc/attn, nanochat/ops/attention.py): the C++ forward and backward
(every ISA) and the op's pure-torch default against autograd through masked softmax
attention: full and windowed, grouped-query, packed rows, strided inputs, thread counts,
Collider's kept rows, bf16, opcheck, errors; training runs the op, ops="torch" none."""

from __future__ import annotations

import math

import pytest
import torch
from nanochat.config import ModelConfig
from nanochat.ops import attention, ternary
from nanochat.ops.attention import causal_attention
from nanochat.ops.rows import RowSubset


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
    rows = RowSubset((B, T))
    if keep is not None:
        rows.keep(keep)
    out = causal_attention(q, k, v, window, rows)
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
    torch.library.opcheck(torch.ops.nanochat.attention.default, (q, k, v, 0))
    torch.library.opcheck(torch.ops.nanochat.attention.default, (q, k, v, 3))
    out, lse = torch.ops.nanochat.attention(q, k, v, 0)
    for rows in (None, torch.tensor([0, 4, 8, 12])):
        torch.library.opcheck(torch.ops.nanochat.attention_backward.default,
                              (go, q, k, v, out, lse, rows, 0))


def test_bad_input_names_the_argument():
    q, k, v, go = _problem(T=8, D=8)
    out, lse = torch.ops.nanochat.attention(q, k, v, 0)
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
        torch.ops.nanochat.attention(q[:, :3], k, v, 0)


def _masked_reference(q, k, v, go, window, doc=None, keep=None):
    """_reference with packed rows (doc (B, T): each query sees keys [doc_start, q]) and
    kept rows (keep (B, T): the other rows' output gradient dropped, their dk, dv zero)."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    kr, vr = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    ok = (j <= i) & ((i - j < window) if window else True)
    if doc is not None:
        ok = ok & (j >= doc[:, None, :, None])
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = s.masked_fill(~ok, float("-inf")).softmax(-1) @ vr
    kf = torch.ones(q.shape[0], 1, t, 1) if keep is None else keep[:, None, :, None].double()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.double() * kf)
    return out.detach(), dq, dk * kf, dv * kf


DOC = torch.tensor([[0] * 5 + [5] * 19 + [24] + [25] * 12, [0] * 37])  # packed, then one


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (3, 3)])
@pytest.mark.parametrize("packed,kept", [(False, False), (True, False), (True, True)])
def test_torch_default_matches_autograd_in_float64(window, H, Hkv, packed, kept):
    """Inputs the C++ kernel does not take (float64 here) run the op's pure-torch default,
    the body every other device runs: it equals autograd through masked softmax attention
    to float64 rounding, with grouped-query heads, a window, packed rows and kept rows."""
    q, k, v, go = (x.double() for x in _problem(H=H, Hkv=Hkv, seed=window + H + Hkv))
    doc = DOC if packed else None
    keep = None
    if kept:
        keep = torch.rand(2, 37, generator=torch.Generator().manual_seed(3)) < 0.6
    ref = _masked_reference(q, k, v, go, window, doc, keep)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    rows = RowSubset((2, 37))
    if keep is not None:
        rows.keep(keep)
    out = causal_attention(q, k, v, window, rows, doc)
    got = (out.detach(), *torch.autograd.grad(out, (q, k, v), go))
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 6])
def test_cpp_kernel_equals_the_torch_default(isa, window):
    """The CPU kernel's C++ op and the torch default compute the same forward (out,
    logsumexp, layouts) and kept-row backward in float32, packed rows included."""
    q, k, v, go = _problem(seed=window)
    keep = torch.rand(2, 37, generator=torch.Generator().manual_seed(4)) < 0.65
    rows = keep.reshape(-1).nonzero().squeeze(1)
    for doc in (None, DOC):
        cpp = attention._cpp_forward(q, k, v, window, doc)
        ref = attention._torch_forward(q, k, v, window, doc)
        for a, b in zip(cpp, ref):
            assert a.stride() == b.stride() and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for r in (None, rows):
            got = attention._cpp_backward(go, q, k, v, *cpp, r, window, doc)
            want = attention._torch_backward(go, q, k, v, *cpp, r, window, doc)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_runs_the_torch_default_in_float32():
    """bf16 inputs (autocast's) run the default, computed in float32 (autocast or not) and
    rounded once to bf16: logsumexp stays float32, gradients come back bf16."""
    q, k, v, go = _problem(T=20, seed=5)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    want_out, want_lse = attention._torch_forward(qb.float(), kb.float(), vb.float(), 3, None)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, lse = torch.ops.nanochat.attention(qb, kb, vb, 3)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        assert torch.equal(out, want_out.bfloat16()) and torch.equal(lse, want_lse)
    qb, kb, vb = (x.requires_grad_() for x in (qb, kb, vb))
    grads = torch.autograd.grad(causal_attention(qb, kb, vb, 3), (qb, kb, vb), go.bfloat16())
    ref = _reference(q, k, v, go, 3)[1:]
    for a, b in zip(grads, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=0.05, atol=0.05)


def test_cpu_kernel_takes_float32_on_vector_isas(isa, monkeypatch):
    """The CPU kernel runs the C++ op on float32 where its tiles are vector code and hands
    the scalar ISA (slower than the default there) and other dtypes to the torch default."""
    ran = []
    for name in ("_cpp_forward", "_torch_forward", "_cpp_backward", "_torch_backward"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name,
                            lambda *a, real=real, name=name: ran.append(name) or real(*a))
    q, k, v, go = _problem(T=8, D=8)
    for x in (q, q.double()):
        ran.clear()
        xs = [t.to(x.dtype).requires_grad_() for t in (q, k, v)]
        torch.autograd.grad(causal_attention(*xs, 2), xs, go.to(x.dtype))
        cpp = x.dtype == torch.float32 and isa != "scalar"
        assert ran == (["_cpp_forward", "_cpp_backward"] if cpp
                       else ["_torch_forward", "_torch_backward"]), (isa, x.dtype)


def test_torch_default_is_every_devices_kernel():
    """The op's body is registered for every device (CompositeExplicitAutograd), the C++
    kernel for the CPU only."""
    for op in ("nanochat::attention", "nanochat::attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def test_opcheck_torch_default():
    q, k, v, go = (x.double() for x in _problem(T=9, D=8))
    doc = DOC[:, :9]
    torch.library.opcheck(torch.ops.nanochat.attention.default, (q, k, v, 3, doc))
    out, lse = torch.ops.nanochat.attention(q, k, v, 3, doc)
    torch.library.opcheck(torch.ops.nanochat.attention_backward.default,
                          (go, q, k, v, out, lse, torch.tensor([0, 4, 8, 12]), 3, doc))


def test_torch_default_bad_input_names_the_argument():
    """The default checks what the C++ op checks, with the same messages."""
    q, k, v, go = (x.double() for x in _problem(T=8, D=8))
    out, lse = torch.ops.nanochat.attention(q, k, v, 0)
    bwd = torch.ops.nanochat.attention_backward
    for rows in ([3, 1], [0, 16], [-1], [2, 2]):
        with pytest.raises(ValueError, match=r"attention_backward: rows\["):
            bwd(go, q, k, v, out, lse, torch.tensor(rows), 0)
    with pytest.raises(ValueError, match="window"):
        bwd(go, q, k, v, out, lse, None, -1)
    with pytest.raises(ValueError, match="attention_forward: heads .* kv_heads"):
        torch.ops.nanochat.attention(q[:, :3], k, v, 0)
    with pytest.raises(ValueError, match="doc_start"):
        torch.ops.nanochat.attention(q, k, v, 0, torch.full((2, 8), 1))


def test_model_trains_with_the_op_and_torch_ops_runs_none():
    """build_model's ops="auto" runs nanochat::attention and its C++ backward in GPT's
    training forward (full and windowed layers); ops="torch" (the plain-torch baseline)
    runs SDPA and no nanochat attention op; loss and gradients agree up to float rounding."""
    from nanochat.config import AttentionConfig, RunConfig
    from nanochat.model.build import build_model

    cfg = RunConfig(model=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                      n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                                      attention=AttentionConfig(pattern="SL", window=5)))
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = {}
    for ops in ("auto", "torch"):
        model = build_model(cfg, bitlinear="torch", fused_loss="off", ops=ops)
        with torch.profiler.profile() as prof:
            _, loss = model(idx, idx)
            loss.backward()
        names = {e.name for e in prof.events()}
        ran = {"nanochat::attention", "nanochat::attention_backward"} & names
        assert ran == ({"nanochat::attention", "nanochat::attention_backward"}
                       if ops == "auto" else set()), ops
        runs[ops] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(runs["auto"][0], runs["torch"][0], rtol=1e-5, atol=1e-6)
    for n, g in runs["torch"][1].items():
        torch.testing.assert_close(runs["auto"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)



def test_other_devices_attend_with_sdpa():
    """Off the CPU a full-sequence call runs SDPA (on a GPU its fused kernels never hold the
    (T, T) scores the op's default materializes), not nanochat::attention. Meta tensors
    stand in for a GPU's: a dispatch mode sees every op they run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.namespace)
            return func(*args, **(kwargs or {}))

    for device in ("meta", "cpu"):
        q, k, v = (torch.randn(2, h, 16, 8, device=device) for h in (4, 2, 2))
        with Seen() as seen:
            attention.attend(q, k, v, cached=0, window=None)
        assert ("nanochat" in seen.ops) == (device == "cpu"), (device, seen.ops)
