"""The lm-evaluation-harness adapter on locally defined tasks (tests/data/lmeval: three YAML
tasks over JSONL files; nothing is downloaded).

    pytest -m lmeval tests/test_lm_eval.py      (.ci/run's lm-eval stage installs lm-eval)

Checked against the torch model computed directly: every loglikelihood request, the rolling
loglikelihood (and against nanochat eval bpb's windows), greedy generation cut at `until`;
and the GGUF on the C++ engine against torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.lmeval

lm_eval = pytest.importorskip("lm_eval")

from nanochat.eval import bpb  # noqa: E402
from nanochat.eval.lm_eval import NanochatLM  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lmeval"
NAMES = ["nanochat_mc", "nanochat_rolling", "nanochat_gen"]
# nanochat_gen.yaml's generation_kwargs. The space makes a stop certain within 16 greedy
# tokens whatever the tiny model learned (a CI run's model wrote neither of the other two).
UNTIL = ["\n", "(", " "]
# GGUF (fp16 embedding, float32 engine) against torch (fp32 weights, float64 log-softmax):
# per continuation, within this many nats per token.
GGUF_NATS_PER_TOKEN = 0.02


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, a private datasets cache, and the task dir as cwd (the YAML's data_files
    are relative paths, which `datasets` resolves against cwd)."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(TASKS)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread for the adapter's runs and the direct sums alike: float32 GEMMs split
    over another thread count round differently (~1e-5 relative), and tiny forwards on two
    busy cores stall each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _evaluate(path, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    saved = os.getcwd()
    os.chdir(TASKS)
    try:
        return simple_evaluate(model="nanochat", model_args={"path": str(path)}, tasks=tasks,
                               task_manager=TaskManager(include_path=str(TASKS)),
                               log_samples=True)
    finally:
        os.chdir(saved)


# Generation runs on the engine only: torch's per-token generate is what makes this stage
# slow (minutes on a busy 2-core machine), and both backends share cut_at.
@pytest.fixture(scope="module")
def torch_results(trained_tiny):
    return _evaluate(trained_tiny["run"], NAMES[:2])


@pytest.fixture(scope="module")
def gguf_results(trained_tiny):
    return _evaluate(trained_tiny["gguf"], NAMES)


def _direct_logprob(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | <|bos|> context) from one torch forward over the
    inputs (float32 sums of another sequence length differ by ~1e-5 relative), with the
    split lm-eval's TemplateLM makes (trailing spaces of the context move over)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = [tok.bos_id, *tok.encode(context + continuation)]
    n_ctx = len([tok.bos_id, *tok.encode(context)]) if context else 1
    with torch.no_grad():  # the last token is a target only
        lp = torch.log_softmax(model(torch.tensor([whole[:-1]])).double()[0], -1)
    return float(sum(lp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_loglikelihood_equals_torch(trained_tiny, torch_results):
    samples = torch_results["samples"]["nanochat_mc"]
    assert len(samples) == 6
    for s in samples:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"], strict=True):
            want = _direct_logprob(trained_tiny["model"], trained_tiny["tok"], ctx, cont)
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-4), (ctx, cont)
    assert 0.0 <= torch_results["results"]["nanochat_mc"]["acc,none"] <= 1.0


def test_rolling_equals_direct_and_bpb_windows(trained_tiny, torch_results):
    model, tok = trained_tiny["model"], trained_tiny["tok"]
    samples = torch_results["samples"]["nanochat_rolling"]
    docs = [json.loads(x)["text"] for x in (TASKS / "docs.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    for s in samples:  # every doc fits one window of the model's context here
        text = s["doc"]["text"]
        assert float(s["resps"][0][0]) == pytest.approx(_direct_rolling(model, tok, text),
                                                         abs=1e-4)
    # several windows: lm-eval's rolling windows are eval bpb's non-overlapping ones when the
    # tokens fill them exactly (bpb drops a partial last window; lm-eval gives it context)
    lm = NanochatLM(str(trained_tiny["run"]), max_length=32)
    text = docs[1]
    while len(tok.encode(text)) % 32:
        text += "#"
    ids = tok.encode(text)
    assert len(ids) >= 96
    (got,) = lm.loglikelihood_rolling([_Req((text,))], disable_tqdm=True)
    stream = np.array([tok.bos_id, *ids])
    total = bpb.score_stream(lm.scorer, stream, lm.scorer.token_bytes, seq_len=32)
    assert total.tokens == len(ids)
    assert got == pytest.approx(-total.nats, abs=1e-4)


class _Req:
    def __init__(self, args):
        self.args = args


def _direct_rolling(model, tok, text: str) -> float:
    ids = [tok.bos_id, *tok.encode(text)]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], -1)
    return float(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))


def test_generate_until_stops_at_until(trained_tiny, gguf_results):
    scorer = bpb.EngineScorer(trained_tiny["gguf"])
    cut = 0
    for s in gguf_results["samples"]["nanochat_gen"]:
        (out,) = s["resps"][0]
        assert not any(u in out for u in UNTIL), out
        ids = [scorer.bos_id, *scorer.encode(s["doc"]["prompt"])]
        full = scorer.generate(ids, 16, [])  # no stop strings: the whole greedy continuation
        assert full.startswith(out)
        if len(full) > len(out):
            assert full[len(out):].startswith(tuple(UNTIL)), (out, full)
            cut += 1
    assert cut >= 1  # at least one generation was actually stopped by an until string


def test_gguf_agrees_with_torch(trained_tiny, torch_results, gguf_results):
    for task in NAMES[:2]:
        pairs = zip(torch_results["samples"][task], gguf_results["samples"][task], strict=True)
        for st, se in pairs:
            for rt, re_, arg in zip(st["resps"], se["resps"], st["arguments"], strict=True):
                text = arg[-1]  # the continuation, or the whole text (rolling)
                n = max(1, len(trained_tiny["tok"].encode(text)))
                got, want = (re_[0][0], rt[0][0]) if task == "nanochat_mc" else (re_[0], rt[0])
                assert float(got) == pytest.approx(float(want), abs=GGUF_NATS_PER_TOKEN * n), \
                    (task, text)


def test_bad_arguments_are_named(trained_tiny):
    with pytest.raises(ValueError, match="max_length"):
        NanochatLM(str(trained_tiny["gguf"]), max_length=10**6)
    lm = NanochatLM(str(trained_tiny["gguf"]))
    with pytest.raises(ValueError, match="top_p"):
        lm.generate_until([_Req(("def f(", {"until": [")"], "top_p": 0.9}))], True)
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_Req(("def f(", {"do_sample": True}))], True)


def test_cli_runs_lm_eval_with_nanochat_registered(trained_tiny, tmp_path, run_nanochat):
    """`nanochat eval lm-eval` = lm_eval's own CLI plus the "nanochat" model."""
    out = tmp_path / "out"
    p = run_nanochat(["eval", "lm-eval", "--model", "nanochat", "--model_args",
                      f"path={trained_tiny['gguf']}", "--tasks", "nanochat_mc",
                      "--include_path", str(TASKS), "--output_path", str(out)],
                     timeout=300, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                     HF_DATASETS_CACHE=str(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert results, p.stdout
    assert "acc,none" in json.loads(results[0].read_text())["results"]["nanochat_mc"]


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by a full forward per token (no KV cache: independent of the
    model's generate)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def test_generate_until_on_torch(trained_tiny):
    """lm-eval's generate_until task on a run directory (the torch path): each response is
    the torch model's own greedy continuation of <|bos|> prompt, cut before the first
    `until` string, and at least one was cut."""
    res = _evaluate(trained_tiny["run"], ["nanochat_gen"])
    model, tok = trained_tiny["model"], trained_tiny["tok"]
    cut = 0
    for s in res["samples"]["nanochat_gen"]:
        (out,) = s["resps"][0]
        full = tok.decode(_greedy(model, [tok.bos_id, *tok.encode(s["doc"]["prompt"])], 16))
        want = bpb.cut_at(full, UNTIL)
        assert out == want, (out, full)
        cut += len(want) < len(full)
    assert cut >= 1
