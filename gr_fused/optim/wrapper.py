"""GR around any torch optimizer, and the SAM and GNP presets."""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch.optim import Optimizer

from .base import GR_DEFAULTS, GROptimizer


class GR(GROptimizer):
    """Finite-difference GR around any ``torch.optim`` optimizer class.

    The backend combines the two gradients into ``p.grad`` and restores θ; then
    ``base_optimizer.step()`` runs unchanged. The param groups are shared with the base
    optimizer (so LR schedulers may be attached to either) and ``state_dict`` is the base
    optimizer's. A step that found inf/NaN is skipped: without a host sync when the base
    optimizer takes a device-side ``found_inf`` (torch's ``fused=True`` optimizers), with one
    ``.item()`` otherwise.
    """

    def __init__(self, params, base_optimizer: Type[Optimizer] = torch.optim.SGD, *,
                 gamma: float = GR_DEFAULTS["gamma"], rho: float = GR_DEFAULTS["rho"],
                 normalize: bool = True, difference: str = "forward",
                 alpha: Optional[float] = None, adaptive: bool = False,
                 max_grad_norm: Optional[float] = None, backend: str = "auto",
                 freeze_bn_stats: bool = True, **base_kwargs):
        if isinstance(base_optimizer, Optimizer) or not callable(base_optimizer):
            raise ValueError("Invalid base_optimizer: pass the optimizer class (e.g. "
                             "torch.optim.SGD) and its arguments as keywords")
        defaults = dict(gamma=gamma, rho=rho, normalize=normalize, difference=difference,
                        alpha=alpha, adaptive=adaptive, max_grad_norm=max_grad_norm)
        super().__init__(params, dict(defaults, **base_kwargs), backend=backend,
                         freeze_bn_stats=freeze_bn_stats)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _plain_step(self) -> None:
        if self._plain_prepare():
            self.base_optimizer.step()

    def _after_update(self, found_inf: torch.Tensor) -> None:
        base = self.base_optimizer
        if getattr(base, "_step_supports_amp_scaling", False) and any(
                g.get("fused") for g in base.param_groups):
            base.grad_scale, base.found_inf = None, found_inf
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
        elif not bool(found_inf.item()):
            base.step()

    def state_dict(self):
        super().state_dict()  # refuses to save in the middle of a GR step
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._cached_buckets = None
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for k, v in GR_DEFAULTS.items():
                group.setdefault(k, v)

    def add_param_group(self, param_group) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:  # called from Optimizer.__init__
            return super().add_param_group(param_group)
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        base.add_param_group(param_group)
        self.param_groups = base.param_groups


class SAM(GR):
    """Sharpness-aware minimization (Foret et al. 2021), a drop-in for the widely used
    per-parameter implementation: ``SAM(params, base_optimizer, rho=0.05, adaptive=False,
    **kw)`` with ``first_step(zero_grad)``, ``second_step(zero_grad)`` and ``step(closure)``.

    It is GR with α = 1 and a normalized ascent: g = ∇L(θ + ρ·g1/‖g1‖) (ASAM's
    ρ·θ²⊙g1/‖θ⊙g1‖ when ``adaptive``). ``step(closure)`` calls the closure for both
    gradients (torch's convention). Code written for the per-parameter implementation, which
    runs the first backward itself and passes a closure that does not zero grads, gets the
    same update, because the normalized ascent does not depend on the size of g1.
    """

    def __init__(self, params, base_optimizer: Type[Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, adaptive: bool = False, **kwargs):
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        kwargs.setdefault("backend", "auto")
        super().__init__(params, base_optimizer, gamma=0.0, rho=rho, normalize=True,
                         alpha=1.0, adaptive=adaptive, **kwargs)


class GNP(GR):
    """The gradient-norm penalty L + λ‖∇L‖ of Zhao et al. (2022):
    g = (1 − α)·∇L(θ) + α·∇L(θ + ρ·g1/‖g1‖) with α = λ/ρ."""

    def __init__(self, params, base_optimizer: Type[Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, lam: float = 0.04, **kwargs):
        if not (isinstance(lam, (int, float)) and lam > 0):
            raise ValueError(f"Invalid lam: {lam!r} (the penalty weight, a number > 0)")
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"Invalid rho: {rho!r} (the ascent radius r, a number > 0)")
        super().__init__(params, base_optimizer, gamma=0.0, rho=rho, normalize=True,
                         alpha=lam / rho, **kwargs)
