"""nanochat serve: an OpenAI-compatible HTTP server over the C++ engine's continuous batching.

    nanochat serve --model model.gguf [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--max-batch 16] [--ctx 4096] [--threads N] [--kv-mib 4096] [--max-queue 64]

    GET  /v1/models                 the one model served
    POST /v1/completions            prompt (text or token ids) -> text; "stream": SSE
    POST /v1/chat/completions       messages -> assistant reply; "stream": SSE
    GET  /health                    {"status": "ok"} (open without the key)
    GET  /metrics                   Prometheus text: requests, tokens, batch, queue, latencies
    GET  /                          a chat page (static/chat.html: streaming, stop, settings)

Every request's sequences (n of them) go to one engine Scheduler (csrc/engine/scheduler.cpp)
that a thread of its own steps: each step is one forward pass over the next token of every
active sequence plus a chunk of waiting prompts, so concurrent requests share each read of
the weights. The event loop only parses, tokenizes (on a worker thread), submits and relays
the tokens the scheduler thread hands over; it never waits on generation. A client that
disconnects cancels its sequences, which frees their KV cache at once.

Sampling parameters as OpenAI's (max_tokens, temperature, top_p, seed, stop (up to 4), n,
stream, stream_options.include_usage) plus top_k. Errors are OpenAI-shaped JSON bodies:
400 for bad or oversized input (body, messages, max_tokens, n, stop strings, ranges, a prompt
longer than the context), 401 for a wrong or missing key when --api-key is set, 404 for an
unknown model or path, 429 with Retry-After when the scheduler's queue is full.

The chat template is the model's own: the GGUF vocabulary's <|user_start|> <|user_end|>
<|assistant_start|> <|assistant_end|> tokens (nanochat/infer/chat.py), with system messages folded
into the next user turn. Message text is tokenized as plain text, so a user cannot forge a
marker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from nanochat._core import core

log = logging.getLogger("nanochat.infer.server")
CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"  # GET /
CHAT_MARKERS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each beyond it: 400)."""
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_message_chars: int = 1 << 18
    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    default_completion_tokens: int = 16   # OpenAI's default for /v1/completions
    default_chat_tokens: int = 512        # chat: this, or what the context leaves if less


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---- metrics ---------------------------------------------------------------------------------

class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{name}_bucket{{le="{b:g}"}} {c}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                f"{name}_count {self.count}"]
        return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# The parts of the engine's step time the scheduler's stats sum (`<part>_seconds`).
ENGINE_PARTS = ("step", "ternary", "attention", "head", "sample")


