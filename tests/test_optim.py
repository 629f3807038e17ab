"""Optimizers against float64 references of their update rules (Muon's Newton-Schulz and
whole step, Lion, AdamW), the hybrid builder's grouping/overrides/logging, config errors
naming the key, bit-exact state_dict resume for each optimizer, and the
`nanochat train --set optim....` path end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from nanochat.config import ConfigError, RunConfig, apply_overrides
from nanochat.model.gpt import GPT
from nanochat.ops import ternary
from nanochat.optim import HybridOptimizer, build_optimizer, parameter_kinds, state_bytes
from nanochat.optim.muon import NS_COEFFS, newton_schulz, shape_scale
from torch import nn


def quiet(*_a, **_k):
    pass


def ns_ref(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz exactly as algorithms.md writes it, in float64."""
    a, b, c = NS_COEFFS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 40, 24)])
def test_newton_schulz_matches_float64(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    if len(shape) == 2:
        ref = ns_ref(g)
    else:  # a batch of expert matrices: each on its own
        ref = torch.stack([ns_ref(gi) for gi in g])
    assert out.dtype == torch.float32 and out.shape == g.shape
    assert torch.allclose(out.double(), ref, atol=2e-5), (out.double() - ref).abs().max()
    # What NS5 is for: singular values pushed towards 1 (into about [0.7, 1.2]; the few
    # tiny ones of a random square matrix need more than 5 steps)
    sv = torch.linalg.svdvals(out.double().reshape(-1, *shape[-2:]))
    assert sv.max() < 1.3 and (sv > 0.6).double().mean() > 0.9


def test_ns_dtype_auto_follows_the_machine_and_the_pinned_isa():
    """bf16 Newton-Schulz only where bf16 GEMMs are fast: bf16 hardware AND an AVX-512
    kernel ISA; NANOCHAT_ISA=avx2 (set_isa) behaves as an AVX2-only CPU."""
    from nanochat._core import core
    from nanochat.ops import bitlinear, ternary
    from nanochat.optim.muon import ns_dtype

    feats = core().info()["features"]
    hw = bool(feats["avx512_bf16"] or feats["amx_bf16"])
    cpu = torch.device("cpu")
    for isa in ternary.supported_isas():
        ternary.set_isa(isa)
        fast = hw and isa.startswith("avx512")
        assert bitlinear.cpu_has_fast_bf16() is fast, isa
        assert ns_dtype("auto", cpu) == (torch.bfloat16 if fast else torch.float32), isa
        assert ns_dtype("float32", cpu) == torch.float32
    if "avx2" in ternary.supported_isas():
        ternary.set_isa("avx2")
        assert not bitlinear.cpu_has_fast_bf16()


def test_shape_scales():
    assert shape_scale(2048, 512, "original") == 2.0
    assert shape_scale(512, 2048, "original") == 1.0
    assert shape_scale(768, 2816, "moonlight") == pytest.approx(0.2 * 2816 ** 0.5)
    with pytest.raises(ValueError, match="scale"):
        shape_scale(4, 4, "bogus")


def _group(algo, params, **kw):
    g = {"params": params, "name": "t", "algo": algo, "lr": 0.01, "base_lr": 0.01,
         "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "state": "fp32",
         "block": 2048, "min_8bit": 4096, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
         "muon_scale": "moonlight", "galore": None}
    g.update(kw)
    return g


def _grads(shape, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("scale", ["moonlight", "original"])
def test_muon_step_matches_float64(scale):
    p0 = torch.randn(48, 80, generator=torch.Generator().manual_seed(3))
    p = nn.Parameter(p0.clone())
    opt = HybridOptimizer([_group("muon", [p], muon_scale=scale)])
    gs = _grads(p.shape, 3)
    pr, m = p0.double(), torch.zeros_like(p0, dtype=torch.float64)
    lr, wd, beta = 0.01, 0.1, 0.95
    for g in gs:
        p.grad = g.clone()
        opt.step()
        m = beta * m + (1 - beta) * g.double()
        u = g.double() + beta * (m - g.double())
        pr = pr * (1 - lr * wd) - lr * shape_scale(48, 80, scale) * ns_ref(u)
    assert torch.allclose(p.detach().double(), pr, atol=1e-5), \
        (p.detach().double() - pr).abs().max()


def test_lion_step_matches_float64():
    p0 = torch.randn(300, generator=torch.Generator().manual_seed(4))
    p = nn.Parameter(p0.clone())
    opt = HybridOptimizer([_group("lion", [p], betas=(0.9, 0.99), lr=1e-3)])
    pr, m = p0.double(), torch.zeros(300, dtype=torch.float64)
    for g in _grads(p.shape, 4):
        p.grad = g.clone()
        opt.step()
        c = 0.9 * m + 0.1 * g.double()
        pr = pr * (1 - 1e-3 * 0.1) - 1e-3 * torch.sign(c)
        m = 0.99 * m + 0.01 * g.double()
    assert torch.allclose(p.detach().double(), pr, atol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg"].double(), m, atol=1e-6)


def test_adamw_step_matches_float64():
    p0 = torch.randn(40, 30, generator=torch.Generator().manual_seed(5))
    p = nn.Parameter(p0.clone())
    # 8-bit requested but the tensor is below min_8bit: fp32 state (bitsandbytes' rule)
    opt = HybridOptimizer([_group("adamw", [p], state="8bit", min_8bit=10**6)])
    pr = p0.double()
    m = torch.zeros_like(pr)
    v = torch.zeros_like(pr)
    for t, g in enumerate(_grads(p.shape, 4), start=1):
        p.grad = g.clone()
        opt.step()
        gd = g.double()
        m = 0.9 * m + 0.1 * gd
        v = 0.95 * v + 0.05 * gd * gd
        pr = (pr * (1 - 0.01 * 0.1)
              - 0.01 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.95 ** t)).sqrt() + 1e-8))
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.float32
    assert torch.allclose(st["exp_avg"].double(), m, atol=1e-6)
    assert torch.allclose(st["exp_avg_sq"].double(), v, atol=1e-6)
    assert torch.allclose(p.detach().double(), pr, atol=1e-5)


