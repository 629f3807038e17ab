"""nanochat bench loss: peak memory and time of the fused linear cross-entropy (the C++
chunked op, nanochat/ops/fused_loss.py) vs naive torch (every head's full logits, F.linear +
F.cross_entropy + autograd), forward + backward, for 1 and 4 heads in one run.

Inputs as the LM head sees them: hidden (heads, tokens, d) with unit RMS, the tied weight
(vocab, d) at std 0.02, and one random token sequence whose targets head i reads shifted by
i (nanochat/model/mtp.py: the last i are ignored); the head weights are the MTP defaults.
Defaults: vocab 32768, 8192 tokens, d_model 768 (nano_125m's).

Memory: each (heads, variant) runs in a fresh child process; its peak is the process's
RSS high-water mark (getrusage ru_maxrss) minus its RSS right before the loss runs (with
torch imported and the inputs allocated), i.e. what the loss itself adds at its peak, its
outputs (the gradients) included. torch's CPU allocator returns large blocks to the OS, so
the RSS follows the live tensors. `memory_ratio` = fused peak / naive peak on that measure;
the whole-process ratio is reported next to it (`process_memory_ratio`).
Before the baseline, one tiny call of the same variant loads the code it needs (the C++
extension, the op's registration, the thread pool), so none of that counts as its peak.
Time: the median of --repeats forward+backward calls at full size (no full-size warm-up:
the first call's allocations are part of the cost); `speed_ratio` = naive time / fused time.
The header names the CPU model and the kernel ISA (NANOCHAT_ISA pins it; csrc/loss picks
its GEMM tiles from it: scalar, AVX2, AVX-512); each JSON object carries "cpu" and "isa",
the ISA as the child saw it. fused-bf16 runs where the ISA takes bf16 (fused_loss.py
bf16_supported; on AVX2 the f32 tiles over bf16-rounded operands: f32 speed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per (heads, variant)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (default 32768)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per head (default 8192)")
    p.add_argument("--dim", type=int, default=768, help="d_model (default 768, nano_125m's)")
    p.add_argument("--heads", default="1,4", help="comma-separated head counts (default 1,4)")
    p.add_argument("--chunk", type=int, default=1024, help="fused op's tokens per chunk")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch + kernel threads (0: all)")


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:  # resident pages now (Linux)
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(variant: str, heads: int, vocab: int, tokens: int, dim: int, chunk: int,
             repeats: int, threads: int, q):
    import resource
    import time

    import torch

    from nanochat.config import MTPConfig
    from nanochat.model import mtp
    from nanochat.ops import fused_loss, ternary

    try:
        if threads > 0:
            torch.set_num_threads(threads)
            ternary.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        h = torch.randn(heads, tokens, dim, generator=g).requires_grad_()
        w = (torch.randn(vocab, dim, generator=g) * 0.02).requires_grad_()
        seq = torch.randint(0, vocab, (1, tokens), generator=g)
        y = mtp.head_targets(seq, heads).reshape(heads, tokens)
        hw = mtp.head_weights(MTPConfig(heads=heads)) if heads <= 4 else [1.0] * heads

        def step(h, w, y):
            h.grad = w.grad = None
            if variant == "naive":
                total, _ = fused_loss.naive_linear_cross_entropy(h, w, y, hw)
            else:
                total, _ = fused_loss.fused_linear_cross_entropy(
                    h, w, y, hw, chunk=chunk, precision=variant.split("-")[1])
            total.backward()
            return float(total.detach())

        # One tiny call first, so code loading (the C++ extension, the op's registration,
        # the thread pool) is in the baseline of every variant, not in its peak.
        step(h[:, :8].detach().requires_grad_(), w[:64].detach().requires_grad_(),
             y[:, :8] % 64)
        base = _rss_bytes()
        times, loss = [], 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss = step(h, w, y)
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        q.put({"isa": ternary.active_isa(), "seconds": statistics.median(times),
               "peak_bytes": peak - base,
               "process_peak_bytes": peak, "loss": loss})
    except BaseException as e:  # report, don't hang the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def run(args: argparse.Namespace):
    from nanochat.bench import cpu_model
    from nanochat.ops import fused_loss

    ctx = mp.get_context("spawn")
    variants = ["naive", "fused-f32"] + (["fused-bf16"] if fused_loss.bf16_supported() else [])
    for heads in (int(x) for x in args.heads.split(",")):
        res = {}
        for v in variants:
            q = ctx.Queue()
            p = ctx.Process(target=_measure, args=(v, heads, args.vocab, args.tokens, args.dim,
                                                   args.chunk, args.repeats, args.threads, q))
            p.start()
            r = q.get()
            p.join()
            if "error" in r:
                raise RuntimeError(f"bench loss heads={heads} {v}: {r['error']}")
            res[v] = r
        n = res["naive"]
        for v in variants:
            r = res[v]
            yield {"cpu": cpu_model(), "heads": heads, "variant": v, "vocab": args.vocab,
                   "tokens": args.tokens,
                   "d_model": args.dim, "chunk": args.chunk if v != "naive" else None,
                   "threads": args.threads or None, **r,
                   "memory_ratio": r["peak_bytes"] / n["peak_bytes"],
                   "process_memory_ratio": r["process_peak_bytes"] / n["process_peak_bytes"],
                   "speed_ratio": n["seconds"] / r["seconds"],
                   "loss_diff_vs_naive": abs(r["loss"] - n["loss"])}


def main(args: argparse.Namespace) -> int:
    if not args.json:
        print(f"vocab {args.vocab}, {args.tokens} tokens, d_model {args.dim}; peak = RSS "
              f"high-water above the inputs (fresh process each)")
        print(f"{'heads':>5} {'variant':>10} {'isa':>11} {'time':>8} {'peak':>9} {'process':>9} "
              f"{'memory_ratio':>12} {'speed_ratio':>11} {'|dloss|':>8}")
    for m in run(args):
        if args.json:
            print(json.dumps(m), flush=True)
        else:
            print(f"{m['heads']:>5} {m['variant']:>10} {m['isa']:>11} {m['seconds']:>7.2f}s "
                  f"{m['peak_bytes'] / 2**20:>7.0f}MB {m['process_peak_bytes'] / 2**20:>7.0f}MB "
                  f"{m['memory_ratio']:>12.3f} {m['speed_ratio']:>10.2f}x "
                  f"{m['loss_diff_vs_naive']:>8.1e}", flush=True)
    return 0
