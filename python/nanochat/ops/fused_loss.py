"""Fused linear cross-entropy: the LM head's projection, softmax cross-entropy and its
backward for the main head and every MTP head in one op, chunked over tokens so the full
(tokens, vocab) logits never exist (Liger-Kernel's fused linear CE / Apple's Cut
Cross-Entropy idea; the C++ core in csrc/loss does the work).

    total, per_head = fused_linear_cross_entropy(hidden, weight, targets, head_weights)
    losses = token_losses(hidden, weight, targets, rows)   # per token: (heads, N)

hidden (heads, N, d) float32 (or (N, d) for one head), weight (V, d) (the tied embedding),
targets (heads, N) int (-1 = ignore). per_head[i] is head i's mean cross-entropy over its
non-ignored tokens (0 if it has none), total = sum_i head_weights[i] * per_head[i].

`token_losses` is the same op per token (0 where ignored), for callers that weight the
tokens themselves (Collider, nanochat/train/collider.py): its forward keeps no logits and
no gradients (one GEMM per chunk); its backward runs the chunk loop again with each token's
incoming gradient as its scale (recomputing the chunk's logits: the Cut Cross-Entropy
trade, one GEMM more for no (tokens, vocab) tensor), over the kept rows of a row subset
(nanochat/ops/rows.py) only.

Memory arithmetic (V = 32768, N = 8192, d = 768, fp32): the naive form holds the logits
(N * V * 4 B = 1 GiB), log-softmax (1 GiB) and, in backward, their gradient (1 GiB) per
head. The op holds one chunk of logits (chunk * V * 4 B = 128 MiB at chunk 1024), the
gradients of hidden (heads * N * d) and weight (V * d) it computes in the forward (the
backward only scales them by the incoming gradient: no second pass), and small per-thread
GEMM buffers. `nanochat bench loss` measures both.

Three layers, as every op here: `torch.ops.nanochat.fused_linear_cross_entropy` (a
torch.library custom op with a fake kernel and autograd), the C++ kernel for CPU tensors,
`chunked_linear_cross_entropy` in plain torch (the same chunk loop, cuBLAS GEMMs) for CUDA
and other devices, or csrc/cuda/fused_loss.cu for CUDA tensors with
NANOCHAT_FUSED_LOSS_CUDA=kernel (built when nvcc is found; see cuda_kernel_selected).
`naive_linear_cross_entropy` is the reference the tests and the benchmark compare to.

    pytest tests/test_fused_loss.py
    nanochat bench loss
"""

from __future__ import annotations

import os
import typing

import torch
import torch.nn.functional as F

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.config import FusedLossPrecision
from nanochat.ops.rows import RowSubset, kept, with_rows

DEFAULT_CHUNK = 1024
PRECISIONS = typing.get_args(FusedLossPrecision)  # train.fused_loss_precision's choices


def cuda_kernel_selected() -> bool:
    """CUDA tensors run csrc/cuda/fused_loss.cu when NANOCHAT_FUSED_LOSS_CUDA=kernel (and
    the core was built with nvcc); by default they run chunked_linear_cross_entropy, whose
    per-chunk GEMMs are cuBLAS's: the hand-written CUDA GEMMs are plain shared-memory tiles
    that no GPU run has measured yet."""
    return (os.environ.get("NANOCHAT_FUSED_LOSS_CUDA", "") == "kernel"
            and hasattr(core(), "fused_linear_cross_entropy_cuda"))


def bf16_supported() -> bool:
    """Whether precision="bf16" runs on the active ISA: with AVX512-BF16 (the fast case), on
    the AVX2 f32 tiles over bf16-rounded operands (f32 speed) or the scalar reference; not
    on the AVX-512 kernels of a CPU without AVX512-BF16."""
    return bool(core().fused_loss_bf16_supported())


# ---- the op ------------------------------------------------------------------------------


