"""The architecture options (sliding-window attention, MoE, mHC) through export and the C++
engine, against the torch model they were exported from (as tests/test_engine.py for the
dense model): logits within tolerance, identical greedy tokens, and clear errors for a
missing or inconsistent key.

Weights are "exact" (fp16-representable embedding, BitLinear scales rounded to fp16 on the
torch side as the file stores them), so both sides multiply by the same numbers and differ
by float summation order, now and then moving one activation across an int8 rounding
boundary (tests/test_engine.py: 90% of positions within EXACT_TOL, all within FLIP_TOL).

    pytest tests/test_engine_options.py
"""

from __future__ import annotations

import itertools

import engine_helpers
import gguf
import numpy as np
import pytest
import torch
from conftest import assert_greedy_agrees
from engine_helpers import (
    EXACT_TOL,
    FLIP_TOL,
    SMALL,
    TEXT,
    VOCAB,
    check_exact,
    rel_err,
    round_scales_to_fp16,
    torch_logits,
)
from nanochat import export
from nanochat._core import core
from nanochat.config import AttentionConfig, MHCConfig, ModelConfig, MoEConfig
from nanochat.data.tokenizer import Tokenizer
from nanochat.export import export_gguf
from nanochat.infer.engine import Engine
from nanochat.model.gpt import GPT
from nanochat.model.mhc import MHC

TEXT = TEXT * 4
SMALL = {**SMALL, "max_seq_len": 384}
KMAX_BATCH = 128  # csrc/engine/model.h kMaxBatch: prefill chunk, ring margin, rewind limit


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], VOCAB)


@pytest.fixture(autouse=True)
def fp16_scales(monkeypatch):
    """Torch multiplies by the fp16 scales the file stores, as the engine does."""
    round_scales_to_fp16(monkeypatch)


def make_model(seed: int = 0, **over) -> GPT:
    return engine_helpers.make_model(seed, **{"max_seq_len": SMALL["max_seq_len"], **over})


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(5, VOCAB, (n - 1,), generator=g).tolist()


def metadata(path) -> dict:
    r = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in r.fields.values()}


def export_with(monkeypatch, model, tok, path, edit) -> None:
    """Export with architecture()'s nanochat.* keys edited by edit(list of (k, type, v))."""
    orig = export.architecture

    def architecture(cfg):
        arch, kvs = orig(cfg)
        return arch, edit(list(kvs))

    monkeypatch.setattr(export, "architecture", architecture)
    export_gguf(model, tok, path)
    monkeypatch.setattr(export, "architecture", orig)


# ---- sliding-window / hybrid attention ---------------------------------------------------

WINDOW = 16


@pytest.fixture(scope="module")
def swa(tok, tmp_path_factory):
    model = make_model(attention=AttentionConfig(pattern="SL", window=WINDOW))
    path = tmp_path_factory.mktemp("swa") / "swa.gguf"
    export_gguf(model, tok, path)
    return model, path


def test_swa_metadata(swa):
    _, path = swa
    md = metadata(path)
    assert md["general.architecture"] == "nanochat"
    assert md["nanochat.attention.sliding_window"] == WINDOW
    assert md["nanochat.attention.sliding_window_pattern"] == [True, False]
    assert "nanochat.rope.freq_base_swa" not in md
    info = Engine(path).info
    assert info["n_layers"] == 2
    assert (info["sliding_window"], info["n_sliding_layers"]) == (WINDOW, 1)
    assert (info["n_experts"], info["hc_streams"]) == (0, 1)


def test_swa_prefill_matches_torch(swa):
    """300 tokens: longer than the window and than the ring (16 + 128 slots), prefilled in
    chunks of 128 that wrap the ring."""
    model, path = swa
    ids = prompt_ids(300)
    eng = Engine(path)
    check_exact(rel_err(eng.eval_all(ids), torch_logits(model, ids)))


