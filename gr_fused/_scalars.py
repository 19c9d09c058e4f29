"""The step scalars of a GR step (docs/design.md), computed once per step on the device (no
host sync).

These few lines are the single source of truth for ε_t, α and the coefficients that every
backend receives; the backends only apply them element-wise. The fused kernels compute the
same operations where they finalize their norms (kernels/triton_scalars.py, csrc/grf_math.h)
and are tested against these.

Squared norms arrive as float64 sums (of float64 squares), so they neither overflow nor
lose the size of a huge but finite gradient: an fp32 gradient of 1e20 per element has a
squared norm of about 1e40·n, which float64 holds. Each norm is the float64 square root of
its sum, rounded once to the compute dtype. A step is skipped (``found_inf``) exactly when
a sum is not finite, i.e. when an element of G is inf or NaN (for float64 parameters also
when the sum of squares passes 1.8e308).

With ``interval=k`` two more sets of scalars: ``direction_scalars`` at a refresh (the cached
direction's coefficients) and ``reuse_scalars`` at the steps in between.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

NORM_EPS = 1e-12   # ε_t = ρ / (‖g1‖ + 1e-12)
CLIP_EPS = 1e-6    # as torch.nn.utils.clip_grad_norm_
DIRECTION_TOL = 2.0 ** -23  # interval=k: ‖v‖² ≤ this·‖g‖² is no direction (fp32's eps)


def ascent_scalars(sq_norm: torch.Tensor, inv_scale: Optional[torch.Tensor], *, rho: float,
                   normalize: bool, gamma: float, alpha: Optional[float], difference: str,
                   dtype: torch.dtype = torch.float32
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From Σg1² (float64; of the possibly AMP-scaled gradient) return ``(eps, fold,
    combine)`` in the compute ``dtype``.

    ``eps`` is ε_t divided by the AMP scale, so that θ + eps·(scaled g1) = θ + ε_t·g1.
    ``fold`` multiplies g1 in the grad buffer before the second backward accumulates onto it,
    and ``combine`` multiplies the accumulated buffer G afterwards:
      forward/backward:  G = fold·g1 + g2,                 g = combine·G = (1−α)·g1 + α·g2
      central:           G = −(fold·g1 + g2⁺) + g2⁻,        g = g1 + (α/2)·(g2⁺ − g2⁻)
    with α = γ/ε_t, or the fixed ``alpha``.
    """
    norm = sq_norm.double().sqrt().to(dtype)
    if inv_scale is not None:
        norm = norm * inv_scale.to(dtype)
    if normalize:
        eps = rho / (norm + NORM_EPS)
    else:
        eps = torch.full_like(norm, rho)
    a = torch.full_like(eps, alpha) if alpha is not None else gamma / eps
    if difference == "central":
        fold, combine = 2.0 / a, -0.5 * a
    else:
        fold, combine = (1.0 - a) / a, a
    if inv_scale is not None:
        eps = eps * inv_scale.to(dtype)
    return eps, fold, combine


