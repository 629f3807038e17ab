"""torch.library custom ops over the C++ core, with fake (meta) kernels so they
trace under torch.compile and run on FakeTensors.

    torch.ops.nanochat.quantize_activations(x)            -> (q int8, x_scale f32)
    torch.ops.nanochat.ternary_gemm(w, q, x_scale, s)     -> y f32 (tokens, rows)

`w` is TK2 bytes (rows, cols/4) uint8 (see nanochat.ops.ternary.TernaryMatrix). These
are inference kernels on already-quantized values, so they have no autograd
formula; the training layer (BitLinear) differentiates through its float
reference with a straight-through estimator. Tested by tests/test_ops.py
(torch.library.opcheck, torch.compile).
"""

from __future__ import annotations

import torch

from nanochat.ops import ternary


@torch.library.custom_op("nanochat::quantize_activations", mutates_args=())
def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 of a (tokens, features) float32 tensor."""
    if x.device.type == "cpu":
        return ternary.quantize_activations(x.contiguous())
    # Same arithmetic as the core, for CUDA tensors.
    s = 127.0 / x.abs().amax(dim=1).clamp(min=1e-5)
    q = torch.clamp(torch.round(x * s[:, None]), -128, 127).to(torch.int8)
    return q, (1.0 / s).to(torch.float32)


@quantize_activations.register_fake
def _(x):
    torch._check(x.dim() == 2, lambda: f"x: expected 2-d, got {x.dim()}-d")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("nanochat::ternary_gemm", mutates_args=())
def ternary_gemm(
    w: torch.Tensor, q: torch.Tensor, x_scale: torch.Tensor, w_scale: float
) -> torch.Tensor:
    """y = w_scale * x_scale[:, None] * (q @ codes(w)^T), int32 accumulation."""
    W = ternary.TernaryMatrix(w, w.shape[0], w.shape[1] * 4, w_scale)
    return W.matmul_quantized(q.contiguous(), x_scale.contiguous())


@ternary_gemm.register_fake
def _(w, q, x_scale, w_scale):
    torch._check(w.dim() == 2 and q.dim() == 2, lambda: "w and q must be 2-d")
    torch._check(q.shape[1] == w.shape[1] * 4, lambda: "q: features must equal 4 * w.shape[1]")
    return q.new_empty((q.shape[0], w.shape[0]), dtype=torch.float32)
