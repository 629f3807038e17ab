"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolated momentum, one state tensor (half of AdamW's).

    c = b1 m + (1 - b1) g;  p *= 1 - lr wd;  p -= lr sign(c);  m = b2 m + (1 - b2) g

Defaults b1 = 0.9, b2 = 0.99. The update has unit magnitude per element, so Lion wants a
3-10x smaller LR and a 3-10x larger weight decay than AdamW: the builder applies
`optim.lion.lr_scale` to the LR and divides the weight decay by it (lr * wd unchanged).
The 8-bit version is the fused C++ op nanochat::lion8_step (nanochat.optim.state8bit).
"""

from __future__ import annotations

import torch


def lion_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float, beta1: float,
              beta2: float, weight_decay: float) -> None:
    """One fp32 Lion step, in place on p and m."""
    c = m.mul(beta1).add_(g, alpha=1.0 - beta1)
    p.mul_(1.0 - lr * weight_decay)
    p.add_(torch.sign(c), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1.0 - beta2)