def update_scalars(sq_norms_G: List[torch.Tensor], combines: List[torch.Tensor],
                   inv_scale: Optional[torch.Tensor], max_grad_norms: List[Optional[float]]
                   ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """From ΣG² of each param group (float64) return ``(gscales, found_inf)`` in the dtype of
    ``combines``: g = gscale·G is each group's combined, unscaled and clipped gradient;
    ``found_inf`` (0./1.) is set when G has an inf or NaN anywhere. Clipping follows
    clip_grad_norm_ over the global norm of g, ‖g‖² = Σ gscale²·‖G‖² summed in float64."""
    dtype = combines[0].dtype
    sq = torch.stack([s.double() for s in sq_norms_G])
    found_inf = (~torch.isfinite(sq.sum())).to(dtype)
    gscales = [c if inv_scale is None else c * inv_scale.to(dtype) for c in combines]
    if any(m is not None for m in max_grad_norms):
        weights = torch.stack([s.double() for s in gscales])
        total = (weights * weights * sq).sum().sqrt().to(dtype)
        gscales = [s if m is None else s * torch.clamp(m / (total + CLIP_EPS), max=1.0)
                   for s, m in zip(gscales, max_grad_norms)]
    return gscales, found_inf


# ------------------------------------------------------------------ interval=k
def direction_scalars(sums: List[torch.Tensor], combines: List[torch.Tensor],
                      combine_signs: List[float], inv: Optional[torch.Tensor]):
    """interval=k, at a refresh: the coefficients (a_g, c_g) of each group with which the
    update caches v̂ = a·G + c·g1 (g1 saved by perturb in the direction state), the unit
    vector along the component of the combined gradient g orthogonal to g1, over every
    group; and whether there is one (1., or 0. when g is parallel to g1: ‖v‖² ≤
    DIRECTION_TOL·‖g‖², a sine below 3.5e-4, is rounding).
    ``sums[g]`` = [Σ G², Σ G·g1, Σ g1²] (float64, scaled by the AMP scale S like the grads).
    In the frame of the update, g = A_g·G with A_g = combine_g/S and g1 = B_g·(saved g1)
    with B_g = sign_g/S, so v = g − β·g1 with β = (g·g1)/‖g1‖² has
    ‖v‖² = Σ_g A_g²·ΣG² − 2β·A_g·B_g·ΣGg1 + β²·B_g²·Σg1²."""
    scale = 1.0 if inv is None else inv.double()
    A = [c.double() * scale for c in combines]
    B = [s * scale if inv is not None else torch.full_like(A[0], s) for s in combine_signs]
    P = sum(a * b * t[1] for a, b, t in zip(A, B, sums))
    Q = sum(b * b * t[2] for b, t in zip(B, sums))
    beta = torch.where(Q > 0, P / Q, torch.zeros_like(P))
    v2 = sum(a * a * t[0] - 2 * beta * a * b * t[1] + beta * beta * b * b * t[2]
             for a, b, t in zip(A, B, sums))
    g2 = sum(a * a * t[0] for a, t in zip(A, sums))
    dtype = combines[0].dtype
    # below DIRECTION_TOL·‖g‖², ‖v‖² is rounding (of G and g1 in the compute dtype, of the
    # float64 sums), not a direction
    ok = torch.isfinite(v2) & (v2 > DIRECTION_TOL * g2)
    inv_norm = torch.where(ok, v2.clamp_min(1e-300).rsqrt(), torch.zeros_like(v2))
    coefs = [((a * inv_norm).to(dtype), (-beta * b * inv_norm).to(dtype)) for a, b in zip(A, B)]
    return coefs, ok.to(dtype)


def reuse_scalars(sums: List[torch.Tensor], grs: List[dict], inv: Optional[torch.Tensor],
                  valid: torch.Tensor):
    """interval=k, between refreshes: each group's (u, v) with g = u·g1 + v·v̂, and
    found_inf. ``sums[g]`` = [Σ g1², Σ g1·v̂, Σ v̂²] (g1 scaled by the AMP scale S);
    u = sign/S, v = reuse_scale·‖g1‖·valid with ‖g1‖ the global unscaled norm; clipping
    (clip_grad_norm_ over all groups) scales both by one factor."""
    dtype = valid.dtype
    scale = torch.ones((), dtype=torch.float64, device=valid.device) if inv is None else inv.double()
    total_sq = sum(t[0] for t in sums)
    found_inf = (~torch.isfinite(total_sq)).to(dtype)
    norm = total_sq.sqrt() * scale
    u = [gr["combine_sign"] * scale for gr in grs]
    v = [gr["reuse_scale"] * norm * valid.double() for gr in grs]
    limits = [gr["max_grad_norm"] for gr in grs]
    if any(m is not None for m in limits):
        g_sq = sum(a * a * t[0] + 2 * a * b * t[1] + b * b * t[2] for a, b, t in zip(u, v, sums))
        total = g_sq.sqrt().to(dtype)
        coefs = [torch.ones((), dtype=dtype, device=valid.device) if m is None
                 else torch.clamp(m / (total + CLIP_EPS), max=1.0) for m in limits]
        u = [a * c for a, c in zip(u, coefs)]
        v = [b * c for b, c in zip(v, coefs)]
    return [(a.to(dtype), b.to(dtype)) for a, b in zip(u, v)], found_inf
