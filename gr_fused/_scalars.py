"""The step scalars of SPEC §1, computed once per step on the device (no host sync).

These few lines are the single source of truth for ε_t, α and the coefficients that every
backend receives; the backends only apply them element-wise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

NORM_EPS = 1e-12   # ε_t = ρ / (‖g1‖ + 1e-12)
CLIP_EPS = 1e-6    # as torch.nn.utils.clip_grad_norm_


def ascent_scalars(sq_norm: torch.Tensor, inv_scale: Optional[torch.Tensor], *, rho: float,
                   normalize: bool, gamma: float, alpha: Optional[float], difference: str
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From Σg1² (of the possibly AMP-scaled gradient) return ``(eps, fold, combine)``.

    ``eps`` is ε_t divided by the AMP scale, so that θ + eps·(scaled g1) = θ + ε_t·g1.
    ``fold`` multiplies g1 in the grad buffer before the second backward accumulates onto it,
    and ``combine`` multiplies the accumulated buffer G afterwards:
      forward/backward:  G = fold·g1 + g2,                 g = combine·G = (1−α)·g1 + α·g2
      central:           G = −(fold·g1 + g2⁺) + g2⁻,        g = g1 + (α/2)·(g2⁺ − g2⁻)
    with α = γ/ε_t, or the fixed ``alpha``.
    """
    norm = sq_norm.sqrt()
    if inv_scale is not None:
        norm = norm * inv_scale
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
        eps = eps * inv_scale
    return eps, fold, combine


def update_scalars(sq_norm_G: torch.Tensor, combine: torch.Tensor,
                   inv_scale: Optional[torch.Tensor], max_grad_norm: Optional[float]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """From ΣG² return ``(gscale, found_inf)``: g = gscale·G is the combined, unscaled and
    clipped gradient; ``found_inf`` (0./1.) is set when G has an inf or NaN anywhere."""
    found_inf = (~torch.isfinite(sq_norm_G)).to(sq_norm_G.dtype)
    gscale = combine if inv_scale is None else combine * inv_scale
    if max_grad_norm is not None:
        total = gscale.abs() * sq_norm_G.sqrt()
        gscale = gscale * torch.clamp(max_grad_norm / (total + CLIP_EPS), max=1.0)
    return gscale, found_inf
