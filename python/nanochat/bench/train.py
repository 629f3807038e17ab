"""nanochat bench train: training tokens/s and peak memory, C++ BitLinear vs plain torch.

Same model, batch, seed and thread count; the only difference is the BitLinear path:
"cpp" (the forward runs the C++ ternary GEMM through the nanochat::bitlinear custom op,
with the C++ RMSNorm, SwiGLU and attention ops) or "torch" (the textbook fake-quant
BitLinear in pure PyTorch, with torch's RMSNorm, SwiGLU and SDPA). Each measurement runs in
a fresh child process so its peak memory (max RSS on CPU) is its own; the variants
alternate round by round (A B A B) and medians are reported, with the ratio cpp/torch.

A step is forward + backward + AdamW update on random tokens (data loading excluded).
The machine line above the table (every bench prints it) names the CPU model and the kernel
paths the C++ ops ran on (NANOCHAT_ISA pins them); each JSON object carries the CPU and the ISA
as "cpu" and "isa", the ISA as the child saw it.
The C++ path's backward GEMMs run at `--backward` precision (default auto: bf16 on CPUs
with AVX512-BF16/AMX, see nanochat/ops/bitlinear.py); the torch baseline is f32 throughout.

`--compare malloc` instead runs the C++ path twice, with nanochat/malloc.py's glibc
settings (what the trainer applies) and with glibc's defaults (the child skips tune()):
speedup_vs_glibc = glibc step time / tuned step time. `--compare fused` runs the C++
path with the nanochat::rms_norm, nanochat::swiglu and nanochat::attention ops
(nanochat/ops/rmsnorm.py, swiglu.py, attention.py) and with torch's F.rms_norm,
F.silu(gate) * up and SDPA (the model built with ops="torch", nanochat/model/build.py):
speedup_vs_torch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
from typing import get_args

from nanochat.config import BackwardPrecision


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per (config, variant)")
    p.add_argument("--configs", default="tiny,nano_125m", help="comma-separated model configs")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch + kernel threads (0: all)")
    p.add_argument("--compare", default="bitlinear", choices=("bitlinear", "malloc", "fused"),
                   help="bitlinear: C++ vs torch BitLinear (default); malloc: the C++ path "
                   "with the trainer's glibc malloc settings vs glibc's defaults; fused: the "
                   "C++ path with the C++ RMSNorm and SwiGLU ops vs torch's")
    p.add_argument("--backward", default="auto", choices=get_args(BackwardPrecision),
                   help="C++ path backward GEMM precision (default auto)")


def _measure(config: str, variant: str, batch: int, seq: int, steps: int, threads: int,
             backward: str, q, tune_malloc: bool = True, ops: str = "auto"):
    import resource
    import time

    import torch

    from nanochat import malloc
    from nanochat.config import load_config
    from nanochat.model.build import build_model
    from nanochat.ops import ternary

    try:
        if tune_malloc:
            malloc.tune()  # as the trainer does (nanochat/malloc.py)
        if threads > 0:
            torch.set_num_threads(threads)
            ternary.set_num_threads(threads)
        cfg = load_config(config)
        # the trainer's step; plain torch has no C++ op, the fused head loss included
        model = build_model(cfg, bitlinear=variant, backward=backward,
                            fused_loss="off" if variant == "torch" else None, ops=ops)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=g)

        def step():
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm up (allocations, first-call overheads)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sec = (time.perf_counter() - t0) / steps
        q.put({"step_seconds": sec, "tokens_per_s": batch * seq / sec,
               "isa": ternary.active_isa(),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "params": model.num_params()["total"]})
    except BaseException as e:  # report, don't hang the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


# --compare MODE: (label, BitLinear path, malloc.tune() in the child, the model's other
# ops: build_model's `ops`) per variant; the last one is the baseline the ratios divide by.
VARIANTS = {
    "bitlinear": [("cpp", "cpp", True, "auto"), ("torch", "torch", True, "torch")],
    "malloc": [("tuned", "cpp", True, "auto"), ("glibc", "cpp", False, "auto")],
    "fused": [("cpp", "cpp", True, "auto"), ("torch", "cpp", True, "torch")],
}


def run(args: argparse.Namespace):
    from nanochat.ops.bitlinear import resolve_backward

    ctx = mp.get_context("spawn")
    from nanochat.bench import cpu_model

    cpu = cpu_model()
    backward = "bf16" if resolve_backward(args.backward) else "float32"
    variants = VARIANTS[args.compare]
    base = variants[-1][0]
    for config in args.configs.split(","):
        samples = {label: [] for label, *_ in variants}
        for _ in range(args.rounds):
            for label, path, tune, ops in variants:
                q = ctx.Queue()
                p = ctx.Process(target=_measure, args=(config, path, args.batch, args.seq,
                                                       args.steps, args.threads, args.backward,
                                                       q, tune, ops))
                p.start()
                r = q.get()
                p.join()
                if "error" in r:
                    raise RuntimeError(f"bench train {config}/{label}: {r['error']}")
                samples[label].append(r)
        med = {v: {k: statistics.median(s[k] for s in samples[v])
                   for k in ("step_seconds", "tokens_per_s", "peak_rss_bytes")}
               for v in samples}
        for label, path, _, _ in variants:
            yield {"cpu": cpu, "isa": samples[label][0]["isa"],
                   "config": config, "compare": args.compare, args.compare: label,
                   "bitlinear": path, "backward": backward if path == "cpp" else "float32",
                   "batch": args.batch, "seq": args.seq, "threads": args.threads or None,
                   "params": samples[label][0]["params"], **med[label],
                   f"speedup_vs_{base}": med[base]["step_seconds"] / med[label]["step_seconds"],
                   f"memory_vs_{base}": med[label]["peak_rss_bytes"]
                   / med[base]["peak_rss_bytes"]}


def main(args: argparse.Namespace) -> int:
    mode, base = args.compare, VARIANTS[args.compare][-1][0]
    if not args.json:  # the CPU and the kernel paths: cli's machine line above this
        print(f"{'config':>10} {mode:>9} {'isa':>11} {'backward':>8} {'params':>12} {'step':>9} "
              f"{'tokens/s':>9} {'peak RSS':>9} {'speed vs ' + base:>14} "
              f"{'mem vs ' + base:>12}")
    for m in run(args):
        if args.json:
            print(json.dumps(m), flush=True)
        else:
            print(f"{m['config']:>10} {m[mode]:>9} {m['isa']:>11} {m['backward']:>8} "
                  f"{m['params']:>12,} "
                  f"{m['step_seconds'] * 1e3:>7.0f}ms {m['tokens_per_s']:>9,.0f} "
                  f"{m['peak_rss_bytes'] / 2**20:>7.0f}MB {m[f'speedup_vs_{base}']:>13.2f}x "
                  f"{m[f'memory_vs_{base}']:>11.2f}x", flush=True)
    return 0
