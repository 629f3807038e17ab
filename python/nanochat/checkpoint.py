"""Checkpoints: one directory per step, written atomically, the last N kept.

    RUN/checkpoints/step_000250/
        state.pt        model, optimizer, loader position, RNG states, step, elapsed time
        config.json     the full run config (human readable; also inside state.pt)
        tokenizer/      the tokenizer the model was trained with

A checkpoint is written into a temporary sibling directory `.step_000250.XXXX`, every file
fsynced (nanochat/atomic.py), and renamed into place, so a crash never leaves a half-written
checkpoint that `--resume` would pick up; the temp directories of a killed save are removed
by the next save or resume (`recover`). Re-saving a step moves the old directory aside to
`.step_000250.XXXX.old` before the new one is renamed in, and until it is deleted that
directory still counts as the step's checkpoint, so there is no moment without one.

state.pt is read with `torch.load(weights_only=True)`: tensors and plain containers only, so
a file that others made can never run code. A run directory whose latest state.pt is
corrupt or truncated loads the one before it, with a warning naming the bad file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from nanochat import atomic

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TEMP_DIR = re.compile(r"^\.step_(\d{6,})\.")  # a save in progress, or a replaced step (.old)
_OLD = ".old"


class UnsafeCheckpointError(ValueError):
    """A state.pt holds Python objects other than tensors and plain containers."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _copy_synced(src: str, dst: str) -> None:
    shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def save(run_dir: Path, step: int, state: dict, config: dict, tokenizer_dir: Path,
         keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    recover(run_dir)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))
    old = tmp.with_name(tmp.name + _OLD)
    try:
        with atomic.open_atomic(tmp / "state.pt") as f:
            torch.save(state, f)
        atomic.write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer", copy_function=_copy_synced)
        atomic.fsync_dir(tmp / "tokenizer")
        atomic.fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): the old one stays
            os.rename(final, old)  # visible as `old` until the new one is in place
        os.rename(tmp, final)
        atomic.fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(run_dir)[:-keep]:
        _remove(stale)
    return final


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint dir: renamed to a temp name first, so a kill during the
    deletion leaves a directory that `recover` removes, never a half-deleted step_N."""
    doomed = ckpt.with_name(f".{ckpt.name.lstrip('.')}.{secrets.token_hex(4)}.del")
    try:
        os.rename(ckpt, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Finish what a killed save left: put back a replaced step whose successor never got
    renamed in, remove the temp directories. Only the run's single writer may call this."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        m = _TEMP_DIR.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        final = root / f"step_{m.group(1)}"
        if p.name.endswith(_OLD) and not final.exists() and (p / "state.pt").is_file():
            os.rename(p, final)
        else:
            shutil.rmtree(p)
    atomic.fsync_dir(root)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a replaced step whose successor is not
    yet in place counts under its `.old` name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found, replaced = {}, {}
    for p in root.iterdir():
        if not (p / "state.pt").is_file():
            continue
        if m := _STEP_DIR.match(p.name):
            found[int(m.group(1))] = p
        elif (m := _TEMP_DIR.match(p.name)) and p.name.endswith(_OLD):
            replaced[int(m.group(1))] = p
    for step, p in replaced.items():
        found.setdefault(step, p)  # step_N itself wins when both exist
    return [found[s] for s in sorted(found)]


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


def read_state(file: Path) -> dict:
    """torch.load of one state.pt, tensors and plain containers only; names the file."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
        if why:  # a GLOBAL opcode naming a callable: what a code-running pickle needs
            raise UnsafeCheckpointError(
                f"refusing to load {file}: it holds Python objects that are not tensors or "
                f"plain containers, which could run code when unpickled ({why[-1]}); load it "
                f"with torch.load(weights_only=False) only if you trust whoever made it"
            ) from None
        raise ValueError(f"cannot read checkpoint {file}: {e}") from None
    except Exception as e:  # corrupt or truncated file
        raise ValueError(f"cannot read checkpoint {file}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"cannot read checkpoint {file}: expected a dict, "
                         f"got {type(state).__name__}")
    return state


def load(path: Path, log=_stderr) -> dict:
    """The state of a checkpoint dir, or of a run dir's latest intact checkpoint (a corrupt
    one is skipped with a warning through `log`). A pickle that is not plain data is
    refused (UnsafeCheckpointError) and never falls back."""
    path = Path(path)
    if (path / "state.pt").is_file():
        candidates = [path]
    else:
        candidates = list_checkpoints(path)[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {path} "
                                    f"(expected {path}/checkpoints/step_*/state.pt)")
    errors = []
    for ckpt in candidates:
        try:
            state = read_state(ckpt / "state.pt")
        except UnsafeCheckpointError:
            raise
        except ValueError as e:
            errors.append(str(e))
            if ckpt is not candidates[-1]:
                log(f"warning: {e}; falling back to the checkpoint before it")
            continue
        state["path"] = ckpt
        return state
    raise ValueError("; ".join(errors) if len(errors) == 1
                     else f"no intact checkpoint in {path}: " + "; ".join(errors))
