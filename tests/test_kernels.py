"""The Triangle of Truth for the W1.58A8 GEMM/GEMV.

    every SIMD ISA  ==  scalar kernel  (bit for bit, any thread count)
    scalar kernel   ==  exact integer reference: f32(sum code*q) * (f32(scale) * x_scale)
    all of them     ~=  torch float matmul of the dequantized operands

plus the activation quantizer against a torch reference of BitNet's per-token absmax.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import SUPPORTED_ISAS, set_threads
from nanochat.ops import ternary

ROWS = [1, 2, 3, 5, 17, 100]
COLS = [256, 512, 1280]
TOKENS = [1, 2, 3, 5, 9, 64, 67, 130]


def make_case(rows: int, cols: int, tokens: int, seed: int, extreme: str | None = None):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (rows, cols), dtype=torch.int8, generator=g)
    q = torch.randint(-128, 128, (tokens, cols), dtype=torch.int8, generator=g)
    if extreme == "min":  # largest |sum|: every q = -128 against +1 codes
        codes.fill_(1)
        q.fill_(-128)
    elif extreme == "max":
        codes.fill_(-1)
        q.fill_(127)
    x_scale = torch.rand(tokens, generator=g) * 0.1 + 1e-3
    scale = 0.0123 + 0.001 * (seed % 7)
    return codes, scale, q, x_scale


def exact_reference(codes, scale, q, x_scale) -> torch.Tensor:
    """The kernel contract, evaluated exactly: integer sums (int64, exact), then the
    same two float32 roundings the kernels do: f32(acc) * (f32(scale) * x_scale[t])."""
    acc = q.to(torch.int64) @ codes.to(torch.int64).T
    factor = torch.tensor(scale, dtype=torch.float32) * x_scale  # (tokens,)
    return acc.to(torch.float32) * factor[:, None]


def float_reference(codes, scale, q, x_scale) -> torch.Tensor:
    return (q.float() * x_scale[:, None]) @ (codes.float() * scale).T


def magnitude(codes, scale, q, x_scale) -> torch.Tensor:
    """sum_k |x_k * w_k| per output: the scale float rounding errors are relative to."""
    return (q.float().abs() * x_scale[:, None]) @ (codes.float().abs() * scale).T


CASES = [(r, c, t) for r in ROWS for c in COLS for t in TOKENS]


@pytest.fixture(scope="module")
def triangle_cases():
    """Every (rows, cols, tokens) case with its scalar single-thread result."""
    out = []
    ternary.set_isa("scalar")
    set_threads(1)
    try:
        for i, (r, c, t) in enumerate(CASES):
            codes, scale, q, xs = make_case(r, c, t, seed=i)
            W = ternary.TernaryMatrix.from_codes(codes, scale)
            out.append(((r, c, t), W, q, xs, W.matmul_quantized(q, xs)))
        for extreme in ("min", "max"):
            codes, scale, q, xs = make_case(33, 4096, 7, seed=5, extreme=extreme)
            W = ternary.TernaryMatrix.from_codes(codes, scale)
            out.append(((33, 4096, 7, extreme), W, q, xs, W.matmul_quantized(q, xs)))
    finally:
        ternary.set_isa(None)
        set_threads(0)
    return out


def test_scalar_equals_exact_reference(triangle_cases):
    """Scalar kernel == integer sums with the documented float32 roundings, bit for bit,
    and agrees with torch's float matmul within float32 accumulation error."""
    for case, W, q, xs, y in triangle_cases:
        codes = W.codes()
        assert y.dtype == torch.float32 and tuple(y.shape) == (q.shape[0], W.rows)
        ref = exact_reference(codes, W.scale, q, xs)
        assert torch.equal(y, ref), f"{case}: max |diff| {(y - ref).abs().max()}"
        # vs torch float32 matmul: relative to sum |x*w|, the rounding scale of a dot
        # product. 1e-5 holds for random signs; the all-equal extreme cases hit float32
        # summation's worst case in the *reference*, bounded by cols * 2^-24.
        fref = float_reference(codes, W.scale, q, xs)
        mag = magnitude(codes, W.scale, q, xs)
        rtol = 1e-5 if len(case) == 3 else W.cols * 2.0**-24
        err = (y - fref).abs()
        assert bool((err <= rtol * mag + 1e-30).all()), f"{case}: {(err / mag).max()}"
        # vs float64: the kernel's own three float32 roundings (scale, scale*x_scale,
        # the product), plus float64's ~1e-16 * sum|x*w| (it can't reach an exact 0)
        dref = (q.double() * xs.double()[:, None]) @ (codes.double() * W.scale).T
        tol = 4e-7 * dref.abs() + 1e-14 * mag.double()
        assert bool(((y.double() - dref).abs() <= tol).all()), case


