"""The step scalars of ``gr_fused/_scalars.py``, computed where the norms are finalized.

A GR step needs a handful of scalars between its element-wise phases: ε_t, fold and combine
after the norm of g1, and gscale, found_inf (and the skip counters, the AMP flag, AdamW's
step counts) after the norm of G. Computed with torch ops on 0-dim device tensors they cost
about fifteen tiny launches per step per param group; here they come out of the one-program
kernels that add the norms' partial sums. With one param group and one table a GR step is
then 6 launches in all: norm partials, ascent finalize, perturb, norm partials, update
finalize, update. With G groups in K tables: K partials, G ascent finalizes, K perturbs, K
partials, one update finalize for all groups, K updates (4K + G + 1).

``_scalars.py`` stays the reference: these kernels follow its operations one by one with
torch's rounding: the norm is the float64 square root of the float64 sum, rounded once to
fp32; then fp32 with correctly rounded division and square root (``c / x`` for a Python
number c is computed as torch computes it, x⁻¹·c); the clipping total is summed in float64.
Every intermediate is rounded to fp32 explicitly, because the interpreter passes scalar
arguments as Python floats.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._scalars import CLIP_EPS, NORM_EPS
from .triton_common import (F64_MAX, FINALIZE_BLOCK, SMALL_LAUNCH_OPTIONS, advance_steps,
                            device_functions, f32, finalize_iters, sum_partial_range)


@triton.jit
def _rdiv(c, x):
    """``c / x`` for a Python number c and an fp32 tensor x, as torch computes it: x⁻¹·c."""
    return (tl.div_rn(tl.full([], 1.0, tl.float32), x) * c).to(tl.float32)


@triton.jit
def _inv_scale(scale_ptr, HAS_SCALE: tl.constexpr):
    inv_scale = tl.full([], 1.0, tl.float32)
    if HAS_SCALE:
        inv_scale = tl.div_rn(inv_scale, tl.load(scale_ptr).to(tl.float32))
    return inv_scale


@triton.jit(do_not_specialize=["count", "row"],
            do_not_specialize_on_alignment=["scale_ptr", "rows_ptr"])
def _ascent_scalars_kernel(partial_ptr, count, scale_ptr, rows_ptr, row, rho, gamma, alpha,
                           eps_sign, combine_sign, norm_eps, HAS_SCALE: tl.constexpr,
                           NORMALIZE: tl.constexpr, FIXED_ALPHA: tl.constexpr,
                           CENTRAL: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    sq = sum_partial_range(partial_ptr, 0, count, ITERS, BLOCK)
    norm = tl.sqrt(sq).to(tl.float32)   # fp64 sqrt (correctly rounded), rounded once to fp32
    inv_scale = _inv_scale(scale_ptr, HAS_SCALE)
    if HAS_SCALE:
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
    out = rows_ptr + 3 * row
    tl.store(out, (eps * eps_sign).to(tl.float32))
    tl.store(out + 1, fold)
    tl.store(out + 2, (combine * combine_sign).to(tl.float32))


@triton.jit
def _group_gscale(rows_ptr, g, inv_scale, HAS_SCALE: tl.constexpr):
    gscale = tl.load(rows_ptr + 3 * g + 2).to(tl.float32)
    if HAS_SCALE:
        gscale = gscale * inv_scale
    return gscale


@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=[
    "rows_ptr", "scale_ptr", "out_ptr", "count_ptr", "last_ptr", "scaler_flag_ptr", "ptrs_ptr"])
def _update_scalars_kernel(partial_ptr, bounds_ptr, rows_ptr, scale_ptr, out_ptr, count_ptr,
                           last_ptr, scaler_flag_ptr, ptrs_ptr, T, max_norm, clip_eps,
                           GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr, CLIP: tl.constexpr,
                           HAS_SCALER_FLAG: tl.constexpr, HAS_STEPS: tl.constexpr,
                           STEP_ROW: tl.constexpr, STEP_ITERS: tl.constexpr,
                           ITERS: tl.constexpr, BLOCK: tl.constexpr):
    # group g's partials are partials[bounds[g]:bounds[g + 1]]; its combine is rows[g, 2]
    inv_scale = _inv_scale(scale_ptr, HAS_SCALE)
    total = tl.zeros([], tl.float64)       # Σ_g ‖G_g‖², for found_inf
    clip_total = tl.zeros([], tl.float64)  # Σ_g gscale_g²·‖G_g‖² = ‖g‖², for clipping
    for g in tl.static_range(GROUPS):
        sq = sum_partial_range(partial_ptr, tl.load(bounds_ptr + g), tl.load(bounds_ptr + g + 1),
                               ITERS, BLOCK)
        gscale = _group_gscale(rows_ptr, g, inv_scale, HAS_SCALE)
        total = total + sq
        weight = gscale.to(tl.float64)
        clip_total = clip_total + weight * weight * sq
        if not CLIP:
            tl.store(out_ptr + g, gscale)
    # 1 when the sum is inf or NaN (NaN compares false)
    found_inf = tl.where(total <= F64_MAX, 0.0, 1.0).to(tl.float32)
    if CLIP:  # clip_grad_norm_ over all groups: coef = min(max_norm / (‖g‖ + 1e-6), 1)
        norm = tl.sqrt(clip_total).to(tl.float32)
        coef = _rdiv(max_norm, (norm + clip_eps).to(tl.float32))
        coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as torch.clamp
        for g in tl.static_range(GROUPS):
            tl.store(out_ptr + g, _group_gscale(rows_ptr, g, inv_scale, HAS_SCALE) * coef)
    tl.store(out_ptr + GROUPS, found_inf)
    tl.store(count_ptr, tl.load(count_ptr) + found_inf.to(tl.int64))
    tl.store(last_ptr, found_inf != 0)
    if HAS_SCALER_FLAG:
        tl.store(scaler_flag_ptr, tl.maximum(tl.load(scaler_flag_ptr), found_inf))
    if HAS_STEPS:  # AdamW's step counts advance unless the step is skipped
        advance_steps(ptrs_ptr, T, 1.0 - found_inf, STEP_ROW, STEP_ITERS, BLOCK)


def ascent_finalize(partials: torch.Tensor, count: int, grad_scale: Optional[torch.Tensor],
                    rows: torch.Tensor, row: int, gr: dict) -> None:
    """One launch: from Σ partials[:count] (the global Σ g1²) the ascent scalars of one param
    group into ``rows[row] = [eps·eps_sign, fold, combine·combine_sign]`` (float32).
    ``gr`` holds the group's GR keys (rho, normalize, gamma, alpha, difference, and the
    signs); ``grad_scale`` is the AMP scale S (0-dim float32) or None."""
    alpha = gr["alpha"]
    _ascent_scalars_kernel[(1,)](
        partials, count, rows if grad_scale is None else grad_scale, rows, row,
        f32(gr["rho"]), f32(gr["gamma"]), f32(0.0 if alpha is None else alpha),
        f32(gr.get("eps_sign", 1.0)), f32(gr.get("combine_sign", 1.0)), f32(NORM_EPS),
        HAS_SCALE=grad_scale is not None, NORMALIZE=bool(gr["normalize"]),
        FIXED_ALPHA=alpha is not None, CENTRAL=gr["difference"] == "central",
        ITERS=finalize_iters(count), BLOCK=FINALIZE_BLOCK, **SMALL_LAUNCH_OPTIONS)


def update_finalize(partials: torch.Tensor, bounds: torch.Tensor, widest: int, rows: torch.Tensor,
                    grad_scale: Optional[torch.Tensor], out: torch.Tensor, *,
                    max_grad_norm: Optional[float], skipped_steps: torch.Tensor,
                    last_step_skipped: torch.Tensor,
                    scaler_found_inf: Optional[torch.Tensor] = None, steps_table=None) -> None:
    """One launch: the norms of G of each of the G groups (group g's partial sums are
    ``partials[bounds[g]:bounds[g + 1]]``, ``bounds`` an int64 device tensor, at most
    ``widest`` of them) and ``_scalars.update_scalars`` of them, clipping all groups by one
    ``max_grad_norm``: ``out`` (float32, G + 1) ← [gscale of each group..., found_inf]. On the
    way it adds found_inf to ``skipped_steps`` (int64), writes ``last_step_skipped`` (bool),
    raises the GradScaler's ``scaler_found_inf`` (float32) to it, and advances the AdamW step
    count of every tensor of ``steps_table`` unless the step is skipped."""
    groups = out.numel() - 1
    has_steps = steps_table is not None
    T = steps_table.num_tensors if has_steps else 0
    _update_scalars_kernel[(1,)](
        partials, bounds, rows, out if grad_scale is None else grad_scale, out, skipped_steps,
        last_step_skipped, out if scaler_found_inf is None else scaler_found_inf,
        steps_table.ptrs if has_steps else bounds, T,
        f32(1.0 if max_grad_norm is None else max_grad_norm), f32(CLIP_EPS),
        GROUPS=groups, HAS_SCALE=grad_scale is not None, CLIP=max_grad_norm is not None,
        HAS_SCALER_FLAG=scaler_found_inf is not None, HAS_STEPS=has_steps,
        STEP_ROW=steps_table.row("step") if has_steps else 0,
        STEP_ITERS=finalize_iters(T) if has_steps else 1,
        ITERS=finalize_iters(widest), BLOCK=FINALIZE_BLOCK, **SMALL_LAUNCH_OPTIONS)


device_functions(globals())
