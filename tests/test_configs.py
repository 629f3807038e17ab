"""The production configs (configs/models/{nano_125m,small_560m,medium_3b}.toml): counts on
the meta device match their names, a depth- and width-reduced copy of each (mHC n = 4 on
too) trains a step with every option composed, old configs load, the exporter refuses the
options it cannot write yet."""

import dataclasses
import json
import types

import pytest
import torch
from nanochat.config import ConfigError, ModelConfig, load_config
from nanochat.export import architecture, export_gguf
from nanochat.model.gpt import GPT, model_info

torch.set_num_threads(1)

# name -> the parameter count its name states (for the MoE: total)
PRODUCTION = {"nano_125m": 125e6, "small_560m": 560e6, "medium_3b": 3.0e9}


@pytest.mark.parametrize("name", PRODUCTION)
def test_counts_match_the_name(name):
    cfg = load_config(name).model
    info = model_info(cfg, batch=1, seq=128)  # meta device
    assert abs(info["total_params"] / PRODUCTION[name] - 1) < 0.05, info["total_params"]
    if name == "nano_125m":  # dense, full attention
        assert cfg.moe.experts == 0 and cfg.attention.pattern == "L" and cfg.mhc.streams == 1
    if name == "small_560m":  # hybrid attention
        assert cfg.attention.pattern == "SSSL" and cfg.attention.window < cfg.max_seq_len
    if name == "medium_3b":  # MoE: "3b" is the total; active is what a token uses
        assert cfg.moe.experts == 16 and cfg.moe.top_k == 2 and cfg.moe.shared_expert
        assert 0.8e9 < info["active_params"] < 0.95e9
        assert info["active_params"] < info["total_params"] / 3


def test_windowed_kv_cache_is_smaller():
    cfg = load_config("small_560m").model
    full = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, pattern="L"))
    seq = cfg.max_seq_len
    hybrid_kv = model_info(cfg, batch=1, seq=seq)["kv_cache_bytes"]
    full_kv = model_info(full, batch=1, seq=seq)["kv_cache_bytes"]
    # 5 full layers of 2048 positions + 15 windowed of 512, vs 20 full
    assert hybrid_kv / full_kv == pytest.approx((5 * 2048 + 15 * 512) / (20 * 2048))


# each option set -> what it must change against the same config with the option off
OPTIONS = {
    "mhc": (["model.mhc.streams=4"], ["model.mhc.streams=1"],
            lambda on, off: on["mhc_params"] > 0 == off["mhc_params"]),
    "mhc-lite": (["model.mhc.streams=4", "model.mhc.res=lite"],
                 ["model.mhc.streams=4", "model.mhc.res=sinkhorn"],
                 lambda on, off: on["mhc_params"] != off["mhc_params"] > 0),
    "hybrid": (["model.attention.pattern=SL", "model.attention.window=256"],
               ["model.attention.pattern=L"],
               lambda on, off: on["kv_cache_bytes"] < off["kv_cache_bytes"]),
    "moe": (["model.moe.experts=4"], ["model.moe.experts=0"],
            lambda on, off: on["router_params"] > 0 == off["router_params"]
            and on["active_params"] < on["total_params"]),
}


@pytest.mark.parametrize("name", PRODUCTION)
@pytest.mark.parametrize("option", OPTIONS)
def test_options_switch_by_config(name, option):
    """Every option changes what it should (counted at the full context, where a window
    saves KV cache), against the same config with it off."""
    on_sets, off_sets, changed = OPTIONS[option]
    on, off = (model_info(c, batch=1, seq=c.max_seq_len) for c in (
        load_config(name, on_sets).model, load_config(name, off_sets).model))
    assert changed(on, off), (on, off)


def _reduced(cfg: ModelConfig) -> ModelConfig:
    """The same options on a model small enough to train a step in a test: 3 layers,
    d_model 64, vocab 256, context 32, window 8, experts of width 32, mHC n = 4, and two
    MTP heads."""
    moe = cfg.moe
    if moe.experts:
        moe = dataclasses.replace(moe, experts=4, top_k=min(moe.top_k, 4), expert_hidden=32)
    return dataclasses.replace(
        cfg, vocab_size=256, d_model=64, n_layers=3, n_heads=4,
        n_kv_heads=2 if cfg.n_kv_heads < cfg.n_heads else 4, ffn_hidden=96, max_seq_len=32,
        moe=moe, mhc=dataclasses.replace(cfg.mhc, streams=4),
        attention=dataclasses.replace(cfg.attention, window=8),
        mtp=dataclasses.replace(cfg.mtp, heads=2))


@pytest.mark.parametrize("name", PRODUCTION)
@pytest.mark.parametrize("res", ["sinkhorn", "lite"])
def test_reduced_copy_trains_with_options_composed(name, res):
    cfg = _reduced(load_config(name).model)
    cfg.mhc.res = res
    torch.manual_seed(0)
    model = GPT(cfg, bitlinear="torch")
    assert all(hasattr(b, "mhc_attn") for b in model.blocks)
    assert (model.blocks[0].moe is not None) == (name == "medium_3b")
    assert [b.window for b in model.blocks] == [cfg.attention.layer_window(i) for i in range(3)]
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if "_exps" not in n:  # an expert that drew no token has no gradient this step
            assert p.grad.abs().max() > 0, n
    out = model.generate(idx[:, :4], 8, temperature=0)
    assert out.shape == (2, 12)


