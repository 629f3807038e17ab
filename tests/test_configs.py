"""The production configs (configs/models/{nano_125m,small_560m,medium_3b}.toml): counts on
the meta device match their names, a depth- and width-reduced copy of each (mHC n = 4 on
too) trains a step with every option composed, old configs load, the exporter refuses the
options it cannot write yet."""

import dataclasses
import types

import pytest
import torch
from nanochat.config import ConfigError, ModelConfig, load_config
from nanochat.export import architecture, check_supported, export_gguf
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


@pytest.mark.parametrize("name", PRODUCTION)
@pytest.mark.parametrize("option", ["model.mhc.streams=4", "model.mhc.res=lite",
                                    "model.attention.pattern=SL", "model.moe.experts=4"])
def test_options_switch_by_config(name, option):
    cfg = load_config(name, [option]).model
    info = model_info(cfg, batch=1, seq=64)
    if option.startswith("model.mhc.streams"):
        assert info["mhc_params"] > 0
    if option.startswith("model.moe"):
        assert info["router_params"] > 0


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


@pytest.mark.parametrize("option,named,key", [
    ("model.moe.experts=4", "model.moe.experts", "nanochat.expert_count"),
    ("model.mhc.streams=2", "model.mhc.streams", "nanochat.hc.stream_count"),
    ("model.attention.pattern=SL", "model.attention.pattern",
     "nanochat.attention.sliding_window")])
def test_export_refuses_unsupported_options(option, named, key, tmp_path):
    """Each option is refused by name until the writer declares its GGUF keys
    (docs/gguf.md); once it does, export must not refuse it."""
    cfg = load_config("tiny", [option]).model
    if key in {k for k, _, _ in architecture(cfg)[1]}:  # the writer supports it now
        check_supported(cfg)
        return
    with pytest.raises(ValueError, match=named):
        check_supported(cfg)
    small = dataclasses.replace(cfg, d_model=64, n_layers=1, n_heads=1, n_kv_heads=1,
                                ffn_hidden=64)
    model = GPT(small, bitlinear="torch")
    tok = types.SimpleNamespace(vocab_size=small.vocab_size)
    with pytest.raises(ValueError, match=named):
        export_gguf(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    check_supported(load_config("nano_125m").model)  # the dense config exports


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
