"""What every kernel backend (Triton, the CUDA kernels, the host build) shares: each bucket's
:class:`~.tensor_table.TensorTable`, kept up to date from step to step, and the tensors a
kernel cannot walk sent to the torch backend.

A kernel backend subclasses :class:`MultiTensorBackend`, sets ``name``, ``chunk`` (elements
per table chunk) and ``supported_dtypes``, and implements the phases of
:class:`~.base.Backend` for buckets whose ``extra["table"]`` describes their tensors.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch

from .base import DIRECTION, Backend, Bucket
from .tensor_table import STATE_ROWS, TensorTable, why_not_walkable

_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride


def _signature(b: Bucket) -> tuple:
    """What decides whether each tensor of ``b`` can be walked: addresses and strides of the
    params and grads, and the addresses of the state tensors (the optimizer forgets the
    signatures when a state_dict is loaded)."""
    states = tuple(tuple(0 if (t := st.get(key)) is None else t.data_ptr() for st in b.states)
                   for key in STATE_ROWS[b.algo])
    return (tuple(map(_data_ptr, b.params)), tuple(map(_stride, b.params)),
            tuple(map(_data_ptr, b.grads)), tuple(map(_stride, b.grads)), states)


def table_of(b: Bucket) -> TensorTable:
    return b.extra["table"]


class MultiTensorBackend(Backend):
    name = "multi-tensor"
    chunk = 4096
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def prepare(self, b: Bucket) -> List[Bucket]:
        extra = b.extra
        signature = _signature(b)
        if extra.get("walk_signature") != signature:
            extra["walk_signature"] = signature
            extra["walk_take"] = self._walkable(b)
        take: Optional[List[int]] = extra["walk_take"]
        parts = [b]
        if take is not None:  # some tensors take the torch backend
            from . import get_backend
            rest = [i for i in range(len(b.params)) if i not in set(take)]
            parts = []
            if take:
                parts.append(_subset(b, take, b.extra, self))
            parts.append(_subset(b, rest, extra.setdefault("fallback", {}),
                                 get_backend("torch", b.device)))
        for part in parts:
            if part.backend is self:
                self.refresh(part)
        return parts

    def _walkable(self, b: Bucket) -> Optional[List[int]]:
        """The indices of the tensors a kernel can walk (None: all of them); the others are
        named once in a warning. interval=k's cached direction is walked like the base
        update's state."""
        rows = STATE_ROWS[b.algo] + ((DIRECTION,) if b.gr.get("interval", 1) > 1 else ())
        reasons = []
        for p, g, st in zip(b.params, b.grads, b.states):
            if p.dtype not in self.supported_dtypes:
                reasons.append(f"dtype {p.dtype} has no kernel")
            else:
                reasons.append(why_not_walkable(p, g, st, rows))
        if not any(reasons):
            return None
        why = sorted({r for r in reasons if r})
        if not b.extra.get("warned"):
            b.extra["warned"] = True
            warnings.warn(f"gr_fused backend {self.name!r}: {sum(map(bool, reasons))} of "
                          f"{len(reasons)} tensors take the per-tensor torch path because of "
                          f"{'; '.join(why)}", stacklevel=5)
        return [i for i, r in enumerate(reasons) if not r]

    def refresh(self, b: Bucket) -> None:
        table = b.extra.get("table")
        if table is None:
            table = b.extra["table"] = TensorTable(self.chunk)
        table.refresh(b.params, b.grads, b.states, b.algo, b.flags)


def _subset(b: Bucket, idx: List[int], extra: dict, backend: Backend) -> Bucket:
    part = Bucket([b.params[i] for i in idx], [b.grads[i] for i in idx],
                  [b.states[i] for i in idx], b.group, b.algo, extra, gr=b.gr,
                  sources=[b.sources[i] for i in idx])
    part.backend = backend
    if b.flags is not None:
        part.flags = [b.flags[i] for i in idx]
    return part
