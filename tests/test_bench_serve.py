"""nanochat bench serve's client side (nanochat/bench/serve.py): its streaming driver against a
stand-in OpenAI-style SSE server (Starlette on uvicorn in a thread) that streams the way
llama-server does (a chunk may carry several tokens; timings.predicted_n counts them) and the
way ours does (one chunk per token), the token-count check against usage, and the message
when llama-server is missing. The real comparison with llama-server (marker llama) runs only
where a llama-server binary is found: .ci/run does not build one (docs/serving.md)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from nanochat.bench import serve as bench

GAP = 0.06  # seconds between the stand-in's chunks


def _chunk(text: str, reason=None, **extra) -> bytes:
    body = {"id": "cmpl-x", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": reason}], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _stand_in_app(bodies: list[dict]):
    """Streams by the request's model: "llama" as llama-server with timings_per_token (the
    2nd chunk carries two tokens, 3 GAP after the 1st; the final chunk none), "ours" one
    token per chunk, "miscount" a usage that disagrees with its chunks, "cut" no [DONE]."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        bodies.append(body)
        model = body["model"]

        async def events():
            if model == "llama":
                for text, n, gap in (("a", 1, 3 * GAP), ("\u00e9", 3, GAP), ("b", 4, GAP)):
                    yield _chunk(text, timings={"predicted_n": n})
                    await asyncio.sleep(gap)
                yield _chunk("", "length", timings={"predicted_n": 4},
                             usage={"completion_tokens": 4, "prompt_tokens": 3})
            else:
                for text in ("a", "b", "c", "d"):
                    yield _chunk(text)
                    await asyncio.sleep(GAP)
                yield _chunk("", "length")
                used = 5 if model == "miscount" else 4
                yield b"data: " + json.dumps({"choices": [], "usage": {
                    "completion_tokens": used, "prompt_tokens": 3}}).encode() + b"\n\n"
            if model != "cut":
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def stand_in():
    bodies: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_stand_in_app(bodies), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", bodies
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _drive(url: str, model: str, extra=None, max_tokens: int = 4) -> dict:
    target = bench.Target("llama.cpp" if model == "llama" else "nanochat", url, model,
                          extra or {})
    return asyncio.run(bench.drive(target, 2, 0.4, max_tokens))


def test_llama_style_stream_counts_tokens_per_chunk(stand_in):
    url, bodies = stand_in
    row = _drive(url, "llama", bench.LLAMA_EXTRA)
    assert row["engine"] == "llama.cpp" and row["errors"] == 0 and row["requests"] >= 2
    assert row["tokens"] == 4 * row["requests"] and row["short"] == 0
    # Gaps: the two-token chunk after 3 GAP counts as two of 1.5 GAP, then one of GAP.
    assert 1.4 * GAP <= row["itl_p99_s"] < 2.5 * GAP
    sent = bodies[-1]
    assert sent["ignore_eos"] is True and sent["timings_per_token"] is True
    assert sent["min_p"] == 0.0 and sent["top_k"] == 0 and sent["top_p"] == 1.0
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_one_token_per_chunk_stream(stand_in):
    url, bodies = stand_in
    row = _drive(url, "ours", max_tokens=8)
    assert row["errors"] == 0 and row["tokens"] == 4 * row["requests"]
    assert row["short"] == row["requests"]  # 4 of the 8 tokens asked for
    assert row["itl_p50_s"] >= 0.9 * GAP
    assert "ignore_eos" not in bodies[-1]


@pytest.mark.parametrize("model", ["miscount", "cut"])
def test_broken_streams_are_errors(stand_in, model):
    url, _ = stand_in
    row = _drive(url, model)
    assert row["errors"] >= 2 and row["requests"] == 0 and row["tokens"] == 0


def test_missing_llama_server_prints_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    path, why = bench.find_llama_server(None)
    assert path is None and "tools/build_llama_server.sh" in why and "PATH" in why
    path, why = bench.find_llama_server(str(tmp_path / "nope"))
    assert path is None and "--llama-server" in why and "nope" in why
    built = tmp_path / bench.BUILT_LLAMA_SERVER
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    assert bench.find_llama_server(None) == (str(built.resolve()), "")


LLAMA_SERVER, NO_LLAMA_SERVER = bench.find_llama_server(None)


@pytest.mark.llama
@pytest.mark.skipif(LLAMA_SERVER is None, reason=NO_LLAMA_SERVER)
def test_against_llama_server(trained_tiny, run_nanochat):
    """Both servers on the same file through the same clients: every llama.cpp request makes
    exactly max_tokens tokens (ignore_eos) and its chunks add up to its usage."""
    path = LLAMA_SERVER
    r = run_nanochat(["bench", "serve", "--model", str(trained_tiny["gguf"]), "--streams",
                      "1,2", "--seconds", "2", "--threads", "1", "--max-tokens", "16",
                      "--llama-server", path, "--json"], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["engine"], row["streams"]) for row in rows] == [
        ("nanochat", 1), ("nanochat", 2), ("llama.cpp", 1), ("llama.cpp", 2)]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0 and row["tokens_per_s"] > 0
    for row in rows[2:]:
        assert row["short"] == 0 and row["tokens"] == 16 * row["requests"]
        assert row["nanochat_over_this"] > 0
