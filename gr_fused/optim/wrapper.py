"""GR around any torch optimizer, and the SAM and GNP presets."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Type

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from .base import GR_KEYS, GROptimizer, resolve_gamma
from ..backends.base import FLAG_FROZEN

# the options of GR itself that SAM and GNP take besides their own; every other keyword
# argument of SAM and GNP goes to the base optimizer
_GR_OPTIONS = ("backend", "freeze_bn_stats", "max_grad_norm", "adaptive", "interval",
               "reuse_scale")


def _base_argument_names(base_optimizer) -> set:
    try:
        return set(inspect.signature(base_optimizer).parameters)
    except (TypeError, ValueError):
        return set()


class GR(GROptimizer):
    """Finite-difference GR around any ``torch.optim`` optimizer class.

    The backend combines the two gradients into ``p.grad`` and restores θ; then
    ``base_optimizer.step()`` runs unchanged. Around a plain ``torch.optim.SGD`` the backend
    applies SGD's update itself, in the pass that restores θ (see ``_fuses_base_update``).
    The param groups and the state are shared with the base optimizer (so LR schedulers may
    be attached to either, and ``state_dict`` holds the base optimizer's state). A step that
    found inf/NaN is skipped: without a host sync when the update is fused or the base
    optimizer takes a device-side ``found_inf`` (torch's ``fused=True`` optimizers), with one
    ``.item()`` otherwise.

    Keyword arguments other than GR's go to the base optimizer. Where the base optimizer has
    an argument of the same name as one of GR's (RMSprop's and ASGD's ``alpha``, Adadelta's
    ``rho``), pass the base optimizer's value in ``base_kwargs``: the param groups then hold
    the base optimizer's value under its name and GR's under ``"gr_<name>"`` (e.g.
    ``"gr_alpha"``), so neither overrides the other.
    """

    _COPIED = GROptimizer._COPIED + ("base_optimizer", "_gr_state")

    def __init__(self, params, base_optimizer: Type[Optimizer] = torch.optim.SGD, *,
                 gamma: Optional[float] = None, rho: float = 0.05, normalize: bool = True,
                 difference: str = "forward", alpha: Optional[float] = None,
                 adaptive: bool = False, max_grad_norm: Optional[float] = None,
                 interval: int = 1, reuse_scale: float = 0.7, backend: str = "auto",
                 freeze_bn_stats: bool = True, base_kwargs: Optional[Dict[str, Any]] = None,
                 **kwargs):
        if isinstance(base_optimizer, Optimizer) or not callable(base_optimizer):
            raise ValueError("Invalid base_optimizer: pass the optimizer class (e.g. "
                             "torch.optim.SGD) and its arguments as keywords")
        if isinstance(base_optimizer, type) and issubclass(
                base_optimizer, (torch.optim.LBFGS, torch.optim.SparseAdam)):
            raise ValueError(f"Invalid base_optimizer: {base_optimizer.__name__} cannot take "
                             "a GR step (LBFGS runs its own closure-driven line search; "
                             "SparseAdam takes sparse gradients, GR dense ones)")
        both = set(base_kwargs or {}) & set(kwargs)
        if both:
            raise ValueError(f"Invalid base_kwargs: {sorted(both)} given twice")
        base_kwargs = dict(base_kwargs or {}, **kwargs)
        taken = _base_argument_names(base_optimizer)
        self._gr_names = {k: f"gr_{k}" if k in taken else k for k in GR_KEYS}
        gr = dict(gamma=resolve_gamma(gamma, alpha), rho=rho, normalize=normalize,
                  difference=difference, alpha=alpha, adaptive=adaptive,
                  max_grad_norm=max_grad_norm, interval=interval, reuse_scale=reuse_scale)
        defaults = {self._gr_names[k]: v for k, v in gr.items()}
        defaults.update(base_kwargs)
        super().__init__(params, defaults, backend=backend, freeze_bn_stats=freeze_bn_stats)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        clash = set(self.base_optimizer.defaults) & {n for n in self._gr_names.values()}
        if clash:
            raise ValueError(f"Invalid base_optimizer: its hyperparameters {sorted(clash)} have "
                             "GR's names; pass them in base_kwargs")
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        # GR's own per-parameter state (interval=k's direction), apart from the base
        # optimizer's, which must find a parameter's state empty until its first step
        self._gr_state: Dict[torch.Tensor, Dict[str, Any]] = {}

    def _fuses_base_update(self) -> bool:
        """Whether the backend applies the base update itself, in the pass that restores θ
        (as GRSGD's): for a plain ``torch.optim.SGD`` whose ``step`` nobody hooked or
        wrapped (an LR scheduler attached to it wraps it), not ``differentiable``, with
        ``interval=1``. Its state stays the base optimizer's (``momentum_buffer``, as torch
        creates it). Any other base optimizer steps itself after the restore."""
        base = self.base_optimizer
        if type(base) is not torch.optim.SGD or "step" in vars(base):
            return False
        if (base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks
                or _torch_optimizer._global_optimizer_post_hooks):
            return False
        return all(not g.get("differentiable", False) and self._gr(g)["interval"] == 1
                   for g in self.param_groups)

    def _buckets(self):
        self._algo = "sgd" if self._fuses_base_update() else "none"
        return super()._buckets()

    def _state_of(self, p):
        if self._algo != "none":  # the backend runs the base update on its own state
            return self.state[p]
        st = self._gr_state.get(p)
        if st is None:
            st = self._gr_state[p] = {}
        return st

    def state_dict(self):
        state_dict = super().state_dict()
        if "gr_fused" in state_dict:  # the direction by parameter index, as torch numbers them
            params = [p for g in self.param_groups for p in g["params"]]
            state_dict["gr_fused"]["state"] = {
                i: dict(self._gr_state[p]) for i, p in enumerate(params) if self._gr_state.get(p)}
        return state_dict

    def _signs(self, group):
        if self._algo != "none":  # the backend's update maximizes as GRSGD's does
            return super()._signs(group)
        # the base optimizer maximizes by itself: GR ascends along −g1 and hands it ∇(L − γ/2‖∇L‖²)
        return (-1.0 if group.get("maximize", False) else 1.0), 1.0

    def _plain_step(self) -> None:
        if self._plain_prepare():
            self.base_optimizer.step()

    def _after_update(self, found_inf: torch.Tensor, buckets) -> None:
        for b in buckets:
            if b.flags is not None:  # frozen tensors: the base optimizer must skip them
                for src, flag in zip(b.sources, b.flags):
                    if flag & FLAG_FROZEN:
                        src.grad = None
        if any(b.algo != "none" for b in buckets):
            return  # the backend applied the base update (_fuses_base_update)
        # a tensor with no gradient at θ is not in this step (as with a fused update), even
        # if the backward at the perturbed point gave it one: hidden from the base optimizer
        stepped = {id(src) for b in buckets for src in b.sources}
        hidden = [(p, p.grad) for g in self.param_groups for p in g["params"]
                  if p.grad is not None and id(p) not in stepped]
        for p, _ in hidden:
            p.grad = None
        base = self.base_optimizer
        try:
            if getattr(base, "_step_supports_amp_scaling", False) and any(
                    g.get("fused") for g in base.param_groups):
                base.grad_scale, base.found_inf = None, found_inf
                try:
                    base.step()
                finally:
                    del base.grad_scale, base.found_inf
            elif not bool(found_inf.item()):
                base.step()
        finally:
            for p, grad in hidden:
                p.grad = grad

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        base = self.base_optimizer  # share the loaded state, converted as the base converts it
        type(base).__setstate__(base, {"state": self.state, "param_groups": self.param_groups})
        params = [p for g in self.param_groups for p in g["params"]]
        own = state_dict.get("gr_fused", {}).get("state", {})
        self._gr_state = {params[i]: {k: v.detach().to(params[i].device, params[i].dtype).clone()
                                      for k, v in st.items()} for i, st in own.items()}


class SAM(GR):
    """Sharpness-aware minimization (Foret et al. 2021), a drop-in for the widely used
    per-parameter implementation: ``SAM(params, base_optimizer, rho=0.05, adaptive=False,
    **kw)`` with ``first_step(zero_grad)``, ``second_step(zero_grad)`` and ``step(closure)``.

    It is GR with α = 1 and a normalized ascent: g = ∇L(θ + ρ·g1/‖g1‖) (ASAM's
    ρ·θ²⊙g1/‖θ⊙g1‖ when ``adaptive``). As in that implementation, ``step(closure)`` takes
    the gradients your own ``loss.backward()`` already computed as g1 and calls the closure
    once, at the perturbed point; it returns the closure's loss there (with ``interval=k``
    the steps between refreshes do not call it, and return None). Keyword arguments
    other than ``backend``, ``freeze_bn_stats``, ``max_grad_norm``, ``interval``,
    ``reuse_scale`` and ``base_kwargs`` go to the base optimizer (RMSprop's ``alpha`` included; Adadelta's ``rho`` goes in
    ``base_kwargs``).
    """

    def __init__(self, params, base_optimizer: Type[Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, adaptive: bool = False, *, backend: str = "auto",
                 freeze_bn_stats: bool = True, max_grad_norm: Optional[float] = None,
                 interval: int = 1, reuse_scale: float = 0.7,
                 base_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        super().__init__(params, base_optimizer, gamma=0.0, rho=rho, normalize=True,
                         alpha=1.0, adaptive=adaptive, max_grad_norm=max_grad_norm,
                         interval=interval, reuse_scale=reuse_scale,
                         backend=backend, freeze_bn_stats=freeze_bn_stats,
                         base_kwargs=dict(base_kwargs or {}, **kwargs))

    @torch.no_grad()
    def step(self, closure=None):
        """The SAM step of the popular implementation: first_step on the gradients already
        computed, ``closure()`` once at the perturbed point (it runs forward and backward;
        zeroing the grads there is fine), second_step. Returns the closure's loss."""
        if self._pending is not None:  # after first_step and the perturbed backward
            return super().step(closure)
        if closure is None:
            raise RuntimeError("SAM.step() needs a closure that runs forward and backward at "
                               "the perturbed point; or use first_step()/second_step()")
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            raise RuntimeError("SAM.step(closure) takes the gradients already computed as the "
                               "first gradient, as the SAM implementation it replaces: run "
                               "loss.backward() before calling it (no parameter has a grad)")
        if not self.refresh_due:  # interval=k: this step reuses the cached direction
            self._reuse_step()
            return None
        return self._perturbed_passes(closure)


class GNP(GR):
    """The gradient-norm penalty L + λ‖∇L‖ of Zhao et al. (2022):
    g = (1 − α)·∇L(θ) + α·∇L(θ + ρ·g1/‖g1‖) with α = λ/ρ. ``step(closure)`` follows torch's
    convention (the closure is called for both gradients). Keyword arguments other than
    GR's options go to the base optimizer, as with :class:`SAM`."""

    def __init__(self, params, base_optimizer: Type[Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, lam: float = 0.04, **kwargs):
        if not (isinstance(lam, (int, float)) and lam > 0):
            raise ValueError(f"Invalid lam: {lam!r} (the penalty weight, a number > 0)")
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"Invalid rho: {rho!r} (the ascent radius r, a number > 0)")
        options = {k: kwargs.pop(k) for k in _GR_OPTIONS + ("base_kwargs",) if k in kwargs}
        base_kwargs = dict(options.pop("base_kwargs", None) or {}, **kwargs)
        super().__init__(params, base_optimizer, gamma=0.0, rho=rho, normalize=True,
                         alpha=lam / rho, base_kwargs=base_kwargs, **options)
