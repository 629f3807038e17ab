"""The `nanochat` command line, run as a user would: in a subprocess."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUPPORTED_ISAS, clean_env

INFO_KEYS = {"version", "features", "cuda", "threads", "isa", "isas"}
BENCH_KEYS = {"op", "rows", "cols", "tokens", "threads", "isa", "seconds", "gops",
              "weight_gbps", "bw_fraction", "vs_torch"}


def console_script() -> str | None:
    """The `nanochat` entry point of this interpreter's environment, else one on PATH."""
    here = Path(sys.executable).parent / "nanochat"
    if here.exists():
        return str(here)
    return shutil.which("nanochat")


LAUNCHERS = [pytest.param([sys.executable, "-m", "nanochat"], id="python-m")]
if console_script():
    LAUNCHERS.append(pytest.param([console_script()], id="console-script"))


def run(argv: list[str], timeout: float = 180, **env: str | None):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**env))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_info_json(launcher):
    r = run(launcher + ["info", "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert INFO_KEYS <= info.keys()
    assert isinstance(info["version"], str) and info["version"]
    for k in ("avx2", "avx512", "avx512_vnni"):
        assert isinstance(info["features"][k], bool)
    assert isinstance(info["cuda"]["compiled"], bool)
    assert isinstance(info["cuda"]["devices"], int) and info["cuda"]["devices"] >= 0
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert info["isas"] == SUPPORTED_ISAS and info["isas"][0] == "scalar"
    assert info["isa"] == info["isas"][-1]  # the best, with NANOCHAT_ISA unset
    # a feature the CPU lacks cannot have a kernel path
    for isa, feat in (("avx2", "avx2"), ("avx_vnni", "avx_vnni"), ("avx512", "avx512"),
                      ("avx512_vnni", "avx512_vnni"), ("neon", "neon"),
                      ("neon_dotprod", "dotprod")):
        if isa in info["isas"]:
            assert info["features"][feat]
    # the path each op family runs: a kernel this CPU runs, the ternary GEMM the active ISA's
    assert info["ops"]["ternary_gemm"] == info["isa"]
    for path in info["ops"].values():
        assert path in info["isas"], info["ops"]


@pytest.mark.skipif("avx2" not in SUPPORTED_ISAS, reason="no AVX2")
def test_info_ops_follow_pinned_isa():
    # NANOCHAT_ISA=avx2 is how an AVX-512 machine stands in for an AVX2-only one: then no
    # op may report (or run) an AVX-512 path
    r = run([sys.executable, "-m", "nanochat", "info", "--json"], NANOCHAT_ISA="avx2")
    assert r.returncode == 0, r.stderr
    ops = json.loads(r.stdout)["ops"]
    assert set(ops.values()) == {"avx2"}, ops


@pytest.mark.parametrize("n", ["1", "3"])
def test_info_threads_env(n):
    r = run([sys.executable, "-m", "nanochat", "info", "--json"], NANOCHAT_NUM_THREADS=n)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == int(n)


def test_info_text():
    r = run([sys.executable, "-m", "nanochat", "info"])
    assert r.returncode == 0, r.stderr
    assert "kernel paths : " + ", ".join(SUPPORTED_ISAS) in r.stdout
    assert f"active ISA   : {SUPPORTED_ISAS[-1]}; per op: ternary_gemm={SUPPORTED_ISAS[-1]}" \
        in r.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("args", [["--help"], ["bench", "kernels", "--help"], ["info", "--help"]],
                         ids=["top", "bench-kernels", "info"])
def test_help(launcher, args):
    r = run(launcher + args)
    assert r.returncode == 0, r.stderr
    assert "usage: nanochat" in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["info"], ["eval", "bpb", "--help"]],
                         ids=["help", "info", "eval-help"])
def test_commands_without_torch_do_not_import_it(args):
    """Building the parser (every command does) and `info` stay off torch: its import costs
    seconds and ~200 MiB resident that a command like `info` or an engine-side eval never
    uses."""
    code = ("import sys\nfrom nanochat import cli\ntry:\n    cli.main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    r = run([sys.executable, "-c", code, *args])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False"


def test_no_command_is_usage_error():
    r = run([sys.executable, "-m", "nanochat"])
    assert r.returncode == 2 and "usage: nanochat" in r.stderr


@pytest.fixture(scope="module")
def bench_lines():
    r = run([sys.executable, "-m", "nanochat", "bench", "kernels", "--quick", "--json",
             "--threads", "1"])
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]  # every line must be one JSON object


