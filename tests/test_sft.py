"""nanochat sft (nanochat/train/sft.py): a tiny model fine-tuned a few dozen steps on a small
chat set lowers the held-out assistant loss, the loss counts assistant tokens only, resume is
exact, the output is a normal run directory (export --gguf), and bad setups are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nanochat import checkpoint
from nanochat.cli import main
from nanochat.config import apply_overrides
from nanochat.data import chat
from nanochat.train.loop import train
from nanochat.train.sft import ChatSource, sft
from test_train import _small_sets, data_dir, quiet, small_config  # noqa: F401 (fixture)

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def _tiny(**train):  # d_model 256: the smallest the GGUF export takes
    return apply_overrides(small_config(**train), [
        "model.n_layers=1", "model.ffn_hidden=256", "train.eval_tokens=256", "optim.lr=3e-3"])


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> Path:  # noqa: F811 (fixture)
    out = tmp_path_factory.mktemp("base")
    train(_tiny(max_steps=4), data_dir, out, progress_bar=False, log=quiet)
    return out


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """60 short conversations whose replies follow from the question (learnable fast)."""
    f = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = []
    for i in range(60):
        w = WORDS[i % len(WORDS)]
        msgs = [{"role": "user", "content": f"repeat {w}"},
                {"role": "assistant", "content": f"{w} {w}"}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "be terse"}] + msgs
        rows.append(json.dumps({"messages": msgs}))
    rows.insert(5, json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    f.write_text("\n".join(rows) + "\n")
    return f


def test_sft_lowers_the_assistant_loss(base, chat_file, tmp_path):
    _, summary = sft([chat_file], tmp_path / "a", base, steps=20,
                     overrides=["train.eval_every=20", "train.checkpoint_every=20"],
                     progress_bar=False, log=quiet)
    assert summary["val_loss_after"] < 0.5 * summary["val_loss_before"], summary
    assert summary["bad_rows"] == 1 and summary["bad"][0].endswith(
        "chat.jsonl:6: message 0: expected a user message, got assistant (the first turn "
        "must be the user's)")
    assert json.loads((tmp_path / "a" / "sft.json").read_text())["steps"] == 20
    assert (tmp_path / "a" / "tb").is_dir() and (tmp_path / "a" / "config.json").is_file()


@pytest.mark.slow  # three short runs with checkpoints: ~15 s on an idle 2-core machine
def test_sft_resumes_exactly(base, chat_file, tmp_path):
    sets = ["train.log_every=1", "train.eval_every=6", "train.checkpoint_every=3"]
    straight, summary = sft([chat_file], tmp_path / "a", base, steps=6, overrides=sets,
                            progress_bar=False, log=quiet)
    first, _ = sft([chat_file], tmp_path / "b", base, steps=6, overrides=sets,
                   progress_bar=False, stop_at_step=3, log=quiet)
    second, summary_b = sft([chat_file], tmp_path / "b", None, steps=6, overrides=sets,
                            resume=True, progress_bar=False, log=quiet)
    assert first.losses + second.losses == straight.losses  # exact
    assert summary_b["val_loss_before"] == summary["val_loss_before"]
    a, b = (checkpoint.load(tmp_path / r)["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loss_counts_assistant_tokens_only(base, chat_file):
    """Gradient reaches no logit at a position whose next token is not the assistant's,
    and the training loss equals the mean over assistant targets."""
    state = checkpoint.load(base)
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.model.load import load_model

    tok = Tokenizer.load(state["path"] / "tokenizer")
    m = chat.Markers.of(tok.special_tokens, "t")
    cs = chat.load([chat_file], chat.renderer(tok.encode, m), 65)
    src = ChatSource(tok, state["path"], cs)
    x, y, doc = src.loader(4, 64, seed=0, prefetch=0).build_batch(0)
    model, _, _ = load_model(base)
    logits = model(x, doc_start=doc).detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                             ignore_index=-1)
    loss.backward()
    off = (y < 0)
    assert off.any() and (~off).any()
    assert logits.grad[off].abs().max() == 0
    assert logits.grad[~off].abs().sum() > 0
    # the targets are assistant text and <|assistant_end|>, never a marker of the prompt
    assert not set(y[~off].tolist()) & {m.user_start, m.user_end, m.assistant_start, m.bos}
    assert m.assistant_end in y[~off].tolist()
    _, model_loss = model(x, y, doc_start=doc)
    torch.testing.assert_close(model_loss, loss.detach())


def test_sft_output_exports_to_gguf(base, chat_file, tmp_path):
    sft([chat_file], tmp_path / "c", base, steps=2, progress_bar=False, log=quiet)
    assert main(["export", "--gguf", str(tmp_path / "c.gguf"), "--checkpoint",
                 str(tmp_path / "c")]) == 0
    from gguf import GGUFReader

    r = GGUFReader(str(tmp_path / "c.gguf"))
    f = r.fields["tokenizer.chat_template"]
    assert bytes(f.parts[f.data[0]]).decode() == chat.CHAT_TEMPLATE


def test_bad_setups_are_refused(base, chat_file, tmp_path, capsys):
    assert main(["sft", "--data", str(chat_file), "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint RUN" in capsys.readouterr().err
    assert main(["sft", "--checkpoint", str(base), "--data", str(chat_file), "--out",
                 str(tmp_path / "x"), "--set", "train.collider.enabled=true",
                 "--no-progress"]) == 2
    assert "Collider" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    assert main(["sft", "--checkpoint", str(base), "--data", str(bad), "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no usable conversation" in err
    assert main(["sft", "--checkpoint", str(base), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
