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

A sharded checkpoint (written under torchrun; `train.checkpoint_format`) has no state.pt:

    RUN/checkpoints/step_000250/
        meta.pt         step, loader position, RNG states, elapsed time, config (no tensors
                        of the model or optimizer)
        shards/         torch.distributed.checkpoint (DCP): model and optimizer state, each
                        rank's own file (__R_0.distcp) plus the index (.metadata)
        config.json, tokenizer/

Every rank writes its shards into the same temporary directory (rank 0 names it); rank 0
then writes the rest and renames it into place as for state.pt, so the run directory must
be on a filesystem every rank sees. Resuming reads the shards with the current world's
state dicts (DCP reshards: saved with N ranks, resumed with M, either strategy); one
process (`export`, `sample`, `eval`) consolidates them into whole tensors (`load`). DCP
itself unpickles its index and non-tensor values; here the index is read with an
unpickler that admits DCP's own metadata classes only, and the values weights-only.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from nanochat import atomic

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TEMP_DIR = re.compile(r"^\.step_(\d{6,})\.")  # a save in progress, or a replaced step (.old)
_OLD = ".old"
META = "meta.pt"  # a sharded checkpoint's non-tensor state
SHARDS = "shards"  # its DCP directory


class UnsafeCheckpointError(ValueError):
    """A state.pt holds Python objects other than tensors and plain containers."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _copy_synced(src: str, dst: str) -> None:
    shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _begin(run_dir: Path, step: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    recover(run_dir)
    return Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))


def _commit(run_dir: Path, step: int, tmp: Path, state_file: str, state: dict, config: dict,
            tokenizer_dir: Path, keep: int) -> Path:
    """Write the rest of a checkpoint into `tmp` and rename it into place; on any failure
    `tmp` is removed and a replaced step put back."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    old = tmp.with_name(tmp.name + _OLD)
    try:
        with atomic.open_atomic(tmp / state_file) as f:
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


def save(run_dir: Path, step: int, state: dict, config: dict, tokenizer_dir: Path,
         keep: int) -> Path:
    return _commit(run_dir, step, _begin(run_dir, step), "state.pt", state, config,
                   tokenizer_dir, keep)


