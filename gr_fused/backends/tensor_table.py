"""The tensors of one bucket as one flattened index space, for kernels that walk many tensors
in one launch (multi-tensor apply, as torch's ``_fused_*`` optimizers and apex do).

The user's parameters, gradients and optimizer state stay the user's tensors: nothing is
re-pointed or copied into a buffer of ours. A kernel instead reads a small device-side table
of their addresses and sizes. Only the exact backup of θ, which the optimizer owns, is one
flat buffer.

The index space is cut into *chunks* of ``chunk`` elements, each inside one tensor (a
tensor of n elements has ceil(n / chunk) chunks, the last one shorter). A kernel runs one
program (or block) per chunk and finds everything from two int64 device arrays:

``layout`` (depends on the sizes only), ``C`` chunks and ``T`` tensors::

    layout[c]              tensor index of chunk c                       c < C
    layout[C + t]          first chunk of tensor t                       t < T
    layout[C + T + t]      numel of tensor t
    layout[C + 2T + t]     offset of tensor t in the flat backup (elements; every segment
                           starts on a 64-byte boundary)

    chunk c covers elements [s, min(s + chunk, numel)) of tensor t = layout[c], with
    s = (c − first chunk of t)·chunk, and elements [o + s, ...) of the backup, o its offset.

``ptrs`` (the addresses, rebuilt when one changes), ``R`` rows of ``T``::

    ptrs[r·T + t]          row r of tensor t; rows in the order of ``rows``:
        "param"            θ
        "grad"             g (the grad buffer: g1, then fold·g1, then G)
        "flags"            bits: NEW_STATE (the state was created for this step: written,
                           never read; a momentum buffer gets g, or zeros if skipped),
                           FROZEN (this tensor is not updated: θ = backup, state untouched)
        the state rows of the base update: "momentum_buffer" (sgd; 0 without momentum);
        "exp_avg", "exp_avg_sq", "step" (adamw; step is a 0-dim float32 tensor)

A tensor's memory is read as ``numel`` elements from its address, in memory order: the
param, its grad and its state tensors are dense (no gaps, no overlap) with the same strides,
so the same memory position is the same element in each (``why_not_walkable`` checks it;
any layout torch gives a parameter, channels_last included, qualifies). Complex tensors are
walked as their real views.
"""
from __future__ import annotations

import math
from operator import attrgetter
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FLAG_NEW_STATE = 1
FLAG_FROZEN = 2
STATE_ROWS: Dict[str, Tuple[str, ...]] = {
    "sgd": ("momentum_buffer",),
    "adamw": ("exp_avg", "exp_avg_sq", "step"),
    "none": (),
}
BACKUP_ALIGN_BYTES = 64

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_stride = torch.Tensor.stride
_dtype = attrgetter("dtype")


def rows_of(algo: str) -> Tuple[str, ...]:
    return ("param", "grad", "flags") + STATE_ROWS[algo]


