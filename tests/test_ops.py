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
