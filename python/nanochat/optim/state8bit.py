"""Blockwise 8-bit optimizer state: torch.library custom ops over the C++ core's fused
dequantize -> update -> requantize kernels (csrc/optim/blockwise8.h), and the same math
in plain torch as the reference and the fallback for devices the core has no kernel for.

    torch.ops.nanochat.optim8_quantize(x, codes, absmax, block, map)        # in place
    torch.ops.nanochat.optim8_dequantize(codes, absmax, x, block, map)      # in place
    torch.ops.nanochat.adamw8_step(p, g, m, m_absmax, v, v_absmax, block, lr, beta1,
                                   beta2, eps, weight_decay, bc1, bc2)      # in place
    torch.ops.nanochat.lion8_step(p, g, m, m_absmax, block, lr, beta1, beta2, weight_decay)
    torch.ops.nanochat.momentum8_step(g, m, m_absmax, u, block, beta, nesterov)

Codes are flat (numel,) tensors: int8 for the "linear" map (momenta), uint8 for the
"minifloat" map (AdamW's second moment); absmax is (ceil(numel / block),) float32. State
bytes per element: 1 + 4 / block. Exercised by tests/test_optim_8bit.py and
`nanochat bench optim`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from nanochat._core import core

DEFAULT_BLOCK = 2048
BLOCK_MULTIPLE = 64
MAX_BLOCK = 1 << 20
MINI_ONE = 0x3F800000  # float bits of 1.0: code 255
MINI_STEP = 1 << 20  # 1/8 octave
MINI_LOW = MINI_ONE - 255 * MINI_STEP
CODE_DTYPE = {"linear": torch.int8, "minifloat": torch.uint8}


def num_blocks(n: int, block: int) -> int:
    check_block(block)
    return (n + block - 1) // block


def check_block(block: int, key: str = "block_size") -> None:
    if not (isinstance(block, int) and 0 < block <= MAX_BLOCK and block % BLOCK_MULTIPLE == 0):
        raise ValueError(f"{key} must be a positive multiple of {BLOCK_MULTIPLE} up to "
                         f"{MAX_BLOCK}, got {block!r}")


def _buffer(t: torch.Tensor):
    dt = {torch.float32: "float32", torch.int8: "int8", torch.uint8: "uint8"}[t.dtype]
    return core().Buffer(t.data_ptr(), [t.numel()], [1], dt, str(t.device))


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} elements, got {t.numel()} "
                         f"(shape {tuple(t.shape)})")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")


def _native(device: torch.device) -> bool:
    """Whether the C++ core runs on this device (CPU always; CUDA in a CUDA build)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and _cuda_compiled()


@functools.cache
def _cuda_compiled() -> bool:
    return bool(core().info()["cuda"]["compiled"])


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


