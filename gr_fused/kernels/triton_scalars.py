"""The step scalars of ``gr_fused/_scalars.py``, computed where the norms are finalized.

A GR step needs a handful of scalars between its element-wise phases: ε_t, fold and combine
after the norm of g1, and gscale, found_inf (and the skip counters, the AMP flag, AdamW's
step counts) after the norm of G. Computed with torch ops on 0-dim device tensors they cost
about fifteen tiny launches per step per param group; here they come out of the one-program
kernels that add the norms' partial sums. With one param group and one table a GR step is
then 6 launches in all: norm partials, ascent finalize, perturb, norm partials, update
finalize, update. With G groups in K tables: K partials, G ascent finalizes, K perturbs, K
partials, one update finalize for all groups, K updates (4K + G + 1).

With interval=k the update finalize of a refresh also computes ``direction_scalars`` (the
norm pass then writes three planes of partials: Σ G², Σ G·g1, Σ g1²) and whether there is a
direction; a step in between runs ``_reuse_scalars_kernel`` (``reuse_scalars``, the skip
records, AdamW's steps) over the planes Σ g1², Σ g1·v̂, Σ v̂². Those scalars are float64
until the end, as _scalars.py computes them (its operation order; the combine signs and
reuse_scales come in a float64 device tensor), each rounded once to fp32. Each group's sums
stay in a small register vector between the passes over the groups.

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
from .triton_common import (DIRECTION_TOL, F64_MAX, FINALIZE_BLOCK, SMALL_LAUNCH_OPTIONS,
                            advance_steps, device_functions, f32, finalize_iters,
                            sum_partial_range)


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


@triton.jit
def _record_skip(found_inf, count_ptr, last_ptr, scaler_flag_ptr, ptrs_ptr, T,
                 HAS_SCALER_FLAG: tl.constexpr, HAS_STEPS: tl.constexpr, STEP_ROW: tl.constexpr,
                 STEP_ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """The skip records (SkipRecord: count, last, the GradScaler's flag) and AdamW's step
    counts, which advance unless the step is skipped."""
    tl.store(count_ptr, tl.load(count_ptr) + found_inf.to(tl.int64))
    tl.store(last_ptr, found_inf != 0)
    if HAS_SCALER_FLAG:
        tl.store(scaler_flag_ptr, tl.maximum(tl.load(scaler_flag_ptr), found_inf))
    if HAS_STEPS:
        advance_steps(ptrs_ptr, T, 1.0 - found_inf, STEP_ROW, STEP_ITERS, BLOCK)


@triton.jit
def _pick(values, lanes, g):
    """Entry g of a small vector of per-group values (the others are 0)."""
    return tl.sum(tl.where(lanes == g, values, 0.0), axis=0)


@triton.jit
def _direction_coefficients(rows_ptr, hp_ptr, g, scale64):
    """A_g = combine_g/S and B_g = sign_g/S of ``direction_scalars``, in float64."""
    A = tl.load(rows_ptr + 3 * g + 2).to(tl.float32).to(tl.float64) * scale64
    B = tl.load(hp_ptr + g) * scale64
    return A, B


@triton.jit(do_not_specialize=["T", "stride"], do_not_specialize_on_alignment=[
    "rows_ptr", "scale_ptr", "out_ptr", "count_ptr", "last_ptr", "scaler_flag_ptr", "ptrs_ptr",
    "hp_ptr", "valid_ptr"])
def _update_scalars_kernel(partial_ptr, bounds_ptr, rows_ptr, scale_ptr, out_ptr, count_ptr,
                           last_ptr, scaler_flag_ptr, ptrs_ptr, T, max_norm, clip_eps, stride,
                           hp_ptr, valid_ptr, GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
                           CLIP: tl.constexpr, HAS_SCALER_FLAG: tl.constexpr,
                           HAS_STEPS: tl.constexpr, STEP_ROW: tl.constexpr,
                           STEP_ITERS: tl.constexpr, DIRECTION: tl.constexpr, GP: tl.constexpr,
                           ITERS: tl.constexpr, BLOCK: tl.constexpr):
    # group g's partials are partials[bounds[g]:bounds[g + 1]]; its combine is rows[g, 2].
    # DIRECTION (an interval=k refresh): planes 1 and 2 of the partials (at stride, 2·stride)
    # hold Σ G·g1 and Σ g1², hp[g] is the group's combine sign, and the direction
    # coefficients (a_g, c_g) go to out[G + 1 + g], out[2G + 1 + g], whether there is a
    # direction, (1 − found_inf)·ok, to valid.
    inv_scale = _inv_scale(scale_ptr, HAS_SCALE)
    scale64 = inv_scale.to(tl.float64)
    total = tl.zeros([], tl.float64)       # Σ_g ‖G_g‖², for found_inf
    clip_total = tl.zeros([], tl.float64)  # Σ_g gscale_g²·‖G_g‖² = ‖g‖², for clipping
    lanes = tl.arange(0, GP)
    T0 = tl.zeros([GP], tl.float64)
    T1 = tl.zeros([GP], tl.float64)
    T2 = tl.zeros([GP], tl.float64)
    P = tl.zeros([], tl.float64)           # Σ_g A_g·B_g·Σ G·g1
    Q = tl.zeros([], tl.float64)           # Σ_g B_g²·Σ g1²
    for g in tl.static_range(GROUPS):
        lo, hi = tl.load(bounds_ptr + g), tl.load(bounds_ptr + g + 1)
        sq = sum_partial_range(partial_ptr, lo, hi, ITERS, BLOCK)
        gscale = _group_gscale(rows_ptr, g, inv_scale, HAS_SCALE)
        total = total + sq
        weight = gscale.to(tl.float64)
        clip_total = clip_total + weight * weight * sq
        if not CLIP:
            tl.store(out_ptr + g, gscale)
        if DIRECTION:
            s1 = sum_partial_range(partial_ptr + stride, lo, hi, ITERS, BLOCK)
            s2 = sum_partial_range(partial_ptr + 2 * stride, lo, hi, ITERS, BLOCK)
            A, B = _direction_coefficients(rows_ptr, hp_ptr, g, scale64)
            P = P + A * B * s1
            Q = Q + B * B * s2
            T0 = tl.where(lanes == g, sq, T0)
            T1 = tl.where(lanes == g, s1, T1)
            T2 = tl.where(lanes == g, s2, T2)
    # 1 when the sum is inf or NaN (NaN compares false)
    found_inf = tl.where(total <= F64_MAX, 0.0, 1.0).to(tl.float32)
    if CLIP:  # clip_grad_norm_ over all groups: coef = min(max_norm / (‖g‖ + 1e-6), 1)
        norm = tl.sqrt(clip_total).to(tl.float32)
        coef = _rdiv(max_norm, (norm + clip_eps).to(tl.float32))
        coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as torch.clamp
        for g in tl.static_range(GROUPS):
            tl.store(out_ptr + g, _group_gscale(rows_ptr, g, inv_scale, HAS_SCALE) * coef)
    tl.store(out_ptr + GROUPS, found_inf)
    if DIRECTION:  # _scalars.direction_scalars, operation by operation
        beta = tl.where(Q > 0, P / Q, 0.0)
        v2 = tl.zeros([], tl.float64)
        g2 = tl.zeros([], tl.float64)
        for g in tl.static_range(GROUPS):
            A, B = _direction_coefficients(rows_ptr, hp_ptr, g, scale64)
            t0, t1, t2 = _pick(T0, lanes, g), _pick(T1, lanes, g), _pick(T2, lanes, g)
            v2 = v2 + (A * A * t0 - 2.0 * beta * A * B * t1 + beta * beta * B * B * t2)
            g2 = g2 + A * A * t0
        ok = (v2 > DIRECTION_TOL * g2) & (v2 <= F64_MAX)
        tiny = tl.full([], 1e-300, tl.float64)
        inv_norm = tl.where(ok, 1.0 / tl.sqrt(tl.maximum(v2, tiny)), 0.0)
        for g in tl.static_range(GROUPS):
            A, B = _direction_coefficients(rows_ptr, hp_ptr, g, scale64)
            tl.store(out_ptr + GROUPS + 1 + g, (A * inv_norm).to(tl.float32))
            tl.store(out_ptr + 2 * GROUPS + 1 + g, (-beta * B * inv_norm).to(tl.float32))
        tl.store(valid_ptr, (1.0 - found_inf) * ok.to(tl.float32))
    _record_skip(found_inf, count_ptr, last_ptr, scaler_flag_ptr, ptrs_ptr, T, HAS_SCALER_FLAG,
                 HAS_STEPS, STEP_ROW, STEP_ITERS, BLOCK)


@triton.jit(do_not_specialize=["T", "stride"], do_not_specialize_on_alignment=[
    "scale_ptr", "valid_ptr", "out_ptr", "count_ptr", "last_ptr", "scaler_flag_ptr",
    "ptrs_ptr", "hp_ptr"])
def _reuse_scalars_kernel(partial_ptr, bounds_ptr, stride, hp_ptr, scale_ptr, valid_ptr,
                          out_ptr, count_ptr, last_ptr, scaler_flag_ptr, ptrs_ptr, T, max_norm,
                          clip_eps, GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
                          CLIP: tl.constexpr, HAS_SCALER_FLAG: tl.constexpr,
                          HAS_STEPS: tl.constexpr, STEP_ROW: tl.constexpr,
                          STEP_ITERS: tl.constexpr, GP: tl.constexpr, ITERS: tl.constexpr,
                          BLOCK: tl.constexpr):
    # _scalars.reuse_scalars, operation by operation: the three planes of the partials hold
    # Σ g1², Σ g1·v̂, Σ v̂² (group g's range bounds[g]:bounds[g + 1]); hp holds each group's
    # combine sign, then its reuse_scale; out ← [u_g..., found_inf, v_g...]
    scale64 = _inv_scale(scale_ptr, HAS_SCALE).to(tl.float64)
    lanes = tl.arange(0, GP)
    T0 = tl.zeros([GP], tl.float64)
    T1 = tl.zeros([GP], tl.float64)
    T2 = tl.zeros([GP], tl.float64)
    total_sq = tl.zeros([], tl.float64)
    for g in tl.static_range(GROUPS):
        lo, hi = tl.load(bounds_ptr + g), tl.load(bounds_ptr + g + 1)
        t0 = sum_partial_range(partial_ptr, lo, hi, ITERS, BLOCK)
        total_sq = total_sq + t0
        T0 = tl.where(lanes == g, t0, T0)
        T1 = tl.where(lanes == g, sum_partial_range(partial_ptr + stride, lo, hi, ITERS, BLOCK),
                      T1)
        T2 = tl.where(lanes == g,
                      sum_partial_range(partial_ptr + 2 * stride, lo, hi, ITERS, BLOCK), T2)
    found_inf = tl.where(total_sq <= F64_MAX, 0.0, 1.0).to(tl.float32)
    norm = tl.sqrt(total_sq) * scale64
    valid = tl.load(valid_ptr).to(tl.float64)
    coef = tl.full([], 1.0, tl.float64)
    if CLIP:  # clip_grad_norm_ over all groups: ‖g‖² = Σ u²·Σg1² + 2uv·Σg1·v̂ + v²·Σv̂²
        g_sq = tl.zeros([], tl.float64)
        for g in tl.static_range(GROUPS):
            u = tl.load(hp_ptr + g) * scale64
            v = tl.load(hp_ptr + GROUPS + g) * norm * valid
            t0, t1, t2 = _pick(T0, lanes, g), _pick(T1, lanes, g), _pick(T2, lanes, g)
            g_sq = g_sq + (u * u * t0 + 2.0 * u * v * t1 + v * v * t2)
        total = tl.sqrt(g_sq).to(tl.float32)
        clip = _rdiv(max_norm, (total + clip_eps).to(tl.float32))
        coef = tl.where(clip > 1.0, 1.0, clip).to(tl.float64)  # NaN stays NaN, as torch.clamp
    for g in tl.static_range(GROUPS):
        u = tl.load(hp_ptr + g) * scale64
        v = tl.load(hp_ptr + GROUPS + g) * norm * valid
        tl.store(out_ptr + g, (u * coef).to(tl.float32))
        tl.store(out_ptr + GROUPS + 1 + g, (v * coef).to(tl.float32))
    tl.store(out_ptr + GROUPS, found_inf)
    _record_skip(found_inf, count_ptr, last_ptr, scaler_flag_ptr, ptrs_ptr, T, HAS_SCALER_FLAG,
                 HAS_STEPS, STEP_ROW, STEP_ITERS, BLOCK)


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


def _lanes(groups: int) -> int:
    """The width of a finalize's per-group vectors: a power of two, at least 2."""
    return max(2, triton.next_power_of_2(groups))


def update_finalize(partials: torch.Tensor, bounds: torch.Tensor, widest: int, rows: torch.Tensor,
                    grad_scale: Optional[torch.Tensor], out: torch.Tensor, *,
                    max_grad_norm: Optional[float], skipped_steps: torch.Tensor,
                    last_step_skipped: torch.Tensor,
                    scaler_found_inf: Optional[torch.Tensor] = None, steps_table=None,
                    direction: Optional[tuple] = None) -> None:
    """One launch: the norms of G of each of the G groups (group g's partial sums are
    ``partials[bounds[g]:bounds[g + 1]]``, ``bounds`` an int64 device tensor, at most
    ``widest`` of them) and ``_scalars.update_scalars`` of them, clipping all groups by one
    ``max_grad_norm``: ``out`` (float32) ← [gscale of each group..., found_inf]. On the
    way it adds found_inf to ``skipped_steps`` (int64), writes ``last_step_skipped`` (bool),
    raises the GradScaler's ``scaler_found_inf`` (float32) to it, and advances the AdamW step
    count of every tensor of ``steps_table`` unless the step is skipped.

    ``direction = (stride, signs, valid)``, an interval=k refresh: the partials hold two more
    planes (Σ G·g1 at ``stride``, Σ g1² at 2·stride), ``signs`` (float64, G) each group's
    combine sign; ``_scalars.direction_scalars`` of them go to ``out`` after found_inf (the
    a of each group, then the c of each; ``out`` has 3G + 1 entries) and
    (1 − found_inf)·ok to ``valid`` (0-dim float32)."""
    has_direction = direction is not None
    groups = (out.numel() - 1) // (3 if has_direction else 1)
    stride, signs, valid = direction if has_direction else (0, out, out)
    has_steps = steps_table is not None
    T = steps_table.num_tensors if has_steps else 0
    _update_scalars_kernel[(1,)](
        partials, bounds, rows, out if grad_scale is None else grad_scale, out, skipped_steps,
        last_step_skipped, out if scaler_found_inf is None else scaler_found_inf,
        steps_table.ptrs if has_steps else bounds, T,
        f32(1.0 if max_grad_norm is None else max_grad_norm), f32(CLIP_EPS), stride, signs,
        valid, GROUPS=groups, HAS_SCALE=grad_scale is not None, CLIP=max_grad_norm is not None,
        HAS_SCALER_FLAG=scaler_found_inf is not None, HAS_STEPS=has_steps,
        STEP_ROW=steps_table.row("step") if has_steps else 0,
        STEP_ITERS=finalize_iters(T) if has_steps else 1, DIRECTION=has_direction,
        GP=_lanes(groups), ITERS=finalize_iters(widest), BLOCK=FINALIZE_BLOCK,
        **SMALL_LAUNCH_OPTIONS)


def reuse_finalize(partials: torch.Tensor, bounds: torch.Tensor, widest: int, stride: int,
                   hparams: torch.Tensor, grad_scale: Optional[torch.Tensor],
                   valid: torch.Tensor, out: torch.Tensor, *, max_grad_norm: Optional[float],
                   skipped_steps: torch.Tensor, last_step_skipped: torch.Tensor,
                   scaler_found_inf: Optional[torch.Tensor] = None, steps_table=None) -> None:
    """One launch, an interval=k step between refreshes: from the three planes of partial
    sums [Σ g1², Σ g1·v̂, Σ v̂²] (plane k at k·``stride``, group g's range
    ``bounds[g]:bounds[g + 1]``), ``hparams`` (float64: each group's combine sign, then its
    reuse_scale) and ``valid`` (0-dim: 1. when a direction is cached),
    ``_scalars.reuse_scalars`` with one ``max_grad_norm`` for all groups: ``out`` (float32,
    2G + 1) ← [u of each group..., found_inf, v of each group...]; the skip records and AdamW's
    step counts (``steps_table``) as :func:`update_finalize`."""
    groups = (out.numel() - 1) // 2
    has_steps = steps_table is not None
    T = steps_table.num_tensors if has_steps else 0
    _reuse_scalars_kernel[(1,)](
        partials, bounds, stride, hparams, out if grad_scale is None else grad_scale, valid, out,
        skipped_steps, last_step_skipped, out if scaler_found_inf is None else scaler_found_inf,
        steps_table.ptrs if has_steps else bounds, T,
        f32(1.0 if max_grad_norm is None else max_grad_norm), f32(CLIP_EPS), GROUPS=groups,
        HAS_SCALE=grad_scale is not None, CLIP=max_grad_norm is not None,
        HAS_SCALER_FLAG=scaler_found_inf is not None, HAS_STEPS=has_steps,
        STEP_ROW=steps_table.row("step") if has_steps else 0,
        STEP_ITERS=finalize_iters(T) if has_steps else 1, GP=_lanes(groups),
        ITERS=finalize_iters(widest), BLOCK=FINALIZE_BLOCK, **SMALL_LAUNCH_OPTIONS)


device_functions(globals())
