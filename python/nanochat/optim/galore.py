"""GaLore 2 (Zhao et al. 2024; GaLore 2, 2025): low-rank gradient projection, so the optimizer
state of an (m, n) matrix lives at rank r instead of full size.

Every T steps the projector is refreshed from the current gradient by a randomized SVD
(Halko et al.: Gaussian sketch, power iterations with QR re-orthonormalization, SVD of the
small projected matrix). With m >= n, P = Vh[:r] (r, n) and R = G P^T (m, r); otherwise
P = U[:, :r] (m, r) and R = P^T G (r, n). Adam runs on R, so its moments have R's shape
(2 m r floats instead of 2 m n: the whole saving, plus the projector itself), and the update
is projected back as alpha * (N P) or alpha * (P N), N being Adam's normalized step on R.

    state per matrix: projector (r, n) or (m, r); exp_avg, exp_avg_sq at R's shape
    (fp32, or 8-bit with optim.state = "8bit", through the same fused C++ kernel)

The projector's random sketch is seeded from (param index, step), so a resumed run draws
the same projectors. Muon is not combined with GaLore: Muon's state is already one tensor
(4 bytes/param, 1 with 8-bit state, below GaLore's), and orthogonalizing inside a rank-r
subspace changes what Muon's update is; the config rejects galore with optim.name = muon.
"""

from __future__ import annotations

import torch


def randomized_svd(g: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 2,
                   generator: torch.Generator | None = None):
    """Top-`rank` (U (m, r), S (r,), Vh (r, n)) of a 2-D g."""
    m, n = g.shape
    k = min(rank + oversample, m, n)
    x = g.float()
    omega = torch.randn(n, k, generator=generator, device=g.device, dtype=torch.float32)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(x.mT @ q)
        q, _ = torch.linalg.qr(x @ z)
    ub, s, vh = torch.linalg.svd(q.mT @ x, full_matrices=False)  # (k, n): cheap
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def make_projector(g: torch.Tensor, rank: int, oversample: int, power_iters: int,
                   seed: int) -> torch.Tensor:
    gen = torch.Generator(device=g.device).manual_seed(seed)
    u, _, vh = randomized_svd(g, rank, oversample, power_iters, gen)
    return vh.contiguous() if g.shape[0] >= g.shape[1] else u.contiguous()


def project(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(m, n) -> R: (m, r) with a (r, n) projector, (r, n) with a (m, r) one."""
    return g @ p.mT if g.shape[0] >= g.shape[1] else p.mT @ g


def project_back(r: torch.Tensor, p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return r @ p if shape[0] >= shape[1] else p @ r


def projected_shape(shape: torch.Size, rank: int) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if m >= n else (rank, n)


def seed_for(index: int, step: int) -> int:
    return (index * 1_000_003 + step * 7919 + 12345) % (2 ** 62)