class Metrics:
    """Counters the event loop and the scheduler thread update (under one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0  # sequences cancelled while running (client gone)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram((1, 2, 4, 8, 16, 32, 64, 128))

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self, stats: dict) -> str:
        with self.lock:
            out = ["# HELP nanochat_requests_total HTTP requests by endpoint and status.",
                   "# TYPE nanochat_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'nanochat_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP nanochat_prompt_tokens_total Prompt tokens of admitted requests.",
                    "# TYPE nanochat_prompt_tokens_total counter",
                    f"nanochat_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP nanochat_completion_tokens_total Tokens generated for clients.",
                    "# TYPE nanochat_completion_tokens_total counter",
                    f"nanochat_completion_tokens_total {self.completion_tokens}",
                    "# HELP nanochat_cancelled_sequences_total Sequences cancelled while running.",
                    "# TYPE nanochat_cancelled_sequences_total counter",
                    f"nanochat_cancelled_sequences_total {self.cancelled}"]
            out += self.ttft.render("nanochat_time_to_first_token_seconds",
                                    "Request start to its first generated token.")
            out += self.itl.render("nanochat_inter_token_seconds",
                                   "Between two tokens of one sequence as the server relays them.")
            out += self.latency.render("nanochat_request_duration_seconds",
                                       "Request start to its last byte (generation requests).")
            out += self.batch.render("nanochat_batch_sequences",
                                     "Sequences in each engine forward pass.")
        gauges = [("active_sequences", "active", "Sequences admitted (prefilling or decoding)."),
                  ("queued_sequences", "waiting", "Sequences waiting for a batch slot or KV."),
                  ("kv_used_bytes", "kv_used_bytes", "KV cache held by admitted sequences."),
                  ("kv_budget_bytes", "kv_budget_bytes", "KV cache budget (--kv-mib)."),
                  ("last_batch_rows", "last_rows", "Rows (tokens) of the last forward pass.")]
        for name, key, help_ in gauges:
            out += [f"# HELP nanochat_{name} {help_}", f"# TYPE nanochat_{name} gauge",
                    f"nanochat_{name} {stats[key]}"]
        for name, key, help_ in [("engine_steps_total", "steps", "Engine forward passes."),
                                 ("engine_prefill_tokens_total", "prefill_tokens",
                                  "Prompt tokens the engine ran."),
                                 ("engine_decode_tokens_total", "decode_tokens",
                                  "Tokens the engine sampled.")]:
            out += [f"# HELP nanochat_{name} {help_}", f"# TYPE nanochat_{name} counter",
                    f"nanochat_{name} {stats[key]}"]
        out += ["# HELP nanochat_engine_seconds_total Engine time by part: whole steps, and "
                "within them the ternary GEMMs, attention, the LM head and sampling.",
                "# TYPE nanochat_engine_seconds_total counter"]
        out += [f'nanochat_engine_seconds_total{{part="{part}"}} {stats[part + "_seconds"]}'
                for part in ENGINE_PARTS]
        return "\n".join(out) + "\n"


# ---- the scheduler thread ---------------------------------------------------------------------

class Batcher:
    """The engine's Scheduler stepped on a thread of its own; outputs go to the event loop."""

    def __init__(self, scheduler, metrics: Metrics):
        self.sched = scheduler
        self.metrics = metrics
        self._queues: dict[int, asyncio.Queue] = {}  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="nanochat-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.sched.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sched.wait(100):
                continue
            if self.sched.step():
                with self.metrics.lock:
                    self.metrics.batch.observe(self.sched.stats["last_sequences"])
            outs = self.sched.poll()
            if outs:
                self._loop.call_soon_threadsafe(self._deliver, outs)

    def _deliver(self, outs: list[dict]) -> None:
        for o in outs:
            q = self._queues.get(o["id"])
            if q is not None:
                q.put_nowait(o)
            if o["finished"]:
                self._queues.pop(o["id"], None)

    def submit(self, prompt: list[int], queue: asyncio.Queue, **params) -> int:
        """On the event loop: registers the queue before any output can be delivered."""
        sid = self.sched.submit(prompt, **params)
        self._queues[sid] = queue
        return sid

    def cancel(self, sid: int) -> None:
        self.sched.cancel(sid)


# ---- request parsing ----------------------------------------------------------------------------

def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, "
                       f"got {json.dumps(v)[:40]}", param=key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be in [{lo:g}, {hi:g}], got {v}", param=key)
    return v


def _stop_strings(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' may hold at most {limits.max_stop} strings, got {len(stop)}",
                       param="stop")
    for s in stop:
        if not s or len(s) > limits.max_stop_chars:
            raise ApiError(400, f"each 'stop' string must have 1 to {limits.max_stop_chars} "
                           f"characters", param="stop")
    return stop


COMMON_KEYS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "seed", "stop", "n", "stream", "stream_options", "user", "presence_penalty",
               "frequency_penalty", "logprobs", "logit_bias"}


@dataclass
class GenRequest:
    prompt: list[int]
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    params: dict  # EngineScheduler.submit keywords but seed and max_tokens
    seed: int


