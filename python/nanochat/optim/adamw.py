"""AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW computes it, for the groups of the
hybrid optimizer: the fp32 version calls torch's own multi-tensor implementation; the 8-bit
one is the fused C++ op nanochat::adamw8_step (nanochat.optim.state8bit).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p *= 1 - lr wd
    p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

`adam_direction` is the same rule without the parameter: the normalized step GaLore
back-projects.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _torch_adam


def adamw_fp32(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's update (foreach where torch picks it); increments `steps`."""
    _torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None, capturable=False,
                differentiable=False, fused=None, grad_scale=None, found_inf=None,
                has_complex=False, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)


def adam_direction(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, beta1: float,
                   beta2: float, eps: float) -> torch.Tensor:
    """Updates m, v in place; returns m_hat / (sqrt(v_hat) + eps) in torch's arithmetic."""
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    return (m / bc1) / (v.sqrt() / bc2 ** 0.5 + eps)
