"""Exact GR by double backpropagation (DB-GR), to compare against and to profile."""
from __future__ import annotations

from typing import Iterable, List

import torch


def db_gr_backward(loss: torch.Tensor, params: Iterable[torch.Tensor], gamma: float
                   ) -> torch.Tensor:
    r"""Accumulate into ``p.grad`` the exact gradient of :math:`L + (\gamma/2)\lVert\nabla
    L\rVert^2`, i.e. ∇L + γ·H∇L, by double backpropagation; follow with any base optimizer.

    ``loss`` must still have its graph (call this instead of ``loss.backward()``). Params
    that do not influence the loss are left untouched. Returns ‖∇L‖² (detached).
    """
    if not (isinstance(gamma, (int, float)) and gamma >= 0):
        raise ValueError(f"Invalid gamma: {gamma!r} (a number >= 0)")
    params: List[torch.Tensor] = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads) if g is not None]
    sq_norm = torch.stack([g.pow(2).sum() for _, g in used]).sum()
    if gamma != 0:
        hvps = torch.autograd.grad(0.5 * gamma * sq_norm, [p for p, _ in used],
                                   allow_unused=True)
    else:
        hvps = [None] * len(used)
    with torch.no_grad():
        for (p, g), hg in zip(used, hvps):
            total = g.detach() if hg is None else g.detach() + hg
            if p.grad is None:
                p.grad = total
            else:
                p.grad.add_(total)
    return sq_norm.detach()
