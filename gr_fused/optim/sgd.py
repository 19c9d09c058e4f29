"""GRSGD: finite-difference GR fused with torch.optim.SGD's update."""
from __future__ import annotations

from typing import Optional

from torch.optim.sgd import sgd as _torch_sgd

from .base import GR_DEFAULTS, GROptimizer, check_lr


class GRSGD(GROptimizer):
    r"""SGD (momentum, dampening, nesterov, weight decay; torch.optim.SGD's semantics) on the
    gradient-regularized loss :math:`L + (\gamma/2)\lVert\nabla L\rVert^2`.

    Each step: g1 at θ, ascent θ' = θ + ε_t·g1 with ε_t = ρ/‖g1‖ (``normalize``) or ρ,
    g2 at θ', g = (1 − α)·g1 + α·g2 with α = γ/ε_t (or the fixed ``alpha``), θ restored
    exactly, then SGD's update with g. ``rho < 0`` is the backward difference;
    ``difference="central"`` takes a third gradient. ``gamma=0`` is torch.optim.SGD bit for
    bit with one gradient per step. ``max_grad_norm`` clips the combined g before the update.
    Extra memory over torch.optim.SGD: one copy of the parameters (the exact backup of θ).
    """

    _algo = "sgd"

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 gamma: float = GR_DEFAULTS["gamma"], rho: float = GR_DEFAULTS["rho"],
                 normalize: bool = True, difference: str = "forward",
                 alpha: Optional[float] = None, adaptive: bool = False,
                 max_grad_norm: Optional[float] = None, backend: str = "auto",
                 freeze_bn_stats: bool = True, foreach: Optional[bool] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, gamma=gamma, rho=rho,
                        normalize=normalize, difference=difference, alpha=alpha,
                        adaptive=adaptive, max_grad_norm=max_grad_norm, foreach=foreach,
                        maximize=False, differentiable=False, fused=None)
        self._check_group(defaults)
        super().__init__(params, defaults, backend=backend, freeze_bn_stats=freeze_bn_stats)

    def _check_group(self, group):
        check_lr(group["lr"])
        if group["momentum"] < 0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum and zero dampening")

    def _plain_step(self) -> None:
        if not self._plain_prepare():
            return
        for group in self.param_groups:
            params, grads = self._plain_grads(group)
            if not params:
                continue
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"],
                       momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                       nesterov=group["nesterov"], maximize=False, has_sparse_grad=False,
                       foreach=group["foreach"], fused=None)
            if group["momentum"] != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
