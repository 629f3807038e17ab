"""The chat template across its users: the GGUF's tokenizer.chat_template (Jinja) rendered and
tokenized with special-token parsing (as llama.cpp does) gives the tokens `nanochat chat` /
`generate --chat` feed the engine; `generate --chat --json` returns the reply as `text`;
--system merges into the first user turn; llama.cpp applies the template itself (-m llama)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from nanochat.data import chat

MESSAGES = [[{"role": "user", "content": "def add(a, b):"}],
            [{"role": "system", "content": "Answer in Python."},
             {"role": "user", "content": "Write a function that returns the sum."}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "what is `len`?"}]]

jinja2 = pytest.mark.skipif(importlib.util.find_spec("jinja2") is None,
                            reason="jinja2 not installed")


@pytest.fixture(scope="module")
def gguf(trained_tiny):
    return str(trained_tiny["gguf"])


def _template(path: str) -> str:
    from gguf import GGUFReader

    f = GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(f.parts[f.data[0]]).decode()


def _conversation_prompt(eng, msgs) -> list[int]:
    """The tokens a Conversation feeds for msgs (the last one the user's)."""
    from nanochat.infer.chat import Conversation

    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    conv = Conversation(eng, system)
    turns = [m for m in msgs if m["role"] != "system"]
    for user, reply in zip(turns[:-1:2], turns[1::2]):  # the history, replies as given
        conv.turns.append(chat.user_tokens(
            (system + chat.SYSTEM_SEPARATOR if system and not conv.turns else "")
            + user["content"], eng.tokenize, conv.markers)
            + eng.tokenize(reply["content"]) + [conv.asst_end])
    user = turns[-1]["content"]
    if system and not conv.turns:
        user = system + chat.SYSTEM_SEPARATOR + user
    return conv._history() + chat.user_tokens(user, eng.tokenize, conv.markers)


@jinja2
def test_gguf_template_gives_the_engines_chat_tokens(gguf):
    import jinja2 as j2
    from nanochat.infer.engine import Engine

    assert _template(gguf) == chat.CHAT_TEMPLATE
    eng = Engine(gguf)
    tmpl = j2.Environment().from_string(_template(gguf))
    for msgs in MESSAGES:
        text = tmpl.render(messages=msgs, bos_token="<|bos|>", add_generation_prompt=True)
        assert eng.tokenize(text, parse_special=True) == _conversation_prompt(eng, msgs)


def test_generate_chat_json_returns_the_reply(gguf, run_nanochat):
    r = run_nanochat(["generate", "--model", gguf, "--chat", "--prompt", "def add(a, b):",
                      "--max-tokens", "6", "--temperature", "0", "--json"])
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    from nanochat.infer.engine import Engine

    eng = Engine(gguf)
    want = _conversation_prompt(eng, MESSAGES[0])
    assert j["chat"] and j["prompt"] == "def add(a, b):"
    assert j["prompt_tokens"] == len(want)
    end = eng.tokenize("<|assistant_end|>", parse_special=True)[0]
    assert j["text"] == eng.detokenize([t for t in j["tokens"] if t != end])
    r = run_nanochat(["generate", "--model", gguf, "--chat", "--prompt", "x", "--stop", "y"])
    assert r.returncode == 2 and "--stop does not apply with --chat" in r.stderr


def test_system_prompt_rides_on_the_first_user_turn(gguf):
    from nanochat.infer.chat import Conversation
    from nanochat.infer.engine import Engine

    eng = Engine(gguf)
    conv = Conversation(eng, "Answer in Python.")
    "".join(conv.reply("hi", max_tokens=2, temperature=0.0))
    "".join(conv.reply("again", max_tokens=2, temperature=0.0))
    first, second = conv.turns
    assert first[:-1][:first.index(conv.user_end) + 1] == [
        conv.user_start, *eng.tokenize("Answer in Python.\n\nhi"), conv.user_end]
    assert second[1:second.index(conv.user_end)] == eng.tokenize("again")


@pytest.mark.llama
def test_llama_cpp_applies_the_template(trained_tiny):
    """llama.cpp's own reader of the GGUF: its Jinja formatter over tokenizer.chat_template,
    tokenized by llama.cpp with special tokens parsed, gives our chat prompt tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from nanochat.infer.engine import Engine

    path = str(trained_tiny["gguf"])
    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=1, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == chat.CHAT_TEMPLATE
    fmt = Jinja2ChatFormatter(template, eos_token="<|bos|>", bos_token="<|bos|>")
    eng = Engine(path)
    for msgs in MESSAGES:
        prompt = fmt(messages=msgs).prompt
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == _conversation_prompt(eng, msgs)
