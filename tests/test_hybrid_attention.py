"""Hybrid attention (nanochat/ops/attention.py): per-layer full ("L") / sliding-window ("S")
attention against a masked softmax reference, the windowed KV cache in GPT.generate."""

import math

import nanochat.model.block as block_mod
import pytest
import torch
from nanochat.config import AttentionConfig, ConfigError, ModelConfig, load_config
from nanochat.model.gpt import GPT
from nanochat.ops.attention import attend, attention_mask, trim

torch.set_num_threads(1)


def _cfg(pattern="SL", window=4, layers=4, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2,
                       ffn_hidden=128, max_seq_len=64,
                       attention=AttentionConfig(pattern=pattern, window=window), **kw)


def _model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(_cfg(**kw), bitlinear="torch")


def reference_attend(q, k, v, cached, window, rows=None, doc_start=None, op=True):
    """softmax(q k^T / sqrt(D) + mask) v with the mask written out position by position
    (k, v: the query heads' kv heads, repeated for grouped-query attention)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t, s, d = q.shape[2], k.shape[2], q.shape[3]
    mask = torch.full((t, s), float("-inf"))
    for i in range(t):
        pos = cached + i  # the query's index among the keys
        for j in range(s):
            if j <= pos and (window is None or pos - j < window):
                mask[i, j] = 0.0
    att = (q @ k.transpose(-1, -2)) / math.sqrt(d) + mask
    return att.softmax(-1) @ v


def test_layer_pattern_repeats():
    c = AttentionConfig(pattern="SSSL", window=7)
    assert [c.layer_window(i) for i in range(6)] == [7, 7, 7, None, 7, 7]
    m = _model(pattern="SSL", window=5, layers=5)
    assert [b.window for b in m.blocks] == [5, 5, None, 5, 5]


def test_config_validation():
    with pytest.raises(ConfigError, match="model.attention.pattern"):
        load_config("tiny", ["model.attention.pattern=SXL"])
    with pytest.raises(ConfigError, match="model.attention.window"):
        load_config("tiny", ["model.attention.window=0"])
    assert load_config("small_560m").model.attention.pattern == "SSSL"


@pytest.mark.parametrize("window", [None, 1, 3, 8, 40])
@pytest.mark.parametrize("cached,t", [(0, 12), (5, 1), (5, 7), (20, 3)])
def test_attend_matches_masked_reference(window, cached, t):
    g = torch.Generator().manual_seed(cached * 100 + t)
    q = torch.randn(2, 3, t, 8, generator=g)
    k, v = torch.randn(2, 2, 3, cached + t, 8, generator=g)
    got = attend(q, k, v, cached, window)
    torch.testing.assert_close(got, reference_attend(q, k, v, cached, window),
                               rtol=1e-5, atol=1e-6)


def test_mask_shape_and_window():
    m = attention_mask(4, 2, 3)
    # query 0 is key index 2: sees keys 0..2; query 3 (index 5) sees keys 3..5
    assert m.tolist()[0] == [True, True, True, False, False, False]
    assert m.tolist()[3] == [False, False, False, True, True, True]
    assert attention_mask(5, 0, None).equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_model_matches_reference_attention(monkeypatch):
    model = _model(pattern="SL", window=4)
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(idx)
        monkeypatch.setattr(block_mod, "attend", reference_attend)
        ref = model(idx)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_window_limits_what_a_layer_sees():
    """One windowed layer: the logits at position p do not depend on tokens before
    p - window + 1, and do depend on the window's first token."""
    model = _model(pattern="S", window=4, layers=1)
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    other = idx.clone()
    other[0, :8] = (other[0, :8] + 1) % 256  # changes tokens 0..7
    with torch.no_grad():
        a, b = model(idx), model(other)
    assert torch.equal(a[0, 11:], b[0, 11:])  # position 11 sees 8..11 only
    assert not torch.allclose(a[0, 10], b[0, 10])  # position 10 sees token 7


def test_full_window_equals_full_attention():
    """A window as long as the context is full attention (the same code path, bit-equal)."""
    full = _model(pattern="L")
    wide = _model(pattern="S", window=64)
    idx = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(full(idx), wide(idx))


@pytest.mark.parametrize("pattern,window", [("SL", 4), ("S", 4), ("L", 4), ("SSL", 1)])
def test_generate_kv_cache_matches_recompute(pattern, window):
    model = _model(pattern=pattern, window=window)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_cache_keeps_only_the_window():
    model = _model(pattern="SL", window=4)
    caches = [[None, None] for _ in model.blocks]
    idx = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        # a 10-token prefill, then chunks of 1, 5 and 14 tokens
        pos, outs = 0, []
        for n in (10, 1, 5, 14):
            h = model._trunk(idx[:, pos:pos + n], caches, pos)
            outs.append(model.logits(h))
            pos += n
            for b, c in zip(model.blocks, caches):
                assert c[0].shape[2] == (pos if b.window is None else min(pos, b.window - 1))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)


def test_trim():
    kv = torch.arange(10.0).view(1, 1, 10, 1)
    assert trim(kv, None) is kv
    assert trim(kv, 4).flatten().tolist() == [7.0, 8.0, 9.0]
    assert trim(kv, 1).shape[2] == 0 and trim(kv, 50).shape[2] == 10
