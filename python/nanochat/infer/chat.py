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

An imported model (nanochat import hf, then sft and export) has no such markers; its GGUF
carries its own tokenizer.chat_template (nanochat/data/template.py) and end-of-turn token
(tokenizer.ggml.eot_token_id). TemplateConversation renders the whole conversation with that
template each turn (the system prompt as the template's own system message), tokenizes it
with special tokens parsed (as transformers and llama.cpp do), feeds what the cache does not
hold yet and stops the reply at the end-of-turn token. `open_conversation` picks the kind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from nanochat._core import core
from nanochat.data.chat import CHAT_TEMPLATE, SYSTEM_SEPARATOR, Markers, user_tokens
from nanochat.data.template import ChatTemplate
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


class TemplateConversation:
    """A chat with an imported model through the GGUF's own chat template (module doc)."""

    def __init__(self, engine: Engine, source: str, tokens: list[str],
                 system: str | None = None):
        # tokens: tokenizer.ggml.tokens, where the BOS / EOS texts the template reads are
        info = engine.info
        where = f"{info['path']}: tokenizer.chat_template"
        if info["eot_id"] < 0:
            raise ValueError(f"{info['path']}: the model has a chat template but no "
                             f"tokenizer.ggml.eot_token_id, so a reply could not stop")
        self.engine, self.eot = engine, info["eot_id"]
        self.template = ChatTemplate(source, where, tokens[info["bos_id"]],
                                     tokens[info["eos_id"]])
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = []  # user / assistant turns so far
        self.fed: list[int] = []  # what the engine's cache holds
        self.last_prompt: list[int] = []  # the last turn's rendered prompt (tests read it)
        self.engine.reset()

    def reset(self) -> None:
        self.messages, self.fed = [], []
        self.engine.reset()

    def _prompt(self, messages: list[dict]) -> list[int]:
        text = self.template.text(self.system + messages, add_generation_prompt=True)
        return self.engine.tokenize(text, parse_special=True)

    def reply(self, text: str, max_tokens: int = 256, **sampling) -> Iterator[str]:
        """Streams the model's reply to `text` and records the turn."""
        user = {"role": "user", "content": text}
        budget = self.engine.n_ctx - max_tokens
        prompt = self._prompt(self.messages + [user])
        while self.messages and len(prompt) > budget:  # forget the oldest exchange
            self.messages = self.messages[2:]
            prompt = self._prompt(self.messages + [user])
        if len(prompt) > budget:
            raise ValueError(f"the message ({len(prompt)} tokens with the template) and "
                             f"--max-tokens {max_tokens} do not fit the context of "
                             f"{self.engine.n_ctx} tokens")
        # keep the cache where the new rendering extends it (one token is always fed)
        n = 0
        limit = min(len(self.fed), self.engine.n_past, len(prompt) - 1)
        while n < limit and self.fed[n] == prompt[n]:
            n += 1
        self.engine.truncate(n)
        self.last_prompt = prompt
        reply: list[int] = []
        pieces: list[str] = []
        for token, piece in self.engine.generate(prompt[n:], max_tokens=max_tokens,
                                                 add_bos=False, stop_tokens=[self.eot],
                                                 **sampling):
            if token >= 0:
                reply.append(token)
            pieces.append(piece)
            yield piece
        self.fed = prompt + reply
        self.messages += [user, {"role": "assistant", "content": "".join(pieces)}]


def open_conversation(engine: Engine, system: str | None = None):
    """The chat for a GGUF: nanochat's markers (Conversation), or an imported model's own
    template (TemplateConversation); a clear error for a model with neither."""
    kv = core().GgufFile(engine.info["path"]).kv()
    source = kv.get("tokenizer.chat_template")
    if source is None or source == CHAT_TEMPLATE:
        return Conversation(engine, system)
    return TemplateConversation(engine, source, kv["tokenizer.ggml.tokens"], system)


def repl(engine: Engine, max_tokens: int, sampling: dict, stdin=sys.stdin,
         stdout=sys.stdout, system: str | None = None) -> int:
    conv = open_conversation(engine, system)
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