@torch.library.custom_op("nanochat::fused_linear_cross_entropy", mutates_args=())
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              head_weights: list[float], chunk: int, precision: str, with_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total 0-d, per-head losses (heads,), grad_hidden, grad_weight); the gradients of
    total are computed here when with_grad (else empty) and only scaled in backward."""
    heads, n, d = hidden.shape
    if hidden.device.type == "cuda" and cuda_kernel_selected():
        return _cuda(hidden, weight, targets, head_weights, chunk, with_grad)
    if hidden.device.type != "cpu":
        return chunked_linear_cross_entropy(hidden, weight, targets, head_weights, chunk,
                                            with_grad)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    t32 = targets.to(torch.int32).contiguous()
    hw = torch.tensor(head_weights, dtype=torch.float32)
    loss = torch.empty(heads, dtype=torch.float32)
    gh = torch.empty_like(hidden) if with_grad else hidden.new_empty((0, 0, 0))
    gw = torch.empty_like(weight) if with_grad else weight.new_empty((0, 0))
    total = core().fused_linear_cross_entropy(
        _buf(hidden), _buf(weight), _buf(t32), _buf(hw), _buf(loss),
        _buf(gh) if with_grad else None, _buf(gw) if with_grad else None, chunk, precision)
    return torch.tensor(total, dtype=torch.float32), loss, gh, gw


def _cuda(hidden, weight, targets, head_weights, chunk, with_grad):
    """csrc/cuda/fused_loss.cu: per-token losses reduced here, on the device (no sync)."""
    heads, n, d = hidden.shape
    hidden, weight = hidden.float().contiguous(), weight.float().contiguous()
    t32 = targets.to(torch.int32).contiguous()
    hw = torch.tensor(head_weights, dtype=torch.float32, device=hidden.device)
    count = (t32 >= 0).sum(dim=1).clamp(min=1).float()
    scales = (hw / count).contiguous()
    rows = torch.empty(heads, n, dtype=torch.float32, device=hidden.device)
    work = torch.empty(max(1, min(chunk, n)) * weight.shape[0], dtype=torch.float32,
                       device=hidden.device)
    gh = torch.empty_like(hidden) if with_grad else hidden.new_empty((0, 0, 0))
    gw = torch.empty_like(weight) if with_grad else weight.new_empty((0, 0))
    core().fused_linear_cross_entropy_cuda(
        _buf(hidden), _buf(weight), _buf(t32), _buf(scales), _buf(rows),
        _buf(gh) if with_grad else None, _buf(gw) if with_grad else None, _buf(work), chunk,
        torch.cuda.current_stream(hidden.device).cuda_stream)
    losses = rows.sum(dim=1) / count
    return (losses * hw).sum(), losses, gh, gw


@_fused_op.register_fake
def _(hidden, weight, targets, head_weights, chunk, precision, with_grad):
    torch._check(hidden.dim() == 3 and weight.dim() == 2, lambda: "hidden 3-d, weight 2-d")
    torch._check(hidden.shape[2] == weight.shape[1], lambda: "hidden and weight: d differs")
    torch._check(targets.shape == hidden.shape[:2], lambda: "targets must be (heads, tokens)")
    heads = hidden.shape[0]
    gh = hidden.new_empty(hidden.shape) if with_grad else hidden.new_empty((0, 0, 0))
    gw = weight.new_empty(weight.shape) if with_grad else weight.new_empty((0, 0))
    return hidden.new_empty(()), hidden.new_empty((heads,)), gh, gw


def _setup_context(ctx, inputs, output):
    _, _, gh, gw = output
    ctx.with_grad = inputs[6]
    ctx.mark_non_differentiable(output[1], gh, gw)
    ctx.save_for_backward(gh, gw)


def _backward(ctx, grad_total, _grad_losses, _gh, _gw):
    if not ctx.with_grad:
        raise RuntimeError("fused_linear_cross_entropy: the forward ran with with_grad=False")
    gh, gw = ctx.saved_tensors
    grad_h = gh * grad_total if ctx.needs_input_grad[0] else None
    grad_w = gw * grad_total if ctx.needs_input_grad[1] else None
    return grad_h, grad_w, None, None, None, None, None


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               head_weights=None, chunk: int = DEFAULT_CHUNK,
                               precision: str = "f32") -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per_head losses) of hidden (heads, N, d) or (N, d) against weight (V, d)."""
    if hidden.dim() == 2:
        hidden, targets = hidden[None], targets[None]
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"fused_linear_cross_entropy: hidden (heads, N, d) and targets "
                         f"(heads, N) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"fused_linear_cross_entropy: precision must be one of {PRECISIONS}, "
                         f"got {precision!r}")
    heads = hidden.shape[0]
    head_weights = [1.0] * heads if head_weights is None else [float(w) for w in head_weights]
    if len(head_weights) != heads:
        raise ValueError(f"fused_linear_cross_entropy: {len(head_weights)} head_weights for "
                         f"{heads} heads")
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, per_head, _, _ = torch.ops.nanochat.fused_linear_cross_entropy(
        hidden.float(), weight.float(), targets, head_weights, int(chunk), precision, with_grad)
    return total, per_head


# ---- per token: losses forward, the kept rows' gradients backward -----------------------


@torch.library.custom_op("nanochat::linear_cross_entropy_tokens", mutates_args=())
def _tokens_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
               precision: str) -> torch.Tensor:
    """Per-token cross-entropy (heads, N) of hidden (heads, N, d) against weight (V, d),
    0 where the target is -1. No logits or gradients are kept (the backward recomputes)."""
    return _per_token(hidden, weight, targets, None, None, chunk, precision)[0]