def test_swa_decode_equals_prefill(swa):
    model, path = swa
    ids = prompt_ids(200, seed=2)
    eng = Engine(path)
    all_ = eng.eval_all(ids)
    eng.reset()
    first = eng.eval(ids[:40])  # a prompt longer than the window, then decode across it
    rows = np.stack([first] + [eng.eval([i]) for i in ids[40:]])
    np.testing.assert_allclose(rows, all_[39:], rtol=0, atol=1e-5 * np.abs(all_).max())
    # a context smaller than the ring: no wrap, same numbers
    small = Engine(path, n_ctx=64)
    np.testing.assert_allclose(small.eval_all(ids[:64]), all_[:64], rtol=0,
                               atol=1e-5 * np.abs(all_).max())


def test_swa_greedy_tokens_match_torch(swa):
    """Prompt longer than the window, generation crossing the window and the ring. Equal, or
    parted only at a near-tie of torch's own logits (on Sapphire Rapids one falls at token 87
    of 160, 0.3% of the logit range: one int8 activation code rounding the other way moves a
    logit that much), as the other greedy comparisons (test_cli_engine, test_interop)."""
    model, path = swa
    ids = prompt_ids(40, seed=3)
    want = model.generate(ids, 160, temperature=0.0)[len(ids):].tolist()
    r = Engine(path).complete(ids, max_tokens=160, temperature=0.0, stop_at_eos=False)
    assert_greedy_agrees(model, ids, r["tokens"], want, tie=1e-2)


def test_swa_truncate_within_ring_and_refused_beyond(swa):
    model, path = swa
    ids = prompt_ids(300, seed=4)
    ref = Engine(path).eval_all(ids)
    eng = Engine(path)
    eng.eval_all(ids)
    eng.truncate(300 - KMAX_BATCH)  # the ring keeps the window behind the kept last token
    assert eng.n_past == 300 - KMAX_BATCH
    rows = np.stack([eng.eval([i]) for i in ids[300 - KMAX_BATCH:300 - KMAX_BATCH + 20]])
    tol = 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(rows, ref[300 - KMAX_BATCH:300 - KMAX_BATCH + 20], rtol=0,
                               atol=tol)
    eng.reset()
    eng.eval_all(ids)
    with pytest.raises(ValueError, match="truncate: the sliding-window layers"):
        eng.truncate(300 - KMAX_BATCH - 1)
    assert eng.n_past == 300  # refused: the session is unchanged
    np.testing.assert_allclose(eng.eval([ids[0]]), Engine(path).eval_all(ids + [ids[0]])[-1],
                               rtol=0, atol=tol)
    with pytest.raises(ValueError, match="no longer hold positions 0..156"):
        eng.truncate(5)  # the ring has wrapped past the start
    eng.truncate(0)  # always fine: nothing before position 0
    eng.eval(ids[:140])
    eng.truncate(5)  # the ring (144 slots) has not wrapped yet
    np.testing.assert_allclose(eng.eval(ids[5:8]), ref[7], rtol=0, atol=tol)


@pytest.mark.parametrize("edit,match", [
    (lambda kvs: [kv for kv in kvs if kv[0] != "nanochat.attention.sliding_window"],
     "must come together"),
    (lambda kvs: [(k, t, v[:1]) if k.endswith("_pattern") else (k, t, v) for k, t, v in kvs],
     "has 1 entries, expected block_count = 2"),
    (lambda kvs: [(k, "array[u8]", [1, 0]) if k.endswith("_pattern") else (k, t, v)
                  for k, t, v in kvs], "expected array\\[bool\\]"),
    (lambda kvs: [(k, t, 0) if k.endswith("sliding_window") else (k, t, v)
                  for k, t, v in kvs], "sliding_window' = 0 is out of range"),
    (lambda kvs: kvs + [("nanochat.rope.freq_base_swa", "f32", 1e4)],
     "unknown metadata key 'nanochat.rope.freq_base_swa'"),
])
def test_swa_bad_metadata_is_a_clear_error(swa, tok, tmp_path, monkeypatch, edit, match):
    model, _ = swa
    path = tmp_path / "bad.gguf"
    export_with(monkeypatch, model, tok, path, edit)
    with pytest.raises(ValueError, match="bad.gguf.*" + match):
        Engine(path)


# ---- mixture of experts --------------------------------------------------------------------

