"""`nanochat recipe`: the production recipes' plans (budget arithmetic, memory, time from a
measured or given tokens/s) and a recipe run end to end on a shrunken model."""

import dataclasses
import json

import pytest
import torch
from nanochat.cli import main
from nanochat.config import ConfigError, load_config
from nanochat.train import recipes

torch.set_num_threads(1)


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_plan_arithmetic(name):
    p = recipes.plan(name, tokens_per_s=100_000.0)
    r = recipes.RECIPES[name]
    seq = load_config(name).model.max_seq_len
    assert p["tokens_per_step"] == r.micro_batch * r.grad_accum * seq
    assert p["token_budget"] == p["tokens_per_step"] * r.steps
    assert 18 <= p["tokens_per_active_param"] <= 22  # ~20 tokens per (active) parameter
    assert p["expected_hours"] == pytest.approx(p["token_budget"] / 100_000 / 3600)
    assert p["training_state_bytes"] < 70 * 2**30  # one 80 GB GPU
    assert p["config"]["train"]["device"] == "cuda"
    assert p["config"]["schedule"]["decay_shape"] == "1-sqrt"
    # the printed command is the same config
    _, cfg = recipes.build(name)
    assert load_config(name, p["overrides"]).to_dict() == cfg.to_dict()
    text = recipes.format_plan(p)
    assert f"nanochat train --config {name}" in text and "given with --tokens-per-s" in text


def test_extra_overrides_and_errors():
    _, cfg = recipes.build("medium_3b", ["model.mhc.streams=4", "train.collider.enabled=true"])
    assert cfg.model.mhc.streams == 4 and cfg.model.moe.experts == 16
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipes.build("huge_70b")


def test_measured_tokens_per_s_full_and_extrapolated(monkeypatch):
    _, cfg = recipes.build("nano_125m")
    small = dataclasses.replace(cfg.model, vocab_size=256, d_model=64, n_heads=2, n_kv_heads=2,
                                ffn_hidden=128, n_layers=4, max_seq_len=1024)
    cfg = dataclasses.replace(cfg, model=small, train=dataclasses.replace(cfg.train, seq_len=64))
    tps, how = recipes.measure_tokens_per_s(cfg, batch=1, steps=1)
    assert tps > 0 and "full model" in how
    monkeypatch.setattr(recipes, "_available_bytes", lambda device: 1)  # nothing fits
    tps2, how2 = recipes.measure_tokens_per_s(cfg, batch=1, steps=1)
    assert tps2 > 0 and "extrapolated to 4 layers" in how2