# ---- the plain-torch reference (same float operations in the same order as the core) ------
# torch turns a division by a scalar into a multiplication by its reciprocal, so divisors are
# full tensors and scalar constants are computed in numpy float32 (IEEE, like C++).
def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(numel,) -> (nblocks, block), zero-padded (zeros change no absmax)."""
    n = x.numel()
    pad = num_blocks(n, block) * block - n
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, block)


def ref_quantize(x: torch.Tensor, block: int, map: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    xb = _blocks(x.float(), block)
    absmax = xb.abs().nan_to_num(nan=0.0).amax(dim=1)
    if map == "linear":
        inv = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax,
                          torch.zeros_like(absmax))
        q = torch.round((xb * inv[:, None]).nan_to_num(nan=-127.0).clamp(-127, 127))
        return q.to(torch.int8).reshape(-1)[:n], absmax
    inv = torch.where(absmax > 0, torch.ones_like(absmax) / absmax, torch.zeros_like(absmax))
    bits = (xb * inv[:, None]).view(torch.int32).to(torch.int64)
    t = (bits - MINI_LOW + MINI_STEP // 2).clamp(min=0)
    code = torch.where(bits < 0, torch.zeros_like(t), t >> 20).clamp(max=255)
    return code.to(torch.uint8).reshape(-1)[:n], absmax


def ref_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int, map: str) -> torch.Tensor:
    n = codes.numel()
    c = _blocks(codes.to(torch.int32), block)
    if map == "linear":
        cf = c.float()
        x = (cf / torch.full_like(cf, 127.0)) * absmax[:, None]
    else:
        lv = (MINI_LOW + c * MINI_STEP).to(torch.int32).view(torch.float32)
        x = torch.where(c == 0, torch.zeros_like(lv), lv * absmax[:, None])
    return x.reshape(-1)[:n]


def _f32(x) -> float:
    """A Python float holding x rounded to float32 (torch multiplies in float32 with it)."""
    return float(np.float32(x))


def ref_adamw8_step(p, g, m, m_absmax, v, v_absmax, block, lr, beta1, beta2, eps, weight_decay,
                    bc1, bc2):
    f = np.float32
    gf = g.reshape(-1)
    mf = ref_dequantize(m, m_absmax, block, "linear") * _f32(beta1) + gf * _f32(f(1) - f(beta1))
    vf = (ref_dequantize(v, v_absmax, block, "minifloat") * _f32(beta2)
          + (gf * gf) * _f32(f(1) - f(beta2)))
    sqrt_v = vf.double().sqrt().float()  # correctly rounded (torch.sqrt on CPU is not, by 1 ulp)
    denom = sqrt_v / torch.full_like(vf, _f32(np.sqrt(f(bc2)))) + _f32(eps)
    decay, step = _f32(f(1) - f(lr) * f(weight_decay)), _f32(f(lr) / f(bc1))
    p.view(-1).copy_(p.reshape(-1) * decay - (mf / denom) * step)
    m_new, ma = ref_quantize(mf, block, "linear")
    v_new, va = ref_quantize(vf, block, "minifloat")
    m.copy_(m_new), m_absmax.copy_(ma), v.copy_(v_new), v_absmax.copy_(va)


def ref_lion8_step(p, g, m, m_absmax, block, lr, beta1, beta2, weight_decay):
    f = np.float32
    mf = ref_dequantize(m, m_absmax, block, "linear")
    gf = g.reshape(-1)
    c = mf * _f32(beta1) + gf * _f32(f(1) - f(beta1))
    decay = _f32(f(1) - f(lr) * f(weight_decay))
    p.view(-1).copy_(p.reshape(-1) * decay - torch.sign(c) * _f32(lr))
    m_new, ma = ref_quantize(mf * _f32(beta2) + gf * _f32(f(1) - f(beta2)), block, "linear")
    m.copy_(m_new), m_absmax.copy_(ma)


def ref_momentum8_step(g, m, m_absmax, u, block, beta, nesterov):
    gf = g.reshape(-1)
    mf = (ref_dequantize(m, m_absmax, block, "linear") * _f32(beta)
          + gf * _f32(np.float32(1) - np.float32(beta)))
    u.view(-1).copy_(gf + (mf - gf) * _f32(beta) if nesterov else mf)
    m_new, ma = ref_quantize(mf, block, "linear")
    m.copy_(m_new), m_absmax.copy_(ma)


# ---- custom ops --------------------------------------------------------------------------
def _check_codes(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, block: int,
                 map: str) -> None:
    """x (float32) and its blockwise codes / absmax agree in map, size, dtype and device."""
    if map not in CODE_DTYPE:
        raise ValueError(f"map must be 'linear' or 'minifloat', got {map!r}")
    _check(x, "x", torch.float32, x.numel(), x.device)
    _check(codes, "codes", CODE_DTYPE[map], x.numel(), x.device)
    _check(absmax, "absmax", torch.float32, num_blocks(x.numel(), block), x.device)


@torch.library.custom_op("nanochat::optim8_quantize", mutates_args=("codes", "absmax"))
def optim8_quantize(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, block: int,
                    map: str) -> None:
    """Blockwise 8-bit codes and per-block absmax of x (written into codes / absmax)."""
    _check_codes(x, codes, absmax, block, map)
    if _native(x.device):
        core().optim8_quantize(_buffer(x), _buffer(codes), _buffer(absmax), block, map,
                               _stream(x.device))
    else:
        c, a = ref_quantize(x, block, map)
        codes.view(-1).copy_(c), absmax.copy_(a)


@optim8_quantize.register_fake
def _(x, codes, absmax, block, map):
    return None


@torch.library.custom_op("nanochat::optim8_dequantize", mutates_args=("x",))
def optim8_dequantize(codes: torch.Tensor, absmax: torch.Tensor, x: torch.Tensor, block: int,
                      map: str) -> None:
    """x = the values the codes stand for."""
    _check_codes(x, codes, absmax, block, map)
    if _native(x.device):
        core().optim8_dequantize(_buffer(codes), _buffer(absmax), _buffer(x), block, map,
                                 _stream(x.device))
    else:
        x.view(-1).copy_(ref_dequantize(codes.reshape(-1), absmax, block, map))


@optim8_dequantize.register_fake
def _(codes, absmax, x, block, map):
    return None


def _check_state(p, g, m, m_absmax, block, key="exp_avg"):
    n, nb = p.numel(), num_blocks(p.numel(), block)
    _check(p, "param", torch.float32, n, p.device)
    _check(g, "grad", torch.float32, n, p.device)
    _check(m, key, torch.int8, n, p.device)
    _check(m_absmax, f"{key}_absmax", torch.float32, nb, p.device)


@torch.library.custom_op(
    "nanochat::adamw8_step",
    mutates_args=("param", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"))
def adamw8_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_absmax: torch.Tensor, exp_avg_sq: torch.Tensor,
                exp_avg_sq_absmax: torch.Tensor, block: int, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, bias_correction1: float,
                bias_correction2: float) -> None:
    """One fused AdamW step on 8-bit moments (torch.optim.AdamW semantics)."""
    _check_state(param, grad, exp_avg, exp_avg_absmax, block)
    _check(exp_avg_sq, "exp_avg_sq", torch.uint8, param.numel(), param.device)
    _check(exp_avg_sq_absmax, "exp_avg_sq_absmax", torch.float32, exp_avg_absmax.numel(),
           param.device)
    args = (block, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2)
    if _native(param.device):
        B = _buffer
        core().adamw8_step(B(param), B(grad), B(exp_avg), B(exp_avg_absmax), B(exp_avg_sq),
                           B(exp_avg_sq_absmax), *args, _stream(param.device))
    else:
        ref_adamw8_step(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, *args)


@adamw8_step.register_fake
def _(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, block, lr, beta1,
      beta2, eps, weight_decay, bias_correction1, bias_correction2):
    return None


@torch.library.custom_op("nanochat::lion8_step",
                         mutates_args=("param", "exp_avg", "exp_avg_absmax"))
def lion8_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_absmax: torch.Tensor, block: int, lr: float, beta1: float, beta2: float,
               weight_decay: float) -> None:
    """One fused Lion step on an 8-bit momentum."""
    _check_state(param, grad, exp_avg, exp_avg_absmax, block)
    if _native(param.device):
        B = _buffer
        core().lion8_step(B(param), B(grad), B(exp_avg), B(exp_avg_absmax), block, lr, beta1,
                          beta2, weight_decay, _stream(param.device))
    else:
        ref_lion8_step(param, grad, exp_avg, exp_avg_absmax, block, lr, beta1, beta2, weight_decay)


@lion8_step.register_fake
def _(param, grad, exp_avg, exp_avg_absmax, block, lr, beta1, beta2, weight_decay):
    return None


@torch.library.custom_op("nanochat::momentum8_step",
                         mutates_args=("momentum", "momentum_absmax", "update"))
def momentum8_step(grad: torch.Tensor, momentum: torch.Tensor, momentum_absmax: torch.Tensor,
                   update: torch.Tensor, block: int, beta: float, nesterov: bool) -> None:
    """Muon's momentum on an 8-bit buffer; the (Nesterov) update is written to `update`."""
    _check_state(grad, grad, momentum, momentum_absmax, block, key="momentum")
    _check(update, "update", torch.float32, grad.numel(), grad.device)
    if _native(grad.device):
        B = _buffer
        core().momentum8_step(B(grad), B(momentum), B(momentum_absmax), B(update), block, beta,
                              nesterov, _stream(grad.device))
    else:
        ref_momentum8_step(grad, momentum, momentum_absmax, update, block, beta, nesterov)


@momentum8_step.register_fake
def _(grad, momentum, momentum_absmax, update, block, beta, nesterov):
    return None


# ---- state tensors -----------------------------------------------------------------------
def zeros_state(like: torch.Tensor, block: int, map: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and absmax of an all-zero state shaped like `like` (codes flat)."""
    if map not in CODE_DTYPE:
        raise ValueError(f"map must be 'linear' or 'minifloat', got {map!r}")
    n = like.numel()
    return (torch.zeros(n, dtype=CODE_DTYPE[map], device=like.device),
            torch.zeros(num_blocks(n, block), dtype=torch.float32, device=like.device))


def quantize(x: torch.Tensor, block: int, map: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes, absmax = zeros_state(x, block, map)
    optim8_quantize(x.detach().float().contiguous().reshape(-1), codes, absmax, block, map)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int, map: str) -> torch.Tensor:
    x = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    optim8_dequantize(codes, absmax, x, block, map)
    return x
