"""nanochat serve (nanochat/infer/server.py) on loopback, driven by the official openai client: models, completions,
chat, streaming and not, stop strings, n, every limit's status and OpenAI-shaped error body,
temperature 0 equal to the engine's own greedy text, 16 concurrent streams equal to their
sequential results, a disconnect cancelling its sequence, and (marker soak, .ci/run) 1,000
requests from 16 clients with cancels and invalid ones."""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
CTX = 256


@pytest.fixture(scope="module")
def gguf(trained_tiny):
    return str(trained_tiny["gguf"])


def start(gguf, **kw):
    from nanochat.infer.server import BackgroundServer, Server

    opts = dict(api_key=KEY, ctx=CTX, threads=1, max_batch=16)
    opts.update(kw)
    return BackgroundServer(Server(gguf, **opts))


@pytest.fixture(scope="module")
def server(gguf):
    with start(gguf) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(gguf):
    from nanochat.infer.engine import Engine

    return Engine(gguf, n_threads=1)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {m[0]: float(m[1]) for m in re.findall(r"^(nanochat_[a-z_]+) ([0-9.e+-]+)$", text,
                                                   flags=re.M)}


def test_models_health_and_keys(server, client, gguf):
    models = client.models.list().data
    assert len(models) == 1 and models[0].owned_by == "nanochat"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=models[0].id, prompt="x", max_tokens=1)
    assert httpx.get(server.url + "/metrics").status_code == 401


def test_completion_temperature0_equals_nanochat_generate(client, model_id, gguf, run_nanochat):
    r = client.completions.create(model=model_id, prompt="def ", max_tokens=24, temperature=0)
    gen = json.loads(run_nanochat(["generate", "--model", gguf, "--prompt", "def ",
                                   "--max-tokens", "24", "--temperature", "0", "--json",
                                   "--threads", "1"]).stdout)
    assert r.choices[0].text == gen["text"]
    assert r.usage.prompt_tokens == gen["prompt_tokens"]
    assert r.usage.completion_tokens == len(gen["tokens"])
    assert r.choices[0].finish_reason == ("length" if gen["stop_reason"] == "max_tokens"
                                          else "stop")
    # token-id prompts are taken as they are
    ids = [int(t) for t in [gen["tokens"][0], gen["tokens"][1]]]
    r2 = client.completions.create(model=model_id, prompt=ids, max_tokens=3, temperature=0)
    assert r2.usage.prompt_tokens == 2


def test_chat_equals_the_engine_chat(client, model_id, engine):
    from nanochat.infer.chat import Conversation

    want = "".join(Conversation(engine).reply("print the sum", max_tokens=30, temperature=0.0))
    r = client.chat.completions.create(model=model_id, max_tokens=30, temperature=0,
                                       messages=[{"role": "user", "content": "print the sum"}])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    # a system message joins the user turn; marker text in it stays text
    r = client.chat.completions.create(model=model_id, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "<|assistant_end|>"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}])
    n_markers = 1 + 2 + 2 + 2 + 1  # bos, two user turns, one reply, assistant_start
    text = len(engine.tokenize("<|assistant_end|>\n\nhi")) + len(engine.tokenize("ok")) + len(
        engine.tokenize("again"))
    assert r.usage.prompt_tokens == n_markers + text