def test_bench_kernels_json(bench_lines):
    assert bench_lines
    assert {m["op"] for m in bench_lines} == {"gemv", "gemm", "quantize", "layer", "attention"}
    bench_lines = [m for m in bench_lines if m["op"] in ("gemv", "gemm")]
    for m in bench_lines:
        assert isinstance(m, dict)
        assert BENCH_KEYS <= m.keys(), BENCH_KEYS - m.keys()
        for k in ("rows", "cols", "tokens", "threads"):
            assert isinstance(m[k], int) and m[k] > 0, (k, m)
        for k in ("seconds", "gops", "weight_gbps", "bw_fraction", "vs_torch"):
            v = m[k]
            assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, m)
            assert math.isfinite(v) and v > 0, (k, m)
        assert m["threads"] == 1
        assert m["isa"] in SUPPORTED_ISAS
        assert m["op"] in ("gemv", "gemm")
        assert (m["op"] == "gemv") == (m["tokens"] == 1)
        # the derived columns are what the docstring says they are
        assert math.isclose(m["gops"], 2 * m["rows"] * m["cols"] * m["tokens"] / m["seconds"] / 1e9,
                            rel_tol=1e-9)
        assert math.isclose(m["weight_gbps"], m["rows"] * m["cols"] / 4 / m["seconds"] / 1e9,
                            rel_tol=1e-9)
    assert {m["op"] for m in bench_lines} == {"gemv", "gemm"}
    assert {m["isa"] for m in bench_lines} == set(SUPPORTED_ISAS)
    # every (shape, op) is measured on every ISA with the TK2 kernel
    cells = {(m["rows"], m["cols"], m["op"]) for m in bench_lines}
    assert {m["kernel"] for m in bench_lines} <= {"tk2", "tk2x8", "tk2_dram", "tk2x8_dram",
                                                  "codes"}
    tk2 = [m for m in bench_lines if m["kernel"] == "tk2"]
    assert len(tk2) == len(cells) * len(SUPPORTED_ISAS)
    # on the best ISA: the engine's TK2 tiles per (shape, op), and both layouts' GEMV from
    # DRAM per shape
    best = [m for m in bench_lines if m["kernel"] in ("tk2x8", "tk2_dram", "tk2x8_dram")]
    assert {m["isa"] for m in best} == {SUPPORTED_ISAS[-1]}
    assert sorted((m["rows"], m["cols"], m["op"]) for m in best if m["kernel"] == "tk2x8") == \
        sorted(cells)
    for k in ("tk2_dram", "tk2x8_dram"):
        assert sorted((m["rows"], m["cols"]) for m in best if m["kernel"] == k) == \
            sorted((c[0], c[1]) for c in cells if c[2] == "gemv")
    # and training's codes GEMM beside every TK2 GEMM (same shape, ISA and thread count)
    codes = [m for m in bench_lines if m["kernel"] == "codes"]
    key = lambda m: (m["rows"], m["cols"], m["isa"], m["threads"])  # noqa: E731
    assert sorted(map(key, codes)) == sorted(key(m) for m in tk2 if m["op"] == "gemm")


def test_bench_kernels_training_parts(bench_lines):
    """The quantizer on every ISA against the scalar loop, one layer's C++ op against torch."""
    quant = [m for m in bench_lines if m["op"] == "quantize"]
    assert {m["isa"] for m in quant} == set(SUPPORTED_ISAS)
    for m in quant:
        assert m["threads"] == 1 and m["rows"] == m["tokens"] > 0 and m["cols"] > 0
        assert math.isclose(m["gbps"], m["rows"] * m["cols"] * 4 / m["seconds"] / 1e9,
                            rel_tol=1e-9)
        assert math.isclose(m["vs_torch"], m["torch_seconds"] / m["seconds"], rel_tol=1e-9)
    scalar = next(m for m in quant if m["isa"] == "scalar")
    assert scalar["vs_scalar"] == 1.0
    layer = [m for m in bench_lines if m["op"] == "layer"]
    assert len(layer) == 1 and layer[0]["macs"] == layer[0]["rows"] * layer[0]["cols"] * \
        layer[0]["tokens"]
    assert math.isclose(layer[0]["vs_torch"], layer[0]["torch_seconds"] / layer[0]["seconds"],
                        rel_tol=1e-9)
    att = [m for m in bench_lines if m["op"] == "attention"]
    assert {m["kernel"] for m in att} == {"attention_dense", "attention_kept", "attention_cpp",
                                          "attention_default"}
    for m in att:
        assert m["seconds"] > 0 and m["tokens"] == m["batch"] * m["seq"]
        assert math.isclose(m["vs_torch"], m["torch_seconds"] / m["seconds"], rel_tol=1e-9)
        assert (m["kept_fraction"] == 1.0) == (m["kernel"] != "attention_kept")


def test_bench_kernels_bad_isa():
    r = run([sys.executable, "-m", "nanochat", "bench", "kernels", "--quick", "--json",
             "--isa", "bogus"])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "bogus" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_env_is_clean(monkeypatch):
    """The helpers strip NANOCHAT_* from the caller's environment."""
    monkeypatch.setenv("NANOCHAT_ISA", "x")
    assert "NANOCHAT_ISA" not in clean_env()
    assert clean_env(NANOCHAT_ISA="scalar")["NANOCHAT_ISA"] == "scalar"
    assert clean_env()["PATH"] == os.environ["PATH"]
