"""A training checkpoint (a run or step directory) loaded into a GPT, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

from nanochat import checkpoint
from nanochat.config import from_dict
from nanochat.data.tokenizer import Tokenizer
from nanochat.model.build import build_model
from nanochat.model.gpt import GPT


def load_model(path: str | Path) -> tuple[GPT, Tokenizer, dict]:
    state = checkpoint.load(Path(path))
    cfg = from_dict(state["config"], f"checkpoint {state['path']}")
    model = build_model(cfg, bitlinear="torch", seed=None)  # the weights come from the file
    model.load_state_dict(state["model"])
    model.eval()
    tok = Tokenizer.load(state["path"] / "tokenizer")
    return model, tok, state