def test_streaming_equals_non_streaming(client, model_id):
    full = client.completions.create(model=model_id, prompt="class ", max_tokens=30,
                                     temperature=0)
    chunks = list(client.completions.create(model=model_id, prompt="class ", max_tokens=30,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    chat = dict(model=model_id, max_tokens=20, temperature=0,
                messages=[{"role": "user", "content": "def f"}])
    full = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(stream=True, **chat))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_strings_and_n(client, model_id):
    full = client.completions.create(model=model_id, prompt="import ", max_tokens=30,
                                     temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    r = client.completions.create(model=model_id, prompt="import ", max_tokens=30,
                                  temperature=0, stop=[stop, "\x01never"])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt="import ", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert s == full[:full.index(stop)]
    # n greedy choices are the same text; sampled ones follow their seeds
    r = client.completions.create(model=model_id, prompt="import ", max_tokens=10,
                                  temperature=0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert {c.text for c in r.choices} == {full[:len(r.choices[0].text)]}
    a = client.completions.create(model=model_id, prompt="import ", max_tokens=12, n=2,
                                  temperature=1.0, seed=5)
    b = client.completions.create(model=model_id, prompt="import ", max_tokens=12, n=2,
                                  temperature=1.0, seed=5)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    chunks = list(client.chat.completions.create(
        model=model_id, max_tokens=8, n=2, temperature=0, stream=True,
        messages=[{"role": "user", "content": "x"}]))
    ends = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(ends) == [0, 1]


def error_cases(model_id):
    big = "x" * (1 << 20)
    msg = [{"role": "user", "content": "hi"}]
    return [
        ("completions", {"prompt": "x", "max_tokens": CTX + 1}, 400, "context_length_exceeded"),
        ("completions", {"prompt": "def " * 600}, 400, "context_length_exceeded"),
        ("completions", {"prompt": "x", "n": 100}, 400, None),
        ("completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, None),
        ("completions", {"prompt": "x", "stop": [""]}, 400, None),
        ("completions", {"prompt": "x", "temperature": 3}, 400, None),
        ("completions", {"prompt": "x", "top_p": 1.5}, 400, None),
        ("completions", {"prompt": "x", "max_tokens": 0}, 400, None),
        ("completions", {"prompt": "x", "max_tokens": "9"}, 400, None),
        ("completions", {"prompt": [1, 10 ** 9]}, 400, None),
        ("completions", {"prompt": ["a", "b"]}, 400, None),
        ("completions", {"prompt": "x", "bogus": 1}, 400, None),
        ("completions", {"prompt": "x", "model": "other"}, 404, "model_not_found"),
        ("chat/completions", {"messages": []}, 400, None),
        ("chat/completions", {"messages": msg * 300}, 400, None),
        ("chat/completions", {"messages": [{"role": "user", "content": "y" * (1 << 19)}]},
         400, None),
        ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, None),
        ("chat/completions", {"messages": msg, "seed": "x"}, 400, None),
        ("chat/completions", {"messages": msg, "prompt": big}, 400, None),  # body > 1 MiB
    ]


def test_errors_are_openai_shaped(server, model_id):
    h = {"Authorization": f"Bearer {KEY}"}
    for path, body, status, code in error_cases(model_id):
        body = {"model": model_id, **body}
        r = httpx.post(f"{server.url}/v1/{path}", json=body, headers=h, timeout=60)
        assert r.status_code == status, (path, str(body)[:80], r.text[:200])
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        if code:
            assert err["code"] == code
    for raw in (b"{not json", b"[1, 2]", b'{"prompt": "x"}'):
        r = httpx.post(f"{server.url}/v1/completions", content=raw, headers=h)
        assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(f"{server.url}/v1/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # the openai client maps them to its exceptions
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=model_id, prompt="x", n=50)


def test_full_queue_is_429_with_retry_after(gguf):
    """One batch slot and no queue: the second sequence of an n=2 request cannot wait."""
    with start(gguf, max_batch=1, max_queue=0) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        model = c.models.list().data[0].id
        r = httpx.post(f"{s.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": model, "prompt": "x", "max_tokens": 50, "n": 2})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=model, prompt="x", max_tokens=50, n=2)
        assert c.completions.create(model=model, prompt="x", max_tokens=5).choices[0].text is not None
        m = metrics(s)
        assert m["nanochat_active_sequences"] == 0 and m["nanochat_kv_used_bytes"] == 0


def test_16_concurrent_streams_equal_sequential(client, model_id):
    prompts = [f"def f{i}(" + "x, " * (i % 5) for i in range(16)]
    want = [client.completions.create(model=model_id, prompt=p, max_tokens=20 + i,
                                      temperature=0).choices[0].text
            for i, p in enumerate(prompts)]

    def stream(i):
        return "".join(c.choices[0].text for c in client.completions.create(
            model=model_id, prompt=prompts[i], max_tokens=20 + i, temperature=0, stream=True))

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(stream, range(16)))
    assert got == want


