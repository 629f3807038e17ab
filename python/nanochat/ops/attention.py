"""Causal attention, full ("L") or sliding-window ("S"), with a KV cache of earlier keys.

`[model.attention] pattern = "SSSL"` repeats over the layers (layer i takes
pattern[i % len(pattern)]); an "S" layer's query at position p sees the keys p - window + 1
.. p (`window` of them, itself included), an "L" layer's sees 0 .. p.

KV cache: keys and values are cached after RoPE (absolute positions), so a windowed layer
only needs the last window - 1 of them (the next query adds its own): `trim` drops the rest,
and the cache of an "S" layer stays at most window - 1 long however long the generation.

Grouped-query attention: k and v have Hkv heads, q head h reads kv head h // (H / Hkv)
(llama.cpp's order).

A full-sequence call (nothing cached: training, evaluation, a prefill) runs
`nanochat::attention`, one op in the convention of nanochat/ops/rmsnorm.py: a pure-torch
default on every device and dtype (masked softmax over materialized (T, T) scores per head,
float32 for bf16 / f16 inputs), and the C++ forward and backward of csrc/attn/attention.cpp
(16-query tiles, causal tiles skipped, grouped-query heads native) registered for the CPU,
which takes float32 on an ISA with vector tiles (`_native` decides) and hands other dtypes
(bf16 autocast, float64 references) and the scalar ISA to the default. A model's forward is
then the same with and without grad. Calls over a KV cache (decoding) run SDPA, as do
calls on other devices than the CPU (a GPU's fused SDPA kernels never materialize the
scores) and every call of a model built with ops="torch" (nanochat/model/build.py: the
plain-torch baseline, no op).
Packed rows (chat fine-tuning packs several conversations into one row): `doc_start`
(B, T) int64 holds, per token, the position of the first token of its conversation in the
row, and a query then sees only keys of its own conversation: [max(window start,
doc_start), q]. The C++ op skips key tiles before every query's start; the op's default
and SDPA mask the scores (SDPA with `packed_mask`). doc_start None: one sequence per row,
the plain causal path unchanged. Positions restart at each conversation too
(nanochat/model/gpt.py), so a packed conversation computes what it would alone.
Row subsets (nanochat/ops/rows.py; Collider, nanochat/train/collider.py, makes them): only
the kept token rows carry an output gradient (a dropped row's is exactly zero) and the
k / v projections drop the gradient of the dropped rows anyway, so given a subset the op's
backward (C++ kernel and default alike) runs over the kept rows only:
scores and their gradient for kept queries, dk / dv for kept keys. The dense backward
spends ~5 T^2 D / 2 multiply-adds per head; the kept-row one (3 r + 2 r^2) / 5 of that at
kept fraction r (0.56 at r = 0.65). Equal to autograd through masked softmax attention up to
float rounding (tests/test_attention_op.py).

    pytest tests/test_hybrid_attention.py tests/test_attention_op.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nanochat._core import buffer as _buf
from nanochat._core import core
from nanochat.ops.rows import RowSubset, kept, with_rows


def attention_mask(t: int, cached: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean (t, cached + t): query i (the (cached + i)-th of the keys) sees key j when
    j <= cached + i and, with a window, cached + i - j < window."""
    i = torch.arange(t, device=device)[:, None] + cached
    j = torch.arange(cached + t, device=device)[None, :]
    ok = j <= i
    if window is not None:
        ok &= i - j < window
    return ok