@pytest.mark.parametrize("n_threads", [1, 2])
def test_isa_matches_scalar(triangle_cases, isa, n_threads):
    set_threads(n_threads)
    assert ternary.num_threads() == n_threads
    assert ternary.active_isa() == isa
    for case, W, q, xs, want in triangle_cases:
        got = W.matmul_quantized(q, xs)
        assert torch.equal(got, want), (
            f"{isa} x{n_threads} threads differs from scalar on {case}: "
            f"max |diff| {(got - want).abs().max()}"
        )


@pytest.mark.parametrize("n_threads", [1, 2])
def test_isa_matches_scalar_numpy(isa, n_threads):
    """The numpy path runs the same kernels (and returns numpy)."""
    set_threads(n_threads)
    codes, scale, q, xs = make_case(37, 1280, 67, seed=42)
    W = ternary.TernaryMatrix.from_codes(codes.numpy(), scale)
    got = W.matmul_quantized(q.numpy(), xs.numpy())
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (67, 37)
    np.testing.assert_array_equal(got, exact_reference(codes, W.scale, q, xs).numpy())


def test_real_layer_shape_all_isas_threads():
    """One realistic layer, big enough for the thread pool to split rows and tokens."""
    codes, scale, q, xs = make_case(768, 2048, 130, seed=9)
    W = ternary.TernaryMatrix.from_codes(codes, scale)
    want = exact_reference(codes, W.scale, q, xs)
    for n in (1, 2):
        set_threads(n)
        for isa in SUPPORTED_ISAS:
            ternary.set_isa(isa)
            got = W.matmul_quantized(q, xs)
            assert torch.equal(got, want), f"{isa} x{n}: {(got - want).abs().max()}"


# ---- activations and the float entry point --------------------------------------------


def act_reference(x: torch.Tensor):
    """BitNet per-token absmax int8: s = 127/max(absmax, 1e-5), q = clamp(round(x*s))."""
    amax = x.abs().amax(dim=1).clamp(min=1e-5)
    # true float32 divisions: `127.0 / t` in torch is t.reciprocal() * 127 (two roundings)
    s = torch.full_like(amax, 127.0) / amax
    q = torch.clamp(torch.round(x * s[:, None]), -128, 127).to(torch.int8)
    return q, torch.ones_like(s) / s


def act_inputs():
    g = torch.Generator().manual_seed(7)
    yield "randn", torch.randn(9, 512, generator=g)
    yield "wide_range", torch.randn(5, 1280, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    yield "zeros", torch.zeros(2, 256)
    yield "tiny", torch.randn(3, 256, generator=g) * 1e-7  # below the 1e-5 floor
    x = torch.randn(4, 256, generator=g)
    x[:, 0] = 1.0  # pin absmax to 1 so x*127 lands on exact .5 ties
    x[:, 1:5] = torch.tensor([0.5, 1.5, -2.5, 101.5]) / 127
    x[:, 5] = -1.0
    yield "ties", x
    yield "outlier", torch.cat([torch.randn(1, 255, generator=g), torch.tensor([[1e4]])], 1)


@pytest.mark.parametrize("name,x", list(act_inputs()), ids=[n for n, _ in act_inputs()])
def test_quantize_activations_matches_torch(name, x):
    q_ref, s_ref = act_reference(x)
    q, s = ternary.quantize_activations(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref), f"{int((q != q_ref).sum())} codes differ"
    assert torch.equal(s, s_ref)
    qn, sn = ternary.quantize_activations(x.numpy())
    assert isinstance(qn, np.ndarray) and isinstance(sn, np.ndarray)
    np.testing.assert_array_equal(qn, q_ref.numpy())
    np.testing.assert_array_equal(sn, s_ref.numpy())
    # x ~= q * x_scale: within half a step per element (the clamp at -128 cannot bite:
    # |x*s| <= 127)
    xd = ternary.dequantize_activations(q, s)
    assert torch.equal(xd, q.float() * s[:, None])
    assert bool(((xd - x).abs() <= 0.5 * s[:, None] * (1 + 1e-5) + 1e-12).all())


def test_float_call_matches_reference(isa):
    g = torch.Generator().manual_seed(3)
    for tokens in (1, 5, 67):
        w = torch.randn(17, 1280, generator=g) * 0.05
        x = torch.randn(tokens, 1280, generator=g)
        W = ternary.TernaryMatrix.from_float(w)
        codes = W.codes()
        y = W(x)
        assert y.dtype == torch.float32 and tuple(y.shape) == (tokens, 17)
        q, s = act_reference(x)
        assert torch.equal(y, exact_reference(codes, W.scale, q, s))
        # and the whole BitLinear ~= the float matmul of the quantized operands
        fref = float_reference(codes, W.scale, q, s)
        assert bool(((y - fref).abs() <= 1e-5 * magnitude(codes, W.scale, q, s)).all())


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_gemv_1d_returns_1d(isa, kind):
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(-1, 2, (5, 512), dtype=torch.int8, generator=g)
    x = torch.randn(512, generator=g)
    if kind == "numpy":
        codes, x = codes.numpy(), x.numpy()
    W = ternary.TernaryMatrix.from_codes(codes, 0.02)
    y = W(x)
    assert type(y) is type(x) and tuple(y.shape) == (5,)
    y2 = W(x.reshape(1, -1))
    assert tuple(y2.shape) == (1, 5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2)[0])


