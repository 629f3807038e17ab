"""Run config: TOML into typed dataclasses, unknown keys rejected, overrides typed."""

import pytest
from nanochat import config as C


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults_validate():
    cfg = C.RunConfig().validate()
    assert cfg.model.head_dim == cfg.model.d_model // cfg.model.n_heads


def test_file_values_are_typed(tmp_path):
    cfg = C.load_config(write(tmp_path, "[model]\nd_model = 512\nrope_theta = 500000\n"
                                        "[train]\ntime_budget_s = 60\n"))
    assert cfg.model.d_model == 512
    assert isinstance(cfg.model.rope_theta, float) and cfg.model.rope_theta == 5e5
    assert isinstance(cfg.train.time_budget_s, float)


@pytest.mark.parametrize("text, match", [
    ("[model]\nd_modle = 3\n", r"c\.toml: model: unknown key\(s\) d_modle"),
    ("[modle]\nx = 1\n", r"unknown key\(s\) modle"),
    ("[model]\nd_model = '256'\n", r"model\.d_model: expected int"),
    ("[model]\nn_layers = true\n", r"model\.n_layers: expected int"),
    ("[model]\nd_model = 250\nn_heads = 4\n", r"head dim|divisible"),
    ("[model]\nactivation = 'gelu'\n", r"activation must be 'silu' or 'relu2'"),
    ("[train]\nbatch_size = 0\n", r"train\.batch_size must be > 0"),
    ("[train]\nseq_len = 4096\n", r"exceeds model\.max_seq_len"),
    ("[schedule]\ndecay_shape = 'exp'\n", r"decay_shape"),
    ("[model.mhc]\nstreams = 2\nsinkhorn_iters = 1001\n", r"sinkhorn_iters must be <= 1000"),
    ("[model\n", r"invalid TOML"),
])
def test_bad_files_name_file_and_key(tmp_path, text, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(write(tmp_path, text))


def test_overrides():
    cfg = C.apply_overrides(C.RunConfig(), ["optim.lr=1e-3", "model.activation=relu2",
                                            "train.max_steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.model.activation == "relu2" and cfg.train.max_steps == 7
    with pytest.raises(C.ConfigError, match=r"train: unknown key\(s\) lr"):
        C.apply_overrides(C.RunConfig(), ["train.lr=1"])
    with pytest.raises(C.ConfigError, match=r"expected table\.key=value"):
        C.apply_overrides(C.RunConfig(), ["lr=1"])
    with pytest.raises(C.ConfigError, match=r"unknown table 'trian'"):
        C.apply_overrides(C.RunConfig(), ["trian.x=1"])


def test_unknown_builtin_name_lists_choices():
    with pytest.raises(C.ConfigError, match=r"unknown config 'nope'"):
        C.load_config("nope")
