"""nanochat bench e3: the seed's five training setups on the same data and seed, and a
report that puts each of the seed's claims next to what this run measured.

    nanochat bench e3                          # CPU default: tiny, 300 steps, ~25 min on 2 cores
    nanochat bench e3 --steps 100 --out runs/e3-quick
    nanochat bench e3 --preset gpu             # nano_125m-sized, on a CUDA device

The setups are configs/e3/{baseline,mtp_only,muon_8bit,galore2,full}.toml (each also trains
alone with `nanochat train --config`). Each runs `nanochat train`'s own loop in a fresh child
process (so its peak memory is its own) on the prepared Python-stdlib corpus (or --data), one
after another. Then a Collider timing (the same model, unfiltered vs sparsity 0.35, A/B
rounds, nanochat bench collider's measurement) gives the backward-time figure.

--out DIR (default runs/e3-<time>) receives:
    results.json          every number below, per setup, plus the claims
    REPORT.md             the table, the claims with verdicts, the plots
    loss_vs_tokens.png    held-out loss against training tokens
    loss_vs_time.png      held-out loss against training time (train_s: steps only)
    runs/<setup>/         each run's checkpoint, metrics.jsonl and TensorBoard events

Held-out loss is the next-token head's (MTP heads are not scored). Tokens/s, step time and
data-wait come from the trainer's logged windows after the first (warm-up) one; peak memory
is the child's max RSS on CPU (max allocated on CUDA); optimizer-state bytes are the real
state tensors (nanochat.optim.state_bytes).

Verdict rule for a claimed reduction or gain c (the lower end of a range): "confirmed" when
the measured value is at least c - 0.05, "partly" when it is at least c / 2 (and > 0),
"refuted" otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

SETUPS = ("baseline", "mtp_only", "muon_8bit", "galore2", "full")
DESCRIPTIONS = {
    "baseline": "AdamW, fp32 state",
    "mtp_only": "baseline + MTP (4 heads)",
    "muon_8bit": "8-bit Muon (matrices) + 8-bit AdamW (rest)",
    "galore2": "AdamW with GaLore 2 (rank d/4)",
    "full": "MTP + 8-bit Muon/AdamW + Collider",
}
# The gpu preset: nano_125m's shape (configs/models/nano_125m.toml) and a batch and length
# that keep an H100 busy; the features of each setup stay as its file sets them.
GPU_PRESET = ["train.device=cuda", "train.batch_size=32", "train.seq_len=1024",
              "train.max_steps=2000", "train.eval_every=200", "train.eval_tokens=262144",
              "schedule.warmup_steps=100"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="one JSON object per setup, then one per claim")
    p.add_argument("--steps", type=int, help="training steps of every setup (default: the "
                   "files' 300; gpu preset 2000)")
    p.add_argument("--out", help="report folder (default runs/e3-<time>)")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the files as written (tiny); gpu: nano_125m-sized on CUDA")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(SETUPS))
    p.add_argument("--data", help="prepared data dir (default: prepare the Python stdlib)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a config value in every setup (repeatable)")
    p.add_argument("--collider-rounds", type=int, default=5,
                   help="A/B rounds of the Collider backward timing (0 skips it)")


# ---- configs ---------------------------------------------------------------------------


def setup_configs(names, preset: str, steps: int | None, overrides: list[str]) -> dict:
    """{name: RunConfig} of the chosen setups with the preset and overrides applied."""
    from nanochat import config as C

    sets = []
    if preset == "gpu":
        nano = C.load_config("nano_125m").model
        sets += [f"model.{k}={v!r}".replace("'", '"') for k, v in (
            ("vocab_size", nano.vocab_size), ("d_model", nano.d_model),
            ("n_layers", nano.n_layers), ("n_heads", nano.n_heads),
            ("n_kv_heads", nano.n_kv_heads), ("ffn_hidden", nano.ffn_hidden),
            ("max_seq_len", nano.max_seq_len))] + GPU_PRESET
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    return {n: C.load_config(str(C.CONFIG_DIR / "e3" / f"{n}.toml"), sets + list(overrides))
            for n in names}


# ---- one training run per child process ------------------------------------------------


def _train_child(cfg_dict: dict, data_dir: str, run_dir: str, q) -> None:
    sys.stdout = sys.stderr  # the trainer's eval lines: keep stdout for the results (--json)
    try:
        from nanochat.config import from_dict
        from nanochat.train.loop import train

        cfg = from_dict(cfg_dict)
        r = train(cfg, Path(data_dir), Path(run_dir), progress_bar=True, log=lambda *a: None)
        q.put({"step": r.step, "val_loss": r.val_loss, "val_bpb": r.val_bpb})
    except BaseException as e:  # report, don't hang the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def _in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    r = q.get()
    p.join()
    if "error" in r:
        raise RuntimeError(r["error"])
    return r


def summarize_run(metrics_path: Path, tokens_per_step: int) -> dict:
    """The table's numbers and the loss curve of one run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_path).open() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    if not train_rows or not evals:
        raise ValueError(f"{metrics_path}: no training or eval lines")
    steady = train_rows[1:] or train_rows  # the first window holds warm-up
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    spans = [(r["train_s"] - p["train_s"], r.get("data_wait_s", 0.0))
             for p, r in zip(train_rows, train_rows[1:])] or [(train_rows[0]["train_s"], 0.0)]
    wait = sum(w for _, w in spans) / max(sum(s for s, _ in spans), 1e-12)
    curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
              "train_s": r["train_s"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]}
             for r in evals]
    return {
        "steps": train_rows[-1]["step"], "tokens": train_rows[-1]["step"] * tokens_per_step,
        "final_val_loss": curve[-1]["val_loss"], "final_val_bpb": curve[-1]["val_bpb"],
        "tokens_per_s": tps, "step_seconds": tokens_per_step / tps,
        "train_seconds": curve[-1]["train_s"],
        "peak_memory_bytes": max(r.get("peak_memory_bytes", 0) for r in train_rows),
        "optim_state_bytes": train_rows[-1].get("optim_state_bytes"),
        "data_wait_fraction": wait, "curve": curve,
    }


