"""The backend interface: the three phases of a finite-difference GR step.

A step of every optimizer in gr_fused is driven by ``gr_fused.optim`` through these calls
only. A backend never sees closures, param groups or schedulers; it sees :class:`Bucket`s,
the parameters of one param group on one (device, dtype), and a few device scalars.

The grad buffer does double duty (this is what keeps the extra memory at one copy of θ):

* after the first backward it holds g1 (times the AMP scale, if any);
* :meth:`Backend.perturb` saves θ into the backup, moves θ to θ + ε·g1 and replaces the
  grad by ``fold·g1``;
* the second backward *accumulates* g2 onto it, so it holds ``G = fold·g1 + g2``;
* :meth:`Backend.update` reads ``g = gscale·G`` (the combined, unscaled, clipped gradient),
  restores θ from the backup and applies the base optimizer's update, or, when the device
  flag ``found_inf`` is set, only restores θ and leaves every state buffer untouched.

With ``fold = (1-α)/α`` and ``gscale = α`` this is g = (1-α)·g1 + α·g2; the central
difference uses :meth:`Backend.reflect` in between (see ``gr_fused/_scalars.py``).

All scalars that depend on gradients (``eps``, ``fold``, ``gscale``, ``found_inf``) are 0-dim
tensors on the bucket's device, so no phase ever synchronizes with the host. Hyperparameters
of the param group (lr, momentum, betas, ...) are host numbers read from ``bucket.group``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch


class Bucket:
    """The parameters of one param group that live on one (device, dtype).

    ``params``/``grads``/``states`` are parallel lists; ``states[i]`` is the optimizer's
    ``self.state[params[i]]`` dict, which holds what a resume needs (momentum, Adam moments,
    step) under torch.optim's key names. ``group`` is the param-group dict. ``extra`` is the
    backend's own scratch (flat buffers, the backup of θ, ...); it never enters a state_dict.
    """

    __slots__ = ("params", "grads", "states", "group", "algo", "extra")

    def __init__(self, params: List[torch.Tensor], grads: List[torch.Tensor],
                 states: List[Dict[str, Any]], group: Dict[str, Any], algo: str,
                 extra: Dict[str, Any]):
        self.params = params
        self.grads = grads
        self.states = states
        self.group = group
        self.algo = algo  # "sgd" | "adamw" | "none" (restore + combine only, for the GR wrapper)
        self.extra = extra

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


class SkipRecord:
    """Where a step reports whether it was skipped for inf/NaN (0-dim device tensors, written
    without a host sync): ``count`` (int64) grows by found_inf, ``last`` (bool) is set to
    found_inf != 0 and ``scaler_found_inf`` (the GradScaler's flag, or None) is raised to it."""

    __slots__ = ("count", "last", "scaler_found_inf")

    def __init__(self, count: torch.Tensor, last: torch.Tensor,
                 scaler_found_inf: Optional[torch.Tensor]):
        self.count, self.last, self.scaler_found_inf = count, last, scaler_found_inf

    def record(self, found_inf: torch.Tensor) -> None:
        """The torch-op version of what fused backends do inside their kernel."""
        self.last.copy_(found_inf != 0)
        self.count += found_inf.to(torch.int64)
        self.raise_scaler_flag(found_inf)

    def raise_scaler_flag(self, found_inf: torch.Tensor) -> None:
        """Raise the GradScaler's flag (if any) to found_inf, with torch ops."""
        flag = self.scaler_found_inf
        if flag is not None:
            flag.copy_(torch.maximum(flag, found_inf.to(flag)))


def adamw_state(b: "Bucket") -> Dict[str, Any]:
    """The AdamW state of a flat bucket, created (zeros, step 0) on its first step."""
    state = b.states[0]
    if "step" not in state:
        param = b.params[0]
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    return state


def scale_for(grad_scale: Optional[torch.Tensor], param: torch.Tensor) -> Optional[torch.Tensor]:
    """The AMP scale S as fused kernels read it: float32 on the param's device (or None)."""
    return None if grad_scale is None else grad_scale.to(device=param.device, dtype=torch.float32)


def fusable_scaler_flag(skips: SkipRecord, device: torch.device) -> bool:
    """Whether a fused kernel on ``device`` can raise the GradScaler's flag itself (it is
    float32 there, or absent); else the caller raises it with torch ops."""
    flag = skips.scaler_found_inf
    return flag is None or (flag.device == device and flag.dtype == torch.float32)


class Backend:
    """One implementation of the three phases. Subclasses set ``name`` and implement all
    methods below; see ``TorchBackend`` for the reference semantics of each."""

    name: str = "?"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        """None when this backend can run on tensors of ``device``, else why it cannot."""
        raise NotImplementedError

    # --- bucket management -------------------------------------------------------------
    def make_bucket(self, params, grads, states, group, algo, extra) -> Bucket:
        """Build the bucket for one step. ``extra`` is a dict that persists across steps
        for this (group, device, dtype) and may be used to cache flat buffers."""
        return Bucket(params, grads, states, group, algo, extra)

    # --- phase 1 -----------------------------------------------------------------------
    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        """Σ g² over the bucket (Σ (θ·g)² if ``adaptive``), as a 0-dim float32 (float64 for
        float64 params) tensor on the bucket's device. Deterministic; no host sync."""
        raise NotImplementedError

    # --- phase 2 -----------------------------------------------------------------------
    def perturb(self, b: Bucket, eps: torch.Tensor, fold: torch.Tensor, adaptive: bool) -> None:
        """backup ← θ;  θ ← θ + eps·w·g  (w = θ² if adaptive else 1);  g ← fold·g."""
        raise NotImplementedError

    def reflect(self, b: Bucket) -> None:
        """Central difference only: θ ← 2·backup − θ;  g ← −g."""
        raise NotImplementedError

    def restore(self, b: Bucket) -> None:
        """θ ← backup (used when a perturbed pass raised)."""
        raise NotImplementedError

    # --- phase 3 -----------------------------------------------------------------------
    def update(self, b: Bucket, gscale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """If ``found_inf`` (0-dim float, 0 or 1): θ ← backup and nothing else changes.
        Else, with g = gscale·G: θ ← backup then the base update of ``b.algo`` with g
        (``"none"``: θ ← backup and G ← g, for a base optimizer that steps afterwards)."""
        raise NotImplementedError

    # --- a whole step with its scalars fused into the norms (optional) ------------------
    # The driver computes the step scalars (ε_t, fold, gscale, found_inf, ...) with the
    # torch ops of _scalars.py between the phases above: about fifteen tiny launches per
    # step and group. A backend that can compute them in its norms' finalize kernels says so
    # in can_fuse, and the driver then runs each half of the step through one call.
    def can_fuse(self, buckets: List[Bucket]) -> bool:
        """Whether :meth:`ascend` and :meth:`combine_update` can run a step of ``buckets``
        (the driver has checked that they are all this backend's, on one device, and not
        sharded)."""
        return False

    def ascend(self, buckets: List[Bucket], grad_scale: Optional[torch.Tensor]) -> Any:
        """The global norm of g1, each param group's ascent scalars, and :meth:`perturb` of
        every bucket. ``grad_scale`` is the AMP scale S (0-dim float32) or None. Returns
        what :meth:`combine_update` needs (device tensors: each group's combine)."""
        raise NotImplementedError

    def combine_update(self, buckets: List[Bucket], ascended: Any,
                       grad_scale: Optional[torch.Tensor], skips: SkipRecord) -> torch.Tensor:
        """The norms of G, the update scalars (unscale, clip, found_inf) into ``skips``,
        and :meth:`update` of every bucket. Returns found_inf (0-dim float, 0. or 1.)."""
        raise NotImplementedError
