"""GGUF export (docs/gguf.md) read back with the PyPI `gguf` package (llama.cpp's gguf-py).

Every ternary tensor must dequantize (gguf.quants) to exactly codes * fp16(scale), with codes
and scale from bitlinear.weight_codes of the model; the embedding must equal
gguf.quants.quantize of the float weight byte for byte; metadata must match the contract
key by key. Small models (d_model 256), so the whole file runs in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import engine_helpers  # noqa: E402
from nanochat import checkpoint, cli  # noqa: E402
from nanochat.config import ModelConfig, RunConfig, apply_overrides  # noqa: E402
from nanochat.data.chat import CHAT_TEMPLATE  # noqa: E402
from nanochat.data.tokenizer import Tokenizer  # noqa: E402
from nanochat.export import (  # noqa: E402
    architecture,
    dequantize_q8_0,
    export_checkpoint,
    export_gguf,
    quantize_q8_0,
)
from nanochat.model.gpt import GPT  # noqa: E402
from nanochat.ops.bitlinear import weight_codes  # noqa: E402

GT = gguf.GGMLQuantizationType
VOCAB = 512
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\n        self.y = y\n\nprint(add(1, 2), Point(3, 4).x)\n") * 8
SMALL = dict(vocab_size=VOCAB, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
             ffn_hidden=512, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6)
TERNARY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.train([TEXT], VOCAB)  # a tiny corpus: the rest are <|reserved_N|> fillers
    assert any(s.startswith("<|reserved_") for s in t.tokens())
    return t


def make_model(seed: int = 0, **over) -> GPT:
    """Random weights, norm gains away from 1, and one all-zero ternary block (d = 0)."""
    model = engine_helpers.make_model(seed, exact=False, **{**SMALL, **over})
    with torch.no_grad():
        model.blocks[0].ffn_down.weight[3, :256] = 0.0  # (256, 512): block 0 of row 3
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


def read(path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def ternary_modules(model):
    for i, b in enumerate(model.blocks):
        for attr in TERNARY:
            yield f"blk.{i}.{attr}.weight", getattr(b, attr).weight


# ---- tensors -----------------------------------------------------------------------


@pytest.mark.parametrize("wtype", ["tq2_0", "tq1_0"])
def test_ternary_tensors_are_codes_times_fp16_scale(model, tok, tmp_path, wtype):
    path = tmp_path / "m.gguf"
    summary = export_gguf(model, tok, path, weight_type=wtype)
    qtype = {"tq2_0": GT.TQ2_0, "tq1_0": GT.TQ1_0}[wtype]
    ts = tensors(read(path))
    n = 0
    for name, w in ternary_modules(model):
        t = ts[name]
        assert t.tensor_type == qtype, name
        assert list(t.shape) == [w.shape[1], w.shape[0]], name  # GGUF dims fastest first
        codes, scale = weight_codes(w)
        got = gguf.quants.dequantize(np.asarray(t.data).reshape(w.shape[0], -1), qtype)
        want = codes.numpy().astype(np.float32) * np.float32(np.float16(scale))
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=name)
        n += 1
    assert n == 14 and summary["tensors"] == len(ts) == 2 + 2 * 11
    assert summary["types"][wtype] == 14
    # every block's fp16 d is the tensor's scale, or 0 for the one all-zero block
    block_bytes = {"tq2_0": 66, "tq1_0": 54}[wtype]
    for name, w in ternary_modules(model):
        raw = np.asarray(ts[name].data).reshape(-1, block_bytes)
        d = raw[:, -2:].copy().view(np.float16).reshape(-1)
        scale = np.float16(weight_codes(w)[1])
        zero = {"blk.0.ffn_down.weight": [3 * 2]}.get(name, [])  # row 3, block 0
        assert np.flatnonzero(d == 0).tolist() == zero, name
        assert (d[d != 0] == scale).all(), name


@pytest.mark.parametrize("wtype", ["tq2_0", "tq1_0"])
def test_ternary_bytes_equal_gguf_py_quantize_of_dequantized(model, tok, tmp_path, wtype):
    """For a per-tensor-scale tensor, gguf-py's own quantizer of codes * s (block absmax is
    s) gives the same bytes: our packing is ggml's, d included."""
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, weight_type=wtype)
    qtype = {"tq2_0": GT.TQ2_0, "tq1_0": GT.TQ1_0}[wtype]
    ts = tensors(read(path))
    w = model.blocks[1].ffn_down.weight
    codes, scale = weight_codes(w)
    ref = gguf.quants.quantize(codes.numpy().astype(np.float32) * np.float32(scale), qtype)
    assert np.asarray(ts["blk.1.ffn_down.weight"].data).tobytes() == ref.tobytes()


