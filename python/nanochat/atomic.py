"""Crash-safe file writes: a file is either its old content or its complete new content.

    python -m pytest tests/test_atomic.py

`open_atomic(path)` writes into a temp file with a unique name in the same directory,
created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW: a planted file or symlink there is never
opened or followed), then flushes and fsyncs it, renames it over `path` and fsyncs the
directory so the rename itself survives a power loss. On any error the temp file is removed
and `path` is untouched. Checkpoints, metrics.jsonl's purge and the run's json files are
written through here; csrc/gguf/gguf_writer.cpp follows the same contract in C++.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0))
TEMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist the entries (renames, creations) of directory `path`."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    for _ in range(100):  # 64 random bits: a collision means someone planted the name
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary name in {path.parent}")


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "wb",
                encoding: str | None = None) -> Iterator:
    """A file object ("wb" or "w") that replaces `path` atomically when the block exits."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with open_atomic(path, "w", encoding=encoding) as f:
        f.write(text)