def test_zero_tokens_torch():
    W = ternary.TernaryMatrix.from_codes(torch.zeros(3, 256, dtype=torch.int8), 1.0)
    y = W.matmul_quantized(torch.zeros(0, 256, dtype=torch.int8), torch.zeros(0))
    assert tuple(y.shape) == (0, 3)
    assert tuple(W(torch.zeros(0, 256)).shape) == (0, 3)


@pytest.mark.parametrize("case", ["torch_zero_rows", "numpy_zero_rows", "numpy_zero_tokens"])
def test_zero_size_arrays(case):
    if case == "torch_zero_rows":
        E = ternary.TernaryMatrix.from_codes(torch.zeros(0, 256, dtype=torch.int8), 1.0)
        assert tuple(E(torch.randn(4, 256)).shape) == (4, 0)
    elif case == "numpy_zero_rows":
        E = ternary.TernaryMatrix.from_codes(np.zeros((0, 256), np.int8), 1.0)
        assert E(np.ones((4, 256), np.float32)).shape == (4, 0)
    else:
        W = ternary.TernaryMatrix.from_codes(np.zeros((3, 256), np.int8), 1.0)
        assert W(np.zeros((0, 256), np.float32)).shape == (0, 3)


def test_thread_controls():
    set_threads(1)
    assert ternary.num_threads() == 1
    set_threads(2)
    assert ternary.num_threads() == 2
    set_threads(0)
    assert ternary.num_threads() >= 1


def test_isa_controls():
    assert SUPPORTED_ISAS[0] == "scalar"
    default = ternary.active_isa()
    assert default == (os.environ.get("NANOCHAT_ISA") or SUPPORTED_ISAS[-1])  # else the best
    for name in SUPPORTED_ISAS:
        ternary.set_isa(name)
        assert ternary.active_isa() == name
    ternary.set_isa(None)
    assert ternary.active_isa() == default


# ---- NANOCHAT_ISA in a fresh process --------------------------------------------------


@pytest.mark.parametrize("name", SUPPORTED_ISAS)
def test_env_isa_reported_by_info(run_nanochat, name):
    r = run_nanochat(["info", "--json"], NANOCHAT_ISA=name)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["isa"] == name
    assert info["isas"] == SUPPORTED_ISAS


_ENV_CHILD = """
import sys, torch
from nanochat.ops import ternary
g = torch.Generator().manual_seed(1)
codes = torch.randint(-1, 2, (17, 1280), dtype=torch.int8, generator=g)
x = torch.randn(9, 1280, generator=g)
W = ternary.TernaryMatrix.from_codes(codes, 0.03)
try:
    y = W(x)
except ValueError as e:
    print("ValueError:", e)
    sys.exit(3)
print(ternary.active_isa())
print(y.numpy().tobytes().hex())
"""


