"""The step scalars of ``gr_fused/_scalars.py``, computed where the norms are finalized.

A GR step needs a handful of scalars between its element-wise phases: ε_t, fold and combine
after the norm of g1, and gscale, found_inf (and the skip counters, the AMP flag, AdamW's
step) after the norm of G. Computed with torch ops on 0-dim device tensors they cost about
fifteen tiny launches per step per param group; here they come out of the one-program
kernels that add the norms' partial sums. With one param group a GR step is then 6 launches
in all (SPEC §3): norm partials + scalars, perturb, norm partials + scalars, update. With G
groups in K flat buffers: K partials, G ascent finalizes, K perturbs, K partials, one update
finalize for all groups, K updates.

``_scalars.py`` stays the reference: these kernels follow its operations one by one, with
torch's rounding (fp32, correctly rounded division and square root; ``c / x`` is computed as
torch computes a Python number divided by a tensor, x⁻¹·c), and the tests hold them to it
within a few ulps. Every intermediate is rounded to fp32 explicitly, because the interpreter
passes scalar arguments as Python floats.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._scalars import CLIP_EPS, NORM_EPS
from .triton_common import BLOCK, LAUNCH_OPTIONS, f32
from .triton_norm import (FINALIZE_BLOCK, finalize_iters, partial_sums, sum_partial_range,
                          sum_partials)

FP32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _rdiv(c, x):
    """``c / x`` for a Python number c and an fp32 tensor x, as torch computes it: x⁻¹·c."""
    return (tl.div_rn(tl.full([], 1.0, tl.float32), x) * c).to(tl.float32)


@triton.jit
def _ascent_scalars_kernel(partial_ptr, num_partials, scale_ptr, out_ptr, rho, gamma, alpha,
                           norm_eps, HAS_SCALE: tl.constexpr, NORMALIZE: tl.constexpr,
                           FIXED_ALPHA: tl.constexpr, CENTRAL: tl.constexpr,
                           ITERS: tl.constexpr, BLOCK: tl.constexpr):
    norm = tl.sqrt_rn(sum_partials(partial_ptr, num_partials, ITERS, BLOCK))
    inv_scale = tl.full([], 1.0, tl.float32)
    if HAS_SCALE:
        inv_scale = tl.div_rn(inv_scale, tl.load(scale_ptr).to(tl.float32))
        norm = norm * inv_scale
    if NORMALIZE:
        eps = _rdiv(rho, (norm + norm_eps).to(tl.float32))
    else:
        eps = tl.zeros([], tl.float32) + rho
    if FIXED_ALPHA:
        a = tl.zeros([], tl.float32) + alpha
    else:
        a = _rdiv(gamma, eps)
    if CENTRAL:
        fold = _rdiv(2.0, a)
        combine = (a * -0.5).to(tl.float32)
    else:
        fold = tl.div_rn((1.0 - a).to(tl.float32), a)
        combine = a
    if HAS_SCALE:
        eps = eps * inv_scale
    tl.store(out_ptr, eps)
    tl.store(out_ptr + 1, fold)
    tl.store(out_ptr + 2, combine)


@triton.jit
def _update_scalars_kernel(partial_ptr, bounds_ptr, ascent_ptr, scale_ptr, out_ptr, count_ptr,
                           last_ptr, scaler_flag_ptr, step_ptr, max_norm, clip_eps,
                           GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr, CLIP: tl.constexpr,
                           HAS_SCALER_FLAG: tl.constexpr, HAS_STEP: tl.constexpr,
                           ITERS: tl.constexpr, BLOCK: tl.constexpr):
    # group g's partials are partials[bounds[g]:bounds[g + 1]]; its combine is ascent[g, 2]
    inv_scale = tl.full([], 1.0, tl.float32)
    if HAS_SCALE:
        inv_scale = tl.div_rn(inv_scale, tl.load(scale_ptr).to(tl.float32))
    total = tl.zeros([], tl.float32)       # Σ_g ‖G_g‖², for found_inf
    clip_total = tl.zeros([], tl.float32)  # Σ_g gscale_g²·‖G_g‖² = ‖g‖², for clipping
    for g in tl.static_range(GROUPS):
        sq = sum_partial_range(partial_ptr, tl.load(bounds_ptr + g), tl.load(bounds_ptr + g + 1),
                               ITERS, BLOCK)
        gscale = tl.load(ascent_ptr + 3 * g + 2).to(tl.float32)
        if HAS_SCALE:
            gscale = gscale * inv_scale
        total = total + sq
        clip_total = clip_total + gscale * gscale * sq
        if not CLIP:
            tl.store(out_ptr + g, gscale)
    found_inf = tl.where(total <= FP32_MAX, 0.0, 1.0).to(tl.float32)  # false for inf and NaN
    if CLIP:  # clip_grad_norm_ over all groups: coef = min(max_norm / (‖g‖ + 1e-6), 1)
        coef = _rdiv(max_norm, (tl.sqrt_rn(clip_total) + clip_eps).to(tl.float32))
        coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as torch.clamp
        for g in tl.static_range(GROUPS):
            gscale = tl.load(ascent_ptr + 3 * g + 2).to(tl.float32)
            if HAS_SCALE:
                gscale = gscale * inv_scale
            tl.store(out_ptr + g, gscale * coef)
    tl.store(out_ptr + GROUPS, found_inf)
    tl.store(count_ptr, tl.load(count_ptr) + found_inf.to(tl.int64))
    tl.store(last_ptr, found_inf != 0)
    if HAS_SCALER_FLAG:
        tl.store(scaler_flag_ptr, tl.maximum(tl.load(scaler_flag_ptr), found_inf))
    if HAS_STEP:  # AdamW's step advances unless the step is skipped
        tl.store(step_ptr, tl.load(step_ptr) + (1.0 - found_inf))


def ascent_scalars(inputs: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                   grad_scale: Optional[torch.Tensor], groups: Sequence[dict],
                   block: int = BLOCK) -> torch.Tensor:
    """The global norm of g1 over ``inputs`` (``(grad, param)`` pairs, param given for ASAM's
    Σ (θ·g)², else None) and each group's ``_scalars.ascent_scalars`` of it: one launch per
    non-empty input, then one per group. ``groups`` are dicts with the GR keys of a param
    group (rho, normalize, gamma, alpha, difference); ``grad_scale`` is the AMP scale S
    (0-dim float32) or None. Returns a float32 tensor of rows [eps, fold, combine], one row
    per group, on the inputs' device."""
    partials, bounds = partial_sums(inputs, block)
    out = torch.empty((len(groups), 3), dtype=torch.float32, device=partials.device)
    for row, group in zip(out, groups):
        alpha = group["alpha"]
        _ascent_scalars_kernel[(1,)](
            partials, bounds[-1], row if grad_scale is None else grad_scale, row,
            f32(group["rho"]), f32(group["gamma"]), f32(0.0 if alpha is None else alpha),
            f32(NORM_EPS), HAS_SCALE=grad_scale is not None, NORMALIZE=bool(group["normalize"]),
            FIXED_ALPHA=alpha is not None, CENTRAL=group["difference"] == "central",
            ITERS=finalize_iters(bounds[-1]), BLOCK=FINALIZE_BLOCK, **LAUNCH_OPTIONS)
    return out


