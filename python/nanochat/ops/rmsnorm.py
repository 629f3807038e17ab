"""RMSNorm as one C++ pass per direction (csrc/norm/rmsnorm.cpp), a torch custom op.

    y = x / sqrt(mean(x^2) + eps) * weight        (torch.nn.functional.rms_norm)

Autograd's RMSNorm runs half a dozen element-wise kernels forward and more backward; a
training step of `tiny` has 21 norms. `nanochat::rms_norm` reads and writes each row once
per direction and saves the per-row 1/rms for the backward. Inside a Collider micro-batch
(nanochat/train/collider.py) the backward runs over the kept token rows only: the others' incoming
gradient is zero, so their input gradient is zero and they add nothing to the weight's.

`rms_norm` takes the op for float32 CPU tensors and falls back to F.rms_norm elsewhere
(CUDA, bf16 autocast, float64 references), or everywhere with NANOCHAT_RMSNORM=torch
(`nanochat bench train --compare fused` times the two). Results equal F.rms_norm up to
float rounding (tests/test_rmsnorm.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.ops import rows as row_subset


@torch.library.custom_op("nanochat::rms_norm", mutates_args=(), device_types="cpu")
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, token_rows: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for x (rows, dim) float32; rstd (rows,) is 1/rms, saved for the backward.
    token_rows marks x's rows as a Collider micro-batch's tokens (backward: kept rows)."""
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    rstd = x.new_empty(x.shape[0])
    core().rms_norm_forward(_buf(x), _buf(weight), eps, _buf(y), _buf(rstd))
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, token_rows=False):
    torch._check(x.dim() == 2 and weight.dim() == 1, lambda: "x 2-d, weight 1-d")
    torch._check(x.shape[1] == weight.shape[0], lambda: "x and weight: dim differs")
    return x.new_empty(x.shape), x.new_empty((x.shape[0],))


@torch.library.custom_op("nanochat::rms_norm_backward", mutates_args=(), device_types="cpu")
def _rms_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor, keep: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight); keep: sorted kept row indices (int64), or None for all rows."""
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    gx = torch.empty_like(x)
    gw = torch.empty_like(weight)
    core().rms_norm_backward(_buf(grad_y), _buf(x), _buf(weight), _buf(rstd),
                             None if keep is None else _buf(keep.contiguous()), _buf(gx),
                             _buf(gw))
    return gx, gw


@_rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd, keep):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _, token_rows = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.token_rows = token_rows
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    keep = row_subset.kept_rows(x.shape[0]) if ctx.token_rows else None
    gx, gw = torch.ops.nanochat.rms_norm_backward(grad_y.float(), x, weight, rstd, keep)
    return (gx if ctx.needs_input_grad[0] else None,
            gw if ctx.needs_input_grad[1] else None, None, None)


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ op runs this call: float32 CPU tensors outside autocast, unless
    NANOCHAT_RMSNORM=torch."""
    return (os.environ.get("NANOCHAT_RMSNORM", "cpp") != "torch"
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and x.numel() > 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (dim,), weight, eps) over the last dimension."""
    if not applies(x, weight):
        # the weight in x's dtype: under bf16 autocast torch's fused kernel needs both alike
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    lead = x.shape[:-1]
    y, _ = torch.ops.nanochat.rms_norm(x.reshape(-1, x.shape[-1]), weight, float(eps),
                                       row_subset.token_rows(x))
    return y.reshape(*lead, x.shape[-1])
