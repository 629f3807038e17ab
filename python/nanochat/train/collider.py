"""Collider: token filtering that shrinks the backward pass, not just the loss.

Rho-1-style selection with Collider's backward (shared/reference/algorithms.md). Per
micro-batch, with the config of [train.collider] (config.ColliderConfig):

  1. score    The forward computes every token's loss anyway: score_t = loss_t, or, with a
              frozen reference model (`reference` = its checkpoint or run dir), the excess
              loss score_t = loss_t - ref_loss_t (Rho-1; costs one reference forward).
  2. select   Over the n tokens that have a target (target -1 is ignored, never kept):
                u_t  = (score_t - min score) / (max score - min score)   (all 0 if equal)
                drop the floor(sparsity * n) lowest-scored tokens, but only tokens with
                     u_t < threshold (those within `threshold` of the way from the easiest
                     token to the hardest); ties go to the lower index.
              So `sparsity` is the most that is dropped and the kept fraction is
              >= 1 - sparsity; threshold 1 drops exactly floor(sparsity * n), threshold 0
              nothing. Seed settings: sparsity 0.35, threshold 0.3.
  3. loss     The mean of loss_t over the kept tokens (the logged loss stays the mean over
              all tokens, comparable with an unfiltered run). With MTP heads
              ([model.mtp]), each head's weighted mean over the kept rows: a dropped token
              row is dropped for every head (scores come from the next-token head).
  4. backward Every op over the (B, T) token rows works on the kept rows only:
              - each linear layer gathers the kept rows of its output gradient and runs both
                backward GEMMs on them: grad_W = g_kept^T x_kept, grad_x = scatter(g_kept W)
                (dropped rows 0). That is each BitLinear (torch path: `linear` below; C++
                path: the backward of the `nanochat::bitlinear` op, whose bf16 operands are
                gathered and cast in one C++ pass) and the tied LM head, whose softmax
                gradient is formed on the kept rows only (`token_losses` below);
              - the row-wise C++ ops (RMSNorm, SwiGLU: nanochat/ops/rmsnorm.py, swiglu.py) skip
                the dropped rows; RoPE, the residual adds and the embedding are row-wise in
                torch, so a dropped token's activation gradient is exactly zero everywhere;
              - attention is the one op that mixes rows: kept queries would send gradient
                to dropped tokens' keys and values. `nanochat::attention`
                (nanochat/ops/attention.py) computes scores and their gradient for the kept
                queries and dk / dv for the kept keys only (attn_k / attn_v would drop the
                others' anyway; on the other paths SDPA's backward is dense and the k / v
                projections drop the dropped rows' dk / dv). That is the approximation
                Collider makes: a dropped token still serves as context in the forward but
                is not trained as context.

How the mask reaches the layers: `armed(shape)` (entered by `Collider.forward_backward`
around the forward and backward) marks calls whose leading dims are the micro-batch's
(B, T) as token rows at forward time; `set_keep` stores the kept row indices after the
scoring, and the backward of those calls reads them. Layers fed other rows (e.g. tokens
gathered for an expert) are never marked and stay dense (their dropped rows are zero
anyway, as they arrive through row-wise ops). The state is a module global rather than
thread-local because CUDA's autograd runs the backward on its own threads. With sparsity
0 nothing is armed: the step is exactly the unfiltered one.

    nanochat train --set train.collider.enabled=true
    nanochat bench collider            # backward / step time and held-out loss vs unfiltered
    pytest tests/test_collider.py
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from nanochat.ops.rows import armed, set_keep

# ---- selection and the training step -----------------------------------------------------


def select(scores: torch.Tensor, valid: torch.Tensor, sparsity: float,
           threshold: float) -> torch.Tensor:
    """The kept-token mask (bool, shaped like scores) of the module doc's step 2."""
    s, v = scores.detach().reshape(-1).float(), valid.reshape(-1)
    keep = v.clone()
    n = int(v.sum())
    n_drop = math.floor(sparsity * n)
    if n_drop == 0:
        return keep.view(scores.shape)
    lo, hi = s[v].min(), s[v].max()
    u = (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)
    candidate = v & (u < threshold)
    m = min(n_drop, int(candidate.sum()))
    order = torch.argsort(torch.where(candidate, s, math.inf), stable=True)
    keep[order[:m]] = False
    return keep.view(scores.shape)


