"""Conversations for chat fine-tuning: reading, validating, rendering, loss masks, packing.

Input: OpenAI `messages` rows, one JSON object per line (.jsonl / .json lines) or one row
per record of a parquet file (a `messages` column; read with pyarrow, when installed):

    {"messages": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Roles alternate user, assistant, user, ... after an optional system message, and at least
one assistant turn is required (it is what is learned). The tokenizer has no system
markers, so a system message is prepended to the first user message, separated by a blank
line (as karpathy/nanochat does). Bad rows (not JSON, no `messages` list, a message that is
not {"role": str, "content": str}, an unknown role, assistant first, roles out of turn,
empty content, no assistant turn, longer than the context) are dropped, counted and
reported as file:line: reason.

The chat template, one renderer for SFT, `nanochat chat` / `generate --chat` (nanochat/infer/
chat.py) and the GGUF's tokenizer.chat_template (CHAT_TEMPLATE, the same text in Jinja):

    <|bos|><|user_start|>USER<|user_end|><|assistant_start|>REPLY<|assistant_end|>...

Each message's text is tokenized on its own as plain text (a "<|user_end|>" typed inside a
message stays text; a string-level template read by llama.cpp with special-token parsing
would turn it into the marker, the one place the two can differ). The loss mask is true on
an assistant message's tokens and its <|assistant_end|> (the model learns to stop); SFT
targets are -1 (ignored) everywhere else.

Packing (ConversationLoader): conversations are shuffled per epoch and laid greedily into
rows of seq_len + 1 tokens (x = row[:-1], y = row[1:]); a conversation that does not fit
the rest of a row starts the next one, and the rest is padding (target -1). doc_start
(B, T) gives each position its conversation's first position, so attention and RoPE
positions stay inside each conversation (nanochat/ops/attention.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanochat.data.loader import PrefetchLoader
from nanochat.data.tokenizer import BOS, SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = SPECIAL_TOKENS[1:]
SYSTEM_SEPARATOR = "\n\n"  # between a merged system message and the first user message
MAX_REPORTED = 20  # bad rows listed by file:line in a report; the rest only counted

# Jinja equivalent of render_text (tests/test_chat_data.py checks them against each other);
# export writes it as tokenizer.chat_template. `bos_token` is supplied by the caller, as
# llama.cpp and transformers do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}"
    "{{ '<|user_start|>' + ns.system + m['content'] + '<|user_end|>' }}"
    "{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '<|assistant_start|>' + m['content'] + '<|assistant_end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


class BadConversation(ValueError):
    """A row that cannot be a training conversation; the message says why."""


def turns(messages) -> list[tuple[str, str]]:
    """Validated (role, text) turns, user / assistant alternating from a user turn, the
    system message (if any) merged into the first user turn. Raises BadConversation."""
    if not isinstance(messages, list):
        raise BadConversation(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise BadConversation("messages is empty")
    out: list[tuple[str, str]] = []
    system = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise BadConversation(f"message {i} must be an object with role and content")
        role, text = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadConversation(f"message {i}: role must be one of {', '.join(ROLES)}, "
                                  f"got {role!r}")
        if not isinstance(text, str):
            raise BadConversation(f"message {i}: content must be a string, got "
                                  f"{type(text).__name__}")
        if not text:
            raise BadConversation(f"message {i}: empty content")
        if role == "system":
            if i != 0:
                raise BadConversation(f"message {i}: a system message must come first")
            system = text
            continue
        want = "user" if len(out) % 2 == 0 else "assistant"
        if role != want:
            raise BadConversation(f"message {i}: expected a {want} message, got {role}"
                                  + (" (the first turn must be the user's)" if not out else ""))
        if system is not None and not out:
            text = system + SYSTEM_SEPARATOR + text
        out.append((role, text))
    if not out:
        raise BadConversation("no user message")
    return out


def render_text(messages, add_generation_prompt: bool = False) -> str:
    """The conversation as template text (what CHAT_TEMPLATE renders)."""
    parts = [BOS]
    for role, text in turns(messages):
        parts.append(f"{USER_START}{text}{USER_END}" if role == "user"
                     else f"{ASSISTANT_START}{text}{ASSISTANT_END}")
    if add_generation_prompt:
        parts.append(ASSISTANT_START)
    return "".join(parts)


@dataclass(frozen=True)
class Markers:
    """The chat special tokens' ids in a tokenizer."""
    bos: int
    user_start: int
    user_end: int
    assistant_start: int
    assistant_end: int

    @classmethod
    def of(cls, special: dict[str, int], where: str) -> Markers:
        """From a tokenizer's special tokens (text -> id); a clear error for a tokenizer
        without our chat markers (an imported model's)."""
        missing = [t for t in SPECIAL_TOKENS if t not in special]
        if missing:
            raise ValueError(f"{where}: the tokenizer has no {', '.join(missing)} token(s), so "
                             f"it cannot hold nanochat's chat template (an imported model keeps "
                             f"its own tokenizer; chat fine-tuning needs a nanochat tokenizer)")
        return cls(*(special[t] for t in SPECIAL_TOKENS))