def test_cli_dry_run_json(capsys):
    assert main(["recipe", "small_560m", "--dry-run", "--tokens-per-s", "50000", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["recipe"] == "small_560m" and p["config"]["model"]["attention"]["pattern"] == "SSSL"
    assert p["seed_hours"] == 8.0


def test_cli_run_needs_data(capsys):
    assert main(["recipe", "nano_125m"]) != 0  # the CLI reports errors, no traceback
    assert "--data DIR is required" in capsys.readouterr().err


def test_recipe_runs_training(tmp_path):
    """The recipe's own path (its overrides, then --set ones shrinking it to seconds)."""
    from nanochat.data import corpus
    from test_train import FILES, STDLIB, VOCAB

    src = tmp_path / "src"
    src.mkdir()
    for f in FILES[:4]:
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    data = corpus.prepare([str(src)], tmp_path / "data", vocab_size=VOCAB, val_fraction=0.2,
                          progress=False).out_dir
    shrink = [f"model.vocab_size={VOCAB}", "model.d_model=64", "model.n_layers=2",
              "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=128",
              "model.max_seq_len=64", "model.attention.window=16", "train.seq_len=64",
              "train.batch_size=2", "train.grad_accum=1", "train.max_steps=3",
              "train.device=cpu", "train.eval_tokens=512", "train.sample_tokens=4",
              "schedule.warmup_steps=1"]
    argv = ["recipe", "small_560m", "--data", str(data), "--out", str(tmp_path / "run")]
    for s in shrink:
        argv += ["--set", s]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["attention"]["pattern"] == "SSSL"  # the recipe's config
    assert saved["train"]["max_steps"] == 3


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_fsdp_plan_shards_memory_per_rank(name):
    """--nproc N: the global batch stays, the sharded state per rank is 1/N of one GPU's,
    the activations follow the per-rank micro-batch, and the command is torchrun's."""
    from nanochat.model.gpt import model_info

    one = recipes.plan(name, tokens_per_s=1000.0, nproc=1)
    prev = one["memory_per_rank"]
    for n in (2, 8):
        p = recipes.plan(name, tokens_per_s=1000.0, nproc=n)
        m = p["memory_per_rank"]
        assert p["tokens_per_step"] == one["tokens_per_step"]  # same global batch
        assert p["global_batch_sequences"] == (p["micro_batch_per_rank"]
                                               * p["grad_accum_per_rank"] * n)
        for k in ("params", "grads", "optimizer"):
            assert m[k] == -(-one["memory_per_rank"][k] // n) < prev[k]
        act = model_info(load_config(name).model, p["micro_batch_per_rank"],
                         p["config"]["train"]["seq_len"])["activation_bytes"]
        assert m["activations"] == act and m["gathered"] > 0
        assert p["training_state_bytes"] == sum(v for k, v in m.items() if k != "total")
        assert m["total"] < prev["total"]
        assert p["tokens_per_s"] == 1000.0 * n and "linear scaling" in p["tokens_per_s_source"]
        assert p["command"].startswith(f"torchrun --standalone --nproc_per_node={n} -m "
                                       f"nanochat train --config {name} ")
        cfg = load_config(name, p["overrides"])
        assert cfg.train.parallel == "fsdp" and cfg.train.batch_size == p["micro_batch_per_rank"]
        assert f"{n} GPUs, FSDP2" in recipes.format_plan(p)
        prev = m


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_one_rank_plan_is_the_single_process_plan(name):
    """--nproc 1 plans what the dry run planned before --nproc: one process, unsharded."""
    from nanochat.model.gpt import model_info

    p = recipes.plan(name, tokens_per_s=1000.0, nproc=1)
    r = recipes.RECIPES[name]
    seq = load_config(name).model.max_seq_len
    info = model_info(load_config(name).model, r.micro_batch, seq)
    assert p["overrides"] == r.overrides(seq)
    assert not any("parallel" in o for o in p["overrides"])
    assert (p["micro_batch_per_rank"], p["grad_accum_per_rank"]) == (r.micro_batch, r.grad_accum)
    assert p["training_state_bytes"] == info["training_state_bytes"]
    assert p["param_state_bytes"] == info["params_bytes"] * 2 + info["optimizer_state_bytes"]
    assert p["activation_bytes"] == info["activation_bytes"]
    assert p["memory_per_rank"]["gathered"] == 0 and p["tokens_per_s"] == 1000.0
    assert p["command"].startswith(f"nanochat train --config {name} --data DIR")


def test_bad_nproc_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match=r"128 sequences per optimizer step do not split "
                       r"evenly over 3 ranks; use one of 1, 2, 4, 8"):
        recipes.plan("nano_125m", tokens_per_s=1000.0, nproc=3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"--nproc must be an integer >= 1, got {bad}"):
            recipes.plan("nano_125m", tokens_per_s=1000.0, nproc=bad)
    assert main(["recipe", "small_560m", "--dry-run", "--tokens-per-s", "1", "--nproc",
                 "5"]) != 0
    assert "over 5 ranks" in capsys.readouterr().err


def test_cli_nproc_json(capsys):
    assert main(["recipe", "medium_3b", "--dry-run", "--tokens-per-s", "1e5", "--nproc", "16",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["nproc"], p["parallel"], p["micro_batch_per_rank"],
            p["grad_accum_per_rank"]) == (16, "fsdp", 2, 8)


def test_run_with_nproc_launches_the_planned_torchrun_command(monkeypatch, capsys):
    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    assert main(["recipe", "nano_125m", "--nproc", "4", "--data", "d", "--out", "o",
                 "--set", "optim.lr=0.001"]) == 0
    (cmd,) = seen
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        "-m"]
    i = cmd.index("train")
    assert cmd[i:i + 7] == ["train", "--config", "nano_125m", "--data", "d", "--out", "o"]
    sets = [cmd[j + 1] for j, a in enumerate(cmd) if a == "--set"]
    assert sets == recipes.RECIPES["nano_125m"].overrides(1024, 4) + ["optim.lr=0.001"]
    assert "train.batch_size=16" in sets and "train.grad_accum=2" in sets
    assert "launching: torchrun --standalone --nproc_per_node=4" in capsys.readouterr().out
