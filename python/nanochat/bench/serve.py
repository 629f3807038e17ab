"""nanochat bench serve: `nanochat serve` and llama.cpp's `llama-server` under the same K
concurrent streaming clients on loopback, on the same GGUF.

Each server runs as a child process on a free loopback port, one at a time (ours first, then
llama.cpp's; never both up at once): `nanochat serve --max-batch K --threads N` and
`llama-server -np K -cb --threads N` (K parallel slots with continuous batching; K = the
largest client count). The clients are one asyncio loop in this process (httpx). For each K
(default 1, 4, 8, 16) every client streams /v1/completions requests one after another for
--seconds: the same body for both servers (a short text prompt, max_tokens, temperature 1,
top_p 1, top_k 0 and a per-request seed), plus what llama-server needs to do the same work:
`ignore_eos` (its logit bias of -inf on every end-of-generation token, so it never stops
before max_tokens), `min_p` 0 (its default 0.05 would truncate the distribution) and
`timings_per_token` (each chunk then carries the running count of generated tokens).
Requests still running at the deadline finish and count. Reported per server and K:

  tokens_per_s   generated tokens of all clients / time until the last request ended; a
                 request's tokens are its final `usage.completion_tokens`, and the tokens its
                 chunks carried must add up to it (else the request counts as an error)
  ttft_p50_s     request sent -> its first token-carrying chunk (p50, p99)
  itl_p50_s      gaps between two token-carrying chunks of one stream (p50, p99), per token:
                 our server sends one chunk per sampled token; llama-server holds back a token
                 that ends inside a UTF-8 character and sends it with the next one, so a chunk
                 carrying n tokens (its timings.predicted_n step) counts as n gaps of gap / n
  short          requests that ended before max_tokens (ours stops at the model's end token)
  errors         requests that failed (a non-200 status, a broken stream, a token miscount)
  engine_busy    ours only, from the server's /metrics engine clocks: the share of the wall
                 time the engine spent stepping (the rest went to HTTP, the clients, waiting),
  step_ms        and a mean step's ms by part: ternary GEMMs, attention, LM head, sampling,
                 other (norms, RoPE, quantization, the scheduler's own work)

The model is --model FILE.gguf, or --config's random-weight GGUF (cached, as bench decode).
A config that llama.cpp's bitnet graph cannot run (small_560m's sliding-window "SSSL") is
served by both as its dense equivalent (bench decode's bench_model: pattern "L"), the rows'
`variant` says so; --no-llama serves the config itself to ours alone. llama-server is
--llama-server PATH, else `llama-server` on PATH, else build-llama/build/bin/llama-server
under the current directory (where tools/build_llama_server.sh puts it); without one, or if
it cannot load the file, only our rows are printed, with a message saying why.

    nanochat bench serve [--config small_560m | --model FILE.gguf] [--streams 1,4,8,16]
                         [--seconds 20] [--threads N] [--max-tokens 64] [--json]
                         [--llama-server PATH | --no-llama]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = "def main():\n    "
# Where tools/build_llama_server.sh puts the binary, relative to the repo root it runs in.
BUILT_LLAMA_SERVER = Path("build-llama") / "build" / "bin" / "llama-server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="small_560m",
                   help="model config whose random-weight GGUF is served (default small_560m)")
    p.add_argument("--model", metavar="FILE.gguf", help="serve this file instead of --config's")
    p.add_argument("--streams", default="1,4,8,16",
                   help="comma-separated concurrent client counts (default 1,4,8,16)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="how long each client count runs (default 20)")
    p.add_argument("--threads", type=int, default=0,
                   help="server compute threads, both servers (0: all cores)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--json", action="store_true", help="one JSON object per server and count")
    p.add_argument("--llama-server", metavar="PATH",
                   help="llama.cpp's server binary (default: llama-server on PATH, else "
                        f"./{BUILT_LLAMA_SERVER} from tools/build_llama_server.sh)")
    p.add_argument("--no-llama", action="store_true", help="drive our server only")


@dataclass(frozen=True)
class Target:
    """One running server as the clients see it."""
    engine: str  # "nanochat" | "llama.cpp"
    url: str
    model: str
    extra: dict = field(default_factory=dict)  # request fields only this server needs


LLAMA_EXTRA = {"ignore_eos": True, "min_p": 0.0, "timings_per_token": True}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class StreamTokens:
    """Counts the generated tokens each SSE chunk of one streaming /v1/completions response
    carries: llama-server's chunks (timings_per_token) carry the running count
    timings.predicted_n, so a chunk's tokens are its step; ours carry one token per chunk
    whose finish_reason is null. `finish()` checks them against the final usage."""

    def __init__(self):
        self.counted = 0
        self.usage: int | None = None

    def chunk(self, ev: dict) -> int:
        if "error" in ev:
            raise RuntimeError(f"error event: {ev['error'].get('message')}")
        if ev.get("usage"):
            self.usage = int(ev["usage"]["completion_tokens"])
        timings = ev.get("timings")
        if isinstance(timings, dict) and "predicted_n" in timings:
            n = int(timings["predicted_n"]) - self.counted
        elif ev.get("choices") and ev["choices"][0].get("finish_reason") is None:
            n = 1
        else:
            n = 0
        if n < 0:
            raise RuntimeError(f"timings.predicted_n went back to {timings['predicted_n']}")
        self.counted += n
        return n

    def finish(self) -> int:
        if self.usage is None:
            raise RuntimeError("the stream gave no usage.completion_tokens")
        if self.usage != self.counted:
            raise RuntimeError(f"the chunks carried {self.counted} tokens, usage says "
                               f"{self.usage}")
        return self.usage


async def drive(target: Target, streams: int, seconds: float, max_tokens: int) -> dict:
    """`streams` clients in a loop of streaming requests to `target` for `seconds`."""
    import httpx

    ttft: list[float] = []
    itl: list[float] = []
    totals = {"tokens": 0, "requests": 0, "errors": 0, "short": 0}
    deadline = 0.0  # set once the client is ready: its set-up is no part of the window
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)

    async def client(http, k: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            body = {"model": target.model, "prompt": PROMPT, "max_tokens": max_tokens,
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": k * 1_000_003 + i,
                    "stream": True, "stream_options": {"include_usage": True}, **target.extra}
            i += 1
            t0 = last = time.monotonic()
            first = True
            count = StreamTokens()
            try:
                async with http.stream("POST", target.url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        raise RuntimeError(f"status {r.status_code}")
                    done = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        n = count.chunk(json.loads(line[6:]))
                        if n == 0:
                            continue
                        now = time.monotonic()
                        if first:
                            ttft.append(now - t0)
                            first = False
                        else:
                            itl.extend([(now - last) / n] * n)
                        last = now
                    if not done:
                        raise RuntimeError("the stream ended before [DONE]")
                tokens = count.finish()
                totals["tokens"] += tokens
                totals["requests"] += 1
                totals["short"] += tokens < max_tokens
            except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
                totals["errors"] += 1

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        t0 = time.monotonic()
        deadline = t0 + seconds
        await asyncio.gather(*(client(http, k) for k in range(streams)))
    elapsed = time.monotonic() - t0
    return {"engine": target.engine, "streams": streams,
            "tokens_per_s": totals["tokens"] / elapsed,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99),
            "errors": totals["errors"], "requests": totals["requests"],
            "short": totals["short"], "tokens": totals["tokens"], "seconds": elapsed}


def engine_clock(url: str) -> dict[str, float]:
    """Our server's engine clocks from /metrics: steps run and seconds by part (step, ternary,
    attention, head, sample), summed since it started."""
    import httpx

    clock = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("nanochat_engine_steps_total "):
            clock["steps"] = float(line.split()[1])
        elif line.startswith('nanochat_engine_seconds_total{part="'):
            name, value = line.split()
            clock[name.split('"')[1]] = float(value)
    return clock


def engine_split(before: dict, after: dict, elapsed: float) -> dict:
    """Where a run's time went in our engine: the share of the wall time it spent stepping
    (the rest is the HTTP server, the clients and waiting) and a mean step's parts in ms."""
    steps = after["steps"] - before["steps"]
    per_step = {k: (after[k] - before[k]) / steps * 1e3 if steps else 0.0
                for k in after if k != "steps"}
    per_step["other"] = per_step["step"] - sum(v for k, v in per_step.items() if k != "step")
    return {"engine_busy": (after["step"] - before["step"]) / elapsed, "steps": int(steps),
            "step_ms": per_step}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_server(arg: str | None) -> tuple[str | None, str]:
    """(llama-server's path, or None and why not)."""
    hint = ("build it with tools/build_llama_server.sh (from the llama.cpp source in the "
            "llama-cpp-python sdist) and pass --llama-server PATH")
    if arg is not None:
        p = Path(arg)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p), ""
        return None, f"--llama-server {arg}: no such executable; {hint}"
    found = shutil.which("llama-server")
    if found:
        return found, ""
    if BUILT_LLAMA_SERVER.is_file() and os.access(BUILT_LLAMA_SERVER, os.X_OK):
        return str(BUILT_LLAMA_SERVER.resolve()), ""
    return None, f"llama-server is not on PATH nor at ./{BUILT_LLAMA_SERVER}; {hint}"


