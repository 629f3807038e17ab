"""Ternary weights and W1.58A8 kernels on torch tensors and numpy arrays.

Thin, zero-copy wrappers over the C++ core (`nanochat._C`): inputs are passed by
address after their dtype, device, shape and contiguity are checked; outputs are
allocated here, as the same kind of array as the main input (torch in, torch out;
numpy in, numpy out). Misuse raises TypeError/ValueError, never crashes.

    from nanochat.ops import ternary
    W = ternary.TernaryMatrix.from_float(torch.randn(768, 768))
    y = W(x)                      # per-token int8 activations, ternary GEMM
    raw = W.to_tq2_0()            # ggml TQ2_0 bytes, as gguf.quants writes them

Exercised by `pytest tests/test_ternary.py` and `nanochat bench kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from nanochat._core import buffer as _buffer  # the core's buffer descriptor
from nanochat._core import core

Array = Union[torch.Tensor, np.ndarray]

QK = 256  # weights per block in every packed format
TQ2_0_BLOCK_BYTES = 66
TQ1_0_BLOCK_BYTES = 54
TK2_BLOCK_BYTES = 64

_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int32: "int32",
}
_NUMPY_TO_TORCH = {"float32": torch.float32, "int8": torch.int8, "uint8": torch.uint8}


def _check(a: Array, name: str, dtype: str, ndim: int) -> None:
    """Python-side checks with messages naming the argument (the core checks again)."""
    if not isinstance(a, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(a).__name__}")
    got = _TORCH_DTYPES.get(a.dtype, str(a.dtype)) if isinstance(a, torch.Tensor) else a.dtype.name
    if got != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {got}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(a.shape)}")
    contiguous = a.is_contiguous() if isinstance(a, torch.Tensor) else a.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"{name}: must be contiguous (call .contiguous() / np.ascontiguousarray)")


def _empty_like_kind(ref: Array, shape: tuple[int, ...], dtype: str, device=None) -> Array:
    if isinstance(ref, torch.Tensor):
        return torch.empty(shape, dtype=_NUMPY_TO_TORCH[dtype], device=device or ref.device)
    return np.empty(shape, dtype=dtype)


def _require_cpu(a: Array, name: str) -> None:
    if isinstance(a, torch.Tensor) and a.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {a.device}")


def _require_cols(cols: int, what: str) -> None:
    if cols % QK:
        raise ValueError(
            f"{what}: row length {cols} is not a multiple of the {QK}-weight block"
        )


# ---- weights ---------------------------------------------------------------------


def quantize_weights(w: Array) -> tuple[Array, float]:
    """BitNet absmean: scale = max(mean|w|, 1e-5), codes = clamp(round(w/scale), -1, 1)."""
    _check(w, "w", "float32", 2)
    _require_cpu(w, "w")
    codes = _empty_like_kind(w, tuple(w.shape), "int8")
    scale = core().absmean_quantize(_buffer(w, "w"), _buffer(codes, "codes"))
    return codes, scale


def _pack(fn, codes: Array, scale: float, block_bytes: int, what: str) -> Array:
    _check(codes, "codes", "int8", 2)
    _require_cpu(codes, "codes")
    rows, cols = codes.shape
    _require_cols(cols, what)
    out = _empty_like_kind(codes, (rows, cols // QK * block_bytes), "uint8")
    fn(_buffer(codes, "codes"), float(scale), _buffer(out, "out"))
    return out


def _unpack(fn, packed: Array, cols: int, block_bytes: int, what: str) -> tuple[Array, Array]:
    _check(packed, "packed", "uint8", 2)
    _require_cpu(packed, "packed")
    _require_cols(cols, what)
    rows = packed.shape[0]
    if packed.shape[1] != cols // QK * block_bytes:
        raise ValueError(
            f"packed: expected {cols // QK * block_bytes} bytes per row for {cols} columns, "
            f"got {packed.shape[1]}"
        )
    codes = _empty_like_kind(packed, (rows, cols), "int8")
    scales = _empty_like_kind(packed, (rows, cols // QK), "float32")
    fn(_buffer(packed, "packed"), _buffer(codes, "codes"), _buffer(scales, "block_scales"))
    return codes, scales


def pack_tq2_0(codes: Array, scale: float) -> Array:
    """ggml TQ2_0 bytes (rows, cols/256*66) of `codes * scale`, byte-equal to gguf.quants."""
    return _pack(core().tq2_0_pack, codes, scale, TQ2_0_BLOCK_BYTES, "pack_tq2_0")


def unpack_tq2_0(packed: Array, cols: int) -> tuple[Array, Array]:
    """(codes int8 (rows, cols), per-block d float32 (rows, cols/256)) from TQ2_0 bytes."""
    return _unpack(core().tq2_0_unpack, packed, cols, TQ2_0_BLOCK_BYTES, "unpack_tq2_0")


def pack_tq1_0(codes: Array, scale: float) -> Array:
    """ggml TQ1_0 bytes (rows, cols/256*54) of `codes * scale`, byte-equal to gguf.quants."""
    return _pack(core().tq1_0_pack, codes, scale, TQ1_0_BLOCK_BYTES, "pack_tq1_0")


def unpack_tq1_0(packed: Array, cols: int) -> tuple[Array, Array]:
    """(codes int8 (rows, cols), per-block d float32 (rows, cols/256)) from TQ1_0 bytes."""
    return _unpack(core().tq1_0_unpack, packed, cols, TQ1_0_BLOCK_BYTES, "unpack_tq1_0")


# ---- activations -------------------------------------------------------------------


def quantize_activations(x: Array) -> tuple[Array, Array]:
    """Per-token absmax int8: q = clamp(round(x * 127/absmax), -128, 127), x ~= q * x_scale.

    `x` is (tokens, features) float32; returns (q int8, x_scale float32 (tokens,)).
    """
    _check(x, "x", "float32", 2)
    _require_cpu(x, "x")
    q = _empty_like_kind(x, tuple(x.shape), "int8")
    s = _empty_like_kind(x, (x.shape[0],), "float32")
    core().quantize_activations(_buffer(x, "x"), _buffer(q, "q"), _buffer(s, "x_scale"))
    return q, s


def dequantize_activations(q: Array, x_scale: Array) -> Array:
    """x = q * x_scale[:, None] as float32."""
    _check(q, "q", "int8", 2)
    _check(x_scale, "x_scale", "float32", 1)
    _require_cpu(q, "q")
    x = _empty_like_kind(q, tuple(q.shape), "float32")
    core().dequantize_activations(_buffer(q, "q"), _buffer(x_scale, "x_scale"), _buffer(x, "x"))
    return x


# ---- the kernel-layout matrix ------------------------------------------------------------


@dataclass(frozen=True)
class TernaryMatrix:
    """A rows x cols ternary matrix in the TK2 kernel layout with one per-tensor scale.

    `data` is uint8 (rows, cols/4): 64 bytes per 256 weights, byte j of a block
    holding columns j, j+64, j+128, j+192 at bit shifts 0, 2, 4, 6 (code + 1).
    """

    data: Array
    rows: int
    cols: int
    scale: float

    def __post_init__(self):
        _check(self.data, "data", "uint8", 2)
        _require_cols(self.cols, "TernaryMatrix")
        if tuple(self.data.shape) != (self.rows, self.cols // 4):
            raise ValueError(
                f"data: expected shape ({self.rows}, {self.cols // 4}) for a "
                f"{self.rows}x{self.cols} matrix, got {tuple(self.data.shape)}"
            )

    # constructors -------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Array, scale: float) -> "TernaryMatrix":
        _check(codes, "codes", "int8", 2)
        _require_cpu(codes, "codes")
        rows, cols = codes.shape
        _require_cols(cols, "TernaryMatrix.from_codes")
        data = _empty_like_kind(codes, (rows, cols // 4), "uint8")
        core().tk2_pack(_buffer(codes, "codes"), _buffer(data, "out"))
        return cls(data, rows, cols, float(scale))

    @classmethod
    def from_float(cls, w: Array) -> "TernaryMatrix":
        """Absmean-quantize float weights (BitNet b1.58) into the kernel layout."""
        codes, scale = quantize_weights(w)
        return cls.from_codes(codes, scale)

    @classmethod
    def from_tq2_0(cls, packed: Array, cols: int) -> "TernaryMatrix":
        """Lossless from TQ2_0 when all nonzero blocks share one d (a BitNet tensor)."""
        _check(packed, "packed", "uint8", 2)
        _require_cpu(packed, "packed")
        _require_cols(cols, "TernaryMatrix.from_tq2_0")
        rows = packed.shape[0]
        data = _empty_like_kind(packed, (rows, cols // 4), "uint8")
        scale = core().tq2_0_to_tk2(_buffer(packed, "tq2_0"), cols, _buffer(data, "out"))
        return cls(data, rows, cols, scale)

    # views -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols // 4

    @property
    def device(self) -> str:
        return str(self.data.device) if isinstance(self.data, torch.Tensor) else "cpu"

    def _cpu_data(self) -> Array:
        if isinstance(self.data, torch.Tensor) and self.data.device.type != "cpu":
            return self.data.cpu()
        return self.data

    def codes(self) -> Array:
        data = self._cpu_data()
        codes = _empty_like_kind(data, (self.rows, self.cols), "int8")
        core().tk2_unpack(_buffer(data, "packed"), _buffer(codes, "codes"))
        return codes

    def dequantize(self) -> Array:
        """Float32 weights codes * scale."""
        c = self.codes()
        if isinstance(c, torch.Tensor):
            return c.to(torch.float32) * self.scale
        return c.astype(np.float32) * np.float32(self.scale)

    def to_tq2_0(self) -> Array:
        data = self._cpu_data()
        out = _empty_like_kind(data, (self.rows, self.cols // QK * TQ2_0_BLOCK_BYTES), "uint8")
        core().tk2_to_tq2_0(_buffer(data, "tk2"), self.cols, float(self.scale), _buffer(out, "out"))
        return out

    def to(self, device: str | torch.device) -> "TernaryMatrix":
        """A copy whose bytes live on `device` (torch tensors only)."""
        data = self.data if isinstance(self.data, torch.Tensor) else torch.from_numpy(self.data)
        return TernaryMatrix(data.to(device), self.rows, self.cols, self.scale)

    # compute -----------------------------------------------------------------------
    def matmul_quantized(self, q: Array, x_scale: Array) -> Array:
        """y (tokens, rows) = scale * x_scale[:, None] * (q @ codes^T), int32 accumulation."""
        _check(q, "q", "int8", 2)
        _check(x_scale, "x_scale", "float32", 1)
        if q.shape[1] != self.cols:
            raise ValueError(f"q: expected {self.cols} features per token, got {q.shape[1]}")
        if x_scale.shape[0] != q.shape[0]:
            raise ValueError(
                f"x_scale: expected {q.shape[0]} entries (one per token), got {x_scale.shape[0]}"
            )
        if type(q) is not type(self.data):
            raise TypeError("q and the matrix data must both be torch tensors or numpy arrays")
        y = _empty_like_kind(q, (q.shape[0], self.rows), "float32")
        args = (
            _buffer(self.data, "weights"), self.rows, self.cols, float(self.scale),
            _buffer(q, "q"), _buffer(x_scale, "x_scale"), _buffer(y, "y"),
        )
        if isinstance(q, torch.Tensor) and q.device.type == "cuda":
            _cuda_gemm(args, q.device)
        else:
            core().ternary_gemm(*args)
        return y

    def __call__(self, x: Array) -> Array:
        """BitLinear inference: per-token int8 activations, then the ternary GEMM.

        `x` is (tokens, cols) float32 or a single (cols,) vector (the GEMV).
        """
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(f"x: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
        vector = x.ndim == 1
        x2 = x.reshape(1, -1) if vector else x
        if isinstance(x2, torch.Tensor) and x2.device.type == "cuda":
            # Same float32 ops as the C++ quantizer (true divisions: torch's `127.0 / t`
            # is t.reciprocal() * 127, two roundings), so CUDA and CPU agree bit for bit.
            amax = x2.abs().amax(dim=1).clamp(min=1e-5)
            s = torch.full_like(amax, 127.0) / amax
            q = torch.clamp(torch.round(x2 * s[:, None]), -128, 127).to(torch.int8)
            y = self.matmul_quantized(q.contiguous(), (torch.ones_like(s) / s).contiguous())
        else:
            q, s = quantize_activations(x2)
            y = self.matmul_quantized(q, s)
        return y.reshape(-1) if vector else y


def gemm_codes(codes: Array, scale: float, q: Array, x_scale: Array) -> Array:
    """y (tokens, rows) = scale * x_scale[:, None] * (q @ codes^T) from int8 codes (rows,
    cols) with cols % 4 == 0: TernaryMatrix.matmul_quantized's result, bit for bit,
    without packing the weights first (what training wants: they change every step).
    CPU only; cols % 256 == 0 on CPUs without AVX2 (the x86 panel kernels take any cols)."""
    _check(codes, "codes", "int8", 2)
    _check(q, "q", "int8", 2)
    _check(x_scale, "x_scale", "float32", 1)
    for a, name in ((codes, "codes"), (q, "q"), (x_scale, "x_scale")):
        _require_cpu(a, name)
    if q.shape[1] != codes.shape[1]:
        raise ValueError(f"q: expected {codes.shape[1]} features per token, got {q.shape[1]}")
    if x_scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"x_scale: expected {q.shape[0]} entries (one per token), got {x_scale.shape[0]}"
        )
    y = _empty_like_kind(q, (q.shape[0], codes.shape[0]), "float32")
    core().ternary_gemm_codes(_buffer(codes, "codes"), float(scale), _buffer(q, "q"),
                              _buffer(x_scale, "x_scale"), _buffer(y, "y"))
    return y


def _cuda_gemm(args, device: torch.device) -> None:
    C = core()
    if not hasattr(C, "cuda_ternary_gemm"):
        raise RuntimeError("this nanochat build has no CUDA kernels (nvcc was not found at build)")
    with torch.cuda.device(device):
        C.cuda_ternary_gemm(*args, torch.cuda.current_stream().cuda_stream)


# ---- dispatch controls --------------------------------------------------------------------


def supported_isas() -> list[str]:
    """Kernel paths this CPU and build can run, scalar first."""
    return list(core().supported_isas())


# A constant to torch.compile: "auto" choices (BitLinear, attention) ask for the ISA inside
# compiled forwards, and dynamo cannot trace the extension's import; a compiled graph keeps
# the ISA it was traced under (set_isa after compiling does not retrace it).
@torch.compiler.assume_constant_result
def active_isa() -> str:
    return core().active_isa()


def set_isa(name: str | None) -> None:
    """Pin the kernel path (scalar, avx2, avx512, avx512_vnni); None restores the default."""
    if name is None:
        core().reset_isa()
    else:
        core().set_isa(name)


def num_threads() -> int:
    return core().num_threads()


def set_num_threads(n: int) -> None:
    """Kernel thread count; n <= 0 restores NANOCHAT_NUM_THREADS or all cores."""
    core().set_num_threads(int(n))