@pytest.fixture
def fp16_expert_scales(monkeypatch):
    """moe.py's per-expert absmean scale rounded to fp16 too (the file's block d)."""
    from nanochat.model import moe

    def ste_expert_weights(w):
        wd = w.detach()
        s = torch.stack([wd[e].abs().mean() for e in range(w.shape[0])]).clamp(min=moe.EPS)
        codes = (wd / s[:, None, None]).round().clamp(-1, 1)
        return codes * s.half().float()[:, None, None]

    monkeypatch.setattr(moe, "ste_expert_weights", ste_expert_weights)


def check_moe(err: np.ndarray) -> None:
    """moe.py runs the experts as float GEMMs of dequantized int8 activations (x_q / a)
    and codes * s, not as integer sums scaled once like BitLinear and the engine: ~1e-7
    relative differences that flip an int8 code of the experts' hidden rows much more
    often than in the dense model, and through the KV cache one flip moves every later
    position (measured: exact up to the first flip, then max 7e-3, median 3e-3); every
    position stays within FLIP_TOL."""
    assert err.max() < FLIP_TOL, err
    assert err[0] < EXACT_TOL and np.median(err) < 1e-2, err


def near_ties(model, ids, margin: float = 1e-4) -> np.ndarray:
    """Per position: whether some layer's k-th and (k+1)-th expert scores (+ bias) are
    within `margin`, where rounding differences may legitimately route differently."""
    near = np.zeros(len(ids), dtype=bool)

    def hook(moe, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        v = torch.sigmoid(x @ moe.ffn_gate_inp.T) + moe.expert_bias
        top = v.sort(dim=-1, descending=True).values
        if moe.top_k < moe.experts:
            near[:] |= (top[:, moe.top_k - 1] - top[:, moe.top_k] < margin).numpy()

    hs = [b.moe.register_forward_pre_hook(hook) for b in model.blocks]
    torch_logits(model, ids)
    for h in hs:
        h.remove()
    return near


def moe_model(top_k: int, shared: bool, seed: int = 0) -> GPT:
    model = make_model(seed, moe=MoEConfig(experts=4, top_k=top_k, expert_hidden=256,
                                           shared_expert=shared))
    with torch.no_grad():  # a trained-looking balancing bias: it changes the selection
        g = torch.Generator().manual_seed(seed)
        for b in model.blocks:
            b.moe.expert_bias.copy_(torch.randn(4, generator=g) * 0.05)
            b.moe.ffn_sub_norm_exps.uniform_(0.5, 1.5)
            if shared:
                b.moe.ffn_sub_norm_shexp.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("top_k,shared", [(1, False), (2, True), (3, False)])
def test_moe_matches_torch(tok, tmp_path, fp16_expert_scales, top_k, shared):
    model = moe_model(top_k, shared)
    path = tmp_path / "moe.gguf"
    export_gguf(model, tok, path)
    md = metadata(path)
    assert (md["nanochat.expert_count"], md["nanochat.expert_used_count"]) == (4, top_k)
    assert md["nanochat.expert_feed_forward_length"] == 256
    assert md["nanochat.expert_shared_count"] == int(shared)
    assert md["nanochat.expert_gating_func"] == "sigmoid"
    assert md["nanochat.expert_weights_norm"] == (top_k > 1)
    assert md["nanochat.leading_dense_block_count"] == 0
    eng = Engine(path)
    ids = prompt_ids(200)  # prefill in two chunks (128 + 72), batched per expert
    all_ = eng.eval_all(ids)
    err = rel_err(all_, torch_logits(model, ids))
    near = near_ties(model, ids)  # a float-order difference may pick the other expert
    assert near.mean() < 0.05
    check_moe(err[~near])
    eng.reset()  # decode: routed per token
    rows = np.stack([eng.eval([i]) for i in ids[:50]])
    np.testing.assert_allclose(rows, all_[:50], rtol=0, atol=1e-5 * np.abs(all_).max())
    want = model.generate(ids[:20], 40, temperature=0.0)[20:].tolist()
    r = Engine(path).complete(ids[:20], max_tokens=40, temperature=0.0, stop_at_eos=False)
    assert r["tokens"] == want


def test_moe_expert_scales_are_per_expert(tok, tmp_path, fp16_expert_scales):
    model = moe_model(2, False)
    with torch.no_grad():  # expert 1's weights 3x larger: its own scale in the file
        model.blocks[0].moe.ffn_up_exps[1] *= 3
    path = tmp_path / "moe.gguf"
    export_gguf(model, tok, path)
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up_exps.weight")
    assert list(t.shape) == [256, 256, 4] and t.tensor_type == gguf.GGMLQuantizationType.TQ2_0
    ids = prompt_ids(60)
    check_moe(rel_err(Engine(path).eval_all(ids), torch_logits(model, ids)))


@pytest.mark.parametrize("edit,match", [
    (lambda kvs: [kv for kv in kvs if kv[0] != "nanochat.expert_count"],
     "'nanochat.expert_used_count' without 'nanochat.expert_count'"),
    (lambda kvs: [(k, t, 5) if k == "nanochat.expert_used_count" else (k, t, v)
                  for k, t, v in kvs], "expert_used_count' = 5 is out of range"),
    (lambda kvs: [(k, t, "softmax") if k == "nanochat.expert_gating_func" else (k, t, v)
                  for k, t, v in kvs], "sigmoid gating"),
    (lambda kvs: [(k, t, 2) if k == "nanochat.expert_count" else (k, t, v)
                  for k, t, v in kvs], "ffn_gate_inp.weight' has dims \\[256, 4\\], expected "
                                       "\\[256, 2\\]"),
    (lambda kvs: [kv for kv in kvs if kv[0] != "nanochat.expert_shared_count"],
     "expert_shared_count"),
])
def test_moe_bad_metadata_is_a_clear_error(tok, tmp_path, monkeypatch, edit, match):
    model = moe_model(2, False)
    path = tmp_path / "bad.gguf"
    export_with(monkeypatch, model, tok, path, edit)
    with pytest.raises(ValueError, match="bad.gguf.*" + match):
        Engine(path)


def test_moe_missing_tensor_is_a_clear_error(tok, tmp_path, monkeypatch):
    model = moe_model(2, True)
    orig = export._plan
    monkeypatch.setattr(export, "_plan", lambda m: [e for e in orig(m)
                                                    if e[0] != "blk.1.ffn_down_shexp.weight"])
    path = tmp_path / "bad.gguf"
    export_gguf(model, tok, path)
    with pytest.raises(ValueError, match="bad.gguf: missing tensor 'blk.1.ffn_down_shexp"):
        Engine(path)


# ---- mHC residual streams ------------------------------------------------------------------

def mhc_model(n: int, res: str, dynamic: bool, seed: int = 0) -> GPT:
    model = make_model(seed, mhc=MHCConfig(streams=n, res=res, dynamic=dynamic))
    with torch.no_grad():  # trained-looking coefficients: every part of the mixing matters
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, MHC):
                for p in (m.b_pre, m.b_post, m.b_res):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
                if dynamic:
                    m.alpha.copy_(torch.tensor([0.3, -0.2, 0.5]))
    return model


