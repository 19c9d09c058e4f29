"""The Triton backend: every phase of a GR step is one or two kernel launches over the flat
buffers of a bucket (see ``flat.py`` and ``gr_fused/kernels``), whatever the number of tensors.

``TritonBackend`` is the :class:`~.flat.FlatBackend` that the registry hands out under the
name ``"triton"``; ``TritonFlatKernels`` maps the phases of a *flat* bucket (one param, one
grad, one state dict, one backup) onto the kernels. With one param group a GR step is 6
launches with SGD or AdamW (7 for the central difference): the norm of g1 and the ascent
scalars (2), perturb (1), the norm of G and the update scalars (2), the update (1). With G
groups in K flat buffers it is 4K + G + 1 (AdamW: + K step counts). The kernels never sync
with the host.

The kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``gr_fused.kernels`` is first imported), which is how CI
checks the same kernel code without a GPU.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from .base import Backend, Bucket, adamw_state, fusable_scaler_flag, scale_for
from .flat import FlatBackend, fusable_groups, group_runs, update_all

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = exc


def _interpret_requested() -> bool:
    """Whether Triton would define kernels for its interpreter now (TRITON_INTERPRET)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton versions before knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    import gr_fused.kernels as kernels  # defines the kernels on first import
    return kernels


def _defined_interpreted() -> Optional[bool]:
    """How the kernels were defined (None: not imported yet, so they will follow the env)."""
    module = sys.modules.get("gr_fused.kernels")
    return None if module is None else module.INTERPRETED


class TritonFlatKernels(Backend):
    """The backend phases for a flat bucket (``params[0]`` the flat param, ``grads[0]`` the
    flat grad, ``states[0]`` the flat state dict, ``extra["backup"][0]`` the flat backup).

    ``ascend`` and ``combine_update`` compute the step scalars inside the norms' finalize
    kernels (``kernels/triton_scalars.py``)."""

    name = "triton-flat"

    def __init__(self, block: Optional[int] = None):
        self.block = block  # elements per program; None: the kernels' default (BLOCK)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return f"triton is not importable ({_IMPORT_ERROR!r})"
        device = torch.device(device)
        defined = _defined_interpreted()
        interpreted = _interpret_requested() if defined is None else defined
        if device.type == "cuda":
            if interpreted:
                return ("the kernels were defined for the Triton interpreter (TRITON_INTERPRET=1) "
                        "and would run on the host")
            return None
        if device.type == "cpu":
            if interpreted:
                return None
            if _interpret_requested():
                return ("TRITON_INTERPRET=1 was set after gr_fused.kernels was imported; set it "
                        "before the first import")
            return ("the Triton kernels need CUDA tensors (on CPU they run only under the Triton "
                    "interpreter, TRITON_INTERPRET=1, which is for tests)")
        return f"the Triton kernels do not run on {device.type} tensors"

    @staticmethod
    def _flat(b: Bucket):
        return b.params[0], b.grads[0], b.extra["backup"][0]

    def _block(self):
        return {} if self.block is None else {"block": self.block}

    def sq_norm(self, b, adaptive):
        param, grad, _ = self._flat(b)
        return _kernels().sq_norm(grad, param if adaptive else None, **self._block())

    def perturb(self, b, eps, fold, adaptive):
        _kernels().perturb(*self._flat(b), eps, fold, adaptive, **self._block())

    def reflect(self, b):
        _kernels().reflect(*self._flat(b), **self._block())

    def restore(self, b):
        param, _, backup = self._flat(b)
        param.copy_(backup)

    def can_fuse(self, fbs):
        return fusable_groups(fbs) is not None

    def ascend(self, fbs, grad_scale):
        runs = group_runs(fbs)
        ascent = _kernels().ascent_scalars(
            [(fb.grads[0], fb.params[0] if fb.group["adaptive"] else None) for fb in fbs],
            scale_for(grad_scale, fbs[0].params[0]), [group for group, _ in runs],
            **self._block())
        for (group, members), (eps, fold, _) in zip(runs, ascent):
            for fb in members:
                self.perturb(fb, eps, fold, group["adaptive"])
        return ascent  # rows [eps, fold, combine], one per group

    def combine_update(self, fbs, ascent, grad_scale, skips):
        runs = group_runs(fbs)
        device = fbs[0].params[0].device
        flag = skips.scaler_found_inf
        fused_flag = fusable_scaler_flag(skips, device)
        one_adamw = len(fbs) == 1 and fbs[0].algo == "adamw"  # its step advances in-kernel
        out = _kernels().update_scalars(
            [[fb.grads[0] for fb in members] for _, members in runs], ascent,
            scale_for(grad_scale, fbs[0].params[0]), max_grad_norm=runs[0][0]["max_grad_norm"],
            skipped_steps=skips.count, last_step_skipped=skips.last,
            scaler_found_inf=flag if fused_flag else None,
            adam_step=adamw_state(fbs[0])["step"] if one_adamw else None, **self._block())
        return update_all(self, runs, out, skips, step_advanced=one_adamw)

    def update(self, b, gscale, found_inf, step_advanced=False):
        param, grad, backup = self._flat(b)
        state, group, k = b.states[0], b.group, _kernels()
        if b.algo == "none":
            k.restore_and_combine(param, grad, backup, gscale, found_inf, **self._block())
        elif b.algo == "sgd":
            buf, first = None, False
            if group["momentum"] != 0:
                buf = state.get("momentum_buffer")
                first = buf is None
                if first:  # filled by the kernel: g, or zeros if this step is skipped
                    buf = state["momentum_buffer"] = torch.empty_like(param)
            k.sgd_update(param, grad, backup, buf, gscale, found_inf, lr=_number(group["lr"]),
                         momentum=group["momentum"], dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                         first=first, **self._block())
        elif b.algo == "adamw":
            state = adamw_state(b)
            beta1, beta2 = group["betas"]
            k.adamw_update(param, grad, backup, state["exp_avg"], state["exp_avg_sq"],
                           state["step"], gscale, found_inf, lr=_number(group["lr"]),
                           beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], advance_step=not step_advanced,
                           **self._block())
        else:
            raise ValueError(f"unknown base update {b.algo!r}")


def _number(x) -> float:
    """A hyperparameter as a Python float (a tensor lr costs one read, as in torch.optim)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class TritonBackend(FlatBackend):
    """``backend="triton"``: flat buffers per (param group, device, dtype) and Triton kernels."""

    name = "triton"
    kernel = TritonFlatKernels()
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16)
