"""The per-element math of every kernel, in the kernels' operation order: the reference each
kernel phase is held to within an ulp or two (tests/equality.py). It computes in float32 for
bf16/fp16 tensors (float64 for float64), rounding once on the way back, as the kernels do,
and skips a step by selecting old values (torch.where), as a kernel does without a host
read. The shipped torch backend (gr_fused/backends/torch_backend.py) computes the same steps
with torch's own optimizers, in place, and is held to this one within the project's
tolerances.

The per-element math of each phase:

  perturb   backup = θ;  θ = θ + eps·w·g (w = θ² if adaptive else 1);  g = fold·g
  reflect   θ = 2·backup − θ;  g = −g
  sgd       g = gscale·G (+ wd·backup);  buf = g on the first step else μ·buf + (1−damp)·g;
            d = g + μ·buf (nesterov) or buf;  θ = backup − lr·d
  adamw     step += 1;  θ = backup·(1 − lr·wd);  m = m + (1−β1)·(g − m);
            v = β2·v + (1−β2)·g²;  θ = θ − (lr/(1−β1^step))·m/(√v/√(1−β2^step) + eps),
            lr/(1−β1^step) and √(1−β2^step) computed in float64 and rounded once
  none      θ = backup;  G = g
When found_inf is set, every phase-3 path leaves θ = backup and all state unchanged; a
tensor flagged FROZEN gets θ = backup only.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from gr_fused.backends.base import (DIRECTION, FLAG_FROZEN, FLAG_NEW_STATE, Backend, Bucket,
                                    state_tensors)

_LOW = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(ts: List[torch.Tensor]) -> List[torch.Tensor]:
    """Tensors in their compute dtype (the same tensors when already there)."""
    return [t.to(compute_dtype(t.dtype)) if t.dtype in _LOW else t for t in ts]


class ReferencePhases(Backend):
    name = "reference"
    supports_reuse = True

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None

    def _backups(self, b: Bucket) -> List[torch.Tensor]:
        backups = b.extra.get("backup")
        if backups is None or len(backups) != len(b.params) or any(
                x.shape != p.shape or x.dtype != p.dtype or x.device != p.device
                for x, p in zip(backups, b.params)):
            backups = [torch.empty_like(p, memory_format=torch.preserve_format) for p in b.params]
            b.extra["backup"] = backups
        return backups

    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        ts = _up(b.grads)
        if adaptive:
            ts = torch._foreach_mul(_up(b.params), ts)
        # per-tensor norms in float64 (the same terms the kernels sum in fp64), squared and
        # summed in float64: no overflow for any finite fp32/bf16/fp16 gradient
        norms = torch._foreach_norm(ts, 2, dtype=torch.float64)
        return torch.stack(norms).square().sum()

    def dots(self, b, key):
        g = [t.double() for t in b.grads]
        s = [t.double() for t in state_tensors(b, key)]
        sums = [torch.stack([(x * x).sum(), (x * y).sum(), (y * y).sum()]) for x, y in zip(g, s)]
        return torch.stack(sums).sum(0)

    def perturb(self, b, eps, fold, adaptive, save=False):
        backups = self._backups(b)
        torch._foreach_copy_(backups, b.params)
        if save:  # interval=k refresh: g1 into the direction state, for the update
            torch._foreach_copy_(state_tensors(b, DIRECTION), b.grads)
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

    def update(self, b, gscale, found_inf, direction=None):
        backups = self._backups(b)
        skip = found_inf != 0
        always = torch.ones_like(skip)
        # per tensor: whether it keeps its old values (a skipped step, or a frozen tensor)
        keep = [always if b.flag(i, FLAG_FROZEN) else skip for i in range(len(b.params))]
        if direction is not None:  # interval=k refresh: v̂ = a·G + c·g1 into the direction,
            a, c = direction       # zeros when the step is skipped (g1 may hold inf/NaN)
            for d, G in zip(state_tensors(b, DIRECTION), _up(b.grads)):
                new = G * a + _up([d])[0] * c
                d.copy_(torch.where(skip, torch.zeros_like(new), new).to(d.dtype))
        self._step(b, torch._foreach_mul(_up(b.grads), gscale), _up(backups), backups, keep)

    def reuse_update(self, b, u, v, found_inf):
        """interval=k between refreshes: g = u·g1 + v·v̂, then the base update of θ in
        place (there is no backup); nothing changes when ``found_inf``."""
        skip = found_inf != 0
        keep = [skip] * len(b.params)
        g = [x * u + _up([d])[0] * v for x, d in zip(_up(b.grads), state_tensors(b, DIRECTION))]
        self._step(b, g, _up(b.params), b.params, keep)

    def _step(self, b, g, theta, origin, keep):
        """The base update with g from θ (``theta``, of the compute dtype; ``origin`` the
        tensors it was read from, written back where a tensor ``keep``s its values)."""
        group = b.group
        if b.algo == "none":
            torch._foreach_copy_(b.params, origin)
            for grad, new, k in zip(b.grads, g, keep):
                grad.copy_(torch.where(k, grad, new.to(grad.dtype)))
            return
        if b.algo == "sgd":
            new_theta, new_state = self._sgd(b, g, theta, group, keep)
        elif b.algo == "adamw":
            new_theta, new_state = self._adamw(b, g, theta, group, keep)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")
        for p, old, new, k in zip(b.params, origin, new_theta, keep):
            p.copy_(torch.where(k, old, new.to(p.dtype)))
        for old, new, k in new_state:
            old.copy_(torch.where(k, old, new.to(old.dtype)))

    @staticmethod
    def _sgd(b, g, theta, group, keep):
        lr, mu, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        if wd != 0:
            g = torch._foreach_add(g, theta, alpha=wd)
        new_state = []
        if mu != 0:
            bufs = state_tensors(b, "momentum_buffer")
            new_bufs = []
            for i, (x, gi) in enumerate(zip(bufs, g)):
                if b.flag(i, FLAG_NEW_STATE):  # created for this step: buf = g
                    new_bufs.append(gi.clone())
                else:
                    nb = _up([x])[0].mul(mu)
                    nb.add_(gi, alpha=1 - damp)
                    new_bufs.append(nb)
            new_state = list(zip(bufs, new_bufs, keep))
            d = torch._foreach_add(g, new_bufs, alpha=mu) if group["nesterov"] else new_bufs
        else:
            d = g
        return torch._foreach_add(theta, d, alpha=-_number(lr)), new_state

    @staticmethod
    def _adamw(b, g, theta, group, keep):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = _number(lr)
        steps = state_tensors(b, "step")
        for st, k in zip(steps, keep):  # the step count moves only when the step is taken
            st.add_((~k).to(st.dtype).to(st.device))
        m = _up(state_tensors(b, "exp_avg"))
        v = _up(state_tensors(b, "exp_avg_sq"))
        theta = torch._foreach_mul(theta, 1 - lr * wd)
        new_m = torch._foreach_add(m, torch._foreach_sub(g, m), alpha=1 - beta1)
        new_v = torch._foreach_mul(v, beta2)
        torch._foreach_addcmul_(new_v, g, g, value=1 - beta2)
        out = []
        for th, mm, vv, st in zip(theta, new_m, new_v, steps):
            # the bias corrections in float64, as torch.optim.AdamW computes them (from the
            # step count, with Python numbers or in its fused kernels), each rounded once
            step = st.to(device=th.device, dtype=torch.float64)
            step_size = (lr / (1 - torch.pow(beta1, step))).to(th.dtype)
            bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, step)).to(th.dtype)
            denom = vv.sqrt() / bc2_sqrt + eps
            out.append(th - step_size * mm / denom)
        new_state = list(zip(state_tensors(b, "exp_avg"), new_m, keep))
        new_state += list(zip(state_tensors(b, "exp_avg_sq"), new_v, keep))
        return out, new_state


def _number(x) -> float:
    """A hyperparameter as a Python float (a tensor lr costs one read, as in torch.optim)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)