@pytest.mark.parametrize("n,res,dynamic", [(2, "sinkhorn", True), (4, "sinkhorn", False),
                                           (4, "lite", True), (3, "lite", False)])
def test_mhc_matches_torch(tok, tmp_path, n, res, dynamic):
    model = mhc_model(n, res, dynamic)
    path = tmp_path / "mhc.gguf"
    export_gguf(model, tok, path)
    md = metadata(path)
    assert md["nanochat.hc.stream_count"] == n and md["nanochat.hc.res_type"] == res
    assert md["nanochat.hc.sinkhorn_iterations"] == 20 and md["nanochat.hc.dynamic"] == dynamic
    r = gguf.GGUFReader(path)
    shapes = {t.name: list(t.shape) for t in r.tensors}
    assert shapes["blk.1.hc_ffn_res.weight"] == ([n, n] if res == "sinkhorn" else
                                                 [len(list(itertools.permutations(range(n))))])
    if dynamic:
        nr = n * n if res == "sinkhorn" else len(list(itertools.permutations(range(n))))
        assert shapes["blk.0.hc_attn_fn.weight"] == [n * 256, 2 * n + nr]
        assert shapes["blk.0.hc_attn_alpha.weight"] == [3]
    eng = Engine(path)
    ids = prompt_ids(160)
    all_ = eng.eval_all(ids)
    # The stream mixing adds float work (in torch's order, not ours) ahead of every int8
    # quantization: more rounding flips than the dense model (exact up to the first one).
    check_moe(rel_err(all_, torch_logits(model, ids)))
    eng.reset()
    rows = np.stack([eng.eval([i]) for i in ids[:40]])
    np.testing.assert_allclose(rows, all_[:40], rtol=0, atol=1e-5 * np.abs(all_).max())
    want = model.generate(ids[:20], 40, temperature=0.0)[20:].tolist()
    r = Engine(path).complete(ids[:20], max_tokens=40, temperature=0.0, stop_at_eos=False)
    assert r["tokens"] == want