def is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlap: the ``numel`` elements fill ``numel`` consecutive slots from
    ``data_ptr()`` (in some order of the dimensions)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A complex tensor as its real view (torch.optim's convention); anything else as is."""
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def why_not_walkable(param: torch.Tensor, grad: torch.Tensor, state: Dict[str, object],
                     state_rows: Sequence[str]) -> Optional[str]:
    """None when a kernel may walk ``param``, ``grad`` and the ``state_rows`` entries of
    ``state`` (missing entries are fine: they are created for the step) as raw memory; else
    why not."""
    if type(param) is not torch.Tensor and type(param) is not torch.nn.Parameter:
        return f"{type(param).__name__} parameters"
    if not is_dense(param):
        return "parameters with gaps or overlaps in memory (non-dense views)"
    if grad.stride() != param.stride():
        return "gradients whose memory layout differs from their parameter's"
    for key in state_rows:
        t = state.get(key)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return f"optimizer state {key!r} that is not a tensor"
        t = real(t)
        if key == "step":
            if t.dim() != 0 or t.dtype != torch.float32 or t.device != param.device:
                return "a 'step' that is not a float32 scalar on the parameter's device"
        elif t.dtype != param.dtype or t.shape != param.shape or t.stride() != param.stride():
            return f"optimizer state {key!r} whose dtype or memory layout differs from its parameter's"
    return None


class TensorTable:
    """The device-side table of one bucket (see the module docstring). ``refresh`` brings it
    up to date with the bucket's tensors each step; it rebuilds and uploads only what
    changed (the layout when a size changes, the addresses when one moves)."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.device: Optional[torch.device] = None
        self.dtype: Optional[torch.dtype] = None
        self.rows: Tuple[str, ...] = ()
        self.numels: Tuple[int, ...] = ()
        self.num_tensors = 0
        self.num_chunks = 0
        self.layout: Optional[torch.Tensor] = None
        self.backup: Optional[torch.Tensor] = None
        self.backup_offsets: List[int] = []
        self.ptrs: Optional[torch.Tensor] = None
        self.aligned = False        # every address in ptrs (and the backup) is 16-byte aligned
        self._host_ptrs: List[List[int]] = []

    # ------------------------------------------------------------------ building
    def refresh(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                states: Sequence[Dict[str, object]], algo: str,
                flags: Optional[Sequence[int]] = None) -> None:
        """Describe these tensors (already real views where complex). The backup keeps its
        contents when the sizes are unchanged."""
        numels = tuple(map(_numel, params))
        first = params[0]
        if (numels != self.numels or first.device != self.device or first.dtype != self.dtype):
            self._build_layout(numels, first.device, first.dtype)
        rows = rows_of(algo)
        host = [list(map(_data_ptr, params)), list(map(_data_ptr, grads)),
                list(flags) if flags is not None else [0] * len(numels)]
        for key in rows[3:]:
            host.append([0 if (t := st.get(key)) is None else t.data_ptr() for st in states])
        if rows != self.rows or host != self._host_ptrs:
            self.rows = rows
            self._host_ptrs = host
            flat = [v for row in host for v in row]
            self.ptrs = _upload(flat, self.device)
            addresses = [v for row in host[:2] + host[3:] for v in row if v]
            self.aligned = all(a % 16 == 0 for a in addresses)

    def _build_layout(self, numels: Tuple[int, ...], device: torch.device,
                      dtype: torch.dtype) -> None:
        chunk = self.chunk
        counts = [math.ceil(n / chunk) for n in numels]
        chunk_tensor: List[int] = []
        first_chunk, offsets = [], []
        align = max(1, BACKUP_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        at = 0
        for t, (n, k) in enumerate(zip(numels, counts)):
            first_chunk.append(len(chunk_tensor))
            chunk_tensor.extend([t] * k)
            offsets.append(at)
            at += -(-n // align) * align
        self.numels = numels
        self.num_tensors = len(numels)
        self.num_chunks = len(chunk_tensor)
        self.device, self.dtype = device, dtype
        self.backup_offsets = offsets
        self.layout = _upload(chunk_tensor + first_chunk + list(numels) + offsets, device)
        self.backup = torch.empty(max(at, 1), dtype=dtype, device=device)
        self.rows, self._host_ptrs = (), []  # force the addresses to be uploaded again

    # ------------------------------------------------------------------ reading
    def row(self, name: str) -> int:
        """The index of row ``name`` in ``ptrs`` (ValueError if this table has none)."""
        return self.rows.index(name)

    def row_tensor(self, name: str) -> torch.Tensor:
        """Row ``name`` of ``ptrs`` as a 1-D int64 device tensor of ``num_tensors`` entries."""
        r = self.row(name)
        return self.ptrs[r * self.num_tensors:(r + 1) * self.num_tensors]

    def backup_views(self) -> List[torch.Tensor]:
        """Each tensor's segment of the backup, 1-D (for the torch-op paths and tests)."""
        return [self.backup[o:o + n] for o, n in zip(self.backup_offsets, self.numels)]

    def host_row(self, name: str) -> List[int]:
        return self._host_ptrs[self.row(name)]


def _upload(values: List[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device`` (never empty, so its address is valid)."""
    host = torch.tensor(values or [0], dtype=torch.int64)
    return host if device.type == "cpu" else host.to(device, non_blocking=True)
