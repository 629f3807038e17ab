"""Held-out bits per byte of a run directory (torch model) or a GGUF file (C++ engine).

    nanochat eval bpb --model RUN --data DIR [--max-tokens N] [--seq-len T] [--json]
    nanochat eval bpb --model model.gguf --data ~/src/held-out --ext .py

--data is a prepared data directory (`nanochat data prepare`; its val split is scored) or a
folder / file of text, tokenized here the way `prepare` does (<|bos|> before each document).
The windows are the trainer's (nanochat/data/loader.py eval_batches: non-overlapping, every
target once, the tail that does not fill a window left out) and the convention is
nanochat/data/dataset.py's: nats over all targets, <|bos|> targets included, divided by
ln 2 times the targets' UTF-8 bytes. With --seq-len train.seq_len and --max-tokens
train.eval_tokens on the run's own data directory it is the trainer's val_bpb
(tests/test_eval_bpb.py). The default window is the model's context (max_seq_len, the
GGUF's context_length), so a run and its export score the same windows.

A run directory's result is also written to RUN/eval/bpb.json (task, model, bpb, tokens,
bytes, seconds, ...).

Scorers (also what nanochat/eval/lm_eval.py runs on): TorchScorer loads a checkpoint through
nanochat/model/load.py; EngineScorer runs the GGUF in the C++ engine, whose eval_all gives
the logits of every position of a sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat import atomic


@dataclass
class Scores:
    """Per-target log-probabilities of windows (B, T) and whether each target was the argmax."""

    logprobs: np.ndarray  # float64 (B, T)
    greedy: np.ndarray  # bool (B, T)


class TorchScorer:
    """A checkpoint (run dir or step dir) in the torch model, on `device`. torch is imported
    where it is used: every `nanochat` command builds its parser from this module, and most
    of them (info, engine-side evals, serve) never need torch's ~3 s and ~200 MiB."""

    kind = "torch"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from nanochat.config import from_dict
        from nanochat.model.load import load_model

        self.path = Path(path)
        model, self.tokenizer, state = load_model(self.path)
        self.config = from_dict(state["config"], f"checkpoint {state['path']}")
        self.checkpoint = Path(state["path"])
        self.step = int(state["step"])
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.bos_id = self.tokenizer.bos_id
        self.vocab_size = self.tokenizer.vocab_size
        self.context = self.config.model.max_seq_len
        self.token_bytes = self.tokenizer.token_bytes().astype(np.int64)  # (V,)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def vocab_bytes(self) -> list[bytes]:
        return vocab_bytes(self.tokenizer)

    def score(self, x: np.ndarray, y: np.ndarray) -> Scores:
        """x, y: int (B, T) inputs and targets."""
        import torch

        xt = torch.as_tensor(np.asarray(x, dtype=np.int64), device=self.device)
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=self.device)
        with torch.no_grad():
            logits = self.model(xt).double()  # (B, T, V)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, yt[..., None])[..., 0]
        greedy = logits.argmax(dim=-1) == yt
        return Scores(lp.cpu().numpy(), greedy.cpu().numpy())

    def generate(self, ids: list[int], max_tokens: int, until: list[str]) -> str:
        """Greedy continuation of ids, cut before the first of `until`. The model generates
        max_tokens (or to <|bos|>) and the text is cut afterwards: greedy tokens do not depend
        on what follows them, so this equals stopping at the string."""
        import torch

        x = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(x, max_new_tokens=max_tokens, temperature=0.0,
                                      stop_ids=(self.bos_id,))
        return cut_at(self.decode(out[0, len(ids):].tolist()), until)


