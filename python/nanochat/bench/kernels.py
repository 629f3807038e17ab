"""nanochat bench kernels: ternary GEMV and GEMM per kernel path and thread count.

For each layer shape (rows x cols = out x in features) it times, in one process and
interleaved round by round (A B A B, medians reported, so drift hits all alike):
  - our TK2 ternary kernel on every ISA this CPU runs, GEMV (1 token) and GEMM
    (--tokens, default 128), int8 activations already quantized;
  - on the best ISA, the same kernel over TK2 tiles (8 rows interleaved block by block,
    the engine's layout; "tiles" in the table, kernel=tk2x8 in JSON);
  - on the best ISA, the GEMV over weights in DRAM, both layouts ("dram" / "tiles dram",
    kernel=tk2_dram / tk2x8_dram): each call reads the next of enough copies of the matrix
    to fill 256 MiB (64 MiB with --quick), 2 MiB pages, so no call finds its weights in a
    cache, as in decode, where every token streams every matrix from memory. Over a tile
    the GEMV reads one sequential stream instead of 8 interleaved row streams;
  - for the GEMM, also training's GEMM straight from int8 codes on every ISA timed
    (ternary_gemm_codes: 16-row panels, no TK2; "codes" in the table, kernel=codes in
    JSON, timed from Python so microsecond calls include ~2 us of call overhead);
  - torch's f32 matmul on the same shape and thread count.
It also measures the machine's memory read bandwidth per thread count, and
reports GEMV weight bytes/s as a fraction of it.

Two more parts time what training runs around the GEMM (skip them with --no-training):
  - op "quantize": activation quantization (absmax per token to int8, what the
    nanochat::bitlinear op runs before every GEMM) of training-sized activations
    (--tokens-train x cols) on every ISA and torch's
    fake-quant version (nanochat/ops/bitlinear.py); vs_scalar = scalar time / this time;
  - op "layer": one BitLinear's forward + backward at the shapes behind bitlinear.py's
    AUTO_MIN_MACS threshold, the C++ op (kernel="cpp") vs torch (kernel="torch");
    vs_torch = torch time / C++ time;
  - op "attention": one causal attention's forward + backward at training shapes (tiny's
    and nano_125m's heads, batch 8 x 256), nanochat::attention (the C++ forward and
    backward of csrc/attn) vs torch's SDPA (flash forward and backward, k / v repeated
    for grouped-query heads, as GPT ran before); "kept" is the C++ backward inside a
    Collider micro-batch keeping 65% of the rows (both as the op runs: the C++ kernel, or
    on the scalar ISA its torch default); "cpp" is the C++ kernel on the active ISA, scalar
    included, and "default" the op's pure-torch default (other devices and dtypes): under
    --isa scalar they show the choice of attention.py's _native. Attention runs on the last
    ISA of --isa. vs_torch = torch time / this time.

Columns: seconds per call (median), GOPS = 2*rows*cols*tokens/s, weight GB/s
(TK2 bytes = rows*cols/4 per call), bw_fraction = weight GB/s / read bandwidth,
vs_torch = torch time / our time (above 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

DEFAULT_SHAPES = [
    (768, 768), (2048, 768), (768, 2048), (1536, 1536), (4096, 1536), (1536, 4096),
    (4096, 4096), (32768, 768), (32768, 16384),
]
QUICK_SHAPES = [(256, 256), (512, 768)]
# (tokens, cols) of activation quantization: a tiny/nano_125m training batch
QUANT_SHAPES = [(2048, 256), (2048, 768)]
# (in, out, tokens) of one BitLinear's forward + backward: around AUTO_MIN_MACS (2^25)
LAYER_SHAPES = [(256, 64, 2048), (256, 128, 2048), (768, 256, 2048), (256, 128, 256)]
# (batch, heads, kv heads, seq, head_dim) of attention: tiny's and nano_125m's at 8 x 256
ATTENTION_SHAPES = [(8, 4, 2, 256, 64), (8, 12, 4, 256, 64)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    p.add_argument("--quick", action="store_true", help="two small shapes, few repeats (smoke)")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--isa", default=None,
                   help="comma-separated kernel paths (default: every one this CPU runs)")
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,768x2048 (rows x cols)")
    p.add_argument("--tokens", type=int, default=128, help="tokens for the GEMM (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="seconds of calls per variant per round (default 0.05)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch f32 baseline")
    p.add_argument("--no-training", action="store_true",
                   help="skip the quantize and layer parts (training's work around the GEMM)")


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        try:
            r, c = part.lower().split("x")
            out.append((int(r), int(c)))
        except ValueError:
            raise ValueError(f"--shapes: cannot parse {part!r}; expected ROWSxCOLS") from None
    return out


def _time_calls(fn, min_time: float) -> float:
    """Median seconds per call over as many calls as fit in min_time (at least 3)."""
    fn()  # warm caches and page in
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _large(C, shape: tuple[int, int]):
    """An uninitialized uint8 tensor in the core's LargeBuffer memory (2 MiB pages)."""
    import torch

    return torch.from_numpy(C.large_buffer(shape[0] * shape[1])).view(shape)