def test_options_compose(tok, tmp_path, fp16_expert_scales):
    """Sliding window + MoE + mHC in one model."""
    model = make_model(attention=AttentionConfig(pattern="SL", window=WINDOW),
                       moe=MoEConfig(experts=4, top_k=2, expert_hidden=256),
                       mhc=MHCConfig(streams=2, dynamic=True))
    path = tmp_path / "all.gguf"
    export_gguf(model, tok, path)
    ids = prompt_ids(40)
    want = model.generate(ids[:20], 30, temperature=0.0)[20:].tolist()
    eng = Engine(path)
    r = eng.complete(ids[:20], max_tokens=30, temperature=0.0, stop_at_eos=False)
    assert r["tokens"] == want
    i = eng.info  # the options as the engine reads them
    assert (i["sliding_window"], i["n_sliding_layers"]) == (WINDOW, 1)
    assert (i["n_experts"], i["n_experts_used"], i["hc_streams"]) == (4, 2, 2)


@pytest.mark.parametrize("edit,match", [
    (lambda kvs: [kv for kv in kvs if kv[0] != "nanochat.hc.stream_count"],
     "'nanochat.hc.sinkhorn_iterations' without 'nanochat.hc.stream_count'"),
    (lambda kvs: [(k, t, "exact") if k == "nanochat.hc.res_type" else (k, t, v)
                  for k, t, v in kvs], "res_type' = 'exact'"),
    (lambda kvs: [(k, t, 3) if k == "nanochat.hc.stream_count" else (k, t, v)
                  for k, t, v in kvs], "hc_attn_pre.weight' has dims \\[2\\], expected \\[3\\]"),
    (lambda kvs: [(k, t, False) if k == "nanochat.hc.dynamic" else (k, t, v)
                  for k, t, v in kvs], "unexpected tensor 'blk.0.hc_attn_fn.weight'"),
    (lambda kvs: [kv for kv in kvs if kv[0] != "nanochat.hc.dynamic"], "nanochat.hc.dynamic"),
])
def test_mhc_bad_metadata_is_a_clear_error(tok, tmp_path, monkeypatch, edit, match):
    model = mhc_model(2, "sinkhorn", True)
    path = tmp_path / "bad.gguf"
    export_with(monkeypatch, model, tok, path, edit)
    with pytest.raises(ValueError, match="bad.gguf.*" + match):
        Engine(path)


def test_export_refuses_what_the_engine_cannot_run():
    from nanochat.export import check_supported
    check_supported(ModelConfig(**SMALL, moe=MoEConfig(experts=1024, top_k=2)))
    with pytest.raises(ValueError, match="model.moe.experts = 1025"):
        check_supported(ModelConfig(**SMALL, moe=MoEConfig(experts=1025, top_k=2)))
    with pytest.raises(ValueError, match="model.mhc.sinkhorn_iters = 100001"):
        check_supported(ModelConfig(**SMALL, mhc=MHCConfig(streams=2, sinkhorn_iters=100001)))


# ---- bitnet.cpp's files: "bitnet-b1.58" with I2_S matrices; bitnet.hidden_activation -----

I2_S = 36  # bitnet.cpp's ggml type id