def update_scalars(grads: Sequence[Sequence[torch.Tensor]], ascent: torch.Tensor,
                   grad_scale: Optional[torch.Tensor], *, max_grad_norm: Optional[float],
                   skipped_steps: torch.Tensor, last_step_skipped: torch.Tensor,
                   scaler_found_inf: Optional[torch.Tensor] = None,
                   adam_step: Optional[torch.Tensor] = None, block: int = BLOCK) -> torch.Tensor:
    """The norms of G (``grads[g]``: group g's flat grads) and ``_scalars.update_scalars`` of
    them, clipping all groups by one ``max_grad_norm``: one launch per non-empty grad, then
    one. ``ascent`` holds the groups' ascent rows (their combine in column 2). Returns a
    float32 tensor [gscale of each group..., found_inf]; on the way it adds found_inf to
    ``skipped_steps`` (int64), writes ``last_step_skipped`` (bool), raises the GradScaler's
    ``scaler_found_inf`` (float32) to it, and advances AdamW's ``adam_step`` (float32) unless
    the step is skipped. All of them 0-dim tensors on the grads' device."""
    flat = [(grad, None) for group in grads for grad in group]
    partials, bounds = partial_sums(flat, block)
    edges = [0]
    for group in grads:
        edges.append(edges[-1] + len(group))
    group_bounds = [bounds[e] for e in edges]
    widest = max(stop - start for start, stop in zip(group_bounds, group_bounds[1:]))
    out = torch.empty(len(grads) + 1, dtype=torch.float32, device=partials.device)
    _update_scalars_kernel[(1,)](
        partials, _device_ints(tuple(group_bounds), partials.device), ascent,
        out if grad_scale is None else grad_scale, out, skipped_steps, last_step_skipped,
        out if scaler_found_inf is None else scaler_found_inf,
        out if adam_step is None else adam_step,
        f32(1.0 if max_grad_norm is None else max_grad_norm), f32(CLIP_EPS),
        GROUPS=len(grads), HAS_SCALE=grad_scale is not None, CLIP=max_grad_norm is not None,
        HAS_SCALER_FLAG=scaler_found_inf is not None, HAS_STEP=adam_step is not None,
        ITERS=finalize_iters(widest), BLOCK=FINALIZE_BLOCK, **LAUNCH_OPTIONS)
    return out


@functools.lru_cache(maxsize=256)
def _device_ints(values: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, made once per distinct layout (a copy to
    the device the first time, none in later steps)."""
    return torch.tensor(values, dtype=torch.int64, device=device)