def _parse_common(body: dict, limits: Limits, extra_keys: set[str], vocab: int) -> dict:
    unknown = sorted(set(body) - COMMON_KEYS - extra_keys)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}",
                       param=unknown[0])
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0, -2.0, 2.0) != 0:
            raise ApiError(400, f"'{key}' is not supported (only 0)", param=key)
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    if body.get("logit_bias") not in (None, {}):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}):
        raise ApiError(400, "'stream_options' may only hold include_usage", param="stream_options")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: mt}, key, None, 1, 1 << 30, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    return dict(
        n=_number(body, "n", 1, 1, limits.max_n, integer=True), stream=stream,
        include_usage=bool(opts and opts.get("include_usage")), max_tokens=max_tokens,
        seed=secrets.randbits(63) if seed is None else seed % (1 << 64),
        params=dict(temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                    top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
                    top_k=_number(body, "top_k", 0, 0, vocab, integer=True),
                    stop=_stop_strings(body, limits)))


# ---- the app ---------------------------------------------------------------------------------------

class Server:
    """The Starlette app over one model and its Scheduler."""

    def __init__(self, model_path: str | os.PathLike, api_key: str | None = None,
                 max_batch: int = 16, ctx: int = 0, threads: int = 0, kv_mib: int = 4096,
                 max_queue: int = 64, prefill_chunk: int = 64, limits: Limits = Limits()):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"--model: {path} does not exist (export one with "
                                    f"nanochat export --gguf)")
        if kv_mib < 1:
            raise ValueError(f"--kv-mib must be >= 1, got {kv_mib}")
        self.model = core().EngineModel(str(path), int(threads))
        self.info = self.model.info
        self.sched = core().EngineScheduler(self.model, n_ctx=int(ctx),
                                            kv_budget_bytes=int(kv_mib) << 20,
                                            max_batch=int(max_batch),
                                            prefill_chunk=int(prefill_chunk),
                                            max_queue=int(max_queue))
        self.ctx = int(ctx) or min(self.info["context_length"], 4096)
        self.model_id = self.info["name"] or path.stem
        self.created = int(time.time())
        self.api_key = api_key or None
        self.limits = limits
        self.metrics = Metrics()
        self.batcher = Batcher(self.sched, self.metrics)
        ids = [self.model.token_id(m) for m in CHAT_MARKERS]
        self.chat_ids = None if min(ids) < 0 else ids  # no chat template without the markers
        self.app = self._build_app()

    # ---- plumbing ----
    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.batcher.start(asyncio.get_running_loop())
            try:
                yield
            finally:
                self.batcher.stop()

        async def http_error(request, exc: HTTPException):
            e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else None)
            return JSONResponse(e.body(), status_code=e.status)

        routes = [Route("/v1/models", self._endpoint("models", self.models), methods=["GET"]),
                  Route("/v1/completions", self._endpoint("completions", self.completions),
                        methods=["POST"]),
                  Route("/v1/chat/completions",
                        self._endpoint("chat_completions", self.chat_completions),
                        methods=["POST"]),
                  Route("/health", self._endpoint("health", self.health, auth=False),
                        methods=["GET"]),
                  # The page is open; its API calls carry the key the user types in.
                  Route("/", self._endpoint("page", self.page, auth=False), methods=["GET"]),
                  Route("/metrics", self._endpoint("metrics", self.metrics_page),
                        methods=["GET"])]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: http_error})

    def _endpoint(self, name: str, handler, auth: bool = True):
        from starlette.responses import JSONResponse

        async def run(request):
            try:
                if auth and self.api_key is not None:
                    self._check_key(request)
                response = await handler(request)
            except ApiError as e:
                response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            except Exception as e:  # a bug: still an OpenAI-shaped 500, and the server lives on
                log.exception("%s %s failed", request.method, request.url.path)
                err = ApiError(500, f"internal server error: {type(e).__name__}",
                               type_="server_error")
                response = JSONResponse(err.body(), status_code=500)
            self.metrics.count_request(name, response.status_code)
            return response
        return run

    def _check_key(self, request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided (Authorization: Bearer KEY)."
                           if given else "You didn't provide an API key (Authorization: Bearer "
                           "KEY).", code="invalid_api_key")

    async def _read_json(self, request) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(400, f"the request body ({declared} bytes) is larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(400, f"the request body is larger than {limit} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = data.get("model")
        if model is None:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if model != self.model_id:
            raise ApiError(404, f"The model '{str(model)[:100]}' does not exist; this server "
                           f"serves '{self.model_id}'", param="model", code="model_not_found")
        return data

    async def _tokenize(self, text: str) -> list[int]:
        # Off the event loop: a long prompt takes milliseconds (the engine drops the GIL).
        return await asyncio.get_running_loop().run_in_executor(
            None, self.model.tokenize, text, False)

    def _fit(self, req: dict, prompt: list[int], default: int) -> int:
        room = self.ctx - len(prompt)
        max_tokens = req["max_tokens"]
        if max_tokens is None:
            max_tokens = min(default, room)
        if room < 1 or len(prompt) + max_tokens > self.ctx:
            raise ApiError(400, f"This model's maximum context length is {self.ctx} tokens. "
                           f"However, you requested {len(prompt) + max(max_tokens, 1)} tokens "
                           f"({len(prompt)} in the prompt, {max(max_tokens, 1)} in the "
                           f"completion). Please reduce the prompt or the completion.",
                           param="messages" if self.chat_ids else "prompt",
                           code="context_length_exceeded")
        return max_tokens

    def _submit(self, req: GenRequest) -> tuple[asyncio.Queue, dict[int, int]]:
        """Submits the request's n sequences (errors: 400, or 429 when the queue is full);
        returns their output queue and choice index by sequence id."""
        queue: asyncio.Queue = asyncio.Queue()
        index: dict[int, int] = {}
        E = core()
        try:
            for i in range(req.n):
                sid = self.batcher.submit(req.prompt, queue, max_tokens=req.max_tokens,
                                          seed=(req.seed + i) % (1 << 64), **req.params)
                index[sid] = i
        except E.QueueFullError as e:
            for sid in index:
                self.batcher.cancel(sid)
            raise ApiError(429, f"The server is busy ({e}); retry later.",
                           type_="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:  # CoreError: bad sampling values, a sequence that never fits
            for sid in index:
                self.batcher.cancel(sid)
            raise ApiError(400, str(e)) from None
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(req.prompt) * req.n
        return queue, index

    async def _relay(self, queue: asyncio.Queue,
                     index: dict[int, int]) -> AsyncIterator[tuple[int, dict]]:
        """Yields (choice index, scheduler output) until every sequence finished. Closing
        it early (a disconnect cancels the task reading it) cancels what still runs."""
        live = set(index)
        last: dict[int, float] = {}
        try:
            while live:
                out = await queue.get()
                sid = out["id"]
                now = time.monotonic()
                if out["tokens"]:
                    with self.metrics.lock:
                        self.metrics.completion_tokens += len(out["tokens"])
                        if sid in last:
                            self.metrics.itl.observe(now - last[sid])
                    last[sid] = now
                if out["finished"]:
                    live.discard(sid)
                yield index[sid], out
        finally:
            for sid in live:
                self.batcher.cancel(sid)
            with self.metrics.lock:
                self.metrics.cancelled += len(live)

    async def _respond(self, req: GenRequest, request, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        t0 = time.monotonic()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        first = [True]

        def first_token() -> None:
            if first[0]:
                first[0] = False
                with self.metrics.lock:
                    self.metrics.ttft.observe(time.monotonic() - t0)

        def finish_reason(out: dict) -> str:
            r = out["finish_reason"]
            if r == "error":
                raise ApiError(500, f"the engine failed: {out['error']}", type_="server_error")
            return "stop" if r in ("stop_token", "stop_string") else "length"

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(req.prompt), "completion_tokens": completion,
                    "total_tokens": len(req.prompt) + completion}

        gen = self._relay(*self._submit(req))
        if not req.stream:
            texts = [bytearray() for _ in range(req.n)]
            reasons: list[str | None] = [None] * req.n
            total = [0]

            async def consume():
                async for i, out in gen:
                    if out["tokens"]:
                        first_token()
                    texts[i] += out["text"]
                    if out["finished"]:
                        reasons[i] = finish_reason(out)
                        total[0] += out["generated_tokens"]

            task = asyncio.ensure_future(consume())
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=0.25)
                    if not task.done() and await request.is_disconnected():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                        raise ApiError(499, "the client disconnected")
                task.result()
            finally:
                await gen.aclose()  # cancels the sequences still running
            choices = []
            for i in range(req.n):
                text = texts[i].decode("utf-8", errors="replace")
                c = {"index": i, "finish_reason": reasons[i], "logprobs": None}
                if chat:
                    c["message"] = {"role": "assistant", "content": text}
                else:
                    c["text"] = text
                choices.append(c)
            with self.metrics.lock:
                self.metrics.latency.observe(time.monotonic() - t0)
            return JSONResponse({"id": rid, "object": obj, "created": created,
                                 "model": self.model_id, "choices": choices,
                                 "usage": usage(total[0])})

        def chunk(choices: list[dict], **extra) -> bytes:
            body = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": self.model_id, "choices": choices, **extra}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        def choice(i: int, piece: str, reason: str | None) -> dict:
            if chat:
                return {"index": i, "delta": {"content": piece} if reason is None else {},
                        "finish_reason": reason, "logprobs": None}
            return {"index": i, "text": piece, "finish_reason": reason, "logprobs": None}

        async def events():
            # A disconnect cancels this generator's task: closing `gen` cancels the sequences.
            total = 0
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None, "logprobs": None} for i in range(req.n)])
                async for i, out in gen:
                    if out["tokens"]:
                        first_token()
                    piece = out["text"].decode("utf-8", errors="replace")
                    # A chunk per step that sampled: tokens whose text is held back (a
                    # possible stop string, a split character) or empty (special tokens)
                    # still show the client that generation goes on.
                    if piece or out["tokens"]:
                        yield chunk([choice(i, piece, None)])
                    if out["finished"]:
                        total += out["generated_tokens"]
                        try:
                            reason = finish_reason(out)
                        except ApiError as e:
                            yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
                            break
                        yield chunk([choice(i, "", reason)])
            finally:
                await gen.aclose()
            if req.include_usage:
                yield chunk([], usage=usage(total))
            yield b"data: [DONE]\n\n"
            with self.metrics.lock:
                self.metrics.latency.observe(time.monotonic() - t0)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ---- endpoints ----
    async def page(self, request):
        from starlette.responses import HTMLResponse
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    async def health(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"status": "ok"})

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created,
             "owned_by": "nanochat", "context_length": self.ctx}]})

    async def metrics_page(self, request):
        from starlette.responses import PlainTextResponse
        return PlainTextResponse(self.metrics.render(self.sched.stats),
                                 media_type="text/plain; version=0.0.4")

    async def completions(self, request):
        body = await self._read_json(request)
        extra = {"prompt", "echo", "suffix", "best_of"}
        req = _parse_common(body, self.limits, extra, self.info["vocab_size"])
        if body.get("echo") not in (None, False):
            raise ApiError(400, "'echo' is not supported", param="echo")
        if body.get("suffix") not in (None, ""):
            raise ApiError(400, "'suffix' is not supported", param="suffix")
        if body.get("best_of") not in (None, req["n"]):
            raise ApiError(400, "'best_of' must equal n", param="best_of")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        vocab = self.info["vocab_size"]
        if isinstance(prompt, str):
            if len(prompt) > self.limits.max_message_chars:
                raise ApiError(400, f"'prompt' is longer than {self.limits.max_message_chars} "
                               f"characters", param="prompt")
            ids = await self._tokenize(prompt)
            if self.info["add_bos"]:
                ids.insert(0, self.info["bos_id"])
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids "
                           "(one prompt per request; use n for several completions)",
                           param="prompt")
        if not ids:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        req["max_tokens"] = self._fit(req, ids, self.limits.default_completion_tokens)
        return await self._respond(GenRequest(prompt=ids, **req), request, chat=False)

    async def chat_completions(self, request):
        body = await self._read_json(request)
        req = _parse_common(body, self.limits, {"messages"}, self.info["vocab_size"])
        if self.chat_ids is None:
            raise ApiError(400, f"{self.info['path']}: the model's vocabulary has no chat "
                           f"markers ({', '.join(CHAT_MARKERS)}); use /v1/completions",
                           param="messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        if len(messages) > self.limits.max_messages:
            raise ApiError(400, f"'messages' may hold at most {self.limits.max_messages} "
                           f"messages, got {len(messages)}", param="messages")
        turns: list[tuple[str, str]] = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                               "assistant"):
                raise ApiError(400, f"messages[{k}] must be an object whose 'role' is system, "
                               f"developer, user or assistant", param=f"messages[{k}]")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise ApiError(400, f"messages[{k}].content parts must be text parts",
                                   param=f"messages[{k}].content")
                content = "".join(p["text"] for p in content)
            if content is None and m["role"] == "assistant":
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{k}].content must be a string",
                               param=f"messages[{k}].content")
            if len(content) > self.limits.max_message_chars:
                raise ApiError(400, f"messages[{k}].content is longer than "
                               f"{self.limits.max_message_chars} characters",
                               param=f"messages[{k}].content")
            turns.append((m["role"], content))
        ids = await self._render_chat(turns)
        req["max_tokens"] = self._fit(req, ids, self.limits.default_chat_tokens)
        req["params"]["stop_tokens"] = [self.chat_ids[3]]
        return await self._respond(GenRequest(prompt=ids, **req), request, chat=True)

    async def _render_chat(self, turns: list[tuple[str, str]]) -> list[int]:
        """bos, then <|user_start|>text<|user_end|> and <|assistant_start|>text<|assistant_end|>
        turns (system text joins the next user turn), then <|assistant_start|>."""
        us, ue, as_, ae = self.chat_ids
        ids = [self.info["bos_id"]] if self.info["bos_id"] >= 0 else []
        system: list[str] = []
        for role, text in turns:
            if role in ("system", "developer"):
                system.append(text)
                continue
            if role == "user":
                ids += [us, *await self._tokenize("\n\n".join(system + [text])), ue]
                system = []
            else:
                ids += [as_, *await self._tokenize(text), ae]
        if system:
            ids += [us, *await self._tokenize("\n\n".join(system)), ue]
        return ids + [as_]


# ---- running it ---------------------------------------------------------------------------------

class BackgroundServer:
    """Server.app on uvicorn in a thread, on a free loopback port (tests, nanochat bench serve)."""

    def __init__(self, server: Server, host: str = "127.0.0.1"):
        import uvicorn

        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning",
                                                 lifespan="on", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self.sock]},
                                        name="nanochat-uvicorn", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()


def main(args: argparse.Namespace) -> int:
    import uvicorn

    """`nanochat serve` (arguments: cli.py)."""
    server = Server(args.model, api_key=args.api_key or os.environ.get("NANOCHAT_API_KEY"),
                    max_batch=args.max_batch, ctx=args.ctx,
                    threads=args.threads, kv_mib=args.kv_mib, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk)
    print(f"nanochat serve: {server.model_id} ({args.model}) on http://{args.host}:{args.port} "
          f"(max batch {args.max_batch}, context {server.ctx}"
          f"{', API key required' if server.api_key else ''})", flush=True)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="info")
    return 0
