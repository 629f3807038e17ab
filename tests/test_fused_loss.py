"""The fused linear cross-entropy op (nanochat/ops/fused_loss.py over csrc/loss) against the
naive torch loss: loss and gradients in fp32 with ignore-index targets, chunk-size and ISA
invariance, the bf16 path's error bound, opcheck, the chunked torch path and errors."""

import pytest
import torch
from nanochat.ops import fused_loss, ternary
from nanochat.ops.fused_loss import (
    chunked_linear_cross_entropy,
    fused_linear_cross_entropy,
    naive_linear_cross_entropy,
)


def _problem(heads=3, n=77, d=40, v=333, seed=0, ignore=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(heads, n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.2
    y = torch.randint(0, v, (heads, n), generator=g)
    y[torch.rand(heads, n, generator=g) < ignore] = -1
    y[-1, -5:] = -1  # a head's tail ignored, as the MTP heads' last positions are
    return h, w, y


def _grads(fn, h, w, y, hw, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    total, per_head = fn(h, w, y, hw, **kw)
    total.backward()
    return total.detach(), per_head.detach(), h.grad, w.grad


HW = [1.0, 0.1, 0.05]


def test_matches_naive_torch_fp32():
    h, w, y = _problem()
    ft, fp, fgh, fgw = _grads(fused_linear_cross_entropy, h, w, y, HW, chunk=16)
    nt, np_, ngh, ngw = _grads(naive_linear_cross_entropy, h, w, y, HW)
    torch.testing.assert_close(ft, nt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fp, np_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fgh, ngh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fgw, ngw, rtol=1e-5, atol=1e-7)
    assert fgh[y == -1].abs().max() == 0  # ignored tokens get exactly no gradient


def test_chunk_size_does_not_change_results():
    h, w, y = _problem(seed=1)
    base = _grads(fused_linear_cross_entropy, h, w, y, HW, chunk=4096)
    for chunk in (1, 5, 32):
        r = _grads(fused_linear_cross_entropy, h, w, y, HW, chunk=chunk)
        assert torch.equal(r[1], base[1])  # per-row losses do not depend on the chunk
        assert torch.equal(r[2], base[2])
        torch.testing.assert_close(r[3], base[3], rtol=1e-5, atol=1e-7)


def test_every_isa_agrees():
    h, w, y = _problem(seed=2)
    ref = _grads(fused_linear_cross_entropy, h, w, y, HW)
    try:
        for isa in ternary.supported_isas():
            ternary.set_isa(isa)
            r = _grads(fused_linear_cross_entropy, h, w, y, HW)
            for a, b in zip(r, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        ternary.set_isa(None)


def test_grad_output_scales_the_gradients():
    h, w, y = _problem(seed=3)
    h1 = h.clone().requires_grad_()
    total, _ = fused_linear_cross_entropy(h1, w, y, HW)
    (3.0 * total).backward()
    _, _, gh, _ = _grads(fused_linear_cross_entropy, h, w, y, HW)
    torch.testing.assert_close(h1.grad, 3.0 * gh)


def test_no_grad_forward_equals_grad_forward():
    h, w, y = _problem(seed=4)
    with torch.no_grad():
        t0, p0 = fused_linear_cross_entropy(h, w, y, HW)
    t1, p1, _, _ = _grads(fused_linear_cross_entropy, h, w, y, HW)
    assert torch.equal(p0, p1) and torch.equal(t0, t1)


def test_head_with_no_targets_is_zero():
    h, w, y = _problem(heads=2, seed=5)
    y[1] = -1
    t, p, gh, _ = _grads(fused_linear_cross_entropy, h, w, y, [1.0, 1.0])
    assert p[1] == 0 and gh[1].abs().max() == 0
    nt, _, ngh, _ = _grads(naive_linear_cross_entropy, h, w, y, [1.0, 1.0])
    torch.testing.assert_close(t, nt)
    torch.testing.assert_close(gh, ngh)


def test_bf16_within_its_error_bound(isa):
    """On every ISA that takes bf16: AVX512-BF16, AVX2 (f32 tiles, rounded operands), scalar."""
    if not fused_loss.bf16_supported():
        pytest.skip(f"{isa}: bf16 needs AVX512-BF16 on the AVX-512 kernels")
    h, w, y = _problem(heads=2, n=64, d=96, v=500, seed=6)
    f = _grads(fused_linear_cross_entropy, h, w, y, [1.0, 0.5])
    b = _grads(fused_linear_cross_entropy, h, w, y, [1.0, 0.5], precision="bf16")
    # bf16 operands (8-bit mantissa, relative rounding <= 2^-9), f32 accumulation
    assert (b[1] - f[1]).abs().max() < 5e-3
    assert (b[3] - f[3]).abs().max() < 0.02 * f[3].abs().max()
    assert (b[3] - f[3]).abs().max() > 0  # it really ran in bf16


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_torch_path_equals_the_op(autocast):
    """Also inside bf16 autocast, as CUDA training calls it: its GEMMs stay float32."""
    h, w, y = _problem(seed=7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, per_head, gh, gw = chunked_linear_cross_entropy(h, w, y, HW, 16, True)
    r = _grads(fused_linear_cross_entropy, h, w, y, HW)
    torch.testing.assert_close(per_head, r[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, r[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, r[3], rtol=1e-5, atol=1e-7)


def test_opcheck():
    h, w, y = _problem(heads=2, n=20, d=16, v=50, seed=8)
    for with_grad in (False, True):  # without with_grad there is no backward to check
        args = (h.clone().requires_grad_(with_grad), w.clone().requires_grad_(with_grad), y,
                [1.0, 0.5], 8, "f32", with_grad)
        torch.library.opcheck(torch.ops.nanochat.fused_linear_cross_entropy.default, args)


def test_errors_name_the_argument():
    h, w, y = _problem(heads=1, n=8, d=8, v=10)
    y[0, 3] = 10
    with pytest.raises(ValueError, match=r"targets\[0, 3\] = 10"):
        fused_linear_cross_entropy(h, w, y)
    with pytest.raises(ValueError, match="precision"):
        fused_linear_cross_entropy(h, w, y.clamp(max=9), precision="fp8")
    with pytest.raises(ValueError, match="head_weights"):
        fused_linear_cross_entropy(h, w, y.clamp(max=9), [1.0, 2.0])
    with pytest.raises(ValueError, match="last dimension"):
        fused_linear_cross_entropy(h, w[:, :4], y.clamp(max=9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("impl", ["", "kernel"])  # chunked torch (cuBLAS), csrc/cuda
def test_cuda_matches_cpu(impl, monkeypatch):
    monkeypatch.setenv("NANOCHAT_FUSED_LOSS_CUDA", impl)
    if impl and not fused_loss.cuda_kernel_selected():
        pytest.skip("core built without nvcc")
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, y = _problem(seed=9)
    cpu = _grads(fused_linear_cross_entropy, h, w, y, HW)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as the trainer calls it
        gpu = _grads(fused_linear_cross_entropy, h.cuda(), w.cuda(), y.cuda(), HW)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
