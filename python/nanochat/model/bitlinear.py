"""BitLinear, the module: a bias-free linear layer whose forward is ternary (W1.58 A8).

The arithmetic, both kernel paths and their backward are in nanochat/ops/bitlinear.py; this
module owns the latent weight and picks the path per call.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from nanochat.ops import ternary
from nanochat.ops.bitlinear import (
    AUTO_MIN_MACS,
    KERNELS,
    bitlinear_cpp,
    bitlinear_torch,
    cpp_applies,
    fast_isa,
    resolve_backward,
    weight_codes,
)


class BitLinear(nn.Module):
    """A bias-free linear layer with a latent fp32 weight (out, in), ternary in the forward."""

    def __init__(self, in_features: int, out_features: int, kernel: str = "auto",
                 device=None, dtype=None, backward_precision: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"BitLinear kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.backward_precision = backward_precision  # C++ path's backward GEMMs (module doc)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype or torch.float32)
        )
        self._frozen: ternary.TernaryMatrix | None = None  # set only inside frozen()
        self.reset_parameters()

    @property
    def backward_precision(self) -> str:
        return self._backward_precision

    @backward_precision.setter
    def backward_precision(self, value: str) -> None:
        # Resolved here, once: forward stays free of CPU probing (torch.compile traces it).
        self._bf16_backward = resolve_backward(value)
        self._backward_precision = value

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal(0, std), std defaulting to 1/sqrt(in_features). The GPT sets its own std."""
        std = std if std is not None else 1 / math.sqrt(self.in_features)
        nn.init.normal_(self.weight, 0.0, std)

    def uses_cpp(self, x: torch.Tensor, packed: bool = False) -> bool:
        """Whether this call runs the C++ path. `packed`: inside frozen(), where the weight
        is packed once, so "auto" takes it whenever it applies (the GEMV beats torch)."""
        if self.kernel == "torch":
            return False
        ok = cpp_applies(x, self.weight)
        if self.kernel == "cpp" and not ok:
            raise ValueError(
                f"BitLinear(kernel='cpp') needs float32 CPU tensors and in_features % "
                f"{ternary.QK} == 0; got x {x.dtype} on {x.device}, weight "
                f"{self.weight.dtype} on {self.weight.device}, in_features {self.in_features}"
            )
        if self.kernel == "auto" and not packed:
            # Below this much work per call the fixed costs (quantize the weight, the op
            # and autograd plumbing) outweigh the faster GEMMs: one layer's forward +
            # backward around 2^25 MACs, C++ vs torch, is the "layer" part of
            # `nanochat bench kernels` (docs/benchmarks.md: 256->128 at 256 tokens,
            # 2^23 MACs, runs at 0.74-0.86x torch's speed on 2 threads).
            tokens = x.numel() // self.in_features
            ok = (ok and self.in_features * self.out_features * tokens >= AUTO_MIN_MACS
                  and fast_isa())
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._frozen is not None and not torch.is_grad_enabled()
                and self.uses_cpp(x, packed=True)):
            # inference inside frozen(): the weight was packed once, skip re-quantizing it
            y = self._frozen(x.reshape(-1, self.in_features).contiguous())
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.uses_cpp(x):
            return bitlinear_cpp(x, self.weight, self._bf16_backward)
        return bitlinear_torch(x, self.weight)

    def ternary(self) -> ternary.TernaryMatrix:
        """The layer's weight in the C++ kernel layout (inference), same codes/scale as training."""
        codes, s = weight_codes(self.weight.detach().cpu())
        return ternary.TernaryMatrix.from_codes(codes, s)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.kernel}, backward_precision={self.backward_precision}")


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Pack every cpp-capable BitLinear of `model` once for the duration of the block, so
    no-grad forwards (generation) skip the per-call weight quantization. Same codes, scale
    and kernels as the op. The weights must not change inside the block."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear) and m.kernel != "torch"
              and cpp_applies(m.weight.new_empty((0, m.in_features)), m.weight)]
    try:
        for m in layers:
            m._frozen = m.ternary()
        yield model
    finally:
        for m in layers:
            m._frozen = None
