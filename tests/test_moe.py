"""Mixture of ternary experts (nanochat/model/moe.py): the dispatched layer equals a dense loop
over experts (outputs and gradients), the router learns, the aux-loss-free bias balances the
load, and the GPT counts active vs total parameters."""

import pytest
import torch
import torch.nn.functional as F
from nanochat.config import ConfigError, ModelConfig, MoEConfig, load_config
from nanochat.model.gpt import GPT, model_info
from nanochat.model.moe import MoE
from nanochat.ops.bitlinear import bitlinear_torch

torch.set_num_threads(1)


def _moe(E=6, k=2, shared=False, balance="bias", rate=1e-3, d=32, H=48, act="silu", seed=0):
    torch.manual_seed(seed)
    m = MoE(d, H, E, k, shared_expert=shared, balance=balance, bias_rate=rate, activation=act)
    m.reset_parameters(0.2, 0.1)
    return m


def reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token with BitLinear (bitlinear_torch on its 2-D weight), summed
    with the gate weights (zero for the experts a token did not select)."""
    x2 = x.reshape(-1, x.shape[-1])
    scores = torch.sigmoid(x2 @ m.ffn_gate_inp.t())
    top = torch.topk(scores.detach() + m.expert_bias, m.top_k, dim=-1).indices
    sel = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)
    gates = torch.where(sel, scores, torch.zeros_like(scores))
    if m.top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)

    def act(g):
        return F.silu(g) if m.activation == "silu" else F.relu(g).square()

    y = torch.zeros_like(x2)
    for e in range(m.experts):
        h = act(bitlinear_torch(x2, m.ffn_gate_exps[e])) * bitlinear_torch(x2, m.ffn_up_exps[e])
        h = F.rms_norm(h, (m.hidden,), m.ffn_sub_norm_exps[e], m.eps)
        y = y + gates[:, e:e + 1] * bitlinear_torch(h, m.ffn_down_exps[e])
    if m.shared:
        h = act(bitlinear_torch(x2, m.ffn_gate_shexp.weight)) * bitlinear_torch(
            x2, m.ffn_up_shexp.weight)
        h = F.rms_norm(h, (m.hidden,), m.ffn_sub_norm_shexp, m.eps)
        y = y + bitlinear_torch(h, m.ffn_down_shexp.weight)
    return y.reshape(x.shape)


@pytest.mark.parametrize("E,k,shared,act", [(6, 2, False, "silu"), (6, 1, False, "silu"),
                                            (8, 3, True, "relu2"), (4, 4, True, "silu")])
def test_equals_dense_loop_over_experts(E, k, shared, act):
    m = _moe(E, k, shared, act=act)
    x = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    m.eval()  # no bias update, so both see the same bias
    with torch.no_grad():
        m.expert_bias.copy_(torch.randn(E) * 0.1)
    y = m(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    y_ref = reference(m, x)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *m.parameters()], allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a),
                                   rtol=1e-4, atol=1e-5, msg=name)


def test_router_and_experts_get_gradients():
    m = _moe(E=6, k=2)
    x = torch.randn(64, 32)
    m(x).square().sum().backward()
    assert m.ffn_gate_inp.grad.abs().sum(-1).gt(0).sum() >= 2  # the router learns
    assert m.ffn_gate_exps.grad.flatten(1).abs().sum(-1).gt(0).sum() == int((m.load > 0).sum())
    # k = 1: the gate is the raw score, so the router still gets gradient
    m1 = _moe(E=6, k=1)
    m1(x).square().sum().backward()
    assert m1.ffn_gate_inp.grad.abs().sum() > 0


def test_dispatch_counts_and_no_token_loop():
    m = _moe(E=5, k=2)
    x = torch.randn(100, 32)
    m(x)
    assert m.load.sum().item() == 200 and m.load.shape == (5,)


def _run_load(balance: str, steps=60) -> float:
    """Train one MoE layer on inputs sharing a common component (some experts score higher
    for every token; unbalanced, the skew grows as the router trains: CV 0.83 at step 0,
    1.31 at the end) and return the load's coefficient of variation over the last 10 steps
    (bias-balanced: 0.19)."""
    m = _moe(E=8, k=2, balance=balance, rate=0.02, seed=3)
    m.train()
    g = torch.Generator().manual_seed(0)
    common = torch.randn(32, generator=g)
    target = torch.randn(32, 32, generator=g) / 6
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    cv = []
    for step in range(steps):
        x = torch.randn(256, 32, generator=g) + common
        loss = (m(x) - x @ target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= steps - 10:
            cv.append((m.load.std() / m.load.mean()).item())
    return sum(cv) / len(cv)


def test_bias_balances_the_load():
    none, bias = _run_load("none"), _run_load("bias")
    assert none > 0.8  # without balancing a few experts take most tokens
    assert bias < 0.5 * none, (bias, none)


def test_bias_only_moves_in_training():
    m = _moe(E=4, k=1, rate=0.1)
    x = torch.randn(50, 32) + 2
    m.eval()
    m(x)
    assert m.expert_bias.abs().sum() == 0
    m.train()
    with torch.no_grad():
        m(x)
    assert m.expert_bias.abs().sum() == 0  # no grad: evaluation / generation
    m(x)
    assert m.expert_bias.abs().sum() > 0
    m2 = _moe(E=4, k=1, rate=0.1, balance="none")
    m2.train()
    m2(x)
    assert m2.expert_bias.abs().sum() == 0


# ---- in the GPT -----------------------------------------------------------------------


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=2, n_kv_heads=1,
                       ffn_hidden=96, max_seq_len=64, moe=MoEConfig(**moe))


def test_gpt_counts_active_and_total():
    cfg = _cfg(experts=8, top_k=2, shared_expert=True, expert_hidden=64)
    model = GPT(cfg, bitlinear="torch")
    n = model.num_params()
    per_expert = 3 * 64 * 64 + 64
    assert n["total"] - n["active"] == 3 * (8 - 2) * per_expert
    assert n["router"] == 3 * 8 * 64
    assert n["total"] == sum(p.numel() for p in model.parameters())
    info = model_info(cfg)
    assert (info["total_params"], info["active_params"]) == (n["total"], n["active"])
    kinds = {k: {name for name, _ in v} for k, v in model.parameter_kinds().items()}
    assert "blocks.0.moe.ffn_gate_exps" in kinds["matrix"]
    assert "blocks.0.moe.ffn_down_shexp.weight" in kinds["matrix"]
    assert "blocks.0.moe.ffn_gate_inp" in kinds["scalar"]
    assert "blocks.0.moe.ffn_sub_norm_exps" in kinds["scalar"]
    assert sum(len(v) for v in kinds.values()) == len(list(model.parameters()))


def test_gpt_short_run_trains_router_and_bias():
    torch.manual_seed(0)
    model = GPT(_cfg(experts=4, top_k=2, bias_rate=0.01), bitlinear="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for b in model.blocks:
        assert b.moe.ffn_gate_inp.grad.abs().sum() > 0
        assert b.moe.expert_bias.abs().sum() > 0
        assert b.moe.load.sum() == 4 * 32 * 2
    # the generation path (no grad) runs the same experts
    out = model.generate(idx[:, :4], 6, temperature=0)
    seq = idx[:, :4]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_config_validation_and_dense_default():
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        load_config("tiny", ["model.moe.experts=4", "model.moe.top_k=5"])
    with pytest.raises(ConfigError, match="model.moe.balance"):
        load_config("tiny", ["model.moe.balance=aux"])
    model = GPT(_cfg(), bitlinear="torch")  # experts = 0: the dense FFN, no MoE module
    assert all(b.moe is None and hasattr(b, "ffn_gate") for b in model.blocks)
