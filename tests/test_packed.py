"""Packed rows (chat fine-tuning): several conversations in one (B, T) row, each token
attending only to its own conversation (doc_start, nanochat/ops/attention.py) at positions
that restart per conversation. The C++ op and the SDPA baseline against float64 masked
attention (the op's torch default: tests/test_attention_op.py); a packed GPT
forward/backward against each conversation run alone."""

from __future__ import annotations

import math

import pytest
import torch
from nanochat.config import AttentionConfig, ModelConfig, MTPConfig, RunConfig
from nanochat.model import mtp
from nanochat.model.build import build_model
from nanochat.ops import attention
from nanochat.ops.attention import causal_attention
from nanochat.ops.rows import RowSubset

LENGTHS = [[5, 19, 1, 12], [37]]  # per batch row; several conversations in one 16-query tile


def doc_starts(lengths: list[list[int]]) -> torch.Tensor:
    rows = []
    for row in lengths:
        starts, at = [], 0
        for n in row:
            starts += [at] * n
            at += n
        rows.append(starts)
    return torch.tensor(rows, dtype=torch.int64)


def _reference(q, k, v, go, window, doc):
    """(out, dq, dk, dv) in float64 by autograd through softmax attention with the mask."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    ok = (j <= i) & ((i - j < window) if window else True) & (j >= doc[:, None, :, None])
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = s.masked_fill(~ok, float("-inf")).softmax(-1) @ vr
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.double())
    return out.detach(), dq, dk, dv


def _problem(T=37, H=4, Hkv=2, D=16):
    g = torch.Generator().manual_seed(T + D)
    q = torch.randn(2, T, H, D, generator=g).transpose(1, 2)
    k, v = torch.randn(2, Hkv, T, D, generator=g), torch.randn(2, Hkv, T, D, generator=g)
    return q, k, v, torch.randn(2, H, T, D, generator=g)


@pytest.mark.parametrize("window", [0, 6])
def test_op_keeps_attention_inside_each_conversation(isa, window):
    """The C++ forward and backward (every ISA; dense and Collider's kept rows) equal float64
    autograd through attention masked to each token's own conversation."""
    q, k, v, go = _problem()
    doc = doc_starts(LENGTHS)
    ref = _reference(q, k, v, go, window, doc)
    doc = torch.cat((doc, doc), 1)[:, :37]  # a strided view: the op copies it and keeps it
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = causal_attention(q, k, v, window, None, doc)
    got = (out.detach(), *torch.autograd.grad(out, (q, k, v), go))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    rows = RowSubset((2, 37))  # every row kept: the kept-row backward path, same result
    out = causal_attention(q, k, v, window, rows, doc)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), ref[1:]):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_sdpa_baseline_masks_the_same(window):
    """attend's SDPA path (op=False: a model built with ops="torch") masks the same."""
    q, k, v, go = _problem(H=4, Hkv=4)
    doc = doc_starts(LENGTHS)
    out = attention.attend(q, k, v, 0, window, None, doc, op=False)
    torch.testing.assert_close(out, _reference(q, k, v, go, window or 0, doc)[0].float(),
                               rtol=1e-4, atol=1e-5)


def test_bad_doc_start_is_a_clear_error():
    q, k, v, _ = _problem(T=8)
    for bad in (torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 8),
                torch.tensor([[0, 0, 3, 0, 0, 0, 0, 0]] * 2), torch.full((2, 8), -1)):
        with pytest.raises(ValueError, match="doc_start"):
            attention.attend(q, k, v, 0, None, None, bad)
    with pytest.raises(ValueError, match="KV cache"):
        attention.attend(q, torch.cat((k, k), 2), torch.cat((v, v), 2), 8, None, None,
                         torch.zeros(2, 8, dtype=torch.int64))


def _model(ops: str = "auto", **over):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=64, **over)
    return build_model(RunConfig(model=cfg), bitlinear="torch", ops=ops)


@pytest.mark.parametrize("ops", ["auto", "torch"])
@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_packed_model_equals_each_conversation_alone(ops, pattern):
    """Logits and parameter gradients of a packed batch equal those of each conversation
    run alone at positions 0.. (RoPE restarts per conversation), on the C++ op and SDPA
    (ops="torch"), with full and sliding-window layers."""
    model = _model(ops, attention=AttentionConfig(pattern=pattern, window=4))
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (2, 37), generator=g)
    tgt = torch.randint(0, 64, (2, 37), generator=g)
    doc = doc_starts(LENGTHS)
    logits, loss = model(idx, tgt, loss_reduction="none", doc_start=doc)
    loss.sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for b, row in enumerate(LENGTHS):
        at = 0
        for n in row:
            alone, aloss = model(idx[b:b + 1, at:at + n], tgt[b:b + 1, at:at + n],
                                 loss_reduction="none")
            aloss.sum().backward()
            torch.testing.assert_close(logits[b:b + 1, at:at + n], alone, rtol=1e-4, atol=1e-5)
            at += n
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_no_doc_start_is_the_plain_causal_model(monkeypatch):
    """One conversation per row: doc_start all zero equals doc_start None."""
    model = _model()
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(idx, doc_start=torch.zeros(2, 20, dtype=torch.int64)),
                               model(idx))


def test_mtp_targets_stop_at_each_conversation_end():
    """An MTP head's target that lies in the next packed conversation is ignored (-1)."""
    doc = doc_starts([[3, 2]])
    tgt = torch.arange(5)[None]
    heads = mtp.head_targets(tgt, 3, doc)
    assert heads[0].tolist() == [[0, 1, 2, 3, 4]]
    assert heads[1].tolist() == [[1, 2, -1, 4, -1]]
    assert heads[2].tolist() == [[2, -1, -1, -1, -1]]
    model = _model(mtp=MTPConfig(heads=2))
    idx = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    _, loss = model(idx, tgt, doc_start=doc)
    assert torch.isfinite(loss)


def test_positions_restart_at_each_conversation(monkeypatch):
    """RoPE scores depend only on relative positions, so the equality above holds (up to
    rounding) either way; the positions themselves are checked here: each token's offset in
    its own conversation, as the conversation alone (and the engine at inference) sees."""
    from nanochat.model import gpt

    seen = []
    real = gpt.rope_cos_sin
    monkeypatch.setattr(gpt, "rope_cos_sin", lambda pos, *a: seen.append(pos) or real(pos, *a))
    model = _model()
    doc = doc_starts([[3, 4, 2]])
    model(torch.zeros(1, 9, dtype=torch.int64), doc_start=doc)
    assert seen[-1].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
