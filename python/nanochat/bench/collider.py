"""nanochat bench collider: Collider token filtering vs the unfiltered step.

Two parts, in one process:

1. Timing, per config (default tiny and nano_125m shapes, random tokens): the same model
   and batch run the unfiltered trainer step (forward, mean loss, backward, AdamW) and the
   Collider step (forward, scores, selection, gathered backward, AdamW) alternately, one
   step each per round after a warm-up; medians of forward, backward and whole-step time
   and the ratios collider / unfiltered. The timing drops exactly `--sparsity` of the tokens
   (threshold 1), so the ratio measures the backward at that sparsity. BitLinear runs
   `--bitlinear` (default cpp: the C++ custom op with its backward at `--backward`
   precision, as `nanochat train` runs it on these widths with train.bitlinear=cpp).
2. Held-out loss on tiny (`--train-steps N`, 0 skips it): `nanochat train`'s own loop on the
   prepared Python-stdlib data, same seed and batches: unfiltered for N steps, Collider
   (`--sparsity`, `--threshold`: the seed's 0.35 / 0.3) for N steps (equal steps), and
   Collider for as many steps as fit in the unfiltered run's training time (equal wall
   time): N x median unfiltered step / median Collider step. Step times are the per-step
   windows of metrics.jsonl (log_every 1; medians, since other work on a shared machine
   stretches single steps); train_s is their sum (no eval or checkpoint time).

    nanochat bench collider [--json] [--train-steps 200] [--configs tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import get_args

from nanochat.config import BackwardPrecision, BitLinearKernel, Device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--configs", default="tiny,nano_125m", help="comma-separated configs to time")
    p.add_argument("--batch", type=int, default=4, help="sequences per timed step (default 4)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds, one step each (default 5)")
    p.add_argument("--sparsity", type=float, default=0.35, help="fraction dropped (default 0.35)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="normalized-score threshold of the training runs (default 0.3)")
    p.add_argument("--bitlinear", default="cpp", choices=get_args(BitLinearKernel),
                   help="BitLinear path (default cpp)")
    p.add_argument("--backward", default="auto", choices=get_args(BackwardPrecision),
                   help="C++ path backward GEMM precision (default auto)")
    p.add_argument("--device", default="cpu", choices=get_args(Device),
                   help="device of the timing (default cpu; on cuda under bf16 autocast, as "
                   "the trainer runs, and --bitlinear auto or torch)")
    p.add_argument("--train-steps", type=int, default=100,
                   help="held-out comparison on tiny: steps of each run (default 100, 0 skips)")


def _timing(config: str, args) -> list[dict]:
    from nanochat.config import load_config

    return timing_rows(load_config(config), config, args)


def timing_rows(cfg, config: str, args) -> list[dict]:
    """The A/B timing of one RunConfig's model (`config` labels the rows); args carries
    batch, seq, rounds, sparsity, bitlinear, backward, device (also used by bench e3)."""
    import contextlib

    import torch

    from nanochat import malloc
    from nanochat.model.build import build_model
    from nanochat.train.collider import Collider
    from nanochat.train.loop import pick_device

    device = pick_device(args.device)
    if device.type == "cuda" and args.bitlinear == "cpp":
        raise ValueError("--bitlinear cpp runs on CPU tensors only; on --device cuda use "
                         "auto or torch")
    malloc.tune()  # as the trainer runs (nanochat/malloc.py)
    model = build_model(cfg, device, bitlinear=args.bitlinear, backward=args.backward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = toks[:, :-1].to(device), toks[:, 1:].to(device)
    col = Collider(args.sparsity, 1.0)  # threshold 1: exactly floor(sparsity * n) dropped
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())  # as the trainer runs

    def mark() -> float:  # on CUDA: time the kernels, not their launches
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step(variant: str) -> dict:
        t = {}
        t0 = mark()
        if variant == "collider":
            _, kept = col.forward_backward(model, x, y, autocast=autocast, timings=t)
        else:
            with autocast:
                _, loss = model(x, y)
            t1 = mark()
            loss.backward()
            t.update(forward_s=t1 - t0, backward_s=mark() - t1)
            kept = 1.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.update(step_s=mark() - t0, kept_fraction=kept)
        return t

    variants = ("unfiltered", "collider")
    for v in variants:  # warm up (allocations, first-call overheads)
        step(v)
    samples = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            samples[v].append(step(v))
    med = {v: {k: statistics.median(s[k] for s in samples[v])
               for k in ("forward_s", "backward_s", "step_s", "kept_fraction")} for v in variants}
    return [{"part": "timing", "config": config, "variant": v, "bitlinear": args.bitlinear,
             "device": device.type, "batch": args.batch, "seq": args.seq,
             "rounds": args.rounds, **med[v],
             "backward_ratio": med[v]["backward_s"] / med["unfiltered"]["backward_s"],
             "step_ratio": med[v]["step_s"] / med["unfiltered"]["step_s"]} for v in variants]


def _step_seconds(run_dir: Path, tokens_per_step: int) -> list[float]:
    """Each step's time (log_every 1), without evals and checkpoints."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [tokens_per_step / r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]


