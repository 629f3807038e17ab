"""nanochat eval bpb: the trainer's held-out number, on the torch model and on the engine.

    pytest tests/test_eval_bpb.py
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from nanochat.config import from_dict
from nanochat.data.dataset import TokenData
from nanochat.eval import bpb
from nanochat.train.loop import evaluate as trainer_evaluate

SEQ, EVAL_TOKENS = 128, 4096  # trained_tiny's train.seq_len and train.eval_tokens
# The engine against torch on the same windows: the engine stores the embedding as fp16 and
# computes in float32 (torch: fp32 embedding, float64 log-softmax here), so per-token
# log-probs differ by ~1e-3 nats and the mean over thousands of targets by far less.
ENGINE_BPB_RTOL = 2e-3


@pytest.fixture
def run_copy(trained_tiny, tmp_path):
    """A run directory of its own (eval/ is written into it) sharing the checkpoints."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(trained_tiny["run"] / "checkpoints")
    shutil.copy(trained_tiny["run"] / "config.json", run / "config.json")
    return run


def test_torch_bpb_is_the_trainers(trained_tiny, one_thread):
    """Same windows and convention as the trainer's evaluate() on the same model."""
    r = bpb.evaluate(trained_tiny["run"], trained_tiny["data"], seq_len=SEQ,
                     max_tokens=EVAL_TOKENS)
    scorer = bpb.TorchScorer(trained_tiny["run"])
    cfg = from_dict(json.loads((trained_tiny["run"] / "config.json").read_text()), "config")
    loss, want = trainer_evaluate(scorer.model, TokenData(trained_tiny["data"]), cfg,
                                  torch.device("cpu"))
    assert r["bpb"] == pytest.approx(want, rel=1e-6)
    assert r["loss"] == pytest.approx(loss, rel=1e-6)
    assert r["tokens"] == (EVAL_TOKENS - 1) // SEQ * SEQ
    assert r["backend"] == "torch" and r["seq_len"] == SEQ
    # and the number the trainer logged at its last step (its own BitLinear kernel)
    logged = [json.loads(x) for x in (trained_tiny["run"] / "metrics.jsonl").read_text()
              .splitlines()]
    assert r["bpb"] == pytest.approx([m for m in logged if "val_bpb" in m][-1]["val_bpb"],
                                     rel=1e-4)


def test_engine_bpb_equals_torch(trained_tiny, one_thread):
    t = bpb.evaluate(trained_tiny["run"], trained_tiny["data"], seq_len=SEQ, max_tokens=2048)
    e = bpb.evaluate(trained_tiny["gguf"], trained_tiny["data"], seq_len=SEQ, max_tokens=2048)
    assert e["backend"] == "gguf"
    assert (e["tokens"], e["bytes"]) == (t["tokens"], t["bytes"])
    assert e["bpb"] == pytest.approx(t["bpb"], rel=ENGINE_BPB_RTOL)


def test_text_folder_tokenized_like_prepare(trained_tiny, tmp_path, one_thread):
    """A folder of text: <|bos|> + tokens per document in path order, the same ids from the
    checkpoint's tokenizer and the engine's; --max-tokens bounds the count."""
    src = tmp_path / "src"
    src.mkdir()
    docs = {"b.py": "def f(x):\n    return x * 2\n", "a.py": "import os\nprint(os.sep)\n",
            "c.txt": "not read: wrong extension"}
    for name, text in docs.items():
        (src / name).write_text(text)
    torch_s, eng_s = bpb.TorchScorer(trained_tiny["run"]), bpb.EngineScorer(trained_tiny["gguf"])
    tok = trained_tiny["tok"]
    want = [tok.bos_id, *tok.encode(docs["a.py"]), tok.bos_id, *tok.encode(docs["b.py"])]
    for s in (torch_s, eng_s):
        stream = bpb.tokens_from(src, s)
        assert stream.tokens.tolist() == want
    assert np.array_equal(torch_s.token_bytes, eng_s.token_bytes)
    r = bpb.evaluate(trained_tiny["gguf"], src, seq_len=8, max_tokens=17)
    assert r["tokens"] == 16 and math.isfinite(r["bpb"])


def test_cli_writes_run_eval_json(run_copy, trained_tiny, run_nanochat):
    p = run_nanochat(["eval", "bpb", "--model", str(run_copy), "--data",
                      str(trained_tiny["data"]), "--max-tokens", "600", "--seq-len", "64",
                      "--json"], NANOCHAT_NUM_THREADS="1", OMP_NUM_THREADS="1")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    saved = json.loads((run_copy / "eval" / "bpb.json").read_text())
    assert {"task", "model", "bpb", "tokens", "bytes", "seconds"} <= set(saved)
    assert saved["task"] == "bpb" and saved["tokens"] == 576 and saved["bpb"] == out["bpb"]


def test_bad_inputs_name_the_argument(trained_tiny, tmp_path, run_nanochat):
    from nanochat.data import corpus

    # a data dir prepared with another tokenizer (vocab 512): refused, not scored
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    other = corpus.prepare([str(src)], tmp_path / "other", vocab_size=512, val_fraction=0.5,
                           progress=False).out_dir
    with pytest.raises(ValueError, match="--data .*tokenizer"):
        bpb.evaluate(trained_tiny["gguf"], other)
    with pytest.raises(ValueError, match="--seq-len"):
        bpb.evaluate(trained_tiny["gguf"], src, seq_len=100000)
    p = run_nanochat(["eval", "bpb", "--model", str(tmp_path / "none.gguf"), "--data",
                      str(src)])
    assert p.returncode == 2 and "none.gguf" in p.stderr, p.stderr
