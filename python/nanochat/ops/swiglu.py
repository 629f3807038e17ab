"""SwiGLU's gating, silu(gate) * up, as one C++ pass per direction (csrc/act/swiglu.cpp).

Autograd runs silu, a multiply and their two backward kernels and saves silu's output on
top of gate and up; `nanochat::swiglu` reads and writes each element once per direction
and saves only gate and up. Inside a Collider micro-batch (nanochat/train/collider.py) its
backward runs over the kept token rows only (the others' incoming gradient is zero).

`swiglu` takes the op for float32 CPU tensors and falls back to F.silu(gate) * up elsewhere
(CUDA, bf16 autocast, float64 references), or everywhere with NANOCHAT_SWIGLU=torch
(`nanochat bench train --compare fused` times the two, with the RMSNorm op). Results equal
torch's up to float rounding (tests/test_swiglu.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.ops import rows as row_subset


@torch.library.custom_op("nanochat::swiglu", mutates_args=(), device_types="cpu")
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, token_rows: bool = False) -> torch.Tensor:
    """silu(gate) * up for (rows, dim) float32; token_rows marks the rows as a Collider
    micro-batch's tokens (backward: kept rows only)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    core().swiglu_forward(_buf(gate), _buf(up), _buf(out))
    return out


@_swiglu_op.register_fake
def _(gate, up, token_rows=False):
    torch._check(gate.dim() == 2 and gate.shape == up.shape, lambda: "gate, up: same 2-d shape")
    return gate.new_empty(gate.shape)


@torch.library.custom_op("nanochat::swiglu_backward", mutates_args=(), device_types="cpu")
def _swiglu_backward_op(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up); keep: sorted kept row indices (int64), or None for all rows."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    gg, gu = torch.empty_like(gate), torch.empty_like(up)
    core().swiglu_backward(_buf(grad_out), _buf(gate), _buf(up),
                           None if keep is None else _buf(keep.contiguous()), _buf(gg), _buf(gu))
    return gg, gu


@_swiglu_backward_op.register_fake
def _(grad_out, gate, up, keep):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, token_rows = inputs
    ctx.save_for_backward(gate, up)
    ctx.token_rows = token_rows


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    keep = row_subset.kept_rows(gate.shape[0]) if ctx.token_rows else None
    gg, gu = torch.ops.nanochat.swiglu_backward(grad_out.float(), gate, up, keep)
    return (gg if ctx.needs_input_grad[0] else None,
            gu if ctx.needs_input_grad[1] else None, None)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the C++ op runs this call: float32 CPU tensors of one shape outside autocast,
    unless NANOCHAT_SWIGLU=torch."""
    return (os.environ.get("NANOCHAT_SWIGLU", "cpp") != "torch"
            and gate.device.type == "cpu" and up.device.type == "cpu"
            and gate.dtype == torch.float32 and up.dtype == torch.float32
            and gate.shape == up.shape and gate.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up."""
    if not applies(gate, up):
        return F.silu(gate) * up
    lead = gate.shape[:-1]
    out = torch.ops.nanochat.swiglu(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]),
                                    row_subset.token_rows(gate))
    return out.reshape(*lead, gate.shape[-1])