class Child:
    """A server child process, its output in a temporary file (a pipe nobody reads would
    fill and stall it), stopped on exit."""

    def __init__(self, name: str, cmd: list[str], url: str):
        import httpx

        self.name, self.url = name, url
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives until close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            deadline = time.monotonic() + 180
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {self.proc.returncode}: "
                                       f"{self.output()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer /health within 180 s: "
                                       f"{self.output()[-2000:]}")
                time.sleep(0.2)
            self.model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        except BaseException:
            self.close()
            raise

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def nanochat_cmd(path: Path, port: int, args, counts: list[int]) -> list[str]:
    return [sys.executable, "-m", "nanochat", "serve", "--model", str(path), "--port", str(port),
            "--max-batch", str(max(counts)), "--max-queue", str(max(counts)),
            "--threads", str(args.threads)]


def llama_cmd(binary: str, path: Path, port: int, args, counts: list[int]) -> list[str]:
    k = max(counts)
    threads = args.threads or os.cpu_count() or 1
    # Each slot's share of the context: the prompt and max_tokens with room to spare.
    per_slot = (args.max_tokens + 64 + 255) // 256 * 256
    return [binary, "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(k), "-cb", "-c", str(k * per_slot), "--threads", str(threads),
            "--threads-batch", str(threads), "--no-webui"]