def _heldout(args) -> list[dict]:
    from nanochat.config import apply_overrides, load_config
    from nanochat.data import corpus
    from nanochat.train.loop import train

    base = load_config("tiny")
    data = Path(corpus.prepare(base.data.sources or None, None, base.model.vocab_size,
                               base.data.val_fraction, base.data.extensions,
                               progress=False).out_dir)
    n = args.train_steps
    common = [f"train.max_steps={n}", "train.time_budget_s=0", "train.log_every=1",
              f"train.eval_every={n}", f"train.checkpoint_every={n}", "train.keep_checkpoints=1",
              f"train.bitlinear={args.bitlinear}", f"train.bitlinear_backward={args.backward}"]
    col = ["train.collider.enabled=true", f"train.collider.sparsity={args.sparsity}",
           f"train.collider.threshold={args.threshold}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-collider-") as tmp:
        def run(name, sets):
            cfg = apply_overrides(base, common + sets)
            out = Path(tmp) / name
            r = train(cfg, data, out, progress_bar=False, log=lambda *a, **k: None)
            tps = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
            step_s = _step_seconds(out, tps)
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
            kept = [m["collider_kept_fraction"] for m in metrics if "collider_kept_fraction" in m]
            row = {"part": "heldout", "config": "tiny", "variant": name, "steps": r.step,
                   "train_s": sum(step_s), "step_s": statistics.median(step_s),
                   "val_loss": r.val_loss,
                   "val_bpb": r.val_bpb, "kept_fraction": statistics.mean(kept) if kept else 1.0,
                   "sparsity": args.sparsity if kept else 0.0,
                   "threshold": args.threshold if kept else None}
            rows.append(row)
            return row

        b = run("unfiltered", [])
        c = run("collider_equal_steps", col)
        n_time = max(1, round(n * b["step_s"] / c["step_s"]))  # steps in the unfiltered time
        run("collider_equal_time", col + [f"train.max_steps={n_time}", f"train.eval_every={n_time}",
                                          f"train.checkpoint_every={n_time}"])
    for r in rows:
        r["val_loss_vs_unfiltered"] = r["val_loss"] - b["val_loss"]
    return rows


def run(args: argparse.Namespace):
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.rounds < 1 or args.batch < 1 or args.seq < 2 or args.train_steps < 0:
        raise ValueError("--rounds, --batch must be >= 1, --seq >= 2, --train-steps >= 0")
    for config in [c for c in args.configs.split(",") if c]:
        yield from _timing(config, args)
    if args.train_steps:
        yield from _heldout(args)


def main(args: argparse.Namespace) -> int:
    header = False
    for m in run(args):
        if args.json:
            print(json.dumps(m), flush=True)
        elif m["part"] == "timing":
            if not header:
                print(f"{'config':>10} {'variant':>10} {'kept':>5} {'forward':>9} {'backward':>9} "
                      f"{'step':>9} {'backward ratio':>14} {'step ratio':>10}")
                header = True
            print(f"{m['config']:>10} {m['variant']:>10} {m['kept_fraction']:>5.2f} "
                  f"{m['forward_s'] * 1e3:>7.0f}ms {m['backward_s'] * 1e3:>7.0f}ms "
                  f"{m['step_s'] * 1e3:>7.0f}ms {m['backward_ratio']:>13.2f}x "
                  f"{m['step_ratio']:>9.2f}x", flush=True)
        else:
            if header is not None:
                print(f"\nheld-out on tiny: {'variant':>20} {'steps':>6} {'kept':>5} {'step':>7} "
                      f"{'train time':>10} {'val loss':>8} {'val bpb':>8} {'vs unfiltered':>13}")
                header = None
            print(f"{'':>17} {m['variant']:>20} {m['steps']:>6} {m['kept_fraction']:>5.2f} "
                  f"{m['step_s'] * 1e3:>5.0f}ms {m['train_s']:>9.1f}s {m['val_loss']:>8.4f} "
                  f"{m['val_bpb']:>8.4f} "
                  f"{m['val_loss_vs_unfiltered']:>+13.4f}", flush=True)
    return 0
