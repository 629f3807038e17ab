"""Collider token filtering (nanochat/train/collider.py): the selection rule, exactly-zero
activation gradients of dropped tokens in every layer, the gathered backward GEMMs equal to
the masked dense ones, an unchanged forward, sparsity 0 == unfiltered, and the trainer/CLI."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from nanochat.config import ConfigError, ModelConfig, RunConfig, apply_overrides, from_dict
from nanochat.data import corpus
from nanochat.model.bitlinear import BitLinear
from nanochat.model.gpt import GPT
from nanochat.ops import rows as row_subset
from nanochat.train.collider import Collider, select

CFG = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_hidden=512, max_seq_len=64)
KERNELS = ["torch", "cpp"]


def batch(seed=0, B=2, T=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:].clone()


def model(kernel, backward="float32"):
    torch.manual_seed(0)
    m = GPT(copy.deepcopy(CFG), bitlinear=kernel)
    m.set_bitlinear_backward(backward)
    return m


# ---- selection ---------------------------------------------------------------------------


def test_select_follows_the_definition():
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0])  # u = s / 10
    valid = torch.ones(10, dtype=torch.bool)
    # threshold 1: exactly floor(0.35 * 10) = 3 lowest dropped
    assert select(s, valid, 0.35, 1.0).tolist() == [False] * 3 + [True] * 7
    # threshold 0.25: only u < 0.25 (s = 0, 1, 2) may go, and sparsity caps it at 3
    assert select(s, valid, 0.5, 0.25).tolist() == [False] * 3 + [True] * 7
    assert select(s, valid, 0.2, 0.25).tolist() == [False] * 2 + [True] * 8
    assert select(s, valid, 0.35, 0.0).all()  # threshold 0 drops nothing
    assert select(s, valid, 0.0, 1.0).all()  # sparsity 0 drops nothing
    # ignored tokens are never kept and do not count toward n; order does not matter
    perm = torch.randperm(10)
    keep = select(s[perm], valid[perm], 0.35, 1.0)
    assert keep.tolist() == (s[perm] >= 3).tolist()
    v = valid.clone()
    v[9] = False  # the max is ignored: u is over valid tokens (max 8), n = 9, drop 3
    assert select(s, v, 0.35, 0.3).tolist() == [False] * 3 + [True] * 6 + [False]
    # equal scores: u = 0 everywhere, ties go to the lower index
    assert select(torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool), 0.3, 0.3).tolist() == \
        [[False, False, False, True, True], [True] * 5]


def test_config_table():
    cfg = apply_overrides(RunConfig(), ["train.collider.enabled=true",
                                        "train.collider.sparsity=0.5"])
    assert cfg.train.collider.enabled and cfg.train.collider.sparsity == 0.5
    assert not RunConfig().train.collider.enabled  # off by default
    old = RunConfig().to_dict()
    del old["train"]["collider"]  # a checkpoint from before the table
    assert from_dict(old).train.collider == RunConfig().train.collider
    both = apply_overrides(RunConfig(), ["train.collider.enabled=true", "model.mtp.heads=2"])
    assert both.train.collider.enabled and both.model.mtp.heads == 2  # they compose
    for bad, key in (("sparsity=1.0", "train.collider.sparsity"),
                     ("threshold=-0.1", "train.collider.threshold"), ("foo=1", "foo")):
        with pytest.raises(ConfigError, match=key):
            apply_overrides(RunConfig(), [f"train.collider.{bad}"])


# ---- the backward --------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropped_rows_have_zero_activation_gradient_in_every_layer(kernel):
    m = model(kernel, backward="auto")
    x, y = batch()
    with torch.no_grad():
        _, tok = m(x, y, loss_reduction="none")
    keep = select(tok, y != -1, 0.35, 1.0).reshape(-1)
    grads = {}

    def capture(name):
        def hook(mod, args, out=None):
            t = args[0] if out is None else out
            t.register_hook(lambda g: grads.__setitem__(name, g.reshape(-1, g.shape[-1])))
        return hook

    n_linear = 0
    for name, mod in m.named_modules():
        if isinstance(mod, BitLinear):  # every BitLinear's input gradient
            assert mod.uses_cpp(torch.empty(1, mod.in_features)) == (kernel == "cpp")
            mod.register_forward_pre_hook(capture(name))
            n_linear += 1
        elif name.startswith("blocks.") and name.count(".") == 1 or name == "token_embd":
            mod.register_forward_hook(capture(name))  # the residual stream after each block
    m.output_norm.register_forward_hook(capture("head_input"))
    c = Collider(0.35, 1.0)
    mean, kept = c.forward_backward(m, x, y)
    assert kept == pytest.approx(float(keep.float().mean())) and kept < 0.7
    assert mean == pytest.approx(float(tok.mean()), rel=1e-6)
    assert len(grads) == n_linear + CFG.n_layers + 2 == 7 * CFG.n_layers + CFG.n_layers + 2
    for name, g in grads.items():
        assert torch.count_nonzero(g[~keep]) == 0, name
        assert torch.count_nonzero(g[keep].abs().sum(1)) == int(keep.sum()), name
    assert row_subset._STATE.shape is None and row_subset._STATE.keep is None  # disarmed


def test_mtp_heads_drop_the_same_rows_and_nothing_dropped_equals_unfiltered():
    """With MTP heads every head's loss is masked by the same kept rows: each head's
    transformer block sees exactly-zero gradient on dropped rows, and when nothing is
    dropped (threshold 0) the step's loss and gradients equal the unfiltered MTP step's."""
    cfg = copy.deepcopy(CFG)
    cfg.mtp.heads = 3
    x, y = batch(3)
    torch.manual_seed(0)
    m = GPT(copy.deepcopy(cfg), bitlinear="torch")
    with torch.no_grad():
        losses, tgt, weights = m.head_token_losses(x, y)
    keep = select(losses[0], y != -1, 0.35, 1.0).reshape(-1)
    grads = {}
    def capture(j):
        def hook(mod, args, out):  # out = (hidden for the next head, normed hidden)
            out[0].register_hook(lambda g: grads.__setitem__(j, g.reshape(-1, g.shape[-1])))
        return hook

    for j, head in enumerate(m.mtp):
        head.register_forward_hook(capture(j))
    mean, kept = Collider(0.35, 1.0).forward_backward(m, x, y)
    assert len(grads) == 2 and kept < 0.7
    for g in grads.values():
        assert torch.count_nonzero(g[~keep]) == 0
    _, total = m(x, y)  # the unfiltered MTP loss: what the Collider step logs
    assert mean == pytest.approx(float(total.detach()), rel=1e-5)

    torch.manual_seed(0)
    a, b = GPT(copy.deepcopy(cfg), bitlinear="torch"), GPT(copy.deepcopy(cfg), bitlinear="torch")
    b.load_state_dict(a.state_dict())
    _, loss = a(x, y)
    loss.backward()
    mean, kept = Collider(0.35, 0.0).forward_backward(b, x, y)  # threshold 0: drops nothing
    assert kept == 1.0 and mean == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("sets", [["model.mhc.streams=4"], ["model.moe.experts=4"],
                                  ["model.attention.pattern=SL", "model.attention.window=8"]],
                         ids=["mhc", "moe", "hybrid"])
def test_dropped_rows_stay_zero_with_architecture_options(sets):
    """mHC streams, MoE experts (fed gathered rows: dense, their dropped rows arrive zero)
    and sliding windows: every token-row BitLinear input and the embedding output."""
    size = [f"model.{k}={getattr(CFG, k)}" for k in ("vocab_size", "d_model", "n_layers",
                                                      "n_heads", "n_kv_heads", "ffn_hidden",
                                                      "max_seq_len")]
    cfg = apply_overrides(RunConfig(), size + sets + ["train.seq_len=64"]).model
    torch.manual_seed(0)
    m = GPT(cfg, bitlinear="torch")
    x, y = batch(6)
    m.eval()  # no router-bias update in the scoring pass
    with torch.no_grad():
        _, tok = m(x, y, loss_reduction="none")
    m.train()
    keep = select(tok, y != -1, 0.35, 1.0).reshape(-1)
    grads = {}

    def hook(name):
        def pre(mod, args):
            if args[0].requires_grad and tuple(args[0].shape[:2]) == tuple(x.shape):
                args[0].register_hook(lambda g: grads.__setitem__(name, g))
        return pre

    for name, mod in m.named_modules():
        if isinstance(mod, BitLinear):
            mod.register_forward_pre_hook(hook(name))

    def embd(mod, args, out):
        out.register_hook(lambda g: grads.__setitem__("token_embd", g))

    m.token_embd.register_forward_hook(embd)
    Collider(0.35, 1.0).forward_backward(m, x, y)
    assert "token_embd" in grads and len(grads) >= 1 + 4 * CFG.n_layers
    for name, g in grads.items():
        g = g.reshape(keep.numel(), -1)
        assert torch.count_nonzero(g[~keep]) == 0, name
        assert torch.count_nonzero(g[keep]) > 0, name


def _layer_grads(layer, x, g, keep=None):
    x = x.clone().requires_grad_(True)
    layer.weight.grad = None
    if keep is None:
        y = layer(x)
        y.backward(g)
    else:
        with row_subset.armed(x.shape[:-1]):
            y = layer(x)
            row_subset.set_keep(keep)
            y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("kernel,backward", [("torch", "float32"), ("cpp", "float32"),
                                             ("cpp", "bf16")])
def test_gathered_gemm_equals_masked_gemm(kernel, backward):
    torch.manual_seed(1)
    layer = BitLinear(512, 256, kernel=kernel, backward_precision=backward)
    x = torch.randn(3, 40, 512)
    g = torch.randn(3, 40, 256)
    keep = torch.rand(3, 40) > 0.35
    y_ref, gx_ref, gw_ref = _layer_grads(layer, x, g * keep[..., None])  # masked, dense
    y, gx, gw = _layer_grads(layer, x, g, keep)  # unmasked grad_y, gathered rows
    assert torch.equal(y, y_ref)  # forward unchanged
    assert torch.count_nonzero(gx[~keep]) == 0
    # per-row products are the same GEMM rows; grad_w sums fewer rows (no zero rows): the
    # only difference is the blocking order of the float sums (bf16: its output rounding)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if backward == "float32" else dict(rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(gw, gw_ref, **tol)
    # all rows kept: the gathered path equals the dense one
    _, gx_all, gw_all = _layer_grads(layer, x, g, torch.ones(3, 40, dtype=torch.bool))
    _, gx_d, gw_d = _layer_grads(layer, x, g)
    torch.testing.assert_close(gx_all, gx_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_all, gw_d, **tol)


def test_gathered_head_equals_masked_head():
    torch.manual_seed(2)
    w = torch.randn(300, 64, requires_grad=True)
    h = torch.randn(2, 16, 64, requires_grad=True)
    g = torch.randn(2, 16, 300)
    keep = torch.rand(2, 16) > 0.4
    torch.nn.functional.linear(h, w).backward(g * keep[..., None])
    gh_ref, gw_ref = h.grad, w.grad
    h.grad = w.grad = None
    with row_subset.armed((2, 16)):
        out = row_subset.linear(h, w)
        row_subset.set_keep(keep)
        out.backward(g)
    assert torch.count_nonzero(h.grad[~keep]) == 0
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("armed", [False, True])
def test_token_losses_equal_cross_entropy_and_its_masked_gradient(armed):
    """row_subset.token_losses: F.cross_entropy(reduction="none", ignore_index=-1) of the
    head; its backward (softmax - onehot formed on the kept rows only) equals autograd's
    through the dense form with the dropped rows' incoming gradient zeroed."""
    torch.manual_seed(5)
    B, T, d, V = 2, 16, 32, 50
    w = torch.randn(V, d, requires_grad=True)
    h = torch.randn(B * T, d, requires_grad=True)
    y = torch.randint(0, V, (B * T,))
    y[3] = y[20] = -1  # ignored targets: loss 0, no gradient
    g = torch.rand(B * T)
    keep = torch.rand(B, T) > 0.4
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, ignore_index=-1, reduction="none")
    mask = keep.reshape(-1) if armed else torch.ones(B * T, dtype=torch.bool)
    ref.backward(g * mask)
    gh_ref, gw_ref = h.grad, w.grad
    h.grad = w.grad = None
    with row_subset.armed((B, T)) if armed else contextlib.nullcontext():
        out = row_subset.token_losses(h, w, y)
        if armed:
            row_subset.set_keep(keep)
        out.backward(g)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    assert out[3] == out[20] == 0
    if armed:
        assert torch.count_nonzero(h.grad[~mask]) == 0
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw_ref, rtol=1e-5, atol=1e-6)