class EngineScorer:
    """A GGUF file in the C++ engine with a session of `context` tokens."""

    kind = "gguf"

    def __init__(self, path: str | Path, n_threads: int = 0):
        from nanochat.infer.engine import Engine

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        self.engine = Engine(self.path, n_threads=n_threads)
        info = self.engine.info
        self.bos_id = int(info["bos_id"])
        self.vocab_size = int(info["vocab_size"])
        self.context = self.engine.n_ctx
        self.token_bytes = np.array([len(b) for b in self.vocab_bytes()], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def decode(self, ids) -> str:
        return self.engine.detokenize(ids)

    def vocab_bytes(self) -> list[bytes]:
        """Each token's bytes, b"" for control tokens (the engine's token_text)."""
        return [self.engine.token_bytes(i) for i in range(self.vocab_size)]

    def score(self, x: np.ndarray, y: np.ndarray) -> Scores:
        x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
        lps, greedy = np.empty(x.shape, np.float64), np.empty(x.shape, bool)
        for b in range(x.shape[0]):
            self.engine.reset()
            logits = self.engine.eval_all(x[b].tolist()).astype(np.float64)  # (T, V)
            m = logits.max(axis=-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
            lps[b] = logits[np.arange(len(y[b])), y[b]] - lse
            greedy[b] = logits.argmax(axis=-1) == y[b]
        self.engine.reset()
        return Scores(lps, greedy)

    def generate(self, ids: list[int], max_tokens: int, until: list[str]) -> str:
        self.engine.reset()
        r = self.engine.complete(ids, max_tokens=max_tokens, temperature=0.0, stop=until,
                                 add_bos=False)
        self.engine.reset()
        return cut_at(r["text"], until)  # the engine trims a stop string; cut_at is a no-op


def vocab_bytes(tok) -> list[bytes]:
    """A Tokenizer's tokens as bytes, b"" for special tokens (as the engine gives them)."""
    return [b"" if tok.is_special(i) else tok.id_to_bytes(i) for i in range(tok.vocab_size)]


def cut_at(text: str, until: list[str]) -> str:
    """text up to the first occurrence of any of `until`."""
    end = len(text)
    for s in until:
        if s and (i := text.find(s)) >= 0:
            end = min(end, i)
    return text[:end]


def open_scorer(path: str | Path, device: str = "cpu", n_threads: int = 0):
    """TorchScorer for a directory (a run or a checkpoint), EngineScorer for a .gguf file."""
    p = Path(path)
    if p.is_dir():
        return TorchScorer(p, device=device)
    if p.suffix.lower() == ".gguf" or p.is_file():
        return EngineScorer(p, n_threads=n_threads)
    raise FileNotFoundError(f"--model: {p} is neither a run directory nor a GGUF file")


# ---- token streams -------------------------------------------------------------------------


@dataclass
class Stream:
    """Tokens to score and what they are."""

    tokens: np.ndarray  # int (N,)
    token_bytes: np.ndarray  # int64 (V,): UTF-8 bytes of each token, 0 for special tokens
    source: str


def tokens_from(data: str | Path, scorer, extensions=(".py",)) -> Stream:
    """The val split of a prepared data dir, or a text file / folder tokenized by the model's
    tokenizer with <|bos|> before each document (the way `nanochat data prepare` writes)."""
    p = Path(data).expanduser()
    if (p / "manifest.json").is_file():
        from nanochat.data.dataset import TokenData

        d = TokenData(p)
        if d.vocab_size != scorer.vocab_size or vocab_bytes(d.tokenizer) != scorer.vocab_bytes():
            raise ValueError(f"--data {p}: its tokenizer ({d.vocab_size} tokens) is not the "
                             f"model's ({scorer.vocab_size} tokens); prepare the data with the "
                             f"model's tokenizer (nanochat data prepare --tokenizer DIR) or "
                             f"pass a folder of text to tokenize here")
        return Stream(np.asarray(d.val), d.token_bytes.astype(np.int64), f"{p} (val split)")
    if p.is_file():
        texts = [_read_text(p)]
    elif p.is_dir():
        from nanochat.data import corpus

        # collect's filters (binary, non-UTF-8, empty, duplicates); every file is held out
        # here, so both of its splits are taken, in path order
        files = corpus.collect([str(p)], extensions, val_fraction=0.5)
        texts = [d.text for d in sorted(files.train + files.val, key=lambda d: d.rel)]
    else:
        raise FileNotFoundError(f"--data: {p} does not exist")
    ids: list[int] = []
    for t in texts:
        ids += [scorer.bos_id, *scorer.encode(t)]
    return Stream(np.asarray(ids, dtype=np.int64), scorer.token_bytes, str(p))


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {p}: not UTF-8 text ({e})") from None


# ---- scoring ---------------------------------------------------------------------------------


@dataclass
class Total:
    nats: float
    tokens: int
    bytes: int

    @property
    def bpb(self) -> float:
        if self.bytes == 0:
            raise ValueError("the scored tokens hold no bytes (only special tokens)")
        return self.nats / (math.log(2) * self.bytes)


def score_stream(scorer, tokens: np.ndarray, token_bytes: np.ndarray, seq_len: int,
                 batch_size: int = 8, max_tokens: int | None = None,
                 progress: bool = False) -> Total:
    """Total nats, targets and target bytes over the trainer's eval windows of `tokens`."""
    from nanochat.data.loader import eval_batches  # torch: imported where used (TorchScorer)

    if seq_len < 1 or seq_len > scorer.context:
        raise ValueError(f"--seq-len must be in [1, {scorer.context}] (the model's context), "
                         f"got {seq_len}")
    n = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
    nwin = max((n - 1) // seq_len, 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=nwin * seq_len, unit="tok", desc="bpb", dynamic_ncols=True)
    nats, count, nbytes = 0.0, 0, 0
    try:
        for x, y in eval_batches(tokens, batch_size, seq_len, n):
            y = y.numpy()
            nats -= float(scorer.score(x.numpy(), y).logprobs.sum())
            count += y.size
            nbytes += int(token_bytes[y].sum())
            if bar is not None:
                bar.update(y.size)
    finally:
        if bar is not None:
            bar.close()
    return Total(nats, count, nbytes)


def evaluate(model: str | Path, data: str | Path, seq_len: int | None = None,
             max_tokens: int | None = None, batch_size: int = 8, extensions=(".py",),
             device: str = "cpu", n_threads: int = 0, progress: bool = False) -> dict:
    """bits per byte of `model` (run dir or GGUF) on `data`; the result dict of bpb.json."""
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    scorer = open_scorer(model, device=device, n_threads=n_threads)
    stream = tokens_from(data, scorer, extensions)
    seq_len = seq_len or scorer.context
    total = score_stream(scorer, stream.tokens, stream.token_bytes, seq_len, batch_size,
                         max_tokens, progress)
    return {"task": "bpb", "model": str(model), "backend": scorer.kind, "data": stream.source,
            "bpb": total.bpb, "loss": total.nats / total.tokens, "tokens": total.tokens,
            "bytes": total.bytes, "seq_len": seq_len, "seconds": time.perf_counter() - t0}


def run_dir_of(model: str | Path) -> Path | None:
    """The run directory of a run or checkpoint dir (RUN/checkpoints/step_N); None for a file."""
    p = Path(model)
    if not p.is_dir():
        return None
    if p.parent.name == "checkpoints" and (p / "state.pt").is_file():
        return p.parent.parent
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN|FILE.gguf",
                   help="a run or checkpoint directory (torch) or a GGUF file (C++ engine)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a prepared data dir (its val split) or a text file / folder of "
                   "files to tokenize with the model's tokenizer")
    p.add_argument("--max-tokens", type=int, help="score the first N tokens only")
    p.add_argument("--seq-len", type=int,
                   help="window length (default: the model's context; the trainer's "
                   "val_bpb uses train.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (torch)")
    p.add_argument("--ext", action="append", metavar=".EXT",
                   help="with a folder of text: extensions to read (default .py; repeatable)")
    p.add_argument("--device", default="cpu", help="torch device for a run directory")
    p.add_argument("--threads", type=int, default=0, help="engine threads for a GGUF")
    p.add_argument("--json", action="store_true", help="one JSON object")


def main(args: argparse.Namespace) -> int:
    r = evaluate(args.model, args.data, args.seq_len, args.max_tokens, args.batch_size,
                 args.ext or [".py"], args.device, args.threads,
                 progress=not args.json and os.isatty(2))
    run = run_dir_of(args.model)
    if run is not None:
        out = run / "eval" / "bpb.json"
        out.parent.mkdir(exist_ok=True)
        atomic.write_text(out, json.dumps(r, indent=2) + "\n")
        r["saved"] = str(out)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['data']}: {r['bpb']:.4f} bits/byte ({r['tokens']:,} tokens, "
              f"{r['bytes']:,} bytes, windows of {r['seq_len']}, {r['seconds']:.1f} s)")
        if "saved" in r:
            print(f"saved {r['saved']}")
    return 0