def test_tq2_0_loads_into_the_kernel_layout_with_the_trained_scale(model, tok, tmp_path):
    """The engine's path: TQ2_0 -> TK2 takes the common block d as the tensor scale."""
    from nanochat.ops.ternary import TernaryMatrix

    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path)
    ts = tensors(read(path))
    for name, w in ternary_modules(model):
        codes, scale = weight_codes(w)
        m = TernaryMatrix.from_tq2_0(np.asarray(ts[name].data).reshape(w.shape[0], -1).copy(),
                                     w.shape[1])
        assert m.scale == float(np.float16(scale)), name
        np.testing.assert_array_equal(m.codes(), codes.numpy(), err_msg=name)


@pytest.mark.parametrize("embd", ["f16", "q8_0", "f32"])
def test_embedding_and_norms(model, tok, tmp_path, embd):
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, embd_type=embd)
    ts = tensors(read(path))
    w = model.token_embd.weight.detach().numpy()
    t = ts["token_embd.weight"]
    assert t.tensor_type == {"f16": GT.F16, "q8_0": GT.Q8_0, "f32": GT.F32}[embd]
    assert list(t.shape) == [SMALL["d_model"], VOCAB]
    want = gguf.quants.quantize(w, t.tensor_type)
    assert np.asarray(t.data).tobytes() == want.tobytes()
    if embd == "f32":
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w)
    assert "output.weight" not in ts  # tied head
    norms = {"output_norm.weight": model.output_norm.weight}
    for i, b in enumerate(model.blocks):
        norms.update({f"blk.{i}.{a}.weight": getattr(b, a).weight for a in NORMS})
    for name, p in norms.items():
        assert ts[name].tensor_type == GT.F32, name
        assert list(ts[name].shape) == [p.shape[0]]
        np.testing.assert_array_equal(np.asarray(ts[name].data), p.detach().numpy(), name)
    assert not any(n.endswith(".scale") or n.endswith(".bias") for n in ts)


def test_q8_0_matches_gguf_py_byte_for_byte():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 96)).astype(np.float32) * np.float32(0.02)
    x[0] = 0.0  # all-zero blocks
    x[1, :32] = -0.0
    x[2] = rng.integers(-127, 128, 96).astype(np.float32) + 0.5  # ties after scaling
    x[2, 0] = x[2, 32] = x[2, 64] = 127.0
    x[3] *= 1e4
    x[4] *= 1e-30  # tiny: fp16 d underflows to 0
    x[5, ::2] = np.float32(2.5)
    x[5, 1::2] = np.float32(-0.5)
    for k in range(6, 40):  # block maxima and values placed near .5 boundaries
        amax = np.float32(rng.uniform(0.5, 2.0))
        d = amax / np.float32(127)
        x[k, ::32] = amax
        x[k, 1:32] = (rng.integers(-126, 126, 31) + np.float32(0.5)) * d
    want = gguf.quants.quantize(x, GT.Q8_0)
    got = quantize_q8_0(x)
    assert got.shape == want.shape and got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(dequantize_q8_0(got, 96), gguf.quants.dequantize(want, GT.Q8_0))
    with pytest.raises(ValueError, match="not a multiple of the 32-weight"):
        quantize_q8_0(np.zeros((2, 48), np.float32))
    bad = x.copy()
    bad[7, 9] = np.nan
    with pytest.raises(ValueError, match="non-finite value at row 7, column 9"):
        quantize_q8_0(bad)


