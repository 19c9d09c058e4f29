"""The backends of csrc/'s compiled kernels (``gr_fused._C``), over tensor tables:

* ``"cpu"``: the host build (OpenMP loops over the table's chunks) for CPU tensors;
* ``"cuda"``: the CUDA kernels (blocks over the table's chunks) for CUDA tensors.

Both run the same per-element math (csrc/grf_math.h), in torch_backend.py's operation
order, on the user's own parameters, gradients and optimizer state: each bucket's
:class:`~.tensor_table.TensorTable` (kept up to date by :class:`MultiTensorBackend`) gives
the kernels the tensors' addresses and sizes, and the flat backup of θ the optimizer owns.
Each phase of a bucket is one call into ``gr_fused._C``: the table (a ``_C.Table`` built
once per table), raw addresses of the step scalars and, on CUDA, the current stream. The
step scalars (eps, fold, gscale, found_inf), AdamW's step counts and a tensor learning rate
stay in device memory and are read by the kernels, so no phase synchronizes with the host.

Every tensor whose address goes to ``_C`` is referenced until the call returns (the host
build is done by then); on CUDA the kernels run on the current stream, on which every such
tensor was allocated or is kept alive in ``b.extra`` until the bucket's next call, so the
caching allocator cannot hand its memory to other work before the kernels read it. Scratch
(the norms' partial sums, the ascent rows, the update scalars) is allocated per step through
the caching allocator on the stream the step runs on; when ``second_step`` runs on another
stream than ``first_step``, the ascent rows are recorded on it (``Tensor.record_stream``).
The host build keeps its partial sums in the bucket (no streams there).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _ext
from .base import Bucket, fusable_groups, fusable_scaler_flag, group_runs, scale_for
from .multi_tensor import MultiTensorBackend
from .tensor_table import STATE_ROWS, rows_of
from .torch_backend import compute_dtype

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_F64 = torch.float64


def _lib():
    return _ext.load()


class _CompiledBackend(MultiTensorBackend):
    supported_dtypes = tuple(_CODES)
    device_type = "?"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if torch.device(device).type != cls.device_type:
            return f"backend {cls.name!r} runs {cls.device_type} tensors only"
        return _ext.unavailable_reason() or cls._device_reason(torch.device(device))

    @classmethod
    def _device_reason(cls, device: torch.device) -> Optional[str]:
        return None

    # ------------------------------------------------------------------ plumbing
    def _where(self, device: torch.device) -> Tuple[int, int, int]:
        """(device, stream, threads) of a _C call for tensors on ``device``."""
        raise NotImplementedError

    def _hold(self, b: Bucket, *tensors) -> None:
        """Keep ``tensors`` alive after a call that read their addresses (CUDA: until the
        bucket's next call, by then queued after it on the same stream)."""

    def _partials(self, b: Bucket, count: int) -> torch.Tensor:
        """Room for ``count`` partial sums (float64) of a norm."""
        return torch.empty(max(count, 1), dtype=_F64, device=b.device)

    @staticmethod
    def _handle(b: Bucket):
        """The bucket's table as a ``_C.Table`` (built again when the table's buffers change;
        the tuple keeps those buffers referenced as long as the handle is in use)."""
        table = b.extra["table"]
        held = b.extra.get("cext_table")
        if (held is None or held[0] is not table.ptrs or held[1] is not table.layout
                or held[2] is not table.backup):
            if table.rows != rows_of(b.algo):
                raise ValueError(f"gr_fused: the table has rows {table.rows}, the {b.algo!r} "
                                 f"update needs {rows_of(b.algo)}")
            handle = _lib().Table(table.layout.data_ptr(), table.ptrs.data_ptr(),
                                  table.num_chunks, table.num_tensors, table.chunk,
                                  table.backup.data_ptr(), table.aligned, _CODES[table.dtype])
            held = b.extra["cext_table"] = (table.ptrs, table.layout, table.backup, handle)
        return held[3]

    @staticmethod
    def _scalar(t, b: Bucket) -> torch.Tensor:
        """A step scalar as the kernels read it: a 0-dim tensor of the bucket's compute dtype
        on its device (itself when it already is)."""
        c = compute_dtype(b.dtype)
        if not isinstance(t, torch.Tensor):
            return torch.tensor(float(t), dtype=c, device=b.device)
        if t.dtype != c or t.device != b.device:
            t = t.to(device=b.device, dtype=c, non_blocking=True)
        return t if t.dim() == 0 else t.reshape(())

    def _lr(self, b: Bucket) -> Tuple[Tuple[float, int, int], Optional[torch.Tensor]]:
        """The learning rate as (lr, lr_at, lr_dtype) and the tensor to keep alive: a Python
        number goes by value; a tensor lr by address, read by the kernel (no host sync)."""
        lr = b.group["lr"]
        if not isinstance(lr, torch.Tensor):
            return (float(lr), 0, 0), None
        t = lr.detach()
        if t.numel() != 1:
            raise ValueError(f"gr_fused: a tensor lr must have one element, not {t.numel()}")
        if t.device != b.device or t.dtype not in (torch.float32, _F64):
            t = t.to(device=b.device, dtype=t.dtype if t.dtype in (torch.float32, _F64) else _F64,
                     non_blocking=True)
        t = t.reshape(())
        return (0.0, t.data_ptr(), _CODES[t.dtype]), t

    @staticmethod
    def _check_state(b: Bucket, momentum: bool) -> None:
        """The update writes through every state row: each address must be there (the driver
        creates missing state with create_missing_state before the update)."""
        table = b.extra["table"]
        if b.extra.get("cext_state_checked") is table.ptrs:
            return
        keys = STATE_ROWS[b.algo] if b.algo != "sgd" or momentum else ()
        for key in keys:  # (a tensor without elements may have no address)
            if any(a == 0 and (n or key == "step") for a, n in zip(table.host_row(key),
                                                                    table.numels)):
                raise ValueError(f"gr_fused: optimizer state {key!r} is missing for the "
                                 f"{b.algo!r} update (create it first: "
                                 "gr_fused.optim.base.create_missing_state)")
        b.extra["cext_state_checked"] = table.ptrs

    # ------------------------------------------------------------------ phases
    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        handle = self._handle(b)
        out = torch.empty((), dtype=_F64, device=b.device)
        partials = self._partials(b, handle.num_chunks) if b.device.type == "cuda" else None
        _lib().sq_norm(*self._where(b.device), handle, bool(adaptive),
                       0 if partials is None else partials.data_ptr(), out.data_ptr())
        return out

    def perturb(self, b, eps, fold, adaptive):
        eps_t, fold_t = self._scalar(eps, b), self._scalar(fold, b)
        _lib().perturb(*self._where(b.device), self._handle(b), eps_t.data_ptr(),
                       fold_t.data_ptr(), bool(adaptive))
        self._hold(b, eps_t, fold_t)

    def reflect(self, b):
        _lib().reflect(*self._where(b.device), self._handle(b))

    def restore(self, b):
        _lib().restore(*self._where(b.device), self._handle(b))

    def update(self, b, gscale, found_inf):
        gscale_t, found_t = self._scalar(gscale, b), self._scalar(found_inf, b)
        self._update_at(b, gscale_t.data_ptr(), found_t.data_ptr(), False)
        self._hold(b, gscale_t, found_t)

    def _update_at(self, b: Bucket, gscale_at: int, found_inf_at: int, steps_advanced: bool,
                   where=None, handle=None) -> None:
        """update, with gscale and found_inf given as addresses of compute-dtype scalars;
        ``steps_advanced``: update_finalize advanced this AdamW table's step counts."""
        lib, group = _lib(), b.group
        where = self._where(b.device) if where is None else where
        handle = self._handle(b) if handle is None else handle
        if b.algo == "none":
            lib.update_none(*where, handle, gscale_at, found_inf_at)
            return
        (lr, lr_at, lr_code), lr_t = self._lr(b)
        if b.algo == "sgd":
            momentum = _number(group["momentum"])
            self._check_state(b, momentum != 0)
            lib.update_sgd(*where, handle, gscale_at, found_inf_at, lr, lr_at, lr_code,
                           momentum, _number(group["dampening"]),
                           _number(group["weight_decay"]), bool(group["nesterov"]))
        elif b.algo == "adamw":
            self._check_state(b, True)
            beta1, beta2 = group["betas"]
            lib.update_adamw(*where, handle, gscale_at, found_inf_at, lr, lr_at, lr_code,
                             _number(beta1), _number(beta2), _number(group["eps"]),
                             _number(group["weight_decay"]), steps_advanced)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")
        if lr_t is not None:
            self._hold(b, lr_t)

    # ------------------------------------------------------------------ the fused step
    def can_fuse(self, buckets: List[Bucket]) -> bool:
        lib = _lib()
        runs = fusable_groups(buckets)
        return (lib is not None and runs is not None and len(runs) <= lib.max_groups
                and len({compute_dtype(b.dtype) for b in buckets}) == 1
                and all("table" in b.extra for b in buckets))

    def _norm_partials(self, buckets: Sequence[Bucket], handles, adaptive: Sequence[bool],
                       where) -> Tuple[torch.Tensor, List[int]]:
        """Stage one of a norm over several tables into one float64 buffer, one partial sum
        per chunk; returns it and where each table's partials start (and the total)."""
        lib = _lib()
        starts = [0]
        for h in handles:
            starts.append(starts[-1] + h.num_chunks)
        partials = self._partials(buckets[0], starts[-1])
        at = partials.data_ptr()
        for h, a, start in zip(handles, adaptive, starts):
            lib.norm_partials(*where, h, a, at + 8 * start)
        return partials, starts

    def ascend(self, buckets, grad_scale):
        """The global norm of g1 (a partial sum per chunk of every table), each group's
        ascent row from it (one finalize per group: on CUDA a one-block kernel), then
        perturb per table with that row's eps and fold."""
        lib = _lib()
        b0 = buckets[0]
        device, c = b0.device, compute_dtype(b0.dtype)
        where = self._where(device)
        handles = [self._handle(b) for b in buckets]
        partials, starts = self._norm_partials(
            buckets, handles, [bool(b.gr["adaptive"]) for b in buckets], where)
        runs = group_runs(buckets)
        rows = torch.empty((len(runs), 3), dtype=c, device=device)
        scale = scale_for(grad_scale, device)
        scale_at = 0 if scale is None else scale.data_ptr()
        size, base, code = rows.element_size(), rows.data_ptr(), _CODES[c]
        k = 0
        for g, (gr, members) in enumerate(runs):
            row, alpha = base + 3 * size * g, gr["alpha"]
            lib.ascent_finalize(
                *where, code, partials.data_ptr(), starts[-1], scale_at, row,
                float(gr["rho"]), float(gr["gamma"]), 0.0 if alpha is None else float(alpha),
                bool(gr["normalize"]), alpha is not None, gr["difference"] == "central",
                float(gr.get("eps_sign", 1.0)), float(gr.get("combine_sign", 1.0)))
            for _ in members:
                lib.perturb(*where, handles[k], row, row + size, bool(gr["adaptive"]))
                k += 1
        self._hold(b0, partials, scale, rows)
        b0.extra["cext_stream"] = where[1]
        return rows  # [eps, fold, combine] of each group

    def combine_update(self, buckets, ascent, grad_scale, skips):
        """The norms of G (a partial sum per chunk), one finalize for every group's gscale,
        found_inf, the skip records and, with one AdamW table, its step counts; then the
        update per table."""
        lib = _lib()
        b0 = buckets[0]
        device, c = b0.device, compute_dtype(b0.dtype)
        where = self._where(device)
        runs = group_runs(buckets)
        rows = ascent
        if rows.dtype != c or rows.device != device or not rows.is_contiguous():
            rows = rows.to(device=device, dtype=c).contiguous()
        elif device.type == "cuda" and b0.extra.get("cext_stream") != where[1]:
            rows.record_stream(torch.cuda.current_stream(device))  # made on another stream
        if rows.shape != (len(runs), 3):
            raise ValueError(f"gr_fused: ascent rows of shape {tuple(rows.shape)} for "
                             f"{len(runs)} groups")
        handles = [self._handle(b) for b in buckets]
        partials, starts = self._norm_partials(buckets, handles, [False] * len(buckets), where)
        bounds, seen = [0], 0
        for _, members in runs:
            seen += len(members)
            bounds.append(starts[seen])
        out = torch.empty(len(runs) + 1, dtype=c, device=device)
        scale = scale_for(grad_scale, device)
        flag = skips.scaler_found_inf
        fused_flag = fusable_scaler_flag(skips, device)
        adamw = [i for i, b in enumerate(buckets) if b.algo == "adamw"]
        one_adamw = adamw[0] if len(adamw) == 1 else None  # its steps advance in the finalize
        if one_adamw is not None:
            self._check_state(buckets[one_adamw], True)
        max_norm = runs[0][0]["max_grad_norm"]
        lib.update_finalize(
            *where, _CODES[c], partials.data_ptr(), bounds, rows.data_ptr(),
            0 if scale is None else scale.data_ptr(), out.data_ptr(), skips.count.data_ptr(),
            skips.last.data_ptr(), flag.data_ptr() if fused_flag and flag is not None else 0,
            0 if one_adamw is None else handles[one_adamw].ptrs,
            0 if one_adamw is None else handles[one_adamw].num_tensors,
            max_norm is not None, 1.0 if max_norm is None else float(max_norm))
        found_inf = out[len(runs)]
        if not fused_flag:
            skips.raise_scaler_flag(found_inf)
        size = out.element_size()
        found_at = out.data_ptr() + size * len(runs)
        k = 0
        for g, (_, members) in enumerate(runs):
            for b in members:
                self._update_at(b, out.data_ptr() + size * g, found_at, k == one_adamw, where,
                                handles[k])
                k += 1
        self._hold(b0, partials, scale, rows, out)
        return found_inf


def _number(x) -> float:
    """A hyperparameter other than lr as a Python float (a tensor costs one read, as in the
    torch backend)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class CpuBackend(_CompiledBackend):
    """The host build of csrc/ (OpenMP over the table's chunks, vectorized by the compiler)
    for CPU tensors."""

    name = "cpu"
    device_type = "cpu"
    # elements per table chunk: the unit of the OpenMP loop and of the norm's partial sums
    chunk = 1 << 15

    def _where(self, device):
        return -1, 0, torch.get_num_threads()

    def _partials(self, b, count):
        held = b.extra.get("cext_partials")  # no streams here: reused from call to call
        if held is None or held.numel() < count:
            held = b.extra["cext_partials"] = torch.empty(max(count, 1), dtype=_F64)
        return held


class CudaBackend(_CompiledBackend):
    """The CUDA kernels of csrc/ for CUDA tensors."""

    name = "cuda"
    device_type = "cuda"
    # elements per table chunk: one block's share of a launch (a partial sum of the norm)
    chunk = 1 << 13

    @classmethod
    def _device_reason(cls, device):
        if not _ext.load().with_cuda:
            return ("gr_fused._C was built without CUDA (nvcc was not found at build time; "
                    "rebuild with GR_FUSED_BUILD_CUDA=1)")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return f"gr_fused._C has kernels for compute capability 8.0 and newer, not {cap}"
        return None

    def _where(self, device):
        return device.index, torch.cuda.current_stream(device).cuda_stream, 0

    def _hold(self, b, *tensors):
        b.extra["cext_refs"] = tensors