def tiny_cfg(*sets) -> RunConfig:
    return apply_overrides(RunConfig(), ["model.vocab_size=256", "model.d_model=128",
                                         "model.n_layers=2", "model.n_heads=2",
                                         "model.n_kv_heads=1", "model.ffn_hidden=256",
                                         "model.max_seq_len=32", "train.seq_len=32", *sets])


def test_default_config_is_todays_adamw():
    cfg = tiny_cfg()
    model = GPT(cfg.model, bitlinear="torch")
    lines = []
    opt = build_optimizer(model, cfg, log=lines.append)
    assert type(opt) is torch.optim.AdamW
    assert [g["name"] for g in opt.param_groups] == ["matrix", "embedding", "scalar"]
    # every parameter's name appears in its group's start-up line
    for name, _ in model.named_parameters():
        assert sum(name + "," in line + "," for line in lines) == 1, name


def test_hybrid_grouping_overrides_and_log():
    cfg = tiny_cfg("optim.name=muon", "optim.rest=lion", "optim.state=8bit",
                   'optim.overrides=["blocks.0.attn_q.weight=adamw", "*ffn_norm*=adamw"]')
    model = GPT(cfg.model, bitlinear="torch")
    lines = []
    opt = build_optimizer(model, cfg, log=lines.append)
    assert isinstance(opt, HybridOptimizer)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"matrix", "matrix/adamw", "embedding", "scalar", "scalar/adamw"}
    assert by_name["matrix"]["algo"] == "muon" and by_name["embedding"]["algo"] == "lion"
    assert by_name["matrix/adamw"]["params"] == [model.blocks[0].attn_q.weight]
    assert all(p.ndim == 1 for p in by_name["scalar/adamw"]["params"])
    # Lion: LR scaled down, weight decay up (lr * wd kept)
    assert by_name["embedding"]["lr"] == pytest.approx(cfg.optim.embed_lr * cfg.optim.lion.lr_scale)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert len(lines) == 5 and any("Muon" in ln and "8bit" in ln for ln in lines)
    # Muon on a vector is refused, naming the rule
    bad = tiny_cfg('optim.overrides=["*attn_norm*=muon"]')
    with pytest.raises(ValueError, match=r"optim.overrides\[0\].*Muon needs a matrix"):
        build_optimizer(GPT(bad.model, bitlinear="torch"), bad, log=quiet)


