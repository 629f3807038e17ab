"""nanochat bench optim: optimizer-state bytes and step time of every optimizer configuration
on real models, side by side, with ratios to AdamW fp32.

    nanochat bench optim [--json] [--models nano_125m,small_560m] [--configs adamw_fp32,...]
                         [--steps 3] [--threads 0] [--muon-rest lion|adamw]
                         [--ns-dtype auto,float32,bfloat16]

For each model config the GPT is instantiated for real (fp32 latent weights, bitlinear
"torch": the optimizer only sees parameters) and every configuration is the whole-model
optimizer exactly as the trainer builds it (nanochat.optim.build_optimizer):

    adamw_fp32  AdamW everywhere, fp32 state (today's default; torch.optim.AdamW)
    muon_fp32   Muon on the BitLinear matrices, --muon-rest (default Lion) on the rest
    lion_fp32   Lion everywhere
    adamw_8bit / muon_8bit / lion_8bit   the same with blockwise 8-bit state (block 2048;
                tensors under 4096 elements keep fp32 state), fused C++ update kernels
    galore2     AdamW with GaLore 2 on the 2-D matrices at rank d_model / 4, fp32 state

Gradients are fixed random tensors (the forward/backward is not what is measured). One
warm-up step allocates the state; state_bytes is then the sum of the bytes of every tensor
in optimizer.state (codes, absmax, moments, projectors: measured, not computed), and
step_seconds the median of --steps timed steps. ratio_vs_adamw = state_bytes / adamw_fp32's;
step_vs_fp32 = an 8-bit configuration's step time / its fp32 version's. bitsandbytes' and
torchao's 8-bit AdamW are run as peers where they import and run on this CPU, else reported
as skipped. Results: docs/benchmarks.md.

Muon's Newton-Schulz runs in optim.muon.ns_dtype; --ns-dtype lists the settings to time
(each muon_* configuration runs once per setting; a row's "ns_dtype" is the setting and
"ns_dtype_resolved" what it ran in: "auto" is bf16 only where bf16 GEMMs are fast, see
nanochat/optim/muon.py). The header names the CPU model and the kernel ISA (NANOCHAT_ISA
pins it, and with it the 8-bit kernels and "auto").
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

CONFIGS = ("adamw_fp32", "muon_fp32", "lion_fp32", "adamw_8bit", "muon_8bit", "lion_8bit",
           "galore2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per (model, optimizer)")
    p.add_argument("--models", default="nano_125m,small_560m", help="comma-separated model configs")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch + kernel threads (0: all)")
    p.add_argument("--muon-rest", default="lion", choices=("lion", "adamw"),
                   help="optimizer of the non-matrix parameters in muon_* (default lion)")
    p.add_argument("--ns-dtype", default="auto",
                   help="comma-separated Newton-Schulz dtypes for muon_* rows "
                        "(auto, float32, bfloat16; default auto)")


def overrides(name: str, d_model: int, muon_rest: str) -> list[str]:
    algo, state = name.split("_") if name != "galore2" else ("adamw", "fp32")
    sets = [f"optim.name={algo}", f"optim.state={state}"]
    sets.append(f"optim.rest={muon_rest if algo == 'muon' else algo}")
    if name == "galore2":
        sets += ["optim.galore.enabled=true", f"optim.galore.rank={max(1, d_model // 4)}"]
    return sets


def _peers(model_name: str, model, grads) -> list[dict]:
    """bitsandbytes / torchao 8-bit AdamW where importable and runnable on this CPU."""
    out = []
    for label, load in (("bitsandbytes.optim.AdamW8bit", _bnb), ("torchao AdamW8bit", _torchao)):
        try:
            cls = load()
        except Exception as e:  # not installed, or no CPU support
            out.append({"peer": label, "model": model_name,
                        "skipped": f"{type(e).__name__}: {e}"[:200]})
            continue
        try:
            opt = cls(model.parameters(), lr=1e-4)
            out.append({"peer": label, "model": model_name, **_time_opt(opt, model, grads, 2)})
        except Exception as e:
            out.append({"peer": label, "model": model_name,
                        "skipped": f"{type(e).__name__}: {e}"[:200]})
        finally:
            opt = None
            gc.collect()
    return out


def _bnb():
    import bitsandbytes as bnb  # noqa: F401 - optional peer

    return bnb.optim.AdamW8bit


def _torchao():
    from torchao.optim import AdamW8bit

    return AdamW8bit


def _time_opt(opt, model, grads, steps: int) -> dict:
    from nanochat.optim import state_bytes

    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()  # warm-up: allocates the state
    secs = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        secs.append(time.perf_counter() - t0)
    return {"state_bytes": state_bytes(opt), "step_seconds": statistics.median(secs)}


def _check(args: argparse.Namespace) -> list[str]:
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise ValueError(f"--configs: unknown {', '.join(unknown)}; valid: {', '.join(CONFIGS)}")
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    bad = sorted(set(args.ns_dtype.split(",")) - {"auto", "float32", "bfloat16"})
    if bad:
        raise ValueError(f"--ns-dtype: unknown {', '.join(bad)}; valid: auto, float32, bfloat16")
    return configs


def run(args: argparse.Namespace):
    import torch

    from nanochat.config import apply_overrides, load_config
    from nanochat.model.build import build_model
    from nanochat.ops import ternary
    from nanochat.optim import build_optimizer
    from nanochat.optim.muon import ns_dtype

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        ternary.set_num_threads(args.threads)
    configs = _check(args)
    for model_name in args.models.split(","):
        cfg = load_config(model_name)
        model = build_model(cfg, bitlinear="torch")
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]
        n_params = sum(p.numel() for p in model.parameters())
        results: dict[str, dict] = {}
        base = None
        runs = [(name, ns) for name in (configs if "adamw_fp32" in configs
                                        else ["adamw_fp32", *configs])
                for ns in (args.ns_dtype.split(",") if name.startswith("muon") else [None])]
        for name, ns in runs:
            sets = overrides(name, cfg.model.d_model, args.muon_rest)
            run_cfg = apply_overrides(cfg, sets + ([f"optim.muon.ns_dtype={ns}"] if ns else []))
            opt = build_optimizer(model, run_cfg, log=lambda *_: None)
            r = _time_opt(opt, model, grads, args.steps)
            del opt
            gc.collect()
            if name == "adamw_fp32":
                base = r["state_bytes"]
            key = f"{name}/{ns}" if ns else name
            results[key] = r
            if name not in configs:
                continue
            row = {"optimizer": name, "model": model_name, "params": n_params, **r,
                   "bytes_per_param": r["state_bytes"] / n_params,
                   "ratio_vs_adamw": r["state_bytes"] / base, "threads": torch.get_num_threads(),
                   "isa": ternary.active_isa()}
            if ns:
                row["ns_dtype"] = ns
                row["ns_dtype_resolved"] = str(ns_dtype(ns, torch.device("cpu"))).split(".")[-1]
            fp32 = key.replace("_8bit", "_fp32")
            if name.endswith("_8bit") and fp32 in results:
                row["step_vs_fp32"] = r["step_seconds"] / results[fp32]["step_seconds"]
            yield row
        yield from _peers(model_name, model, grads)
        for p in model.parameters():
            p.grad = None
        del model, grads
        gc.collect()


def main(args: argparse.Namespace) -> int:
    _check(args)
    if not args.json:
        print(f"{'model':>10} {'optimizer':>11} {'NS dtype':>16} {'state':>10} {'B/param':>8} "
              f"{'vs adamw':>9} {'step':>9} {'8bit/fp32':>9}")
    for r in run(args):
        if args.json:
            print(json.dumps(r), flush=True)
        elif "peer" in r:
            what = (r.get("skipped")
                    or f"{r['state_bytes'] / 2**20:.0f} MiB, {r['step_seconds']:.3f} s")
            print(f"{r['model']:>10} peer {r['peer']}: {what}", flush=True)
        else:
            ratio = f"{r['step_vs_fp32']:.2f}x" if "step_vs_fp32" in r else ""
            ns = (f"{r['ns_dtype']}->{r['ns_dtype_resolved']}" if "ns_dtype" in r else "")
            print(f"{r['model']:>10} {r['optimizer']:>11} {ns:>16} "
                  f"{r['state_bytes'] / 2**20:>7.1f}MiB "
                  f"{r['bytes_per_param']:>8.3f} {r['ratio_vs_adamw']:>8.1%} "
                  f"{r['step_seconds']:>8.3f}s {ratio:>9}", flush=True)
    return 0
