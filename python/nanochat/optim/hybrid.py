"""The hybrid optimizer: one torch.optim.Optimizer whose parameter groups each run their own
update rule (AdamW, Muon or Lion) with fp32 or blockwise 8-bit state, optionally GaLore.

Groups carry `algo` ("adamw" | "muon" | "lion"), `state` ("fp32" | "8bit"), `block`,
`min_8bit` (smaller tensors keep fp32 state), the rule's hyper-parameters and `galore` (a
dict or None). The trainer sets `lr` from `base_lr` each step, as for torch's optimizers.

State per parameter (8-bit codes are flat, absmax per block; see state8bit.py):
    adamw fp32: step, exp_avg, exp_avg_sq              8 B/param
    adamw 8bit: step, exp_avg (int8), exp_avg_absmax, exp_avg_sq (uint8), exp_avg_sq_absmax
    muon:       step, momentum_buffer (fp32, or int8 + momentum_buffer_absmax)
    lion:       step, exp_avg (fp32, or int8 + exp_avg_absmax)
    galore:     step, projector, exp_avg and exp_avg_sq at the projected shape
state_dict()/load_state_dict() round-trip every tensor bit for bit (torch would cast the
int8/uint8 codes to the parameter's float dtype on load; load_state_dict casts them back,
which is exact).
"""

from __future__ import annotations

import torch

from nanochat.optim import galore as gl
from nanochat.optim import state8bit as s8
from nanochat.optim.adamw import adam_direction, adamw_fp32
from nanochat.optim.lion import lion_step
from nanochat.optim.muon import muon_update, ns_dtype


