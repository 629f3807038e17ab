"""nanochat bench decode: prefill and decode tokens/s, our C++ engine vs llama.cpp, same GGUF.

For each model config (random weights are fine for speed) it exports one GGUF (TQ2_0
matrices, Q8_0 tied embedding/head; cached under ~/.cache/nanochat/bench, named by a hash of
the config's content, so an edited config gets a new file) and, for each
thread count, alternates rounds of (ours, llama.cpp) in this one process (A B A B; medians):

  prefill: one batch of --prompt random tokens (default 128) from an empty cache
  decode:  --tokens single-token steps after it (default 64), greedy

Ours is timed by the engine's own counters (Session.generate: prefill and decode seconds);
llama.cpp by its own perf counters (llama_perf_context: t_p_eval_ms / n_p_eval and
t_eval_ms / n_eval), never by a Python loop around it, so its per-token Python overhead
does not count against it. llama.cpp needs `pip install llama-cpp-python`; without it only
our numbers are printed. The decode rate is also given as weight bytes read per second
against this machine's read bandwidth at the same thread count, probed in every round
just before our run (the machine's bandwidth drifts by a third over minutes here): the
fraction is the median of the rounds' ratios.

A second table breaks our decode token down by the engine's own clocks: the ternary
matrix products and the LM head (each also as weight bytes/s against the probe),
attention over the KV cache, and the rest (norms, RoPE, quantization, residual adds,
sampling). With --json these are the nanochat rows' *_ms, *_bytes_per_s and
*_bw_fraction fields.

A config that llama.cpp's bitnet graph cannot run (exported as architecture "nanochat") is
compared on its dense equivalent when only its sliding-window attention stands in the way
(small_560m's "SSSL" runs as pattern=L: the same weights, every layer full attention; the row
says so in its `variant`), and benchmarked on our engine alone otherwise (MoE, mHC, MTP).
If llama.cpp fails to load or run a file, that is reported and our row stands alone.

    nanochat bench decode [--configs nano_125m,small_560m] [--threads 1,2] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path

CACHE = Path(os.environ.get("NANOCHAT_CACHE", Path.home() / ".cache" / "nanochat")) / "bench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    p.add_argument("--configs", default="nano_125m,small_560m",
                   help="comma-separated model configs (default nano_125m,small_560m)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (default 128)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--embd", default="q8_0", choices=("q8_0", "f16"),
                   help="embedding/head type of the benchmark files (default q8_0)")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if installed")


def bench_model(config: str, for_llama: bool):
    """(model config, variant label) to benchmark for `config`: the config itself, or, when
    llama.cpp is to run it and only sliding-window attention keeps it off llama.cpp's bitnet
    graph, its dense equivalent (pattern "L"). variant is None when the config runs as is."""
    from nanochat.config import load_config
    from nanochat.export import architecture

    cfg = load_config(config).model
    if not for_llama or architecture(cfg)[0] == "bitnet":
        return cfg, None
    dense = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, pattern="L"))
    if architecture(dense)[0] == "bitnet":
        return dense, "dense (attention.pattern=L)"
    return cfg, None


def model_file(config: str, embd: str, log=print, cfg=None) -> Path:
    """A GGUF of `config` (or of the model config `cfg` given for it) with random weights,
    cached under a name that hashes the config's content: what both engines load."""
    import torch

    from nanochat.config import RunConfig, load_config
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.model.build import build_model

    cfg = cfg if cfg is not None else load_config(config).model
    key = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    path = CACHE / f"{config}-{key.hexdigest()[:12]}-tq2_0-{embd}.gguf"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"[bench decode] exporting random-weight {config} to {path} (once)")
    # A tokenizer trained on a few lines, padded with <|reserved_N|> fillers to the size
    # of the config's vocabulary: speed does not depend on what the tokens mean.
    tok = Tokenizer.train(["def main():\n    return 0\n" * 64], cfg.vocab_size)
    with torch.no_grad():
        model = build_model(RunConfig(model=cfg), bitlinear="torch")
    export_gguf(model, tok, path, weight_type="tq2_0", embd_type=embd, name=f"bench-{config}")
    return path


