"""Keep BatchNorm running statistics out of the perturbed forward passes.

The optimizer only sees parameters, not modules. So, the first time a perturbed pass runs, one
global forward pre-hook is registered for the process (and kept: ``torch.compile`` guards on
the global hook dict, so adding and removing it every step would recompile every step). While
some optimizer is in a perturbed pass, the first module called (the model, or the
``torch.compile`` wrapper around it, whose call is still eager) has its whole tree walked and
every training-mode BatchNorm/InstanceNorm layer in it is switched to "use batch statistics,
don't track" (``track_running_stats=False``: ``_BatchNorm.forward`` then normalizes by the
batch and leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` alone). A
compiled model sees an attribute it guards on, compiles the frozen variant once and reuses
both graphs. Inside a graph being traced the hook does nothing. The layers are switched back
when the perturbed phase ends, normally or by an exception.
"""
from __future__ import annotations

from typing import List, Set

import torch
from torch.nn.modules.batchnorm import _NormBase

_active: List["FreezeRunningStats"] = []
_handle = None


def _pre_hook(module, args):
    if not _active or torch.compiler.is_compiling():
        return
    for freezer in _active:
        freezer.freeze_tree(module)


class FreezeRunningStats:
    def __init__(self) -> None:
        self._frozen: List[_NormBase] = []
        self._walked: Set[int] = set()

    def freeze_tree(self, module: torch.nn.Module) -> None:
        if id(module) in self._walked:
            return
        for m in module.modules():
            self._walked.add(id(m))
            if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                m.track_running_stats = False
                self._frozen.append(m)

    def start(self) -> None:
        global _handle
        if _handle is None:
            _handle = torch.nn.modules.module.register_module_forward_pre_hook(_pre_hook)
        if self not in _active:
            _active.append(self)

    def stop(self) -> None:
        if self in _active:
            _active.remove(self)
        for m in self._frozen:
            m.track_running_stats = True
        self._frozen.clear()
        self._walked.clear()
