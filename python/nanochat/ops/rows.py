"""Row subsets: layers over a micro-batch's (B, T) token rows whose backward runs on a chosen
subset of the rows (Collider's kept tokens, nanochat/train/collider.py, explains the why).

    with armed((B, T)):      # calls over these token rows are marked in the forward
        loss = ...           # forward
        set_keep(mask)       # the rows the backward computes
        loss.backward()      # gathered backward (kept rows only)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _Rows:
    shape: tuple | None = None  # (B, T) of the armed micro-batch: calls over these rows gather
    keep: torch.Tensor | None = None  # kept flat row indices (long), set after the scoring


_STATE = _Rows()


@contextlib.contextmanager
def armed(shape):
    """Within the block, layer calls whose leading dims equal `shape` (B, T) are token rows
    whose backward gathers the rows given to `set_keep` (dense until it is called)."""
    if _STATE.shape is not None:
        raise RuntimeError("rows.armed: already armed (nested micro-batches?)")
    _STATE.shape, _STATE.keep = tuple(shape), None
    try:
        yield
    finally:
        _STATE.shape, _STATE.keep = None, None


def set_keep(keep: torch.Tensor) -> None:
    """Kept tokens of the armed micro-batch: a bool mask shaped like it (True = kept)."""
    if _STATE.shape is None or tuple(keep.shape) != _STATE.shape:
        raise ValueError(f"rows.set_keep: mask shape {tuple(keep.shape)} does not match "
                         f"the armed micro-batch {_STATE.shape}")
    _STATE.keep = keep.reshape(-1).nonzero().squeeze(1)


def token_rows(x: torch.Tensor) -> bool:
    """Whether a layer input x (..., in) is over the armed micro-batch's token rows."""
    return _STATE.shape is not None and tuple(x.shape[:-1]) == _STATE.shape


def kept_rows(n: int) -> torch.Tensor | None:
    """The kept row indices for a token-row call with n rows, or None (run dense)."""
    if _STATE.keep is None or n != math.prod(_STATE.shape):
        return None
    return _STATE.keep


def gather_rows(n: int, *tensors: torch.Tensor):
    """(rows, gathered tensors): each tensor (n, ...) cut to the kept rows, or unchanged
    with rows None when nothing is selected."""
    rows = kept_rows(n)
    if rows is None:
        return None, tensors
    return rows, tuple(t.index_select(0, rows) for t in tensors)


def scatter_rows(rows: torch.Tensor | None, n: int, values: torch.Tensor) -> torch.Tensor:
    """values (kept, ...) placed at `rows` of an (n, ...) zero tensor (identity if rows None)."""
    if rows is None:
        return values
    return values.new_zeros((n, *values.shape[1:])).index_copy_(0, rows, values)


class _GatheredLinear(torch.autograd.Function):
    """F.linear(x, w) whose backward runs on the kept token rows only (module doc, step 4)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        y = F.linear(x, w)
        ctx.dtype = y.dtype  # the GEMM precision (bf16 under CUDA autocast): backward's too
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        dt, n = ctx.dtype, math.prod(grad_y.shape[:-1])
        g = grad_y.reshape(n, grad_y.shape[-1]).to(dt)  # (N, out)
        rows, (g, xr) = gather_rows(n, g, x.reshape(n, x.shape[-1]))
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(rows, n, g @ w.to(dt)).reshape(x.shape).to(x.dtype)  # (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ xr.to(dt)).to(w.dtype)  # (out, kept) @ (kept, in)
        return grad_x, grad_w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w); over an armed micro-batch's token rows, with the gathered backward."""
    return _GatheredLinear.apply(x, w) if token_rows(x) else F.linear(x, w)


class _TokenLosses(torch.autograd.Function):
    """Per-token cross-entropy of a linear head, F.cross_entropy(x @ w^T, y, reduction="none",
    ignore_index=-1), whose backward forms the logits' gradient softmax - onehot on the kept
    rows only (the dropped ones would multiply a zero incoming gradient over the whole
    vocabulary) and feeds it straight to the two gathered GEMMs."""

    @staticmethod
    def forward(ctx, x, w, y):
        z = F.linear(x, w)  # (N, V), bf16 under CUDA autocast: the GEMMs' precision
        ctx.dtype = z.dtype
        z = z.float()
        lse = torch.logsumexp(z, dim=1)
        valid = y >= 0
        picked = z.gather(1, y.clamp(min=0)[:, None])[:, 0]
        ctx.save_for_backward(x, w, y, z, lse)
        return torch.where(valid, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad):
        x, w, y, z, lse = ctx.saved_tensors
        n = z.shape[0]
        rows = kept_rows(n)  # None outside an armed micro-batch or before set_keep
        g = grad * (y >= 0)
        if rows is not None:  # the kept rows' logits, gathered into a fresh tensor
            x, y, lse, g = (t.index_select(0, rows) for t in (x, y, lse, g))
            p = z.index_select(0, rows).sub_(lse[:, None])
        else:
            p = z - lse[:, None]
        p.exp_()  # softmax, then in place: minus the one-hot target, times the incoming grad
        p[torch.arange(p.shape[0], device=p.device), y.clamp(min=0)] -= 1.0
        p = p.mul_(g[:, None]).to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(rows, n, p @ w.to(ctx.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (p.t() @ x.to(ctx.dtype)).to(w.dtype)
        return grad_x, grad_w, None


def token_losses(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (N,) of the head x (N, d) @ w (V, d)^T against y (N,) (-1:
    ignored, loss 0); over an armed micro-batch's kept rows, the backward runs on those only."""
    return _TokenLosses.apply(x, w, y)
