"""Row subsets: the rows of a micro-batch's (B, T) token rows that a backward computes.

A `RowSubset` is made for one micro-batch, handed down the forward explicitly (the model
passes it to every layer over those token rows; a layer fed other rows, such as the tokens
gathered for an expert, gets none and stays dense), and kept in the autograd context of
each op it reaches, so the backward reads the subset its own forward was given: two
micro-batches (or two models) in flight at once each keep their own rows. Until `keep` is
called the subset is every row (the dense backward).

    rows = RowSubset((B, T))
    loss = model(x, y, rows=rows)   # forward: ops over the token rows hold `rows`
    rows.keep(mask)                 # the rows the backward computes (after scoring)
    loss.backward()                 # gathered backward (kept rows only)

Collider (nanochat/train/collider.py) is the user: it explains why the dropped rows'
gradients are exactly zero and may be skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RowSubset:
    """The kept rows of one (B, T) micro-batch: every row until `keep` is called."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)
        self.n = math.prod(self.shape)
        self.index: torch.Tensor | None = None  # sorted kept flat row indices (long)

    def keep(self, mask: torch.Tensor) -> None:
        """The rows the backward computes: a bool mask shaped like the micro-batch."""
        if tuple(mask.shape) != self.shape or mask.dtype != torch.bool:
            raise ValueError(f"RowSubset.keep: a bool mask of shape {self.shape} expected, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        self.index = mask.reshape(-1).nonzero().squeeze(1)

    def check(self, n: int, what: str) -> None:
        """Raises unless a layer's n rows are this micro-batch's (B * T) token rows."""
        if n != self.n:
            raise ValueError(f"{what}: {n} rows, but the row subset is over {self.shape} "
                             f"({self.n} rows)")


def kept(rows: RowSubset | None) -> torch.Tensor | None:
    """The kept row indices of `rows`, or None (every row: the dense backward)."""
    return None if rows is None else rows.index


def with_rows(op, setup_context, backward):
    """Registers `op`'s autograd (setup_context, backward; the backward reads the kept rows
    from ctx.rows, None here) and returns call(rows, *args): op(*args) whose backward reads
    `rows` from its own autograd context (the dense op when rows is None). backward returns
    one gradient per op argument."""

    def dense_setup(ctx, inputs, output):
        ctx.rows = None
        setup_context(ctx, inputs, output)

    op.register_autograd(backward, setup_context=dense_setup)

    class WithRows(torch.autograd.Function):  # rows last: needs_input_grad indexes as op's
        @staticmethod
        def forward(*args):
            return op(*args[:-1])

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.rows = inputs[-1]
            setup_context(ctx, inputs[:-1], output)

        @staticmethod
        def backward(ctx, *grads):
            return *backward(ctx, *grads), None

    def call(rows: RowSubset | None, *args):
        return op(*args) if rows is None else WithRows.apply(*args, rows)

    return call


def gather_rows(rows: torch.Tensor | None, *tensors: torch.Tensor):
    """Each tensor (n, ...) cut to `rows`, or unchanged when rows is None."""
    if rows is None:
        return tensors
    return tuple(t.index_select(0, rows) for t in tensors)


def scatter_rows(rows: torch.Tensor | None, n: int, values: torch.Tensor) -> torch.Tensor:
    """values (kept, ...) placed at `rows` of an (n, ...) zero tensor (identity if rows None)."""
    if rows is None:
        return values
    return values.new_zeros((n, *values.shape[1:])).index_copy_(0, rows, values)


class _GatheredLinear(torch.autograd.Function):
    """F.linear(x, w) whose backward runs on the kept rows of `rows` only."""

    @staticmethod
    def forward(ctx, x, w, rows):
        ctx.save_for_backward(x, w)
        ctx.rows = rows
        y = F.linear(x, w)
        ctx.dtype = y.dtype  # the GEMM precision (bf16 under CUDA autocast): backward's too
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        dt, n = ctx.dtype, math.prod(grad_y.shape[:-1])
        rows = kept(ctx.rows)
        g = grad_y.reshape(n, grad_y.shape[-1]).to(dt)  # (N, out)
        g, xr = gather_rows(rows, g, x.reshape(n, x.shape[-1]))
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(rows, n, g @ w.to(dt)).reshape(x.shape).to(x.dtype)  # (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ xr.to(dt)).to(w.dtype)  # (out, kept) @ (kept, in)
        return grad_x, grad_w, None


def linear(x: torch.Tensor, w: torch.Tensor, rows: RowSubset | None = None) -> torch.Tensor:
    """F.linear(x, w) over x (..., in); with `rows` (x's leading dims are its token rows) the
    backward GEMMs run on the kept rows."""
    if rows is None:
        return F.linear(x, w)
    rows.check(math.prod(x.shape[:-1]), "linear")
    return _GatheredLinear.apply(x, w, rows)

