"""A small chat set generated from Python sources (default: this interpreter's standard
library, the training corpus; PSF license, like the code it quotes):

    nanochat data chat --out chat.jsonl [--source PATH ...] [--limit N]

For every function or method with a docstring whose source is at most MAX_SOURCE_CHARS,
two conversations (OpenAI `messages` rows, nanochat/data/chat.py):

    user: Write a Python function `name(args)`: <the docstring's first sentence>.
    assistant: the function's source (dedented)

    user: What does `module.name(args)` do?
    assistant: the docstring (cleaned, at most MAX_DOC_CHARS)

Files are walked sorted and each row is a pure function of the file, so the set is the same
on every run over the same sources. Files that are not UTF-8 Python are skipped.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

from nanochat import atomic
from nanochat.data.corpus import EXCLUDED_DIRS, default_sources

MAX_SOURCE_CHARS = 1200  # keeps a conversation within a few hundred tokens (the context)
MAX_DOC_CHARS = 600
SKIP_DIRS = EXCLUDED_DIRS | {"test", "tests", "idlelib", "lib2to3", "turtledemo"}


def _files(sources: list[str]) -> Iterator[tuple[Path, Path]]:
    """(root, file) of every .py file under the sources, sorted."""
    for src in sources:
        root = Path(src)
        if root.is_file():
            yield root.parent, root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith(".py"):
                    yield root, Path(dirpath) / name


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(fn.args)
    return f"{fn.name}({args})"


def conversations(path: Path, module: str) -> Iterator[dict]:
    """The conversations of one source file (module: its dotted name)."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        src = ast.get_source_segment(text, node)
        if not doc or not src or node.name.startswith("_") or len(src) > MAX_SOURCE_CHARS:
            continue
        doc = inspect.cleandoc(doc)
        first = doc.split("\n\n")[0].replace("\n", " ").strip().rstrip(".")
        if not first or len(doc) > MAX_DOC_CHARS:
            continue
        sig = _signature(node)
        src = textwrap.dedent(" " * node.col_offset + src)
        yield {"messages": [
            {"role": "user", "content": f"Write a Python function `{sig}`: {first}."},
            {"role": "assistant", "content": src}]}
        yield {"messages": [
            {"role": "user", "content": f"What does `{module}.{sig}` do?"},
            {"role": "assistant", "content": doc}]}


def generate(out: str | Path, sources: list[str] | None = None, limit: int = 0) -> int:
    """Writes the conversations as JSON lines (atomically); returns how many. limit > 0
    keeps the first `limit`."""
    rows = []
    for root, f in _files(sources or default_sources()):
        rel = f.relative_to(root).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__") or rel.stem
        for row in conversations(f, module):
            rows.append(json.dumps(row, ensure_ascii=False))
            if limit and len(rows) >= limit:
                break
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"no documented functions found in {', '.join(sources or ['stdlib'])}")
    atomic.write_text(Path(out), "\n".join(rows) + "\n")
    return len(rows)
