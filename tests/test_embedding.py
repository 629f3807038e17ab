"""C/C++ embedding: the installed package ships libnanochat, its headers and a CMake package.

Builds examples/cpp (a C++ program and a plain-C99 program) against
`nanochat info --cmake-dir` with CMake, exactly as a user would, runs both on an exported
model, and checks they generate the same greedy text as the Python engine (all three are
the same C++ engine behind different front ends).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nanochat.config import ModelConfig
from nanochat.data.tokenizer import Tokenizer
from nanochat.export import export_gguf
from nanochat.model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("import os\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n"
        "        print(name, len(name))\n\nif __name__ == '__main__':\n    main(sys.argv)\n") * 6


def _nanochat(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "nanochat", *args], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    tok = Tokenizer.train([TEXT], 384)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=384, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=512, max_seq_len=128)
    path = tmp_path_factory.mktemp("embed") / "model.gguf"
    export_gguf(GPT(cfg, bitlinear="torch"), tok, path)
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not on PATH")
    cmake_dir = _nanochat("info", "--cmake-dir")
    assert (Path(cmake_dir) / "nanochatConfig.cmake").is_file()
    build = tmp_path_factory.mktemp("examples-build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), *gen,
                    f"-Dnanochat_DIR={cmake_dir}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True,
                   text=True)
    return build


def test_info_paths_exist():
    inc, lib = _nanochat("info", "--include-dir", "--lib").splitlines()
    assert Path(lib).is_file() and Path(lib).name == "libnanochat.so"
    assert (Path(inc) / "nanochat" / "nanochat.h").is_file()
    assert (Path(inc) / "nanochat" / "nanochat.hpp").is_file()


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env)


def test_cpp_and_c_examples_match_python_engine(examples, model_path):
    from nanochat.infer.engine import Engine

    prompt = "def main("
    want = Engine(str(model_path)).complete(prompt, max_tokens=16, temperature=0.0)["text"]
    for exe in ("generate", "generate_c"):
        r = _run(examples / exe, str(model_path), prompt, "16")
        assert r.returncode == 0, r.stderr
        assert r.stdout == prompt + want + "\n", (exe, r.stdout, want)


def test_examples_report_bad_files(examples, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    for exe in ("generate", "generate_c"):
        r = _run(examples / exe, str(bad), "x")
        assert r.returncode == 1
        assert "error:" in r.stderr and str(bad) in r.stderr, r.stderr
        r = _run(examples / exe, str(tmp_path / "missing.gguf"), "x")
        assert r.returncode == 1 and "missing.gguf" in r.stderr