def packed_mask(doc_start: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, T) of packed rows: query i sees key j when doc_start[b, i] <= j <= i
    and, with a window, i - j < window."""
    t = doc_start.shape[1]
    ok = attention_mask(t, 0, window, doc_start.device)[None]
    j = torch.arange(t, device=doc_start.device)[None, None, :]
    return (ok & (j >= doc_start[:, :, None])).unsqueeze(1)


def check_doc_start(doc_start: torch.Tensor, shape: tuple[int, int]) -> None:
    """A clear error for a doc_start that is not (B, T) integer with 0 <= doc_start[b, t] <= t."""
    if doc_start.shape != torch.Size(shape) or doc_start.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"doc_start: expected an integer tensor of shape {tuple(shape)}, got "
                         f"{doc_start.dtype} {tuple(doc_start.shape)}")
    t = torch.arange(shape[1], device=doc_start.device)
    if bool(((doc_start < 0) | (doc_start > t)).any()):
        raise ValueError("doc_start: every doc_start[b, t] must lie in [0, t]")


def _repeat_kv(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // kv.shape[1]
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int,
           window: int | None, rows: RowSubset | None = None,
           doc_start: torch.Tensor | None = None, op: bool = True) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, Hkv, cached + T, D), whose
    first `cached` keys precede the T new positions. Picks SDPA's plain causal / unmasked
    forms where they are exact (a full layer's prefill, a single new token that sees the
    whole cache) and an explicit mask otherwise; a full-sequence call (cached 0) runs
    nanochat::attention instead. rows: the (B, T) positions' row subset (the op's kept-row
    backward; module doc). doc_start: packed rows' (B, T) sequence starts (module doc),
    full-sequence calls only. op=False: SDPA only (a model built with ops="torch")."""
    if doc_start is not None:
        if cached:
            raise ValueError("attend: doc_start (packed rows) needs a full-sequence call, "
                             "not one over a KV cache")
        check_doc_start(doc_start, (q.shape[0], q.shape[2]))
    # Training and every full-sequence forward on the CPU. On a GPU, SDPA's fused kernels
    # (flash / memory-efficient) never hold the (T, T) scores the op's default builds.
    if cached == 0 and op and q.device.type == "cpu":
        return causal_attention(q, k, v, window or 0, rows, doc_start)
    k, v = _repeat_kv(q, k), _repeat_kv(q, v)
    if doc_start is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=packed_mask(doc_start, window))
    t, s = q.shape[2], k.shape[2]
    if window is None or window >= s:  # the window covers everything: plain causal
        if cached == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if t == 1:  # the new token sees everything
            return F.scaled_dot_product_attention(q, k, v)
    mask = attention_mask(t, cached, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def trim(kv: torch.Tensor, window: int | None) -> torch.Tensor:
    """What a layer's cache keeps of its keys or values (B, H, S, D): all of them for full
    attention, the last window - 1 for a windowed layer."""
    if window is None:
        return kv
    keep = min(window - 1, kv.shape[2])
    return kv[:, :, kv.shape[2] - keep:]


# ---- nanochat::attention: forward, and the backward over kept rows (module doc) -------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/f16 inputs, float64 for float64 references."""
    return torch.promote_types(x.dtype, torch.float32)


def _flash_layouts(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty out (B, H, T, D) and logsumexp (B, H, T, in the compute dtype), laid out
    (B, T, H, ...) in memory as torch's flash attention lays them out (the output's transpose
    back to (B, T, H * D), which the next projection reads, is then free)."""
    b, h, t, d = q.shape
    return (q.new_empty((b, t, h, d)).transpose(1, 2),
            q.new_empty((b, t, h), dtype=_compute_dtype(q)).transpose(1, 2))


def _check(fn: str, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor | None,
           window: int, doc_start: torch.Tensor | None) -> None:
    """The C++ op's argument checks (csrc/attn/attention.cpp), for the torch default."""
    h, hkv = q.shape[1], k.shape[1]
    if hkv <= 0 or h % hkv != 0:
        raise ValueError(f"{fn}: heads ({h}) is not a multiple of kv_heads ({hkv})")
    if window < 0:
        raise ValueError(f"{fn}: window must be >= 0 (0: full causal), got {window}")
    if doc_start is not None:
        check_doc_start(doc_start, (q.shape[0], q.shape[2]))
    if rows is not None and rows.numel():
        n = q.shape[0] * q.shape[2]
        bad = (rows < 0) | (rows >= n)
        bad[1:] |= rows[1:] <= rows[:-1]
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{fn}: rows[{i}] = {int(rows[i])} is not a sorted row index "
                             f"below {n}")


