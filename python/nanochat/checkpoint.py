"""Checkpoints: one directory per step, written atomically, the last N kept.

    RUN/checkpoints/step_000250/
        state.pt        model, optimizer, loader position, RNG states, step, elapsed time
        config.json     the full run config (human readable; also inside state.pt)
        tokenizer/      the tokenizer the model was trained with

A checkpoint is written into a temporary sibling directory and renamed into place,
so a crash never leaves a half-written checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def save(run_dir: Path, step: int, state: dict, config: dict, tokenizer_dir: Path,
         keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))
    try:
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve(path: Path) -> Path:
    """A checkpoint dir from either a checkpoint dir or a run dir (its latest)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} "
                                f"(expected {path}/checkpoints/step_*/state.pt)")
    return found[-1]


def load(path: Path) -> dict:
    ckpt = resolve(path)
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or truncated file
        raise ValueError(f"cannot read checkpoint {ckpt / 'state.pt'}: {e}") from None
    state["path"] = ckpt
    return state