def save_sharded(run_dir: Path, step: int, shards: dict, state: dict, config: dict,
                 tokenizer_dir: Path, keep: int) -> Path | None:
    """A sharded checkpoint. Every rank calls it with its own `shards` (torch.distributed.
    checkpoint state dicts); rank 0 (or the one process) writes `state` as meta.pt and
    returns the checkpoint dir, the others None."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    multi = dist.is_available() and dist.is_initialized()
    main = not multi or dist.get_rank() == 0
    tmp = _begin(run_dir, step) if main else None
    if multi:  # one directory for every rank's files
        box = [str(tmp) if main else None]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
    try:
        # collective: a rank that fails makes dcp.save raise on every rank
        with warnings.catch_warnings():  # "assuming ... a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(shards, no_dist=not multi,
                     storage_writer=dcp.FileSystemWriter(tmp / SHARDS, sync_files=True))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not main:
        return None
    atomic.fsync_dir(tmp / SHARDS)
    return _commit(run_dir, step, tmp, META, state, config, tokenizer_dir, keep)


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
        if p.name.endswith(_OLD) and not final.exists() and _complete(p):
            os.rename(p, final)
        else:
            shutil.rmtree(p)
    atomic.fsync_dir(root)


def _complete(ckpt: Path) -> bool:
    """A checkpoint dir (either format); only ever renamed into place whole."""
    return (ckpt / "state.pt").is_file() or (ckpt / META).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a replaced step whose successor is not
    yet in place counts under its `.old` name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found, replaced = {}, {}
    for p in root.iterdir():
        if not _complete(p):
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
    if _complete(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} "
                                f"(expected {path}/checkpoints/step_*/state.pt or meta.pt)")
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


def load(path: Path, log=_stderr, consolidate: bool = True) -> dict:
    """The state of a checkpoint dir, or of a run dir's latest intact checkpoint (a corrupt
    one is skipped with a warning through `log`). A pickle that is not plain data is
    refused (UnsafeCheckpointError) and never falls back. A sharded checkpoint's state is
    its meta.pt plus "shards" (its DCP dir) and, when `consolidate`, "model" and
    "optimizer" as whole tensors in the single-process format (read in this process)."""
    path = Path(path)
    if _complete(path):
        candidates = [path]
    else:
        candidates = list_checkpoints(path)[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {path} "
                                    f"(expected {path}/checkpoints/step_*/state.pt or meta.pt)")
    errors = []
    for ckpt in candidates:
        try:
            if (ckpt / "state.pt").is_file():
                state = read_state(ckpt / "state.pt")
            else:
                state = read_state(ckpt / META)
                state["shards"] = ckpt / SHARDS
                full = read_shards(ckpt / SHARDS) if consolidate else None
                if full is None:
                    _read_metadata(ckpt / SHARDS)  # the index at least is intact
                else:
                    state["model"], state["optimizer"] = full["model"], _ids(full["optim"])
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


def _ids(optim: dict) -> dict:
    """get_optimizer_state_dict's parameter-name keys -> torch's state_dict() ids (the
    order of its param_groups' names is the optimizer's own)."""
    names = [n for g in optim["param_groups"] for n in g["params"]]
    ids = {n: i for i, n in enumerate(names)}
    return {"state": {ids[n]: v for n, v in optim["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                             for g in optim["param_groups"]]}


# What a DCP index (.metadata, a plain pickle) may name: DCP's own record classes, torch's
# dtypes and sizes, paths. Anything else (a callable that runs code) is refused.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",
                "torch.distributed.checkpoint.filesystem")


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = getattr(importlib.import_module(module), name, None)
            # a record class defined there (dataclasses and enums, built from data), not a
            # name the module imported from elsewhere
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        elif (module, name) in (("torch.serialization", "_get_layout"),
                                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                                ("collections", "OrderedDict")):
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(f"{module}.{name}")


def _read_metadata(shards: Path):
    file = Path(shards) / ".metadata"
    try:
        with open(file, "rb") as f:
            return _IndexUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {file}: it names {e}, not a DCP index record, which could run "
            f"code when unpickled") from None
    except Exception as e:  # missing, corrupt or truncated
        raise ValueError(f"cannot read checkpoint index {file}: {e}") from None


def read_shards(shards: Path, state_dict: dict | None = None) -> dict:
    """Read a DCP directory: into `state_dict` in place (every rank of the current world,
    resharding to its layout), or, with None, whole in this process. Names the directory on
    any error."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import (
        DefaultLoadPlanner,
        _EmptyStateDictLoadPlanner,
    )
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = _read_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = dcp.metadata.StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    def weights_only(planner):
        class Planner(planner):
            def load_bytes(self, read_item, value):  # DCP's own unpickles weights_only=False
                try:
                    obj = torch.load(value, weights_only=True)
                except pickle.UnpicklingError as e:
                    raise UnsafeCheckpointError(
                        f"refusing to load {shards}: {read_item.dest_index.fqn} holds Python "
                        f"objects that are not plain data ({str(e).splitlines()[0]})") from None
                if self.flatten_state_dict:
                    set_element(self.original_state_dict,
                                self.mappings[read_item.dest_index.fqn], obj)
                else:
                    self.state_dict[read_item.dest_index.fqn] = obj
        return Planner()

    shards = Path(shards)
    _read_metadata(shards)  # a clear error for a missing or foreign index first
    try:
        if state_dict is None:
            whole: dict = {}
            # dcp.load fills only the keys it is given: format_utils.dcp_to_torch_save's way
            _load_state_dict(whole, storage_reader=Reader(shards),
                             planner=weights_only(_EmptyStateDictLoadPlanner), no_dist=True)
            return whole
        multi = dist.is_available() and dist.is_initialized()
        with warnings.catch_warnings():  # "assuming ... a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=Reader(shards),
                     planner=weights_only(DefaultLoadPlanner), no_dist=not multi)
        return state_dict
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        causes = [getattr(f, "exception", f) for f in getattr(e, "failures", {}).values()]
        for c in causes:
            if isinstance(c, UnsafeCheckpointError):
                raise c from None
        why = str(causes[0] if causes else e).strip().splitlines()
        raise ValueError(f"cannot read sharded checkpoint {shards}: "
                         f"{why[0][:300] if why else type(e).__name__}") from None

