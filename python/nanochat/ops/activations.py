"""The one torch activation quantizer: per-token absmax int8, bit for bit the C++ core's
(csrc/ternary/activations.cpp), used by every torch path (BitLinear's reference, the
quantize_activations op and TernaryMatrix off the CPU, MoE's experts).

    a  = 127 / max(max|x|, 1e-5)       one scale per token (last dim), a true division
    xq = clamp(round(x * a), -128, 127)  round half to even, as the core's nearbyint

torch's `127.0 / t` is `t.reciprocal() * 127`: two roundings, so other scales and, on a
rounding boundary, other codes than the core's; hence full_like(127) / amax here.
"""

from __future__ import annotations

import torch

EPS = 1e-5  # the core's floor on max|x|


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """a = 127 / max|x| per token, (..., 1)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return torch.full_like(amax, 127.0) / amax


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (as x's dtype) and the scale a (..., 1): x ~= codes / a."""
    a = activation_scale(x)
    return (x * a).round().clamp(-128, 127), a


def int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The core's output form for a (tokens, features) tensor: int8 codes and float32
    x_scale = 1 / a (tokens,), as core().quantize_activations returns them."""
    codes, a = quantize_activations(x.float())
    return codes.to(torch.int8), (torch.ones_like(a) / a).squeeze(-1)