def test_old_config_dicts_load_with_dense_defaults():
    d = dataclasses.asdict(load_config("tiny").model)
    for k in ("mhc", "moe", "attention"):
        d.pop(k)
    model = GPT.from_config_dict(d, bitlinear="torch")
    c = model.config
    assert c.mhc.streams == 1 and c.moe.experts == 0 and c.attention.pattern == "L"
    assert all(b.window is None and b.moe is None and not hasattr(b, "mhc_attn")
               for b in model.blocks)
    with pytest.raises(ConfigError, match="model.moe: unknown key"):
        GPT.from_config_dict({**d, "moe": {"experts": 2, "nope": 1}})


@pytest.mark.parametrize("option,key", [
    ("model.moe.experts=4", "nanochat.expert_count"),
    ("model.mhc.streams=2", "nanochat.hc.stream_count"),
    ("model.attention.pattern=SL", "nanochat.attention.sliding_window")])
def test_every_option_exports_with_its_key(option, key, tmp_path):
    """The writer declares each option's GGUF key (docs/gguf.md) and writes the file."""
    from nanochat.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 20], 300)
    cfg = load_config("tiny", [option, f"model.vocab_size={tok.vocab_size}", "model.d_model=256",
                               "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
                               "model.ffn_hidden=256", "model.moe.expert_hidden=256"]).model
    assert key in {k for k, _, _ in architecture(cfg)[1]}
    export_gguf(GPT(cfg, bitlinear="torch"), tok, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_export_refuses_before_writing(tmp_path):
    """What the engine cannot run is refused by its key, and no file is left behind."""
    cfg = load_config("tiny", ["model.moe.experts=1025", "model.moe.expert_hidden=32",
                               "model.d_model=64", "model.n_layers=1", "model.n_heads=1",
                               "model.n_kv_heads=1", "model.ffn_hidden=64"]).model
    tok = types.SimpleNamespace(vocab_size=cfg.vocab_size)
    with pytest.raises(ValueError, match="model.moe.experts = 1025"):
        export_gguf(GPT(cfg, bitlinear="torch"), tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_trainer_runs_every_option_and_resumes_bit_exact(tmp_path):
    """`nanochat train`'s loop with mHC n = 4, MoE and hybrid attention on: the loss is
    logged, and a resumed run (MoE bias buffers in the checkpoint) equals a straight one."""
    from nanochat import checkpoint
    from nanochat.config import apply_overrides
    from nanochat.data import corpus
    from nanochat.train.loop import train
    from test_train import FILES, STDLIB, VOCAB, quiet, small_config

    src = tmp_path / "src"
    src.mkdir()
    for f in FILES[:6]:
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    data = corpus.prepare([str(src)], tmp_path / "data", vocab_size=VOCAB, val_fraction=0.2,
                          progress=False).out_dir
    cfg = apply_overrides(small_config(max_steps=6), [
        "model.mhc.streams=4", "model.moe.experts=4", "model.attention.pattern=SL",
        "model.attention.window=16", "model.n_layers=2"])
    straight = train(cfg, data, tmp_path / "a", progress_bar=False, log=quiet)
    first = train(cfg, data, tmp_path / "b", progress_bar=False, stop_at_step=3, log=quiet)
    second = train(cfg, data, tmp_path / "b", resume=True, progress_bar=False, log=quiet)
    assert first.losses + second.losses == straight.losses
    a, b = checkpoint.load(tmp_path / "a")["model"], checkpoint.load(tmp_path / "b")["model"]
    assert any(k.endswith("moe.expert_bias") and a[k].abs().sum() > 0 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_arch_rows(tmp_path, capsys):
    """`nanochat bench arch --json`: one row per variant, measured bytes, ratios to plain."""
    import json

    from nanochat.cli import main

    toml = tmp_path / "m.toml"
    toml.write_text("[model]\nvocab_size = 256\nd_model = 64\nn_layers = 2\nn_heads = 2\n"
                    "n_kv_heads = 2\nffn_hidden = 128\nmax_seq_len = 64\n"
                    "[train]\nseq_len = 32\n")
    assert main(["bench", "arch", "--config", str(toml), "--batch", "2", "--seq", "32",
                 "--steps", "1", "--rounds", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == ["plain", "mhc", "mhc-lite", "moe", "hybrid"]
    by = {r["variant"]: r for r in rows}
    assert by["plain"]["time_vs_plain"] == 1.0
    assert by["mhc"]["activation_bytes"] > by["plain"]["activation_bytes"] > 0
    assert by["moe"]["params"] > by["moe"]["active_params"]
    assert by["hybrid"]["params"] == by["plain"]["params"]


def test_bitnet_2b4t_is_the_published_config(tmp_path):
    """configs/models/bitnet_2b4t.toml is what `nanochat import hf` makes of the config.json
    Microsoft publishes for bitnet-b1.58-2B-4T (its fields as released), and its size is the
    published 2.4B."""
    from nanochat.interop.hf_bitnet import read_config

    published = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "relu2", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 6912,
        "max_position_embeddings": 4096, "num_attention_heads": 20, "num_hidden_layers": 30,
        "num_key_value_heads": 5, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"}}
    (tmp_path / "config.json").write_text(json.dumps(published))
    imported, _ = read_config(tmp_path)
    ours = load_config("bitnet_2b4t").model
    assert imported == ours
    total = model_info(ours, batch=1, seq=128)["total_params"]
    assert abs(total / 2.41e9 - 1) < 0.01, total
