"""GRSGD: finite-difference GR fused with torch.optim.SGD's update."""
from __future__ import annotations

from typing import Optional

import torch
from torch.optim.sgd import sgd as _torch_sgd

from .base import GROptimizer, check_base_hparams, resolve_gamma

_BASE_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class GRSGD(GROptimizer):
    r"""SGD (momentum, dampening, nesterov, weight decay, maximize; torch.optim.SGD's
    semantics) on the gradient-regularized loss :math:`L + (\gamma/2)\lVert\nabla L\rVert^2`.

    Each step: g1 at θ, ascent θ' = θ + ε_t·g1 with ε_t = ρ/‖g1‖ (``normalize``) or ρ,
    g2 at θ', g = (1 − α)·g1 + α·g2 with α = γ/ε_t (or the fixed ``alpha``), θ restored
    exactly, then SGD's update with g. ``rho < 0`` is the backward difference;
    ``difference="central"`` takes a third gradient. ``gamma`` defaults to 0.05, or to 0
    when a fixed ``alpha`` is given; ``gamma=0`` is torch.optim.SGD bit for bit with one
    gradient per step. ``maximize=True`` maximizes L: GR then regularizes −L (the ascent
    follows −g1 and the update ascends). ``max_grad_norm`` clips the combined g before the
    update. ``interval=k`` takes the second gradient every k-th step only and reuses a
    cached direction in between (docs/paper.md, "Cheaper GR"; one more copy of the
    parameters). Extra memory over torch.optim.SGD: one copy of the parameters (the exact
    backup of θ).
    """

    _algo = "sgd"

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 gamma: Optional[float] = None, rho: float = 0.05, normalize: bool = True,
                 difference: str = "forward", alpha: Optional[float] = None,
                 adaptive: bool = False, max_grad_norm: Optional[float] = None,
                 interval: int = 1, reuse_scale: float = 0.7, maximize: bool = False,
                 backend: str = "auto", freeze_bn_stats: bool = True,
                 foreach: Optional[bool] = None):
        base = check_base_hparams(torch.optim.SGD, lr=lr, momentum=momentum,
                                  dampening=dampening, weight_decay=weight_decay,
                                  nesterov=nesterov, maximize=maximize, foreach=foreach)
        defaults = dict(base, gamma=resolve_gamma(gamma, alpha), rho=rho, normalize=normalize,
                        difference=difference, alpha=alpha, adaptive=adaptive,
                        max_grad_norm=max_grad_norm, interval=interval, reuse_scale=reuse_scale)
        super().__init__(params, defaults, backend=backend, freeze_bn_stats=freeze_bn_stats)

    def _check_group(self, group):
        check_base_hparams(torch.optim.SGD, **{k: group[k] for k in _BASE_KEYS})

    def _plain_step(self) -> None:
        if not self._plain_prepare():
            return
        for group in self.param_groups:
            params, grads = self._plain_grads(group)
            if not params:
                continue
            momentum = group["momentum"]
            bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum else \
                [None] * len(params)
            _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"],
                       momentum=momentum, lr=group["lr"], dampening=group["dampening"],
                       nesterov=group["nesterov"], maximize=group["maximize"],
                       has_sparse_grad=False, foreach=group["foreach"], fused=None)
            if momentum != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