def user_tokens(text: str, encode: Callable[[str], list[int]], m: Markers) -> list[int]:
    """A user turn followed by the assistant's start: what a chat feeds before a reply."""
    return [m.user_start, *encode(text), m.user_end, m.assistant_start]


def render(messages, encode: Callable[[str], list[int]], m: Markers
           ) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask) of a conversation: the mask is true on each assistant
    message's tokens and its <|assistant_end|>. Raises BadConversation."""
    tv = turns(messages)
    if not any(role == "assistant" for role, _ in tv):
        raise BadConversation("no assistant message (nothing to learn)")
    ids, mask = [m.bos], [False]
    for role, text in tv:
        body = encode(text)
        if role == "user":
            ids += [m.user_start, *body, m.user_end]
            mask += [False] * (len(body) + 2)
        else:
            ids += [m.assistant_start, *body, m.assistant_end]
            mask += [False] + [True] * (len(body) + 1)
    return ids, mask


def targets_of(ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """Next-token targets of a rendered conversation: ids[t + 1] where the mask is true at
    t + 1, else -1; the last position has none (-1)."""
    return [ids[t + 1] if mask[t + 1] else -1 for t in range(len(ids) - 1)] + [-1]


# ---- reading files -------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line or row number from 1, the row's messages or a BadConversation) of a file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                             f"or convert the file to JSON lines") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own types for a bad file
            raise ValueError(f"{path}: not a readable parquet file: {e}") from None
        if "messages" not in table.column_names:
            raise ValueError(f"{path}: no `messages` column (columns: "
                             f"{', '.join(table.column_names)})")
        for i, msgs in enumerate(table.column("messages").to_pylist(), 1):
            yield i, msgs
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, BadConversation(f"not JSON: {e.msg}")
                    continue
                if not isinstance(row, dict) or "messages" not in row:
                    yield i, BadConversation('expected an object with a "messages" list')
                    continue
                yield i, row["messages"]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@dataclass
class ChatSet:
    """Rendered conversations and what was dropped."""
    ids: list[np.ndarray] = field(default_factory=list)  # int32 token ids per conversation
    masks: list[np.ndarray] = field(default_factory=list)  # bool loss masks
    rows: int = 0  # rows read
    bad: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)

    def report(self) -> str:
        """One line of counts, then the first MAX_REPORTED bad rows by file:line."""
        lines = [f"{len(self.ids)} conversations, {len(self.bad)} bad row(s) of {self.rows}"]
        lines += [f"  {f}:{n}: {why}" for f, n, why in self.bad[:MAX_REPORTED]]
        if len(self.bad) > MAX_REPORTED:
            lines.append(f"  ... and {len(self.bad) - MAX_REPORTED} more")
        return "\n".join(lines)

    def split(self, every: int) -> tuple[ChatSet, ChatSet]:
        """(train, val): every `every`-th conversation goes to val (at least one, when
        there are two or more)."""
        n = len(self.ids)
        val = set(range(every - 1, n, every)) or ({n - 1} if n > 1 else set())
        pick = [lambda i: i not in val, lambda i: i in val]
        return tuple(ChatSet([a for i, a in enumerate(self.ids) if keep(i)],
                             [b for i, b in enumerate(self.masks) if keep(i)], self.rows,
                             self.bad) for keep in pick)


Renderer = Callable[[list], tuple[list[int], list[bool]]]  # messages -> (ids, loss mask)


def renderer(encode: Callable[[str], list[int]], m: Markers) -> Renderer:
    """nanochat's template (`render`) over a tokenizer's encode and markers."""
    return lambda messages: render(messages, encode, m)