def test_non_bitlinear_parameters_go_to_the_rest():
    """mHC/router-like parameters (not BitLinear weights) land in the rest optimizer;
    modules listing expert_matrices() (3-D MoE experts) land with the matrices."""
    cfg = tiny_cfg("optim.name=muon")
    model = GPT(cfg.model, bitlinear="torch")

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Parameter(torch.randn(4, 128))
            self.w = nn.Parameter(torch.randn(4, 64, 128))
            self.mix = nn.Parameter(torch.zeros(3))

        def expert_matrices(self):
            return [self.w]

    model.extra = Experts()
    kinds = {k: [n for n, _ in v] for k, v in parameter_kinds(model).items()}
    assert "extra.w" in kinds["matrix"]
    assert "extra.router" in kinds["scalar"] and "extra.mix" in kinds["scalar"]
    opt = build_optimizer(model, cfg, log=quiet)
    x = torch.randint(0, 256, (2, 17))
    _, loss = model(x[:, :-1], x[:, 1:])
    (loss + model.extra.w.square().sum() + model.extra.router.sum()).backward()
    before = model.extra.w.detach().clone()
    opt.step()
    assert opt.state[model.extra.w]["momentum_buffer"].shape == (4, 64, 128)
    assert not torch.equal(before, model.extra.w.detach())


@pytest.mark.parametrize("sets", [
    ["optim.state=8bit"],
    ["optim.name=muon", "optim.state=8bit", "optim.min_8bit_size=1024"],
    ["optim.name=muon"],
    ["optim.name=lion", "optim.rest=lion", "optim.state=8bit"],
    ["optim.galore.enabled=true", "optim.galore.update_every=2", "optim.state=8bit"],
], ids=["adamw8", "muon8", "muon32", "lion8", "galore8"])
def test_state_dict_resume_is_bit_exact(sets):
    cfg = tiny_cfg(*sets, "optim.block_size=256")
    x = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))

    def run(model, opt, steps):
        for _ in range(steps):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    a = GPT(cfg.model, bitlinear="torch")
    opt_a = build_optimizer(a, cfg, log=quiet)
    run(a, opt_a, 3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, buf)
    run(a, opt_a, 3)

    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    b = GPT(cfg.model, bitlinear="torch")
    opt_b = build_optimizer(b, cfg, log=quiet)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optim"])
    dtypes_a = {k: {n: v.dtype for n, v in s.items()} for k, s in saved["optim"]["state"].items()}
    assert any(torch.int8 in d.values() for d in dtypes_a.values()) == ("8bit" in " ".join(sets))
    run(b, opt_b, 3)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for k in sa:
        for n in sa[k]:
            assert sa[k][n].dtype == sb[k][n].dtype and torch.equal(sa[k][n], sb[k][n]), (k, n)
    assert state_bytes(opt_a) == state_bytes(opt_b) > 0


@pytest.mark.parametrize("bad,key", [
    ("optim.name=sgd", "optim.name"), ("optim.rest=muon", "optim.rest"),
    ("optim.state=4bit", "optim.state"), ("optim.block_size=100", "optim.block_size"),
    ("optim.min_8bit_size=-1", "optim.min_8bit_size"),
    ("optim.muon.momentum=1.0", "optim.muon.momentum"), ("optim.muon.scale=x", "optim.muon.scale"),
    ("optim.muon.ns_steps=0", "optim.muon.ns_steps"), ("optim.lion.beta2=1", "optim.lion.beta2"),
    ("optim.muon.ns_dtype=fp8", "optim.muon.ns_dtype"),
    ("optim.lion.lr_scale=0", "optim.lion.lr_scale"), ("optim.galore.rank=-1", "optim.galore.rank"),
    ("optim.galore.update_every=0", "optim.galore.update_every"),
    ('optim.overrides=["*=sgd"]', "optim.overrides[0]"), ("optim.muon.bogus=1", "bogus"),
])
def test_bad_config_values_name_the_key(bad, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), [bad])
    assert key in str(e.value)
    with pytest.raises(ConfigError, match="optim.galore.enabled"):
        apply_overrides(RunConfig(), ["optim.galore.enabled=true", "optim.name=muon"])


