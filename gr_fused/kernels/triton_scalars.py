"""The step scalars of ``gr_fused/_scalars.py``, computed where the norms are finalized.

A GR step needs a handful of scalars between its element-wise phases: ε_t, fold and combine
after the norm of g1, and gscale, found_inf (and the skip counters, the AMP flag, AdamW's
step) after the norm of G. Computed with torch ops on 0-dim device tensors they cost about
fifteen tiny launches per step; here each half is one single-program kernel that adds the
norm's partial sums and writes them all. A GR step is then 6 launches in all (SPEC §3):
norm partials + scalars, perturb, norm partials + scalars, update.

``_scalars.py`` stays the reference: these kernels follow its operations one by one, with
torch's rounding (fp32, correctly rounded division and square root; ``c / x`` is computed as
torch computes a Python number divided by a tensor, x⁻¹·c), and the tests hold them to it
bit for bit. Every intermediate is rounded to fp32 explicitly, because the interpreter
passes scalar arguments as Python floats.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._scalars import CLIP_EPS, NORM_EPS
from .triton_common import BLOCK, LAUNCH_OPTIONS, f32
from .triton_norm import sum_partials, sq_norm_partials

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
def _update_scalars_kernel(partial_ptr, num_partials, combine_ptr, scale_ptr, out_ptr,
                           count_ptr, last_ptr, scaler_flag_ptr, step_ptr, max_norm, clip_eps,
                           HAS_SCALE: tl.constexpr, CLIP: tl.constexpr,
                           HAS_SCALER_FLAG: tl.constexpr, HAS_STEP: tl.constexpr,
                           ITERS: tl.constexpr, BLOCK: tl.constexpr):
    sq = sum_partials(partial_ptr, num_partials, ITERS, BLOCK)
    found_inf = tl.where(sq <= FP32_MAX, 0.0, 1.0).to(tl.float32)  # false for inf and NaN
    gscale = tl.load(combine_ptr).to(tl.float32)
    if HAS_SCALE:
        gscale = gscale * tl.div_rn(tl.full([], 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
    if CLIP:  # clip_grad_norm_: coef = min(max_norm / (‖g‖ + 1e-6), 1)
        total = tl.sqrt_rn(gscale * gscale * sq)
        coef = _rdiv(max_norm, (total + clip_eps).to(tl.float32))
        gscale = gscale * tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as torch.clamp
    tl.store(out_ptr, gscale)
    tl.store(out_ptr + 1, found_inf)
    tl.store(count_ptr, tl.load(count_ptr) + found_inf.to(tl.int64))
    tl.store(last_ptr, found_inf != 0)
    if HAS_SCALER_FLAG:
        tl.store(scaler_flag_ptr, tl.maximum(tl.load(scaler_flag_ptr), found_inf))
    if HAS_STEP:  # AdamW's step advances unless the step is skipped
        tl.store(step_ptr, tl.load(step_ptr) + (1.0 - found_inf))


def ascent_scalars(grad: torch.Tensor, param: Optional[torch.Tensor],
                   grad_scale: Optional[torch.Tensor], *, rho: float, normalize: bool,
                   gamma: float, alpha: Optional[float], central: bool,
                   block: int = BLOCK) -> torch.Tensor:
    """Two launches: the norm of ``grad`` (of θ·g when ``param`` is given: ASAM) and
    ``_scalars.ascent_scalars`` of it. Returns a float32 tensor [eps, fold, combine] on the
    grad's device. ``grad_scale`` is the AMP scale S (0-dim float32) or None."""
    out = torch.empty(3, dtype=torch.float32, device=grad.device)
    partials, finalize = sq_norm_partials(grad, param, block)
    _ascent_scalars_kernel[(1,)](
        partials, finalize.pop("num_partials"), out if grad_scale is None else grad_scale, out,
        f32(rho), f32(gamma), f32(0.0 if alpha is None else alpha), f32(NORM_EPS),
        HAS_SCALE=grad_scale is not None, NORMALIZE=bool(normalize),
        FIXED_ALPHA=alpha is not None, CENTRAL=bool(central), **finalize, **LAUNCH_OPTIONS)
    return out


def update_scalars(grad: torch.Tensor, combine: torch.Tensor,
                   grad_scale: Optional[torch.Tensor], *, max_grad_norm: Optional[float],
                   skipped_steps: torch.Tensor, last_step_skipped: torch.Tensor,
                   scaler_found_inf: Optional[torch.Tensor] = None,
                   adam_step: Optional[torch.Tensor] = None, block: int = BLOCK) -> torch.Tensor:
    """Two launches: the norm of G (``grad``) and ``_scalars.update_scalars`` of it for one
    param group. Returns a float32 tensor [gscale, found_inf]; on the way it adds found_inf to
    ``skipped_steps`` (int64), writes ``last_step_skipped`` (bool), raises the GradScaler's
    ``scaler_found_inf`` (float32) to it, and advances AdamW's ``adam_step`` (float32) unless
    the step is skipped. All of them 0-dim tensors on the grad's device."""
    out = torch.empty(2, dtype=torch.float32, device=grad.device)
    partials, finalize = sq_norm_partials(grad, None, block)
    _update_scalars_kernel[(1,)](
        partials, finalize.pop("num_partials"), combine,
        out if grad_scale is None else grad_scale, out, skipped_steps, last_step_skipped,
        out if scaler_found_inf is None else scaler_found_inf,
        out if adam_step is None else adam_step,
        f32(1.0 if max_grad_norm is None else max_grad_norm), f32(CLIP_EPS),
        HAS_SCALE=grad_scale is not None, CLIP=max_grad_norm is not None,
        HAS_SCALER_FLAG=scaler_found_inf is not None, HAS_STEP=adam_step is not None,
        **finalize, **LAUNCH_OPTIONS)
    return out
