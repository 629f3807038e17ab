"""Mixture of ternary experts in place of a block's FFN (`[model.moe] experts = E`).

    s      = sigmoid(x @ ffn_gate_inp^T)                     (N, E) router, full precision
    top    = topk(s + expert_bias, k)                        bias steers selection only
    g      = s[top] / sum(s[top])   (k = 1: g = s[top])      gate weights
    y      = sum_top g * expert_e(x)  (+ shared expert(x))
    expert_e(x) = down_e(sub_norm_e(act(gate_e(x)) * up_e(x)))   the dense FFN's shape

Every expert matrix has BitLinear semantics (nanochat/ops/bitlinear.py): the weights are stored
as 3-D tensors (E, out, in) and each expert is quantized on its own (absmean scale per
expert), activations per token to int8 (absmax), straight-through estimator for both; the
routing selection is not differentiable, the gate values are (the router learns through
them). With k = 1 the gate is the raw sigmoid score, since normalizing one score would make
it 1 and cut the router's gradient.

Load balancing: DeepSeek-V3's auxiliary-loss-free bias (`balance = "bias"`). After each
training forward, expert_bias[e] += bias_rate * sign(mean load - load[e]): overloaded
experts get picked less, underloaded more, with no extra loss term to weigh against the LM
loss (and no change to the training loop). `balance = "none"` turns it off. The bias is a
buffer saved with the model; `load` holds the last forward's tokens per expert.

Dispatch is dropless: the (token, expert) pairs are sorted by expert, each expert runs one
GEMM over its contiguous rows (a loop over experts, none over tokens), and index_add_
scatters the gated outputs back. Only the pure-torch BitLinear path is used for experts.

Parameter names follow llama.cpp's MoE tensors (ffn_gate_inp, ffn_{gate,up,down}_exps,
ffn_*_shexp) for a later exporter.

    pytest tests/test_moe.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.model.bitlinear import BitLinear
from nanochat.ops.bitlinear import EPS, quantize_activations


def ste_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 fake-quant with the straight-through estimator (BitLinear's input)."""
    xq, a = quantize_activations(x.detach())
    return x + (xq / a - x).detach()


def ste_expert_weights(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary fake-quant of (E, out, in), one scale per expert (each the same
    reduction as BitLinear's quantize_weight on that expert's 2-D weight), with the STE."""
    wd = w.detach()
    s = torch.stack([wd[e].abs().mean() for e in range(w.shape[0])]).clamp(min=EPS)
    s = s[:, None, None]
    return w + ((wd / s).round().clamp(-1, 1) * s - w).detach()


class MoE(nn.Module):
    def __init__(self, d_model: int, hidden: int, experts: int, top_k: int,
                 shared_expert: bool = False, balance: str = "bias", bias_rate: float = 1e-3,
                 activation: str = "silu", eps: float = 1e-5, bitlinear: str = "auto"):
        super().__init__()
        E, H, d = experts, hidden, d_model
        self.experts, self.top_k, self.hidden, self.d_model = E, top_k, H, d
        self.balance, self.bias_rate = balance, bias_rate
        self.activation, self.eps = activation, eps
        self.ffn_gate_inp = nn.Parameter(torch.empty(E, d))  # router (full precision)
        self.ffn_gate_exps = nn.Parameter(torch.empty(E, H, d))
        self.ffn_up_exps = nn.Parameter(torch.empty(E, H, d))
        self.ffn_down_exps = nn.Parameter(torch.empty(E, d, H))
        self.ffn_sub_norm_exps = nn.Parameter(torch.ones(E, H))
        self.shared = shared_expert
        if shared_expert:
            self.ffn_gate_shexp = BitLinear(d, H, bitlinear)
            self.ffn_up_shexp = BitLinear(d, H, bitlinear)
            self.ffn_sub_norm_shexp = nn.Parameter(torch.ones(H))
            self.ffn_down_shexp = BitLinear(H, d, bitlinear)
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("load", torch.zeros(E), persistent=False)

    def expert_matrices(self) -> list[nn.Parameter]:
        return [self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps]

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        for p in (self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps):
            nn.init.normal_(p, 0.0, std)
        nn.init.normal_(self.ffn_down_exps, 0.0, out_std)
        nn.init.ones_(self.ffn_sub_norm_exps)
        self.expert_bias.zero_()
        if self.shared:
            self.ffn_gate_shexp.reset_parameters(std)
            self.ffn_up_shexp.reset_parameters(std)
            nn.init.ones_(self.ffn_sub_norm_shexp)
            self.ffn_down_shexp.reset_parameters(out_std)

    def _act(self, g: torch.Tensor) -> torch.Tensor:
        return F.silu(g) if self.activation == "silu" else F.relu(g).square()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected experts (N, k) and their gate weights (N, k) for tokens x (N, d)."""
        scores = torch.sigmoid(F.linear(x, self.ffn_gate_inp))  # (N, E)
        top = torch.topk(scores.detach() + self.expert_bias, self.top_k, dim=-1).indices
        g = scores.gather(-1, top)
        if self.top_k > 1:
            g = g / g.sum(dim=-1, keepdim=True)
        return top, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        k = self.top_k
        top, gates = self.route(x)
        flat = top.reshape(-1)  # (N*k,) expert of each (token, slot)
        counts = torch.bincount(flat, minlength=self.experts)
        update = self.training and torch.is_grad_enabled() and self.balance == "bias"
        with torch.no_grad():
            self.load.copy_(counts)
            if update:  # a training forward (not evaluation or generation)
                self.expert_bias += self.bias_rate * torch.sign(counts.float().mean() - counts)
        order = torch.argsort(flat, stable=True)
        tok = order // k  # token of each sorted row
        xs = ste_activations(x)[tok]  # (N*k, d) per-token quantization commutes with the gather
        wg = ste_expert_weights(self.ffn_gate_exps).unbind(0)
        wu = ste_expert_weights(self.ffn_up_exps).unbind(0)
        wd = ste_expert_weights(self.ffn_down_exps).unbind(0)
        norms = self.ffn_sub_norm_exps.unbind(0)
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            rows = xs[start:start + c]
            h = self._act(F.linear(rows, wg[e])) * F.linear(rows, wu[e])  # (c, H)
            h = F.rms_norm(h, (self.hidden,), norms[e].to(h.dtype), self.eps)
            outs.append(F.linear(ste_activations(h), wd[e]))  # (c, d)
            start += c
        ys = torch.cat(outs) * gates.reshape(-1)[order, None]
        y = x.new_zeros(x.shape, dtype=ys.dtype).index_add_(0, tok, ys)  # ys: autocast's dtype
        if self.shared:
            h = self._act(self.ffn_gate_shexp(x)) * self.ffn_up_shexp(x)
            h = F.rms_norm(h, (self.hidden,), self.ffn_sub_norm_shexp.to(h.dtype), self.eps)
            y = y + self.ffn_down_shexp(h)
        return y.reshape(shape)

    def expert_params(self) -> int:
        """Parameters of one routed expert (its three matrices and its sub-norm)."""
        return 3 * self.d_model * self.hidden + self.hidden

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, top_k={self.top_k}, hidden={self.hidden}, "
                f"shared_expert={self.shared}, balance={self.balance}")
