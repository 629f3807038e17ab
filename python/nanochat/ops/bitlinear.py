"""BitLinear: the BitNet b1.58 (W1.58 A8) linear layer used for every matrix in a block.

Forward semantics (both kernel paths):

    s  = max(mean|W|, 1e-5)                       one scale per tensor, recomputed every call
    Wq = clamp(round(W / s), -1, 1)               ternary codes
    a  = 127 / max(max|x|, 1e-5)                  one scale per token (last dim)
    xq = clamp(round(x * a), -128, 127)           int8 codes
    y  = (xq / a) @ (Wq * s)^T

Backward is the straight-through estimator for both quantizers: grad_x = grad_y @ (Wq * s)
and grad_W = grad_y^T @ (xq / a) (the gradient wrt the dequantized weight passes through to
the latent fp32 weight unchanged; no gradient flows through s or a).

Two paths with the same semantics:
  "torch": pure torch, STE written as `x + (q(x) - x).detach()` (the textbook form). Runs
           anywhere (CPU, CUDA, meta) and for any in_features.
  "cpp":   the custom op `nanochat::bitlinear`: weight codes in torch; per-token int8
           activations and the ternary GEMM straight from the int8 codes (int32
           accumulation, ternary.gemm_codes) in the C++ core; the backward is two float
           matmuls on the saved int8 codes. CPU, float32, and in_features % 256 == 0
           only. It saves int8 activations for backward (1 byte per element instead of
           the 4 the torch path keeps).
  "auto":  cpp where it applies, the active ISA has a vector kernel for the codes GEMM
           (FAST_ISAS: x86 from AVX2 up; on the scalar reference the C++ layer is slower
           than torch's) and the call multiplies >= AUTO_MIN_MACS (tokens x weights;
           smaller calls are faster in torch), else torch; inside frozen() cpp wherever
           it applies.

The paths agree to float rounding: the C++ core dequantizes with float(int32 acc) * (s * 1/a)
where torch sums float products (xq / a) * (Wq * s); tests/test_bitlinear.py measures it.

Backward precision of the C++ path (`backward_precision=`): "float32" runs the two backward GEMMs in
f32 like the torch path; "bf16" feeds them bf16 operands, where the ternary codes and the
int8 activation codes are exact and only grad_y (times 1/a) is rounded (relative error
<= 2^-9 per element, the precision bf16 autocast training runs every GEMM at), with the
product rounded to bf16 on output; oneDNN runs these at ~2x the f32 rate on CPUs with
AVX512-BF16 or AMX. "auto" (default) picks bf16 on such CPUs and float32 elsewhere. The bf16
operands are gathered (Collider's kept rows) and cast in one C++ pass, and grad_x scaled
and scattered back in another (csrc/rows/bf16_rows.h), bit-identical to the torch casts.

    pytest tests/test_bitlinear.py
"""

from __future__ import annotations

import functools

import torch

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.ops import rows as row_subset
from nanochat.ops import ternary

KERNELS = ("auto", "cpp", "torch")
BACKWARDS = ("auto", "bf16", "float32")
AUTO_MIN_MACS = 1 << 25  # "auto" trains on the C++ path from this much work per call up
# ISAs whose codes GEMM (csrc/ternary/gemm.cpp: the x86 panel kernels) makes the C++ layer
# beat torch's from AUTO_MIN_MACS up (`nanochat bench kernels --isa avx2`, op "layer"); on
# the others (the scalar reference) it loses to torch at every size, so "auto" runs torch.
# ARM's panel kernels (neon, neon_dotprod: csrc/ternary/panels_neon*.cpp) are tested for
# agreement under qemu but their speed against torch has not been measured on an ARM machine,
# so "auto" keeps torch there; kernel="cpp" runs them.
FAST_ISAS = ("avx2", "avx_vnni", "avx512", "avx512_vnni")
EPS = 1e-5