def _ours(path: Path, threads: int, prompt: list[int], n_decode: int) -> dict:
    from nanochat.infer.engine import Engine
    from nanochat.ops import ternary

    ternary.set_num_threads(threads)
    eng = Engine(str(path), n_ctx=len(prompt) + n_decode + 8)
    r = eng.complete(prompt, max_tokens=n_decode + 1, temperature=0.0, stop_at_eos=False)
    steps = r["decode_steps"]
    out = {"prefill_tokens_per_s": r["prefill_tokens_per_s"],
           "decode_tokens_per_s": r["decode_tokens_per_s"],
           "decode_steps": steps, "info": eng.info}
    for part in ("ternary", "head", "attention"):
        out[f"{part}_ms"] = r[f"decode_{part}_seconds"] / steps * 1e3
    out["other_ms"] = r["decode_seconds"] / steps * 1e3 - sum(
        out[f"{p}_ms"] for p in ("ternary", "head", "attention"))
    return out


def _llama(llama_cpp, path: Path, threads: int, prompt: list[int], n_decode: int) -> dict:
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + n_decode + 8, n_batch=512,
                          n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    ctx = llm._ctx.ctx

    def step(ids: list[int]) -> int:
        llm.eval(ids)
        llama_cpp.llama_synchronize(ctx)  # llama.cpp books a decode's time when it syncs
        return int(llm.scores[llm.n_tokens - 1].argmax())

    # A fresh context: its counters hold exactly this prefill (one batch of len(prompt)).
    tok = step(prompt)
    pre = llama_cpp.llama_perf_context(ctx)
    prefill = pre.n_p_eval / (pre.t_p_eval_ms / 1e3)
    # llama.cpp books the first single-token decode after a prompt as prompt time, and its
    # counters read max(1, n): take the decode rate as a difference after two warm steps.
    for _ in range(2):
        tok = step([tok])
    a = llama_cpp.llama_perf_context(ctx)
    for _ in range(n_decode):
        tok = step([tok])
    b = llama_cpp.llama_perf_context(ctx)
    llm.close()
    if pre.n_p_eval != len(prompt) or b.n_eval - a.n_eval != n_decode:
        raise RuntimeError(f"llama.cpp perf counters booked {pre.n_p_eval} prompt and "
                           f"{b.n_eval - a.n_eval} decode tokens, expected {len(prompt)} "
                           f"and {n_decode}")
    return {"prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": n_decode / ((b.t_eval_ms - a.t_eval_ms) / 1e3),
            "decode_steps": n_decode}