@_tokens_op.register_fake
def _(hidden, weight, targets, chunk, precision):
    torch._check(hidden.dim() == 3 and weight.dim() == 2, lambda: "hidden 3-d, weight 2-d")
    torch._check(targets.shape == hidden.shape[:2], lambda: "targets must be (heads, tokens)")
    return hidden.new_empty(hidden.shape[:2], dtype=torch.float32)


@torch.library.custom_op("nanochat::linear_cross_entropy_tokens_backward", mutates_args=())
def _tokens_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        targets: torch.Tensor, rows: torch.Tensor | None, chunk: int,
                        precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight) of sum(grad * losses) over the token positions `rows`
    (sorted int64; None: all), grad_hidden zero on the others."""
    _, gh, gw = _per_token(hidden, weight, targets, grad, rows, chunk, precision)
    return gh, gw


@_tokens_backward_op.register_fake
def _(grad, hidden, weight, targets, rows, chunk, precision):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


def _per_token(hidden, weight, targets, grad, rows, chunk, precision):
    """(row losses, grad_hidden, grad_weight) on the op's device kernel; the gradients (of
    sum(grad * row losses) over `rows`) only when grad is given."""
    hidden, weight = hidden.float().contiguous(), weight.float().contiguous()
    if grad is not None:
        grad = grad.float().contiguous()
    if hidden.device.type == "cuda" and cuda_kernel_selected():
        return _cuda_per_token(hidden, weight, targets, grad, rows, chunk)
    if hidden.device.type != "cpu":
        with torch.autocast(hidden.device.type, enabled=False):
            _, _, gh, gw, row_loss = _chunked(hidden, weight, targets, [1.0] * hidden.shape[0],
                                              chunk, grad is not None, grad, rows)
        return row_loss, gh, gw
    heads, n, _ = hidden.shape
    t32 = targets.to(torch.int32).contiguous()
    row_loss = torch.empty((heads, n), dtype=torch.float32)
    gh = torch.empty_like(hidden) if grad is not None else None
    gw = torch.empty_like(weight) if grad is not None else None
    # named, not temporaries: a buffer is only an address, the tensor must outlive the call
    head_weights, head_loss = torch.ones(heads), torch.empty(heads)
    rows = None if rows is None else rows.contiguous()
    core().fused_linear_cross_entropy(
        _buf(hidden), _buf(weight), _buf(t32), _buf(head_weights),
        _buf(head_loss), None if gh is None else _buf(gh),
        None if gw is None else _buf(gw), chunk, precision, row_loss=_buf(row_loss),
        row_scale=None if grad is None else _buf(grad),
        rows=None if rows is None else _buf(rows))
    return row_loss, gh, gw


def _cuda_per_token(hidden, weight, targets, grad, rows, chunk):
    """csrc/cuda/fused_loss.cu per token; a row subset is gathered here (the kernel runs
    on consecutive tokens) and grad_hidden scattered back."""
    heads, n, d = hidden.shape
    h, t, g = hidden, targets, grad
    if rows is not None:
        h, t = hidden[:, rows].contiguous(), targets[:, rows]
        g = grad[:, rows].contiguous()
    m = h.shape[1]
    t32 = t.to(torch.int32).contiguous()
    row_loss = torch.empty((heads, m), dtype=torch.float32, device=h.device)
    work = torch.empty(max(1, min(chunk, m)) * weight.shape[0], dtype=torch.float32,
                       device=h.device)
    gh = torch.empty_like(h) if g is not None else None
    gw = torch.empty_like(weight) if g is not None else None
    head_scales = torch.ones(heads, device=h.device)  # unused beside row_scale; outlives the call
    core().fused_linear_cross_entropy_cuda(
        _buf(h), _buf(weight), _buf(t32), _buf(head_scales),
        _buf(row_loss), None if gh is None else _buf(gh), None if gw is None else _buf(gw),
        _buf(work), chunk, torch.cuda.current_stream(h.device).cuda_stream,
        row_scale=None if g is None else _buf(g))
    if rows is not None:
        full = row_loss.new_zeros((heads, n))
        full[:, rows] = row_loss
        row_loss = full
        if gh is not None:
            full = gh.new_zeros((heads, n, d))
            full[:, rows] = gh
            gh = full
    return row_loss, gh, gw


def _tokens_setup(ctx, inputs, output):
    hidden, weight, targets, chunk, precision = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.chunk, ctx.precision = chunk, precision


def _tokens_backward(ctx, grad):
    hidden, weight, targets = ctx.saved_tensors
    gh, gw = torch.ops.nanochat.linear_cross_entropy_tokens_backward(
        grad, hidden, weight, targets, kept(ctx.rows), ctx.chunk, ctx.precision)
    return (gh if ctx.needs_input_grad[0] else None,
            gw if ctx.needs_input_grad[1] else None, None, None, None)


_tokens_with_rows = with_rows(_tokens_op, _tokens_setup, _tokens_backward)


def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 rows: RowSubset | None = None, chunk: int = DEFAULT_CHUNK,
                 precision: str = "f32") -> torch.Tensor:
    """Per-token cross-entropy (heads, N) of hidden (heads, N, d) (or (N, d): then (N,))
    against weight (V, d), 0 where a target is -1; with `rows` (a subset of the N token
    rows) the backward runs on its kept rows only (module doc)."""
    one = hidden.dim() == 2
    if one:
        hidden, targets = hidden[None], targets[None]
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"token_losses: hidden (heads, N, d) and targets (heads, N) expected, "
                         f"got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"token_losses: precision must be one of {PRECISIONS}, got "
                         f"{precision!r}")
    if rows is not None:
        rows.check(hidden.shape[1], "token_losses")
    losses = _tokens_with_rows(rows, hidden.float(), weight.float(), targets, int(chunk),
                               precision)
    return losses[0] if one else losses


# ---- plain torch: the chunked loop (CUDA) and the naive reference -------------------------


def chunked_linear_cross_entropy(hidden, weight, targets, head_weights, chunk, with_grad):
    """The op's algorithm in torch (one chunk of logits at a time, gradients in the forward),
    for tensors the C++ kernel does not take. Same outputs as the op: float32 GEMMs even
    inside the trainer's bf16 autocast, which would otherwise reach these matmuls."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked(hidden, weight, targets, head_weights, chunk, with_grad)[:4]


