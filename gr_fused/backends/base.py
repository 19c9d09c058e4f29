"""The backend interface: the three phases of a finite-difference GR step.

A step of every optimizer in gr_fused is driven by ``gr_fused.optim`` through these calls
only. A backend never sees closures, param groups' bookkeeping or schedulers; it sees
:class:`Bucket`s, the parameters of one param group on one (device, dtype), and a few device
scalars.

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

The tensors are the user's own: ``params[i]`` is the parameter (or the local shard of a
sharded one, or the real view of a complex one), ``grads[i]`` its ``.grad``, ``states[i]``
the optimizer's ``state[p]`` dict. A backend updates them in place and never re-points them.
Buffers a backend owns (the backup of θ, device tables) live in ``extra``.

All scalars that depend on gradients (``eps``, ``fold``, ``gscale``, ``found_inf``) are 0-dim
tensors on the bucket's device, so no phase ever synchronizes with the host. Hyperparameters
of the param group (lr, momentum, betas, ...) are host numbers read from ``bucket.group``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from .tensor_table import FLAG_FROZEN, FLAG_NEW_STATE, real  # noqa: F401  (re-exported)

DIRECTION = "gr_direction"  # interval=k: the state key of each tensor's cached direction


class Bucket:
    """The parameters of one param group that live on one (device, dtype).

    ``sources`` are the user's parameters (whose ``.grad`` the optimizer watches);
    ``params``/``grads`` the tensors the math runs on (the same tensors, or their local
    shards or real views); ``states[i]`` is the optimizer's ``self.state[sources[i]]`` dict,
    with torch.optim's key names; read its tensors through :func:`state_tensors`.
    ``group`` is the param-group dict (the base optimizer's hyperparameters), ``gr`` the
    group's GR hyperparameters (gamma, rho, normalize, difference, alpha, adaptive,
    max_grad_norm). ``flags[i]`` (or None: all 0) holds FLAG_NEW_STATE when the update
    creates that tensor's state (a momentum buffer is then written, never read) and
    FLAG_FROZEN when the tensor is only restored, not updated. ``extra`` is the backend's
    own dict, kept from step to step for this (group, device, dtype): the backup of θ,
    device tables; it never enters a state_dict.
    """

    __slots__ = ("sources", "params", "grads", "states", "group", "gr", "algo", "extra",
                 "flags", "group_index", "backend", "shard_groups", "held")

    def __init__(self, params: List[torch.Tensor], grads: List[torch.Tensor],
                 states: List[Dict[str, Any]], group: Dict[str, Any], algo: str,
                 extra: Dict[str, Any], gr: Optional[Dict[str, Any]] = None,
                 sources: Optional[List[torch.Tensor]] = None):
        self.params = params
        self.grads = grads
        self.states = states
        self.group = group
        self.gr = group if gr is None else gr
        self.algo = algo  # "sgd" | "adamw" | "none" (restore + combine only, for the GR wrapper)
        self.extra = extra
        self.sources = params if sources is None else sources
        self.flags: Optional[List[int]] = None
        self.group_index = 0
        self.backend: Optional["Backend"] = None
        self.shard_groups: tuple = ()
        self.held: Optional[List[torch.Tensor]] = None  # the driver's: grads as first_step saw them

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def flag(self, i: int, bit: int) -> bool:
        return self.flags is not None and bool(self.flags[i] & bit)


def state_tensors(b: Bucket, key: str) -> List[Optional[torch.Tensor]]:
    """The ``key`` state of each tensor of ``b`` as the math sees it (local shard, real view),
    or None where there is none."""
    out = []
    for st in b.states:
        t = st.get(key)
        if t is not None and not (type(t) is torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
        out.append(real(t) if t is not None and t.dim() else t)
    return out


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


def scale_for(grad_scale: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The AMP scale S as fused kernels read it: float32 on ``device`` (or None)."""
    return None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)


def fusable_scaler_flag(skips: SkipRecord, device: torch.device) -> bool:
    """Whether a fused kernel on ``device`` can raise the GradScaler's flag itself (it is
    float32 there, or absent); else the caller raises it with torch ops."""
    flag = skips.scaler_found_inf
    return flag is None or (flag.device == device and flag.dtype == torch.float32)


def group_runs(buckets: Sequence[Bucket]) -> List[tuple]:
    """Buckets as runs of one param group each: ``[(gr, [bucket, ...]), ...]``, in order."""
    runs: List[tuple] = []
    for b in buckets:
        if runs and runs[-1][1][0].group_index == b.group_index:
            runs[-1][1].append(b)
        else:
            runs.append((b.gr, [b]))
    return runs


def fusable_groups(buckets: Sequence[Bucket]) -> Optional[List[tuple]]:
    """``group_runs(buckets)`` when a kernel backend can fuse the step's scalars over them:
    each group's buckets in a row and one ``max_grad_norm`` for all groups (clip_grad_norm_
    over all of them; per-group thresholds take the driver's torch-op path). Else None."""
    runs = group_runs(buckets)
    if (len({members[0].group_index for _, members in runs}) != len(runs)
            or len({gr["max_grad_norm"] for gr, _ in runs}) != 1):
        return None
    return runs