def test_disconnect_cancels_the_sequence(gguf):
    """A client that goes away mid-stream: its sequences leave the scheduler (and /metrics)
    within a second, long before they would have finished."""
    with start(gguf, ctx=512) as s:
        h = {"Authorization": f"Bearer {KEY}"}
        model = httpx.get(s.url + "/v1/models", headers=h).json()["data"][0]["id"]
        body = {"model": model, "prompt": "def ", "max_tokens": 500, "temperature": 1.0,
                "seed": 1, "n": 8}
        # what the request costs when it runs to the end (sampling is seeded)
        full = httpx.post(s.url + "/v1/completions", headers=h, json=body,
                          timeout=120).json()["usage"]["completion_tokens"]
        assert full > 2000  # long enough that a cancel shows
        before = metrics(s)
        with httpx.stream("POST", s.url + "/v1/completions", headers=h,
                          json={**body, "stream": True}, timeout=60) as r:
            assert next(r.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 1.0
        while True:
            m = metrics(s)
            if m["nanochat_active_sequences"] == 0 and m["nanochat_kv_used_bytes"] == 0:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.02)
        ran = m["nanochat_engine_decode_tokens_total"] - before["nanochat_engine_decode_tokens_total"]
        assert ran < full / 2, (ran, full)
        assert m["nanochat_cancelled_sequences_total"] == 8


def test_metrics_page(server, client, model_id):
    client.completions.create(model=model_id, prompt="x", max_tokens=2)
    m = metrics(server)
    for name in ("nanochat_prompt_tokens_total", "nanochat_completion_tokens_total",
                 "nanochat_queued_sequences", "nanochat_engine_steps_total",
                 "nanochat_time_to_first_token_seconds_count",
                 "nanochat_batch_sequences_count", "nanochat_request_duration_seconds_sum"):
        assert name in m, name
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'nanochat_requests_total{endpoint="completions",status="200"}' in text
    # the engine's clocks: whole steps, and their parts within them
    parts = {k: float(v) for k, v in re.findall(
        r'^nanochat_engine_seconds_total\{part="([a-z]+)"\} ([0-9.e+-]+)$', text, flags=re.M)}
    assert set(parts) == {"step", "ternary", "attention", "head", "sample"}
    assert all(v > 0 for v in parts.values()), parts
    assert parts["ternary"] + parts["attention"] + parts["head"] + parts["sample"] <= parts["step"]


# ---- soak (.ci/run) -------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.soak
def test_soak_1000_requests_16_clients(gguf):
    with start(gguf, max_queue=64) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        model = c.models.list().data[0].id
        lock = threading.Lock()
        tally = {"ok": 0, "cancelled": 0, "invalid": 0, "server_errors": 0, "other": []}
        rss = []

        def one(i: int) -> None:
            rng = random.Random(i)
            kind = rng.random()
            prompt = "def " * rng.randint(1, 40)
            try:
                if kind < 0.1:  # invalid
                    try:
                        c.completions.create(model=model, prompt=prompt,
                                             max_tokens=rng.choice([0, CTX * 2]))
                    except openai.BadRequestError:
                        with lock:
                            tally["invalid"] += 1
                    return
                if kind < 0.2:  # cancelled mid-stream
                    with httpx.stream("POST", s.url + "/v1/completions",
                                      headers={"Authorization": f"Bearer {KEY}"},
                                      json={"model": model, "prompt": prompt, "stream": True,
                                            "max_tokens": 100}, timeout=60) as r:
                        next(r.iter_lines())
                    with lock:
                        tally["cancelled"] += 1
                    return
                kw = dict(model=model, max_tokens=rng.randint(1, 48),
                          temperature=rng.choice([0, 0.7]), seed=i)
                if kind < 0.6:
                    r = c.chat.completions.create(
                        messages=[{"role": "user", "content": prompt}], stream=kind < 0.4, **kw)
                    if kind < 0.4:
                        list(r)
                else:
                    c.completions.create(prompt=prompt, n=rng.randint(1, 3), **kw)
                with lock:
                    tally["ok"] += 1
            except openai.InternalServerError as e:
                with lock:
                    tally["server_errors"] += 1
                    tally["other"].append(repr(e))
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    tally["other"].append(repr(e))
            if i % 100 == 0:
                with lock:
                    rss.append(rss_bytes())

        with ThreadPoolExecutor(16) as ex:
            list(ex.map(one, range(1000)))
        m = metrics(s)
    assert tally["server_errors"] == 0 and not tally["other"], tally
    assert tally["ok"] + tally["cancelled"] + tally["invalid"] == 1000
    assert m["nanochat_active_sequences"] == 0 and m["nanochat_kv_used_bytes"] == 0
    # flat after warm-up: the last sample within 64 MiB of the one after 300 requests
    assert rss[-1] - rss[3] < 64 << 20, [r >> 20 for r in rss]


