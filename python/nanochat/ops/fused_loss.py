"""Fused linear cross-entropy: the LM head's projection, softmax cross-entropy and its
backward for the main head and every MTP head in one op, chunked over tokens so the full
(tokens, vocab) logits never exist (Liger-Kernel's fused linear CE / Apple's Cut
Cross-Entropy idea; the C++ core in csrc/loss does the work).

    total, per_head = fused_linear_cross_entropy(hidden, weight, targets, head_weights)

hidden (heads, N, d) float32 (or (N, d) for one head), weight (V, d) (the tied embedding),
targets (heads, N) int (-1 = ignore). per_head[i] is head i's mean cross-entropy over its
non-ignored tokens (0 if it has none), total = sum_i head_weights[i] * per_head[i].

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

import torch
import torch.nn.functional as F

from nanochat._core import buffer as _buf
from nanochat._core import core

DEFAULT_CHUNK = 1024
PRECISIONS = ("f32", "bf16")


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


# ---- plain torch: the chunked loop (CUDA) and the naive reference -------------------------


def chunked_linear_cross_entropy(hidden, weight, targets, head_weights, chunk, with_grad):
    """The op's algorithm in torch (one chunk of logits at a time, gradients in the forward),
    for tensors the C++ kernel does not take. Same outputs as the op: float32 GEMMs even
    inside the trainer's bf16 autocast, which would otherwise reach these matmuls."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked(hidden, weight, targets, head_weights, chunk, with_grad)


def _chunked(hidden, weight, targets, head_weights, chunk, with_grad):
    heads, n, d = hidden.shape
    hidden, weight = hidden.float(), weight.float()
    gh = torch.zeros_like(hidden) if with_grad else hidden.new_empty((0, 0, 0))
    gw = torch.zeros_like(weight) if with_grad else weight.new_empty((0, 0))
    losses = torch.zeros(heads, dtype=torch.float32, device=hidden.device)
    for i in range(heads):
        keep = (targets[i] >= 0).nonzero()[:, 0]
        if keep.numel() == 0:
            continue
        scale = head_weights[i] / keep.numel()
        total = hidden.new_zeros((), dtype=torch.float64)
        for s in range(0, keep.numel(), chunk):
            rows = keep[s:s + chunk]
            h, y = hidden[i, rows], targets[i, rows].long()
            z = h @ weight.t()  # (c, V)
            lse = torch.logsumexp(z, dim=1)
            total += (lse - z.gather(1, y[:, None])[:, 0]).double().sum()
            if with_grad:
                g = torch.exp(z - lse[:, None]).mul_(scale)
                g[torch.arange(rows.numel(), device=g.device), y] -= scale
                gh[i, rows] = g @ weight
                gw += g.t() @ h
        losses[i] = (total / keep.numel()).float()
    hw = torch.tensor(head_weights, dtype=torch.float32, device=hidden.device)
    return (losses * hw).sum(), losses, gh, gw


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