def test_env_isa_drives_the_kernel(run_python):
    """NANOCHAT_ISA pins the kernel a fresh process computes with (not just the report)."""
    name = "scalar" if SUPPORTED_ISAS[-1] != "scalar" else SUPPORTED_ISAS[-1]
    r = run_python(_ENV_CHILD, NANOCHAT_ISA=name)
    assert r.returncode == 0, r.stderr
    active, hexbytes = r.stdout.split()
    assert active == name
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-1, 2, (17, 1280), dtype=torch.int8, generator=g)
    x = torch.randn(9, 1280, generator=g)
    want = ternary.TernaryMatrix.from_codes(codes, 0.03)(x)
    assert bytes.fromhex(hexbytes) == want.numpy().tobytes()


def test_env_isa_bogus(run_nanochat, run_python):
    r = run_nanochat(["info", "--json"], NANOCHAT_ISA="bogus")
    assert r.returncode != 0
    assert "bogus" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2  # the CLI's usage-error code, not a signal / crash
    # the library raises ValueError at first use instead of crashing
    r = run_python(_ENV_CHILD, NANOCHAT_ISA="bogus")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "bogus" in r.stdout


_ALL_ISAS = ("neon", "neon_dotprod", "avx2", "avx_vnni", "avx512", "avx512_vnni")


def test_env_isa_unsupported(run_nanochat):
    # No CPU runs both the ARM and the x86 paths, so one of them is always missing.
    missing = [i for i in _ALL_ISAS if i not in SUPPORTED_ISAS][-1]
    r = run_nanochat(["info", "--json"], NANOCHAT_ISA=missing)
    assert r.returncode == 2 and missing in r.stderr and "not supported" in r.stderr


# ---- thread-pool start-up race (regression, 377f92a) ------------------------------------

_POOL_CHILD = """
import time
import numpy as np
import nanochat._C as C
from nanochat.ops import ternary
W = ternary.TernaryMatrix.from_codes(np.ones((64, 4096), np.int8), 1.0)
q, s = ternary.quantize_activations(np.ones((4, 4096), np.float32))
want = W.matmul_quantized(q, s)
n = 0
end = time.monotonic() + 4
while time.monotonic() < end:
    C.set_num_threads(2)        # a fresh pool; the old one is destroyed at once
    n += 1
end = time.monotonic() + 4
while time.monotonic() < end:
    C.set_num_threads(2)        # a fresh pool ...
    y = W.matmul_quantized(q, s)    # ... whose first job comes at once (parallel path)
    assert (y == want).all()
    n += 1
print("ok", n)
"""


@pytest.mark.slow
def test_threads_pool_startup_race(run_python):
    """Rebuilding the pool, then destroying or using it before its workers have run,
    must never hang. (Before 377f92a a worker read the job generation only when it
    started, so it could miss the first bump and wait forever: set_num_threads hung
    in join, or a GEMM spun forever. A race, so a pass here is evidence, not proof.)"""
    import subprocess

    try:
        r = run_python(_POOL_CHILD, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("set_num_threads + immediate destroy / GEMM deadlocked")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def test_gemm_codes_equals_packed_gemm_and_checks_arguments():
    """ternary.gemm_codes (training's GEMM, no TK2 packing) gives matmul_quantized's y bit
    for bit, on every ISA; bad codes and shapes are named."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-1, 2, (50, 512), generator=g, dtype=torch.int8)
    x = torch.randn(19, 512, generator=g)
    try:
        for isa in ternary.supported_isas():
            ternary.set_isa(isa)
            q, xs = ternary.quantize_activations(x)
            want = ternary.TernaryMatrix.from_codes(codes, 0.03).matmul_quantized(q, xs)
            assert torch.equal(ternary.gemm_codes(codes, 0.03, q, xs), want), isa
    finally:
        ternary.set_isa(None)
    with pytest.raises(ValueError, match="q: expected 512 features"):
        ternary.gemm_codes(codes, 0.03, q[:, :256].contiguous(), xs)
    with pytest.raises(ValueError, match="x_scale: expected 19"):
        ternary.gemm_codes(codes, 0.03, q, xs[:5].contiguous())
    bad = codes.clone()
    bad[3, 7] = 2
    with pytest.raises(ValueError, match="not ternary"):
        ternary.gemm_codes(bad, 0.03, q, xs)