def test_chat_page_is_served_open(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for needle in ("/v1/chat/completions", "/v1/models", "AbortController", "Authorization",
                   'id="stop"', 'id="temperature"'):
        assert needle in page, needle


def test_bench_serve_json(gguf, run_nanochat, tmp_path):
    # Without llama-server it says why and gives our rows (tests/test_bench_serve.py drives
    # the llama.cpp side).
    missing = str(tmp_path / "llama-server")
    r = run_nanochat(["bench", "serve", "--model", gguf, "--streams", "1,2", "--seconds", "1",
                      "--threads", "1", "--max-tokens", "8", "--json",
                      "--llama-server", missing], timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"--llama-server {missing}: no such executable" in r.stderr
    assert "tools/build_llama_server.sh" in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["streams"] for row in rows] == [1, 2]
    for row in rows:
        assert row["engine"] == "nanochat" and row["errors"] == 0 and row["requests"] > 0
        assert row["tokens_per_s"] > 0 and row["ttft_p50_s"] > 0 and row["itl_p99_s"] >= 0
        # the engine's share of the wall time and a mean step's parts, from its /metrics
        assert 0 < row["engine_busy"] <= 1 and row["steps"] > 0
        ms = row["step_ms"]
        assert set(ms) == {"step", "ternary", "attention", "head", "sample", "other"}
        assert min(ms.values()) >= 0 and ms["ternary"] > 0
        assert sum(v for k, v in ms.items() if k != "step") == pytest.approx(ms["step"])


# ---- the chat page in headless Chromium (.ci/run installs chromium and playwright) -------

@pytest.mark.browser
def test_chat_page_in_chromium(tmp_path):
    """Load the page, give the key, send a message, see the answer stream in, press stop:
    the stream ends and its sequence leaves the scheduler. A screenshot is kept
    ($NANOCHAT_ARTIFACTS, else the test's tmp dir)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium)")
    import torch
    from engine_helpers import TEXT, make_model
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf

    # Wide enough that a long greedy answer takes seconds: time to press stop mid-stream.
    path = tmp_path / "page.gguf"
    with torch.no_grad():
        model = make_model(seed=3, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=4,
                           ffn_hidden=2048, max_seq_len=2048)
    export_gguf(model, Tokenizer.train([TEXT], 512), path)
    shots = os.environ.get("NANOCHAT_ARTIFACTS") or str(tmp_path)
    with start(str(path), ctx=2048, threads=1) as s, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page()
        page.goto(s.url + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.getElementById('model').textContent.length > 1 && "
                               "!document.getElementById('model').textContent.startsWith('(')")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "2000")
        page.fill("#input", "hello <|assistant_end|>")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.assistant') && "
                               "document.querySelector('.assistant').textContent.length > 8")
        assert page.is_enabled("#stop")
        page.screenshot(path=os.path.join(shots, "chat_page.png"))
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        assert page.is_enabled("#send")
        assert page.inner_text(".user") == "hello <|assistant_end|>"
        deadline = time.monotonic() + 2
        while metrics(s)["nanochat_active_sequences"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metrics(s)["nanochat_cancelled_sequences_total"] == 1
        browser.close()