def run(args: argparse.Namespace, log=print):
    import random

    from nanochat._core import core

    llama_cpp = None
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F811
        except ImportError:
            log("[bench decode] llama-cpp-python is not installed: ours only "
                "(pip install llama-cpp-python)")
    threads = [int(t) for t in args.threads.split(",")]
    for config in args.configs.split(","):
        from nanochat.export import architecture

        cfg, variant = bench_model(config, llama_cpp is not None)
        path = model_file(config, args.embd, log, cfg)
        llama = llama_cpp
        if llama is not None and architecture(cfg)[0] != "bitnet":
            log(f"[bench decode] {config}: llama.cpp cannot run this architecture "
                f"(general.architecture = nanochat, docs/gguf.md): our engine only")
            llama = None
        rng = random.Random(0)
        prompt = [0] + [rng.randrange(5, 261) for _ in range(args.prompt - 1)]  # bos + bytes
        for t in threads:
            samples: dict[str, list[dict]] = {"nanochat": [], "llama.cpp": []}
            probes: list[float] = []
            for _ in range(args.rounds):
                probes.append(core().measure_read_bandwidth(1 << 30, t, 3) * 1e9)
                samples["nanochat"].append(_ours(path, t, prompt, args.tokens))
                if llama is not None:
                    try:
                        samples["llama.cpp"].append(_llama(llama, path, t, prompt, args.tokens))
                    except Exception as e:  # noqa: BLE001 - any failure of the other engine
                        log(f"[bench decode] {config}: llama.cpp failed on {path} ({e}): "
                            "our engine only")
                        llama, samples["llama.cpp"] = None, []
            info = samples["nanochat"][0]["info"]
            med = {eng: {k: statistics.median(s[k] for s in ss)
                         for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
                   for eng, ss in samples.items() if ss}
            for eng, m in med.items():
                ss = samples[eng]
                row = {"config": config, "variant": variant, "engine": eng, "threads": t,
                       "prompt": args.prompt,
                       "decode_steps": args.tokens, "embd": args.embd, **m,
                       "weight_bytes_per_token": info["weight_bytes"],
                       "read_bandwidth_bytes_per_s": statistics.median(probes),
                       "bandwidth_fraction": statistics.median(
                           s["decode_tokens_per_s"] * info["weight_bytes"] / bw
                           for s, bw in zip(ss, probes))}
                if eng == "nanochat":
                    row.update(_breakdown(ss, probes, info))
                if "llama.cpp" in med:
                    ref = med["llama.cpp"]
                    row["prefill_vs_llama"] = (m["prefill_tokens_per_s"]
                                               / ref["prefill_tokens_per_s"])
                    row["decode_vs_llama"] = (m["decode_tokens_per_s"]
                                              / ref["decode_tokens_per_s"])
                yield row


def _breakdown(ss: list[dict], probes: list[float], info: dict) -> dict:
    """Medians over rounds of a decode token's parts (ms), and the ternary matrices' and the
    head's weight bytes/s over their own time, against the same round's probe."""
    out = {f"{p}_ms": statistics.median(s[f"{p}_ms"] for s in ss)
           for p in ("ternary", "head", "attention", "other")}
    for part, nbytes in (("ternary", info["ternary_bytes"]), ("head", info["head_bytes"])):
        rates = [nbytes / (s[f"{part}_ms"] / 1e3) for s in ss]
        out[f"{part}_bytes_per_s"] = statistics.median(rates)
        out[f"{part}_bw_fraction"] = statistics.median(r / bw for r, bw in zip(rates, probes))
    return out


def _print_breakdown(rows: list[dict]) -> None:
    print("\nwhere a nanochat decode token goes: ms per token and share of it; for the ternary "
          "matrices and the head also their weight bytes / their time, and that as a "
          "fraction of the read probe")
    print(f"{'config':>11} {'thr':>3} {'total':>6} | {'ternary':>7} {'share':>5} {'GB/s':>5} "
          f"{'of bw':>5} | {'head':>5} {'share':>5} {'GB/s':>5} {'of bw':>5} | "
          f"{'attention':>9} {'share':>5} | {'other':>5} {'share':>5}")
    for r in rows:
        total = sum(r[f"{p}_ms"] for p in ("ternary", "head", "attention", "other"))

        def part(p: str, width: int) -> str:
            return f"{r[p + '_ms']:>{width}.2f} {r[p + '_ms'] / total:>5.0%}"

        def rate(p: str) -> str:
            return f"{r[p + '_bytes_per_s'] / 1e9:>5.1f} {r[p + '_bw_fraction']:>5.0%}"

        print(f"{r['config']:>11} {r['threads']:>3} {total:>6.2f} | {part('ternary', 7)} "
              f"{rate('ternary')} | {part('head', 5)} {rate('head')} | {part('attention', 9)} | "
              f"{part('other', 5)}")


def main(args: argparse.Namespace) -> int:
    if not args.json:
        print(f"{'config':>11} {'engine':>9} {'thr':>3} {'prefill tok/s':>13} {'decode tok/s':>12} "
              f"{'bw frac':>7} {'prefill vs llama':>16} {'decode vs llama':>15}")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    ours, variants = [], {}
    for r in run(args, log):
        if r["variant"]:
            variants[r["config"]] = r["variant"]
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        if r["engine"] == "nanochat":
            ours.append(r)
        pv = f"{r['prefill_vs_llama']:.2f}x" if "prefill_vs_llama" in r else "-"
        dv = f"{r['decode_vs_llama']:.2f}x" if "decode_vs_llama" in r else "-"
        name = r["config"] + ("*" if r["variant"] else "")
        print(f"{name:>11} {r['engine']:>9} {r['threads']:>3} "
              f"{r['prefill_tokens_per_s']:>13.1f} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['bandwidth_fraction']:>7.0%} {pv:>16} {dv:>15}", flush=True)
    for config, variant in variants.items():
        print(f"* {config}: benchmarked as its {variant}, which llama.cpp can run")
    if ours:
        _print_breakdown(ours)
    return 0
