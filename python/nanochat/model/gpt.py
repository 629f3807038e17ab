"""The GPT: a BitNet b1.58 decoder laid out exactly like llama.cpp's `bitnet` graph.

    h = token_embd[idx]                                         # (B, T, d) full precision
    per block:
        a = attn_norm(h)                                         # pre-norm RMSNorm
        q, k, v = attn_q(a), attn_k(a), attn_v(a)                # BitLinear, GQA (n_kv_heads)
        h = h + attn_output(attn_sub_norm(attention(rope(q), rope(k), v)))
        f = ffn_norm(h)
        h = h + ffn_down(ffn_sub_norm(act(ffn_gate(f)) * ffn_up(f)))   # act: silu or relu2
    logits = output_norm(h) @ token_embd^T                      # tied LM head

Module names mirror the GGUF tensor names (`blocks.3.attn_q.weight` -> `blk.3.attn_q.weight`,
`token_embd`, `output_norm`), so an exporter maps them one to one. No biases anywhere.

RoPE: llama.cpp runs LLM_ARCH_BITNET with LLAMA_ROPE_TYPE_NEOX ("the pairs of head values
are offset by n_rot/2", llama_model_rope_type in src/llama-model.cpp), i.e. the half-split
pairing (x[i], x[i + head_dim/2]), as in HF's rotate_half. NOT the "normal" consecutive
pairing (x[2i], x[2i+1]) of LLM_ARCH_LLAMA. We rotate the same pairs, so exported Q/K
weights need no permutation.

    nanochat model info --config nano_125m       # parameter counts and memory (meta device)
    pytest tests/test_gpt.py
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.config import FusedLoss, FusedLossPrecision, ModelConfig, _build
from nanochat.model import mtp
from nanochat.model.bitlinear import BitLinear, frozen
from nanochat.model.block import Block, RMSNorm, rope_cos_sin
from nanochat.model.mhc import MHC
from nanochat.model.moe import MoE
from nanochat.ops import fused_loss
from nanochat.ops import rows as row_subset
from nanochat.ops.rows import RowSubset

log = logging.getLogger(__name__)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, bitlinear: str = "auto"):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embd = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, bitlinear, i) for i in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.init_weights()

        self.mtp = mtp.build_heads(config, bitlinear)  # empty when model.mtp.heads == 1
        self.fused_loss, self.fused_loss_precision = "off", "f32"  # set_fused_loss
        self.last_head_losses: torch.Tensor | None = None  # per head, of the last loss

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_config_dict(cls, d: dict, bitlinear: str = "auto") -> "GPT":
        """From a ModelConfig dict (a checkpoint's saved config). Missing keys take their
        defaults (logged, so old checkpoints keep loading); unknown keys are errors."""
        missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(d))
        if missing:
            log.info("model config: missing key(s) %s take their defaults", ", ".join(missing))
        cfg = _build(ModelConfig, dict(d), "model")
        return cls(cfg, bitlinear=bitlinear)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for the embedding and every BitLinear; the two residual output
        projections (attn_output, ffn_down) scaled by 1/sqrt(2 * n_layers); norms at 1.
        Experts like the dense FFN (router at init_std); mHC per nanochat/model/mhc.py."""
        std = self.config.init_std
        nn.init.normal_(self.token_embd.weight, 0.0, std)
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.reset_parameters(std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for i, b in enumerate(self.blocks):
            b.attn_output.reset_parameters(out_std)
            if b.moe is not None:
                b.moe.reset_parameters(std, out_std)
            else:
                b.ffn_down.reset_parameters(out_std)
            if hasattr(b, "mhc_attn"):
                b.mhc_attn.reset_parameters(std, 2 * i)
                b.mhc_ffn.reset_parameters(std, 2 * i + 1)

    def set_bitlinear_kernel(self, kernel: str) -> None:
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.kernel = kernel

    def set_bitlinear_backward(self, precision: str) -> None:
        """Backward GEMM precision of the C++ BitLinear path: auto, bf16 or float32."""
        from nanochat.ops.bitlinear import resolve_backward

        resolve_backward(precision)
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.backward_precision = precision

    # ---- forward ----------------------------------------------------------------------
    def _rope(self, T: int, start: int = 0, doc_start: torch.Tensor | None = None, device=None):
        """cos, sin of positions start .. start + T - 1, or in packed rows (doc_start (B, T))
        of each token's position within its own conversation, so a packed conversation sees
        the positions it would see alone."""
        pos = torch.arange(start, start + T, device=device)
        if doc_start is not None:
            pos = pos - doc_start
        return rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)

    def _trunk(self, idx: torch.Tensor, caches: list | None = None, start: int = 0,
               rows: RowSubset | None = None, doc_start: torch.Tensor | None = None):
        B, T = idx.shape
        cos, sin = self._rope(T, start, doc_start, idx.device)
        x = self.token_embd(idx)
        n = self.config.mhc.streams
        if n > 1:  # n copies of the input (mhc.py: the init makes the streams diverge)
            x = x.unsqueeze(-2).expand(B, T, n, x.shape[-1])
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if caches is None else caches[i], rows, doc_start)
        if n > 1:
            x = x.mean(dim=-2)  # collapse the streams before the final norm
        return self.output_norm(x, rows)

    def forward_hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (B, T, d), before the tied LM head."""
        return self._trunk(idx)

    def logits(self, hidden: torch.Tensor, rows: RowSubset | None = None) -> torch.Tensor:
        # row_subset.linear: F.linear, with a kept-rows-only backward given a row subset
        return row_subset.linear(hidden, self.token_embd.weight, rows).float()  # (B, T, V)

    def set_fused_loss(self, mode: str = "auto", precision: str = "f32") -> None:
        """The loss of training calls (targets, mean reduction): "on" the fused chunked
        cross-entropy op (nanochat/ops/fused_loss.py: no (tokens, vocab) logits), "off" full
        logits and F.cross_entropy, "auto" fused when MTP is on, or on CPU at vocab >= 16384
        (where `nanochat bench loss` measures it faster). A model starts "off"; train sets it."""
        modes, precisions = typing.get_args(FusedLoss), typing.get_args(FusedLossPrecision)
        if mode not in modes or precision not in precisions:
            raise ValueError(f"set_fused_loss: mode one of {modes} and precision one of "
                             f"{precisions}, got {mode!r}, {precision!r}")
        self.fused_loss, self.fused_loss_precision = mode, precision

    def _fused(self) -> bool:
        if self.fused_loss == "auto":
            return self.config.mtp.heads > 1 or (self.config.vocab_size >= 16384 and
                                                  self.token_embd.weight.device.type == "cpu")
        return self.fused_loss == "on"

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: str = "mean", rows: RowSubset | None = None,
                doc_start: torch.Tensor | None = None):
        """logits (B, T, V), or (logits, loss) with targets (B, T) (-1 = ignore). With
        loss_reduction="none" the loss is per token, shaped like targets (the next-token
        head only). With mean reduction and MTP on (model.mtp.heads > 1) the loss is the
        weighted sum over the heads (nanochat/model/mtp.py), each head's own in last_head_losses;
        when the fused loss runs (set_fused_loss) no logits exist and logits is None.
        rows: the (B, T) token rows' subset every layer's backward runs on (nanochat/ops/
        rows.py; Collider's kept tokens), or None (dense); not with a mean loss, whose
        gradient reaches every row (head_token_losses gives the losses to weight).
        doc_start: packed rows (several conversations per row, chat fine-tuning): (B, T)
        int, each token's conversation start; attention and positions stay inside each
        conversation (nanochat/ops/attention.py). None: one sequence per row."""
        if rows is not None and targets is not None and loss_reduction == "mean":
            raise ValueError("GPT.forward: a row subset needs loss_reduction='none' (a mean "
                             "loss's gradient reaches every row)")
        h = self._trunk(idx, rows=rows, doc_start=doc_start)
        if targets is not None and loss_reduction == "mean" and (
                len(self.mtp) or self._fused()):
            return self._head_loss(idx, h, targets, doc_start)
        logits = self.logits(h, rows)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(targets.shape)
        return logits, loss

    def _head_hidden(self, idx, h, rows: RowSubset | None = None,
                     doc_start: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The normed hidden states (B, T, d) of every head: [h], plus the MTP heads'."""
        if not len(self.mtp):
            return [h]
        cos, sin = self._rope(idx.shape[1], 0, doc_start, idx.device)
        return mtp.head_hidden(self.mtp, h, self.token_embd(idx), cos, sin, rows, doc_start)

    def _head_loss(self, idx, h, targets, doc_start=None):
        """(logits of head 1 or None, weighted mean loss over the heads) for a training call."""
        n = len(self.mtp) + 1
        hidden = self._head_hidden(idx, h, doc_start=doc_start)
        # (n, B*T), head i shifted by i (and cut at each packed conversation's end)
        tgt = mtp.head_targets(targets, n, doc_start).reshape(n, -1)
        weights = mtp.head_weights(self.config.mtp) if n > 1 else [1.0]
        W = self.token_embd.weight
        if self._fused():
            stacked = torch.stack(hidden).reshape(n, -1, h.shape[-1])  # (n, B*T, d)
            total, per_head = fused_loss.fused_linear_cross_entropy(
                stacked, W, tgt, weights, precision=self.fused_loss_precision)
            logits = None
        else:
            logits = self.logits(h)
            per_head = torch.stack([F.cross_entropy(
                (logits if i == 0 else self.logits(x)).reshape(-1, W.shape[0]), tgt[i],
                ignore_index=-1) if bool((tgt[i] >= 0).any()) else h.new_zeros(())
                for i, x in enumerate(hidden)])  # a head with no target counts 0, not nan
            total = (per_head * per_head.new_tensor(weights)).sum()
        self.last_head_losses = per_head.detach()
        return logits, total

    def head_token_losses(self, idx: torch.Tensor, targets: torch.Tensor,
                          rows: RowSubset | None = None):
        """Per-token losses of every head, (heads, B, T) with 0 where a head has no target,
        its targets (heads, B, T) (-1 = none) and weights: the training loss is
        sum_i weights[i] * mean of losses[i] over its targets (Collider scores and masks
        tokens with these; nanochat/train/collider.py). The same two heads as the mean loss
        (set_fused_loss): the fused op per token (no logits kept), or full logits one head
        at a time. rows: the (B, T) token rows' subset every layer's backward, the head's
        included, runs on (nanochat/ops/rows.py)."""
        n = len(self.mtp) + 1
        h = self._trunk(idx, rows=rows)
        hidden = self._head_hidden(idx, h, rows)
        tgt = mtp.head_targets(targets, n)  # (n, B, T), head i shifted by i
        W = self.token_embd.weight
        if self._fused():
            losses = fused_loss.token_losses(
                torch.stack(hidden).reshape(n, -1, h.shape[-1]), W, tgt.reshape(n, -1), rows,
                precision=self.fused_loss_precision).view(tgt.shape)
        else:  # self.logits: the kept-row head GEMMs; dropped rows' incoming gradient is 0
            losses = torch.stack([F.cross_entropy(
                self.logits(x, rows).reshape(-1, W.shape[0]), tgt[i].reshape(-1),
                ignore_index=-1, reduction="none").view(targets.shape)
                for i, x in enumerate(hidden)])
        weights = mtp.head_weights(self.config.mtp) if n > 1 else [1.0]
        return losses, tgt, weights

    # ---- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: Iterable[int] = ()) -> torch.Tensor:
        """Sample continuations with a KV cache (prefill the prompt, then one token a step).

        idx: (B, T) or (T,) token ids (a list works too); returns the prompt plus the new
        tokens in the same layout. temperature 0 is greedy. Generation ends early once every
        row has produced one of stop_ids (kept in the output; a finished row repeats it)."""
        device = self.token_embd.weight.device
        idx = torch.as_tensor(idx, dtype=torch.long, device=device)
        vector = idx.dim() == 1
        if vector:
            idx = idx[None]
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate: the prompt must have at least one token")
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds max_seq_len ({self.config.max_seq_len})")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        caches = [[None, None] for _ in self.blocks]
        out = [idx]
        x, pos = idx, 0
        with frozen(self):  # pack the ternary weights once for the whole generation
            for _ in range(max_new_tokens):
                logits = self.logits(self._trunk(x, caches, pos)[:, -1])  # (B, V)
                pos += x.shape[1]
                nxt = sample(logits, temperature, top_k, top_p, gen)  # (B,)
                if stop.numel():
                    nxt = torch.where(done, out[-1][:, -1], nxt)
                    done |= torch.isin(nxt, stop)
                out.append(nxt[:, None])
                if stop.numel() and bool(done.all()):
                    break
                x = nxt[:, None]
        res = torch.cat(out, dim=1)
        return res[0] if vector else res

    # ---- sizes ------------------------------------------------------------------------
    def parameter_kinds(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """(name, parameter) by kind, for optimizer groups: "matrix" (BitLinear latent
        weights and the experts' (E, out, in) ternary weights), "embedding" (token_embd,
        tied with the LM head), "scalar" (everything full precision and small: RMSNorm
        gains, the experts' sub-norms, the MoE router, the mHC coefficients)."""
        kinds: dict[str, list] = {"matrix": [], "embedding": [], "scalar": []}
        owner = {id(m.weight): k for m in self.modules() for k, cls in
                 (("matrix", BitLinear), ("scalar", RMSNorm), ("embedding", nn.Embedding))
                 if isinstance(m, cls)}
        for m in self.modules():
            if isinstance(m, MHC):
                owner.update({id(p): "scalar" for p in m.parameters()})
            elif isinstance(m, MoE):
                owner.update({id(p): "matrix" for p in m.expert_matrices()})
                owner[id(m.ffn_gate_inp)] = owner[id(m.ffn_sub_norm_exps)] = "scalar"
                if m.shared:
                    owner[id(m.ffn_sub_norm_shexp)] = "scalar"
        for name, p in self.named_parameters():
            kinds[owner[id(p)]].append((name, p))
        return kinds

    def num_params(self) -> dict[str, int]:
        """Parameter counts: total, active (per token: the routed experts a token does not
        use left out), ternary (BitLinear and expert weights), embedding (tied), norm (RMSNorm
        gains, expert sub-norms), router (MoE, full precision), mhc (mHC coefficients)."""
        ternary = sum(m.weight.numel() for m in self.modules() if isinstance(m, BitLinear))
        norm = sum(m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))
        embedding = self.token_embd.weight.numel()
        mhc = sum(p.numel() for m in self.modules() if isinstance(m, MHC) for p in m.parameters())
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        ternary += sum(p.numel() for m in moes for p in m.expert_matrices())
        norm += sum(m.ffn_sub_norm_exps.numel() + (m.ffn_sub_norm_shexp.numel() if m.shared
                                                   else 0) for m in moes)
        router = sum(m.ffn_gate_inp.numel() for m in moes)
        inactive = sum((m.experts - m.top_k) * m.expert_params() for m in moes)
        total = sum(p.numel() for p in self.parameters())
        assert total == ternary + norm + embedding + router + mhc, "a parameter is not counted"
        return {"total": total, "active": total - inactive, "ternary": ternary,
                "embedding": embedding, "norm": norm, "router": router, "mhc": mhc}

    def estimate_memory(self, batch: int, seq: int) -> dict[str, int]:
        """Rough bytes. Training: fp32 params + grads + AdamW's two fp32 moments (16 B/param)
        plus saved activations: per token and layer about 14*d + 2*d_kv + 6*ffn floats
        (norm outputs, quantized BitLinear inputs, q/k/v, attention output, the FFN's four
        ffn-wide tensors; fused attention assumed: no T^2 term), plus fp32 logits and their
        softmax gradient (2*V floats per token). Inference: ternary weights packed at 2 bits
        (+ one fp32 scale per matrix), the embedding in f16, norms in f32; KV cache in f16.
        Checked on tiny at 4 x 256 tokens: 197 MiB estimated vs 159 MiB (cpp BitLinear,
        int8 saved inputs) / 204 MiB (torch BitLinear) of live saved tensors.
        Options: MoE saves 6*hidden per routed slot (+ the shared expert) and 2*d for the
        gathered rows instead of the dense FFN's 6*ffn; mHC adds about (2n + 3)*d per layer
        (each sub-layer's n input streams and its output, see mhc.py); a windowed layer's
        KV cache holds min(window, seq) positions; router and mHC weights stay f32 for
        inference. `nanochat bench arch --json` prints this estimate next to the saved-tensor
        bytes it measures (tiny, 8 x 256, torch BitLinear: 1.00x plain, 1.00x with mHC n = 4,
        0.91x with 8 experts of ffn/2, top-2)."""
        c = self.config
        n = self.num_params()
        d_kv = c.n_kv_heads * c.head_dim
        tokens = batch * seq
        ffn_act = 6 * c.ffn_hidden
        if c.moe.experts:
            h = c.moe.expert_hidden or c.ffn_hidden
            ffn_act = 6 * h * (c.moe.top_k + c.moe.shared_expert) + 2 * c.d_model * c.moe.top_k
        mhc_act = (2 * c.mhc.streams + 3) * c.d_model if c.mhc.streams > 1 else 0
        act = tokens * (c.n_layers * (14 * c.d_model + 2 * d_kv + ffn_act + mhc_act)
                        + 2 * c.vocab_size) * 4
        state = n["total"] * 16
        n_mats = sum(1 for m in self.modules() if isinstance(m, BitLinear))
        n_mats += sum(3 * m.experts for m in self.modules() if isinstance(m, MoE))
        packed = (n["ternary"] // 4 + 4 * n_mats + 2 * n["embedding"]
                  + 4 * (n["norm"] + n["router"] + n["mhc"]))
        kv_pos = sum(seq if b.window is None else min(b.window, seq) for b in self.blocks)
        kv = 2 * batch * kv_pos * d_kv * 2
        return {"params_bytes": n["total"] * 4, "optimizer_state_bytes": n["total"] * 8,
                "activation_bytes": act, "training_state_bytes": state + act,
                "packed_inference_bytes": packed, "kv_cache_bytes": kv}


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else top-k / nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def model_info(config: ModelConfig, batch: int = 1, seq: int | None = None) -> dict:
    """Counts and memory estimates of a config, built on the meta device (no memory)."""
    seq = seq or config.max_seq_len
    with torch.device("meta"):
        model = GPT(config)
    n = model.num_params()
    mem = model.estimate_memory(batch, seq)
    return {
        "config": dataclasses.asdict(config),
        "batch": batch, "seq": seq,
        "total_params": n["total"], "active_params": n["active"],
        "ternary_params": n["ternary"], "embedding_params": n["embedding"],
        "norm_params": n["norm"], "router_params": n["router"], "mhc_params": n["mhc"],
        **mem,
    }




def _option_lines(info: dict) -> list[str]:
    """model info lines of the architecture options that are on."""
    c, lines = info["config"], []
    moe, mhc, att = c.get("moe", {}), c.get("mhc", {}), c.get("attention", {})
    if moe.get("experts"):
        shared = ", shared expert" if moe["shared_expert"] else ""
        lines.append(f"  router (f32)       : {info['router_params']:>15,}  (MoE: "
                     f"{moe['experts']} experts, top-{moe['top_k']}{shared}; active = "
                     f"{info['active_params'] / info['total_params']:.0%} of total)")
    if mhc.get("streams", 1) > 1:
        lines.append(f"  mHC (f32)          : {info['mhc_params']:>15,}  ({mhc['streams']} "
                     f"streams, {mhc['res']}, {'dynamic' if mhc['dynamic'] else 'static'})")
    if "S" in att.get("pattern", "L"):
        lines.append(f"  attention          : pattern {att['pattern']!r} over the layers, "
                     f"window {att['window']}")
    return lines


def format_model_info(info: dict) -> str:
    """The text form of model_info for `nanochat model info`."""
    c = info["config"]

    def gib(b):
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    lines = [
        f"model: d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads "
        f"({c['n_kv_heads']} kv), head_dim {c['d_model'] // c['n_heads']}, ffn {c['ffn_hidden']}, "
        f"vocab {c['vocab_size']}, {c['activation']}",
        f"  total params       : {info['total_params']:>15,}  ({info['total_params'] / 1e6:.1f}M)",
        f"  active params      : {info['active_params']:>15,}",
        f"  ternary (BitLinear): {info['ternary_params']:>15,}",
        f"  embedding (tied)   : {info['embedding_params']:>15,}",
        f"  norms              : {info['norm_params']:>15,}",
        *_option_lines(info),
        f"memory (batch {info['batch']} x seq {info['seq']}, rough):",
        f"  training state     : {gib(info['training_state_bytes'])}  (params+grads+AdamW "
        f"{gib(info['params_bytes'] * 2 + info['optimizer_state_bytes'])}, activations "
        f"{gib(info['activation_bytes'])})",
        f"  packed inference   : {gib(info['packed_inference_bytes'])}  (2-bit ternary, f16 "
        f"embedding) + KV cache {gib(info['kv_cache_bytes'])}",
    ]
    return "\n".join(lines)