class Collider:
    """One training step with token filtering: forward, score, select, gathered backward."""

    def __init__(self, sparsity: float = 0.35, threshold: float = 0.3, reference=None):
        if not 0 <= sparsity < 1:
            raise ValueError(f"collider sparsity must be in [0, 1), got {sparsity}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"collider threshold must be in [0, 1], got {threshold}")
        self.sparsity, self.threshold = sparsity, threshold
        self.reference = reference  # frozen GPT for excess-loss scores, or None

    @classmethod
    def from_config(cls, cfg, reference=None, log=print) -> "Collider | None":
        """From a ColliderConfig; None when disabled. `reference`: the frozen model the
        trainer loaded from cfg.reference (excess-loss scores), or None (own loss)."""
        if not cfg.enabled:
            return None
        log(f"collider: sparsity {cfg.sparsity:g}, threshold {cfg.threshold:g}, scores: "
            + (f"excess loss vs {cfg.reference}" if reference is not None else "own loss"))
        return cls(cfg.sparsity, cfg.threshold, reference)

    def scores(self, tok_loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               autocast=contextlib.nullcontext()) -> torch.Tensor:
        """score_t (B, T): the token loss, minus the reference's if there is one."""
        s = tok_loss.detach().float()
        if self.reference is not None:
            with torch.no_grad(), autocast:
                _, ref = self.reference(x, y, loss_reduction="none")
            s = s - ref.float()
        return s

    def forward_backward(self, model, x: torch.Tensor, y: torch.Tensor, accum: int = 1,
                         autocast=contextlib.nullcontext(),
                         timings: dict | None = None) -> tuple[float, float]:
        """Forward and backward of one micro-batch of `accum` (the gradient of the kept-token
        mean loss / accum accumulates into model's .grad, as the trainer's unfiltered step
        does). Returns (mean loss over all tokens, kept fraction of the tokens with a target).
        `timings`, if given, gets forward_s (with the scoring) and backward_s (on CUDA, with
        a device sync at each mark, so they time the kernels, not their launches)."""
        def mark() -> float:
            if timings is not None and x.is_cuda:
                torch.cuda.synchronize(x.device)
            return time.perf_counter()

        t0 = mark()
        if self.sparsity == 0:  # nothing can be dropped: exactly the unfiltered step
            with autocast:
                _, loss = model(x, y)
            t1 = mark()
            (loss / accum).backward()
            if timings is not None:
                timings.update(forward_s=t1 - t0, backward_s=mark() - t1)
            return float(loss.detach()), 1.0
        with armed(x.shape):
            with autocast:  # (heads, B, T) per-token losses, 0 where a head has no target
                losses, tgt, weights = model.head_token_losses(x, y)
            tok, valid = losses[0], y != -1
            keep = select(self.scores(tok, x, y, autocast), valid, self.sparsity, self.threshold)
            n_valid, n_kept = int(valid.sum()), int(keep.sum())
            if n_kept < n_valid:
                set_keep(keep)
            # Each head's mean over its kept targets (MTP heads drop the same token rows:
            # the row's activation gradient is dropped in every layer, heads included).
            loss = sum(w * (losses[i] * keep).sum() / max(int((keep & (tgt[i] != -1)).sum()), 1)
                       for i, w in enumerate(weights))
            t1 = mark()
            (loss / accum).backward()
            if timings is not None:
                timings.update(forward_s=t1 - t0, backward_s=mark() - t1)
        # the logged loss: what the unfiltered step reports (every target of every head)
        mean = sum(w * float(losses[i].detach().sum()) / max(int((tgt[i] != -1).sum()), 1)
                   for i, w in enumerate(weights))
        return mean, n_kept / max(n_valid, 1)
