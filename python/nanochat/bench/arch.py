"""nanochat bench arch: training step time and memory of the architecture options side by side.

One config (default tiny), one process, the same batch of random tokens; the variants differ
only in `[model.*]` options:

    plain     the config as is (plain residual, dense FFN, full attention)
    mhc       --mhc N residual streams (mHC, Sinkhorn H_res, dynamic coefficients)
    mhc-lite  the same with H_res a convex mix of permutation matrices
    moe       --experts E ternary experts, top-2, each ffn_hidden / 2 wide (so a token's
              active FFN matches the dense one)
    hybrid    "SSSL" attention, window seq / 4

A step is forward + backward + AdamW update (data loading excluded). The variants alternate
round by round (A B C ... A B C ...) and medians are reported, with ratios to `plain`.
Memory is measured, not estimated: `activation bytes` is the size of every distinct tensor
autograd saves for the backward during one forward (torch.autograd.graph.saved_tensors_hooks,
parameters excluded), `state bytes` the parameters plus their gradients and AdamW moments;
the JSON rows also carry GPT.estimate_memory's activation estimate for comparison.

    nanochat bench arch [--config tiny] [--mhc 4] [--variants plain,mhc,moe,hybrid] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics

VARIANTS = ("plain", "mhc", "mhc-lite", "moe", "hybrid")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per variant")
    p.add_argument("--config", default="tiny", help="model config (default tiny)")
    p.add_argument("--variants", default="plain,mhc,mhc-lite,moe,hybrid",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--mhc", type=int, default=4, help="residual streams of the mHC variants")
    p.add_argument("--experts", type=int, default=8, help="experts of the moe variant")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch + kernel threads (0: all)")


def overrides(variant: str, args: argparse.Namespace, ffn_hidden: int) -> list[str]:
    if variant == "plain":
        return []
    if variant == "mhc":
        return [f"model.mhc.streams={args.mhc}"]
    if variant == "mhc-lite":
        return [f"model.mhc.streams={args.mhc}", "model.mhc.res=lite"]
    if variant == "moe":
        return [f"model.moe.experts={args.experts}", "model.moe.top_k=2",
                f"model.moe.expert_hidden={ffn_hidden // 2}"]
    if variant == "hybrid":
        return ["model.attention.pattern=SSSL", f"model.attention.window={max(1, args.seq // 4)}"]
    raise ValueError(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during one forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x[:, :-1], x[:, 1:])
    del loss
    return sum(seen.values())


def run(args: argparse.Namespace):
    import time

    import torch

    from nanochat.config import apply_overrides, load_config
    from nanochat.model.build import build_model
    from nanochat.ops import ternary

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        ternary.set_num_threads(args.threads)
    base = load_config(args.config)
    if args.seq > base.model.max_seq_len:
        raise ValueError(f"--seq {args.seq} exceeds the config's max_seq_len "
                         f"{base.model.max_seq_len}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs = {}
    for v in names:
        cfg = apply_overrides(base, overrides(v, args, base.model.ffn_hidden), "--variants")
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[v] = (model, opt)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, base.model.vocab_size, (args.batch, args.seq + 1), generator=g)

    def step(model, opt):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for model, opt in runs.values():
        step(model, opt)  # warm up (allocations, optimizer state)
    times = {v: [] for v in names}
    for _ in range(args.rounds):
        for v in names:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*runs[v])
            times[v].append((time.perf_counter() - t0) / args.steps)
    rows = {}
    for v in names:
        model, _ = runs[v]
        n = model.num_params()
        state = sum(p.numel() * p.element_size() * 4 for p in model.parameters())
        sec = statistics.median(times[v])
        rows[v] = {"variant": v, "config": args.config, "batch": args.batch, "seq": args.seq,
                   "threads": args.threads or torch.get_num_threads(),
                   "params": n["total"], "active_params": n["active"],
                   "step_seconds": sec, "tokens_per_s": args.batch * args.seq / sec,
                   "activation_bytes": _saved_bytes(model, x), "state_bytes": state,
                   "activation_estimate_bytes":
                       model.estimate_memory(args.batch, args.seq)["activation_bytes"]}
    ref = rows.get("plain")
    for v in names:
        r = rows[v]
        if ref is not None:
            r["time_vs_plain"] = r["step_seconds"] / ref["step_seconds"]
            r["activations_vs_plain"] = r["activation_bytes"] / ref["activation_bytes"]
        yield r


def main(args: argparse.Namespace) -> int:
    if not args.json:
        print(f"{'variant':>9} {'params':>12} {'active':>12} {'step':>8} {'tokens/s':>9} "
              f"{'activations':>11} {'state':>8} {'time vs plain':>13} {'act vs plain':>12}")
    for r in run(args):
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        ratio = (f"{r['time_vs_plain']:>12.2f}x {r['activations_vs_plain']:>11.2f}x"
                 if "time_vs_plain" in r else f"{'-':>13} {'-':>12}")
        print(f"{r['variant']:>9} {r['params']:>12,} {r['active_params']:>12,} "
              f"{r['step_seconds'] * 1e3:>6.0f}ms {r['tokens_per_s']:>9,.0f} "
              f"{r['activation_bytes'] / 2**20:>9.1f}MB {r['state_bytes'] / 2**20:>6.0f}MB "
              f"{ratio}", flush=True)
    return 0