def _time_ours(C, args_tuple, min_time: float, tile_rows: int = 1, copies: int = 1) -> float:
    # Timed inside C++ so Python call overhead does not pollute microsecond GEMVs.
    kw = {"tile_rows": tile_rows, "copies": copies}
    secs = C.time_ternary_gemm(*args_tuple, 1, **kw)
    n = max(3, min(2000, int(min_time / max(secs[0], 1e-7))))
    return statistics.median(C.time_ternary_gemm(*args_tuple, n, **kw))


def _dram_copies(C, w, target_bytes: int):
    """(buffer of n copies of uint8 matrix w one after another, n): n * w's bytes >= target."""
    n = max(2, -(-target_bytes // w.numel()))
    out = _large(C, (n * w.shape[0], w.shape[1]))
    out.view(n, *w.shape).copy_(w.expand(n, *w.shape))
    return out, n


def run(args: argparse.Namespace):
    """Yields one dict per measurement."""
    import os

    import torch

    from nanochat import malloc
    from nanochat._core import core
    from nanochat.ops import ternary

    # as the trainer runs: without it, whether torch's temporaries are page-faulted afresh
    # on every call depends on what ran before (glibc's dynamic mmap threshold)
    malloc.tune()
    C = core()
    ncpu = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, ncpu})
    isas = args.isa.split(",") if args.isa else ternary.supported_isas()
    # The scalar reference runs at ~9 GOPS: by default it is timed on GEMVs and on
    # GEMMs up to 4096x4096 only (pass --isa scalar to force it everywhere).
    skip_scalar_big = not args.isa
    for i in isas:
        if i not in ternary.supported_isas():
            raise ValueError(f"--isa: {i} is not supported here ({ternary.supported_isas()})")
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    else:
        shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    rounds = 2 if args.quick else args.rounds
    min_time = 0.005 if args.quick else args.min_time
    bw_bytes = (64 << 20) if args.quick else (1 << 30)

    bandwidth = {t: C.measure_read_bandwidth(bw_bytes, t, 3 if args.quick else 5) for t in threads}
    gen = torch.Generator().manual_seed(0)
    try:
        for rows, cols in shapes:
            codes = torch.randint(-1, 2, (rows, cols), dtype=torch.int8, generator=gen)
            W = ternary.TernaryMatrix.from_codes(codes, 0.02)
            # both layouts in the engine's weight memory (2 MiB pages): on 4 KiB pages a
            # DRAM-sized GEMV is bound by TLB misses, not by the layout
            w_tk2 = _large(C, W.data.shape)
            w_tk2.copy_(W.data)
            tiles = _large(C, ((rows + 7) // 8 * 8, cols // 4))
            C.tk2_tile(ternary._buffer(w_tk2, "w"), cols, ternary._buffer(tiles, "tiles"))
            dram_target = (64 << 20) if args.quick else (256 << 20)
            dram = {name: _dram_copies(C, w, dram_target)
                    for name, w in (("tk2_dram", w_tk2), ("tk2x8_dram", tiles))}
            wf = codes.to(torch.float32) * 0.02 if not args.no_torch else None
            for tokens in (1, args.tokens):
                x = torch.randn(tokens, cols, generator=gen)
                q, s = ternary.quantize_activations(x)
                y = torch.empty(tokens, rows)
                call = (ternary._buffer(w_tk2, "w"), rows, cols, W.scale,
                        ternary._buffer(q, "q"), ternary._buffer(s, "s"), ternary._buffer(y, "y"))
                op = "gemv" if tokens == 1 else "gemm"
                variants = [i for i in isas if not (
                    skip_scalar_big and i == "scalar" and tokens > 1 and rows * cols > 1 << 24)]
                # training's GEMM from int8 codes (ternary_gemm_codes: panels), per ISA
                codes_call = None
                if tokens > 1:
                    codes_call = (ternary._buffer(codes, "codes"), 0.02) + call[4:]
                best = variants[-1]  # supported_isas() is ascending
                # the best ISA's other layouts: kernel -> (call, tile_rows, copies)
                layouts = {"tk2x8": ((ternary._buffer(tiles, "tiles"),) + call[1:], 8, 1)}
                if tokens == 1:
                    for name, (buf, n) in dram.items():
                        layouts[name] = ((ternary._buffer(buf, name),) + call[1:],
                                         8 if name.startswith("tk2x8") else 1, n)
                for t in threads:
                    samples: dict[str, list[float]] = {i: [] for i in variants}
                    codes_samples: dict[str, list[float]] = {i: [] for i in variants}
                    layout_samples: dict[str, list[float]] = {k: [] for k in layouts}
                    torch_samples: list[float] = []
                    for _ in range(rounds):
                        for isa in variants:
                            ternary.set_isa(isa)
                            ternary.set_num_threads(t)
                            samples[isa].append(_time_ours(C, call, min_time))
                            if codes_call is not None:
                                codes_samples[isa].append(_time_calls(
                                    lambda a=codes_call: C.ternary_gemm_codes(*a), min_time))
                            if isa == best:
                                for name, (lcall, tile_rows, n) in layouts.items():
                                    layout_samples[name].append(
                                        _time_ours(C, lcall, min_time, tile_rows, n))
                        if wf is not None:
                            torch.set_num_threads(t)
                            if tokens == 1:
                                xv = x[0]
                                torch_samples.append(
                                    _time_calls(lambda wf=wf, xv=xv: torch.mv(wf, xv), min_time))
                            else:
                                wt = wf.t()
                                torch_samples.append(
                                    _time_calls(lambda x=x, wt=wt: x @ wt, min_time))
                    torch_s = statistics.median(torch_samples) if torch_samples else None
                    timed = [("tk2", isa, statistics.median(samples[isa])) for isa in variants]
                    timed += [(k, best, statistics.median(v)) for k, v in layout_samples.items()]
                    timed += [("codes", isa, statistics.median(v))
                              for isa, v in codes_samples.items() if v]
                    for kernel, isa, sec in timed:
                        wgbps = rows * cols / 4 / sec / 1e9
                        yield {
                            "op": op, "rows": rows, "cols": cols, "tokens": tokens,
                            "threads": t, "isa": isa, "kernel": kernel, "seconds": sec,
                            "gops": 2.0 * rows * cols * tokens / sec / 1e9,
                            "weight_gbps": wgbps,
                            "read_bw_gbps": bandwidth[t],
                            "bw_fraction": wgbps / bandwidth[t],
                            "torch_seconds": torch_s,
                            "vs_torch": (torch_s / sec) if torch_s else None,
                        }
            del W, wf, codes, w_tk2, tiles, dram
        if not args.no_training:
            yield from _quantize_rows(isas, threads, rounds, min_time, args.quick, gen)
            yield from _layer_rows(threads, rounds, min_time, args.quick, gen)
            yield from _attention_rows(threads, rounds, min_time, args.quick, gen)
    finally:
        ternary.set_isa(None)
        ternary.set_num_threads(0)


def _quantize_rows(isas, threads, rounds, min_time, quick, gen):
    import torch

    from nanochat.ops import bitlinear, ternary

    for tokens, cols in ([(256, 256)] if quick else QUANT_SHAPES):
        x = torch.randn(tokens, cols, generator=gen)
        for t in threads:
            samples: dict[str, list[float]] = {i: [] for i in isas}
            torch_samples: list[float] = []
            for _ in range(rounds):
                ternary.set_num_threads(t)
                for isa in isas:
                    ternary.set_isa(isa)
                    samples[isa].append(_time_calls(
                        lambda x=x: ternary.quantize_activations(x), min_time))
                torch.set_num_threads(t)
                torch_samples.append(_time_calls(
                    lambda x=x: bitlinear.quantize_activations(x), min_time))
            med = {i: statistics.median(v) for i, v in samples.items()}
            torch_s = statistics.median(torch_samples)
            scalar_s = med.get("scalar")
            for isa in isas:
                yield {"op": "quantize", "rows": tokens, "cols": cols, "tokens": tokens,
                       "threads": t, "isa": isa, "kernel": "quantize", "seconds": med[isa],
                       "gbps": tokens * cols * 4 / med[isa] / 1e9,
                       "vs_scalar": scalar_s / med[isa] if scalar_s else None,
                       "torch_seconds": torch_s, "vs_torch": torch_s / med[isa]}


def _layer_rows(threads, rounds, min_time, quick, gen):
    import torch

    from nanochat.model.bitlinear import BitLinear
    from nanochat.ops import ternary

    for cin, cout, tokens in ([(256, 128, 256)] if quick else LAYER_SHAPES):
        torch.manual_seed(0)
        cpp = BitLinear(cin, cout, kernel="cpp")
        ref = BitLinear(cin, cout, kernel="torch")
        ref.load_state_dict(cpp.state_dict())
        x = torch.randn(tokens, cin, generator=gen, requires_grad=True)

        def fwd_bwd(layer, x=x):
            layer(x).sum().backward()
            x.grad = None
            layer.weight.grad = None

        for t in threads:
            times: dict[str, list[float]] = {"cpp": [], "torch": []}
            for _ in range(rounds):
                torch.set_num_threads(t)
                ternary.set_num_threads(t)
                for name, layer in (("cpp", cpp), ("torch", ref)):
                    times[name].append(_time_calls(lambda la=layer: fwd_bwd(la), min_time))
            ours, torch_s = (statistics.median(times[k]) for k in ("cpp", "torch"))
            yield {"op": "layer", "rows": cout, "cols": cin, "tokens": tokens, "threads": t,
                   "isa": ternary.active_isa(), "kernel": "bitlinear", "seconds": ours,
                   "macs": cin * cout * tokens, "torch_seconds": torch_s,
                   "vs_torch": torch_s / ours}


def _attention_rows(threads, rounds, min_time, quick, gen):
    import torch
    import torch.nn.functional as F

    from nanochat.ops import (
        attention,
        ternary,  # noqa: F401  (registers the op)
    )
    from nanochat.ops.rows import RowSubset

    for b, h, hkv, t, d in ([(2, 4, 2, 64, 64)] if quick else ATTENTION_SHAPES):
        q = torch.randn(b, t, h, d, generator=gen).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(b, t, hkv, d, generator=gen).transpose(1, 2).requires_grad_()
                for _ in range(2))
        go = torch.randn(b, h, t, d, generator=gen)
        keep = torch.rand(b, t, generator=gen) < 0.65

        def sdpa():
            g = h // hkv
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                               v.repeat_interleave(g, 1), is_causal=True)
            torch.autograd.grad(o, (q, k, v), go)

        def ours(kept: bool):
            rows = RowSubset((b, t))
            if kept:
                rows.keep(keep)
            o = attention.causal_attention(q, k, v, 0, rows)
            torch.autograd.grad(o, (q, k, v), go)

        def direct(fwd, bwd, q=q, k=k, v=v, go=go):  # one of the op's kernels, fwd then bwd
            with torch.no_grad():
                o, lse = fwd(q, k, v, 0, None)
                bwd(go, q, k, v, o, lse, None, 0, None)

        variants = {"torch": sdpa, "dense": lambda: ours(False), "kept": lambda: ours(True),
                    "cpp": lambda: direct(attention._cpp_forward, attention._cpp_backward),
                    "default": lambda: direct(attention._torch_forward,
                                              attention._torch_backward)}
        for th in threads:
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                torch.set_num_threads(th)
                ternary.set_num_threads(th)
                for name, fn in variants.items():
                    times[name].append(_time_calls(fn, min_time))
            med = {name: statistics.median(v) for name, v in times.items()}
            for name in ("dense", "kept", "cpp", "default"):
                yield {"op": "attention", "rows": h, "cols": d, "tokens": b * t, "threads": th,
                       "isa": ternary.active_isa(), "kernel": f"attention_{name}",
                       "batch": b, "heads": h, "kv_heads": hkv, "seq": t, "head_dim": d,
                       "kept_fraction": float(keep.float().mean()) if name == "kept" else 1.0,
                       "seconds": med[name], "torch_seconds": med["torch"],
                       "vs_torch": med["torch"] / med[name]}


