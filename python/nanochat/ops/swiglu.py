"""SwiGLU's gating, silu(gate) * up, as one C++ pass per direction (csrc/act/swiglu.cpp).

Autograd runs silu, a multiply and their two backward kernels and saves silu's output on
top of gate and up; `nanochat::swiglu` reads and writes each element once per direction
and saves only gate and up. Given a row subset (nanochat/ops/rows.py: Collider's kept
tokens) its backward runs over the kept rows only (the others' incoming gradient is zero).

One op in the convention of nanochat/ops/rmsnorm.py: a pure-torch default on every device
and dtype, the C++ kernel registered for the CPU (float32; other dtypes go to the default);
a model's plain-torch baseline (F.silu(gate) * up and autograd: `nanochat bench train
--compare fused`) is chosen when the model is built. Results equal torch's up to float
rounding (tests/test_swiglu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.ops.rows import RowSubset, kept, with_rows


def _torch_backward(grad_out, gate, up, keep):
    """silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g); only the kept rows with a subset."""
    gg, gu = torch.zeros_like(gate), torch.zeros_like(up)
    rows = slice(None) if keep is None else keep
    ct = torch.promote_types(gate.dtype, torch.float32)  # float64 stays float64
    g, u, go = gate[rows].to(ct), up[rows].to(ct), grad_out[rows].to(ct)
    s = torch.sigmoid(g)
    gg[rows] = (go * u * s * (1 + g * (1 - s))).to(gate.dtype)
    gu[rows] = (go * g * s).to(up.dtype)
    return gg, gu


def _native(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.dtype == up.dtype == torch.float32 and gate.numel() > 0


@torch.library.custom_op("nanochat::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for (rows, dim); this body is the default on every device."""
    return F.silu(gate) * up


@_swiglu_op.register_kernel("cpu")
def _(gate, up):
    if not _native(gate, up):
        return F.silu(gate) * up
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    core().swiglu_forward(_buf(gate), _buf(up), _buf(out))
    return out


@_swiglu_op.register_fake
def _(gate, up):
    torch._check(gate.dim() == 2 and gate.shape == up.shape, lambda: "gate, up: same 2-d shape")
    return gate.new_empty(gate.shape)


@torch.library.custom_op("nanochat::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up); keep: sorted kept row indices (int64), or None for all rows."""
    return _torch_backward(grad_out, gate, up, keep)


@_swiglu_backward_op.register_kernel("cpu")
def _(grad_out, gate, up, keep):
    if not _native(gate, up):
        return _torch_backward(grad_out, gate, up, keep)
    grad_out, gate, up = grad_out.float().contiguous(), gate.contiguous(), up.contiguous()
    gg, gu = torch.empty_like(gate), torch.empty_like(up)
    core().swiglu_backward(_buf(grad_out), _buf(gate), _buf(up),
                           None if keep is None else _buf(keep.contiguous()), _buf(gg), _buf(gu))
    return gg, gu


@_swiglu_backward_op.register_fake
def _(grad_out, gate, up, keep):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    gg, gu = torch.ops.nanochat.swiglu_backward(grad_out, gate, up, kept(ctx.rows))
    return (gg if ctx.needs_input_grad[0] else None,
            gu if ctx.needs_input_grad[1] else None)


_swiglu_with_rows = with_rows(_swiglu_op, _setup_context, _backward)


def swiglu(gate: torch.Tensor, up: torch.Tensor, rows: RowSubset | None = None) -> torch.Tensor:
    """F.silu(gate) * up. rows: the leading dims are its token rows, and the C++ op's
    backward runs on the kept ones."""
    lead = gate.shape[:-1]
    g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    if rows is not None:
        rows.check(g2.shape[0], "swiglu")
    out = _swiglu_with_rows(rows, g2, u2)
    return out.reshape(*lead, gate.shape[-1])
