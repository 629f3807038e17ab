"""torch.library custom ops: schema/fake/dispatch checks (opcheck) and torch.compile."""

import torch
from nanochat.ops import ternary
from nanochat.ops import ternary_gemm as ops


def _case(rows=8, cols=512, tokens=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (rows, cols), dtype=torch.int8, generator=g)
    W = ternary.TernaryMatrix.from_codes(codes, 0.25)
    x = torch.randn(tokens, cols, generator=g)
    return W, x


def test_opcheck_quantize_activations():
    _, x = _case()
    torch.library.opcheck(ops.quantize_activations, (x,))


def test_opcheck_ternary_gemm():
    W, x = _case()
    q, s = ternary.quantize_activations(x)
    torch.library.opcheck(ops.ternary_gemm, (W.data, q, s, W.scale))


def test_ops_match_the_python_api():
    W, x = _case(rows=5, cols=768, tokens=4)
    q, s = torch.ops.nanochat.quantize_activations(x)
    q2, s2 = ternary.quantize_activations(x)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert torch.equal(torch.ops.nanochat.ternary_gemm(W.data, q, s, W.scale), W(x))


def test_compiles_without_graph_breaks():
    W, x = _case(rows=16, cols=256, tokens=2)

    def f(x):
        q, s = torch.ops.nanochat.quantize_activations(x * 2.0)
        return torch.ops.nanochat.ternary_gemm(W.data, q, s, W.scale).relu()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def _hard_activations():
    """Rows whose codes sit on rounding boundaries: many scales, ties at .5, tiny rows."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2048, 96, generator=g) * torch.logspace(-6, 4, 2048)[:, None]
    # rows of (k + 0.5) / a: x * a lands on a tie (or one ulp beside it) for every code
    amax = torch.rand(512, generator=g) * 10 + 0.1
    a = torch.full_like(amax, 127.0) / amax
    x[:512] = (torch.randint(-120, 120, (512, 96), generator=g) + 0.5) / a[:, None]
    x[:512, 0] = amax
    x[512:520] = 3e-6  # below the 1e-5 amax floor
    return x


def test_every_activation_quantizer_is_the_cores_bit_for_bit():
    """One torch activation quantizer (ops/activations.py) for every path: the op and
    TernaryMatrix off the CPU, and BitLinear's reference; its codes and scales equal the C++
    core's exactly. `127.0 / amax` (the op's old CUDA form, a reciprocal times 127) gives
    other codes on these rows."""
    from nanochat.ops import activations, bitlinear

    x = _hard_activations()
    q, s = ternary.quantize_activations(x)
    q2, s2 = activations.int8_activations(x)
    assert q2.dtype == torch.int8 and s2.dtype == torch.float32 and s2.shape == s.shape
    assert torch.equal(q2, q) and torch.equal(s2, s)
    codes, a = bitlinear.quantize_activations(x)
    assert torch.equal(codes.to(torch.int8), q)
    old = 127.0 / x.abs().amax(dim=1).clamp(min=1e-5)
    assert not torch.equal(torch.clamp(torch.round(x * old[:, None]), -128, 127), codes)
    assert not torch.equal((1.0 / old).float(), s)


def test_no_second_activation_scale_in_the_package():
    """The per-token scale is computed in one place (ops/activations.py), not again in the
    op's or TernaryMatrix's CUDA branch."""
    import re
    from pathlib import Path

    import nanochat

    pkg = Path(nanochat.__file__).parent
    hits = [f"{p.relative_to(pkg)}: {m.group(0)}" for p in sorted(pkg.rglob("*.py"))
            for m in re.finditer(r"127(?:\.0)?\)?\s*/\s*[\w.()]*\bamax\b", p.read_text())
            if p.name != "activations.py"]
    assert hits == [], hits
