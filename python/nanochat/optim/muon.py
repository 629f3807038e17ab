"""Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025): momentum SGD whose update is
orthogonalized by a quintic Newton-Schulz iteration, for the hidden 2-D (BitLinear) weights.

    m = beta m + (1 - beta) g;  u = g + beta (m - g)  (Nesterov; u = m without)
    O = NS5(u);  p *= 1 - lr wd;  p -= lr * scale(rows, cols) * O

Newton-Schulz: X = u / (||u||_F + 1e-7), transposed so rows <= cols, then 5 times
A = X X^T, B = b A + c A A, X = a X + B X with (a, b, c) = (3.4445, -4.7750, 2.0315): it
drives every singular value of X towards ~1 (into about [0.7, 1.2]), i.e. approximately
U V^T of u's SVD. Scale: "original" max(1, rows/cols)^0.5, or "moonlight" 0.2 sqrt(max(rows,
cols)), which gives the update AdamW's RMS so AdamW's LR and weight decay carry over (our
default). Leading dimensions batch: a (E, out, in) expert tensor is E matrices.

The per-parameter step lives in nanochat.optim.hybrid; tests/test_optim.py checks these
functions against a float64 reference.
"""

from __future__ import annotations

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)
SCALES = ("moonlight", "original")


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate orthogonalization of the last two dims of g (..., rows, cols)."""
    if g.ndim < 2:
        raise ValueError(f"newton_schulz: expected a matrix (or a batch of them), "
                         f"got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(dtype or torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def shape_scale(rows: int, cols: int, mode: str = "moonlight") -> float:
    if mode == "original":
        return max(1.0, rows / cols) ** 0.5
    if mode == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"muon scale must be one of {SCALES}, got {mode!r}")


def ns_dtype(setting: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA (as the Muon reference) and where CPU bf16 GEMMs are faster
    than f32 (AVX512-BF16/AMX with an AVX-512 kernel ISA active: about 2x the f32 rate;
    bitlinear.cpu_has_fast_bf16), else float32: on AVX2-only CPUs (or NANOCHAT_ISA=avx2)
    bf16 is emulated and slower. `nanochat bench optim` prints the Muon step both ways."""
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"muon ns_dtype must be auto, bfloat16 or float32, got {setting!r}")
    from nanochat.ops.bitlinear import cpu_has_fast_bf16

    return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32


def muon_update(p: torch.Tensor, u: torch.Tensor, lr: float, weight_decay: float, ns_steps: int,
                scale_mode: str, dtype: torch.dtype = torch.float32) -> None:
    """p *= 1 - lr wd; p -= lr scale NS(u) (u already momentum-filtered, p's shape)."""
    o = newton_schulz(u.view(p.shape), ns_steps, dtype=dtype)
    p.mul_(1.0 - lr * weight_decay)
    p.add_(o, alpha=-lr * shape_scale(p.shape[-2], p.shape[-1], scale_mode))
