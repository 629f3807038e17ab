"""mHC residual streams (nanochat/model/mhc.py): doubly stochastic H_res, gains over depth, n = 1
is the plain residual, and a short training run where the streams diverge and every mHC
parameter gets gradient (the predecessor's streams stayed identical forever)."""

import math

import pytest
import torch
from nanochat.config import MHCConfig, ModelConfig
from nanochat.model.gpt import GPT
from nanochat.model.mhc import MHC, SINKHORN_TOL, mix, permutation_matrices, sinkhorn

torch.set_num_threads(1)


def _cfg(streams=4, res="sinkhorn", dynamic=True, iters=20, layers=2) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=64, n_layers=layers, n_heads=2, n_kv_heads=1,
                       ffn_hidden=128, max_seq_len=64,
                       mhc=MHCConfig(streams=streams, res=res, sinkhorn_iters=iters,
                                     dynamic=dynamic))


def _model(seed=0, bitlinear="torch", **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(_cfg(**kw), bitlinear=bitlinear)


def _record_h_res(model: GPT):
    """Patch every MHC's coefficients to record H_res; returns the list it fills."""
    seen = []
    for m in model.modules():
        if isinstance(m, MHC):
            orig = m.coefficients

            def rec(x, orig=orig):
                out = orig(x)
                seen.append(out[2].detach())
                return out
            m.coefficients = rec
    return seen


# ---- H_res is doubly stochastic ------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_sinkhorn_doubly_stochastic(n):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(20000, n, n, generator=g) * 0.5
    m = sinkhorn(logits, 20)
    assert (m >= 0).all()
    assert (m.sum(-2) - 1).abs().max() < 1e-6  # columns: the last normalization
    assert (m.sum(-1) - 1).abs().max() < 1e-5  # rows: converged


def test_sinkhorn_iterations_matter():
    logits = torch.randn(100, 4, 4, generator=torch.Generator().manual_seed(0))
    err = [(sinkhorn(logits, k).sum(-1) - 1).abs().max().item() for k in (1, 5, 20)]
    assert err[0] > err[1] > err[2]


def test_permutation_matrices():
    p = permutation_matrices(4)
    assert p.shape == (24, 4, 4) and torch.equal(p[0], torch.eye(4))
    assert (p.sum(-1) == 1).all() and (p.sum(-2) == 1).all()
    assert len({tuple(x.flatten().tolist()) for x in p}) == 24


def _perturbed(n, res, dynamic, iters, trial, scale=1.0) -> MHC:
    m = MHC(n, 32, res=res, dynamic=dynamic, sinkhorn_iters=iters)
    m.reset_parameters(0.02, trial)
    with torch.no_grad():  # move away from the init, as training would
        for p in (m.b_pre, m.b_post, m.b_res):
            p.add_(torch.randn_like(p) * scale)
        if dynamic:
            m.alpha.fill_(1.0)  # a strong dynamic part
    return m


@pytest.mark.parametrize("res,iters,tol", [("sinkhorn", 20, SINKHORN_TOL),
                                           ("sinkhorn", 100, 2e-3), ("lite", 20, 1e-5)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_coefficients_over_random_inputs(res, iters, tol, dynamic):
    """The documented tolerance (mhc.py) over 100 perturbed modules and random inputs."""
    torch.manual_seed(0)
    for trial in range(100):
        n = (2, 4)[trial % 2]
        m = _perturbed(n, res, dynamic, iters, trial)
        x = torch.randn(2, 9, n, 32) * (1 + trial)
        h_pre, h_post, h_res = m.coefficients(x)
        lead = (2, 9) if dynamic else ()
        assert h_pre.shape == (*lead, n) and h_res.shape == (*lead, n, n)
        assert ((h_pre > 0) & (h_pre < 1)).all() and ((h_post > 0) & (h_post < 2)).all()
        assert (h_res >= 0).all()
        assert (h_res.sum(-1) - 1).abs().max() < tol
        assert (h_res.sum(-2) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("res", ["sinkhorn", "lite"])
def test_product_over_depth_keeps_gain(res):
    """Per token, the product of every sub-layer's H_res (8 layers: 16 matrices) has max
    row sum (forward gain) and max column sum (backward gain) <= 1 + tolerance."""
    model = _model(res=res, layers=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MHC):
                m.b_res.add_(torch.randn_like(m.b_res))
                m.alpha.fill_(1.0)  # a strong dynamic part
    seen = _record_h_res(model)
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(idx)
    assert len(seen) == 16
    prod = seen[0]
    for h in seen[1:]:
        prod = h @ prod
    tol = (1 + SINKHORN_TOL) ** 16 - 1 if res == "sinkhorn" else 1e-5
    assert (prod >= 0).all()
    assert prod.sum(-1).max() <= 1 + tol  # forward gain
    assert prod.sum(-2).max() <= 1 + 1e-5  # backward gain: columns stay exact
    assert prod.sum(-1).min() >= 1 - tol  # no gain loss either


def test_static_has_no_dynamic_parameters():
    m = MHC(4, 32, dynamic=False)
    assert {n for n, _ in m.named_parameters()} == {"b_pre", "b_post", "b_res"}
    lite = MHC(4, 32, res="lite")
    assert lite.b_res.shape == (24,) and lite.phi.shape == (2 * 4 + 24, 4 * 32)


# ---- n = 1 is the plain residual -----------------------------------------------------


def test_one_stream_is_bit_identical_to_plain_residual():
    plain = _model(streams=1)
    torch.manual_seed(0)
    default = GPT(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                              ffn_hidden=128, max_seq_len=64), bitlinear="torch")
    assert plain.state_dict().keys() == default.state_dict().keys()
    for k, v in default.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    idx = torch.randint(0, 256, (2, 24))
    assert torch.equal(plain(idx), default(idx))


def test_mix_with_unit_coefficients_is_the_residual():
    """The mixing rule itself at n = 1 (H_res = H_pre = H_post = 1): x + F(x) bit for bit."""
    x = torch.randn(2, 5, 16)
    f = torch.nn.Linear(16, 16)
    one = torch.ones(1)
    y = mix(x[:, :, None], f, one, one, one[:, None])
    assert torch.equal(y[:, :, 0], x + f(x))


def test_mix_matches_explicit_formula():
    n, c = 4, 8
    x = torch.randn(2, 3, n, c)
    h_pre, h_post = torch.rand(2, 3, n), 2 * torch.rand(2, 3, n)
    h_res = sinkhorn(torch.randn(2, 3, n, n), 20)
    f = torch.nn.Linear(c, c)
    y = mix(x, f, h_pre, h_post, h_res)
    for b in range(2):
        for t in range(3):
            inp = sum(h_pre[b, t, i] * x[b, t, i] for i in range(n))
            out = f(inp)
            for i in range(n):
                ref = sum(h_res[b, t, i, j] * x[b, t, j] for j in range(n)) + h_post[b, t, i] * out
                torch.testing.assert_close(y[b, t, i], ref, rtol=1e-5, atol=1e-6)


# ---- training: streams diverge, every parameter learns --------------------------------


def _stream_spread(model: GPT, idx) -> float:
    """max |x_i - x_j| / max |x| over the last block's output streams."""
    out = {}
    h = model.blocks[-1].register_forward_hook(lambda m, a, o: out.setdefault("x", o))
    with torch.no_grad():
        model(idx)
    h.remove()
    x = out["x"]  # (B, T, n, C)
    return ((x - x[:, :, :1]).abs().max() / x.abs().max()).item()


def _train(model: GPT, steps=12, grad_max: dict | None = None):
    """`grad_max`, if given, gets each parameter's largest |gradient| over the steps."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        start = torch.randint(0, 200, (4, 1), generator=g)
        idx = (start + torch.arange(33)) % 256  # learnable: counting sequences
        opt.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if grad_max is not None:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grad_max[n] = max(grad_max.get(n, 0.0), float(p.grad.abs().max()))
        opt.step()
    return idx


@pytest.mark.parametrize("streams,res,dynamic", [(4, "sinkhorn", True), (2, "sinkhorn", True),
                                                  (4, "lite", True), (4, "sinkhorn", False)])
def test_short_run_streams_differ_and_every_mhc_param_learns(streams, res, dynamic):
    model = _model(streams=streams, res=res, dynamic=dynamic)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mhc_" in n}
    assert len(before) == 2 * 2 * (5 if dynamic else 3)
    grad_max: dict = {}
    idx = _train(model, grad_max=grad_max)
    assert _stream_spread(model, idx) > 1e-2
    for n, p in model.named_parameters():
        if ".mhc_" in n:
            # over the run, not the last step: a static Sinkhorn matrix near a permutation
            # (b_res's diagonal starts at 3) can pass an all-zero float32 gradient some steps
            assert grad_max.get(n, 0.0) > 0, n
            assert not torch.equal(p.detach(), before[n]), n


def test_symmetric_init_keeps_streams_identical():
    """The trap the init avoids, as a control that the spread measure can fail: identical
    coefficients for every stream keep the streams bit-identical through training."""
    model = _model(streams=4, dynamic=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MHC):
                m.b_pre.fill_(0.0)
                m.b_post.fill_(0.0)
                m.b_res.fill_(1.0)
    idx = _train(model, steps=3)
    assert _stream_spread(model, idx) == 0.0
    assert all(m.b_res.grad.abs().max() == 0 for m in model.modules() if isinstance(m, MHC))


def test_mhc_parameters_are_scalar_kind():
    model = _model(streams=4)
    kinds = model.parameter_kinds()
    scalar = {n for n, _ in kinds["scalar"]}
    assert all(n in scalar for n, _ in model.named_parameters() if ".mhc_" in n)
    assert sum(len(v) for v in kinds.values()) == len(list(model.parameters()))
    n = model.num_params()
    assert n["mhc"] == sum(p.numel() for name, p in model.named_parameters() if ".mhc_" in name)
    assert n["total"] == n["active"]


def test_generate_with_streams_matches_full_forward():
    model = _model(streams=4)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 10, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_collapse_is_mean_and_gain_preserved_at_init():
    """Expand + the identity-leaning init: each stream's H_post averages to 1, so the mean
    stream updates like the plain residual's x + F(x)."""
    m = MHC(4, 16, dynamic=False)
    m.reset_parameters(0.02, 0)
    _, h_post, h_res = m.coefficients(torch.zeros(1, 1, 4, 16))
    assert h_post.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert len(set(h_post.tolist())) == 4  # asymmetric
    assert (h_res.diagonal() > 0.8).all() and math.isclose(h_res.sum().item(), 4, rel_tol=1e-6)


def test_mixing_stays_full_precision_under_autocast():
    """F runs under bf16 autocast; the coefficients and the stream mixing do not."""
    m = MHC(4, 16)
    m.reset_parameters(0.02, 0)
    x = torch.randn(2, 3, 4, 16)
    lin = torch.nn.Linear(16, 16)
    outs = []

    def f(h):
        assert h.dtype == torch.float32
        outs.append(lin(h))
        return outs[-1]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, f)
    assert outs[0].dtype == torch.bfloat16 and y.dtype == torch.float32
    _, h_post, h_res = m.coefficients(x)
    assert torch.equal(y, h_res @ x + h_post.unsqueeze(-1) * outs[0].float().unsqueeze(-2))


def test_recomputed_sinkhorn_gradient_matches_direct():
    """The module recomputes Sinkhorn in the backward (checkpoint); same values, same
    gradients as differentiating through the iterations directly."""
    m = MHC(4, 16)
    m.reset_parameters(0.02, 1)
    x = torch.randn(2, 5, 4, 16)
    w = torch.randn(2, 5, 4, 4)
    (m.coefficients(x)[2] * w).sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    dyn = torch.nn.functional.linear(x.flatten(-2), m.phi)
    dyn = dyn * torch.rsqrt(x.flatten(-2).square().mean(-1, keepdim=True) + m.eps)
    logits = (m.b_res + m.alpha[2] * dyn[..., 8:]).unflatten(-1, (4, 4))
    (sinkhorn(logits, m.iters) * w).sum().backward()
    for n in ("b_res", "phi", "alpha"):
        torch.testing.assert_close(got[n], m.__getattr__(n).grad, rtol=1e-5, atol=1e-7)