def load(paths: Sequence[str | Path], render_fn: Renderer, max_tokens: int) -> ChatSet:
    """Every good conversation of the files, rendered by `render_fn` (`renderer(...)`, or an
    imported model's template: nanochat/data/template.py); a conversation longer than
    max_tokens tokens (the context) is a bad row. Raises ValueError for an unreadable
    file."""
    out = ChatSet()
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"chat data {path} does not exist")
        for line, msgs in _rows(path):
            out.rows += 1
            try:
                if isinstance(msgs, BadConversation):
                    raise msgs
                ids, mask = render_fn(msgs)
                if len(ids) > max_tokens:
                    raise BadConversation(f"{len(ids)} tokens, longer than the context of "
                                          f"{max_tokens}")
            except BadConversation as e:
                out.bad.append((str(path), line, str(e)))
                continue
            out.ids.append(np.asarray(ids, dtype=np.int32))
            out.masks.append(np.asarray(mask, dtype=bool))
    return out


# ---- packing -------------------------------------------------------------------------------


def pack(ids: Sequence[np.ndarray], masks: Sequence[np.ndarray], order: Sequence[int],
         seq_len: int, pad: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows of seq_len + 1 positions filled greedily with the conversations in `order`:
    (tokens, loss mask, doc_start) each (seq_len + 1,). Padding is its own document with
    the mask off. Every conversation must be at most seq_len + 1 tokens."""
    rows, cur = [], []
    used = 0

    def flush():
        tok = np.full(seq_len + 1, pad, dtype=np.int64)
        msk = np.zeros(seq_len + 1, dtype=bool)
        doc = np.full(seq_len + 1, used, dtype=np.int64)  # padding: a document of its own
        at = 0
        for i in cur:
            n = len(ids[i])
            tok[at:at + n], msk[at:at + n], doc[at:at + n] = ids[i], masks[i], at
            at += n
        rows.append((tok, msk, doc))

    for i in order:
        n = len(ids[i])
        if n > seq_len + 1:
            raise ValueError(f"pack: a conversation of {n} tokens exceeds seq_len + 1 = "
                             f"{seq_len + 1}")
        if used + n > seq_len + 1:
            flush()
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        flush()
    return rows


class ConversationLoader(PrefetchLoader):
    """next() -> (x, y, doc_start), int64 (B, T) on `device`: packed conversations (module
    doc), y = -1 off the assistant tokens and on padding. Batch `step` is a pure function
    of (seed, step): epoch e's rows come from a permutation seeded with [seed, e], and the
    batches walk the epochs' rows in order, so resume (start_step) is exact."""

    def __init__(self, chats: ChatSet, batch_size: int, seq_len: int, seed: int,
                 pad: int, start_step: int = 0, prefetch: int = 2,
                 device: str | torch.device = "cpu", pin_memory: bool = False):
        if not chats.ids:
            raise ValueError("no conversations to train on")
        self.chats, self.seed, self.pad, self._pack_len = chats, seed, pad, seq_len
        self._epochs: dict[int, list] = {}  # the last epoch packed (a batch may span two)
        self._ends = [len(self._epoch(0))]  # rows before the end of epoch 0, 1, ...
        super().__init__(batch_size, seq_len, start_step, prefetch, device, pin_memory)

    def _epoch(self, e: int) -> list:
        if e not in self._epochs:
            order = np.random.default_rng([self.seed, e]).permutation(len(self.chats.ids))
            self._epochs = {e: pack(self.chats.ids, self.chats.masks, order,
                                    self._pack_len, self.pad)}
        return self._epochs[e]

    def _row(self, r: int):
        """Row r of the run: epochs' rows back to back (each epoch packs differently)."""
        while self._ends[-1] <= r:
            self._ends.append(self._ends[-1] + len(self._epoch(len(self._ends))))
        e = int(np.searchsorted(self._ends, r, side="right"))
        return self._epoch(e)[r - (self._ends[e - 1] if e else 0)]

    def build_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picked = [self._row(r) for r in range(step * self.batch_size,
                                              (step + 1) * self.batch_size)]
        tok = np.stack([p[0] for p in picked])
        msk = np.stack([p[1] for p in picked])
        doc = np.stack([p[2] for p in picked])
        y = np.where(msk[:, 1:] & (doc[:, 1:] == doc[:, :-1]), tok[:, 1:], -1)
        x = torch.from_numpy(np.ascontiguousarray(tok[:, :-1]))
        return x, torch.from_numpy(np.ascontiguousarray(y)), torch.from_numpy(
            np.ascontiguousarray(doc[:, :-1]))