def test_gathered_linear_under_autocast_runs_the_backward_in_its_dtype():
    torch.manual_seed(3)
    w = torch.randn(96, 64, requires_grad=True)
    h = torch.randn(2, 8, 64, requires_grad=True)
    keep = torch.rand(2, 8) > 0.4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(h, w)
        with row_subset.armed((2, 8)):
            out = row_subset.linear(h, w)
            assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
            row_subset.set_keep(keep)
            out.float().sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert torch.count_nonzero(h.grad[~keep]) == 0
    g = keep[..., None].expand(2, 8, 96).float()
    torch.testing.assert_close(h.grad, g @ w.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, g.reshape(-1, 96).t() @ h.detach().reshape(-1, 64),
                               rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_is_unchanged_by_filtering(kernel):
    m = model(kernel)
    x, y = batch(3)
    with torch.no_grad():
        logits_ref, tok_ref = m(x, y, loss_reduction="none")
    with row_subset.armed(x.shape):
        logits, tok = m(x, y, loss_reduction="none")
        row_subset.set_keep(select(tok, y != -1, 0.35, 1.0))
        logits2, tok2 = m(x, y, loss_reduction="none")  # a mask set changes no forward
    for a in (logits, logits2):
        assert torch.equal(a.detach(), logits_ref)
    assert torch.equal(tok.detach(), tok_ref) and torch.equal(tok2.detach(), tok_ref)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sparsity_zero_equals_unfiltered_exactly(kernel):
    x, y = batch(4)
    base = model(kernel)
    _, loss = base(x, y)
    (loss / 2).backward()
    m = model(kernel)
    mean, kept = Collider(0.0, 0.3).forward_backward(m, x, y, accum=2)
    assert kept == 1.0 and mean == float(loss.detach())
    for (name, a), b in zip(base.named_parameters(), m.parameters()):
        assert torch.equal(a.grad, b.grad), name
    # armed with nothing to drop (threshold 0): the gathered code path, dense, same grads
    m = model(kernel)
    Collider(0.35, 0.0).forward_backward(m, x, y, accum=2)
    for (name, a), b in zip(base.named_parameters(), m.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_filtered_step_matches_masked_loss_except_kv_context():
    """With every BitLinear on the torch path, the Collider gradient of the layers that see
    no attention mixing (the MLP and the head) equals the gradient of the masked loss."""
    m = model("torch")
    x, y = batch(5)
    ref = model("torch")
    _, tok = ref(x, y, loss_reduction="none")
    keep = select(tok.detach(), y != -1, 0.35, 1.0)
    ((tok * keep).sum() / keep.sum()).backward()
    Collider(0.35, 1.0).forward_backward(m, x, y)
    last = f"blocks.{CFG.n_layers - 1}."
    a, b = dict(ref.named_parameters()), dict(m.named_parameters())
    for name in ("output_norm.weight", last + "ffn_down.weight", last + "ffn_gate.weight",
                 last + "ffn_norm.weight", last + "attn_output.weight", last + "attn_q.weight"):
        torch.testing.assert_close(b[name].grad, a[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    # attn_k / attn_v lose the gradient that kept queries send to dropped keys/values
    assert not torch.allclose(b[last + "attn_k.weight"].grad, a[last + "attn_k.weight"].grad)


def test_armed_rejects_mismatched_masks_and_nesting():
    with row_subset.armed((2, 8)):
        with pytest.raises(ValueError, match="armed micro-batch"):
            row_subset.set_keep(torch.ones(2, 9, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="already armed"):
            with row_subset.armed((2, 8)):
                pass
        assert row_subset.token_rows(torch.empty(2, 8, 5))
        assert not row_subset.token_rows(torch.empty(16, 5))  # other rows: dense
    assert not row_subset.token_rows(torch.empty(2, 8, 5))


# ---- trainer and CLI -------------------------------------------------------------------

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "heapq.py"):
        (src / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    out = tmp_path_factory.mktemp("data")
    return Path(corpus.prepare([str(src)], out, vocab_size=512, val_fraction=0.2,
                               progress=False).out_dir)


SMALL = ["model.vocab_size=512", "model.d_model=256", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_hidden=512", "model.max_seq_len=64",
         "train.batch_size=4", "train.seq_len=64", "train.eval_tokens=512", "train.log_every=1",
         "train.eval_every=100", "train.checkpoint_every=100", "schedule.warmup_steps=1",
         "train.sample_tokens=16"]


def nanochat_train(data_dir, out, *sets, steps=3):
    argv = [sys.executable, "-m", "nanochat", "train", "--config", "tiny", "--data",
            str(data_dir), "--out", str(out), "--steps", str(steps), "--no-progress"]
    for s in (*SMALL, *sets):
        argv += ["--set", s]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, [json.loads(line) for line in (out / "metrics.jsonl").open()]


def test_train_cli_with_collider(data_dir, tmp_path):
    r, rows = nanochat_train(data_dir, tmp_path / "a", "train.collider.enabled=true",
                             "train.collider.sparsity=0.35", "train.collider.threshold=1.0")
    assert "collider: sparsity 0.35, threshold 1" in r.stdout
    kept = [x["collider_kept_fraction"] for x in rows if "loss" in x]
    assert len(kept) == 3 and all(k == 1 - 89 / 256 for k in kept)  # floor(0.35 * 256) dropped
    # excess-loss scores against the first run as the frozen reference
    r, rows = nanochat_train(data_dir, tmp_path / "b", "train.collider.enabled=true",
                             f"train.collider.reference={tmp_path / 'a'}", steps=2)
    assert "excess loss vs" in r.stdout
    assert all(0.65 <= x["collider_kept_fraction"] <= 1 for x in rows if "loss" in x)
    assert any("val_loss" in x for x in rows)



def test_bench_collider_rows(capsys):
    from nanochat.cli import main

    assert main(["bench", "collider", "--configs", "tiny", "--batch", "1", "--seq", "64",
                 "--rounds", "1", "--train-steps", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == ["unfiltered", "collider"]
    assert rows[1]["kept_fraction"] == 1 - 22 / 64  # floor(0.35 * 64) dropped
    for r in rows:
        assert r["backward_s"] > 0 and r["step_s"] >= r["forward_s"] + r["backward_s"]
    assert rows[0]["backward_ratio"] == 1.0
    assert rows[1]["backward_ratio"] == rows[1]["backward_s"] / rows[0]["backward_s"]
    assert main(["bench", "collider", "--sparsity", "1.5"]) == 2


@pytest.mark.slow
def test_collider_run_resumes_bit_exactly(data_dir, tmp_path):
    from nanochat.train.loop import train

    cfg = apply_overrides(RunConfig(), [*SMALL, "train.max_steps=4", "train.grad_accum=2",
                                        "train.collider.enabled=true"])
    quiet = lambda *a, **k: None  # noqa: E731
    straight = train(cfg, data_dir, tmp_path / "a", progress_bar=False, log=quiet)
    first = train(cfg, data_dir, tmp_path / "b", progress_bar=False, stop_at_step=2, log=quiet)
    second = train(cfg, data_dir, tmp_path / "b", resume=True, progress_bar=False, log=quiet)
    assert first.losses + second.losses == straight.losses
