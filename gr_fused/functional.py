"""Functional finite differences of gradients, outside any optimizer.

``fd_penalty_grad`` is the FD estimate of ∇(½‖∇L‖²) = H∇L alone, which the optimizers'
(1 − α)·g1 + α·g2 form cannot express (it is the α → ∞ limit); the flooding example uses it.
``fd_gr_grad`` is the full GR gradient g1 + γ·H g1. Both leave the parameters exactly as they
found them, also when ``loss_fn`` raises.

``loss_fn`` is a function of no arguments that runs the forward pass at the parameters'
current values and returns the scalar loss; ``params`` are leaf tensors that require grad
(e.g. ``list(model.parameters())``). Results are lists of tensors shaped like ``params``::

    from gr_fused.functional import fd_penalty_grad
    params = list(model.parameters())
    loss_fn = lambda: F.cross_entropy(model(x), y)
    hg = fd_penalty_grad(loss_fn, params, eps=0.01)   # ≈ H(θ)∇L(θ) = ∇(½‖∇L‖²)
    with torch.no_grad():                              # a descent step on ½‖∇L‖² alone
        for p, h in zip(params, hg):
            p.sub_(h, alpha=lr)

Flooding (Ishida et al. 2020) trains on ``flooded(L, b)`` = |L − b| + b. With learning rate
η, an ascent step (L < b) followed by a descent step (L ≥ b) equals, up to rounding,
θ ← θ − η²·fd_penalty_grad(loss_fn, params, eps=η) (paper, Section 5; examples/flooding.py).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from ._scalars import NORM_EPS

LossFn = Callable[[], torch.Tensor]

__all__ = ["gradient", "global_norm", "fd_penalty_grad", "fd_gr_grad", "flooded"]


def gradient(loss_fn: LossFn, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """∇L at the current parameters (zeros for params the loss does not use)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the tensors together, as a float64 0-dim tensor."""
    return torch.stack([t.double().pow(2).sum() for t in tensors]).sum().sqrt()


@torch.no_grad()
def _grad_at(loss_fn: LossFn, params, direction, step: float) -> List[torch.Tensor]:
    backup = [p.detach().clone() for p in params]
    try:
        for p, d in zip(params, direction):
            p.add_(d, alpha=step)
        return gradient(loss_fn, params)
    finally:
        for p, b in zip(params, backup):
            p.copy_(b)


def fd_penalty_grad(loss_fn: LossFn, params: Sequence[torch.Tensor], eps: float,
                    difference: str = "forward", g1: Sequence[torch.Tensor] = None
                    ) -> List[torch.Tensor]:
    """Finite-difference H·g1 ≈ ∇(½‖∇L‖²) with step ``eps`` along g1 = ∇L(θ):
    forward (∇L(θ+εg1) − g1)/ε, or central (∇L(θ+εg1) − ∇L(θ−εg1))/(2ε).
    A negative ``eps`` is the backward difference.

    ``eps`` is used as given (not divided by ‖g1‖). Pass ``g1`` when ∇L(θ) is already
    known to save one gradient. The parameters are moved in place to θ ± ε·g1 for the
    extra gradients and copied back bit for bit. Cost: 2 gradients (forward/backward) or
    3 (central), 1 fewer with ``g1``."""
    if eps == 0:
        raise ValueError("Invalid eps: 0 (a nonzero finite-difference step)")
    params = list(params)
    g1 = gradient(loss_fn, params) if g1 is None else list(g1)
    plus = _grad_at(loss_fn, params, g1, eps)
    if difference == "forward":
        return [(a - b) / eps for a, b in zip(plus, g1)]
    if difference == "central":
        minus = _grad_at(loss_fn, params, g1, -eps)
        return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
    raise ValueError(f"Invalid difference: {difference!r} (forward or central)")


def fd_gr_grad(loss_fn: LossFn, params: Sequence[torch.Tensor], gamma: float, rho: float,
               normalize: bool = True, difference: str = "forward") -> List[torch.Tensor]:
    """The FD-GR gradient g1 + γ·H g1 of docs/design.md §1 with ε = ρ/(‖g1‖ + 1e-12) (``normalize``)
    or ε = ρ. Equal to what the optimizers combine, computed out of place."""
    params = list(params)
    g1 = gradient(loss_fn, params)
    eps = rho / (float(global_norm(g1)) + NORM_EPS) if normalize else rho
    hg = fd_penalty_grad(loss_fn, params, eps, difference, g1=g1)
    return [a + gamma * h for a, h in zip(g1, hg)]


def flooded(loss: torch.Tensor, b: float) -> torch.Tensor:
    """The flooding objective |L − b| + b of Ishida et al. (2020): descent on L while L > b,
    ascent while L < b (its gradient is sign(L − b)·∇L)."""
    return (loss - b).abs() + b
