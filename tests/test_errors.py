"""Misuse raises TypeError / ValueError with a message that says what is wrong, and
never crashes the interpreter. (The core's CoreError is a ValueError subclass.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nanochat._core import core
from nanochat.ops import ternary

TM = ternary.TernaryMatrix


def codes_np(rows=2, cols=256, seed=0):
    return np.random.default_rng(seed).integers(-1, 2, size=(rows, cols), dtype=np.int8)


@pytest.fixture
def W():
    return TM.from_codes(torch.from_numpy(codes_np(3, 512)), 0.02)


@pytest.fixture
def Wnp():
    return TM.from_codes(codes_np(3, 512), 0.02)


def test_core_error_is_value_error():
    assert issubclass(core().CoreError, ValueError)


# ---- row length not a multiple of 256 ---------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: ternary.pack_tq2_0(c, 1.0),
        lambda c: ternary.pack_tq1_0(c, 1.0),
        lambda c: TM.from_codes(c, 1.0),
        lambda c: TM.from_float(c.astype(np.float32)),
        lambda c: TM.from_float(torch.from_numpy(c.astype(np.float32))),
    ],
    ids=["pack_tq2_0", "pack_tq1_0", "from_codes", "from_float_np", "from_float_torch"],
)
def test_cols_not_multiple_of_256(call):
    with pytest.raises(ValueError, match=r"row length 300 is not a multiple of the 256"):
        call(codes_np(2, 300))


def test_cols_not_multiple_of_256_elsewhere():
    with pytest.raises(ValueError, match=r"row length 100"):
        ternary.unpack_tq2_0(np.zeros((2, 66), np.uint8), 100)
    with pytest.raises(ValueError, match=r"row length 320"):
        ternary.unpack_tq1_0(np.zeros((2, 54), np.uint8), 320)
    with pytest.raises(ValueError, match=r"row length 257"):
        TM.from_tq2_0(np.zeros((2, 66), np.uint8), 257)
    with pytest.raises(ValueError, match=r"row length 384"):
        TM(np.zeros((2, 96), np.uint8), 2, 384, 1.0)


# ---- dtype ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.float32, np.uint8])
def test_codes_wrong_dtype(dtype):
    c = codes_np().astype(dtype)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"codes: expected dtype int8, got {name}"):
        TM.from_codes(c, 1.0)
    with pytest.raises(TypeError, match=rf"codes: expected dtype int8, got .*{name}"):
        ternary.pack_tq2_0(torch.from_numpy(c), 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.float16, torch.bfloat16])
def test_float_input_wrong_dtype(W, dtype):
    x = torch.randn(2, 512).to(dtype)
    with pytest.raises(TypeError, match=r"x: expected dtype float32"):
        W(x)
    with pytest.raises(TypeError, match=r"x: expected dtype float32"):
        ternary.quantize_activations(x)
    with pytest.raises(TypeError, match=r"w: expected dtype float32"):
        ternary.quantize_weights(torch.randn(2, 256).to(dtype))


def test_float64_numpy_inputs(Wnp):
    with pytest.raises(TypeError, match=r"x: expected dtype float32, got float64"):
        Wnp(np.ones((2, 512)))  # numpy's default float64
    with pytest.raises(TypeError, match=r"w: expected dtype float32, got float64"):
        ternary.quantize_weights(np.ones((2, 256)))


def test_matmul_wrong_dtypes(W):
    q, s = ternary.quantize_activations(torch.randn(2, 512))
    with pytest.raises(TypeError, match=r"q: expected dtype int8, got (torch\.)?int16"):
        W.matmul_quantized(q.to(torch.int16), s)
    with pytest.raises(TypeError, match=r"q: expected dtype int8, got uint8"):
        W.matmul_quantized(q.to(torch.uint8), s)
    with pytest.raises(TypeError, match=r"x_scale: expected dtype float32"):
        W.matmul_quantized(q, s.double())
    with pytest.raises(TypeError, match=r"packed: expected dtype uint8, got int8"):
        ternary.unpack_tq2_0(np.zeros((2, 66), np.int8), 256)
    with pytest.raises(TypeError, match=r"data: expected dtype uint8"):
        TM(np.zeros((2, 64), np.int8), 2, 256, 1.0)


# ---- contiguity, ndim, container type ----------------------------------------------------


def test_non_contiguous(W, Wnp):
    ct = torch.from_numpy(codes_np(256, 256))
    with pytest.raises(ValueError, match=r"codes: must be contiguous"):
        TM.from_codes(ct.T, 1.0)
    with pytest.raises(ValueError, match=r"codes: must be contiguous"):
        ternary.pack_tq2_0(codes_np(256, 256).T, 1.0)
    with pytest.raises(ValueError, match=r"codes: must be contiguous"):
        ternary.pack_tq1_0(codes_np(2, 512)[:, ::2], 1.0)
    x = torch.randn(512, 4)
    with pytest.raises(ValueError, match=r"x: must be contiguous"):
        W(x.T)
    with pytest.raises(ValueError, match=r"x: must be contiguous"):
        Wnp(np.ascontiguousarray(x.numpy()).T)
    q, s = ternary.quantize_activations(torch.randn(4, 1024))
    with pytest.raises(ValueError, match=r"q: must be contiguous"):
        W.matmul_quantized(q[:, ::2], s)
    with pytest.raises(ValueError, match=r"x: must be contiguous"):
        W(torch.randn(1024)[::2])  # a strided 1-D vector (GEMV)
    with pytest.raises(ValueError, match=r"w: must be contiguous"):
        ternary.quantize_weights(torch.randn(256, 256).T)


def test_wrong_ndim(W):
    with pytest.raises(ValueError, match=r"codes: expected a 2-d array, got shape \(256,\)"):
        TM.from_codes(np.zeros(256, np.int8), 1.0)
    with pytest.raises(ValueError, match=r"codes: expected a 2-d array"):
        ternary.pack_tq2_0(np.zeros((1, 2, 256), np.int8), 1.0)
    with pytest.raises(ValueError, match=r"x: expected a 2-d array, got shape \(2, 3, 512\)"):
        W(torch.randn(2, 3, 512))
    with pytest.raises(ValueError, match=r"x: expected a 2-d array"):
        W(torch.tensor(1.0))
    q, s = ternary.quantize_activations(torch.randn(2, 512))
    with pytest.raises(ValueError, match=r"x_scale: expected a 1-d array"):
        W.matmul_quantized(q, s[:, None])
    with pytest.raises(ValueError, match=r"q: expected a 2-d array"):
        W.matmul_quantized(q[0], s)
    with pytest.raises(ValueError, match=r"w: expected a 2-d array"):
        ternary.quantize_weights(torch.randn(256))


@pytest.mark.parametrize(
    "call",
    [
        lambda: TM.from_codes([[0] * 256], 1.0),
        lambda: ternary.pack_tq2_0([[0] * 256], 1.0),
        lambda: ternary.unpack_tq1_0([[0] * 54], 256),
        lambda: ternary.quantize_weights([[0.0] * 256]),
        lambda: ternary.quantize_activations([[0.0] * 256]),
        lambda: TM.from_codes(np.zeros((1, 256), np.int8), 1.0)([0.0] * 256),
        lambda: TM.from_codes(np.zeros((1, 256), np.int8), 1.0)((0.0,) * 256),
        lambda: TM.from_codes(np.zeros((1, 256), np.int8), 1.0).matmul_quantized(
            [[0] * 256], [1.0]
        ),
    ],
    ids=["from_codes", "pack", "unpack", "quantize_weights", "quantize_activations",
         "call_list", "call_tuple", "matmul_list"],
)
def test_list_instead_of_array(call):
    want = r"expected a torch\.Tensor or numpy\.ndarray, got (list|tuple)"
    with pytest.raises(TypeError, match=want):
        call()


# ---- shape mismatches -----------------------------------------------------------------


def test_matmul_shape_mismatch(W, Wnp):
    q, s = ternary.quantize_activations(torch.randn(3, 512))
    with pytest.raises(ValueError, match=r"x_scale: expected 3 entries \(one per token\), got 2"):
        W.matmul_quantized(q, s[:2])
    q2, s2 = ternary.quantize_activations(torch.randn(3, 256))
    with pytest.raises(ValueError, match=r"q: expected 512 features per token, got 256"):
        W.matmul_quantized(q2, s2)
    with pytest.raises(ValueError, match=r"expected 512 features per token, got 768"):
        Wnp(np.ones((2, 768), np.float32))
    with pytest.raises(ValueError, match=r"expected 512 features per token, got 256"):
        W(torch.randn(256))  # GEMV with the wrong length


def test_ternary_matrix_bad_shape():
    with pytest.raises(ValueError, match=r"data: expected shape \(2, 64\) for a 2x256 matrix"):
        TM(np.zeros((2, 66), np.uint8), 2, 256, 1.0)
    with pytest.raises(ValueError, match=r"data: expected shape \(3, 128\)"):
        TM(np.zeros((2, 128), np.uint8), 3, 512, 1.0)


# ---- numpy / torch mixing ---------------------------------------------------------------


def test_numpy_torch_mixing(W, Wnp):
    qt, st = ternary.quantize_activations(torch.randn(2, 512))
    with pytest.raises(TypeError, match=r"must both be torch tensors or numpy arrays"):
        Wnp.matmul_quantized(qt, st)
    with pytest.raises(TypeError, match=r"must both be torch tensors or numpy arrays"):
        W.matmul_quantized(qt.numpy(), st.numpy())
    with pytest.raises(TypeError, match=r"must both be torch tensors or numpy arrays"):
        W(np.ones((2, 512), np.float32))
    with pytest.raises(TypeError, match=r"must both be torch tensors or numpy arrays"):
        Wnp(torch.ones(512))


# ---- packed bytes: lengths and corruption -------------------------------------------------


@pytest.mark.parametrize(
    "unpack,good", [(ternary.unpack_tq2_0, 66), (ternary.unpack_tq1_0, 54)],
    ids=["tq2_0", "tq1_0"],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_unpack_wrong_byte_length(unpack, good, kind):
    for nbytes in (good - 1, good + 1, 2 * good):
        packed = np.zeros((2, nbytes), np.uint8)
        if kind == "torch":
            packed = torch.from_numpy(packed)
        with pytest.raises(ValueError, match=rf"expected {good} bytes per row for 256 columns, "
                                             rf"got {nbytes}"):
            unpack(packed, 256)


def test_from_tq2_0_wrong_byte_length():
    with pytest.raises(ValueError, match=r"tq2_0: expected shape \(2, 132\), got \(2, 130\)"):
        TM.from_tq2_0(np.zeros((2, 130), np.uint8), 512)


def test_corrupt_tq2_0_code_3():
    codes = codes_np(3, 512, seed=4)
    packed = ternary.pack_tq2_0(codes, 0.5)
    bad = packed.copy()
    bad[1, 66 + 7] |= 0b11 << 4  # row 1, block 1: one 2-bit field set to 3
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3 in block 3 \(row 1\).*corrupt"):
        ternary.unpack_tq2_0(bad, 512)
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3"):
        ternary.unpack_tq2_0(torch.from_numpy(bad), 512)
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3"):
        TM.from_tq2_0(bad, 512)
    # the scale bytes are not codes: any value there is fine for unpack
    ok = packed.copy()
    ok[:, 64:66] = 0xFF
    c, _ = ternary.unpack_tq2_0(ok, 512)
    np.testing.assert_array_equal(c, codes)


def test_corrupt_tk2_code_3():
    W = TM(np.full((1, 64), 0xFF, np.uint8), 1, 256, 1.0)
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3"):
        W.codes()
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3"):
        W.to_tq2_0()


def test_non_finite_scale_in_tq2_0():
    packed = ternary.pack_tq2_0(codes_np(1, 256), 1.0)
    packed[0, 64:66] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    with pytest.raises(ValueError, match=r"non-finite scale"):
        TM.from_tq2_0(packed, 256)


# ---- values --------------------------------------------------------------------------------


def test_non_ternary_codes():
    c = codes_np(2, 256)
    c[1, 17] = 2
    for call in (lambda: ternary.pack_tq2_0(c, 1.0), lambda: ternary.pack_tq1_0(c, 1.0),
                 lambda: TM.from_codes(c, 1.0)):
        with pytest.raises(ValueError, match=r"code 2 at index 273 is not ternary"):
            call()
    c[1, 17] = -128
    with pytest.raises(ValueError, match=r"code -128 .* is not ternary"):
        TM.from_codes(torch.from_numpy(c), 1.0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pack_scale(scale):
    with pytest.raises(ValueError, match=r"scale is not finite"):
        ternary.pack_tq2_0(codes_np(), scale)
    with pytest.raises(ValueError, match=r"scale is not finite"):
        ternary.pack_tq1_0(codes_np(), scale)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_infinite_activations(W, bad):
    x = torch.randn(3, 512)
    x[2, 100] = bad
    with pytest.raises(ValueError, match=r"token 2 has a non-finite value"):
        W(x)
    with pytest.raises(ValueError, match=r"non-finite"):
        W(x[2])


@pytest.mark.parametrize("where", ["one", "all"])
def test_nan_activations(W, where):
    x = torch.randn(3, 512)
    if where == "one":
        x[1, 7] = float("nan")
    else:
        x[1] = float("nan")
    try:
        W(x)
    except ValueError as e:
        assert "non-finite" in str(e)
    else:
        raise AssertionError("NaN activations were accepted")
    with pytest.raises(ValueError, match=r"non-finite"):
        ternary.quantize_activations(x.numpy())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad):
    w = torch.randn(2, 256)
    w[0, 3] = bad
    with pytest.raises(ValueError, match=r"weights are not finite"):
        ternary.quantize_weights(w)
    with pytest.raises(ValueError, match=r"weights are not finite"):
        TM.from_float(w.numpy())


# ---- addresses and dispatch knobs -----------------------------------------------------------


def test_misaligned_numpy_buffer():
    raw = np.zeros(4 * 256 + 1, np.uint8)
    x = np.frombuffer(raw.data, dtype=np.float32, count=256, offset=1).reshape(1, 256)
    assert x.flags.c_contiguous and not x.flags.aligned
    with pytest.raises(ValueError, match=r"misaligned"):
        ternary.quantize_activations(x)


def test_bad_isa_names():
    with pytest.raises(ValueError, match=r"unknown ISA 'bogus'"):
        ternary.set_isa("bogus")
    with pytest.raises(ValueError, match=r"unknown ISA 'AVX2'"):
        ternary.set_isa("AVX2")
    with pytest.raises(TypeError):
        ternary.set_isa(3)
    assert ternary.active_isa() in ternary.supported_isas()  # unchanged, still usable
