"""Chat fine-tuning (SFT): the trainer of nanochat/train/loop.py on packed conversations.

    nanochat sft --checkpoint runs/base --data chat.jsonl --out runs/chat [--steps N]
    nanochat sft --out runs/chat --data chat.jsonl --resume

Starts from RUN's weights and config (its model, optimizer, schedule and train settings;
--set overrides any), reads the conversations (nanochat/data/chat.py: JSON lines or
parquet, bad rows reported by file:line), holds out every VAL_EVERY-th conversation for the
eval, and trains with the same loop (schedules, optimizers, checkpoints, resume,
TensorBoard, MTP) on packed rows whose loss counts assistant tokens only. val_loss /
val_bpb are the held-out assistant tokens' nats per token and bits per byte. The run
directory is a normal one (`nanochat export --gguf RUN2` works) plus sft.json: the base
checkpoint, the data files, the bad-row report, and the held-out loss before and after.
Collider's token filtering does not apply (its scoring passes carry no doc_start) and is
refused. An imported model (nanochat import hf) keeps its foreign tokenizer, which has no
chat markers: its conversations are rendered with its own chat template (nanochat/data/
template.py), which the run keeps with its tokenizer and export writes to the GGUF.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from nanochat import atomic, checkpoint
from nanochat.config import RunConfig, apply_overrides, from_dict
from nanochat.data import chat, template
from nanochat.data.tokenizer import Tokenizer
from nanochat.model.build import build_model
from nanochat.train import loop

VAL_EVERY = 20  # every 20th conversation is held out (at least one when there are two)
DEFAULT_STEPS = 200


class ChatSource:
    """The loop's data source (loop.train's `source`): packed conversations."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_parent: Path, chats: chat.ChatSet):
        self.tokenizer = tokenizer
        self.dir = tokenizer_parent  # checkpoints copy dir / "tokenizer"
        self.pad = tokenizer.bos_id  # <|bos|> in ours (chat.Markers.bos), BOS in imported ones
        self.all = chats
        self.train, self.val = chats.split(VAL_EVERY)
        if not self.val.ids:  # a single conversation: evaluate on it
            self.val = self.train
        self.token_bytes = torch.as_tensor(tokenizer.token_bytes(), dtype=torch.float64)

    def loader(self, batch_size: int, seq_len: int, **kw) -> chat.ConversationLoader:
        return chat.ConversationLoader(self.train, batch_size, seq_len, pad=self.pad,
                                       **kw)

    @torch.no_grad()
    def evaluate(self, model, cfg: RunConfig, device) -> tuple[float, float]:
        """Held-out assistant tokens: mean nats per token and bits per UTF-8 byte."""
        was_training = model.training
        model.eval()
        rows = chat.pack(self.val.ids, self.val.masks, range(len(self.val.ids)),
                         cfg.train.seq_len, self.pad)
        nats, n_tokens, n_bytes = 0.0, 0, 0.0
        B = cfg.train.batch_size
        for i in range(0, len(rows), B):
            tok = np.stack([r[0] for r in rows[i:i + B]])
            msk = np.stack([r[1] for r in rows[i:i + B]])
            doc = torch.from_numpy(np.stack([r[2] for r in rows[i:i + B]])[:, :-1]).to(device)
            x = torch.from_numpy(tok[:, :-1]).to(device)
            y = torch.from_numpy(np.where(msk[:, 1:], tok[:, 1:], -1)).to(device)
            _, loss = model(x, y, loss_reduction="none", doc_start=doc)
            keep = y >= 0
            nats += float(loss[keep].double().sum())
            n_tokens += int(keep.sum())
            n_bytes += float(self.token_bytes[y[keep].cpu()].sum())
        model.train(was_training)
        return nats / max(n_tokens, 1), nats / (math.log(2) * max(n_bytes, 1.0))