# ---- metadata --------------------------------------------------------------------------


def expected_metadata(tok: Tokenizer, arch: str, cfg: dict, name: str, file_type: int) -> dict:
    """The contract (docs/gguf.md), written out independently of the exporter."""
    special = set(range(5)) | {i for i, t in enumerate(tok.tokens())
                               if t.startswith("<|reserved_")}
    kv = {
        "general.architecture": ("string", arch),
        "general.name": ("string", name),
        "general.file_type": ("u32", file_type),
        "general.quantization_version": ("u32", 2),
        f"{arch}.vocab_size": ("u32", cfg["vocab_size"]),
        f"{arch}.context_length": ("u32", cfg["max_seq_len"]),
        f"{arch}.embedding_length": ("u32", cfg["d_model"]),
        f"{arch}.block_count": ("u32", cfg["n_layers"]),
        f"{arch}.feed_forward_length": ("u32", cfg["ffn_hidden"]),
        f"{arch}.attention.head_count": ("u32", cfg["n_heads"]),
        f"{arch}.attention.head_count_kv": ("u32", cfg["n_kv_heads"]),
        f"{arch}.rope.dimension_count": ("u32", cfg["d_model"] // cfg["n_heads"]),
        f"{arch}.rope.freq_base": ("f32", float(np.float32(cfg["rope_theta"]))),
        f"{arch}.attention.layer_norm_rms_epsilon": ("f32", float(np.float32(cfg["norm_eps"]))),
        "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.pre": ("string", "gpt-2"),
        "tokenizer.ggml.tokens": ("array[string]", tok.tokens()),
        "tokenizer.ggml.token_type": ("array[i32]",
                                      [3 if i in special else 1 for i in range(VOCAB)]),
        "tokenizer.ggml.merges": ("array[string]", tok.merges()),
        "tokenizer.ggml.bos_token_id": ("u32", 0),
        "tokenizer.ggml.eos_token_id": ("u32", 0),
        "tokenizer.ggml.eot_token_id": ("u32", 4),
        "tokenizer.ggml.add_bos_token": ("bool", True),
        "tokenizer.ggml.add_eos_token": ("bool", False),
        "tokenizer.chat_template": ("string", CHAT_TEMPLATE),
    }
    if arch == "nanochat":
        kv["nanochat.ffn_activation"] = ("string", cfg.get("activation", "silu"))
    return kv


GV = gguf.GGUFValueType
TYPES = {"string": [GV.STRING], "u32": [GV.UINT32], "f32": [GV.FLOAT32], "bool": [GV.BOOL],
         "array[string]": [GV.ARRAY, GV.STRING], "array[i32]": [GV.ARRAY, GV.INT32]}


def check_metadata(path, want: dict) -> None:
    reader = read(path)
    got = fields(reader)
    assert set(got) == set(want)
    assert "general.alignment" not in got
    for key, (typ, value) in want.items():
        assert reader.fields[key].types == TYPES[typ], key
        assert got[key] == value, key
    # our own reader (the engine's) sees the same keys, types and values
    from nanochat._core import core

    f = core().GgufFile(str(path))
    assert f.kv_types() == {k: t for k, (t, _) in want.items()}
    assert f.kv() == {k: v for k, (_, v) in want.items()}


@pytest.mark.parametrize("wtype,file_type", [("tq2_0", 37), ("tq1_0", 36)])
def test_metadata_round_trips(model, tok, tmp_path, wtype, file_type):
    assert file_type == int(getattr(gguf.LlamaFileType, f"MOSTLY_{wtype.upper()}"))
    path = tmp_path / "m.gguf"
    s = export_gguf(model, tok, path, weight_type=wtype, name="tiny-test")
    assert s["architecture"] == "bitnet" and s["metadata_keys"] == 25
    check_metadata(path, expected_metadata(tok, "bitnet", SMALL, "tiny-test", file_type))


def test_token_types_mark_every_special_token(tok, model, tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path)
    got = fields(read(path))
    types = got["tokenizer.ggml.token_type"]
    toks = got["tokenizer.ggml.tokens"]
    assert toks == tok.tokens() and got["tokenizer.ggml.merges"] == tok.merges()
    assert toks[:5] == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                        "<|assistant_end|>"]
    for i, t in enumerate(toks):
        assert types[i] == (3 if tok.is_special(i) else 1), (i, t)
    assert types.count(3) > 5  # the reserved fillers too
    assert all(" " not in m.split(" ", 1)[1] for m in got["tokenizer.ggml.merges"])