def _probs(q, k, window, doc_start, lse=None):
    """(P, lse): the softmax (B, H, T, T) of the scaled, masked scores of q over k (k's heads
    already repeated for q's) and its logsumexp (B, H, T), computed here unless given."""
    t = q.shape[2]
    ok = attention_mask(t, 0, window or None, q.device)
    if doc_start is not None:
        ok = ok & (torch.arange(t, device=q.device) >= doc_start[:, None, :, None])
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1) if lse is None else lse
    return torch.exp(s - lse[..., None]), lse


def _torch_forward(q, k, v, window, doc_start):
    """The C++ forward's result by masked softmax over materialized (T, T) scores per head."""
    _check("attention_forward", q, k, None, window, doc_start)
    out, lse = _flash_layouts(q)
    ct = _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):  # the compute dtype, under autocast too
        qf, kf, vf = q.to(ct), _repeat_kv(q, k.to(ct)), _repeat_kv(q, v.to(ct))
        p, z = _probs(qf, kf, window, doc_start)
        out.copy_(p @ vf)
        lse.copy_(z)
    return out, lse


def _torch_backward(grad_out, q, k, v, out, lse, rows, window, doc_start):
    """The C++ backward's math (csrc/attn/attention.h): dS = P (dP - rowsum(do o)). With
    rows, the other query rows' output gradient counts as zero (so is their dq) and dk, dv
    are zero on the other keys."""
    _check("attention_backward", q, k, rows, window, doc_start)
    b, h, t, d = q.shape
    hkv = k.shape[1]
    ct = _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        qf, of, go = q.to(ct), out.to(ct), grad_out.to(ct)
        kf, vf = _repeat_kv(q, k.to(ct)), _repeat_kv(q, v.to(ct))
        keep = None
        if rows is not None:  # (B, 1, T, 1): the kept rows; a dropped query adds nothing
            keep = torch.zeros(b * t, dtype=torch.bool, device=q.device)
            keep[rows] = True
            keep = keep.view(b, 1, t, 1)
            go = go.masked_fill(~keep, 0)
        p, _ = _probs(qf, kf, window, doc_start, lse.to(ct))
        ds = p * (go @ vf.transpose(-1, -2) - (go * of).sum(-1, keepdim=True))
        scale = 1.0 / math.sqrt(d)
        gq = ds @ kf * scale
        gk = (ds.transpose(-1, -2) @ qf * scale).view(b, hkv, h // hkv, t, d).sum(2)
        gv = (p.transpose(-1, -2) @ go).view(b, hkv, h // hkv, t, d).sum(2)
        if keep is not None:
            gk, gv = gk.masked_fill(~keep, 0), gv.masked_fill(~keep, 0)
    # the inputs' layouts, as the C++ op and the fake kernel give them
    return tuple(torch.empty_like(x).copy_(g) for x, g in ((q, gq), (k, gk), (v, gv)))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows (last dim) are contiguous, which is all the kernels need."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _doc_contiguous(doc_start: torch.Tensor | None) -> torch.Tensor | None:
    return None if doc_start is None else doc_start.to(torch.int64).contiguous()


def _cpp_forward(q, k, v, window, doc_start):
    """csrc/attn's forward on the active ISA (float32 CPU tensors)."""
    out, lse = _flash_layouts(q)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    doc_start = _doc_contiguous(doc_start)  # held here: the buffer only borrows its memory
    core().attention_forward(_buf(q), _buf(k), _buf(v), _buf(out), _buf(lse), window,
                             1.0 / math.sqrt(q.shape[-1]),
                             None if doc_start is None else _buf(doc_start))
    return out, lse


def _cpp_backward(grad_out, q, k, v, out, lse, rows, window, doc_start):
    """csrc/attn's backward over the kept rows on the active ISA (float32 CPU tensors)."""
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    t = [_last_dim_contiguous(x) for x in (q, k, v, out, grad_out.float())] + [lse]
    doc_start = _doc_contiguous(doc_start)
    core().attention_backward(*(_buf(x) for x in t),
                              None if rows is None else _buf(rows.contiguous()),
                              _buf(gq), _buf(gk), _buf(gv), window, 1.0 / math.sqrt(q.shape[-1]),
                              None if doc_start is None else _buf(doc_start))
    return gq, gk, gv


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The one place that decides whether the CPU kernel runs the C++ op: float32 inputs on
    an ISA with vector tiles. The scalar reference tiles are slower than the torch default
    (`nanochat bench kernels --isa scalar --threads 1`, op "attention"), so the default runs
    there; the AVX2 / AVX-512 tiles are faster (--isa avx2). ARM's NEON tiles take the C++
    op as AVX2's do (vector tiles; their speed is unmeasured on an ARM machine)."""
    from nanochat.ops import ternary

    return (all(x.dtype == torch.float32 for x in (q, k, v)) and q.numel() > 0
            and ternary.active_isa() != "scalar")


@torch.library.custom_op("nanochat::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                  doc_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, T, D), logsumexp (B, H, T)) of causal attention (window 0: full) of q over
    k, v (B, Hkv, T, D) (csrc/attn/attention.h); doc_start (B, T): packed rows' sequence
    starts (module doc) or None. logsumexp is float32 (float64 for float64 inputs).
    This body is the default on every device; the CPU kernel is below."""
    return _torch_forward(q, k, v, window, doc_start)


@_attention_op.register_kernel("cpu")
def _(q, k, v, window, doc_start=None):
    if not _native(q, k, v):
        return _torch_forward(q, k, v, window, doc_start)
    return _cpp_forward(q, k, v, window, doc_start)


@_attention_op.register_fake
def _(q, k, v, window, doc_start=None):
    torch._check(q.dim() == 4 and k.shape == v.shape, lambda: "q (B,H,T,D), k = v (B,Hkv,T,D)")
    return _flash_layouts(q)


@torch.library.custom_op("nanochat::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           rows: torch.Tensor | None, window: int,
                           doc_start: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v) on the listed rows (sorted flat b * T + t, int64; None: all),
    zero elsewhere (csrc/attn/attention.h); doc_start as the forward's. This body is the
    default on every device; the CPU kernel is below."""
    return _torch_backward(grad_out, q, k, v, out, lse, rows, window, doc_start)


@_attention_backward_op.register_kernel("cpu")
def _(grad_out, q, k, v, out, lse, rows, window, doc_start=None):
    if not _native(q, k, v):
        return _torch_backward(grad_out, q, k, v, out, lse, rows, window, doc_start)
    return _cpp_backward(grad_out, q, k, v, out, lse, rows, window, doc_start)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, rows, window, doc_start=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, window, doc_start = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_start)
    ctx.mark_non_differentiable(lse)
    ctx.window = window


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, doc_start = ctx.saved_tensors
    gq, gk, gv = torch.ops.nanochat.attention_backward(grad_out, q, k, v, out, lse,
                                                       kept(ctx.rows), ctx.window, doc_start)
    return gq, gk, gv, None, None


_attention_with_rows = with_rows(_attention_op, _setup_context, _backward)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     rows: RowSubset | None = None,
                     doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """nanochat::attention's output (window 0: full); with a row subset over the (B, T)
    positions, the backward runs on its kept rows; doc_start: packed rows (module doc)."""
    if rows is not None:
        rows.check(q.shape[0] * q.shape[2], "attention")
    return _attention_with_rows(rows, q, k, v, window, doc_start)[0]
