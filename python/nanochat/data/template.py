"""An imported model's own chat template (Jinja, as transformers ships it): rendering, loss
masks and prompts for a tokenizer that has no nanochat chat markers.

    nanochat import hf DIR --out RUN        # keeps DIR's template beside RUN's tokenizer
    nanochat sft --checkpoint RUN --data chat.jsonl --out RUN2
    nanochat export --gguf RUN2.gguf --checkpoint RUN2   # -> tokenizer.chat_template
    nanochat chat --model RUN2.gguf         # renders each turn with that template

The template is the checkpoint's `chat_template` (tokenizer_config.json, or a
chat_template.jinja file), kept as chat_template.jinja in the tokenizer directory. It is text from
a file, so it runs in jinja2's ImmutableSandboxedEnvironment (as transformers does): no
attribute starting with "_", no mutation of the messages, no code execution; a template that
tries any of it, or fails, is a ValueError naming the file. The output is capped at
MAX_RENDER_CHARS, and so are `'x' * n` and `n ** m` (jinja2 bounds only range()); a
template's running time is not bounded beyond that (nested loops of range(100000)).

Rendering follows transformers' apply_chat_template: the text is rendered with `messages`,
`add_generation_prompt`, `bos_token` and `eos_token`, then tokenized as a whole with special
tokens parsed (so "<|eot_id|>" is one id, also when a message types it; transformers does the
same). The loss mask is found without knowing the template: for the assistant message i,
P = render(messages[:i], add_generation_prompt=True) must be a prefix of
Q = render(messages[:i + 1]), which must be a prefix of the whole conversation; the text
between them (the reply and the turn's end, e.g. "REPLY<|eot_id|>") is the assistant span,
and the tokens overlapping it are learned. A template for which any of that fails (no
generation prompt, a turn rendered differently once later turns follow, a span without the
reply) cannot mark assistant turns robustly and is refused. The end-of-turn token is the
last special token of an assistant span: chat stops on it and export writes it as
tokenizer.ggml.eot_token_id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from nanochat.data.tokenizer import CHAT_TEMPLATE_FILE, MAX_TEMPLATE_BYTES

MAX_RENDER_CHARS = 64 << 20  # a rendering past this is a runaway template, not a chat
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": "Bye"}]  # a turn after the reply: its end is rendered


class UnmarkableTemplate(ValueError):
    """A template whose assistant turns cannot be found robustly: training is refused."""


def _environment():
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("an imported model's chat template needs jinja2 "
                         "(pip install jinja2)") from None

    class Generation(Extension):
        """transformers' {% generation %}...{% endgeneration %} (its assistant-mask marker):
        rendered as its body; the mask here comes from prefix renders instead."""
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Sandbox(ImmutableSandboxedEnvironment):
        """jinja2's sandbox bounds range() but not `'x' * n` or `n ** m`: a template could
        ask for gigabytes in one expression. Those two are checked before they run."""
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if (operator == "**" and isinstance(left, int) and isinstance(right, int)
                    and left.bit_length() * abs(right) > 1 << 16):  # printing it is quadratic
                raise jinja2.exceptions.SecurityError(f"{left} ** {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                            and len(seq) * n > MAX_RENDER_CHARS):
                        raise jinja2.exceptions.SecurityError(
                            f"a repetition of {len(seq)} x {n} exceeds {MAX_RENDER_CHARS}")
            return super().call_binop(context, operator, left, right)

    now = datetime.now()  # one time per template: its renders of a conversation agree

    env = Sandbox(trim_blocks=True, lstrip_blocks=True,
                  extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = now.strftime
    return env, jinja2.exceptions.TemplateError


def read_hf_template(src: Path) -> str | None:
    """The chat template a transformers checkpoint directory ships: chat_template.jinja, or
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template} of
    which "default" is used); None when it has none."""
    f = src / CHAT_TEMPLATE_FILE
    if f.is_file():
        if f.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ValueError(f"{f}: {f.stat().st_size} bytes, larger than any chat template")
        try:
            return f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    conf = src / "tokenizer_config.json"
    if not conf.is_file():
        return None
    if conf.stat().st_size > 64 * MAX_TEMPLATE_BYTES:
        raise ValueError(f"{conf}: {conf.stat().st_size} bytes, larger than any tokenizer config")
    try:
        d = json.loads(conf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{conf}: not valid JSON: {e}") from None
    t = d.get("chat_template") if isinstance(d, dict) else None
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default")
    if t is None:
        return None
    if not isinstance(t, str):
        raise ValueError(f"{conf}: chat_template must be a string (or a list with a "
                         f"'default' entry), got {type(t).__name__}")
    if len(t.encode("utf-8")) > MAX_TEMPLATE_BYTES:
        raise ValueError(f"{conf}: chat_template larger than {MAX_TEMPLATE_BYTES} bytes")
    return t


class ChatTemplate:
    """A Jinja chat template with its model's BOS and EOS token texts; `where` names the
    file in errors."""

    def __init__(self, source: str, where: str, bos_token: str, eos_token: str):
        env, self._error = _environment()
        self.where, self.source = where, source
        try:
            self._template = env.from_string(source)
        except self._error as e:
            raise ValueError(f"{where}: the chat template does not parse: {e}") from None
        self._vars = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def of(cls, tokenizer, where: str) -> ChatTemplate:
        """The template an imported tokenizer (nanochat.data.tokenizer.Tokenizer) keeps; a
        clear error naming `where` (its directory) when it has none."""
        if tokenizer.chat_template is None:
            raise ValueError(f"{where}: the imported tokenizer has no chat template (no "
                             f"{CHAT_TEMPLATE_FILE}: the checkpoint it came from had no "
                             f"chat_template in tokenizer_config.json) and no nanochat chat "
                             f"markers, so conversations cannot be rendered for it")
        return cls(tokenizer.chat_template, f"{where}/{CHAT_TEMPLATE_FILE}",
                   tokenizer.decode([tokenizer.bos_id]), tokenizer.decode([tokenizer.eos_id]))

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation rendered as the template writes it."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        out, n = [], 0
        try:
            for piece in self._template.generate(messages=msgs,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **self._vars):
                n += len(piece)
                if n > MAX_RENDER_CHARS:
                    raise ValueError(f"{self.where}: the chat template rendered more than "
                                     f"{MAX_RENDER_CHARS} characters")
                out.append(piece)
        except (self._error, ArithmeticError, LookupError, TypeError, AttributeError,
                RecursionError) as e:  # SecurityError, UndefinedError, raise_exception, ...
            raise ValueError(f"{self.where}: the chat template failed: "
                             f"{type(e).__name__}: {e}") from None
        return "".join(out)

    def spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the whole conversation's text, each assistant message's character span)."""
        full = self.text(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            p = self.text(messages[:i], add_generation_prompt=True)
            q = self.text(messages[:i + 1])
            why = None
            if p == self.text(messages[:i]):
                why = "add_generation_prompt adds nothing"
            elif not q.startswith(p):
                why = "the generation prompt is not how it renders an assistant turn"
            elif not full.startswith(q):
                why = "a turn renders differently once later turns follow it"
            elif m["content"].strip() not in q[len(p):]:
                why = "the assistant turn's text does not hold the reply"
            if why:
                raise UnmarkableTemplate(f"{self.where}: the chat template cannot mark assistant "
                                 f"turns robustly for training ({why}; message {i})")
            spans.append((len(p), len(q)))
        return full, spans

    def render(self, messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
        """(token ids, loss mask) of a conversation in `tokenizer` (special tokens parsed);
        the mask is true on the tokens that overlap an assistant span (the reply and its
        end-of-turn token). Messages must be validated first (nanochat.data.chat.turns)."""
        text, spans = self.spans(messages)
        ids, offsets = tokenizer.encode_special(text)
        mask = [any(a < e and b > s for s, e in spans) for a, b in offsets]
        return ids, mask

    def end_of_turn(self, tokenizer) -> int:
        """The id that ends an assistant turn (e.g. <|eot_id|>): the last special token of
        a rendered assistant span; a clear error when the span has none."""
        text, (span,) = self.spans(_PROBE)
        ids, offsets = tokenizer.encode_special(text)
        ends = [i for i, (a, b) in zip(ids, offsets)
                if tokenizer.is_special(i) and a < span[1] and b > span[0]]
        if not ends:
            raise UnmarkableTemplate(f"{self.where}: the chat template ends an assistant turn "
                                     f"with no special token (it renders "
                                     f"{text[span[0]:span[1]]!r}), so a reply could not stop")
        return ends[-1]


def renderer(tokenizer, where: str):
    """chat.load's renderer for an imported tokenizer: rows are validated as ours are
    (nanochat.data.chat.turns) and rendered with the tokenizer's template. A row the
    template rejects (its raise_exception, an error) is a bad row; a template that has no
    end-of-turn token or cannot mark assistant turns is an error (UnmarkableTemplate)."""
    from nanochat.data import chat

    tmpl = ChatTemplate.of(tokenizer, where)
    tmpl.end_of_turn(tokenizer)  # refuse a template that cannot end a reply before reading data

    def render(messages):
        if not any(role == "assistant" for role, _ in chat.turns(messages)):
            raise chat.BadConversation("no assistant message (nothing to learn)")
        try:
            return tmpl.render(messages, tokenizer)
        except UnmarkableTemplate:
            raise
        except ValueError as e:
            raise chat.BadConversation(str(e)) from None

    return render