# ---- quantizers (shared by both paths, so the codes match exactly) ----------------------


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary codes (as w's dtype, values in {-1, 0, 1}) and the scale (0-d)."""
    s = w.abs().mean().clamp(min=EPS)
    return (w / s).round_().clamp_(-1, 1), s  # in place on the quotient: one buffer, not three


def weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The int8 codes and float scale a trained BitLinear weight exports as (no grad)."""
    with torch.no_grad():
        codes, s = quantize_weight(w.float())
    return codes.to(torch.int8), float(s)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """a = 127 / max|x| per token, (..., 1). A true division, as in the C++ core
    (torch's `127.0 / t` is `t.reciprocal() * 127`: two roundings, different codes)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return torch.full_like(amax, 127.0) / amax


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (as x's dtype) and the scale a (..., 1): x ~= codes / a."""
    a = activation_scale(x)
    return (x * a).round().clamp(-128, 127), a


# ---- the pure-torch reference -----------------------------------------------------------


def bitlinear_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = STE(q(x)) @ STE(q(W))^T for x (..., in), weight (out, in). Over a Collider
    micro-batch's token rows the backward GEMMs run on the kept rows (nanochat/train/collider.py)."""
    codes, s = quantize_weight(weight.detach())  # detached: no graph for the quantizers
    w = weight + (codes * s - weight).detach()
    xq, a = quantize_activations(x.detach())
    x = x + (xq / a - x).detach()
    return row_subset.linear(x, w)


# ---- the C++ path: a custom op with a fake kernel and an STE autograd formula -----------


@functools.lru_cache(maxsize=None)
def _cpu_multiplies_bf16() -> bool:
    feats = core().info()["features"]
    return bool(feats.get("avx512_bf16") or feats.get("amx_bf16"))


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 GEMMs beat f32 ones here: the CPU multiplies bf16 in hardware
    (AVX512-BF16 or AMX) and the active kernel ISA is an AVX-512 one. Pinning a lower ISA
    (NANOCHAT_ISA=avx2, set_isa) makes this False as on a CPU without them (Zen 2/3: bf16 is
    emulated there, slower than f32)."""
    return _cpu_multiplies_bf16() and core().active_isa().startswith("avx512")


def resolve_backward(backward: str) -> bool:
    """True when the C++ path's backward GEMMs run in bf16 for this `backward` setting."""
    if backward not in BACKWARDS:
        raise ValueError(f"BitLinear backward must be one of {BACKWARDS}, got {backward!r}")
    return backward == "bf16" or (backward == "auto" and cpu_has_fast_bf16())


@torch.library.custom_op("nanochat::bitlinear", mutates_args=(), device_types="cpu")
def _bitlinear_op(
    x: torch.Tensor, weight: torch.Tensor, bf16_backward: bool = False, token_rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, weight codes int8, weight scale 0-d, activation codes int8, 1/a per token).

    Only y is differentiable; the rest are saved for the backward (and are what the
    exporter would store). bf16_backward picks the backward GEMM precision (module doc);
    token_rows marks x's rows as a Collider micro-batch's tokens, whose backward GEMMs run
    on the kept rows only (nanochat/train/collider.py)."""
    codes_f, s = quantize_weight(weight)
    codes = codes_f.to(torch.int8)
    q, x_scale = ternary.quantize_activations(x.contiguous())
    y = ternary.gemm_codes(codes, float(s), q, x_scale)
    return y, codes, s.clone(), q, x_scale


@_bitlinear_op.register_fake
def _(x, weight, bf16_backward=False, token_rows=False):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-d")
    torch._check(x.shape[1] == weight.shape[1], lambda: "x and weight: in_features differ")
    n, k = x.shape
    m = weight.shape[0]
    return (
        x.new_empty((n, m)),
        weight.new_empty((m, k), dtype=torch.int8),
        weight.new_empty(()),
        x.new_empty((n, k), dtype=torch.int8),
        x.new_empty((n,)),
    )


def _setup_context(ctx, inputs, output):
    _, codes, s, q, x_scale = output
    ctx.mark_non_differentiable(codes, s, q, x_scale)
    ctx.save_for_backward(codes, s, q, x_scale)
    ctx.bf16 = len(inputs) > 2 and bool(inputs[2])
    ctx.token_rows = len(inputs) > 3 and bool(inputs[3])


@torch.library.custom_op("nanochat::bitlinear_backward_operands", mutates_args=(),
                         device_types="cpu")
def _operands_op(grad_y: torch.Tensor, q: torch.Tensor, x_scale: torch.Tensor,
                 rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 operands of the backward GEMMs over `rows` (sorted int64; None: all rows):
    (grad_y, grad_y * x_scale per row, q), in one pass (csrc/rows/bf16_rows.h)."""
    grad_y, q, x_scale = grad_y.contiguous(), q.contiguous(), x_scale.contiguous()
    n = grad_y.shape[0] if rows is None else rows.shape[0]
    bf = torch.bfloat16
    g = grad_y.new_empty((n, grad_y.shape[1]), dtype=bf)
    gs, qb = torch.empty_like(g), q.new_empty((n, q.shape[1]), dtype=bf)
    core().gather_backward_operands(_buf(grad_y), _buf(q), _buf(x_scale),
                                    None if rows is None else _buf(rows.contiguous()),
                                    _buf(g), _buf(gs), _buf(qb))
    return g, gs, qb


@_operands_op.register_fake
def _(grad_y, q, x_scale, rows):
    n = grad_y.shape[0] if rows is None else rows.shape[0]
    g = grad_y.new_empty((n, grad_y.shape[1]), dtype=torch.bfloat16)
    return g, torch.empty_like(g), q.new_empty((n, q.shape[1]), dtype=torch.bfloat16)


@torch.library.custom_op("nanochat::scatter_scaled_rows", mutates_args=(), device_types="cpu")
def _scatter_op(src: torch.Tensor, rows: torch.Tensor | None, total: int,
                scale: torch.Tensor) -> torch.Tensor:
    """(total, cols) float32: src (bf16) times scale (0-d) at `rows` (None: every row),
    zero elsewhere, in one pass."""
    out = src.new_empty((total, src.shape[1]), dtype=torch.float32)
    core().scatter_scaled_rows(_buf(src.contiguous()),
                               None if rows is None else _buf(rows.contiguous()),
                               float(scale), _buf(out))
    return out


@_scatter_op.register_fake
def _(src, rows, total, scale):
    return src.new_empty((total, src.shape[1]), dtype=torch.float32)


def _backward(ctx, grad_y, *_unused):
    codes, s, q, x_scale = ctx.saved_tensors
    n = grad_y.shape[0]
    # Collider: both GEMMs on the kept rows only, grad_x zero on the others
    rows = row_subset.kept_rows(n) if ctx.token_rows else None
    grad_x = grad_w = None
    if ctx.bf16:  # codes and q are exact in bf16; only grad_y (times 1/a) is rounded
        g, gs, qb = torch.ops.nanochat.bitlinear_backward_operands(grad_y.float(), q, x_scale,
                                                                   rows)
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.nanochat.scatter_scaled_rows(g @ codes.to(torch.bfloat16), rows,
                                                            n, s)
        if ctx.needs_input_grad[1]:
            grad_w = (gs.t() @ qb).to(grad_y.dtype)
        return grad_x, grad_w, None, None
    if rows is not None:
        grad_y, q, x_scale = (t.index_select(0, rows) for t in (grad_y, q, x_scale))
    # int8 codes times a float32 tensor promote to float32 in one pass (no separate cast)
    if ctx.needs_input_grad[0]:
        grad_x = row_subset.scatter_rows(rows, n, grad_y @ (codes * s))
    if ctx.needs_input_grad[1]:
        grad_w = grad_y.t() @ (q * x_scale[:, None])  # (out, N) @ (N, in)
    return grad_x, grad_w, None, None


_bitlinear_op.register_autograd(_backward, setup_context=_setup_context)


def bitlinear_cpp(x: torch.Tensor, weight: torch.Tensor,
                  bf16_backward: bool = False) -> torch.Tensor:
    """y for x (..., in) float32 CPU and weight (out, in) with in % 256 == 0."""
    lead = x.shape[:-1]
    y = torch.ops.nanochat.bitlinear(x.reshape(-1, x.shape[-1]), weight, bf16_backward,
                                     row_subset.token_rows(x))[0]
    return y.reshape(*lead, weight.shape[0])


def fast_isa() -> bool:
    """Whether the active kernel ISA is one where "auto" trains on the C++ path (FAST_ISAS)."""
    return ternary.active_isa() in FAST_ISAS


def cpp_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ path can run this call (what kernel="auto" picks it by)."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.shape[1] % ternary.QK == 0
    )
