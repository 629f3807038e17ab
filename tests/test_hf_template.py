"""Chat fine-tuning of an imported model with its own chat template (nanochat/data/template.py):
a tiny transformers BitNet model with a LLaMA-3-style tokenizer and Jinja template written
here (no downloads). transformers' apply_chat_template is the oracle for the rendered ids and
the assistant mask; the template runs sandboxed; export writes it as tokenizer.chat_template
and `generate --chat` feeds what it renders."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")
pytest.importorskip("jinja2")

from nanochat.cli import main
from nanochat.data import template
from nanochat.data.tokenizer import Tokenizer
from nanochat.interop.hf_bitnet import import_hf
from nanochat.train.sft import sft
from test_hf_bitnet import llama3_tokenizer_json

VOCAB = 512
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# LLaMA-3's template, shortened (no tool calls or date header), with transformers'
# {% generation %} marks around what the assistant writes so that transformers can compute
# the assistant mask itself.
TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "def f(x): what does it return?"},
     {"role": "assistant", "content": "x * 2, doubled."}],
    [{"role": "system", "content": "Answer in Python."},
     {"role": "user", "content": "The cat's hat?"},
     {"role": "assistant", "content": "def hat(cat):\n    return cat.hat"},
     {"role": "user", "content": "isn't it red <|eot_id|>"},
     {"role": "assistant", "content": "  1234567 apples 😀  "}],
]


def llama3_chat_tokenizer_json() -> str:
    """test_hf_bitnet's LLaMA-3-style tokenizer.json with LLaMA-3's chat special tokens."""
    return llama3_tokenizer_json(VOCAB, (BOS, EOS, HEADER_START, HEADER_END, EOT),
                                 ("user assistant system\n\n",))


def write_hf_dir(d, chat_template: str | None = TEMPLATE):
    """A random tiny BitNetForCausalLM (SiLU: llama.cpp's bitnet graph) with the tokenizer above and `chat_template` in its
    tokenizer_config.json, as a transformers checkpoint ships them."""
    quant = {"quant_method": "bitnet", "linear_class": "autobitlinear",
             "quantization_mode": "online"}
    cfg = transformers.BitNetConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        tie_word_embeddings=True, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=0, eos_token_id=1, quantization_config=quant)
    torch.manual_seed(0)
    transformers.BitNetForCausalLM(cfg).save_pretrained(d)
    (d / "tokenizer.json").write_text(llama3_chat_tokenizer_json(), encoding="utf-8")
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}
    if chat_template is not None:
        conf["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(conf), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "bitnet-chat")


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "imported"
    import_hf(hf_dir, run, log=lambda *_: None)
    return run


def _tok(run) -> tuple[Tokenizer, str]:
    from nanochat import checkpoint

    d = checkpoint.load(run)["path"] / "tokenizer"
    return Tokenizer.load(d), str(d)


def _hf_tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_and_mask_equal_transformers(imported, hf_dir, messages):
    """The rendered ids are transformers' apply_chat_template ids, the loss mask its
    assistant mask (from the template's {% generation %} marks, which ours does not use)."""
    tok, where = _tok(imported)
    ids, mask = template.renderer(tok, where)(messages)
    want = _hf_tokenizer(hf_dir).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(want["input_ids"])
    assert [int(m) for m in mask] == list(want["assistant_masks"])
    # the mask holds each reply and its <|eot_id|>, never a header or a user's typed EOT
    eot = tok.encode_special(EOT)[0][0]
    n_replies = sum(m["role"] == "assistant" for m in messages)
    assert sum(i == eot and m for i, m in zip(ids, mask)) == n_replies
    prompt = template.ChatTemplate.of(tok, where)
    assert prompt.end_of_turn(tok) == eot


def test_sft_trains_an_imported_model(imported, hf_dir, tmp_path):
    """sft runs on the imported model; the training targets are exactly the masked tokens;
    the template travels into the new run, and export writes it to the GGUF."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 3)
                    + '{"messages": [{"role": "assistant", "content": "first"}]}\n')
    logs = []
    result, summary = sft([data], tmp_path / "chat", imported, steps=3, progress_bar=False,
                          overrides=["train.batch_size=2", "train.device=cpu"],
                          log=logs.append)
    assert result.step == 3 and summary["conversations"] == 6 and summary["bad_rows"] == 1
    assert "chat.jsonl:7:" in summary["bad"][0]
    assert torch.isfinite(torch.tensor(result.val_loss))
    tok, where = _tok(tmp_path / "chat")
    assert tok.chat_template == TEMPLATE
    # the conversations trained on carry transformers' assistant masks
    from nanochat.data import chat

    hf = _hf_tokenizer(hf_dir)
    cs = chat.load([data], template.renderer(tok, where), 129)
    want = [hf.apply_chat_template(m, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)["assistant_masks"]
            for m in CONVERSATIONS * 3]
    assert [m.astype(int).tolist() for m in cs.masks] == [list(w) for w in want]
    gguf = tmp_path / "chat.gguf"
    assert main(["export", "--gguf", str(gguf), "--checkpoint", str(tmp_path / "chat")]) == 0
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    text = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert text == TEMPLATE
    eot = int(fields["tokenizer.ggml.eot_token_id"].parts[-1][0])
    assert eot == tok.encode_special(EOT)[0][0]


def test_generate_chat_feeds_the_template(imported, hf_dir, tmp_path, capsys):
    """generate --chat on an imported model's GGUF: the prompt is transformers' rendering
    with the generation prompt, and the reply stops at most at <|eot_id|>."""
    gguf = tmp_path / "m.gguf"
    assert main(["export", "--gguf", str(gguf), "--checkpoint", str(imported)]) == 0
    from nanochat.infer import chat
    from nanochat.infer.engine import Engine

    eng = Engine(str(gguf))
    conv = chat.open_conversation(eng, system="Answer in Python.")
    assert isinstance(conv, chat.TemplateConversation)
    reply = "".join(conv.reply("The cat's hat?", max_tokens=8, temperature=0.0))
    hf = _hf_tokenizer(hf_dir)
    msgs = [{"role": "system", "content": "Answer in Python."},
            {"role": "user", "content": "The cat's hat?"}]
    want = list(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                       return_dict=True)["input_ids"])
    assert conv.last_prompt == want
    assert EOT not in reply
    # the second turn: the history with the reply as the template renders it; the cache
    # keeps the part of the first prompt the new one shares
    reply2 = "".join(conv.reply("isn't it red?", max_tokens=8, temperature=0.0))
    msgs += [{"role": "assistant", "content": reply},
             {"role": "user", "content": "isn't it red?"}]
    want = list(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                       return_dict=True)["input_ids"])
    assert conv.last_prompt == want and EOT not in reply2
    assert main(["generate", "--model", str(gguf), "--chat", "--prompt", "hi", "--json",
                 "--max-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["chat"] is True


MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ x }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ 'x' * 10 ** 10 }}",  # memory: refused before it is allocated
    "{{ ['x'] * 100000000 }}",
    "{{ 2 ** 100000000 }}",  # time: printing a number of 30 million digits
    "{{ 1 / 0 }}{{ messages[99] }}",
]


@pytest.mark.parametrize("source", MALICIOUS)
def test_malicious_template_errors_instead_of_executing(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tmpl = template.ChatTemplate(source, "evil.jinja", BOS, EOS)
    with pytest.raises(ValueError, match="evil.jinja: the chat template failed"):
        tmpl.text(CONVERSATIONS[0])
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("source, why", [
    (TEMPLATE.replace("{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}", ""),
     "add_generation_prompt adds nothing"),
    # an assistant turn rendered with its reply dropped: no span holds the reply
    ("{% for m in messages %}{{ m['role'] + ':' }}{% if m['role'] != 'assistant' %}"
     "{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
     "{% if add_generation_prompt %}assistant:{% endif %}",
     "does not hold the reply"),
    # an earlier reply rendered otherwise once later turns follow (as templates that drop
    # earlier reasoning do): the text trained on is not the text the model will see
    ("{% for m in messages %}{{ m['role'] + ':' }}"
     "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}"
     "{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
     "{% if add_generation_prompt %}assistant:{% endif %}", "renders differently"),
    # a reply that ends with no special token cannot stop
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "no special token"),
])
def test_unmarkable_template_refused(imported, source, why, tmp_path):
    tok, where = _tok(imported)
    tok.chat_template = source
    with pytest.raises(template.UnmarkableTemplate, match=why):
        template.renderer(tok, where)(CONVERSATIONS[1])


def test_no_template_refused_by_name(tmp_path):
    src = write_hf_dir(tmp_path / "hf-plain", chat_template=None)
    import_hf(src, tmp_path / "run", log=lambda *_: None)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer: the imported tokenizer has no chat "
                                         r"template"):
        sft([data], tmp_path / "out", tmp_path / "run", steps=1, progress_bar=False,
            log=lambda *_: None)
    assert main(["sft", "--checkpoint", str(tmp_path / "run"), "--data", str(data),
                 "--out", str(tmp_path / "out2"), "--steps", "1"]) != 0


@pytest.mark.llama
def test_llama_cpp_reads_the_template(imported, hf_dir, tmp_path):
    """llama.cpp's reader of the exported GGUF: its metadata holds the template, and its
    own Jinja formatter renders the same text as transformers."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = tmp_path / "m.gguf"
    assert main(["export", "--gguf", str(gguf), "--checkpoint", str(imported)]) == 0
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=TEMPLATE, eos_token=EOS, bos_token=BOS)
    got = fmt(messages=CONVERSATIONS[0][:1]).prompt
    want = _hf_tokenizer(hf_dir).apply_chat_template(CONVERSATIONS[0][:1], tokenize=False,
                                                     add_generation_prompt=True)
    assert got == want


def test_export_hf_keeps_the_template(imported, tmp_path):
    out = tmp_path / "hf-out"
    assert main(["export", "--hf", str(out), "--checkpoint", str(imported)]) == 0
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == TEMPLATE
    assert template.read_hf_template(out) == TEMPLATE