# ---- claims ------------------------------------------------------------------------------


def tokens_to_reach(curve: list[dict], target: float) -> float | None:
    """Training tokens at which a held-out curve first reaches `target` (linear in between
    evals), or None if it never does."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return float(p["tokens"])
            f = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev["tokens"] + f * (p["tokens"] - prev["tokens"])
        prev = p
    return None


def verdict(measured: float | None, claim: float) -> str:
    if measured is None or not math.isfinite(measured) or measured <= 0:
        return "refuted"
    if measured >= claim - 0.05:
        return "confirmed"
    return "partly" if measured >= claim / 2 else "refuted"


def _reduction(results: dict, name: str, key: str) -> float | None:
    base, other = results.get("baseline"), results.get(name)
    if not base or not other or not base.get(key) or other.get(key) is None:
        return None
    return 1.0 - other[key] / base[key]


def claims(results: dict, collider: dict | None) -> list[dict]:
    """Each seed claim with the measured figure and a verdict (module doc's rule)."""
    out = []

    def add(claim, value, measured, how, note=""):
        out.append({"claim": claim, "claimed": value, "measured": measured,
                    "verdict": "not measured" if measured is None and how is None
                    else verdict(measured, value), "how": how or "", "note": note})

    base, mtp = results.get("baseline"), results.get("mtp_only")
    if base and mtp:
        reach = tokens_to_reach(mtp["curve"], base["final_val_loss"])
        eff = None if reach is None else 1.0 - reach / base["tokens"]
        note = (f"mtp_only reached baseline's final held-out loss {base['final_val_loss']:.4f} "
                f"after {reach:,.0f} of baseline's {base['tokens']:,} tokens" if reach is not None
                else f"mtp_only never reached baseline's final held-out loss "
                     f"{base['final_val_loss']:.4f} (its own: {mtp['final_val_loss']:.4f})")
        add("MTP: 15-20% data efficiency", 0.15, eff,
            "1 - tokens mtp_only needs to reach baseline's final held-out loss / baseline's "
            "tokens", note)
    else:
        add("MTP: 15-20% data efficiency", 0.15, None, None, "baseline or mtp_only not run")
    if collider:
        red = 1.0 - collider["backward_ratio"]
        add("Collider: 35% faster backprop", 0.35, red,
            f"1 - backward time at sparsity {collider['sparsity']} / unfiltered "
            f"(median of {collider['rounds']} A/B rounds, same model and batch)",
            f"whole step: {1.0 - collider['step_ratio']:+.1%} time saved")
    else:
        add("Collider: 35% faster backprop", 0.35, None, None, "timing skipped")
    add("8-bit Muon: 86% less optimizer memory", 0.86,
        _reduction(results, "muon_8bit", "optim_state_bytes"),
        "1 - optimizer-state bytes of muon_8bit / baseline (AdamW fp32)")
    add("GaLore 2: 50-65% less optimizer memory", 0.50,
        _reduction(results, "galore2", "optim_state_bytes"),
        "1 - optimizer-state bytes of galore2 / baseline")
    waits = [r["data_wait_fraction"] for r in results.values()]
    add("Async loader: 90%+ utilization", 0.90, 1.0 - max(waits) if waits else None,
        "1 - the largest data-wait fraction of any setup (time steps waited for a batch)")
    peak = _reduction(results, "full", "peak_memory_bytes")
    add("~95% combined memory reduction", 0.95,
        _reduction(results, "full", "optim_state_bytes"),
        "1 - optimizer-state bytes of full / baseline",
        "" if peak is None else
        f"peak process memory of full vs baseline: {abs(peak):.1%} "
        f"{'less' if peak >= 0 else 'more'} (weights, activations and the runtime dominate "
        "at this size)")
    return out


# ---- report --------------------------------------------------------------------------------


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, label, name in (("tokens", "training tokens", "loss_vs_tokens.png"),
                             ("train_s", "training time (s)", "loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for setup, r in results.items():
            ax.plot([p[key] for p in r["curve"]], [p["val_loss"] for p in r["curve"]],
                    marker="o", ms=3, label=f"{setup}: {DESCRIPTIONS[setup]}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"E3: held-out loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        files.append(name)
    return files


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def report_markdown(meta: dict, results: dict, claim_rows: list[dict], plots: list[str]) -> str:
    lines = [
        "# E3 benchmark report", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Date: {meta['date']}; preset {meta['preset']}, {meta['steps']} steps of "
        f"{meta['tokens_per_step']:,} tokens per setup, seed {meta['seed']}.", "",
        "| setup | what | held-out loss | bits/byte | tokens/s | step time | peak memory (MiB)"
        " | optimizer state (MiB) | data wait |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {DESCRIPTIONS[name]} | {r['final_val_loss']:.4f} | "
            f"{r['final_val_bpb']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_seconds'] * 1e3:,.0f} ms | {_mib(r['peak_memory_bytes'])} | "
            f"{_mib(r['optim_state_bytes'])} | {r['data_wait_fraction']:.1%} |")
    lines += ["", "## The seed's claims", "",
              "| claim | measured | verdict | how | note |", "|---|---:|---|---|---|"]
    for c in claim_rows:
        m = "-" if c["measured"] is None else f"{c['measured']:.1%}"
        lines.append(f"| {c['claim']} | {m} | **{c['verdict']}** | {c['how']} | {c['note']} |")
    lines += ["", "Verdicts: confirmed when the measured figure is within 5 points of the claim's "
              "lower end or better, partly when it reaches half of it, refuted otherwise. "
              "Small models and short runs are not the seed's setting (it claims its figures "
              "at scale): a refuted claim here says what this size shows, not what a large run "
              "would.", ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def _machine() -> str:
    import platform

    import torch

    from nanochat._core import core

    info = core().info()
    feats = [k for k, v in info.get("features", {}).items() if v]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"CPU features {', '.join(feats) or '-'}; {dev}; torch {torch.__version__}")


def run(args: argparse.Namespace):
    names = [n for n in (args.only.split(",") if args.only else SETUPS) if n]
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        raise ValueError(f"--only: unknown setup(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SETUPS)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    try:
        import matplotlib  # noqa: F401  (fail before the long runs, not after)
    except ImportError:
        raise RuntimeError("bench e3 draws its plots with matplotlib: pip install matplotlib "
                           '(or pip install "nanochat-ternary[bench]")') from None
    cfgs = setup_configs(names, args.preset, args.steps, args.set)
    first = next(iter(cfgs.values()))
    out = Path(args.out) if args.out else Path("runs") / time.strftime("e3-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data_dir = Path(args.data)
    else:
        from nanochat.data import corpus

        data_dir = Path(corpus.prepare(None, None, first.model.vocab_size,
                                       first.data.val_fraction, first.data.extensions).out_dir)

    results = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        print(f"[{i + 1}/{len(cfgs)}] {name}: {DESCRIPTIONS[name]}", file=sys.stderr, flush=True)
        run_dir = out / "runs" / name
        _in_child(_train_child, cfg.to_dict(), str(data_dir), str(run_dir))
        t = cfg.train
        r = summarize_run(run_dir / "metrics.jsonl", t.batch_size * t.seq_len * t.grad_accum)
        results[name] = {"setup": name, "description": DESCRIPTIONS[name], **r}
        yield {"part": "setup", **{k: v for k, v in results[name].items() if k != "curve"}}

    collider = None
    if args.collider_rounds > 0:
        print("Collider backward timing (unfiltered vs sparsity 0.35)", file=sys.stderr, flush=True)
        collider = _in_child(_collider_child, first.to_dict(), args.collider_rounds)
        yield {"part": "collider_timing", **collider}
    claim_rows = claims(results, collider)
    for c in claim_rows:
        yield {"part": "claim", **c}

    plots = plot(results, out)
    meta = {"command": "nanochat bench e3 " + " ".join(sys.argv[3:]) if sys.argv[1:3] == [
                "bench", "e3"] else " ".join(sys.argv),
            "machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "preset": args.preset, "steps": first.train.max_steps, "seed": first.train.seed,
            "tokens_per_step": first.train.batch_size * first.train.seq_len
            * first.train.grad_accum, "data": str(data_dir)}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "setups": results, "collider_timing": collider, "claims": claim_rows},
        indent=2) + "\n")
    (out / "REPORT.md").write_text(report_markdown(meta, results, claim_rows, plots))
    print(f"report: {out / 'REPORT.md'}", file=sys.stderr, flush=True)


def _collider_child(cfg_dict: dict, rounds: int, q) -> None:
    try:
        import types

        from nanochat.bench import collider as bc
        from nanochat.config import from_dict

        cfg = from_dict(cfg_dict)
        args = types.SimpleNamespace(batch=cfg.train.batch_size, seq=cfg.train.seq_len,
                                     rounds=rounds, sparsity=0.35, bitlinear=cfg.train.bitlinear,
                                     backward=cfg.train.bitlinear_backward,
                                     device=cfg.train.device)
        rows = bc.timing_rows(cfg, "e3", args)
        col = next(r for r in rows if r["variant"] == "collider")
        q.put({"sparsity": 0.35, "rounds": rounds, "backward_ratio": col["backward_ratio"],
               "step_ratio": col["step_ratio"], "kept_fraction": col["kept_fraction"],
               "rows": rows})
    except BaseException as e:
        q.put({"error": f"{type(e).__name__}: {e}"})


def main(args: argparse.Namespace) -> int:
    for m in run(args):
        if args.json:
            print(json.dumps(m), flush=True)
        elif m["part"] == "setup":
            print(f"{m['setup']:>10}: held-out loss {m['final_val_loss']:.4f}, bits/byte "
                  f"{m['final_val_bpb']:.4f}, {m['tokens_per_s']:,.0f} tokens/s, optimizer state "
                  f"{_mib(m['optim_state_bytes'])} MiB, peak {_mib(m['peak_memory_bytes'])} MiB",
                  flush=True)
        elif m["part"] == "claim":
            v = "-" if m["measured"] is None else f"{m['measured']:.1%}"
            print(f"{m['claim']:<42} measured {v:>7}  {m['verdict']}", flush=True)
    return 0
