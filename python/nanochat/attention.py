"""Causal attention, full ("L") or sliding-window ("S"), with a KV cache of earlier keys.

`[model.attention] pattern = "SSSL"` repeats over the layers (layer i takes
pattern[i % len(pattern)]); an "S" layer's query at position p sees the keys p - window + 1
.. p (`window` of them, itself included), an "L" layer's sees 0 .. p.

KV cache: keys and values are cached after RoPE (absolute positions), so a windowed layer
only needs the last window - 1 of them (the next query adds its own): `trim` drops the rest,
and the cache of an "S" layer stays at most window - 1 long however long the generation.

    pytest tests/test_hybrid_attention.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(t: int, cached: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean (t, cached + t): query i (the (cached + i)-th of the keys) sees key j when
    j <= cached + i and, with a window, cached + i - j < window."""
    i = torch.arange(t, device=device)[:, None] + cached
    j = torch.arange(cached + t, device=device)[None, :]
    ok = j <= i
    if window is not None:
        ok &= i - j < window
    return ok


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int,
           window: int | None) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, H, cached + T, D), whose
    first `cached` keys precede the T new positions. Picks SDPA's plain causal / unmasked
    forms where they are exact (a full layer's prefill, a single new token that sees the
    whole cache) and an explicit mask otherwise."""
    t, s = q.shape[2], k.shape[2]
    if window is None or window >= s:  # the window covers everything: plain causal
        if cached == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if t == 1:  # the new token sees everything
            return F.scaled_dot_product_attention(q, k, v)
    mask = attention_mask(t, cached, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def trim(kv: torch.Tensor, window: int | None) -> torch.Tensor:
    """What a layer's cache keeps of its keys or values (B, H, S, D): all of them for full
    attention, the last window - 1 for a windowed layer."""
    if window is None:
        return kv
    keep = min(window - 1, kv.shape[2])
    return kv[:, :, kv.shape[2] - keep:]
