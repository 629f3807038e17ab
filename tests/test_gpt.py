"""The GPT (llama.cpp `bitnet` graph): shapes, RoPE, GQA, tied embeddings, KV-cache
generation, a small overfit run on both BitLinear paths, configs and `nanochat model info`."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import clean_env
from nanochat.config import CONFIG_DIR, ConfigError, ModelConfig, load_config
from nanochat.model.bitlinear import BitLinear
from nanochat.model.block import RMSNorm, apply_rope, rope_cos_sin
from nanochat.model.gpt import GPT, model_info

# Small shapes: run single-threaded (conftest.one_thread explains why).
pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = ModelConfig(vocab_size=384, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                    ffn_hidden=512, max_seq_len=64)


def _model(kernel="auto", seed=0, **over):
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(SMALL, **over), bitlinear=kernel)


def _idx(b=2, t=12, seed=0, vocab=SMALL.vocab_size):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- structure --------------------------------------------------------------------


def test_shapes_gqa_and_names():
    m = _model()
    blk = m.blocks[0]
    hd = SMALL.d_model // SMALL.n_heads
    assert blk.attn_q.weight.shape == (SMALL.n_heads * hd, SMALL.d_model)
    assert blk.attn_k.weight.shape == (SMALL.n_kv_heads * hd, SMALL.d_model)
    assert blk.attn_v.weight.shape == (SMALL.n_kv_heads * hd, SMALL.d_model)
    assert blk.attn_sub_norm.weight.shape == (SMALL.d_model,)
    assert blk.ffn_sub_norm.weight.shape == (SMALL.ffn_hidden,)
    names = {n for n, _ in m.named_parameters()}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blocks.{i}.{t}.weight" for i in range(SMALL.n_layers) for t in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
            "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down")}
    assert names == expected  # GGUF names one to one; no bias, no separate LM head
    logits, loss = m(_idx(), _idx(seed=1))
    assert logits.shape == (2, 12, SMALL.vocab_size) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.5  # near uniform at init


def test_no_bias_and_only_bitlinear_matrices():
    m = _model()
    assert not any(isinstance(x, torch.nn.Linear) for x in m.modules())
    assert not any("bias" in n for n, _ in m.named_parameters())
    for b in m.blocks:
        assert sum(isinstance(x, BitLinear) for x in b.modules()) == 7


def test_tied_embedding_is_one_parameter():
    m = _model()
    params = list(m.parameters())
    assert sum(p is m.token_embd.weight for p in params) == 1
    idx = _idx()
    h = m.forward_hidden(idx)
    assert h.shape == (2, 12, SMALL.d_model)
    torch.testing.assert_close(m(idx), h @ m.token_embd.weight.T)
    # the LM head's gradient lands on the embedding
    m(idx).sum().backward()
    unseen = ~torch.isin(torch.arange(SMALL.vocab_size), idx)
    assert m.token_embd.weight.grad[unseen].abs().sum() > 0


def test_parameter_kinds():
    m = _model()
    k = m.parameter_kinds()
    assert [n for n, _ in k["embedding"]] == ["token_embd.weight"]
    assert all(p.ndim == 1 for _, p in k["scalar"]) and all(p.ndim == 2 for _, p in k["matrix"])
    assert len(k["matrix"]) == 7 * SMALL.n_layers
    assert sum(len(v) for v in k.values()) == len(list(m.parameters()))


def test_init():
    m = _model(n_layers=4)
    std = SMALL.init_std
    assert m.token_embd.weight.std().item() == pytest.approx(std, rel=0.05)
    assert m.blocks[0].attn_q.weight.std().item() == pytest.approx(std, rel=0.05)
    out_std = std / math.sqrt(2 * 4)
    assert m.blocks[1].ffn_down.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert m.blocks[1].attn_output.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert all(x.weight.eq(1).all() for x in m.modules() if isinstance(x, RMSNorm))


def test_num_params_breakdown():
    m = _model()
    c, hd = SMALL, SMALL.d_model // SMALL.n_heads
    d, kv, f = c.d_model, c.n_kv_heads * hd, c.ffn_hidden
    per = 2 * d * d + 2 * d * kv + 3 * d * f
    n = m.num_params()
    assert n["ternary"] == c.n_layers * per
    assert n["embedding"] == c.vocab_size * c.d_model
    assert n["norm"] == c.n_layers * (3 * c.d_model + c.ffn_hidden) + c.d_model
    assert n["total"] == n["active"] == n["ternary"] + n["embedding"] + n["norm"]
    mem = m.estimate_memory(2, 32)
    assert mem["training_state_bytes"] > 16 * n["total"]
    assert n["ternary"] // 4 < mem["packed_inference_bytes"] < n["total"] * 2


# ---- RoPE ---------------------------------------------------------------------------


def _rot(x, pos, theta=10000.0):
    cos, sin = rope_cos_sin(torch.tensor([pos]), x.shape[-1], theta)
    return apply_rope(x.view(1, 1, 1, -1), cos, sin).view(-1)


def test_rope_is_relative():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, generator=g, dtype=torch.float64).float(), torch.randn(64, generator=g)
    for delta in (0, 1, 7, 30):
        dots = [torch.dot(_rot(q, m + delta), _rot(k, m)).item() for m in (0, 5, 40, 200)]
        assert max(dots) - min(dots) < 1e-4 * max(1.0, abs(dots[0]))
    assert abs(torch.dot(_rot(q, 3), _rot(k, 0)) - torch.dot(_rot(q, 4), _rot(k, 0))) > 1e-3


def test_rope_pairs_are_neox_half_split():
    """llama.cpp's LLM_ARCH_BITNET uses LLAMA_ROPE_TYPE_NEOX: x[i] turns with x[i + D/2]."""
    d = 16
    x = torch.zeros(d)
    x[0] = 1.0  # frequency 0: angle = pos
    y = _rot(x, 1)
    assert y[0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert y[d // 2].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert y[1].item() == 0.0  # the consecutive ("normal") pairing would put sin(1) here
    x = torch.zeros(d)
    x[1] = 1.0  # frequency i=1: angle = pos * theta^(-2/d), partner x[1 + d/2]
    y = _rot(x, 3)
    ang = 3 * 10000.0 ** (-2 / d)
    assert y[1].item() == pytest.approx(math.cos(ang), abs=1e-6)
    assert y[1 + d // 2].item() == pytest.approx(math.sin(ang), abs=1e-6)
    # norm preserved
    v = torch.randn(d)
    assert _rot(v, 11).norm().item() == pytest.approx(v.norm().item(), rel=1e-5)


# ---- FFN activation -----------------------------------------------------------------


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_ffn_activation(act):
    # float64: the graph's wiring, not the float32 ops (the C++ SwiGLU op's own rounding
    # could move an int8 activation code of ffn_down; tests/test_swiglu.py checks the op)
    m = _model(activation=act, kernel="torch").double()
    blk = m.blocks[0]
    x = torch.randn(1, 5, SMALL.d_model, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), SMALL.d_model // SMALL.n_heads, SMALL.rope_theta)
    cos, sin = cos.double(), sin.double()
    attn = x + blk.attn_output(blk.attn_sub_norm(blk.attention(blk.attn_norm(x), cos, sin, None)))
    h = blk.ffn_norm(attn)
    g = blk.ffn_gate(h)
    a = F.silu(g) if act == "silu" else torch.relu(g) ** 2
    expect = attn + blk.ffn_down(blk.ffn_sub_norm(a * blk.ffn_up(h)))
    torch.testing.assert_close(blk(x, cos, sin), expect)


# ---- KV cache -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_greedy_kv_cache_generation_equals_full_recompute(kernel):
    m = _model(kernel)
    prompt = _idx(2, 5, seed=3)
    out = m.generate(prompt, 24, temperature=0)
    x = prompt
    with torch.no_grad():
        for _ in range(24):
            x = torch.cat([x, m(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def test_cached_chunks_equal_full_forward():
    # float64: in float32, a BLAS whose summation order depends on the row count (MKL on a
    # 16-thread Xeon) moves an int8 activation code across a rounding boundary now and then
    m = _model().double()
    idx = _idx(1, 11, seed=4)
    caches = [[None, None] for _ in m.blocks]
    with torch.no_grad():
        full = m.forward_hidden(idx)
        a = m._trunk(idx[:, :4], caches, 0)
        b = m._trunk(idx[:, 4:9], caches, 4)  # a chunk after a cache (explicit mask)
        c = m._trunk(idx[:, 9:], caches, 9)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, rtol=1e-10, atol=1e-12)


def test_generate_sampling_options():
    m = _model()
    p = [1, 2, 3]
    a = m.generate(p, 10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    b = m.generate(p, 10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert a.shape == (13,) and torch.equal(a, b) and a[:3].tolist() == p
    assert torch.equal(m.generate(p, 6, top_k=1, seed=1), m.generate(p, 6, temperature=0))
    greedy = m.generate(p, 10, temperature=0)
    stop = int(greedy[5])
    first = greedy[3:].tolist().index(stop) + 3
    s = m.generate(p, 10, temperature=0, stop_ids=[stop])
    assert s.tolist() == greedy[: first + 1].tolist()
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(p, SMALL.max_seq_len, temperature=0)


# ---- training sanity ----------------------------------------------------------------


def _overfit(kernel, steps=25):
    m = _model(kernel, seed=1, n_layers=1)
    idx = _idx(4, 32, seed=5, vocab=64)  # a small alphabet: quick to memorize
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_overfits_a_fixed_batch_on_both_paths():
    curves = {k: _overfit(k) for k in ("cpp", "torch")}
    for k, losses in curves.items():
        assert losses[-1] < losses[0] - 3.0, (k, losses)  # measured: 5.98 -> 0.64 / 0.66
    # same model, same data: the two kernel paths follow the same curve early on
    # (later, rounding-boundary flips of single codes let them drift apart slowly)
    for a, b in zip(curves["cpp"][:5], curves["torch"][:5]):
        assert abs(a - b) < 0.03, curves


def test_ignore_index_and_per_token_loss():
    m = _model()
    idx, tgt = _idx(), _idx(seed=1)
    tgt[:, :4] = -1
    _, per = m(idx, tgt, loss_reduction="none")
    assert per.shape == tgt.shape and per[:, :4].eq(0).all()
    _, mean = m(idx, tgt)
    torch.testing.assert_close(mean, per[:, 4:].mean())


def test_state_dict_roundtrip_and_from_config_dict():
    m = _model(activation="relu2")
    buf = io.BytesIO()
    torch.save({"config": m.config_dict(), "model": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    m2 = GPT.from_config_dict(ck["config"])
    m2.load_state_dict(ck["model"])
    idx = _idx()
    assert m2.config == m.config
    assert torch.equal(m2(idx), m(idx))
    partial = {k: v for k, v in ck["config"].items() if k != "rope_theta"}  # an older checkpoint
    assert GPT.from_config_dict(partial).config.rope_theta == ModelConfig().rope_theta
    with pytest.raises(ConfigError, match="d_modle"):
        GPT.from_config_dict({**ck["config"], "d_modle": 3})


# ---- configs and the CLI --------------------------------------------------------------

CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.toml"))
SIZES = {"nano_125m": 125e6, "small_560m": 560e6, "medium_3b": 3.0e9}


def test_builtin_configs_exist():
    assert {"tiny", *SIZES} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_and_counts(name):
    cfg = load_config(name).model
    info = model_info(cfg, batch=1, seq=128)  # meta device: no memory even for 3B
    assert (info["total_params"] == info["active_params"]) == (cfg.moe.experts == 0)
    assert info["total_params"] == (info["ternary_params"] + info["embedding_params"]
                                    + info["norm_params"] + info["router_params"]
                                    + info["mhc_params"])
    if name in SIZES:
        assert cfg.vocab_size == 32768
        assert abs(info["total_params"] / SIZES[name] - 1) < 0.05, info["total_params"]
    if name == "tiny":
        assert cfg.vocab_size == 4096 and cfg.d_model == 256 and cfg.max_seq_len == 512
        assert 4e6 <= info["total_params"] <= 6e6
    assert cfg.d_model % 256 == 0 and cfg.ffn_hidden % 256 == 0
    assert cfg.head_dim in (64, 128)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nanochat", "model", "info", *args],
                          capture_output=True, text=True, timeout=120, env=clean_env())


def test_cli_model_info_json(capsys):
    from nanochat.cli import main

    assert main(["model", "info", "--config", "nano_125m", "--json", "--batch", "2",
                 "--seq", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    for k in ("total_params", "active_params", "ternary_params", "embedding_params",
              "norm_params", "training_state_bytes", "packed_inference_bytes"):
        assert isinstance(info[k], int) and info[k] > 0
    assert (info["batch"], info["seq"]) == (2, 64)
    assert main(["model", "info", "--config", "tiny"]) == 0
    assert "ternary (BitLinear)" in capsys.readouterr().out


def test_cli_unknown_config_key_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nd_model = 256\nn_layerz = 3\n")
    r = _cli("--config", str(bad))
    assert r.returncode == 2
    assert "n_layerz" in r.stderr and str(bad) in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_whole_model_compiles_fullgraph(kernel):
    m = _model(kernel)
    idx, tgt = _idx(), _idx(seed=1)
    _, loss = torch.compile(m, backend="aot_eager", fullgraph=True)(idx, tgt)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    _, ref = m(idx, tgt)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