class HybridOptimizer(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict]):
        defaults = dict(algo="adamw", state="fp32", block=s8.DEFAULT_BLOCK, min_8bit=4096,
                        lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                        nesterov=True, ns_steps=5, muon_scale="moonlight", ns_dtype="float32",
                        galore=None)
        super().__init__(param_groups, defaults)
        index = 0
        for g in self.param_groups:  # a stable per-parameter index seeds GaLore's sketches
            g["first_index"] = index
            index += len(g["params"])

    @staticmethod
    def _init8(st: dict, like: torch.Tensor, block: int, adam: bool) -> None:
        st["exp_avg"], st["exp_avg_absmax"] = s8.zeros_state(like, block, "linear")
        if adam:
            st["exp_avg_sq"], st["exp_avg_sq_absmax"] = s8.zeros_state(like, block, "minifloat")

    def _eightbit(self, group: dict, numel: int) -> bool:
        return group["state"] == "8bit" and numel >= group["min_8bit"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            algo = group["algo"]
            if algo == "adamw":
                self._adamw(group, params)
            elif algo == "muon":
                for p in params:
                    self._muon(group, p)
            elif algo == "lion":
                for p in params:
                    self._lion(group, p)
            else:
                raise ValueError(f"optimizer group {group.get('name')}: unknown algo {algo!r}")
        return loss

    # ---- AdamW ------------------------------------------------------------------------
    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        fp = ([], [], [], [], [])
        for p in params:
            st = self.state[p]
            gal = group["galore"]
            if gal is not None and p.ndim == 2 and gal_rank(gal, p.shape) < min(p.shape):
                self._galore(group, p, st, gal)
            elif self._eightbit(group, p.numel()):
                if not st:
                    st["step"] = torch.tensor(0.0)
                    self._init8(st, p, group["block"], adam=True)
                st["step"] += 1
                t = float(st["step"])
                s8.adamw8_step(p.view(-1), p.grad.contiguous().view(-1), st["exp_avg"],
                               st["exp_avg_absmax"], st["exp_avg_sq"], st["exp_avg_sq_absmax"],
                               group["block"], lr, beta1, beta2, eps, wd, 1.0 - beta1 ** t,
                               1.0 - beta2 ** t)
            else:
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for lst, x in zip(fp, (p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                    lst.append(x)
        if fp[0]:
            adamw_fp32(*fp, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)

    def _galore(self, group: dict, p: torch.Tensor, st: dict, gal: dict) -> None:
        beta1, beta2 = group["betas"]
        rank = gal_rank(gal, p.shape)
        g = p.grad.float()
        if not st:
            shape = gl.projected_shape(p.shape, rank)
            st["step"] = torch.tensor(0.0)
            ref = torch.empty(shape, device=p.device)
            if self._eightbit(group, ref.numel()):
                self._init8(st, ref, group["block"], adam=True)
            else:
                st["exp_avg"] = torch.zeros(shape, device=p.device)
                st["exp_avg_sq"] = torch.zeros(shape, device=p.device)
        t = int(st["step"])
        if t % gal["update_every"] == 0:  # steps 0, T, 2T, ... (before incrementing)
            index = group["first_index"] + next(i for i, q in enumerate(group["params"]) if q is p)
            st["projector"] = gl.make_projector(g, rank, gal["oversample"], gal["power_iters"],
                                                gl.seed_for(index, t))
        st["step"] += 1
        t += 1
        r = gl.project(g, st["projector"]).contiguous()
        if st["exp_avg"].dtype == torch.int8:
            # The fused kernel on a zero "parameter" with lr 1 and wd 0 leaves
            # -m_hat / (sqrt(v_hat) + eps) in it.
            n = torch.zeros_like(r)
            s8.adamw8_step(n.view(-1), r.view(-1), st["exp_avg"], st["exp_avg_absmax"],
                           st["exp_avg_sq"], st["exp_avg_sq_absmax"], group["block"], 1.0,
                           beta1, beta2, group["eps"], 0.0, 1.0 - beta1 ** t, 1.0 - beta2 ** t)
            n.neg_()
        else:
            n = adam_direction(r, st["exp_avg"], st["exp_avg_sq"], t, beta1, beta2, group["eps"])
        upd = gl.project_back(n, st["projector"], p.shape)
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(upd.to(p.dtype), alpha=-group["lr"] * gal["alpha"])

    # ---- Muon ---------------------------------------------------------------------------
    def _muon(self, group: dict, p: torch.Tensor) -> None:
        st = self.state[p]
        g = p.grad.contiguous()
        beta = group["momentum"]
        if self._eightbit(group, p.numel()):
            if not st:
                st["step"] = torch.tensor(0.0)
                st["momentum_buffer"], st["momentum_buffer_absmax"] = s8.zeros_state(
                    p, group["block"], "linear")
            u = torch.empty_like(g)
            s8.momentum8_step(g.view(-1), st["momentum_buffer"], st["momentum_buffer_absmax"],
                              u.view(-1), group["block"], beta, group["nesterov"])
        else:
            if not st:
                st["step"] = torch.tensor(0.0)
                st["momentum_buffer"] = torch.zeros_like(p)
            buf = st["momentum_buffer"]
            buf.lerp_(g, 1.0 - beta)
            u = g.lerp(buf, beta) if group["nesterov"] else buf
        st["step"] += 1
        muon_update(p, u, group["lr"], group["weight_decay"], group["ns_steps"],
                    group["muon_scale"], ns_dtype(group["ns_dtype"], p.device))

    # ---- Lion ---------------------------------------------------------------------------
    def _lion(self, group: dict, p: torch.Tensor) -> None:
        st = self.state[p]
        beta1, beta2 = group["betas"]
        if self._eightbit(group, p.numel()):
            if not st:
                st["step"] = torch.tensor(0.0)
                self._init8(st, p, group["block"], adam=False)
            s8.lion8_step(p.view(-1), p.grad.contiguous().view(-1), st["exp_avg"],
                          st["exp_avg_absmax"], group["block"], group["lr"], beta1, beta2,
                          group["weight_decay"])
        else:
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p)
            lion_step(p, p.grad, st["exp_avg"], group["lr"], beta1, beta2, group["weight_decay"])
        st["step"] += 1

    # ---- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        dtypes = {k: {n: v.dtype for n, v in st.items() if torch.is_tensor(v)}
                  for k, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        # keys: torch's ids or, from torch.distributed.checkpoint's set_state_dict, parameter
        # names; either way in the order of the saved groups' "params", as torch maps them
        saved = [k for g in state_dict["param_groups"] for k in g["params"]]
        param = dict(zip(saved, (p for g in self.param_groups for p in g["params"])))
        for k, names in dtypes.items():
            st = self.state[param[k]]
            for n, dt in names.items():
                if st[n].dtype != dt:  # int8/uint8 codes cast to float by torch: exact back
                    st[n] = st[n].to(dt)


def gal_rank(gal: dict, shape) -> int:
    return gal["rank"] or max(1, min(shape) // 4)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds as state (codes, absmax, moments, projectors)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))