def test_old_optim_tables_still_load():
    from nanochat.config import from_dict
    old = {"optim": {"name": "adamw", "lr": 1e-3, "embed_lr": 1e-3, "scalar_lr": 1e-3,
                     "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                     "grad_clip": 1.0}}
    cfg = from_dict(old)
    assert cfg.optim.state == "fp32" and cfg.optim.rest == "adamw" and not cfg.optim.galore.enabled


STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_cli_train_with_muon_8bit(tmp_path):
    """`nanochat train --set optim....` end to end: groups logged, state bytes logged."""
    from nanochat.data import corpus

    src = tmp_path / "src"
    src.mkdir()
    for f in ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py"):
        (src / f).write_text((STDLIB / f).read_text())
    data = corpus.prepare([str(src)], tmp_path / "data", vocab_size=384, val_fraction=0.2,
                          progress=False).out_dir
    run = tmp_path / "run"
    sets = ["model.vocab_size=384", "model.d_model=128", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=1", "model.ffn_hidden=256", "model.max_seq_len=32",
            "train.batch_size=2", "train.seq_len=32", "train.eval_tokens=256",
            "train.log_every=1", "train.sample_tokens=4", "schedule.warmup_steps=1",
            "optim.name=muon", "optim.rest=lion", "optim.state=8bit", "optim.min_8bit_size=1024",
            "optim.block_size=256"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    r = subprocess.run([sys.executable, "-m", "nanochat", "train", "--data", str(data), "--out",
                        str(run), "--steps", "3", "--time-budget", "0", "--no-progress",
                        *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "Muon" in out and "Lion" in out and "state 8bit" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    sb = [row["optim_state_bytes"] for row in rows if "optim_state_bytes" in row]
    assert len(sb) == 3 and sb[0] > 0
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    bad = subprocess.run([sys.executable, "-m", "nanochat", "train", "--data", str(data),
                          "--out", str(tmp_path / "bad"), "--set", "optim.state=16bit"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "optim.state" in bad.stderr


def test_bench_optim_json_rows(run_nanochat):
    r = run_nanochat(["bench", "optim", "--models", "tiny", "--configs",
                      "adamw_fp32,adamw_8bit,lion_8bit", "--steps", "1", "--json"], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    opt = {row["optimizer"]: row for row in rows if "optimizer" in row}
    assert set(opt) == {"adamw_fp32", "adamw_8bit", "lion_8bit"}
    for row in opt.values():
        assert {"optimizer", "model", "state_bytes", "ratio_vs_adamw", "step_seconds"} <= set(row)
    assert opt["adamw_fp32"]["ratio_vs_adamw"] == 1.0
    assert 8.0 <= opt["adamw_fp32"]["bytes_per_param"] < 8.01  # two fp32 moments + step counters
    assert 0.24 < opt["adamw_8bit"]["ratio_vs_adamw"] < 0.27  # 2 + 8/2048 B/param
    assert opt["lion_8bit"]["ratio_vs_adamw"] < 0.14
    assert all("peer" in row and row["model"] == "tiny" for row in rows if "optimizer" not in row)


@pytest.mark.skipif("avx2" not in ternary.supported_isas(), reason="no AVX2")
def test_bench_optim_times_muon_per_ns_dtype_under_a_pinned_isa(run_nanochat):
    """--ns-dtype: one muon row per setting, each naming what it ran in; pinned to AVX2,
    auto is float32 (bf16 is emulated there) and the header names the ISA."""
    args = ["bench", "optim", "--models", "tiny", "--configs", "muon_fp32", "--steps", "1",
            "--ns-dtype", "auto,float32,bfloat16"]
    r = run_nanochat([*args, "--json"], timeout=300, NANOCHAT_ISA="avx2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    muon = {row["ns_dtype"]: row for row in rows if row.get("optimizer") == "muon_fp32"}
    assert {k: v["ns_dtype_resolved"] for k, v in muon.items()} == {
        "auto": "float32", "float32": "float32", "bfloat16": "bfloat16"}
    assert all(v["isa"] == "avx2" and v["step_seconds"] > 0 for v in muon.values())
    text = run_nanochat(args, timeout=300, NANOCHAT_ISA="avx2")
    assert text.returncode == 0 and "ISA avx2" in text.stdout.splitlines()[0]
    assert "auto->float32" in text.stdout


def test_groups_agree_with_the_model_on_moe_and_mhc():
    """The real MoE (3-D expert tensors) and mHC parameters: matrices -> Muon (each expert's
    matrix orthogonalized), routers / mHC coefficients / sub-norms -> the rest; the same
    kinds gpt.parameter_kinds() reports."""
    cfg = tiny_cfg("model.moe.experts=4", "model.moe.top_k=2", "model.moe.shared_expert=true",
                   "model.mhc.streams=2", "optim.name=muon", "optim.state=8bit",
                   "optim.min_8bit_size=1024", "optim.block_size=256")
    torch.manual_seed(0)
    model = GPT(cfg.model, bitlinear="torch")
    ours = {k: [n for n, _ in v] for k, v in parameter_kinds(model).items()}
    theirs = {k: [n for n, _ in v] for k, v in model.parameter_kinds().items()}
    assert ours == theirs
    assert any(p.ndim == 3 for n, p in model.named_parameters() if n in ours["matrix"])
    opt = build_optimizer(model, cfg, log=quiet)
    x = torch.randint(0, 256, (2, 17))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    algo = {id(p): g["algo"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert algo[id(p)] == ("muon" if n in ours["matrix"] else "adamw"), n
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(before[n], p.detach()), n
