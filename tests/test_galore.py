"""GaLore 2: the randomized SVD finds the top singular subspace, project-then-back-project
is the rank-r approximation, the projector refreshes only every T steps, the optimizer state
has the projected shape (no full-size moment anywhere), and the memory is really saved."""

from __future__ import annotations

import pytest
import torch
from nanochat.optim import HybridOptimizer, state_bytes
from nanochat.optim import galore as gl
from torch import nn


def low_rank_plus_noise(m, n, r, seed=0):
    """A matrix with r dominant singular values (10..5) and a small tail (<= 0.01)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = torch.cat([torch.linspace(10, 5, r), torch.linspace(0.01, 0.001, min(m, n) - r)])
    return (u * s) @ v.T, s


@pytest.mark.parametrize("m,n", [(96, 64), (64, 96)])
def test_project_back_project_is_the_rank_r_approximation(m, n):
    r = 8
    g, _ = low_rank_plus_noise(m, n, r)
    p = gl.make_projector(g, r, oversample=8, power_iters=2, seed=1)
    assert p.shape == ((r, n) if m >= n else (m, r))
    assert torch.allclose(p @ p.T if m >= n else p.T @ p, torch.eye(r), atol=1e-5)  # orthonormal
    R = gl.project(g, p)
    assert R.shape == gl.projected_shape(g.shape, r)
    back = gl.project_back(R, p, g.shape)
    U, S, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart-Young: the best rank-r approximation
    assert torch.allclose(back.double(), best, atol=1e-4), (back.double() - best).abs().max()


def test_randomized_svd_singular_values():
    g, s = low_rank_plus_noise(120, 80, 6, seed=2)
    _, S, _ = gl.randomized_svd(g, 6, 8, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(S, s[:6], rtol=1e-4)


def _galore_group(params, **kw):
    g = {"params": params, "name": "matrix", "algo": "adamw", "lr": 1e-2, "base_lr": 1e-2,
         "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "state": "fp32",
         "block": 256, "min_8bit": 1024, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
         "muon_scale": "moonlight",
         "galore": {"rank": 4, "update_every": 3, "alpha": 0.25, "oversample": 4,
                    "power_iters": 1}}
    g.update(kw)
    return g


@pytest.mark.parametrize("state", ["fp32", "8bit"])
def test_projector_refreshes_every_T_steps_and_state_is_projected(state):
    tall = nn.Parameter(torch.randn(64, 32))
    wide = nn.Parameter(torch.randn(32, 64))
    opt = HybridOptimizer([_galore_group([tall, wide], state=state, min_8bit=64)])
    gen = torch.Generator().manual_seed(0)
    projectors = []
    for _ in range(7):
        tall.grad = torch.randn(64, 32, generator=gen)
        wide.grad = torch.randn(32, 64, generator=gen)
        opt.step()
        projectors.append(opt.state[tall]["projector"].clone())
    changed = [not torch.equal(projectors[i], projectors[i - 1]) for i in range(1, 7)]
    # refreshed before steps 1, 4, 7 (step counts 0, 3, 6): changes seen at indices 3 and 6
    assert changed == [False, False, True, False, False, True]
    for p, shape, pshape in ((tall, (64, 4), (4, 32)), (wide, (4, 64), (32, 4))):
        st = opt.state[p]
        assert st["projector"].shape == pshape
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].numel() == shape[0] * shape[1]  # projected: (m, r) or (r, n)
            if state == "fp32":
                assert st[k].shape == shape
            else:
                assert st[k].dtype in (torch.int8, torch.uint8)
        # no tensor in the state is as large as the parameter
        assert all(v.numel() < p.numel() for v in st.values() if torch.is_tensor(v))


def test_galore_saves_memory_and_still_descends():
    """A least-squares problem: GaLore state is far below AdamW's and the loss falls."""
    torch.manual_seed(0)
    A = torch.randn(256, 64)
    target = torch.randn(256, 64) @ torch.randn(64, 64) * 0.1
    w_g = nn.Parameter(torch.zeros(64, 64))
    w_a = nn.Parameter(torch.zeros(64, 64))
    gal = HybridOptimizer([_galore_group([w_g], lr=0.05, weight_decay=0.0,
                                         galore={"rank": 16, "update_every": 10, "alpha": 1.0,
                                                 "oversample": 4, "power_iters": 1})])
    ada = HybridOptimizer([_galore_group([w_a], lr=0.05, weight_decay=0.0, galore=None)])
    first = None
    for _ in range(60):
        for w, opt in ((w_g, gal), (w_a, ada)):
            loss = (A @ w - target).square().mean()
            first = float(loss.detach()) if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
    final = float((A @ w_g - target).square().mean().detach())
    assert final < 0.8 * first
    # AdamW: 2 x 64 x 64 floats; GaLore at rank 16: 2 x 64 x 16 + projector 16 x 64
    assert state_bytes(gal) < 0.5 * state_bytes(ada)