def main(args: argparse.Namespace) -> int:
    rows = []
    if not args.json:
        print(f"{'op':4} {'rows x cols':>13} {'tok':>4} {'thr':>3} {'isa':>11} "
              f"{'time':>10} {'GOPS':>7} {'wGB/s':>7} {'ofBW':>5} {'vs torch':>8}")
    for m in run(args):
        rows.append(m)
        vs = f"{m['vs_torch']:.2f}x" if m["vs_torch"] else "-"
        if args.json:
            print(json.dumps(m), flush=True)
        elif m["op"] == "quantize":
            vs_scalar = f"{m['vs_scalar']:.1f}x scalar" if m["vs_scalar"] else ""
            print(f"{'quantize activations':20} {m['rows']:>5}x{m['cols']:<5} {m['threads']:>3} "
                  f"{m['isa']:>11} {_fmt_time(m['seconds']):>10} {vs_scalar:>14} "
                  f"{vs:>8} torch", flush=True)
        elif m["op"] == "layer":
            print(f"{'BitLinear fwd+bwd':20} {m['cols']:>5}->{m['rows']:<4} x{m['tokens']:<5} "
                  f"{m['threads']:>3} {'cpp op':>11} {_fmt_time(m['seconds']):>10} "
                  f"{'2^%.1f MACs' % math.log2(m['macs']):>14} {vs:>8} torch", flush=True)
        elif m["op"] == "attention":
            shape = f"{m['batch']}x{m['seq']} h{m['heads']}/{m['kv_heads']} d{m['head_dim']}"
            what = {"attention_kept": "kept 65%", "attention_cpp": "cpp",
                    "attention_default": "default"}.get(m["kernel"], "all rows")
            print(f"{'attention fwd+bwd':20} {shape:<22} {m['threads']:>3} {m['isa']:>11} "
                  f"{what:>9} "
                  f"{_fmt_time(m['seconds']):>10} {vs:>8} torch", flush=True)
        else:
            isa = {"tk2": m["isa"], "tk2x8": "tiles", "tk2_dram": "dram",
                   "tk2x8_dram": "tiles dram"}.get(m["kernel"], m["kernel"])
            print(f"{m['op']:4} {m['rows']:>6}x{m['cols']:<6} {m['tokens']:>4} {m['threads']:>3} "
                  f"{isa:>11} {_fmt_time(m['seconds']):>10} {m['gops']:>7.1f} "
                  f"{m['weight_gbps']:>7.1f} {m['bw_fraction']:>5.0%} {vs:>8}", flush=True)
    if not args.json and rows:
        bws = sorted({(m["threads"], m["read_bw_gbps"]) for m in rows if "read_bw_gbps" in m})
        print("read bandwidth: " + ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in bws))
    return 0


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"
