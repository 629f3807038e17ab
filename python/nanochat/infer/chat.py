"""nanochat chat: a conversation with a GGUF model on the C++ engine, history kept in its KV cache.

The chat template (nanochat/data/chat.py, the one renderer SFT and the GGUF's
tokenizer.chat_template share), one turn after another:

    <|bos|><|user_start|>USER TEXT<|user_end|><|assistant_start|>REPLY<|assistant_end|>...

User text is tokenized as plain text (typing "<|user_end|>" cannot forge a marker). A system
prompt (--system) has no markers of its own: it is prepended to the first user message,
separated by a blank line, as SFT renders it (when the context fills and that turn is
dropped, the system prompt goes with it). Each
turn feeds only the tokens the cache does not hold yet, and the reply streams until the
model emits <|assistant_end|> (or its end-of-text token). When the context is full the
oldest turns are dropped and the rest is re-read.

    nanochat chat --model model.gguf [--temperature 0.7] [--max-tokens 256] [--system TEXT]
    commands: /reset (forget the conversation), /quit (or Ctrl-D)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from nanochat.data.chat import SYSTEM_SEPARATOR, Markers, user_tokens
from nanochat.infer.engine import Engine

MARKERS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")


class Conversation:
    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.system = system or None
        ids = {}
        for m in MARKERS:
            t = engine.tokenize(m, parse_special=True)
            if len(t) != 1:
                raise ValueError(f"{engine.info['path']}: the model's tokenizer has no {m} token; "
                                 f"it cannot hold a chat (use nanochat generate)")
            ids[m] = t[0]
        self.user_start, self.user_end, self.asst_start, self.asst_end = (ids[m] for m in MARKERS)
        self.bos = engine.info["bos_id"]
        self.markers = Markers(self.bos, *(ids[m] for m in MARKERS))
        self.turns: list[list[int]] = []  # finished turns (user + reply), as tokens
        self.engine.reset()

    def reset(self) -> None:
        self.turns = []
        self.engine.reset()

    def _history(self) -> list[int]:
        return [self.bos] + [t for turn in self.turns for t in turn]

    def reply(self, text: str, max_tokens: int = 256, **sampling) -> Iterator[str]:
        """Streams the model's reply to `text` and records the turn."""
        if self.system and not self.turns:  # the first turn of the history carries it
            text = self.system + SYSTEM_SEPARATOR + text
        user = user_tokens(text, self.engine.tokenize, self.markers)
        budget = self.engine.n_ctx - max_tokens - len(user) - 1
        while self.turns and len(self._history()) > budget:  # forget the oldest turns
            self.turns.pop(0)
            self.engine.reset()
        history = self._history()
        if len(history) > budget:
            raise ValueError(f"the message ({len(user)} tokens) and --max-tokens {max_tokens} do "
                             f"not fit the context of {self.engine.n_ctx} tokens")
        if self.engine.n_past > len(history):
            self.engine.reset()
        prompt = history[self.engine.n_past:] + user  # what the cache does not hold yet
        reply: list[int] = []
        for token, piece in self.engine.generate(prompt, max_tokens=max_tokens, add_bos=False,
                                                 stop_tokens=[self.asst_end], **sampling):
            if token >= 0:
                reply.append(token)
            yield piece
        self.turns.append(user + reply + [self.asst_end])


def repl(engine: Engine, max_tokens: int, sampling: dict, stdin=sys.stdin,
         stdout=sys.stdout, system: str | None = None) -> int:
    conv = Conversation(engine, system)
    interactive = stdin.isatty()
    if interactive:
        i = engine.info
        print(f"nanochat chat: {i['path']} ({i['n_layers']} layers, context {engine.n_ctx}). "
              f"/reset forgets, /quit or Ctrl-D leaves.", file=stdout)
    seed = sampling.pop("seed", 0)
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=stdout)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() == "/reset":
            conv.reset()
            print("(conversation forgotten)", file=stdout, flush=True)
            continue
        if not text.strip():
            continue
        print("model> ", end="", flush=True, file=stdout)
        for piece in conv.reply(text, max_tokens=max_tokens, seed=seed + turn, **sampling):
            print(piece, end="", flush=True, file=stdout)
        print(file=stdout, flush=True)
        turn += 1
    return 0
