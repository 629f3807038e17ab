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

`--nproc N` instead measures data-parallel scaling: the same config, per-rank batch and
step (forward + backward + AdamW on the model as `train.parallel` wraps it: DDP, or FSDP2
with `--parallel fsdp`) in 1 rank and in N ranks, each launched by torchrun exactly as
`nanochat train --nproc` launches (train/launch.py; gloo on CPU), alternating 1 and N round
by round. The machine's threads (--threads, default the CPUs this process may use) are
split evenly over the ranks, at least one each, so by default both rows use the same cores. A step is timed between
barriers on every rank; tokens/s counts all ranks' tokens (N x batch x seq per step), and
`scaling_vs_1` is N ranks' tokens/s over 1 rank's (N is ideal; on a machine whose cores the
one rank already uses, the ratio measures what the extra processes and the gradient
all-reduce cost). Peak memory is each rank's max RSS, listed per rank.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
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
    p.add_argument("--nproc", type=int, metavar="N",
                   help="scaling instead: N torchrun ranks (gloo) vs 1 on the same config and "
                   "per-rank batch, the threads split over the ranks")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="with --nproc: how the ranks share the model (train.parallel)")


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


def _rank_main(argv: list[str]) -> int:
    """One rank of `--nproc` (run by torchrun): times the training step, writes
    OUT/rank{R}.json."""
    import resource
    import time

    import torch

    from nanochat import atomic, malloc
    from nanochat.config import load_config
    from nanochat.model.build import build_model
    from nanochat.ops import ternary
    from nanochat.train.distributed import Group

    p = argparse.ArgumentParser(prog="nanochat.bench.train (rank)")
    for name, typ in (("--config", str), ("--batch", int), ("--seq", int), ("--steps", int),
                      ("--threads", int), ("--parallel", str), ("--out", str)):
        p.add_argument(name, type=typ, required=True)
    a = p.parse_args(argv)
    malloc.tune()  # as the trainer does
    torch.set_num_threads(a.threads)
    ternary.set_num_threads(a.threads)
    group = Group.from_env("cpu")
    try:
        cfg = load_config(a.config)
        model = build_model(cfg)
        net = group.wrap(model, a.parallel)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # FSDP: over the shards
        g = torch.Generator().manual_seed(1 + group.rank)  # each rank its own tokens
        x = torch.randint(0, cfg.model.vocab_size, (a.batch, a.seq + 1), generator=g)

        def step():
            _, loss = net(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm up (allocations, DDP's first-iteration bucketing)
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        group.barrier()  # the job's step time: the slowest rank's
        sec = (time.perf_counter() - t0) / a.steps
        r = {"rank": group.rank, "world": group.world, "step_seconds": sec,
             "isa": ternary.active_isa(), "threads": torch.get_num_threads(),
             "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "params": model.num_params()["total"]}
        atomic.write_text(os.path.join(a.out, f"rank{group.rank}.json"), json.dumps(r))
    finally:
        group.close()
    return 0


def _launch(config: str, nproc: int, args: argparse.Namespace, threads: int) -> dict:
    """One torchrun job of nproc ranks; their rank{R}.json merged into one row."""
    import subprocess
    import tempfile

    from nanochat.train.launch import display, torchrun_command

    per_rank = max(1, threads // nproc)
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-train-") as out:
        cmd = torchrun_command(nproc, [
            "--config", config, "--batch", str(args.batch), "--seq", str(args.seq),
            "--steps", str(args.steps), "--threads", str(per_rank),
            "--parallel", args.parallel, "--out", out], module="nanochat.bench.train")
        # the rank count and threads are ours: torchrun would set OMP_NUM_THREADS=1 itself
        env = {**os.environ, "OMP_NUM_THREADS": str(per_rank)}
        env.pop("NANOCHAT_NUM_THREADS", None)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr)[-3000:]
            raise RuntimeError(f"bench train --nproc: `{display(cmd)}` exited with "
                               f"{r.returncode}:\n{tail}")
        ranks = []
        for i in range(nproc):
            with open(os.path.join(out, f"rank{i}.json")) as f:
                ranks.append(json.load(f))
    sec = max(x["step_seconds"] for x in ranks)
    return {"step_seconds": sec, "tokens_per_s": nproc * args.batch * args.seq / sec,
            "peak_rss_bytes_per_rank": [x["peak_rss_bytes"] for x in ranks],
            "peak_rss_bytes": max(x["peak_rss_bytes"] for x in ranks),
            "threads_per_rank": ranks[0]["threads"], "isa": ranks[0]["isa"],
            "params": ranks[0]["params"], "command": display(cmd).replace(out, "DIR")}


def run_scaling(args: argparse.Namespace):
    """--nproc N: rows for 1 rank and N ranks per config (module doc)."""
    from nanochat.bench import cpu_model
    from nanochat.train.launch import check_nproc

    n = check_nproc(args.nproc)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    threads = args.threads or len(os.sched_getaffinity(0))
    cpu = cpu_model()
    counts = sorted({1, n})
    for config in args.configs.split(","):
        samples = {k: [] for k in counts}
        for _ in range(args.rounds):
            for k in counts:
                samples[k].append(_launch(config, k, args, threads))
        med = {k: {m: statistics.median(s[m] for s in samples[k])
                   for m in ("step_seconds", "tokens_per_s")} for k in counts}
        for k in counts:
            last = samples[k][-1]
            yield {"cpu": cpu, "isa": last["isa"], "config": config, "nproc": k,
                   "parallel": args.parallel if k > 1 else "none", "backend": "gloo",
                   "batch_per_rank": args.batch, "seq": args.seq,
                   "threads_per_rank": last["threads_per_rank"], "params": last["params"],
                   **med[k],
                   "peak_rss_bytes_per_rank": [max(s["peak_rss_bytes_per_rank"][r]
                                                   for s in samples[k]) for r in range(k)],
                   "scaling_vs_1": med[k]["tokens_per_s"] / med[1]["tokens_per_s"],
                   "efficiency": med[k]["tokens_per_s"] / med[1]["tokens_per_s"] / k,
                   "rounds": args.rounds, "command": last["command"]}


def main_scaling(args: argparse.Namespace) -> int:
    if not args.json:
        print(f"{'config':>10} {'ranks':>5} {'parallel':>8} {'threads':>7} {'isa':>11} "
              f"{'step':>9} {'tokens/s':>9} {'vs 1 rank':>9} {'effic.':>6}  peak RSS per rank",
              flush=True)
    for m in run_scaling(args):
        if args.json:
            print(json.dumps(m), flush=True)
        else:
            rss = ", ".join(f"{b / 2**20:.0f}MB" for b in m["peak_rss_bytes_per_rank"])
            print(f"{m['config']:>10} {m['nproc']:>5} {m['parallel']:>8} "
                  f"{m['threads_per_rank']:>7} {m['isa']:>11} "
                  f"{m['step_seconds'] * 1e3:>7.0f}ms {m['tokens_per_s']:>9,.0f} "
                  f"{m['scaling_vs_1']:>8.2f}x {m['efficiency']:>6.0%}  {rss}", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return main_scaling(args)
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


if __name__ == "__main__":  # a rank of `--nproc`, started by torchrun
    sys.exit(_rank_main(sys.argv[1:]))
