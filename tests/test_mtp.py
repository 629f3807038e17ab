"""Multi-token prediction (nanochat/model/mtp.py, GPT with [model.mtp]): target shifts, the loss
against a naive per-head composition (fused and unfused), causality of the sequential
heads, MTP off leaving the model unchanged, checkpoints, a CLI training run, and export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nanochat import checkpoint
from nanochat.config import apply_overrides, load_config
from nanochat.model import mtp
from nanochat.model.gpt import GPT

SMALL = ["model.vocab_size=512", "model.d_model=256", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_hidden=256", "model.max_seq_len=64",
         "train.seq_len=64"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small shapes: one thread (two-thread barriers on tiny ops stall on a loaded machine)."""


def _cfg(heads=4, *extra):
    return apply_overrides(load_config("tiny"), SMALL + [f"model.mtp.heads={heads}", *extra]).model


def _batch(vocab=512, B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    y = x[:, 1:].clone()
    y[0, 3] = -1
    return x[:, :-1], y


def test_head_targets_shift_by_exactly_i():
    y = torch.arange(20).reshape(2, 10)
    t = mtp.head_targets(y, 4)
    assert t.shape == (4, 2, 10)
    for i in range(4):
        assert torch.equal(t[i, :, :10 - i], y[:, i:])
        assert (t[i, :, 10 - i:] == -1).all()


def test_head_weights_default_and_configurable():
    assert mtp.head_weights(_cfg(4).mtp) == pytest.approx([1.0, 0.1, 0.05, 0.025])
    c = _cfg(3, "model.mtp.weight=1.0", "model.mtp.loss_weights=[2.0, 1.0, 0.5]").mtp
    assert mtp.head_weights(c) == [2.0, 1.0, 0.5]


@pytest.mark.parametrize("fused", ["on", "off"])
def test_loss_is_the_weighted_sum_of_per_head_cross_entropies(fused):
    torch.manual_seed(0)
    m = GPT(_cfg(4))
    m.set_fused_loss(fused)
    x, y = _batch()
    _, loss = m(x, y)
    # naive: every head's logits, targets shifted by i, F.cross_entropy
    h = m._trunk(x)
    pos = torch.arange(x.shape[1])
    from nanochat.model.block import rope_cos_sin
    cos, sin = rope_cos_sin(pos, m.config.head_dim, m.config.rope_theta)
    emb, prev, hs = m.token_embd(x), h, [h]
    for j, head in enumerate(m.mtp):
        e = torch.cat((emb[:, j + 1:], torch.zeros_like(emb[:, :j + 1])), dim=1)
        prev, normed = head(prev, e, cos, sin)
        hs.append(normed)
    want = 0.0
    for i, (hi, w) in enumerate(zip(hs, [1.0, 0.1, 0.05, 0.025])):
        logits = hi[:, :x.shape[1] - i] @ m.token_embd.weight.t()
        want = want + w * F.cross_entropy(logits.reshape(-1, 512), y[:, i:].reshape(-1),
                                          ignore_index=-1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert m.last_head_losses.shape == (4,)


def test_fused_and_unfused_give_the_same_gradients():
    torch.manual_seed(1)
    a = GPT(_cfg(3))
    b = GPT(_cfg(3))
    b.load_state_dict(a.state_dict())
    a.set_fused_loss("on")
    b.set_fused_loss("off")
    x, y = _batch(seed=1)
    la = a(x, y)[1]
    lb = b(x, y)[1]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert a.mtp[1].eh_proj.weight.grad.abs().sum() > 0  # the last head is trained


def test_head_k_sees_tokens_only_up_to_t_plus_k():
    torch.manual_seed(2)
    m = GPT(_cfg(4)).eval()
    x, _ = _batch(seed=2)
    pos = torch.arange(x.shape[1])
    from nanochat.model.block import rope_cos_sin
    cos, sin = rope_cos_sin(pos, m.config.head_dim, m.config.rope_theta)

    def hidden(idx):
        with torch.no_grad():
            return mtp.head_hidden(m.mtp, m._trunk(idx), m.token_embd(idx), cos, sin)

    base = hidden(x)
    p = 15
    x2 = x.clone()
    x2[:, p] = (x2[:, p] + 1) % 512
    changed = hidden(x2)
    for i in range(4):  # head i (0-based) at t reads tokens <= t + i: t < p - i is unchanged
        assert torch.equal(base[i][:, :p - i], changed[i][:, :p - i]), i
        assert not torch.equal(base[i][:, p - i], changed[i][:, p - i]), i


def test_mtp_off_is_the_plain_model():
    torch.manual_seed(3)
    plain = GPT(_cfg(1))
    assert len(plain.mtp) == 0
    assert not any(k.startswith("mtp") for k in plain.state_dict())
    x, y = _batch(seed=3)
    logits, loss = plain(x, y)  # logits still returned by default
    assert logits.shape == (2, 24, 512)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 512), y.reshape(-1),
                                                     ignore_index=-1))
    on = GPT(_cfg(4))
    assert on.num_params()["total"] > plain.num_params()["total"]


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    m = GPT(_cfg(4))
    cfg = load_config("tiny")
    cfg.model = m.config
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    path = checkpoint.save(tmp_path / "run", 1, {"model": m.state_dict(), "config": cfg.to_dict()},
                           cfg.to_dict(), tok, keep=1)
    state = checkpoint.load(path)
    m2 = GPT.from_config_dict(state["config"]["model"])
    m2.load_state_dict(state["model"])
    assert len(m2.mtp) == 3
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    # a checkpoint from before MTP existed (no model.mtp key) still loads, with MTP off
    old = dict(state["config"]["model"])
    del old["mtp"]
    assert len(GPT.from_config_dict(old).mtp) == 0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import sysconfig

    from nanochat.data import corpus

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path_factory.mktemp("src")
    for f in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"):
        (src / f).write_text((stdlib / f).read_text())
    out = tmp_path_factory.mktemp("data")
    return Path(corpus.prepare([str(src)], out, vocab_size=512, val_fraction=0.2,
                               progress=False).out_dir)


