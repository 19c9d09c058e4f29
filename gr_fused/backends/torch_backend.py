"""The pure-PyTorch backend: runs everywhere, and is the reference every kernel is tested
against. It uses ``torch._foreach_*`` over the bucket's tensor lists and computes in float32
for bf16/fp16 tensors (float64 for float64), rounding once on the way back, as the kernels do.

The per-element math of each phase, in the order every backend follows:

  perturb   backup = θ;  θ = θ + eps·w·g (w = θ² if adaptive else 1);  g = fold·g
  reflect   θ = 2·backup − θ;  g = −g
  sgd       g = gscale·G (+ wd·backup);  buf = g on the first step else μ·buf + (1−damp)·g;
            d = g + μ·buf (nesterov) or buf;  θ = backup − lr·d
  adamw     step += 1;  θ = backup·(1 − lr·wd);  m = m + (1−β1)·(g − m);
            v = β2·v + (1−β2)·g²;  θ = θ − (lr/(1−β1^step))·m/(√v/√(1−β2^step) + eps)
  none      θ = backup;  G = g
When found_inf is set, every phase-3 path leaves θ = backup and all state unchanged.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .base import Backend, Bucket

_LOW = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(ts: List[torch.Tensor]) -> List[torch.Tensor]:
    """Tensors in their compute dtype (the same tensors when already there)."""
    return [t.to(compute_dtype(t.dtype)) if t.dtype in _LOW else t for t in ts]


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None

    def _backups(self, b: Bucket) -> List[torch.Tensor]:
        backups = b.extra.get("backup")
        if backups is None or len(backups) != len(b.params) or any(
                x.shape != p.shape for x, p in zip(backups, b.params)):
            backups = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in b.params]
            b.extra["backup"] = backups
        return backups

    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        ts = _up(b.grads)
        if adaptive:
            ts = torch._foreach_mul(_up(b.params), ts)
        # per-tensor norms in float64, so the global sum does not depend on how the
        # parameters are split into tensors (flat kernels sum the same terms in fp64 too)
        norms = torch._foreach_norm(ts, 2, dtype=torch.float64)
        total = torch.stack(norms).square().sum()
        return total if ts[0].dtype == torch.float64 else total.float()

    def perturb(self, b, eps, fold, adaptive):
        backups = self._backups(b)
        torch._foreach_copy_(backups, b.params)
        theta, g = _up(b.params), _up(b.grads)
        step = torch._foreach_mul(g, eps)
        if adaptive:
            step = torch._foreach_mul(step, torch._foreach_mul(theta, theta))
        new_theta = torch._foreach_add(theta, step)
        torch._foreach_copy_(b.params, new_theta)
        torch._foreach_copy_(b.grads, torch._foreach_mul(g, fold))

    def reflect(self, b):
        backups = _up(self._backups(b))
        theta = _up(b.params)
        new_theta = torch._foreach_sub(torch._foreach_mul(backups, 2.0), theta)
        torch._foreach_copy_(b.params, new_theta)
        torch._foreach_neg_(b.grads)

    def restore(self, b):
        torch._foreach_copy_(b.params, self._backups(b))

    def update(self, b, gscale, found_inf):
        backups = self._backups(b)
        skip = found_inf != 0
        g = torch._foreach_mul(_up(b.grads), gscale)
        theta = _up(backups)
        group = b.group
        if b.algo == "none":
            new_grads = g
            torch._foreach_copy_(b.params, backups)
            for grad, new in zip(b.grads, new_grads):
                grad.copy_(torch.where(skip, grad, new.to(grad.dtype)))
            return
        if b.algo == "sgd":
            new_theta, new_state = self._sgd(b, g, theta, group)
        elif b.algo == "adamw":
            new_theta, new_state = self._adamw(b, g, theta, group, skip)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")
        for p, backup, new in zip(b.params, backups, new_theta):
            p.copy_(torch.where(skip, backup, new.to(p.dtype)))
        for st, key, new in new_state:
            old = st.get(key)
            if old is None:  # a buffer created by this step: zeros if the step is skipped
                st[key] = torch.where(skip, torch.zeros_like(new), new).to(
                    b.params[0].dtype).detach()
            else:
                old.copy_(torch.where(skip, old, new.to(old.dtype)))

    @staticmethod
    def _sgd(b, g, theta, group):
        lr, mu, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        if wd != 0:
            g = torch._foreach_add(g, theta, alpha=wd)
        new_state = []
        if mu != 0:
            bufs = [st.get("momentum_buffer") for st in b.states]
            if any(x is None for x in bufs):
                new_bufs = [x.clone() for x in g]
            else:
                new_bufs = torch._foreach_mul(_up(bufs), mu)
                torch._foreach_add_(new_bufs, g, alpha=1 - damp)
            new_state = [(st, "momentum_buffer", nb) for st, nb in zip(b.states, new_bufs)]
            d = torch._foreach_add(g, new_bufs, alpha=mu) if group["nesterov"] else new_bufs
        else:
            d = g
        return torch._foreach_add(theta, d, alpha=-lr), new_state

    @staticmethod
    def _adamw(b, g, theta, group, skip):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = b.states
        for st, p in zip(states, b.params):
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for st in states:  # the step count moves only when the step is taken
            st["step"].add_((~skip).to(st["step"].dtype).to(st["step"].device))
        m = _up([st["exp_avg"] for st in states])
        v = _up([st["exp_avg_sq"] for st in states])
        theta = torch._foreach_mul(theta, 1 - lr * wd)
        new_m = torch._foreach_add(m, torch._foreach_sub(g, m), alpha=1 - beta1)
        new_v = torch._foreach_mul(v, beta2)
        torch._foreach_addcmul_(new_v, g, g, value=1 - beta2)
        out = []
        for th, mm, vv, st in zip(theta, new_m, new_v, states):
            step = st["step"].to(device=th.device, dtype=th.dtype)
            bc1 = 1 - torch.pow(beta1, step)
            bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
            denom = vv.sqrt() / bc2_sqrt + eps
            out.append(th - (lr / bc1) * mm / denom)
        new_state = [(st, "exp_avg", x) for st, x in zip(states, new_m)]
        new_state += [(st, "exp_avg_sq", x) for st, x in zip(states, new_v)]
        return out, new_state
