"""nanochat data chat (nanochat/data/chatgen.py): conversations from documented functions,
deterministic, every row valid for sft."""

from __future__ import annotations

import json

import pytest
from nanochat.cli import main
from nanochat.data import chat, chatgen

SRC = '''
def add(a, b=1):
    """Return the sum of a and b.

    Works on anything with +.
    """
    return a + b


class Box:
    def size(self):
        """How many items the box holds."""
        return 3

    def _hidden(self):
        """Private: skipped."""


def undocumented():
    return 0
'''


def test_generates_valid_deterministic_conversations(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(SRC)
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    out = tmp_path / "chat.jsonl"
    assert main(["data", "chat", "--out", str(out), "--source", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == [
        "Write a Python function `add(a, b=1)`: Return the sum of a and b.",
        "What does `pkg.mod.add(a, b=1)` do?",
        "Write a Python function `size(self)`: How many items the box holds.",
        "What does `pkg.mod.size(self)` do?"]
    assert rows[0]["messages"][1]["content"].startswith("def add(a, b=1):\n    \"\"\"Return")
    assert rows[3]["messages"][1]["content"] == "How many items the box holds."
    first = out.read_bytes()
    chatgen.generate(out, [str(tmp_path)])
    assert out.read_bytes() == first
    for r in rows:  # every row renders as a training conversation
        chat.render(r["messages"], lambda t: list(t.encode()), chat.Markers(0, 1, 2, 3, 4))
    assert chatgen.generate(out, [str(tmp_path)], limit=3) == 3


def test_no_documented_function_is_an_error(tmp_path):
    (tmp_path / "m.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no documented functions"):
        chatgen.generate(tmp_path / "o.jsonl", [str(tmp_path)])
