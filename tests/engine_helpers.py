"""What tests/test_engine.py and tests/test_engine_options.py share: a small random GPT whose
weights torch and the C++ engine represent identically, and the logit comparisons.

"Exact" weights: norm gains away from 1, the embedding rounded to fp16 (what an F16 file
stores), and, with round_scales_to_fp16, each BitLinear's absmean scale rounded to fp16 on
the torch side as TQ2_0 stores it. Then both sides multiply by the same numbers. The torch
reference runs in float64, so the engine's float32 rounding is the only noise: on any machine
(a float32 reference's rounding depends on its BLAS and thread count: on a 16-thread Xeon
it flipped codes from position 53 on). That noise now and then moves one activation across
an int8 rounding boundary (and later positions, through the KV cache): 90% of positions
within EXACT_TOL of the logit range, all within FLIP_TOL.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from nanochat.config import ModelConfig
from nanochat.model.block import RMSNorm
from nanochat.model.gpt import GPT
from nanochat.ops import bitlinear

VOCAB = 512
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\n        self.y = y\n\nprint(add(1, 2), Point(3, 4).x)\n")
SMALL = {"vocab_size": VOCAB, "d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "ffn_hidden": 512, "max_seq_len": 128}
EXACT_TOL = 1e-5  # of the logit range: float summation order
FLIP_TOL = 2e-2   # a position behind an int8 rounding flip


def make_model(seed: int = 0, exact: bool = True, **over) -> GPT:
    """SMALL with `over` applied, random weights with norm gains in [0.5, 1.5]; `exact`:
    an fp16-representable embedding."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **over}), bitlinear="torch")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
        if exact:
            model.token_embd.weight.copy_(model.token_embd.weight.half().float())
    return model


def round_scales_to_fp16(monkeypatch) -> None:
    """BitLinear's (and MoE experts') absmean scale rounded to fp16 on the torch side too."""
    orig = bitlinear.quantize_weight

    def quantize_weight(w):
        codes, s = orig(w)
        return codes, s.half().float()

    monkeypatch.setattr(bitlinear, "quantize_weight", quantize_weight)


def torch_logits(model, ids) -> np.ndarray:
    """The torch reference in float64 (on a copy of the model)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.tensor([ids]))[0].float().numpy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: max |got - ref| over the vocabulary / the logit range."""
    return np.abs(got - ref).max(axis=-1) / np.abs(ref).max()


def check_exact(err: np.ndarray) -> None:
    assert err.max() < FLIP_TOL, err
    assert (err < EXACT_TOL).mean() >= 0.9, err