def test_relu2_model_is_nanochat_architecture(tok, tmp_path):
    path = tmp_path / "r.gguf"
    m = make_model(1, activation="relu2")
    s = export_gguf(m, tok, path)
    assert s["architecture"] == "nanochat"
    cfg = {**SMALL, "activation": "relu2"}
    check_metadata(path, expected_metadata(tok, "nanochat", cfg, "nanochat", 37))
    got = fields(read(path))
    assert got["nanochat.ffn_activation"] == "relu2"
    assert not any(k.startswith("bitnet.") for k in got)


def test_architecture_rule():
    assert architecture(ModelConfig()) == ("bitnet", [])
    arch, keys = architecture(ModelConfig(activation="relu2"))
    assert arch == "nanochat" and keys == [("nanochat.ffn_activation", "string", "relu2")]


# ---- errors ------------------------------------------------------------------------------


def test_bad_arguments(model, tok, tmp_path):
    with pytest.raises(ValueError, match="--type must be one of tq2_0, tq1_0, got 'q4_0'"):
        export_gguf(model, tok, tmp_path / "a.gguf", weight_type="q4_0")
    with pytest.raises(ValueError, match="--embd must be one of f16, q8_0, f32, got 'bf16'"):
        export_gguf(model, tok, tmp_path / "a.gguf", embd_type="bf16")
    with pytest.raises(FileNotFoundError, match="output directory .*nope does not exist"):
        export_gguf(model, tok, tmp_path / "nope" / "a.gguf")
    small = Tokenizer.train([TEXT], 300)
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model's vocab_size "
                                         "is 512"):
        export_gguf(model, small, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


def test_dimension_not_a_multiple_of_256_names_the_tensor(tok, tmp_path):
    m = make_model(2, ffn_hidden=384)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight: input dimension 384 "
                                         r"\(ffn_hidden\) is not a multiple of 256"):
        export_gguf(m, tok, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


def test_unmapped_parameter_is_an_error(tok, tmp_path):
    m = make_model(3)
    m.blocks[1].register_parameter("router", torch.nn.Parameter(torch.zeros(4, 256)))
    with pytest.raises(ValueError, match=r"no tensor for model parameter\(s\) blocks\.1\.router"):
        export_gguf(m, tok, tmp_path / "a.gguf")


def test_failed_export_leaves_no_file(model, tok, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous file")
    bad = make_model(4)
    with torch.no_grad():
        bad.token_embd.weight[7, 5] = float("nan")
    with pytest.raises(ValueError, match="token_embd.weight: .*non-finite value at row 7, "
                                         "column 5"):
        export_gguf(bad, tok, out, embd_type="q8_0")
    assert out.read_bytes() == b"previous file"
    # the C++ writer fails at the final rename (the target is a directory): temp removed
    target = tmp_path / "dir.gguf"
    target.mkdir()
    with pytest.raises(ValueError, match="cannot rename"):
        export_gguf(model, tok, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "m.gguf"]
    assert not list(target.iterdir())


# ---- checkpoints and the CLI ---------------------------------------------------------------


def save_checkpoint(run: Path, tok: Tokenizer, tmp_path: Path, **model) -> GPT:
    """A checkpoint laid out as the trainer writes it, without training."""
    sets = [f"model.{k}={v}" for k, v in {**SMALL, **model}.items()] + ["train.seq_len=64"]
    cfg = apply_overrides(RunConfig(), sets)
    torch.manual_seed(5)
    m = GPT(cfg.model, bitlinear="torch")
    tok_dir = tok.save(tmp_path / "tokenizer_src")
    checkpoint.save(run, 3, {"model": m.state_dict(), "config": cfg.to_dict(), "step": 3},
                    cfg.to_dict(), tok_dir, keep=1)
    return m


def test_export_checkpoint_from_run_dir(tok, tmp_path):
    run = tmp_path / "myrun"
    m = save_checkpoint(run, tok, tmp_path)
    out = tmp_path / "m.gguf"
    s = export_checkpoint(run, out, weight_type="tq1_0", embd_type="q8_0")
    assert s["name"] == "myrun" and s["step"] == 3
    assert s["checkpoint"] == str(run / "checkpoints" / "step_000003")
    ts = tensors(read(out))
    codes, scale = weight_codes(m.blocks[1].attn_v.weight)
    got = gguf.quants.dequantize(np.asarray(ts["blk.1.attn_v.weight"].data), GT.TQ1_0)
    np.testing.assert_array_equal(got, codes.numpy() * np.float32(np.float16(scale)))
    assert fields(read(out))["general.name"] == "myrun"


def test_cli_export_end_to_end(tok, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, tok, tmp_path)
    out = tmp_path / "out.gguf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    r = subprocess.run([sys.executable, "-m", "nanochat", "export", "--gguf", str(out),
                        "--checkpoint", str(run / "checkpoints" / "step_000003"),
                        "--name", "cli-model"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "architecture : bitnet" in r.stdout
    assert "tensors      : 24 (14 tq2_0, 9 f32, 1 f16)" in r.stdout
    assert "elapsed" in r.stdout and str(out) in r.stdout
    got = fields(read(out))
    assert got["general.name"] == "cli-model" and got["general.file_type"] == 37
    assert len(read(out).tensors) == 24


def test_cli_errors_exit_2(tok, tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run, tok, tmp_path)

    def main(*args):
        rc = cli.main(["export", *args])
        return rc, capsys.readouterr().err

    rc, err = main("--gguf", str(tmp_path / "a.gguf"), "--checkpoint", str(tmp_path / "nope"))
    assert rc == 2 and "--checkpoint" in err and "nope does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, err = main("--gguf", str(tmp_path / "a.gguf"), "--checkpoint", str(tmp_path / "empty"))
    assert rc == 2 and "no checkpoint in" in err
    rc, err = main("--gguf", str(tmp_path / "no" / "a.gguf"), "--checkpoint", str(run))
    assert rc == 2 and "output directory" in err and "does not exist" in err
    for flag, value in (("--type", "q4_0"), ("--embd", "bf16")):
        with pytest.raises(SystemExit) as e:
            cli.main(["export", "--gguf", str(tmp_path / "a.gguf"), "--checkpoint", str(run),
                      flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid choice: '{value}'" in err
    bad = tmp_path / "bad"
    save_checkpoint(bad, tok, tmp_path, ffn_hidden=320)
    rc, err = main("--gguf", str(tmp_path / "a.gguf"), "--checkpoint", str(bad))
    assert rc == 2 and "blk.0.ffn_down.weight: input dimension 320 (ffn_hidden)" in err
    assert not (tmp_path / "a.gguf").exists()
    rc, _ = main("--gguf", str(tmp_path / "a.gguf"), "--checkpoint", str(run), "--type", "TQ1_0")
    assert rc == 0 and fields(read(tmp_path / "a.gguf"))["general.file_type"] == 36
