"""Packed weight formats against the PyPI `gguf` package (the oracle), byte for byte.

ggml's TQ2_0/TQ1_0 quantizers take the float tensor codes * scale; for ternary
codes every nonzero block's absmax is the scale itself, so gguf writes the same
2-bit / base-3 digits and d = fp16(scale) (0 for an all-zero block). Our packers
take the codes and the scale directly and must write identical bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nanochat.ops import ternary

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

QK = ternary.QK

SHAPES = [(1, 256), (1, 4096), (3, 256), (2, 512), (5, 1280), (16, 4096)]
SCALES = [
    1.0,
    0.5,                 # exact in fp16
    0.0123,              # not representable in fp16 (nor exactly in fp32)
    1.0 / 3.0,
    0.02,
    1.0 + 2.0**-11,      # exact fp16 tie: rounds to even (1.0)
    1.0 + 3 * 2.0**-11,  # exact fp16 tie: rounds to even (1 + 2^-9)
    3e-6,                # fp16 subnormal
    1e-8,                # rounds to fp16 zero
    2.5e4,               # large, still finite in fp16
]
FORMATS = {
    "tq2_0": (ternary.pack_tq2_0, ternary.unpack_tq2_0, GGMLQuantizationType.TQ2_0, 66),
    "tq1_0": (ternary.pack_tq1_0, ternary.unpack_tq1_0, GGMLQuantizationType.TQ1_0, 54),
}


def random_codes(rows: int, cols: int, seed: int, zero_blocks: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)
    if zero_blocks:
        nb = cols // QK
        # zero some whole 256-blocks (ggml writes d = 0 for them)
        for r in range(rows):
            for b in range(nb):
                if rng.random() < 0.25:
                    codes[r, b * QK:(b + 1) * QK] = 0
        if nb * rows > 1:
            codes[0, :QK] = 0  # at least one all-zero block
        codes[-1, -QK:] = rng.integers(-1, 2, size=QK, dtype=np.int8)
        codes[-1, -1] = 1  # and at least one nonzero block
    return codes


def fp16(scale: float) -> np.float32:
    """The per-block d ggml stores for `scale`: fp16 of the fp32 value, back as fp32."""
    return np.float32(np.float16(np.float32(scale)))


def oracle(codes: np.ndarray, scale: float, qtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return gguf_quants.quantize((codes * scale).astype(np.float32), qtype)


def cases():
    for i, (rows, cols) in enumerate(SHAPES):
        for j, scale in enumerate(SCALES):
            yield pytest.param(rows, cols, scale, i * 100 + j, id=f"{rows}x{cols}-s{scale:g}")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rows,cols,scale,seed", list(cases()))
def test_pack_matches_gguf_numpy(fmt, rows, cols, scale, seed):
    pack, unpack, qtype, block_bytes = FORMATS[fmt]
    codes = random_codes(rows, cols, seed)
    ours = pack(codes, scale)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.uint8
    assert ours.shape == (rows, cols // QK * block_bytes)
    ref = oracle(codes, scale, qtype)
    assert ref.shape == ours.shape
    np.testing.assert_array_equal(ours, ref)

    # unpack: exact codes, per-block d = fp16(scale) or 0 for all-zero blocks
    back, block_d = unpack(ours, cols)
    assert isinstance(back, np.ndarray) and back.dtype == np.int8
    assert isinstance(block_d, np.ndarray) and block_d.dtype == np.float32
    np.testing.assert_array_equal(back, codes)
    nonzero = np.any(codes.reshape(rows, cols // QK, QK) != 0, axis=-1)
    want_d = np.where(nonzero, fp16(scale), np.float32(0))
    np.testing.assert_array_equal(block_d, want_d)

    # gguf reads our bytes back as codes * fp16(scale)
    deq = gguf_quants.dequantize(ours, qtype)
    np.testing.assert_array_equal(deq, codes.astype(np.float32) * fp16(scale))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rows,cols", [(1, 256), (4, 1280), (3, 4096)])
def test_pack_matches_gguf_torch(fmt, rows, cols):
    pack, unpack, qtype, _ = FORMATS[fmt]
    codes_np = random_codes(rows, cols, seed=rows * cols)
    codes = torch.from_numpy(codes_np.copy())
    for scale in (0.0123, 0.75, 3e-6):
        ours = pack(codes, scale)
        assert isinstance(ours, torch.Tensor) and ours.dtype == torch.uint8
        np.testing.assert_array_equal(ours.numpy(), oracle(codes_np, scale, qtype))
        np.testing.assert_array_equal(ours.numpy(), pack(codes_np, scale))
        back, block_d = unpack(ours, cols)
        assert isinstance(back, torch.Tensor) and back.dtype == torch.int8
        assert isinstance(block_d, torch.Tensor) and block_d.dtype == torch.float32
        assert torch.equal(back, codes)
        nonzero = (codes.view(rows, cols // QK, QK) != 0).any(-1)
        want = torch.where(nonzero, torch.tensor(float(fp16(scale))), torch.tensor(0.0))
        assert torch.equal(block_d, want)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pack_all_zero_and_fp16_overflow(fmt):
    pack, unpack, qtype, _ = FORMATS[fmt]
    zeros = np.zeros((2, 512), np.int8)
    ours = pack(zeros, 0.37)
    np.testing.assert_array_equal(ours, oracle(zeros, 0.37, qtype))
    _, d = unpack(ours, 512)
    np.testing.assert_array_equal(d, np.zeros((2, 2), np.float32))
    # a scale past fp16's range stores d = inf, exactly as gguf does
    codes = random_codes(2, 512, seed=7)
    ours = pack(codes, 7e4)
    np.testing.assert_array_equal(ours, oracle(codes, 7e4, qtype))


def test_tq1_0_every_trit_pattern():
    """All 3^5 digit groups in every qs/qh slot position, decoded by gguf."""
    vals = np.array(np.meshgrid(*[[-1, 0, 1]] * 5, indexing="ij")).reshape(5, -1).T  # (243, 5)
    rows = []
    for start in range(0, 243, 32):
        chunk = vals[np.arange(start, start + 32) % 243]  # (32, 5)
        block = np.zeros(QK, np.int8)
        for n in range(5):
            block[n * 32:(n + 1) * 32] = chunk[:, n]          # qs[0..31]
            block[160 + n * 16:160 + (n + 1) * 16] = chunk[:16, n]  # qs[32..47]
        for n in range(4):
            block[240 + n * 4:240 + (n + 1) * 4] = chunk[:4, n]  # qh
        rows.append(block)
    codes = np.stack(rows)
    ours = ternary.pack_tq1_0(codes, 1.0)
    np.testing.assert_array_equal(ours, oracle(codes, 1.0, GGMLQuantizationType.TQ1_0))
    back, _ = ternary.unpack_tq1_0(ours, QK)
    np.testing.assert_array_equal(back, codes)


# ---- TernaryMatrix (TK2) ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("rows,cols", [(1, 256), (3, 512), (17, 1280), (2, 4096)])
def test_tk2_from_codes_roundtrip(kind, rows, cols):
    codes = random_codes(rows, cols, seed=rows + cols)
    if kind == "torch":
        codes = torch.from_numpy(codes)
    W = ternary.TernaryMatrix.from_codes(codes, 0.0123)
    assert type(W.data) is type(codes) and W.shape == (rows, cols)
    assert tuple(W.data.shape) == (rows, cols // 4) and W.nbytes == rows * cols // 4
    back = W.codes()
    assert type(back) is type(codes)
    if kind == "torch":
        assert torch.equal(back, codes)
        assert torch.equal(W.dequantize(), codes.float() * np.float32(0.0123))
    else:
        np.testing.assert_array_equal(back, codes)
        np.testing.assert_array_equal(W.dequantize(), codes.astype(np.float32) * np.float32(0.0123))


def test_tk2_byte_layout():
    """Byte j of a block holds columns j, j+64, j+128, j+192 at shifts 0, 2, 4, 6 (code+1)."""
    codes = random_codes(2, 512, seed=3)
    W = ternary.TernaryMatrix.from_codes(codes, 1.0)
    c = (codes.astype(np.int16) + 1).reshape(2, 2, 4, 64)  # (row, block, n, j)
    want = (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).astype(np.uint8)
    np.testing.assert_array_equal(W.data, want.reshape(2, 128))


@pytest.mark.parametrize("rows", [1, 8, 13, 40])
def test_tk2_tiles_layout_and_gemm(rows):
    """TK2 tiles (the engine's layout): 8 rows interleaved block by block, zero-padded to
    whole tiles; ternary_gemm over them equals the row-major result bit for bit."""
    from nanochat._core import buffer, core

    cols = 768
    codes = random_codes(rows, cols, seed=rows)
    W = ternary.TernaryMatrix.from_codes(torch.from_numpy(codes), 0.0123)
    padded = (rows + 7) // 8 * 8
    tiles = torch.empty(padded, cols // 4, dtype=torch.uint8)
    core().tk2_tile(buffer(W.data, "tk2"), cols, buffer(tiles, "tiles"))
    rowmajor = torch.cat([W.data, torch.zeros(padded - rows, cols // 4, dtype=torch.uint8)])
    # (tile, row in tile, block, 64 bytes) -> (tile, block, row in tile, 64 bytes)
    want = rowmajor.reshape(padded // 8, 8, cols // 256, 64).transpose(1, 2)
    assert torch.equal(tiles, want.reshape(padded, cols // 4))
    for tokens in (1, 5):
        q, s = ternary.quantize_activations(torch.randn(tokens, cols))
        ys = [torch.empty(tokens, rows) for _ in range(2)]
        for w, tile_rows, y in ((W.data, 1, ys[0]), (tiles, 8, ys[1])):
            core().ternary_gemm(buffer(w, "w"), rows, cols, W.scale, buffer(q, "q"),
                                buffer(s, "s"), buffer(y, "y"), tile_rows=tile_rows)
        assert torch.equal(ys[0], ys[1])
    if rows % 8:  # tiles come in whole tiles: row-major bytes are the wrong shape
        with pytest.raises(ValueError, match="weights"):
            core().ternary_gemm(buffer(W.data, "w"), rows, cols, W.scale, buffer(q, "q"),
                                buffer(s, "s"), buffer(ys[0], "y"), tile_rows=8)
    with pytest.raises(ValueError, match="tile_rows"):
        core().ternary_gemm(buffer(tiles, "w"), rows, cols, W.scale, buffer(q, "q"),
                            buffer(s, "s"), buffer(ys[0], "y"), tile_rows=4)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("rows,cols", [(1, 256), (4, 1280), (3, 4096)])
@pytest.mark.parametrize("scale", [0.0123, 0.5, 1.0 / 3.0, 3e-6])
def test_from_tq2_0_roundtrip(kind, rows, cols, scale):
    codes = random_codes(rows, cols, seed=rows * 7 + cols)
    packed = ternary.pack_tq2_0(codes, scale)
    np.testing.assert_array_equal(packed, oracle(codes, scale, GGMLQuantizationType.TQ2_0))
    if kind == "torch":
        packed = torch.from_numpy(packed)
    W = ternary.TernaryMatrix.from_tq2_0(packed, cols)
    assert type(W.data) is type(packed)
    assert W.scale == float(fp16(scale))  # the per-tensor scale is the stored fp16 d
    back = W.codes()
    np.testing.assert_array_equal(np.asarray(back), codes)
    again = W.to_tq2_0()
    assert type(again) is type(packed)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(packed))


def test_from_tq2_0_of_gguf_bytes_and_all_zero():
    codes = random_codes(6, 1280, seed=11)
    raw = oracle(codes, 0.0456, GGMLQuantizationType.TQ2_0)
    W = ternary.TernaryMatrix.from_tq2_0(raw, 1280)
    np.testing.assert_array_equal(W.codes(), codes)
    np.testing.assert_array_equal(W.to_tq2_0(), raw)

    zeros = np.zeros((2, 256), np.int8)
    Z = ternary.TernaryMatrix.from_tq2_0(ternary.pack_tq2_0(zeros, 0.5), 256)
    assert Z.scale == 0.0
    np.testing.assert_array_equal(Z.codes(), zeros)
    np.testing.assert_array_equal(Z.to_tq2_0(), oracle(zeros, 1.0, GGMLQuantizationType.TQ2_0))


def test_from_tq2_0_rejects_mixed_block_scales():
    codes = random_codes(2, 512, seed=5, zero_blocks=False)
    a = ternary.pack_tq2_0(codes[:1], 0.5)
    b = ternary.pack_tq2_0(codes[1:], 0.25)
    mixed = np.concatenate([a, b])
    with pytest.raises(ValueError, match=r"scale"):
        ternary.TernaryMatrix.from_tq2_0(mixed, 512)
    with pytest.raises(ValueError, match=r"scale"):
        ternary.TernaryMatrix.from_tq2_0(torch.from_numpy(mixed), 512)
    # within one row too: a non-BitNet float tensor quantized by gguf (per-block absmax)
    w = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    w[0, 256:] *= 3
    raw = gguf_quants.quantize(w, GGMLQuantizationType.TQ2_0)
    with pytest.raises(ValueError, match=r"scale"):
        ternary.TernaryMatrix.from_tq2_0(raw, 512)


# ---- absmean weight quantization ----------------------------------------------------


def absmean_reference(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """BitNet b1.58 absmean, evaluated as the core does: mean|w| accumulated in float64
    and rounded once to float32, then w * float32(1/scale) rounded half-to-even."""
    scale = torch.tensor(w.double().abs().sum().item() / w.numel(), dtype=torch.float32)
    scale = torch.clamp(scale, min=1e-5)
    inv = torch.tensor(1.0, dtype=torch.float32) / scale
    codes = torch.clamp(torch.round(w * inv), -1, 1).to(torch.int8)
    return codes, float(scale)


def weight_cases():
    g = torch.Generator().manual_seed(1234)
    yield "normal", torch.randn(64, 256, generator=g) * 0.02
    yield "wide", torch.randn(37, 1280, generator=g)
    yield "heavy_tail", torch.randn(16, 512, generator=g) ** 3
    yield "tiny", torch.randn(8, 256, generator=g) * 1e-7  # mean below the 1e-5 floor
    yield "zeros", torch.zeros(4, 256)
    yield "odd_shape", torch.randn(7, 100, generator=g)  # quantize_weights takes any cols
    # values placed on the rounding boundaries +-0.5*scale and +-1.5*scale
    w = torch.randn(8, 256, generator=g)
    s = w.abs().mean()
    w[0, :4] = torch.tensor([0.5, -0.5, 1.5, -1.5]) * s
    yield "boundaries", w


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("name,w", list(weight_cases()), ids=[n for n, _ in weight_cases()])
def test_quantize_weights_matches_absmean(kind, name, w):
    ref_codes, ref_scale = absmean_reference(w)
    codes, scale = ternary.quantize_weights(w if kind == "torch" else w.numpy())
    if kind == "torch":
        assert isinstance(codes, torch.Tensor)
    else:
        assert isinstance(codes, np.ndarray)
        codes = torch.from_numpy(codes)
    assert codes.dtype == torch.int8 and tuple(codes.shape) == tuple(w.shape)
    assert scale == ref_scale
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"


def test_quantize_weights_vs_textbook_absmean():
    """The plain torch formula (float32 mean, w / scale) agrees except, at most, where
    w / scale lies within float32 rounding of a 0.5 / 1.5 boundary: there w/scale and
    w*(1/scale) may round to different sides. Any other difference is a bug."""
    g = torch.Generator().manual_seed(99)
    w = torch.randn(512, 1024, generator=g) * 0.03
    codes, scale = ternary.quantize_weights(w)
    t_scale = w.abs().mean().clamp(min=1e-5)
    assert abs(scale - t_scale.item()) <= 1e-6 * t_scale.item()
    t_codes = torch.clamp(torch.round(w / t_scale), -1, 1).to(torch.int8)
    diff = codes != t_codes
    ratio = (w / t_scale)[diff].abs()
    near = ((ratio - 0.5).abs() < 1e-5) | ((ratio - 1.5).abs() < 1e-5)
    assert bool(near.all()), f"codes differ away from a rounding boundary: {ratio[~near]}"
    assert int(diff.sum()) <= 5
