"""mHC: manifold-constrained hyper-connections (DeepSeek 2025) around every sub-layer.

The residual is widened into n streams x (B, T, n, C). Around each attention and FFN
sub-layer F:

    x_next = H_res x + H_post^T F(H_pre x)

    H_pre  = sigmoid(b_pre  + a_pre  * (x~ phi_pre))          (n,)    read: mix streams -> F
    H_post = 2 sigmoid(b_post + a_post * (x~ phi_post))       (n,)    write: F -> each stream
    H_res  = doubly stochastic from b_res + a_res * (x~ phi_res)  (n, n)  stream mixing

x~ is the RMS-normed flattened streams (n*C) of each token; the `a * (x~ phi)` terms are
the dynamic part (`dynamic = false`: the static biases only). H_res is made doubly
stochastic either by Sinkhorn-Knopp (`res = "sinkhorn"`: exp of the logits, then
`sinkhorn_iters` alternating row / column normalizations, columns last) or exactly, as a
softmax-weighted convex combination of all n! permutation matrices (`res = "lite"`).
A doubly stochastic H_res preserves the streams' sum and has max row/column gain 1, so
the product over depth cannot blow up (unconstrained HC: gains in the thousands).

Sinkhorn tolerance: the last normalization is over columns, so column sums are 1 to float
rounding (~2e-7); row sums converge geometrically, slowest for near-permutation matrices
(the near-identity H_res that training starts from). Worst row-sum error measured by
tests/test_mhc.py (near-identity logits, biases perturbed by N(0, 1), dynamic gates at 1):
2e-2 after 20 iterations (the paper's count), 2e-3 after 50, 1e-3 (n = 2) / 2e-5 (n = 4)
after 100; random logits of std 0.5: below 1e-6 after 20. SINKHORN_TOL is the 20-iteration
bound; raise `sinkhorn_iters` to tighten it, or take `res = "lite"`, exact by construction.
Over depth, the forward gain of the product of L matrices is then <= (1 + tol)^L (columns,
the backward gain, stay exact); the paper reports ~1.6 for its 20-iteration mHC.

Symmetry: the streams start as copies of the token embedding. If every stream were read
and written alike they would stay identical forever and H_res would get zero gradient (the
predecessor's bug), so H_post starts spread over [0.5, 1.5] (mean 1: the streams' mean
then updates like a plain residual) in an order rotated per sub-layer, and H_pre starts
favouring stream (sub-layer index mod n). The GPT collapses the streams by their mean
before the final norm. n = 1 has no free coefficient (a 1x1 doubly stochastic H_res is 1;
a single stream's H_pre / H_post gains are absorbed by the pre-norm and the BitLinear
scale), so the GPT builds no MHC module for n = 1 and runs the plain residual.

Memory (training): autograd keeps each sub-layer's n input streams (the mixing needs them),
the sub-layer output and a few per-token coefficients; the dynamic projection is computed
as (x phi^T) / rms(x) so no normed copy of the streams is kept, and Sinkhorn is recomputed
in the backward instead of keeping its 2 * iters intermediate matrices. Precision: the
coefficients and the stream mixing run in full precision under autocast.

    nanochat bench arch            # step time and measured activation bytes vs plain
    pytest tests/test_mhc.py
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SINKHORN_TOL = 2e-2  # worst row-sum error after 20 iterations (module doc)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic (..., n, n) from logits (..., n, n): exp, then `iters` rounds of
    row then column normalization (columns exact, rows within the module doc's tolerance)."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


def permutation_matrices(n: int) -> torch.Tensor:
    """All n! permutation matrices (n!, n, n), the identity first."""
    perms = list(itertools.permutations(range(n)))
    eye = torch.eye(n)
    return torch.stack([eye[list(p)] for p in perms])


def mix(x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], h_pre: torch.Tensor,
        h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    """x_next = H_res x + H_post^T F(H_pre x) for x (B, T, n, C); the coefficients are
    static (n,), (n,), (n, n) or per token (B, T, n), (B, T, n), (B, T, n, n). The mixing
    runs in x's precision even under autocast (a bf16 matmul would round the residual
    streams at every sub-layer, which the plain residual's fp32 add does not); F itself
    runs under whatever autocast is active."""
    with torch.autocast(x.device.type, enabled=False):
        inp = (h_pre.unsqueeze(-2) @ x).squeeze(-2)  # (B, T, C)
    y = f(inp)
    with torch.autocast(x.device.type, enabled=False):
        return h_res @ x + h_post.unsqueeze(-1) * y.to(x.dtype).unsqueeze(-2)  # (B, T, n, C)


class MHC(nn.Module):
    """The coefficients of one sub-layer's hyper-connection, and the mixing around F."""

    def __init__(self, n: int, d_model: int, res: str = "sinkhorn", sinkhorn_iters: int = 20,
                 dynamic: bool = True, eps: float = 1e-5, device=None):
        super().__init__()
        if n < 2:
            raise ValueError(f"MHC: streams must be >= 2 (1 is the plain residual), got {n}")
        if res not in ("sinkhorn", "lite"):
            raise ValueError(f"MHC: res must be 'sinkhorn' or 'lite', got {res!r}")
        self.n, self.d_model, self.res, self.iters, self.eps = n, d_model, res, sinkhorn_iters, eps
        self.n_res = n * n if res == "sinkhorn" else math.factorial(n)
        kw = dict(device=device, dtype=torch.float32)
        self.b_pre = nn.Parameter(torch.zeros(n, **kw))
        self.b_post = nn.Parameter(torch.zeros(n, **kw))
        self.b_res = nn.Parameter(torch.zeros(self.n_res, **kw))
        self.dynamic = dynamic
        if dynamic:
            # one projection for all three (out, in) like nn.Linear: [pre | post | res]
            self.phi = nn.Parameter(torch.zeros(2 * n + self.n_res, n * d_model, **kw))
            self.alpha = nn.Parameter(torch.zeros(3, **kw))  # gates of pre, post, res
        if res == "lite":
            self.register_buffer("perms", permutation_matrices(n).to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, std: float, index: int) -> None:
        """Near-identity H_res, asymmetric H_pre / H_post (see the module doc); `index` is
        the sub-layer's position in the network, which rotates the asymmetry."""
        n = self.n
        r = index % n
        pre = torch.full((n,), 0.0)
        pre[r] = 2.0  # sigmoid: 0.88 on the favoured stream, 0.5 on the others
        post = torch.linspace(0.5, 1.5, n).roll(r) / 2  # 2 sigmoid(b) spread over [0.5, 1.5]
        self.b_pre.copy_(pre)
        self.b_post.copy_(torch.log(post / (1 - post)))
        if self.res == "sinkhorn":  # diagonal 3 above the rest: ~0.87 kept per stream (n=4)
            self.b_res.copy_(3.0 * torch.eye(n).flatten())
        else:  # identity permutation 4 above the rest
            self.b_res.zero_()
            self.b_res[0] = 4.0
        if self.dynamic:
            nn.init.normal_(self.phi, 0.0, std)
            self.alpha.fill_(0.01)

    def coefficients(self, x: torch.Tensor):
        """H_pre, H_post, H_res for streams x (B, T, n, C): static shapes (n,), (n,), (n, n)
        or, dynamic, per token (B, T, n), (B, T, n), (B, T, n, n)."""
        n = self.n
        pre, post, res = self.b_pre, self.b_post, self.b_res
        if self.dynamic:
            # rms_norm(x) phi^T computed as (x phi^T) / rms(x): the same value, but autograd
            # keeps x (already saved by the mixing) and one scale per token instead of a
            # normed copy of all n streams
            xf = x.flatten(-2)  # (B, T, n*C)
            r = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
            dyn = F.linear(xf, self.phi) * r  # (B, T, 2n + n_res)
            pre = pre + self.alpha[0] * dyn[..., :n]
            post = post + self.alpha[1] * dyn[..., n:2 * n]
            res = res + self.alpha[2] * dyn[..., 2 * n:]
        h_pre = torch.sigmoid(pre)
        h_post = 2 * torch.sigmoid(post)
        if self.res == "sinkhorn":
            logits = res.unflatten(-1, (n, n))
            if torch.is_grad_enabled() and logits.requires_grad:
                # recomputed in the backward: saves the logits, not 2 * iters (n, n) steps
                h_res = checkpoint(sinkhorn, logits, self.iters, use_reentrant=False)
            else:
                h_res = sinkhorn(logits, self.iters)
        else:  # (..., n!) weights times (n!, n, n) permutations
            w = torch.softmax(res, dim=-1)
            h_res = (w @ self.perms.flatten(1)).unflatten(-1, (n, n))
        return h_pre, h_post, h_res

    def forward(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # coefficients in full precision
            coeffs = self.coefficients(x)
        return mix(x, f, *coeffs)

    def extra_repr(self) -> str:
        return (f"streams={self.n}, res={self.res}, sinkhorn_iters={self.iters}, "
                f"dynamic={self.dynamic}")
