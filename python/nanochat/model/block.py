"""One decoder block (pre-norm attention with a sub-norm, pre-norm FFN with a sub-norm), its
RMSNorm and RoPE; nanochat/model/gpt.py stacks them, nanochat/model/mtp.py reuses them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.config import ModelConfig
from nanochat.model.bitlinear import BitLinear
from nanochat.model.mhc import MHC
from nanochat.model.moe import MoE
from nanochat.ops import rmsnorm
from nanochat.ops.attention import attend, trim
from nanochat.ops.rows import RowSubset
from nanochat.ops.swiglu import swiglu

# `ops` of RMSNorm and Block: "auto" runs nanochat's ops (the C++ kernel where one is
# registered for the device, their torch default elsewhere), "torch" plain torch functions
# and autograd, the baseline a bench compares with (nanochat/model/build.py sets it).
OPS = ("auto", "torch")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (ggml_rms_norm then a multiply)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = "auto"

    def forward(self, x: torch.Tensor, rows: RowSubset | None = None) -> torch.Tensor:
        if self.ops == "torch":
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        return rmsnorm.rms_norm(x, self.weight, self.eps, rows)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin (T, head_dim/2) float32 for the given absolute positions (T,); per-row
    positions (B, T) (packed rows) give (B, 1, T, head_dim/2), which broadcast over heads."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device,
                                       dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, head_dim/2)
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX (half-split) rotation of x (B, H, T, D): pairs (x[i], x[i + D/2]) by angle
    pos * theta^(-2i/D), the pairing llama.cpp uses for the bitnet architecture."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Block(nn.Module):
    """One layer. Options (config.py): mHC streams around both sub-layers (x is then
    (B, T, n, d)), a mixture of experts in place of the FFN, a sliding attention window."""

    def __init__(self, cfg: ModelConfig, bitlinear: str, layer: int = 0):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.activation = cfg.activation
        self.ops = "auto"  # OPS above
        self.window = cfg.attention.layer_window(layer)  # None: full causal attention
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn_q = BitLinear(d, cfg.n_heads * hd, bitlinear)
        self.attn_k = BitLinear(d, cfg.n_kv_heads * hd, bitlinear)
        self.attn_v = BitLinear(d, cfg.n_kv_heads * hd, bitlinear)
        self.attn_sub_norm = RMSNorm(d, cfg.norm_eps)
        self.attn_output = BitLinear(cfg.n_heads * hd, d, bitlinear)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.moe = None
        if cfg.moe.experts:  # the experts replace ffn_gate/up/sub_norm/down
            e = cfg.moe
            self.moe = MoE(d, e.expert_hidden or cfg.ffn_hidden, e.experts, e.top_k,
                           e.shared_expert, e.balance, e.bias_rate, cfg.activation,
                           cfg.norm_eps, bitlinear)
        else:
            self.ffn_gate = BitLinear(d, cfg.ffn_hidden, bitlinear)
            self.ffn_up = BitLinear(d, cfg.ffn_hidden, bitlinear)
            self.ffn_sub_norm = RMSNorm(cfg.ffn_hidden, cfg.norm_eps)
            self.ffn_down = BitLinear(cfg.ffn_hidden, d, bitlinear)
        m = cfg.mhc
        if m.streams > 1:
            self.mhc_attn = MHC(m.streams, d, m.res, m.sinkhorn_iters, m.dynamic, cfg.norm_eps)
            self.mhc_ffn = MHC(m.streams, d, m.res, m.sinkhorn_iters, m.dynamic, cfg.norm_eps)

    def attention(self, x, cos, sin, cache: list | None, rows: RowSubset | None = None,
                  doc_start: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.attn_q(x, rows).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.attn_k(x, rows).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.attn_v(x, rows).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:  # [k, v] of earlier positions (B, Hkv, past, D), or [None, None]
            if cache[0] is not None:
                past = cache[0].shape[2]
                k = torch.cat((cache[0], k), dim=2)
                v = torch.cat((cache[1], v), dim=2)
            cache[0], cache[1] = trim(k, self.window), trim(v, self.window)
        # grouped-query: q head h reads kv head h // (n_heads / n_kv_heads), inside attend
        y = attend(q, k, v, past, self.window, rows, doc_start, op=self.ops != "torch")
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B,T,H*D)

    def attn_branch(self, x, cos, sin, cache: list | None = None,
                    rows: RowSubset | None = None, doc_start: torch.Tensor | None = None):
        a = self.attention(self.attn_norm(x, rows), cos, sin, cache, rows, doc_start)  # (B,T,d)
        return self.attn_output(self.attn_sub_norm(a, rows), rows)

    def ffn_branch(self, x, rows: RowSubset | None = None):
        h = self.ffn_norm(x, rows)
        if self.moe is not None:  # experts see gathered rows: dense (module doc of rows.py)
            return self.moe(h)
        g, u = self.ffn_gate(h, rows), self.ffn_up(h, rows)
        if self.activation != "silu":
            a = F.relu(g).square() * u
        elif self.ops == "torch":
            a = F.silu(g) * u
        else:
            a = swiglu(g, u, rows)
        return self.ffn_down(self.ffn_sub_norm(a, rows), rows)

    def forward(self, x, cos, sin, cache: list | None = None, rows: RowSubset | None = None,
                doc_start: torch.Tensor | None = None):
        """x (B, T, d) (or (B, T, n, d) with mHC streams); rows: the (B, T) token rows'
        subset whose backward the layers compute (nanochat/ops/rows.py), or None (dense);
        doc_start: packed rows' (B, T) sequence starts (nanochat/ops/attention.py), or None."""
        if hasattr(self, "mhc_attn"):  # x (B, T, n, d): streams mixed around each sub-layer
            x = self.mhc_attn(x, lambda h: self.attn_branch(h, cos, sin, cache, rows, doc_start))
            return self.mhc_ffn(x, lambda h: self.ffn_branch(h, rows))
        x = x + self.attn_branch(x, cos, sin, cache, rows, doc_start)
        return x + self.ffn_branch(x, rows)
