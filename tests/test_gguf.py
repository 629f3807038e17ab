"""GGUF v3 files from nanochat._C against the PyPI `gguf` package (llama.cpp's gguf-py).

Our writer's files must read identically in gguf.GGUFReader, gguf.GGUFWriter's files must
read identically in our GgufFile, and TQ2_0 bytes from nanochat.ops.ternary survive both ways.
GGUF dims are fastest-first: a numpy array of shape (rows, cols) has dims [cols, rows].
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from nanochat._core import core  # noqa: E402
from nanochat.ops import ternary  # noqa: E402
from nanochat.ops.ternary import _buffer  # noqa: E402

GT = gguf.GGMLQuantizationType

KVS = [
    ("general.architecture", "string", "bitnet"),
    ("k.u8", "u8", 255),
    ("k.i8", "i8", -128),
    ("k.u16", "u16", 65535),
    ("k.i16", "i16", -32768),
    ("k.u32", "u32", 4_000_000_000),
    ("k.i32", "i32", -2_000_000_000),
    ("k.f32", "f32", 1.5),
    ("k.bool", "bool", True),
    ("k.string", "string", "héllo wörld"),
    ("k.u64", "u64", 2**64 - 1),
    ("k.i64", "i64", -(2**63)),
    ("k.f64", "f64", -2.25e300),
    ("tokenizer.ggml.tokens", "array[string]", ["<s>", "", "a b", "ü"]),
    ("tokenizer.ggml.token_type", "array[i32]", [1, 2, -3, 4]),
    ("k.arr_f32", "array[f32]", [0.5, -1.0]),
    ("k.arr_u8", "array[u8]", [0, 255]),
    ("k.arr_bool", "array[bool]", [True, False]),
    ("k.arr_u64", "array[u64]", [2**64 - 1, 0]),
    ("k.arr_empty", "array[string]", []),
]


def _tensors(rng: np.random.Generator):
    """(name, ggml type, numpy array of bytes as stored, numpy logical shape)."""
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((2, 4)).astype(np.float16)
    q8 = rng.integers(0, 256, (2, 2 * 34), dtype=np.uint8)  # 2 rows x 64 weights
    codes = rng.integers(-1, 2, (4, 512), dtype=np.int8)
    tq2 = ternary.pack_tq2_0(codes, 0.37)
    tq1 = ternary.pack_tq1_0(codes, 0.37)
    return [
        ("f32", GT.F32, f32, (3, 5)),
        ("f16", GT.F16, f16, (2, 4)),
        ("q8", GT.Q8_0, q8, (2, 64)),
        ("blk.0.attn_q.weight", GT.TQ2_0, tq2, (4, 512)),
        ("blk.0.attn_k.weight", GT.TQ1_0, tq1, (4, 512)),
    ]


def _write_ours(path, kvs, tensors):
    entries = []
    for name, typ, arr, shape in tensors:
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        entries.append((name, int(typ), list(reversed(shape)), _buffer(raw, name)))
    core().gguf_write(str(path), kvs, entries)


def _their_kvs(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-7)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def test_our_file_reads_in_gguf_py(tmp_path):
    path = tmp_path / "ours.gguf"
    tensors = _tensors(np.random.default_rng(0))
    _write_ours(path, KVS, tensors)

    reader = gguf.GGUFReader(str(path))
    theirs = _their_kvs(reader)
    assert list(theirs) == [k for k, _, _ in KVS]
    for key, _, value in KVS:
        assert _same(theirs[key], value), (key, theirs[key], value)
    assert reader.fields["k.u8"].types == [gguf.GGUFValueType.UINT8]
    assert reader.fields["tokenizer.ggml.tokens"].types == [
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.STRING,
    ]

    assert [t.name for t in reader.tensors] == [t[0] for t in tensors]
    for t, (name, typ, arr, shape) in zip(reader.tensors, tensors):
        assert t.tensor_type == typ, name
        assert list(t.shape) == list(reversed(shape)), name
        assert t.n_elements == int(np.prod(shape))
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(arr).tobytes(), name
        assert t.data_offset % 32 == 0


def test_our_file_reads_in_ours(tmp_path):
    path = tmp_path / "ours.gguf"
    tensors = _tensors(np.random.default_rng(1))
    _write_ours(path, KVS, tensors)
    f = core().GgufFile(str(path))
    assert f.version == 3 and f.alignment == 32
    kv = f.kv()
    assert list(kv) == [k for k, _, _ in KVS]
    for key, typ, value in KVS:
        assert _same(kv[key], value), key
    assert f.kv_types() == {k: t for k, t, _ in KVS}
    infos = f.tensors()
    for info, (name, typ, arr, shape) in zip(infos, tensors):
        assert info["name"] == name and info["type"] == int(typ)
        assert info["dims"] == list(reversed(shape))
        assert info["nbytes"] == arr.nbytes and info["offset"] % 32 == 0
        data = f.tensor_data(name)
        assert data.dtype == np.uint8 and not data.flags.writeable
        assert data.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_tensor_data_keeps_file_alive(tmp_path):
    path = tmp_path / "alive.gguf"
    raw = np.arange(256, dtype=np.uint8)
    core().gguf_write(str(path), [], [("t", 0, [64], _buffer(raw, "t"))])
    data = core().GgufFile(str(path)).tensor_data("t")  # the GgufFile is only referenced by data
    import gc

    gc.collect()
    assert data.tobytes() == raw.tobytes()
    with pytest.raises(ValueError):
        data[0] = 1


def test_gguf_py_file_reads_in_ours(tmp_path):
    path = tmp_path / "theirs.gguf"
    rng = np.random.default_rng(2)
    w = gguf.GGUFWriter(str(path), arch="bitnet")
    w.add_uint32("bitnet.block_count", 12)
    w.add_int8("k.i8", -5)
    w.add_uint64("k.u64", 2**63 + 5)
    w.add_int64("k.i64", -7)
    w.add_float32("bitnet.rope.freq_base", 10000.0)
    w.add_float64("k.f64", 0.125)
    w.add_bool("k.bool", False)
    w.add_string("k.str", "ünïcode")
    w.add_token_list(["<s>", "</s>", "hello"])
    w.add_array("k.ints", [1, 2, 3])
    w.add_array("k.floats", [0.5, 0.25])
    f32 = rng.standard_normal((3, 32)).astype(np.float32)
    f16 = rng.standard_normal((5,)).astype(np.float16)
    codes = rng.integers(-1, 2, (2, 256), dtype=np.int8)
    tq2 = np.asarray(ternary.pack_tq2_0(codes, 0.5))
    w.add_tensor("f32", f32)
    w.add_tensor("f16", f16)
    w.add_tensor("tq2", tq2, raw_dtype=GT.TQ2_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = core().GgufFile(str(path))
    reader = gguf.GGUFReader(str(path))
    theirs = _their_kvs(reader)
    kv = ours.kv()
    assert list(kv) == list(theirs)
    for key in theirs:
        assert _same(kv[key], theirs[key]), (key, kv[key], theirs[key])
    assert kv["general.architecture"] == "bitnet"
    assert kv["tokenizer.ggml.tokens"] == ["<s>", "</s>", "hello"]
    assert kv["k.u64"] == 2**63 + 5

    infos = {t["name"]: t for t in ours.tensors()}
    assert infos["f32"]["dims"] == [32, 3] and infos["f32"]["type"] == 0
    assert infos["f16"]["dims"] == [5] and infos["f16"]["type"] == 1
    assert infos["tq2"]["dims"] == [256, 2] and infos["tq2"]["type"] == 35
    for t in reader.tensors:
        assert ours.tensor_data(t.name).tobytes() == np.asarray(t.data).tobytes()
        assert infos[t.name]["offset"] == t.data_offset - ours.data_offset
    assert ours.tensor_data("f32").view(np.float32).reshape(3, 32).tolist() == f32.tolist()
    assert ours.tensor_data("tq2").tobytes() == tq2.tobytes()


def test_tq2_0_survives_and_dequantizes(tmp_path):
    path = tmp_path / "tq2.gguf"
    rng = np.random.default_rng(3)
    rows, cols, scale = 8, 1024, 0.0371
    codes = rng.integers(-1, 2, (rows, cols), dtype=np.int8)
    codes[0, :256] = 0  # an all-zero block (d = 0)
    packed = np.asarray(ternary.pack_tq2_0(codes, scale))
    assert packed.shape == (rows, cols // 256 * 66)
    core().gguf_write(
        str(path),
        [("general.architecture", "string", "bitnet")],
        [("w", int(GT.TQ2_0), [cols, rows], _buffer(packed.reshape(-1), "w"))],
    )
    ours = core().GgufFile(str(path))
    assert ours.tensor_data("w").tobytes() == packed.tobytes()
    (t,) = gguf.GGUFReader(str(path)).tensors
    assert t.tensor_type == GT.TQ2_0 and list(t.shape) == [cols, rows]
    assert np.asarray(t.data).tobytes() == packed.tobytes()
    deq = gguf.quants.dequantize(np.asarray(t.data), GT.TQ2_0)
    assert deq.shape == (rows, cols)
    want = codes.astype(np.float32) * np.float32(np.float16(scale))
    np.testing.assert_array_equal(deq, want)


def test_alignment_key(tmp_path):
    path = tmp_path / "align.gguf"
    raw = np.zeros(12, dtype=np.uint8)
    core().gguf_write(
        str(path),
        [("general.alignment", "u32", 64)],
        [("a", 0, [3], _buffer(raw, "a")), ("b", 0, [3], _buffer(raw, "b"))],
    )
    ours = core().GgufFile(str(path))
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert [t["offset"] for t in ours.tensors()] == [0, 64]
    reader = gguf.GGUFReader(str(path))
    assert reader.alignment == 64
    assert [t.data_offset % 64 for t in reader.tensors] == [0, 0]


def test_writer_rejects_bad_input(tmp_path):
    path = str(tmp_path / "bad.gguf")
    raw = np.zeros(66, dtype=np.uint8)
    cases = [
        ([("k", "u8", 1), ("k", "u8", 2)], [], "duplicate metadata key"),
        ([("k", "u8", 256)], [], "does not fit"),
        ([("k", "u128", 1)], [], "unknown GGUF value type"),
        ([("k", "array[i8]", [1, 999])], [], "does not fit"),
        ([("k", "string", 5)], [], "expected str"),
        ([], [("t", 35, [128], _buffer(raw[:33], "t"))], "block size"),
        ([], [("t", 35, [256], _buffer(raw[:65], "t"))], "needs 66 bytes"),
        ([], [("t", 99, [66], _buffer(raw, "t"))], "unknown ggml tensor type"),
        (
            [],
            [("t", 35, [256], _buffer(raw, "t")), ("t", 35, [256], _buffer(raw, "t"))],
            "duplicate",
        ),
        ([], [("t", 0, [16], _buffer(raw[:64].view(np.float32), "t"))], "expected dtype uint8"),
    ]
    for kvs, tensors, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            core().gguf_write(path, kvs, tensors)
        assert path in str(e.value)
    assert not (tmp_path / "bad.gguf").exists()
    assert not (tmp_path / "bad.gguf.tmp").exists()


def test_bad_files_raise_value_error_naming_file(tmp_path):
    good = tmp_path / "good.gguf"
    raw = np.arange(66, dtype=np.uint8)
    core().gguf_write(
        str(good), [("k", "array[string]", ["a", "b"])], [("t", 35, [256], _buffer(raw, "t"))]
    )
    blob = good.read_bytes()
    bad = tmp_path / "model.gguf"
    cases = {
        "truncated": (blob[: len(blob) - 40], "extends past end of file"),
        "header": (blob[:10], "too small"),
        "magic": (b"GGUG" + blob[4:], "not a GGUF file"),
        "version 2": (blob[:4] + struct.pack("<I", 2) + blob[8:], "version 2"),
        "tensor count": (blob[:8] + struct.pack("<Q", 2**62) + blob[16:], "tensor count"),
        "string length": (blob[:24] + struct.pack("<Q", 2**63) + blob[32:], "length"),
    }
    for name, (data, msg) in cases.items():
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=msg) as e:
            core().GgufFile(str(bad))
        assert str(bad) in str(e.value), name
    with pytest.raises(ValueError, match="cannot open"):
        core().GgufFile(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="not found"):
        core().GgufFile(str(good)).tensor_data("nope")
