"""Keep BatchNorm running statistics out of the perturbed forward passes.

The optimizer only sees parameters, not modules, so during a perturbed pass it installs a
global forward pre-hook that switches every training-mode BatchNorm/InstanceNorm layer to
"use batch statistics, don't track" (``track_running_stats=False``, which is exactly what
``_BatchNorm.forward`` does for a non-tracking layer: normalize by the batch, leave
``running_mean``, ``running_var`` and ``num_batches_tracked`` alone). The layers are switched
back when the perturbed phase ends, whether it ended normally or by an exception.
"""
from __future__ import annotations

from typing import List

import torch
from torch.nn.modules.batchnorm import _NormBase


class FreezeRunningStats:
    def __init__(self) -> None:
        self._handle = None
        self._frozen: List[_NormBase] = []

    def _pre_hook(self, module, args):
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            module.track_running_stats = False
            self._frozen.append(module)

    def start(self) -> None:
        if self._handle is None:
            self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._pre_hook)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for m in self._frozen:
            m.track_running_stats = True
        self._frozen.clear()
