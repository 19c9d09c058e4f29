"""The training steps the profiler compares. Each is one full step: zero grads, forward,
backward(s) and the optimizer update, on SGD with momentum.

* ``sgd``: torch.optim.SGD, one gradient.
* ``fd-gr`` / ``bd-gr`` / ``central-gr``: :class:`gr_fused.GRSGD` with the forward
  (ρ > 0), backward (ρ < 0) or central difference, on a given gr_fused backend.
* ``fd-gr-k5`` (any ``fd-gr-kN``): ``fd-gr`` with ``interval=N``, the second gradient every
  N-th step and the cached direction in between (its step time and FLOPs are the averages
  over whole cycles of N steps).
* ``db-gr``: the exact GR gradient by double backpropagation
  (:func:`gr_fused.db_gr_backward`), then torch.optim.SGD.
* ``sam``: :class:`gr_fused.SAM` around torch.optim.SGD, on a given gr_fused backend (its
  step: the first backward, then ``step(closure)`` for the second, as with the popular SAM).
* ``sam-ref``: SAM as it is commonly written by hand, per parameter tensor in a Python loop
  (old_p = p.clone(); p.add_(e_w); second forward/backward; p.data = old_p), then
  torch.optim.SGD. It is the baseline a fused GR step should beat.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ..db import db_gr_backward
from ..optim import GRSGD, SAM

METHODS = ("sgd", "fd-gr", "fd-gr-k5", "bd-gr", "central-gr", "db-gr", "sam", "sam-ref")
# profiled once per gr_fused backend
GR_METHODS = ("fd-gr", "fd-gr-k5", "bd-gr", "central-gr", "sam")
BASELINE_BACKEND = "torch.optim"  # what the "backend" column says for the other methods

# Matrix products per step as a multiple of the forward pass's (the paper's Section 3.2,
# for an L-layer network: forward L, one gradient 3L, FD 2·3L, central 3·3L, DB 9L).
ANALYTIC_FORWARD_MULTIPLE = {"sgd": 3, "fd-gr": 6, "bd-gr": 6, "central-gr": 9, "db-gr": 9,
                             "sam": 6, "sam-ref": 6}


def interval_of(method: str) -> int:
    """N of ``fd-gr-kN`` (1 for every other method); ValueError for a malformed one."""
    if not method.startswith("fd-gr-k"):
        return 1
    digits = method[len("fd-gr-k"):]
    if not digits.isdigit() or int(digits) < 2:
        raise ValueError(f"Invalid method: {method!r} (fd-gr-kN takes an interval N >= 2)")
    return int(digits)


def is_gr_method(method: str) -> bool:
    return method in GR_METHODS or interval_of(method) > 1


def analytic_forward_multiple(method: str) -> float:
    """Matrix products of a step as a multiple of the forward pass's; for ``fd-gr-kN`` the
    average over a cycle: one FD step (6) and N − 1 one-gradient steps (3)."""
    k = interval_of(method)
    if k > 1:
        return (6 + 3 * (k - 1)) / k
    return ANALYTIC_FORWARD_MULTIPLE[method]

LossFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Hyperparameters:
    lr: float = 0.01
    momentum: float = 0.9
    gamma: float = 0.05  # GR strength γ (fd-gr, bd-gr, central-gr, db-gr)
    rho: float = 0.05    # ascent radius ρ (GR methods, sam-ref); bd-gr uses −ρ


def make_step(method: str, params: List[torch.Tensor], compute_loss: LossFn,
              hp: Hyperparameters, backend: Optional[str] = None
              ) -> Tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """``(step, optimizer)``: ``step()`` runs one training step of ``method`` and returns the
    loss at the parameters before the step (a tensor; it does not synchronize).
    ``compute_loss()`` runs the forward pass (under autocast if any) and returns the loss."""
    if method not in METHODS and interval_of(method) == 1:
        raise ValueError(f"Invalid method: {method!r} (choose from {', '.join(METHODS)}, "
                         "or fd-gr-kN)")
    params = [p for p in params if p.requires_grad]
    if is_gr_method(method):
        if backend is None:
            raise ValueError(f"Invalid backend: None ({method} needs a gr_fused backend name)")
        return _gr_step(method, params, compute_loss, hp, backend)
    optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum)
    steps = {"sgd": _sgd_step, "db-gr": _db_gr_step, "sam-ref": _sam_ref_step}
    return steps[method](optimizer, params, compute_loss, hp), optimizer


def _gr_step(method, params, compute_loss, hp, backend):
    if method == "sam":
        return _sam_step(params, compute_loss, hp, backend)
    optimizer = GRSGD(params, lr=hp.lr, momentum=hp.momentum, gamma=hp.gamma,
                      rho=-hp.rho if method == "bd-gr" else hp.rho,
                      difference="central" if method == "central-gr" else "forward",
                      interval=interval_of(method), backend=backend)

    def closure():
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        return loss

    return (lambda: optimizer.step(closure)), optimizer


def _sam_step(params, compute_loss, hp, backend):
    optimizer = SAM(params, torch.optim.SGD, rho=hp.rho, lr=hp.lr, momentum=hp.momentum,
                    backend=backend)

    def step():
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        optimizer.step(lambda: compute_loss().backward())
        return loss
    return step, optimizer


def _sgd_step(optimizer, params, compute_loss, hp):
    def step():
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        optimizer.step()
        return loss
    return step


def _db_gr_step(optimizer, params, compute_loss, hp):
    def step():
        optimizer.zero_grad()
        loss = compute_loss()
        db_gr_backward(loss, params, hp.gamma)
        optimizer.step()
        return loss
    return step


def _sam_ref_step(optimizer, params, compute_loss, hp):
    """The per-parameter SAM pattern of the most used public SAM code, inlined."""
    def step():
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        with torch.no_grad():  # first_step: climb to the local maximum
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params
                                                if p.grad is not None]), p=2)
            scale = hp.rho / (grad_norm + 1e-12)
            old_params = {}
            for p in params:
                if p.grad is None:
                    continue
                old_params[p] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
        optimizer.zero_grad()
        compute_loss().backward()
        with torch.no_grad():  # second_step: back to θ, then the base update
            for p, old_p in old_params.items():
                p.data = old_p
        optimizer.step()
        return loss
    return step
