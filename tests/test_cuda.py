"""CUDA GEMV/GEMM against the CPU scalar kernel (skipped without a GPU build and device).

Both sides compute the exact integer sum sum_k code*q (int32; dp4a on the GPU) and
then the same two float32 products, f32(acc) * (w_scale * x_scale[t]), so results
must be bit-identical: compared with torch.equal, no tolerance.
"""

from __future__ import annotations

import pytest
import torch
from nanochat._core import core
from nanochat.ops import ternary


def _cuda_ready() -> bool:
    try:
        C = core()
        return (torch.cuda.is_available() and hasattr(C, "cuda_ternary_gemm")
                and C.cuda_device_count() > 0)
    except Exception:  # pragma: no cover - a broken driver counts as no GPU
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_ready(),
                       reason="needs torch CUDA, a CUDA build of nanochat._C and a device"),
]

SHAPES = [(1, 256), (5, 512), (100, 1280), (768, 2048)]
TOKENS = [1, 2, 3, 9, 67]


def make(rows, cols, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (rows, cols), dtype=torch.int8, generator=g)
    x = torch.randn(tokens, cols, generator=g)
    return ternary.TernaryMatrix.from_codes(codes, 0.0123 + seed * 1e-4), x


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_cuda_matmul_equals_cpu_scalar(rows, cols):
    ternary.set_isa("scalar")
    for i, tokens in enumerate(TOKENS):
        W, x = make(rows, cols, tokens, seed=i)
        q, s = ternary.quantize_activations(x)
        want = W.matmul_quantized(q, s)
        Wg = W.to("cuda")
        assert Wg.device.startswith("cuda")
        got = Wg.matmul_quantized(q.cuda(), s.cuda())
        assert got.device.type == "cuda" and got.dtype == torch.float32
        got = got.cpu()
        assert torch.equal(got, want), (rows, cols, tokens, (got - want).abs().max())


def test_cuda_extreme_sums():
    """Largest |sum|: q = -128 against all +1 codes (and 127 against -1)."""
    ternary.set_isa("scalar")
    for code, qv in ((1, -128), (-1, 127)):
        W = ternary.TernaryMatrix.from_codes(torch.full((9, 4096), code, dtype=torch.int8), 0.5)
        q = torch.full((3, 4096), qv, dtype=torch.int8)
        s = torch.full((3,), 0.25)
        want = W.matmul_quantized(q, s)
        got = W.to("cuda").matmul_quantized(q.cuda(), s.cuda()).cpu()
        assert torch.equal(got, want)
        assert float(want[0, 0]) == code * qv * 4096 * 0.125


@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_cuda_call_equals_cpu(tokens):
    """W(x) on CUDA quantizes activations in torch with the same float32 ops as the
    C++ quantizer, so the whole BitLinear matches the CPU path bit for bit."""
    ternary.set_isa("scalar")
    W, x = make(100, 1280, tokens, seed=tokens)
    want = W(x)
    got = W.to("cuda")(x.cuda())
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().max()
    v = W.to("cuda")(x[0].cuda())  # GEMV: 1-D in, 1-D out
    assert tuple(v.shape) == (100,)
    assert torch.equal(v.cpu(), want[0])


def test_cuda_matrix_views():
    W, _ = make(5, 512, 1, seed=0)
    Wg = W.to("cuda")
    assert torch.equal(Wg.codes(), W.codes())
    assert torch.equal(Wg.to_tq2_0(), W.to_tq2_0())
    assert torch.equal(Wg.to("cpu").data, W.data)


def test_cuda_cpu_mixing_raises():
    W, x = make(5, 512, 2, seed=1)
    Wg = W.to("cuda")
    q, s = ternary.quantize_activations(x)
    with pytest.raises(ValueError, match=r"weights: expected a CPU buffer, got device cuda"):
        Wg.matmul_quantized(q, s)  # CUDA weights, CPU activations
    with pytest.raises(ValueError, match=r"weights: expected a CUDA buffer, got device cpu"):
        W.matmul_quantized(q.cuda(), s.cuda())  # CPU weights, CUDA activations
    with pytest.raises(ValueError, match=r"x_scale: expected a CUDA buffer, got device cpu"):
        Wg.matmul_quantized(q.cuda(), s)  # one scale vector left behind
    with pytest.raises(ValueError, match=r"(?i)expected a (CPU|CUDA) buffer"):
        Wg(x)  # CPU input to a CUDA matrix
    with pytest.raises(ValueError, match=r"(?i)expected a (CPU|CUDA) buffer"):
        W(x.cuda())  # CUDA input to a CPU matrix
    with pytest.raises(ValueError, match=r"expected a CPU tensor"):
        ternary.quantize_activations(x.cuda())
