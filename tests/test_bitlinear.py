"""BitLinear (W1.58 A8): quantizer semantics, STE gradients, C++ op vs torch reference,
opcheck on nanochat::bitlinear and torch.compile."""

from __future__ import annotations

import pytest
import torch
from nanochat.model.bitlinear import BitLinear, frozen
from nanochat.ops import bitlinear, ternary
from nanochat.ops.bitlinear import (
    bitlinear_cpp,
    bitlinear_torch,
    quantize_activations,
    quantize_weight,
    weight_codes,
)

# Small shapes: run single-threaded (conftest.one_thread explains why).
pytestmark = pytest.mark.usefixtures("one_thread")


# Measured (40 random shapes, K up to 2048): |y_cpp - y_torch| <= 1.03e-7 * sum_i |x_i w_i|,
# i.e. under one fp32 epsilon of the absolute sum (float(int32 acc) * (s * 1/a) vs a float
# sum of (xq/a)(Wq*s)); gradients differ by <= 2.2e-7 of their max. Tests allow ~8x that.
OUT_TOL = 1e-6
GRAD_TOL = 1e-6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(n_tokens_shape, k, m, seed=0, xscale=1.0):
    g = _gen(seed)
    x = (torch.randn(*n_tokens_shape, k, generator=g) * xscale).requires_grad_()
    w = (torch.randn(m, k, generator=g) * 0.02).requires_grad_()
    return x, w


def _run(fn, x, w, gy):
    x.grad = w.grad = None
    y = fn(x, w)
    y.backward(gy)
    return y.detach(), x.grad.clone(), w.grad.clone()


def _abs_sum(x, w):
    """sum_i |x_i w_i| of the dequantized operands: the scale of fp32 rounding."""
    xq, a = quantize_activations(x.detach())
    c, s = quantize_weight(w.detach())
    return (xq.abs() / a) @ (c.abs() * s).T


# ---- quantizers ---------------------------------------------------------------------


def test_weight_codes_at_gaussian_init():
    w = torch.randn(1024, 1024, generator=_gen(1)) * 0.02
    codes, s = weight_codes(w)
    assert codes.dtype == torch.int8
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert s == pytest.approx(w.abs().mean().item(), rel=1e-6)
    frac = {v: (codes == v).float().mean().item() for v in (-1, 0, 1)}
    # |w| < 0.5 * E|w| = 0.399 sigma -> P(0) = 2 Phi(0.399) - 1 = 0.310
    assert frac[0] == pytest.approx(0.310, abs=0.02)
    assert frac[1] == pytest.approx(0.345, abs=0.02)
    assert frac[-1] == pytest.approx(0.345, abs=0.02)


def test_weight_scale_floor():
    codes, s = weight_codes(torch.zeros(4, 256))
    assert s == pytest.approx(1e-5) and not codes.any()


def test_activation_codes_match_the_core():
    x = torch.randn(37, 512, generator=_gen(2)) * 3
    x[5] = 0.0  # an all-zero token: the 1e-5 floor, codes 0
    q, a = quantize_activations(x)
    qc, x_scale = ternary.quantize_activations(x)
    assert torch.equal(q.to(torch.int8), qc)  # bit-identical codes (true division for a)
    assert q.abs().amax(dim=1)[torch.arange(37) != 5].eq(127).all()  # absmax -> +-127
    assert not q[5].any()
    torch.testing.assert_close(1 / a[:, 0], x_scale, rtol=1e-6, atol=0)


# ---- STE gradients ------------------------------------------------------------------


@pytest.mark.parametrize("fn", [bitlinear_torch, bitlinear_cpp], ids=["torch", "cpp"])
def test_ste_gradients_are_the_analytic_formulas(fn):
    x, w = _pair((6,), 512, 48, seed=3)
    gy = torch.randn(6, 48, generator=_gen(4))
    _, gx, gw = _run(fn, x, w, gy)
    codes, s = quantize_weight(w.detach())
    xq, a = quantize_activations(x.detach())
    torch.testing.assert_close(gx, gy @ (codes * s), rtol=GRAD_TOL, atol=GRAD_TOL * gx.abs().max())
    torch.testing.assert_close(gw, gy.T @ (xq / a), rtol=GRAD_TOL, atol=GRAD_TOL * gw.abs().max())


