"""lm-evaluation-harness adapter: the model "nanochat" on run directories (torch) and GGUF
files (C++ engine). Needs the `eval` extra (pip install 'nanochat-ternary[eval]').

    nanochat eval lm-eval --model nanochat --model_args path=runs/x --tasks TASK
    nanochat eval lm-eval --model nanochat --model_args path=model.gguf,max_length=512 \\
        --tasks my_task --include_path ./my_tasks --limit 100

    from lm_eval import simple_evaluate
    from nanochat.eval.lm_eval import NanochatLM
    simple_evaluate(model=NanochatLM("runs/x"), tasks=[...])

Why `nanochat eval lm-eval` and not plain `lm_eval --model nanochat`: lm-eval 0.4.13 finds
models only in its own registry (lm_eval/api/registry.py), filled from the fixed table in
lm_eval/models/__init__.py and by @register_model in modules that something has imported;
it reads no entry points, and --include_path loads task YAML only. So the command imports
this module (which registers "nanochat") and then runs lm_eval's own CLI entry
(lm_eval.__main__.cli_evaluate) with the remaining arguments, unchanged.

model_args: path (required), max_length (default: the model's context), max_gen_toks
(default 256), device (torch, default cpu), threads (engine, default all). Every sequence
starts with <|bos|> as the training documents do; a text is scored after it.
loglikelihood_rolling windows the text as lm-eval's HF model does (the first window after
<|bos|>, the later ones with the full context). generate_until is greedy (do_sample and a
nonzero temperature are refused) and cuts at the first `until` string.

    pytest -m lmeval tests/test_lm_eval.py
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401 - fills the registry with lm-eval's own models first
import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from nanochat.eval.bpb import open_scorer

_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}


@register_model("nanochat")
class NanochatLM(TemplateLM):
    """lm-eval's LM over nanochat.eval.bpb's TorchScorer (a directory) or EngineScorer
    (a .gguf file)."""

    def __init__(self, path: str, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, device: str | None = None,
                 threads: int | str = 0, batch_size: int | str | None = 1,
                 max_batch_size: int | str | None = None):
        super().__init__()
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI passes device "cuda:0" unless told otherwise
            logging.getLogger(__name__).warning("device %s: CUDA is not available, using the "
                                                "CPU", device)
            device = "cpu"
        self.scorer = open_scorer(path, device=device, n_threads=int(threads))
        self.path = str(path)
        ctx = self.scorer.context
        self.max_length = int(max_length) if max_length else ctx
        if not 2 <= self.max_length <= ctx:
            raise ValueError(f"model_args max_length must be in [2, {ctx}] (the model's "
                             f"context), got {max_length}")
        self.max_gen_toks = int(max_gen_toks)
        if str(batch_size).startswith("auto"):  # lm-eval's "auto[:N]": no probing here
            batch_size = max_batch_size or 8
        self.batch_size = int(batch_size or 1)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # ---- tokens ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.scorer.bos_id  # documents are separated by <|bos|> in training

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        ids = self.scorer.encode(string)
        return ids if add_special_tokens is False else [self.scorer.bos_id, *ids]

    def tok_decode(self, ids) -> str:
        return self.scorer.decode(ids)

    # ---- scoring -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); each scored
        on its last max_length + 1 tokens, right-padded into batches of similar length."""
        rows = []
        for i, (key, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: the continuation {key[1]!r} has no tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: the continuation is {len(cont)} tokens, "
                                 f"longer than max_length {self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((i, whole, len(cont)))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch: less padding
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="loglikelihood")
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b:b + self.batch_size]
            T = max(len(w) for _, w, _ in chunk) - 1
            x = np.zeros((len(chunk), T), np.int64)  # padding after a row: causal, unseen
            y = np.zeros((len(chunk), T), np.int64)
            for r, (_, w, _) in enumerate(chunk):
                x[r, :len(w) - 1], y[r, :len(w) - 1] = w[:-1], w[1:]
            s = self.scorer.score(x, y)
            for r, (i, w, n) in enumerate(chunk):
                sl = slice(len(w) - 1 - n, len(w) - 1)  # the continuation's targets
                res = (float(s.logprobs[r, sl].sum()), bool(s.greedy[r, sl].all()))
                out[i] = res
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
            bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, p) for c, p in windows],
                                                disable_tqdm=True)
            total = sum(lp for lp, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            unknown = set(kwargs) - _GEN_KEYS
            if unknown:
                raise ValueError(f"generate_until: unsupported generation arguments "
                                 f"{sorted(unknown)} (supported: {sorted(_GEN_KEYS)})")
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise ValueError("generate_until: nanochat's adapter decodes greedily; "
                                 "set do_sample: false and temperature: 0")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if not 1 <= max_gen < self.max_length:
                raise ValueError(f"generate_until: max_gen_toks must be in "
                                 f"[1, {self.max_length - 1}], got {max_gen}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            text = self.scorer.generate(ids, max_gen, until)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return results


def cli(argv: list[str]) -> int:
    """lm_eval's own CLI with "nanochat" registered (importing this module did that)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