def main(args: argparse.Namespace) -> int:
    try:
        counts = [int(x) for x in args.streams.split(",")]
    except ValueError:
        raise ValueError(f"--streams: expected comma-separated integers, got {args.streams!r}")
    if not counts or min(counts) < 1 or max(counts) > 128:
        raise ValueError(f"--streams: each count must be in [1, 128], got {args.streams!r}")
    if args.seconds <= 0 or args.max_tokens < 1:
        raise ValueError("--seconds must be > 0 and --max-tokens >= 1")
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    llama = None
    if not args.no_llama:
        llama, why = find_llama_server(args.llama_server)
        if llama is None:
            log(f"[bench serve] llama.cpp's server is not driven: {why}. Only nanochat rows.")
    variant = None
    if args.model:
        path = Path(args.model)
        if not path.is_file():
            raise FileNotFoundError(f"--model: {path} does not exist")
    else:
        from nanochat.bench.decode import bench_model, model_file

        cfg, variant = bench_model(args.config, llama is not None)
        path = model_file(args.config, "q8_0", log, cfg)
        if variant:
            log(f"[bench serve] {args.config}: both servers run its {variant}, which "
                f"llama.cpp can load (bench decode's rule)")
    name = args.model or args.config
    servers = [("nanochat", "nanochat serve", nanochat_cmd, {})]
    if llama is not None:
        servers.append(("llama.cpp", "llama-server",
                        lambda *a: llama_cmd(llama, *a), LLAMA_EXTRA))
    if not args.json:
        print(f"{name}{' (' + variant + ')' if variant else ''}: {path.name}, "
              f"{args.threads or 'all'} threads, {args.seconds:g} s per client count, "
              f"{args.max_tokens} tokens per request")
        print(f"{'engine':>9} {'streams':>7} {'tokens/s':>9} {'ttft p50':>9} {'ttft p99':>9} "
              f"{'itl p50':>8} {'itl p99':>8} {'requests':>8} {'short':>5} {'errors':>6}")
    rows: list[dict] = []
    for engine, label, make_cmd, extra in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            child = Child(label, make_cmd(path, port, args, counts), url)
        except RuntimeError as e:
            if engine == "nanochat":
                raise
            log(f"[bench serve] llama.cpp's server could not serve {path}: {e}")
            continue
        try:
            for k in counts:
                before = engine_clock(url) if engine == "nanochat" else None
                row = asyncio.run(drive(Target(engine, url, child.model, extra), k,
                                        args.seconds, args.max_tokens))
                if before is not None:
                    row.update(engine_split(before, engine_clock(url), row["seconds"]))
                row.update(config=None if args.model else args.config, variant=variant,
                           threads=args.threads, max_tokens=args.max_tokens)
                ours = [r for r in rows if r["engine"] == "nanochat" and r["streams"] == k]
                if engine != "nanochat" and ours and row["tokens_per_s"] > 0:
                    row["nanochat_over_this"] = ours[0]["tokens_per_s"] / row["tokens_per_s"]
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{engine:>9} {k:>7} {row['tokens_per_s']:>9.1f} "
                          f"{row['ttft_p50_s']:>8.3f}s {row['ttft_p99_s']:>8.3f}s "
                          f"{row['itl_p50_s'] * 1e3:>6.1f}ms {row['itl_p99_s'] * 1e3:>6.1f}ms "
                          f"{row['requests']:>8} {row['short']:>5} {row['errors']:>6}",
                          flush=True)
        finally:
            child.close()
    if not args.json:
        for r in rows:
            if "engine_busy" in r:
                parts = " + ".join(f"{k} {v:.1f}" for k, v in r["step_ms"].items() if k != "step")
                print(f"nanochat {r['streams']} streams: engine stepping {r['engine_busy']:.0%} "
                      f"of the wall time, {r['steps']} steps of {r['step_ms']['step']:.1f} ms "
                      f"= {parts} ms")
        for r in rows:
            if "nanochat_over_this" in r:
                print(f"{r['streams']} streams: nanochat {r['nanochat_over_this']:.2f}x "
                      f"llama-server's tokens/s")
    return 0
