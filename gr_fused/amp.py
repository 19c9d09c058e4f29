"""Mixed precision: a ``torch.amp.GradScaler`` that can drive a GR step.

``torch.amp.GradScaler.step(optimizer, closure)`` checks the gradients for inf/NaN *before*
it calls ``optimizer.step``. A GR step computes its gradients inside ``step`` (the closure
runs twice), so torch's scaler would check stale or missing gradients, and its ``update()``
would never learn that the second gradient overflowed. :class:`GradScaler` is a drop-in
subclass whose ``step`` lets a gr_fused optimizer unscale both gradients itself (once each,
fused into the step, ε_t and the combine use 1/S read from device memory) and report the
inf/NaN flag it found; ``update()`` then backs the scale off exactly as torch's does::

    scaler = gr_fused.amp.GradScaler("cuda")
    def closure():
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()      # both backward passes are scaled
        return loss
    scaler.step(opt, closure)              # skipped (θ restored) if either grad has inf/NaN
    scaler.update()

Optimizers that are not gr_fused optimizers, and gr_fused optimizers with GR off
(``gamma=0``), go to torch's ``GradScaler.step`` unchanged, so one scaler serves all of them
(``scaler.unscale_(opt)`` before a plain step works as in torch). ``state_dict`` and
``load_state_dict`` are torch's. A torch ``GradScaler`` given a GR step raises an error that
points here; a plain step works with either scaler.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.amp.grad_scaler import OptState

from .optim.base import GROptimizer

__all__ = ["GradScaler"]

# The attribute a gr_fused optimizer checks to know that this scaler (not torch's) drives it.
DRIVER_FLAG = "_gr_grad_scaler"


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``step(opt, closure)`` supports gr_fused optimizers.

    Besides ``step(opt, closure)`` (the closure may be positional or ``closure=``), hand-written
    loops use ``scaler.first_step(opt)`` and ``scaler.second_step(opt)`` in place of
    ``opt.first_step()`` / ``opt.second_step()``; ``scaler.update()`` follows as usual.
    """

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        inner = _gr_optimizer(optimizer)
        if not (self._enabled and inner is not None and inner.gr_active()):
            return super().step(optimizer, *args, **kwargs)  # torch's protocol fits a plain step
        if getattr(inner, DRIVER_FLAG, False) and inner._pending is not None:
            # scaler.first_step(opt) began this step; optimizer.step() completes it
            try:
                retval = optimizer.step(*args, **kwargs)
            except BaseException:
                self._detach(inner)
                raise
            self._end(optimizer, inner)
            return retval
        self._begin(optimizer, inner, "step")
        try:
            retval = optimizer.step(*args, **kwargs)  # a framework's wrapper steps as usual
        except BaseException:
            self._detach(inner)
            raise
        self._end(optimizer, inner)
        return retval

    def first_step(self, optimizer: GROptimizer, zero_grad: bool = True) -> None:
        """``optimizer.first_step()`` on scaled gradients (after ``scale(loss).backward()``)."""
        inner = _gr_optimizer(optimizer)
        if not self._enabled or inner is None:
            return optimizer.first_step(zero_grad)
        self._begin(optimizer, inner, "first_step")
        try:
            inner.first_step(zero_grad)
        except BaseException:
            self._detach(inner)
            raise

    def second_step(self, optimizer: GROptimizer, zero_grad: bool = True) -> None:
        """``optimizer.second_step()`` after the second ``scale(loss).backward()``; records
        whether the step was skipped for ``update()``."""
        inner = _gr_optimizer(optimizer)
        if not self._enabled or inner is None:
            return optimizer.second_step(zero_grad)
        if not getattr(inner, DRIVER_FLAG, False):
            raise RuntimeError("scaler.second_step(opt) without scaler.first_step(opt)")
        try:
            inner.second_step(zero_grad)
        except BaseException:
            self._detach(inner)
            raise
        self._end(optimizer, inner)

    # ------------------------------------------------------------------ internals
    def _begin(self, optimizer, inner: GROptimizer, what: str) -> None:
        if self._scale is None:  # torch creates it in the first scale(); the closure runs later
            devices = [p.device for g in optimizer.param_groups for p in g["params"]
                       if p.device.type == self._device]
            self._lazy_init_scale_growth_tracker(devices[0] if devices
                                                 else torch.device(self._device))
        self._check_scale_growth_tracker(what)
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError(f"{what}() has already been called since the last update().")
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                f"scaler.unscale_(opt) before scaler.{what}(opt) is not supported for gr_fused "
                "optimizers: the gradients are computed (and unscaled) inside the step. To clip, "
                "give the optimizer max_grad_norm=..., which clips the unscaled combined gradient.")
        if getattr(inner, DRIVER_FLAG, False):
            raise RuntimeError(f"scaler.{what}(opt) while a scaled GR step is in progress")
        scale = self._get_scale_async()
        inner.grad_scale = scale
        inner.found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        setattr(inner, DRIVER_FLAG, True)

    def _end(self, optimizer, inner: GROptimizer) -> None:
        found_inf = inner.found_inf
        self._detach(inner)
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["stage"] = OptState.STEPPED

    @staticmethod
    def _detach(optimizer: GROptimizer) -> None:
        for name in ("grad_scale", "found_inf", DRIVER_FLAG):
            if hasattr(optimizer, name):
                delattr(optimizer, name)


def _gr_optimizer(optimizer) -> Optional[GROptimizer]:
    """The gr_fused optimizer that ``optimizer`` is or wraps (Lightning's LightningOptimizer
    and accelerate's AcceleratedOptimizer keep it in ``_optimizer`` / ``optimizer``; the
    scale must be set where its step runs, not on a wrapper's copy), or None."""
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, GROptimizer) else None