class Backend:
    """One implementation of the three phases. Subclasses set ``name`` and implement all
    methods below; see ``TorchBackend`` for the reference semantics of each."""

    name: str = "?"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        """None when this backend can run on tensors of ``device``, else why it cannot."""
        raise NotImplementedError

    # --- bucket management -------------------------------------------------------------
    def prepare(self, b: Bucket) -> List[Bucket]:
        """Called by the driver at the start of each step for a freshly collected bucket.
        Returns the buckets to run: ``[b]``, or ``b`` split into the tensors this backend
        takes and a bucket for the torch backend (tensors it cannot walk, said once in a
        warning). ``b.extra`` persists across steps for this (group, device, dtype) and may
        cache device tables."""
        return [b]

    def refresh(self, b: Bucket) -> None:
        """Called again before the update, after the driver created missing state or set
        ``flags``: bring any cached description of the tensors up to date."""

    # --- phase 1 -----------------------------------------------------------------------
    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        """Σ g² over the bucket (Σ (θ·g)² if ``adaptive``), as a 0-dim float64 tensor on the
        bucket's device, summed in float64. Non-finite exactly when an element is inf or
        NaN (for float64 tensors also when the sum overflows). Deterministic; no host sync."""
        raise NotImplementedError

    # --- phase 2 -----------------------------------------------------------------------
    def perturb(self, b: Bucket, eps: torch.Tensor, fold: torch.Tensor, adaptive: bool,
                save: bool = False) -> None:
        """backup ← θ;  θ ← θ + eps·w·g  (w = θ² if adaptive else 1);  g ← fold·g
        (``save``, interval=k: the DIRECTION state ← g first)."""
        raise NotImplementedError

    def reflect(self, b: Bucket) -> None:
        """Central difference only: θ ← 2·backup − θ;  g ← −g."""
        raise NotImplementedError

    def restore(self, b: Bucket) -> None:
        """θ ← backup (used when a perturbed pass raised)."""
        raise NotImplementedError

    # --- phase 3 -----------------------------------------------------------------------
    def update(self, b: Bucket, gscale: torch.Tensor, found_inf: torch.Tensor,
               direction: Optional[tuple] = None) -> None:
        """If ``found_inf`` (0-dim float, 0 or 1): θ ← backup and nothing else changes.
        Else, with g = gscale·G: θ ← backup then the base update of ``b.algo`` with g
        (``"none"``: θ ← backup and G ← g, for a base optimizer that steps afterwards).
        Tensors flagged FLAG_FROZEN get θ ← backup only. State flagged FLAG_NEW_STATE was
        just created (zeros) for this step: a momentum buffer is set to g (kept zero when
        skipped). AdamW's per-tensor ``step`` advances by one unless skipped or frozen."""
        raise NotImplementedError

    # --- interval=k (a backend with ``supports_reuse``) -----------------------------------
    # The DIRECTION state (one per tensor, like the param) holds the cached unit direction
    # v̂ between refreshes, and g1 during a refresh step. The scalars are _scalars.py's
    # direction_scalars and reuse_scalars.
    supports_reuse = False

    def dots(self, b: Bucket, key: str) -> torch.Tensor:
        """[Σ g², Σ g·s, Σ s²] over the bucket, s its ``key`` state tensors: a float64
        tensor of 3 on the device (each term in float64)."""
        raise NotImplementedError

    # perturb(b, eps, fold, adaptive, save=True) also copies g (before folding) into the
    # DIRECTION state. update(b, gscale, found_inf, direction=(a, c)) first sets
    # DIRECTION ← a·G + c·DIRECTION for every tensor, frozen ones included, and zeros when
    # the step is skipped (the saved g1 may hold inf/NaN). reuse_update(b, u, v, found_inf)
    # applies the base update of θ in place (no backup) with g = u·G + v·DIRECTION;
    # nothing changes when found_inf.

    def reuse(self, buckets: List[Bucket], grad_scale: Optional[torch.Tensor],
              valid: torch.Tensor, skips: SkipRecord) -> torch.Tensor:
        """Fused (``can_fuse``) step between refreshes: [Σ G², Σ G·v̂, Σ v̂²] of each group,
        ``reuse_scalars`` (``valid``: 0-dim, 1. when a direction is cached) and the skip
        records in the finalize, then ``reuse_update`` of every bucket. Returns found_inf."""
        raise NotImplementedError

    # --- a whole step with its scalars fused into the norms (optional) ------------------
    # The driver computes the step scalars (ε_t, fold, gscale, found_inf, ...) with the
    # torch ops of _scalars.py between the phases above: about fifteen tiny launches per
    # step and group. A backend that can compute them in its norms' finalize kernels says so
    # in can_fuse, and the driver then runs each half of the step through one call.
    def can_fuse(self, buckets: List[Bucket]) -> bool:
        """Whether :meth:`ascend` and :meth:`combine_update` can run a step of ``buckets``
        (the driver has checked that they are all this backend's, on one device, not
        sharded, and no tensor is frozen)."""
        return False

    def ascend(self, buckets: List[Bucket], grad_scale: Optional[torch.Tensor],
               save: bool = False) -> torch.Tensor:
        """The global norm of g1, each param group's ascent scalars, and :meth:`perturb` of
        every bucket (with ``save``: an interval=k refresh). ``grad_scale`` is the AMP scale
        S (0-dim float32) or None. Returns the rows [eps, fold, combine] of each group of
        ``group_runs(buckets)`` (a [G, 3] tensor of the compute dtype on the device)."""
        raise NotImplementedError

    def combine_update(self, buckets: List[Bucket], ascent: torch.Tensor,
                       grad_scale: Optional[torch.Tensor], skips: SkipRecord,
                       direction_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The norms of G, the update scalars (unscale, clip, found_inf) into ``skips``,
        and :meth:`update` of every bucket. Returns found_inf (0-dim float, 0. or 1.).
        ``direction_valid`` (an interval=k refresh; a 0-dim tensor of the compute dtype):
        the norm pass reads the DIRECTION state too ([Σ G², Σ G·g1, Σ g1²] per group), the
        finalize adds ``direction_scalars`` and writes (1 − found_inf)·ok into it, and the
        update caches the direction (``update(..., direction=...)``)."""
        raise NotImplementedError