def test_cli_training_with_mtp_heads(run_nanochat, data_dir, tmp_path):
    run = tmp_path / "run"
    sets = SMALL + ["model.mtp.heads=4", "train.batch_size=2", "train.seq_len=64",
                    "train.max_steps=4", "train.eval_every=4", "train.eval_tokens=512",
                    "train.log_every=1", "train.checkpoint_every=4", "train.sample_tokens=4",
                    "schedule.warmup_steps=1"]
    r = run_nanochat(["train", "--data", str(data_dir), "--out", str(run),
                      *[a for s in sets for a in ("--set", s)]], timeout=300,
                     NANOCHAT_NUM_THREADS="1", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    state = checkpoint.load(run)
    assert any(k.startswith("mtp.2.block.") for k in state["model"])
    assert state["config"]["model"]["mtp"]["heads"] == 4


def test_export_with_heads_loads_in_gguf_and_the_engine(tmp_path):
    import gguf
    import numpy as np
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.infer.engine import Engine
    from nanochat.ops.bitlinear import weight_codes

    text = Path(mtp.__file__).read_text()
    tok = Tokenizer.train([text], 512)
    torch.manual_seed(5)
    m = GPT(_cfg(3), bitlinear="torch")
    path = tmp_path / "mtp.gguf"
    export_gguf(m, tok, path)
    r = gguf.GGUFReader(path)
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "nanochat"
    assert int(r.fields["nanochat.nextn_predict_layers"].parts[-1][0]) == 2
    assert int(r.fields["nanochat.block_count"].parts[-1][0]) == 2  # the trunk's
    t = {x.name: x for x in r.tensors}
    for j, head in enumerate(m.mtp):
        b = f"blk.{2 + j}"
        assert t[f"{b}.nextn.enorm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(t[f"{b}.nextn.hnorm.weight"].data),
                                      head.hnorm.weight.detach().numpy())
        for name, p in ((f"{b}.nextn.eh_proj.weight", head.eh_proj.weight),
                        (f"{b}.ffn_down.weight", head.block.ffn_down.weight)):
            x = t[name]
            assert x.tensor_type == gguf.GGMLQuantizationType.TQ2_0
            assert list(x.shape) == [p.shape[1], p.shape[0]]
            codes, s = weight_codes(p)  # exact codes and the fp16 scale
            got = gguf.quants.dequantize(x.data, x.tensor_type).reshape(p.shape)
            np.testing.assert_array_equal(got, codes.numpy() * np.float32(np.float16(s)))
    # The engine loads it (heads checked, not run) and decodes exactly as the same trunk
    # exported without heads.
    plain = GPT(_cfg(1), bitlinear="torch")
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("mtp.")})
    export_gguf(plain, tok, tmp_path / "plain.gguf")
    ids = [tok.bos_id] + tok.encode(text[:100])
    a = Engine(path).eval_all(ids)
    b = Engine(tmp_path / "plain.gguf").eval_all(ids)
    np.testing.assert_array_equal(a, b)


def test_engine_rejects_heads_the_metadata_does_not_declare(tmp_path, monkeypatch):
    from nanochat import export
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.infer.engine import Engine

    tok = Tokenizer.train([Path(mtp.__file__).read_text()], 512)
    torch.manual_seed(6)
    m = GPT(_cfg(2), bitlinear="torch")
    monkeypatch.setattr(export, "architecture", lambda cfg: ("bitnet", []))  # no nextn key
    export.export_gguf(m, tok, tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match="unexpected tensor 'blk.2."):
        Engine(tmp_path / "bad.gguf")


@pytest.mark.parametrize("bad, key", [
    ("model.mtp.heads=0", "model.mtp.heads"),
    ("model.mtp.loss_weights=[1.0]", "model.mtp.loss_weights"),
    ("model.mtp.weight=-1.0", "model.mtp"),
    ("model.mtp.speculate=1", "speculate"),
    ("train.fused_loss=maybe", "train.fused_loss"),
    ("train.fused_loss_precision=fp8", "train.fused_loss_precision"),
])
def test_config_errors_name_the_key(bad, key):
    from nanochat.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(load_config("tiny"), ["model.mtp.heads=2", bad])


def test_set_fused_loss_auto_rule():
    m = GPT(_cfg(1))
    m.set_fused_loss("auto")
    assert not m._fused()  # vocab 512, no MTP: full logits
    assert GPT(_cfg(2)).mtp and (m.set_fused_loss("on") or m._fused())
    big = GPT(_cfg(1, "model.vocab_size=16384"))
    big.set_fused_loss("auto")
    assert big._fused()
    with pytest.raises(ValueError, match="set_fused_loss"):
        m.set_fused_loss("sometimes")
