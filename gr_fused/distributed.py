"""Data-parallel GR: rank-local ascent (m-sharpness) under DDP, and the sharded global norm
of FSDP2 / DTensor parameters.

**Global ascent** needs nothing from this module: with a ``DistributedDataParallel`` model,
``opt.step(closure)`` all-reduces both gradients (DDP averages ``p.grad``, which holds
``fold·g1 + g2_r`` during the second backward; ``fold·g1`` is the same on every rank, so the
average is ``fold·g1 + mean_r g2_r``) and the step is FD-GR on the global batch.

**Local ascent** (each rank perturbs by the gradient of its own batch): see
:func:`local_ascent_step`.

**Sharded parameters** (``torch.distributed.fsdp.fully_shard``, DTensor): the optimizer works
on each rank's local shard and sums the squared norms over the process groups the shards are
spread over, so ε_t, clipping and the inf/NaN skip use the global norm and every rank takes
the same decision. :func:`local_shard` and :func:`all_reduce_sq_norm` are what the optimizer
uses for that.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist

from .backends.base import group_runs

__all__ = ["local_ascent_step", "local_shard", "all_reduce_sq_norm", "all_reduce_max"]


# ---------------------------------------------------------------------------- sharded tensors
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def shard_groups(t: torch.Tensor) -> Tuple[Any, ...]:
    """The process groups over which the DTensor ``t`` is sharded (one per mesh dimension
    with a ``Shard`` placement); ``()`` for a plain tensor or a replicated DTensor."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(t, DTensor):
        return ()
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            groups.append(t.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise RuntimeError(f"gr_fused: a DTensor with placement {placement} (neither Shard "
                               "nor Replicate) cannot be stepped shard by shard")
    return tuple(groups)


def local_shard(p: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[Any, ...]]:
    """``(local param, local grad, shard groups)`` of a parameter: for a DTensor (FSDP2) its
    local shard and that of its grad, which alias the DTensors' storage, so in-place updates
    reach them; for a plain tensor ``(p, p.grad, ())``."""
    if type(p) is torch.nn.Parameter or type(p) is torch.Tensor:
        return p, p.grad, ()  # the common case, without the DTensor checks
    groups = shard_groups(p)
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(p, DTensor):
        return p, p.grad, groups
    g = p.grad
    if g is not None:
        if not isinstance(g, DTensor) or g.placements != p.placements:
            raise RuntimeError("gr_fused: the grad of a DTensor parameter must be a DTensor "
                               f"with the same placements ({p.placements})")
        g = g.to_local()
    return p.to_local(), g, groups


def all_reduce_sq_norm(sq: torch.Tensor, groups: Tuple[Any, ...]) -> torch.Tensor:
    """Sum a 0-dim squared norm of local shards over ``groups`` (a new tensor; no host sync)."""
    sq = sq.clone()
    for group in groups:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq


def all_reduce_max(flag: torch.Tensor, groups: Tuple[Any, ...]) -> torch.Tensor:
    """Max of a 0-dim flag over ``groups`` (a new tensor), so every shard skips together."""
    flag = flag.clone()
    for group in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


# ---------------------------------------------------------------------------- local ascent
@torch.no_grad()
def local_ascent_step(optimizer, closure: Callable[[], Any], model=None, process_group=None):
    """One GR step with rank-local ascent (m-sharpness) on a data-parallel model.

    Each rank r perturbs by the gradient of its own batch and weighs it with its own α_r;
    the ranks then average their combined gradients and apply the same base update::

        g1_r = ∇L_r(θ),   ε_r = ρ/‖g1_r‖ (or ρ),   α_r = γ/ε_r (or the fixed alpha)
        g2_r = ∇L_r(θ + ε_r·g1_r)
        g    = mean_r [(1 − α_r)·g1_r + α_r·g2_r]

    For SAM (α = 1) that is g = mean_r ∇L_r(θ + ρ·g1_r/‖g1_r‖). Every backward pass runs
    under ``model.no_sync()`` (pass the DDP module as ``model``; ``None`` for a model that is
    not wrapped), and one all-reduce of the combined gradient, over ``process_group``
    (default: the world), follows the last one. ``closure`` is the usual GR closure (zero the
    grads, forward, backward, return the loss); the loss at θ of this rank is returned.

    With plain DDP, running only the first backward under ``no_sync()`` and calling
    ``opt.step`` gives the same result only when α is the same on every rank (SAM, GNP, a
    fixed ``alpha``, or ``normalize=False``); with ``gamma`` and ``normalize=True`` α_r
    depends on the rank's ‖g1_r‖, the update would differ between ranks and the replicas
    would drift apart. This function is right in every case.
    """
    no_sync = model.no_sync if model is not None else contextlib.nullcontext

    def run():
        with torch.enable_grad(), no_sync():
            return closure()

    if not optimizer.gr_active():
        loss = run()
        _average([p.grad for g in optimizer.param_groups for p in g["params"]
                  if p.grad is not None], process_group)
        optimizer.step()
        return loss
    loss = run()
    optimizer._fuse_scalars = False  # the general path: its per-group combines are edited below
    try:
        optimizer.first_step()
    finally:
        optimizer._fuse_scalars = True
    try:
        run()
        if optimizer._pending is not None and optimizer._needs_reflect():
            optimizer.reflect_step()
            run()
        pending = optimizer._pending
        optimizer._adopt_replaced_grads()
        grads = []
        runs = group_runs(pending.buckets)
        for i, (_, members) in enumerate(runs):  # G_r ← α_r·G_r, then the update uses 1·G
            for b in members:
                torch._foreach_mul_(b.grads, pending.rows[i, 2].to(b.device, b.grads[0].dtype
                                                                   if b.dtype == torch.float64
                                                                   else torch.float32))
                grads.extend(b.grads)
        pending.rows[:, 2] = 1.0
        _average(grads, process_group)
    except BaseException:
        optimizer.abort_step()
        raise
    optimizer.second_step(zero_grad=False)
    return loss


def _average(grads, process_group) -> None:
    """Average the tensors ``grads`` over the ranks of ``process_group``, one all-reduce per
    (device, dtype)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gr_fused.distributed.local_ascent_step needs an initialized "
                           "torch.distributed process group")
    world = dist.get_world_size(process_group)
    by_kind = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for kind in sorted(by_kind, key=str):
        ts = by_kind[kind]
        flat = torch.cat([t.reshape(-1) for t in ts]) if len(ts) > 1 else ts[0].reshape(-1)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        flat.div_(world)
        if len(ts) > 1 or flat.data_ptr() != ts[0].data_ptr():
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