# ---- the C++ op against the torch reference ------------------------------------------


@pytest.mark.parametrize(
    "lead,k,m,xscale",
    [((5,), 256, 64, 1.0), ((2, 7), 512, 96, 5.0), ((1,), 768, 300, 0.01), ((3, 1), 1024, 17, 1.0),
     ((33,), 256, 1, 100.0)],
)
def test_cpp_matches_torch(lead, k, m, xscale):
    x, w = _pair(lead, k, m, seed=k + m, xscale=xscale)
    gy = torch.randn(*lead, m, generator=_gen(5))
    yt, gxt, gwt = _run(bitlinear_torch, x, w, gy)
    yc, gxc, gwc = _run(bitlinear_cpp, x, w, gy)
    assert yc.shape == (*lead, m)
    assert ((yc - yt).abs() <= OUT_TOL * _abs_sum(x, w) + 1e-30).all()
    for a, b in ((gxc, gxt), (gwc, gwt)):
        assert (a - b).abs().max() <= GRAD_TOL * b.abs().max()


def test_bf16_backward_is_close_to_f32():
    """bf16 backward GEMMs: only grad_y is rounded (codes and int8 activations are exact in
    bf16), so each gradient is within a few bf16 ulps (2^-8 relative) of the f32 one, and
    the forward is untouched."""
    x, w = _pair((4, 16), 768, 300, seed=3, xscale=2.0)
    gy = torch.randn(4, 16, 300, generator=_gen(9))
    y32, gx32, gw32 = _run(lambda a, b: bitlinear_cpp(a, b, False), x, w, gy)
    y16, gx16, gw16 = _run(lambda a, b: bitlinear_cpp(a, b, True), x, w, gy)
    assert torch.equal(y16, y32)
    for g16, g32 in ((gx16, gx32), (gw16, gw32)):
        err = (g16 - g32).abs().max() / g32.abs().max()
        assert 0 < err < 2 ** -6, err  # rounded (so bf16 really ran), yet close


def test_backward_precision_setting():
    m = BitLinear(768, 768, kernel="cpp", backward_precision="float32")
    assert m._bf16_backward is False
    m.backward_precision = "bf16"
    assert m._bf16_backward is True and "backward_precision=bf16" in repr(m)
    with pytest.raises(ValueError, match="backward"):
        m.backward_precision = "fp8"


def test_auto_trains_on_cpp_only_on_isas_with_a_fast_codes_gemm(isa):
    """kernel="auto": the C++ path on x86 from AVX2 up (the panel kernels beat torch there),
    torch on the scalar reference (slower than torch); "cpp" runs anywhere."""
    x = torch.randn(8, 256, 768)
    assert BitLinear(768, 768).uses_cpp(x) == (isa in ("avx2", "avx_vnni", "avx512",
                                                       "avx512_vnni"))
    assert BitLinear(768, 768, kernel="cpp").uses_cpp(x)


def test_module_dispatch():
    x = torch.randn(8, 256, 768)  # a training micro-batch: 2048 tokens
    auto = BitLinear(768, 768)
    assert auto.uses_cpp(x) == bitlinear.fast_isa()
    assert not BitLinear(768, 768, kernel="torch").uses_cpp(x)
    assert not BitLinear(256, 32).uses_cpp(x[..., :256])  # little work: auto keeps torch
    assert not auto.uses_cpp(x[:1, :4])  # few tokens: torch
    assert auto.uses_cpp(x[:1, :4], packed=True)  # unless packed once (frozen())
    assert BitLinear(256, 32, kernel="cpp").uses_cpp(x[..., :256])
    odd = BitLinear(200, 32)  # not a multiple of 256: auto falls back to torch
    assert not odd.uses_cpp(torch.randn(4, 200))
    assert odd(torch.randn(2, 4, 200)).shape == (2, 4, 32)
    with pytest.raises(ValueError, match="in_features % 256"):
        BitLinear(200, 32, kernel="cpp")(torch.randn(4, 200))
    assert not auto.uses_cpp(x.double())
    with pytest.raises(ValueError, match="kernel"):
        BitLinear(256, 8, kernel="fast")


