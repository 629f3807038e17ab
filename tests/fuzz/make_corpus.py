"""Writes the libFuzzer seed corpora kept in tests/fuzz/corpus (small, committed):

  gguf_open/   a few KB-sized GGUF files (the `gguf` package's writer): every metadata
               type, nested arrays, every tensor type the reader knows, a 64-byte alignment,
               plus edge cases (header only, truncated, one tensor at the file's end)
  model_load/  two of the seed models of tests/cpp/fuzz_model.cpp (dense bitnet with TQ2_0 +
               F16, 260 KB; nanochat with TQ1_0 + Q8_0 + MoE + lite mHC + window keys, 218 KB),
               written by `nanochat_fuzz --write-seeds` from a -DNANOCHAT_BUILD_TESTS=ON build;
               the third (MoE + shared expert + dynamic mHC + sliding window + MTP) is 790 KB
               and stays out of the repo: add it for a longer campaign

  python tests/fuzz/make_corpus.py [--nanochat-fuzz build-dev/nanochat_fuzz]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

HERE = Path(__file__).resolve().parent


def write(path: Path, kvs, tensors, alignment: int | None = None) -> bytes:
    w = GGUFWriter(str(path), arch="fuzz")
    if alignment:
        w.add_uint32("general.alignment", alignment)
    for key, kind, value in kvs:
        if kind == "array":
            w.add_array(key, value)
        else:
            getattr(w, f"add_{kind}")(key, value)
    for name, array, raw_dtype in tensors:
        if raw_dtype is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def gguf_open(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    every_type = [
        ("u8", "uint8", 7), ("i8", "int8", -7), ("u16", "uint16", 700), ("i16", "int16", -700),
        ("u32", "uint32", 70000), ("i32", "int32", -70000), ("f32", "float32", 1.5),
        ("b", "bool", True), ("s", "string", "hello"), ("u64", "uint64", 1 << 40),
        ("i64", "int64", -(1 << 40)), ("f64", "float64", -2.25),
        ("a.u8", "array", [1, 2, 3]), ("a.f32", "array", [0.5, -1.0]),
        ("a.str", "array", ["a", "", "<|bos|>", "Ġt"]), ("a.bool", "array", [True, False]),
        ("a.nested", "array", [[1, 2], ["x", "y"], [[3]]]),
    ]
    codes = rng.integers(0, 3, 66 * 2, dtype=np.uint8)  # TQ2_0 blocks: 2-bit codes + fp16 d
    tensors = [
        ("f32", rng.standard_normal(4).astype(np.float32), None),
        ("f16", rng.standard_normal((2, 8)).astype(np.float16), None),
        ("q8", rng.integers(0, 255, 34, dtype=np.uint8), Q.Q8_0),
        ("tq2", codes, Q.TQ2_0),
        ("tq1", rng.integers(0, 243, 54, dtype=np.uint8), Q.TQ1_0),
    ]
    full = write(out / "every_type.gguf", every_type, tensors)
    write(out / "align64.gguf", [("general.name", "string", "x")], tensors[:2], alignment=64)
    write(out / "empty.gguf", [], [])
    write(out / "tokenizer.gguf", [
        ("tokenizer.ggml.model", "string", "gpt2"),
        ("tokenizer.ggml.tokens", "array", [bytes([b]).hex() for b in range(64)]),
        ("tokenizer.ggml.merges", "array", ["a b", "c d"]),
        ("tokenizer.ggml.token_type", "array", [1] * 64)], [])
    (out / "truncated.gguf").write_bytes(full[: len(full) // 2])


def model_load(out: Path, nanochat_fuzz: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([nanochat_fuzz, "--write-seeds", tmp], check=True)
        for name in ("bitnet.gguf", "nanochat-b.gguf"):
            (out / name).write_bytes((Path(tmp) / name).read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanochat-fuzz", help="the nanochat_fuzz executable (writes model_load)")
    args = ap.parse_args()
    gguf_open(HERE / "corpus" / "gguf_open")
    if args.nanochat_fuzz:
        model_load(HERE / "corpus" / "model_load", args.nanochat_fuzz)


if __name__ == "__main__":
    main()