def sft_config(state: dict, steps: int | None, overrides: list[str]) -> RunConfig:
    """The base run's config for fine-tuning: --steps (train.max_steps, default
    DEFAULT_STEPS), no time budget, a warmup of at most a tenth of the run (the base run's
    is sized for pre-training), rows as long as the model's context (a conversation must
    fit one), evals and checkpoints within the run, then --set."""
    cfg = from_dict(state["config"], f"checkpoint {state['path']}")
    t = cfg.train
    n = steps if steps is not None else DEFAULT_STEPS
    base = [f"train.max_steps={n}", "train.time_budget_s=0",
            f"schedule.warmup_steps={min(cfg.schedule.warmup_steps, max(1, n // 10))}",
            f"train.seq_len={cfg.model.max_seq_len}",
            f"train.eval_every={min(t.eval_every, n)}",
            f"train.checkpoint_every={min(t.checkpoint_every, n)}"]
    return apply_overrides(cfg, base + list(overrides))


def sft(data: list[str | Path], out: str | Path, base: str | Path | None = None,
        steps: int | None = None, overrides: list[str] | None = None, resume: bool = False,
        progress_bar: bool = True, stop_at_step: int | None = None, log=print):
    """Fine-tune `base` (a run or checkpoint dir) on the conversations in `data` into `out`;
    with resume, continue `out` from its latest checkpoint. Returns (TrainResult, summary)."""
    out = Path(out)
    if resume:
        state = checkpoint.load(out, log=log)
        saved = json.loads((out / "sft.json").read_text()) if (out / "sft.json").is_file() else {}
        base_path = saved.get("base", str(state["path"]))
    elif base is None:
        raise ValueError("sft: --checkpoint RUN (the model to fine-tune) is required")
    else:
        state = checkpoint.load(Path(base), log=log)
        base_path = str(state["path"])
    cfg = sft_config(state, steps, overrides or [])
    tok_dir = state["path"] / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    if tok.foreign:  # an imported model: its own chat template (nanochat/data/template.py)
        render = template.renderer(tok, str(tok_dir))
    else:
        render = chat.renderer(tok.encode, chat.Markers.of(tok.special_tokens, str(tok_dir)))
    chats = chat.load(data, render, cfg.train.seq_len + 1)
    log("chat data: " + chats.report())
    if not chats.ids:
        raise ValueError(f"no usable conversation in {', '.join(map(str, data))}")
    # checkpoints copy the tokenizer from here; a private copy, since the checkpoint it
    # comes from may be rotated away while this run saves its own (keep_checkpoints)
    tmp = tempfile.TemporaryDirectory(prefix="nanochat-sft-")
    shutil.copytree(tok_dir, Path(tmp.name) / "tokenizer")
    source = ChatSource(tok, Path(tmp.name), chats)
    before = None
    if not resume:
        device = loop.pick_device(cfg.train.device)
        model = build_model(cfg, device, seed=None)
        model.load_state_dict(state["model"])
        before = source.evaluate(model, cfg, device)
        log(f"before fine-tuning: held-out assistant loss {before[0]:.4f}, "
            f"bits/byte {before[1]:.4f}")
        del model
    with tmp:
        result = loop.train(cfg, None, out, resume=resume, progress_bar=progress_bar,
                            stop_at_step=stop_at_step, log=log, source=source,
                            init_model=None if resume else state["model"])
    summary = {"base": base_path, "data": [str(p) for p in data], "steps": result.step,
               "conversations": len(chats.ids), "train_conversations": len(source.train.ids),
               "val_conversations": len(source.val.ids), "bad_rows": len(chats.bad),
               "bad": [f"{f}:{n}: {why}" for f, n, why in chats.bad[:chat.MAX_REPORTED]],
               "val_loss_after": result.val_loss, "val_bpb_after": result.val_bpb,
               "tokens_per_s": result.tokens_per_s}
    prev = out / "sft.json"
    if before is not None:
        summary.update(val_loss_before=before[0], val_bpb_before=before[1])
    elif prev.is_file():
        old = json.loads(prev.read_text())
        summary.update({k: old.get(k) for k in ("val_loss_before", "val_bpb_before")})
    atomic.write_text(prev, json.dumps(summary, indent=2) + "\n")
    log(f"after {result.step} steps: held-out assistant loss {result.val_loss:.4f}, "
        f"bits/byte {result.val_bpb:.4f}")
    return result, summary
