"""Untrusted GGUF files in the engine: a claimed context of 2^20 or 2^24 tokens gets the
default context (4096) unless the caller asks for more, and a KV cache past the limit is a
clear error (Engine, `nanochat generate`), never std::bad_alloc or GBs zeroed; a loaded
model keeps working when its file is truncated or overwritten (it owns every tensor).

    pytest tests/test_engine_limits.py
"""

from __future__ import annotations

import struct

import pytest
from engine_helpers import TEXT, VOCAB, make_model
from nanochat.cli import main
from nanochat.data.tokenizer import Tokenizer
from nanochat.export import export_gguf
from nanochat.infer.engine import Engine

KV_PER_TOKEN = 2 * 2 * 2 * 64 * 4  # layers x (K, V) x kv heads x head dim x f32


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "small.gguf"
    export_gguf(make_model(), Tokenizer.train([TEXT], VOCAB), path)
    return path


def claiming(src, dst, context: int):
    """A copy of `src` whose <arch>.context_length (u32) says `context`."""
    b = bytearray(src.read_bytes())
    i = b.index(b".context_length") + len(b".context_length")
    assert struct.unpack_from("<I", b, i)[0] == 4  # u32
    struct.pack_into("<I", b, i + 4, context)
    dst.write_bytes(bytes(b))
    return dst


@pytest.mark.parametrize("claimed", [2 ** 20, 2 ** 24])
def test_claimed_context_is_capped(small_gguf, tmp_path, capsys, claimed):
    p = claiming(small_gguf, tmp_path / f"ctx{claimed}.gguf", claimed)
    eng = Engine(p)
    assert eng.info["context_length"] == claimed
    assert eng.n_ctx == 4096
    assert len(eng.complete("def ", max_tokens=4, temperature=0.0)["tokens"]) == 4
    assert Engine(p, n_ctx=8192, max_kv_bytes=64 << 20).n_ctx == 8192  # explicit, within
    with pytest.raises(ValueError, match=rf"{p}: a context of {claimed} tokens needs a KV "
                       rf"cache of {claimed * KV_PER_TOKEN} bytes .* more than the allowed "
                       rf"{64 << 20}"):
        Engine(p, n_ctx=claimed, max_kv_bytes=64 << 20)
    if claimed == 2 ** 24:  # 32 GiB: over the default 4 GiB (before: std::bad_alloc)
        with pytest.raises(ValueError, match=rf"allowed {4 << 30}"):
            Engine(p, n_ctx=claimed)

    # the CLI in-process (main() returns 2 on bad input; anything else would raise)
    args = ["generate", "--model", str(p), "--prompt", "def ", "--max-tokens", "3",
            "--temperature", "0", "--threads", "1", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--ctx", str(claimed), "--max-kv-mib", "64"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "KV cache" in err and str(64 << 20) in err, err


def test_cli_kv_flag(small_gguf, capsys):
    for command in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
        assert "--max-kv-mib" in text and "default: the model's, at most 4096" in text
    assert main(["generate", "--model", str(small_gguf), "--prompt", "x",
                 "--max-kv-mib", "0"]) == 2
    assert "--max-kv-mib must be >= 1" in capsys.readouterr().err


def test_model_survives_its_file_changing(small_gguf, tmp_path, run_python):
    """Before: norms, the MoE router and mHC weights were read from the mapping, so a
    truncated file killed the process with SIGBUS at the next token (an overwritten one
    gave NaN activations)."""
    p = tmp_path / "m.gguf"
    p.write_bytes(small_gguf.read_bytes())
    code = f"""
from nanochat.infer.engine import Engine
e = Engine({str(p)!r})
a = e.complete("def ", max_tokens=8, temperature=0.0)["tokens"]
with open({str(p)!r}, "r+b") as f:
    n = len(f.read())
    f.seek(0)
    f.write(b"\\xff" * n)
    f.flush()
    e.reset()
    assert e.complete("def ", max_tokens=8, temperature=0.0)["tokens"] == a, "overwritten"
    f.truncate(0)
e.reset()
assert e.complete("def ", max_tokens=8, temperature=0.0)["tokens"] == a, "truncated"
print("ok")
"""
    r = run_python(code)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "ok"
