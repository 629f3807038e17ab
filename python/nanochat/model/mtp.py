"""Multi-token prediction (MTP): heads 2..n of `[model.mtp] heads = n` predict tokens t+2..t+n.

Head 1 is the ordinary next-token head (the trunk, output_norm, the tied unembedding).
Head k >= 2 is a sequential module in the DeepSeek-V3 form, one BitNet transformer block
each (block.Block, plain: dense FFN, full attention, one residual stream):

    x_k   = eh_proj([enorm(embd(token[t + k - 1])) ; hnorm(h_{k-1}[t])])   # BitLinear 2d -> d
    h_k   = block_k(x_k)                                                    # causal, RoPE
    logits_k[t] = shared_head_norm_k(h_k[t]) @ token_embd^T                 # predicts token t+k

h_1 is the trunk's (normed) output. Positions past the sequence end (t + k - 1 >= T) get a
zero embedding and ignored targets (-1), so every head keeps the (B, T) shape and causal
attention keeps those tail positions from influencing any earlier one.

Why sequential modules rather than Gloeckle et al.'s parallel heads: each module sees the
embedding of the token it is conditioned on, so the k-th prediction is made with the same
causal chain the main model would follow, which is what self-speculative decoding wants
(DeepSeek-V3 reports 85-90% acceptance of the second token); the files this project writes
follow llama.cpp's `nextn` layout for exactly these modules (docs/gguf.md); and the heads
are still evaluated one after another, so the fused loss (nanochat/ops/fused_loss.py) never
holds more than one chunk of one head's logits. Both designs share the unembedding.

Training loss (config MTPConfig): loss_weights[0] * L_1 + weight * sum_{k>=2} loss_weights[k-1]
* L_k, with the seed's (1, 0.5, 0.25, 0.125) and 0.2 by default; each L_k is the mean
cross-entropy over that head's non-ignored targets.

    nanochat train --config tiny --set model.mtp.heads=4
    pytest tests/test_mtp.py
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from nanochat.config import ModelConfig, MTPConfig
from nanochat.model.bitlinear import BitLinear
from nanochat.model.block import Block, RMSNorm
from nanochat.ops.rows import RowSubset


def plain_block_config(cfg: ModelConfig) -> ModelConfig:
    """cfg with every option table (mHC, MoE, attention windows, MTP) at its default: the
    dense, full-attention, single-stream block an MTP head uses."""
    return dataclasses.replace(cfg, **{
        f.name: type(getattr(cfg, f.name))() for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, f.name))})


class MTPHead(nn.Module):
    """One sequential MTP module; names follow the GGUF tensors (blk.{L+j}.nextn.*)."""

    def __init__(self, cfg: ModelConfig, bitlinear: str = "auto"):
        super().__init__()

        d = cfg.d_model
        self.enorm = RMSNorm(d, cfg.norm_eps)
        self.hnorm = RMSNorm(d, cfg.norm_eps)
        self.eh_proj = BitLinear(2 * d, d, bitlinear)
        self.block = Block(plain_block_config(cfg), bitlinear)
        self.shared_head_norm = RMSNorm(d, cfg.norm_eps)
        self.reset_parameters(cfg)

    @torch.no_grad()
    def reset_parameters(self, cfg: ModelConfig) -> None:
        """As the trunk: BitLinears normal(0, init_std), the block's two residual output
        projections scaled by 1/sqrt(2 * n_layers), norms at 1."""
        std = cfg.init_std
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.reset_parameters(std)
            elif hasattr(m, "weight") and m.weight.dim() == 1:
                nn.init.ones_(m.weight)
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.block.attn_output.reset_parameters(out_std)
        self.block.ffn_down.reset_parameters(out_std)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos, sin,
                rows: RowSubset | None = None, doc_start: torch.Tensor | None = None):
        """(h_k for the next module, the normed h_k for the unembedding), both (B, T, d).
        rows: the (B, T) token rows' subset (nanochat/ops/rows.py), or None; doc_start:
        packed rows' sequence starts (nanochat/ops/attention.py), or None."""
        x = self.eh_proj(torch.cat((self.enorm(emb, rows), self.hnorm(h_prev, rows)), dim=-1),
                         rows)
        x = self.block(x, cos, sin, rows=rows, doc_start=doc_start)
        return x, self.shared_head_norm(x, rows)


def build_heads(cfg: ModelConfig, bitlinear: str = "auto") -> nn.ModuleList:
    """The extra heads 2..n (an empty list when MTP is off)."""
    return nn.ModuleList(MTPHead(cfg, bitlinear) for _ in range(cfg.mtp.heads - 1))


def shift_left(x: torch.Tensor, s: int, fill) -> torch.Tensor:
    """x (B, T, ...) moved s positions left along T, the last s positions set to fill."""
    if s == 0:
        return x
    pad = torch.full((x.shape[0], min(s, x.shape[1]), *x.shape[2:]), fill, dtype=x.dtype,
                     device=x.device)
    return torch.cat((x[:, s:], pad), dim=1)


def head_targets(targets: torch.Tensor, heads: int,
                 doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """(heads, B, T): head i (0-based) predicts targets shifted left by exactly i (the token
    i + 1 after the input position), -1 where that runs past the sequence, or, in packed
    rows (doc_start), past the position's own conversation."""
    out = []
    for i in range(heads):
        t = shift_left(targets, i, -1)
        if doc_start is not None and i:
            t = t.masked_fill(shift_left(doc_start, i, -1) != doc_start, -1)
        out.append(t)
    return torch.stack(out)


def head_weights(m: MTPConfig) -> list[float]:
    """Each head's weight in the total loss: loss_weights[0], then weight * loss_weights[k]."""
    return [m.loss_weights[0]] + [m.weight * w for w in m.loss_weights[1:m.heads]]


def head_hidden(heads: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, cos, sin,
                rows: RowSubset | None = None,
                doc_start: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Normed hidden states (B, T, d) of every head: [h (the trunk's), head 2's, ...].
    emb: the token embeddings of the input (B, T, d); rows: their row subset, or None;
    doc_start: packed rows' sequence starts, or None."""
    out, prev = [h], h
    for j, head in enumerate(heads):
        prev, normed = head(prev, shift_left(emb, j + 1, 0.0), cos, sin, rows, doc_start)
        out.append(normed)
    return out
