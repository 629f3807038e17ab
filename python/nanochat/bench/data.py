"""nanochat bench data: tokenization throughput of `nanochat data prepare` on JSON lines
(nanochat/data/records.py: read, parse, tokenize in worker processes, write the shards)
with 1 and 2 workers, vs HF tokenizers' own `encode_batch` of the same texts with 1 and 2
rayon threads, one run.

Texts: the .py files of this Python's standard library (as `data prepare` finds them with
no --source), written as one JSONL record each until --mb MB; the tokenizer (vocab --vocab)
is trained once on them and given to every prepare, so only tokenization is timed. Each
prepare runs into a fresh directory (no cache) and its wall time includes starting the
worker processes and writing the shards; tokens/s counts every token written (<|bos|>
included). The HF baseline runs in a fresh process per thread count (RAYON_NUM_THREADS is
read once per process), encodes the same texts (each record's text as parsed) in one
`encode_batch` call, and counts the same tokens (ids + one <|bos|> per text).
`per_core` = tokens/s / workers (or threads); `ratio_per_core` = prepare's per_core over
HF's with 1 thread (the target is >= 0.9). The best of --repeats runs is kept for each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    p.add_argument("--mb", type=float, default=8, help="MB of text (default 8)")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary (4096)")
    p.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement, best kept")


def _write_corpus(dest: Path, limit: float) -> list[str]:
    from nanochat.data import corpus

    files = corpus.collect(corpus.default_sources(), [".py"], 0.05)
    texts, n = [], 0
    with open(dest, "w", encoding="utf-8") as f:
        for d in files.train + files.val:
            f.write(json.dumps({"text": d.text}) + "\n")
            texts.append(d.text)
            n += d.nbytes
            if n >= limit:
                break
    return texts


def _hf_child(tok_dir: str, corpus_file: str, threads: int, repeats: int, q) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # before tokenizers starts its pool
    from nanochat.data.tokenizer import Tokenizer

    hf = Tokenizer.load(tok_dir)._hf
    with open(corpus_file, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        enc = hf.encode_batch(texts, add_special_tokens=False)
        best = min(best, time.perf_counter() - t0)
    q.put((sum(len(e.ids) + 1 for e in enc), best))


def _hf(tok_dir: Path, corpus_file: Path, threads: int, repeats: int) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_hf_child, args=(str(tok_dir), str(corpus_file), threads, repeats, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(args: argparse.Namespace) -> int:
    from nanochat.bench import cpu_model
    from nanochat.data import corpus
    from nanochat.data.tokenizer import Tokenizer

    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-data-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src" / "corpus.jsonl"
        src.parent.mkdir()
        texts = _write_corpus(src, args.mb * 1e6)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        Tokenizer.train(texts, args.vocab).save(tmp / "tok")
        del texts
        hf = {t: _hf(tmp / "tok", src, t, args.repeats) for t in sorted({1, *workers})}
        for w in workers:
            best, ntok = float("inf"), 0
            for k in range(args.repeats):
                t0 = time.perf_counter()
                m = corpus.prepare([src], tmp / f"out{w}_{k}", args.vocab, 0.05,
                                   progress=False, tokenizer=tmp / "tok",
                                   record_options={"workers": w})
                best = min(best, time.perf_counter() - t0)
                ntok = m.train.tokens + m.val.tokens
            rows.append({"variant": "prepare", "workers": w, "tokens": ntok, "seconds": best,
                         "tokens_per_s": ntok / best, "per_core": ntok / best / w})
        for t, (ntok, s) in hf.items():
            rows.append({"variant": "hf_encode_batch", "threads": t, "tokens": ntok,
                         "seconds": s, "tokens_per_s": ntok / s, "per_core": ntok / s / t})
    base = hf[1][0] / hf[1][1]
    for r in rows:
        r["ratio_per_core"] = r["per_core"] / base
        r.update(cpu=cpu_model(), cpus=os.cpu_count(), mb=round(nbytes / 1e6, 1),
                 vocab=args.vocab)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cpus; {nbytes / 1e6:.1f} MB of stdlib .py "
          f"as JSONL, vocab {args.vocab}, best of {args.repeats}")
    print(f"{'variant':<18}{'procs':>6}{'tokens':>12}{'s':>8}{'tokens/s':>12}{'per core':>12}"
          f"{'vs HF/core':>12}")
    for r in rows:
        n = r.get("workers", r.get("threads"))
        print(f"{r['variant']:<18}{n:>6}{r['tokens']:>12,}{r['seconds']:>8.2f}"
              f"{r['tokens_per_s']:>12,.0f}{r['per_core']:>12,.0f}{r['ratio_per_core']:>11.2f}x")
    return 0