def _chunked(hidden, weight, targets, head_weights, chunk, with_grad, row_scale=None,
             rows=None):
    """(total, per-head losses, grad_hidden, grad_weight, per-token losses). row_scale
    (heads, N): each token's gradient scale in place of head_weights[i] / n_i; rows: the
    token positions computed (None: all), as the C++ driver's arguments."""
    heads, n, d = hidden.shape
    hidden, weight = hidden.float(), weight.float()
    gh = torch.zeros_like(hidden) if with_grad else hidden.new_empty((0, 0, 0))
    gw = torch.zeros_like(weight) if with_grad else weight.new_empty((0, 0))
    losses = torch.zeros(heads, dtype=torch.float32, device=hidden.device)
    row_loss = torch.zeros((heads, n), dtype=torch.float32, device=hidden.device)
    listed = None
    if rows is not None:
        listed = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        listed[rows] = True
    for i in range(heads):
        valid = targets[i] >= 0
        keep = (valid if listed is None else valid & listed).nonzero()[:, 0]
        if keep.numel() == 0:
            continue
        scale = head_weights[i] / keep.numel()
        total = hidden.new_zeros((), dtype=torch.float64)
        for s in range(0, keep.numel(), chunk):
            r = keep[s:s + chunk]
            h, y = hidden[i, r], targets[i, r].long()
            z = h @ weight.t()  # (c, V)
            lse = torch.logsumexp(z, dim=1)
            tok = lse - z.gather(1, y[:, None])[:, 0]
            row_loss[i, r] = tok
            total += tok.double().sum()
            if with_grad:
                sc = scale if row_scale is None else row_scale[i, r][:, None]
                g = torch.exp(z - lse[:, None]).mul_(sc)
                g[torch.arange(r.numel(), device=g.device), y] -= (
                    scale if row_scale is None else sc[:, 0])
                gh[i, r] = g @ weight
                gw += g.t() @ h
        losses[i] = (total / keep.numel()).float()
    hw = torch.tensor(head_weights, dtype=torch.float32, device=hidden.device)
    return (losses * hw).sum(), losses, gh, gw, row_loss


def naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               head_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: every head's full logits materialized, F.cross_entropy, autograd."""
    if hidden.dim() == 2:
        hidden, targets = hidden[None], targets[None]
    heads = hidden.shape[0]
    head_weights = [1.0] * heads if head_weights is None else list(head_weights)
    losses = []
    for i in range(heads):
        if bool((targets[i] >= 0).any()):
            logits = F.linear(hidden[i], weight).float()
            losses.append(F.cross_entropy(logits, targets[i].long(), ignore_index=-1))
        else:  # nothing to predict: 0, as the fused op (F.cross_entropy would give nan)
            losses.append(hidden.new_zeros((), dtype=torch.float32))
    per_head = torch.stack(losses)
    total = sum(w * loss for w, loss in zip(head_weights, losses))
    return total, per_head