def i2_s_bytes(codes: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp's quantize_i2_s as its x86 builds run it (src/ggml-bitnet-mad.cpp): code + 1
    of weight 128b + 32g + j in byte 32b + j at bit shift 6 - 2g; then the float32 scale,
    padded to 32 bytes."""
    q = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1).astype(np.uint8), tail])


def export_bitnet_cpp(monkeypatch, model, tok, path, arch="bitnet-b1.58", keys=()) -> None:
    """The model as bitnet.cpp's converter writes it: its architecture name, I2_S matrices
    (each with the fp16-rounded scale our TQ2_0 file stores, so both compute alike)."""
    from nanochat.ops.bitlinear import weight_codes

    meta, tensor_bytes = export.metadata, export._tensor_bytes

    def metadata(cfg, tk, weight_type, name):
        out = []
        for k, t, v in meta(cfg, tk, weight_type, name):
            if k == "nanochat.ffn_activation":
                continue
            if k == "general.architecture":
                v = arch
            out.append((arch + k[8:] if k.startswith("nanochat.") else k, t, v))
        return out + list(keys)

    def i2_s(name, kind, p, weight_type, embd_type):
        if kind != "ternary":
            return tensor_bytes(name, kind, p, weight_type, embd_type)
        codes, scale = weight_codes(p.detach())
        return I2_S, list(reversed(p.shape)), i2_s_bytes(codes.numpy(), float(np.float16(scale)))

    with monkeypatch.context() as m:
        m.setitem(export.TYPE_NAMES, I2_S, "i2_s")
        m.setattr(export, "metadata", metadata)
        m.setattr(export, "_tensor_bytes", i2_s)
        export_gguf(model, tok, path)


def test_bitnet_cpp_i2_s_file_runs_like_ours(tok, tmp_path, monkeypatch):
    """A bitnet-b1.58 / I2_S file of a squared-ReLU model gives the logits of our own export
    of the same model, bit for bit (same codes, same scale)."""
    model = make_model(3, activation="relu2")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "i2s.gguf"
    export_gguf(model, tok, ours)
    export_bitnet_cpp(monkeypatch, model, tok, theirs)
    md = core().GgufFile(str(theirs)).kv()  # our reader: gguf-py has no type 36
    assert md["general.architecture"] == "bitnet-b1.58" and "bitnet-b1.58.block_count" in md
    a, b = Engine(ours), Engine(theirs)
    assert (b.info["architecture"], b.info["weight_type"]) == ("bitnet-b1.58", "I2_S")
    ids = prompt_ids(24)
    assert np.array_equal(a.eval_all(ids), b.eval_all(ids))


def test_i2_s_corruption_is_named(tok, tmp_path, monkeypatch):
    model = make_model(4, activation="relu2")
    path = tmp_path / "i2s.gguf"
    export_bitnet_cpp(monkeypatch, model, tok, path)
    f = core().GgufFile(str(path))
    t = next(t for t in f.tensors() if t["name"] == "blk.1.ffn_up.weight")
    assert t["nbytes"] == 256 * model.config.ffn_hidden // 4 + 32  # codes, scale, padding
    raw = bytearray(path.read_bytes())
    raw[f.data_offset + t["offset"]] = 0xFF  # code 3 in four weights
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*code 3"):
        Engine(bad)


@pytest.mark.parametrize("activation", ["relu2", "silu"])
def test_bitnet_hidden_activation_key(tok, tmp_path, monkeypatch, activation):
    """llama.cpp's "bitnet" architecture with bitnet.hidden_activation runs that activation;
    an unknown value is refused, naming the key."""
    model = make_model(5, activation=activation)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "bitnet.gguf"
    export_gguf(model, tok, ours)
    export_bitnet_cpp(monkeypatch, model, tok, theirs, arch="bitnet",
                      keys=[("bitnet.hidden_activation", "string", activation)])
    ids = prompt_ids(16)
    assert np.array_equal(Engine(ours).eval_all(ids), Engine(theirs).eval_all(ids))
    bad = tmp_path / "gelu.gguf"
    export_bitnet_cpp(monkeypatch, model, tok, bad, arch="bitnet",
                      keys=[("bitnet.hidden_activation", "string", "gelu")])
    with pytest.raises(ValueError, match="bitnet.hidden_activation"):
        Engine(bad)
