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
