"""RMSNorm as one C++ pass per direction (csrc/norm/rmsnorm.cpp), a torch custom op.

    y = x / sqrt(mean(x^2) + eps) * weight        (torch.nn.functional.rms_norm)

Autograd's RMSNorm runs half a dozen element-wise kernels forward and more backward; a
training step of `tiny` has 21 norms. `nanochat::rms_norm` reads and writes each row once
per direction and saves the per-row 1/rms for the backward. Given a row subset
(nanochat/ops/rows.py: Collider's kept tokens) the backward runs over its kept rows only: the
others' incoming gradient is zero, so their input gradient is zero and they add nothing to
the weight's.

One op, the convention of every op here (bitsandbytes' too): a schema with a fake kernel, a
pure-torch default that runs on any device and dtype, and the native C++ kernel registered
for the CPU, which takes float32 and hands other dtypes (bf16 autocast, float64 references)
to the default. Which one runs is the dispatcher's choice, from the tensors' device; a
model's plain-torch baseline (F.rms_norm and autograd, no op at all: `nanochat bench train
--compare fused`) is chosen when the model is built (nanochat/model/build.py, `ops`). Results
equal F.rms_norm up to float rounding (tests/test_rmsnorm.py).
"""

from __future__ import annotations

import torch

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.ops.rows import RowSubset, kept, with_rows


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/f16 activations, float64 for float64 references."""
    return torch.promote_types(x.dtype, torch.float32)


def _torch_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    xf = x.to(_compute_dtype(x))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return (xf * rstd[:, None] * weight.to(xf.dtype)).to(x.dtype), rstd


def _torch_backward(grad_y, x, weight, rstd, keep):
    """The C++ backward's math: grad_x = rstd (w gy - x rstd^2 mean(w gy x)), grad_w the sum
    of gy x rstd over the rows; only the kept rows with a subset (the rest stay zero)."""
    gx = torch.zeros_like(x)
    rows = slice(None) if keep is None else keep
    ct = _compute_dtype(x)
    xf, gy, r = x[rows].to(ct), grad_y[rows].to(ct), rstd[rows][:, None].to(ct)
    wg = weight.to(ct) * gy
    gx[rows] = (r * (wg - xf * r.square() * (wg * xf).mean(-1, keepdim=True))).to(x.dtype)
    return gx, (gy * xf * r).sum(0).to(weight.dtype)


def _native(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype == torch.float32 and x.numel() > 0


@torch.library.custom_op("nanochat::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for x (rows, dim); rstd (rows,) is 1/rms (float32, float64 for float64 x),
    saved for the backward.
    This body is the default on every device; the CPU kernel is below."""
    return _torch_forward(x, weight, eps)


@_rms_norm_op.register_kernel("cpu")
def _(x, weight, eps):
    if not _native(x, weight):
        return _torch_forward(x, weight, eps)
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    rstd = x.new_empty(x.shape[0])
    core().rms_norm_forward(_buf(x), _buf(weight), eps, _buf(y), _buf(rstd))
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    torch._check(x.dim() == 2 and weight.dim() == 1, lambda: "x 2-d, weight 1-d")
    torch._check(x.shape[1] == weight.shape[0], lambda: "x and weight: dim differs")
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=_compute_dtype(x))


@torch.library.custom_op("nanochat::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor, keep: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight); keep: sorted kept row indices (int64), or None for all rows."""
    return _torch_backward(grad_y, x, weight, rstd, keep)


@_rms_norm_backward_op.register_kernel("cpu")
def _(grad_y, x, weight, rstd, keep):
    if not _native(x, weight):
        return _torch_backward(grad_y, x, weight, rstd, keep)
    grad_y, x, weight = grad_y.float().contiguous(), x.contiguous(), weight.contiguous()
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
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    gx, gw = torch.ops.nanochat.rms_norm_backward(grad_y, x, weight, rstd,
                                                  kept(ctx.rows))
    return (gx if ctx.needs_input_grad[0] else None,
            gw if ctx.needs_input_grad[1] else None, None)


_rms_norm_with_rows = with_rows(_rms_norm_op, _setup_context, _backward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             rows: RowSubset | None = None) -> torch.Tensor:
    """F.rms_norm(x, (dim,), weight, eps) over the last dimension. rows: x's leading dims
    are its token rows, and the C++ op's backward runs on the kept ones."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if rows is not None:
        rows.check(x2.shape[0], "rms_norm")
    y, _ = _rms_norm_with_rows(rows, x2, weight, float(eps))
    return y.reshape(*lead, x.shape[-1])
