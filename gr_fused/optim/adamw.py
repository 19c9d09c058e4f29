"""GRAdamW: finite-difference GR fused with torch.optim.AdamW's update."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.optim.adamw import adamw as _torch_adamw

from .base import GROptimizer, check_base_hparams, resolve_gamma

_BASE_KEYS = ("lr", "betas", "eps", "weight_decay", "maximize")


class GRAdamW(GROptimizer):
    r"""AdamW (torch.optim.AdamW's semantics, without amsgrad) on the gradient-regularized
    loss; see :class:`gr_fused.GRSGD` for the GR arguments. ``gamma=0`` is torch.optim.AdamW
    bit for bit. The state (``step``, ``exp_avg``, ``exp_avg_sq``) has AdamW's keys; ``step``
    is a float32 scalar on the parameter's device (an older checkpoint's number, or a step
    saved on the CPU by torch.optim.AdamW, is moved there on load), so a skipped step never
    needs a host sync. Extra memory over torch.optim.AdamW: one copy of the parameters.
    """

    _algo = "adamw"

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 gamma: Optional[float] = None, rho: float = 0.05, normalize: bool = True,
                 difference: str = "forward", alpha: Optional[float] = None,
                 adaptive: bool = False, max_grad_norm: Optional[float] = None,
                 interval: int = 1, reuse_scale: float = 0.7, maximize: bool = False,
                 backend: str = "auto", freeze_bn_stats: bool = True,
                 foreach: Optional[bool] = None):
        if amsgrad:
            raise ValueError("Invalid amsgrad: not supported by GRAdamW; use "
                             "gr_fused.GR(params, torch.optim.AdamW, amsgrad=True)")
        base = check_base_hparams(torch.optim.AdamW, lr=lr, betas=betas, eps=eps,
                                  weight_decay=weight_decay, maximize=maximize, foreach=foreach)
        base["betas"] = tuple(betas)
        defaults = dict(base, gamma=resolve_gamma(gamma, alpha), rho=rho, normalize=normalize,
                        difference=difference, alpha=alpha, adaptive=adaptive,
                        max_grad_norm=max_grad_norm, interval=interval, reuse_scale=reuse_scale)
        super().__init__(params, defaults, backend=backend, freeze_bn_stats=freeze_bn_stats)

    def _check_group(self, group):
        check_base_hparams(torch.optim.AdamW, **{k: group[k] for k in _BASE_KEYS})
        if group.get("amsgrad"):
            raise ValueError("Invalid amsgrad: not supported by GRAdamW; use "
                             "gr_fused.GR(params, torch.optim.AdamW, amsgrad=True)")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW converts an older 'step'
            for p in group["params"]:
                st = self.state.get(p)
                step = None if st is None else st.get("step")
                if step is None:
                    continue
                if not torch.is_tensor(step):
                    step = torch.tensor(float(step), dtype=torch.float32)
                st["step"] = step.to(device=p.device, dtype=torch.float32)

    def _plain_step(self) -> None:
        if not self._plain_prepare():
            return
        for group in self.param_groups:
            params, grads = self._plain_grads(group)
            if not params:
                continue
            for p in params:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            sts = [self.state[p] for p in params]
            steps = [st["step"] for st in sts]
            # torch.optim.AdamW's arithmetic (capturable=False) counts steps on the CPU: with
            # ours on the device, it runs on a CPU copy (one read back), then they move back
            where = steps[0].device.type
            on_host = steps if where == "cpu" else list(
                (torch.zeros(len(steps)) if where == "meta" else torch.stack(steps).cpu()).unbind())
            beta1, beta2 = group["betas"]
            _torch_adamw(params, grads, [st["exp_avg"] for st in sts],
                         [st["exp_avg_sq"] for st in sts], [], on_host,
                         foreach=group["foreach"], capturable=False,
                         differentiable=False, fused=None, amsgrad=False, beta1=beta1,
                         beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=group["maximize"])
            if on_host is not steps:
                torch._foreach_copy_(steps, on_host)