def test_module_paths_agree_and_have_no_bias():
    torch.manual_seed(0)
    a = BitLinear(512, 40, kernel="cpp")
    b = BitLinear(512, 40, kernel="torch")
    b.load_state_dict(a.state_dict())
    assert [n for n, _ in a.named_parameters()] == ["weight"]
    x = torch.randn(4, 9, 512)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_frozen_inference_equals_the_op():
    torch.manual_seed(1)
    m = BitLinear(256, 24, kernel="cpp")
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref = m(x)
        with frozen(m):
            assert m._frozen is not None
            y = m(x)
        assert m._frozen is None
    assert torch.equal(y, ref)


def test_opcheck():
    x, w = _pair((6,), 256, 32, seed=6)
    torch.library.opcheck(torch.ops.nanochat.bitlinear.default, (x, w))
    torch.library.opcheck(torch.ops.nanochat.bitlinear.default, (x.detach(), w.detach()))


def test_compiles_without_graph_breaks():
    torch.manual_seed(2)
    m = BitLinear(256, 32, kernel="cpp")

    def f(x):
        return m(x).relu().square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 256, requires_grad=True)
    loss = compiled(x)
    loss.backward()
    gx, gw = x.grad.clone(), m.weight.grad.clone()
    x.grad = m.weight.grad = None
    ref = f(x)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, m.weight.grad)


def _operands_problem(n=45, out=100, cin=70, seed=0):
    g = _gen(seed)
    gy = torch.randn(n, out, generator=g) * 3
    # specials and round-to-nearest-even ties (bf16 keeps the top 16 bits of float32)
    gy[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40])
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF], dtype=torch.int32)
    gy[1, :4] = ties.view(torch.float32)
    gy[2, :4] = -ties.view(torch.float32)
    q = torch.randint(-128, 128, (n, cin), generator=g, dtype=torch.int8)
    x_scale = torch.rand(n, generator=g) * 0.1 + 1e-3
    return gy, q, x_scale


@pytest.mark.parametrize("kept", [False, True])
def test_backward_operands_equal_torch_bitwise(isa, kept):
    """nanochat::bitlinear_backward_operands and scatter_scaled_rows are exactly the torch
    sequence they replace (gather, casts to bf16, multiply by the scale, scatter into zeros)."""
    gy, q, x_scale = _operands_problem(seed=int(kept))
    n = gy.shape[0]
    rows = torch.tensor([0, 1, 3, 4, 10, 11, 12, 30, 44]) if kept else None
    g, gs, qb = torch.ops.nanochat.bitlinear_backward_operands(gy, q, x_scale, rows)
    sel = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    bf = torch.bfloat16
    for got, want in ((g, sel(gy).to(bf)), (gs, sel(gy * x_scale[:, None]).to(bf)),
                      (qb, sel(q).to(bf))):
        # bit for bit; a NaN stays a NaN (torch's own NaN bits differ between its paths)
        assert got.dtype == bf and torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16))
    s = torch.tensor(0.0371)
    out = torch.ops.nanochat.scatter_scaled_rows(g, rows, n, s)
    want = g.float() * s
    if rows is not None:
        want = torch.zeros(n, gy.shape[1]).index_copy_(0, rows, want)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


def test_backward_operands_opcheck_and_errors():
    gy, q, x_scale = _operands_problem(n=8, out=16, cin=32)
    gy[0, 0] = gy[1, 0] = 1.0  # opcheck compares outputs with allclose: no NaN
    gy[0, 1:6] = gy[1, 1:4] = 0.5
    for rows in (None, torch.tensor([1, 5, 6])):
        torch.library.opcheck(torch.ops.nanochat.bitlinear_backward_operands.default,
                              (gy, q, x_scale, rows))
        k = 8 if rows is None else 3
        src = torch.randn(k, 16).to(torch.bfloat16)
        torch.library.opcheck(torch.ops.nanochat.scatter_scaled_rows.default,
                              (src, rows, 8, torch.tensor(0.5)))
    for rows in ([3, 1], [0, 8], [-1], [2, 2]):
        with pytest.raises(ValueError, match=r"rows\["):
            torch.ops.nanochat.bitlinear_backward_operands(gy, q, x_scale, torch.tensor(rows))
    with pytest.raises(ValueError, match="x_scale"):
        torch.ops.nanochat.bitlinear_backward_operands(gy, q, x_scale[:4], None)
