"""Engine: the C++ inference engine (csrc/engine) over a GGUF file, from Python.

    from nanochat.infer.engine import Engine
    eng = Engine("model.gguf")
    for token, piece in eng.generate("def main(", max_tokens=64, temperature=0.7):
        print(piece, end="", flush=True)
    eng.complete("def main(", max_tokens=64)   # dict: tokens, text, stop_reason, tokens/s

One Engine is one model plus one session (KV cache): generate() and eval() continue the
conversation in it; reset() forgets it. The engine computes with the GIL released; the
generator runs generation on a worker thread and yields tokens as they come. Thread
count: Engine(n_threads=...) for this engine alone, else NANOCHAT_NUM_THREADS or
nanochat.ops.ternary.set_num_threads; engines on different threads each run on their own
threads.

    pytest tests/test_engine.py
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from nanochat._core import core

Prompt = str | Sequence[int]

_DONE = object()


class Engine:
    """A GGUF model in the C++ engine with one session of up to n_ctx tokens (0: the
    model's context length, at most 4096), computing on n_threads threads (0: the
    library-wide count; at most 1024). max_kv_bytes caps the session's KV cache (0: 4 GiB);
    a context that needs more raises ValueError naming the file and sizes."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 0, max_kv_bytes: int = 0,
                 n_threads: int = 0):
        path = os.fspath(path)
        self._model = core().EngineModel(path, int(n_threads))
        self._session = core().EngineSession(self._model, int(n_ctx), int(max_kv_bytes))
        self.info: dict = self._model.info
        self._lock = threading.Lock()  # the session is used by one call at a time
        # n_past as callers see it, set under _n_lock by whoever changes the session (a
        # generator's consumer included): reading it neither races the running generate
        # nor waits for it (the generate worker holds _lock until generation ends).
        self._n_lock = threading.Lock()
        self._n_past = 0
        self.last_result: dict | None = None  # generate()'s summary (as complete()'s) once done

    # ---- tokenizer ----------------------------------------------------------------------
    def tokenize(self, text: str, parse_special: bool = False, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; parse_special turns "<|...|>" markers into special tokens."""
        ids = self._model.tokenize(text, bool(parse_special))
        if add_bos:
            ids.insert(0, self.info["bos_id"])
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of the tokens (special tokens are ""; invalid UTF-8 becomes U+FFFD)."""
        return self._model.detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self._model.token_text(int(token))

    # ---- the session ----------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Tokens in the conversation so far; while a generator runs, the prompt and the
        tokens it has yielded (what the session keeps if it is closed now)."""
        with self._n_lock:
            return self._n_past

    def _sync_n_past(self) -> None:  # under self._lock
        with self._n_lock:
            self._n_past = self._session.n_past

    @property
    def n_ctx(self) -> int:
        return self._session.n_ctx

    def reset(self) -> None:
        """Forget the conversation."""
        with self._lock:
            self._session.reset()
            self._sync_n_past()

    def truncate(self, n: int) -> None:
        """Keep the first n tokens of the conversation."""
        with self._lock:
            self._session.truncate(int(n))
            self._sync_n_past()

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Feeds ids; returns the last one's logits, float32 (vocab,)."""
        with self._lock:
            try:
                return self._session.eval([int(i) for i in ids])
            finally:
                self._sync_n_past()

    def eval_all(self, ids: Sequence[int]) -> np.ndarray:
        """Feeds ids; returns the logits of every one of them, float32 (len(ids), vocab)."""
        with self._lock:
            try:
                return self._session.eval_all([int(i) for i in ids])
            finally:
                self._sync_n_past()

    # ---- generation ------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt, add_bos: bool | None, parse_special: bool) -> list[int]:
        if isinstance(prompt, str):
            ids = self._model.tokenize(prompt, bool(parse_special))
            if add_bos is None:
                add_bos = self.info["add_bos"] and self._session.n_past == 0
        else:
            ids = [int(i) for i in prompt]
            add_bos = bool(add_bos)
        if add_bos:
            ids.insert(0, self.info["bos_id"])
        return ids

    def _run(self, prompt: Prompt, callback, max_tokens: int, temperature: float, top_k: int,
             top_p: float, repetition_penalty: float, seed: int, stop: Iterable[str | bytes],
             stop_tokens: Iterable[int], add_bos: bool | None, stop_at_eos: bool,
             parse_special: bool, started: dict | None = None) -> dict:
        with self._lock:
            ids = self._prompt_ids(prompt, add_bos, parse_special)
            if started is not None:
                started["base"] = self._session.n_past + len(ids)  # where new tokens start
            try:
                return self._session.generate(
                    ids, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    repetition_penalty=float(repetition_penalty), seed=int(seed),
                    max_tokens=int(max_tokens), stop_tokens=[int(t) for t in stop_tokens],
                    stop=list(stop), stop_at_eos=bool(stop_at_eos), callback=callback)
            finally:
                if started is None:  # a generator's consumer keeps n_past itself
                    self._sync_n_past()

    def generate(self, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, stop: Iterable[str | bytes] = (), stop_tokens: Iterable[int] = (),
                 add_bos: bool | None = None, stop_at_eos: bool = True,
                 parse_special: bool = True) -> Iterator[tuple[int, str]]:
        """Streams (token_id, text_piece) as the engine produces them.

        prompt: text (bos first when add_bos is None, the model asks for it and the session
        is empty) or token ids (bos only if add_bos). parse_special: marker text such as
        "<|user_end|>" in a text prompt becomes the special token; pass False for text from
        a user, which then stays plain text.
        Pieces never split a UTF-8 character; text that may begin a stop string waits until
        it cannot. Text still held back at the end comes as one last (-1, piece). Closing
        the generator early stops generation, and the session keeps only the tokens that
        were yielded."""
        q: queue.Queue = queue.Queue(maxsize=4)  # the engine runs at most a few tokens ahead
        closed = threading.Event()
        started: dict = {}

        def on_token(token: int, piece: bytes) -> bool:
            while not closed.is_set():
                try:
                    q.put((token, piece), timeout=0.05)
                    break
                except queue.Full:
                    pass
            return not closed.is_set()

        def work() -> None:
            try:
                r = self._run(prompt, on_token, max_tokens, temperature, top_k, top_p,
                              repetition_penalty, seed, stop, stop_tokens, add_bos, stop_at_eos,
                              parse_special, started)
                item = (_DONE, r)
            except Exception as e:  # noqa: BLE001 - re-raised in the consumer
                item = (_DONE, e)
            while not closed.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return
                except queue.Full:
                    pass

        worker = threading.Thread(target=work, name="nanochat-generate", daemon=True)
        worker.start()
        yielded = 0
        finished = False
        try:
            while True:
                token, item = q.get()
                if token is _DONE:
                    finished = True
                    if isinstance(item, Exception):
                        raise item
                    self.last_result = _summary(item)
                    return
                if token >= 0:
                    yielded += 1
                    with self._n_lock:
                        self._n_past = started["base"] + yielded
                yield token, item.decode("utf-8", errors="replace")
        finally:
            closed.set()
            worker.join()
            with self._lock:
                if not finished and "base" in started:  # closed early: forget unseen tokens
                    if self._session.n_past > started["base"] + yielded:
                        self._session.truncate(started["base"] + yielded)
                self._sync_n_past()

    def complete(self, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, stop: Iterable[str | bytes] = (), stop_tokens: Iterable[int] = (),
                 add_bos: bool | None = None, stop_at_eos: bool = True,
                 parse_special: bool = True) -> dict:
        """Generates to the end (parse_special as in generate()): dict of prompt_tokens, tokens, text, stop_reason,
        prefill_tokens_per_s, decode_tokens_per_s (the engine's own timers), decode_steps,
        prefill_seconds, decode_seconds, and decode_seconds' parts: decode_ternary_seconds
        (ternary matrix products), decode_head_seconds (LM head), decode_attention_seconds."""
        return _summary(self._run(prompt, None, max_tokens, temperature, top_k, top_p,
                                  repetition_penalty, seed, stop, stop_tokens, add_bos,
                                  stop_at_eos, parse_special))


def _summary(r: dict) -> dict:
    """The engine's raw generate() result as complete() returns it (rates from its timers)."""
    pre, dec = r["prefill_seconds"], r["decode_seconds"]
    return {
        "prompt_tokens": r["prompt_tokens"],
        "tokens": list(r["tokens"]),
        "text": r["text"].decode("utf-8", errors="replace"),
        "stop_reason": r["stop_reason"],
        "prefill_tokens_per_s": r["prompt_tokens"] / pre if pre > 0 else 0.0,
        "decode_tokens_per_s": r["decode_steps"] / dec if dec > 0 else 0.0,
        "decode_steps": r["decode_steps"],
        "prefill_seconds": pre,
        "decode_seconds": dec,
        **{f"decode_{part}_seconds": r[f"decode_{part}_seconds"]
           for part in ("ternary", "head", "attention")},
    }
