"""The C++ engine (nanochat.infer.engine.Engine) against the torch model it was exported from.

A small GPT (d_model 256, 2 layers, GQA) with random weights goes through export_gguf and
the engine. Both sides quantize activations per token to int8 the same way, so:

- With "exact" weights (each BitLinear's absmean scale rounded to fp16, as the file stores
  it, and the embedding rounded to fp16) logits agree to float summation order: measured
  2-4e-7 of the logit range. Now and then such a tiny difference moves one activation
  across an int8 rounding boundary, and that position (and later ones, through the KV
  cache) moves by up to ~1e-2; so: 90% of positions within EXACT_TOL, all within FLIP_TOL.
- With the trained fp32 scales (what a real export does) the fp16 rounding of each scale
  (<= 2^-11 relative) flips int8 codes all over: measured up to 2.1e-2 (F32 head),
  3.1e-2 (F16), 5.3e-2 (Q8_0) of the logit range on 4 seeds; TRAINED_TOL has margin.

    pytest tests/test_engine.py
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from engine_helpers import (
    TEXT,
    VOCAB,
    check_exact,
    make_model,
    rel_err,
    round_scales_to_fp16,
    torch_logits,
)
from nanochat.data.tokenizer import Tokenizer
from nanochat.export import export_gguf
from nanochat.infer.engine import Engine

TEXT = TEXT * 8
TRAINED_TOL = 8e-2  # fp32 trained scales vs the file's fp16 ones
Q8_FILE_TOL = 8e-2  # a Q8_0 embedding file vs the F16 one


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], VOCAB)


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return [tok.bos_id] + tok.encode(TEXT[:160])


@pytest.fixture
def fp16_scales(monkeypatch):
    """Torch multiplies by the fp16 scales TQ2_0 stores, as the engine does."""
    round_scales_to_fp16(monkeypatch)


def export(model, tok, path, **kw) -> Engine:
    export_gguf(model, tok, path, **kw)
    return Engine(path)


@pytest.fixture(scope="module")
def exact_files(tok, tmp_path_factory):
    """(model, {(weight type, embd type): path}) for the exact-weight model. The files
    hold fp16(scale) whatever the torch side does, so no patch is needed to write them."""
    d = tmp_path_factory.mktemp("engine")
    model = make_model()
    paths = {}
    for wt, et in (("tq2_0", "f16"), ("tq1_0", "f16"), ("tq2_0", "q8_0"), ("tq2_0", "f32")):
        paths[wt, et] = d / f"{wt}-{et}.gguf"
        export_gguf(model, tok, paths[wt, et], weight_type=wt, embd_type=et)
    return model, paths


# ---- numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize("embd", ["f16", "f32"])
def test_logits_match_torch(exact_files, prompt, fp16_scales, embd):
    model, paths = exact_files
    eng = Engine(paths["tq2_0", embd])
    assert eng.info["embd_type"] == embd.upper()
    check_exact(rel_err(eng.eval_all(prompt), torch_logits(model, prompt)))


def test_trained_scales_within_tolerance(tok, prompt, tmp_path):
    """A plain export (fp32 trained scales on the torch side): the documented tolerance."""
    model = make_model(seed=1, exact=False)
    ref = torch_logits(model, prompt)
    for embd in ("f32", "f16", "q8_0"):
        eng = export(model, tok, tmp_path / f"{embd}.gguf", embd_type=embd)
        err = rel_err(eng.eval_all(prompt), ref)
        assert err.max() < TRAINED_TOL, (embd, err.max())


def test_greedy_tokens_match_torch(exact_files, prompt, fp16_scales):
    model, paths = exact_files
    eng = Engine(paths["tq2_0", "f16"])
    ids = prompt[:24]
    want = model.generate(ids, 64, temperature=0.0)[len(ids):].tolist()
    r = eng.complete(ids, max_tokens=64, temperature=0.0, stop_at_eos=False)
    assert r["tokens"] == want
    assert r["stop_reason"] == "max_tokens" and r["decode_steps"] == 63


def test_eval_all_equals_eval(exact_files, prompt):
    eng = Engine(exact_files[1]["tq2_0", "q8_0"])
    all_ = eng.eval_all(prompt)
    assert all_.shape == (len(prompt), VOCAB) and all_.dtype == np.float32
    eng.reset()
    for t in (0, 5, len(prompt) - 1):
        eng.reset()
        last = eng.eval(prompt[:t + 1])
        np.testing.assert_allclose(last, all_[t], rtol=0, atol=1e-5 * np.abs(all_).max())
    # token by token through the cache == one batch
    eng.reset()
    rows = np.stack([eng.eval([i]) for i in prompt])
    np.testing.assert_allclose(rows, all_, rtol=0, atol=1e-5 * np.abs(all_).max())


def test_tq1_equals_tq2(exact_files, prompt):
    paths = exact_files[1]
    a, b = Engine(paths["tq2_0", "f16"]), Engine(paths["tq1_0", "f16"])
    assert (a.info["weight_type"], b.info["weight_type"]) == ("TQ2_0", "TQ1_0")
    np.testing.assert_array_equal(a.eval_all(prompt), b.eval_all(prompt))


def q8_blocks(x: np.ndarray) -> np.ndarray:
    """x (n, d) through ggml's q8_0 activation quantization (per 32: d = amax/127)."""
    b = x.reshape(x.shape[0], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / 127
    return (np.where(d > 0, np.round(b / np.where(d > 0, d, 1)), 0) * d).reshape(x.shape)


def test_q8_head_matches_torch(exact_files, prompt, fp16_scales):
    """A Q8_0 file: the embedding (input and tied head) is the Q8_0 dequantization, and the
    head's input is q8-quantized per 32 as llama.cpp does; torch doing the same agrees to
    float rounding (measured 6.6e-7)."""
    from nanochat.export import dequantize_q8_0, quantize_q8_0

    model, paths = exact_files
    model = copy.deepcopy(model)
    w = model.token_embd.weight.detach().numpy()
    wq = dequantize_q8_0(quantize_q8_0(np.ascontiguousarray(w)), w.shape[1])
    with torch.no_grad():
        model.token_embd.weight.copy_(torch.from_numpy(wq))
        h = model.forward_hidden(torch.tensor([prompt]))[0].numpy()
    ref = q8_blocks(h) @ wq.T
    check_exact(rel_err(Engine(paths["tq2_0", "q8_0"]).eval_all(prompt), ref))


def test_q8_file_close_to_f16(exact_files, prompt):
    """The practical effect of a Q8_0 embedding (input rows and head): measured 4.0e-2 of
    the logit range on this model, mostly int8 flips downstream of the perturbed inputs."""
    paths = exact_files[1]
    f16 = Engine(paths["tq2_0", "f16"]).eval_all(prompt)
    q8 = Engine(paths["tq2_0", "q8_0"]).eval_all(prompt)
    err = rel_err(q8, f16)
    assert 0 < err.max() < Q8_FILE_TOL, err.max()


# ---- API ---------------------------------------------------------------------------------------

def test_info_and_tokenizer(exact_files, tok):
    eng = Engine(exact_files[1]["tq2_0", "f16"], n_ctx=64)
    i = eng.info
    assert (i["architecture"], i["vocab_size"], i["d_model"]) == ("bitnet", VOCAB, 256)
    assert i["n_layers"] == 2
    assert (i["n_heads"], i["n_kv_heads"], i["head_dim"], i["ffn_hidden"]) == (4, 2, 64, 512)
    assert i["bos_id"] == tok.bos_id and i["add_bos"] is True
    assert eng.n_ctx == 64
    text = TEXT[:300] + " ünïcødé ✓"
    assert eng.tokenize(text) == tok.encode(text)
    assert eng.detokenize(tok.encode(text)) == text
    assert eng.tokenize("hi", add_bos=True)[0] == tok.bos_id


def test_generate_streams_and_is_seeded(exact_files):
    eng = Engine(exact_files[1]["tq2_0", "f16"])
    a = eng.complete("def ", max_tokens=24, temperature=0.9, seed=7, stop_at_eos=False)
    assert a["prompt_tokens"] == len(eng.tokenize("def ")) + 1  # bos first: empty session
    assert a["decode_tokens_per_s"] > 0 and a["prefill_tokens_per_s"] > 0
    # the engine's clocks split the decode steps: each part ran, together they fit
    parts = [a[f"decode_{p}_seconds"] for p in ("ternary", "head", "attention")]
    assert all(x > 0 for x in parts) and sum(parts) < a["decode_seconds"], a
    i = eng.info
    assert i["head_bytes"] == i["vocab_size"] * i["d_model"] * 2  # f16 token_embd
    assert 0 < i["ternary_bytes"] < i["weight_bytes"] - i["head_bytes"]
    eng.reset()
    pieces = list(eng.generate("def ", max_tokens=24, temperature=0.9, seed=7, stop_at_eos=False))
    assert [t for t, _ in pieces if t >= 0] == a["tokens"]
    assert "".join(p for _, p in pieces) == a["text"]
    eng.reset()
    b = eng.complete("def ", max_tokens=24, temperature=0.9, seed=8, stop_at_eos=False)
    assert b["tokens"] != a["tokens"]
    # Continuing the session: no bos, the conversation grows.
    n = eng.n_past
    c = eng.complete(" x", max_tokens=3, temperature=0.0, stop_at_eos=False)
    assert c["prompt_tokens"] == len(eng.tokenize(" x"))
    assert eng.n_past == n + c["prompt_tokens"] + 3


def test_generator_closed_early_stops(exact_files):
    eng = Engine(exact_files[1]["tq2_0", "f16"])
    n_prompt = len(eng.tokenize("class ")) + 1
    gen = eng.generate("class ", max_tokens=100, temperature=0.0, stop_at_eos=False)
    first = [next(gen) for _ in range(3)]
    gen.close()
    assert all(t >= 0 for t, _ in first)
    assert eng.n_past == n_prompt + 3  # the session keeps what was yielded
    # and it continues from there exactly as an uninterrupted run does
    nxt = eng.complete([], max_tokens=2, temperature=0.0, stop_at_eos=False)["tokens"]
    eng.reset()
    whole = eng.complete("class ", max_tokens=5, temperature=0.0, stop_at_eos=False)["tokens"]
    assert [t for t, _ in first] + nxt == whole
    eng.reset()
    assert eng.complete("x", max_tokens=2, temperature=0.0, stop_at_eos=False)["tokens"]


def test_stop_strings_and_tokens(exact_files):
    eng = Engine(exact_files[1]["tq2_0", "f16"])
    full = eng.complete("def ", max_tokens=30, temperature=0.0, stop_at_eos=False)
    raw = b"".join(eng.token_bytes(t) for t in full["tokens"])  # may hold partial UTF-8
    k = next(i for i in range(3, len(raw) - 1) if raw[i:i + 2] not in raw[:i + 1])
    stop = raw[k:k + 2]  # bytes are fine as stop strings
    want = raw[:k].decode("utf-8", errors="replace")
    eng.reset()
    r = eng.complete("def ", max_tokens=30, temperature=0.0, stop=[stop], stop_at_eos=False)
    assert r["stop_reason"] == "stop_string"
    assert r["text"] == want
    eng.reset()
    pieces = list(eng.generate("def ", max_tokens=30, temperature=0.0, stop=[stop],
                               stop_at_eos=False))
    assert "".join(p for _, p in pieces) == want
    eng.reset()
    t = full["tokens"][4]
    r = eng.complete("def ", max_tokens=30, temperature=0.0, stop_tokens=[t], stop_at_eos=False)
    assert r["stop_reason"] == "stop_token"
    assert r["tokens"] == full["tokens"][:full["tokens"].index(t)]


def test_errors(exact_files, tmp_path):
    path = exact_files[1]["tq2_0", "f16"]
    eng = Engine(path, n_ctx=8)
    with pytest.raises(ValueError, match="out of range"):
        eng.eval([VOCAB])
    with pytest.raises(ValueError, match="overflow the context"):
        eng.eval(list(range(5, 14)))
    eng.eval(list(range(5, 13)))
    assert eng.complete([], max_tokens=4, temperature=0.0)["stop_reason"] == "context_full"
    with pytest.raises(ValueError, match="n_ctx"):
        Engine(path, n_ctx=10**6)
    with pytest.raises(ValueError, match="missing.gguf"):
        Engine(tmp_path / "missing.gguf")
    data = path.read_bytes()
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.gguf"):
        Engine(cut)


def test_corrupt_ternary_block_names_tensor(exact_files, tmp_path):
    from nanochat._core import core

    path = exact_files[1]["tq2_0", "f16"]
    f = core().GgufFile(str(path))
    t = next(t for t in f.tensors() if t["name"] == "blk.1.ffn_gate.weight")
    start = f.data_offset + t["offset"]
    data = bytearray(path.read_bytes())
    data[start + 66 * 3 + 7] = 0xFF  # 2-bit code 3: no ternary weight has it
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt\.gguf.*blk\.1\.ffn_gate\.weight.*corrupt"):
        Engine(bad)
    data = bytearray(path.read_bytes())
    data[start + 66 * 5 + 64] ^= 0x04  # one block's fp16 d differs from the others
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate\.weight': block 5 has scale"):
        Engine(bad)


# ---- hardening: specials in user text, n_past while generating, per-engine threads ---------

def test_parse_special_argument(exact_files):
    """parse_special=False keeps marker text in a prompt plain (a user typing
    "<|user_end|>" gets those characters); the default keeps markers working."""
    eng = Engine(exact_files[1]["tq2_0", "f16"])
    marker = "<|user_start|>"
    special = eng.tokenize(marker, parse_special=True)
    assert len(special) == 1
    plain = eng.tokenize(marker)
    assert special[0] not in plain
    kw = dict(max_tokens=1, temperature=0.0, stop_at_eos=False, add_bos=False)
    assert eng.complete(marker, **kw)["prompt_tokens"] == 1
    eng.reset()
    assert eng.complete(marker, parse_special=False, **kw)["prompt_tokens"] == len(plain)
    eng.reset()
    list(eng.generate(marker, parse_special=False, **kw))
    assert eng.n_past == len(plain) + 1


def test_n_past_while_generating_counts_yielded_tokens(exact_files):
    """n_past read during generation is the prompt plus the tokens yielded so far (it used
    to read the C++ session while the worker appended to it, several tokens ahead)."""
    import time

    eng = Engine(exact_files[1]["tq2_0", "f16"])
    n_prompt = len(eng.tokenize("class ")) + 1
    gen = eng.generate("class ", max_tokens=40, temperature=0.0, stop_at_eos=False)
    next(gen)
    time.sleep(0.3)  # the worker runs ahead to fill its queue
    assert eng.n_past == n_prompt + 1
    next(gen)
    assert eng.n_past == n_prompt + 2
    rest = [t for t, _ in gen if t >= 0]
    assert eng.n_past == n_prompt + 2 + len(rest) == n_prompt + 40


def test_engine_threads_are_its_own(exact_files, prompt):
    """Engine(n_threads=k) runs its sessions on k threads without changing the library-wide
    count other engines use (Model::load used to replace the one global pool)."""
    from nanochat.ops import ternary

    before = ternary.num_threads()
    eng = Engine(exact_files[1]["tq2_0", "f16"], n_threads=3)
    assert ternary.num_threads() == before
    other = Engine(exact_files[1]["tq2_0", "f16"])
    np.testing.assert_array_equal(eng.eval(prompt[:20]), other.eval(prompt[:20]))
    with pytest.raises(ValueError, match="n_threads"):
        Engine(exact_files[1]["tq2_0", "f16"], n_threads=100000)


def test_thread_count_limits(tmp_path):
    """NANOCHAT_NUM_THREADS above the maximum is clamped to 1024, and set_num_threads above it
    is an error (both used to try to start that many threads: an abort or a hang)."""
    import os
    import subprocess
    import sys

    code = ("from nanochat.ops import ternary\n"
            "print(ternary.num_threads())\n"
            "try:\n"
            "    ternary.set_num_threads(1 << 30)\n"
            "except ValueError as e:\n"
            "    print('refused', e)\n"
            "print(ternary.num_threads())\n")
    env = dict(os.environ, NANOCHAT_NUM_THREADS="1000000")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "1024" and lines[-1] == "1024", r.stdout
    assert lines[1].startswith("refused") and "1024" in lines[1], r.stdout
