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
    ("[model]\nactivation = 'gelu'\n",
     r"model\.activation must be one of 'silu', 'relu2', got 'gelu'"),
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


def _choice_fields(cls=C.RunConfig, where=""):
    """(dotted key, allowed values) of every Literal option, nested tables included."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(typ):
            yield from _choice_fields(typ, key)
        elif typing.get_origin(typ) is typing.Literal:
            yield key, typing.get_args(typ)


CHOICES = dict(_choice_fields())


def test_every_string_option_is_a_literal():
    """The 16 string options that take fixed values are typed, so one check covers them."""
    assert set(CHOICES) == {
        "model.activation", "model.mhc.res", "model.moe.balance", "train.bitlinear",
        "train.bitlinear_backward", "train.device", "train.fused_loss",
        "train.fused_loss_precision", "train.parallel", "train.checkpoint_format", "optim.name",
        "optim.rest", "optim.state", "optim.muon.scale", "optim.muon.ns_dtype",
        "schedule.decay_shape"}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choice_names_the_key_and_the_allowed_values(key, tmp_path):
    allowed = ", ".join(repr(a) for a in CHOICES[key])
    *tables, name = key.split(".")
    for bad, shown in (("'nope'", "'nope'"), ("3", "3")):
        f = tmp_path / "c.toml"
        f.write_text(f"[{'.'.join(tables)}]\n{name} = {bad}\n")
        with pytest.raises(C.ConfigError) as e:
            C.load_config(str(f))
        assert str(e.value) == f"{f}: {key} must be one of {allowed}, got {shown}"
    for value in CHOICES[key]:  # every allowed value loads
        C.apply_overrides(C.RunConfig(), [f"{key}={value}"])
    with pytest.raises(C.ConfigError, match=f"{key} must be one of"):
        C.apply_overrides(C.RunConfig(), [f"{key}=nope"])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choice_set_in_python_is_refused_by_validate(key):
    """Values set on the dataclasses (not parsed) meet the same check in validate()."""
    cfg = C.RunConfig()
    *tables, name = key.split(".")
    node = cfg
    for t in tables:
        node = getattr(node, t)
    setattr(node, name, "nope")
    with pytest.raises(C.ConfigError, match=f"^{key} must be one of .*, got 'nope'$"):
        cfg.validate()


def test_other_modules_take_their_choices_from_config():
    import typing

    from nanochat.ops import bitlinear

    assert C.OPTIMIZERS == typing.get_args(C.Optimizer) == CHOICES["optim.name"]
    assert bitlinear.KERNELS == CHOICES["train.bitlinear"]
    assert bitlinear.BACKWARDS == CHOICES["train.bitlinear_backward"]
