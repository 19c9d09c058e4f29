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

interval=k (``supports_reuse``): each tensor's cached direction (the state ``DIRECTION``)
is one more address row, kept apart from the table (``_dirs``: built by this module, since
the table's rows are the base update's). A refresh saves g1 into it in perturb, reads it in
the norm pass of G (three sums per chunk: [Σ G², Σ G·g1, Σ g1²]), computes the direction's
coefficients in the update finalize and caches the new direction in the update pass; a step
between refreshes is the same three sums over g1 and the direction, ``reuse_scalars`` in a
finalize, and the base update of θ in place with g = u·g1 + v·v̂.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _ext
from .base import (DIRECTION, Bucket, fusable_groups, fusable_scaler_flag, group_runs,
                   scale_for, state_tensors)
from .multi_tensor import MultiTensorBackend
from .tensor_table import STATE_ROWS, rows_of
from .torch_backend import TorchBackend, compute_dtype

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_F64 = torch.float64
# what an update reads its gradient from (csrc/grf_api.h's UpdateKind)
_PLAIN, _CACHE, _REUSE = 0, 1, 2


def _lib():
    return _ext.load()


class _CompiledBackend(MultiTensorBackend):
    supported_dtypes = tuple(_CODES)
    device_type = "?"
    supports_reuse = True

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
    def _dirs(b: Bucket) -> torch.Tensor:
        """interval=k: the direction row, each tensor's DIRECTION state address as an int64
        tensor in the tables' memory (uploaded again when one moves). The driver creates the
        state (zeros, the param's layout) before the step needs it."""
        host = [0 if (d := st.get(DIRECTION)) is None else d.data_ptr() for st in b.states]
        held = b.extra.get("cext_dirs")
        if held is not None and held[0] == host:
            return held[1]
        for i, (p, d) in enumerate(zip(b.params, state_tensors(b, DIRECTION))):
            if d is None:
                if p.numel():
                    raise ValueError(f"gr_fused: interval=k's {DIRECTION!r} state is missing for "
                                     f"tensor {i} (gr_fused.optim.base.create_direction_state)")
            elif d.dtype != p.dtype or d.shape != p.shape or d.stride() != p.stride():
                raise ValueError(f"gr_fused: the {DIRECTION!r} state of tensor {i} differs from "
                                 "its parameter in dtype or memory layout")
        t = torch.tensor(host or [0], dtype=torch.int64)
        if b.device.type != "cpu":
            t = t.to(b.device, non_blocking=True)
        b.extra["cext_dirs"] = (host, t)
        return t

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

    def dots(self, b, key):
        if key != DIRECTION:  # (the driver asks for the direction only)
            return TorchBackend.dots(self, b, key)
        handle, dirs = self._handle(b), self._dirs(b)
        out = torch.empty(3, dtype=_F64, device=b.device)
        partials = self._partials(b, 3 * handle.num_chunks) if b.device.type == "cuda" else None
        _lib().dots(*self._where(b.device), handle, dirs.data_ptr(),
                    0 if partials is None else partials.data_ptr(), out.data_ptr())
        self._hold(b, dirs, partials)
        return out

    def perturb(self, b, eps, fold, adaptive, save=False):
        eps_t, fold_t = self._scalar(eps, b), self._scalar(fold, b)
        dirs = self._dirs(b) if save else None
        _lib().perturb(*self._where(b.device), self._handle(b), eps_t.data_ptr(),
                       fold_t.data_ptr(), bool(adaptive), 0 if dirs is None else dirs.data_ptr())
        self._hold(b, eps_t, fold_t, dirs)

    def reflect(self, b):
        _lib().reflect(*self._where(b.device), self._handle(b))

    def restore(self, b):
        _lib().restore(*self._where(b.device), self._handle(b))

    def update(self, b, gscale, found_inf, direction=None):
        gscale_t, found_t = self._scalar(gscale, b), self._scalar(found_inf, b)
        if direction is None:
            self._update_at(b, gscale_t.data_ptr(), found_t.data_ptr(), False)
            self._hold(b, gscale_t, found_t)
            return
        a_t, c_t = (self._scalar(x, b) for x in direction)
        dirs = self._dirs(b)
        self._update_at(b, gscale_t.data_ptr(), found_t.data_ptr(), False, kind=_CACHE,
                        dirs=dirs.data_ptr(), s1=a_t.data_ptr(), s2=c_t.data_ptr())
        self._hold(b, gscale_t, found_t, a_t, c_t, dirs)

    def reuse_update(self, b, u, v, found_inf):
        u_t, v_t, found_t = self._scalar(u, b), self._scalar(v, b), self._scalar(found_inf, b)
        dirs = self._dirs(b)
        self._update_at(b, u_t.data_ptr(), found_t.data_ptr(), False, kind=_REUSE,
                        dirs=dirs.data_ptr(), s1=v_t.data_ptr())
        self._hold(b, u_t, v_t, found_t, dirs)

    def _update_at(self, b: Bucket, s0_at: int, found_inf_at: int, steps_advanced: bool,
                   where=None, handle=None, kind: int = _PLAIN, dirs: int = 0, s1: int = 0,
                   s2: int = 0) -> None:
        """update, with its step scalars given as addresses of compute-dtype scalars (s0 =
        gscale; interval=k: ``kind``, the direction row ``dirs`` and s1, s2, as
        csrc/grf_api.h's UpdateKind says); ``steps_advanced``: a finalize advanced this
        AdamW table's step counts."""
        where = self._where(b.device) if where is None else where
        handle = self._handle(b) if handle is None else handle
        fn, args, lr_t = self._update_call(b, s0_at, found_inf_at, steps_advanced, where, handle,
                                           kind, dirs, s1, s2)
        fn(*args)
        if lr_t is not None:
            self._hold(b, lr_t)

    def _update_call(self, b: Bucket, s0_at: int, found_inf_at: int, steps_advanced: bool,
                     where, handle, kind: int = _PLAIN, dirs: int = 0, s1: int = 0, s2: int = 0):
        """The update's _C function and its arguments (see _update_at), and a tensor lr to
        keep alive (or None)."""
        lib, group = _lib(), b.group
        if b.algo == "none":
            return lib.update_none, (*where, handle, s0_at, found_inf_at, kind, dirs, s1, s2), None
        (lr, lr_at, lr_code), lr_t = self._lr(b)
        if b.algo == "sgd":
            momentum = _number(group["momentum"])
            self._check_state(b, momentum != 0)
            return lib.update_sgd, (*where, handle, s0_at, found_inf_at, lr, lr_at, lr_code,
                                    momentum, _number(group["dampening"]),
                                    _number(group["weight_decay"]), bool(group["nesterov"]),
                                    kind, dirs, s1, s2), lr_t
        if b.algo == "adamw":
            self._check_state(b, True)
            beta1, beta2 = group["betas"]
            return lib.update_adamw, (*where, handle, s0_at, found_inf_at, lr, lr_at, lr_code,
                                      _number(beta1), _number(beta2), _number(group["eps"]),
                                      _number(group["weight_decay"]), steps_advanced, kind,
                                      dirs, s1, s2), lr_t
        raise ValueError(f"unknown base update {b.algo!r}")

    # ------------------------------------------------------------------ the fused step
    # Each fused call prepares every argument of its _C calls first and then makes them back
    # to back: on the host, Python between two kernels runs in caches the kernel before it
    # has just streamed its tensors through (about 0.1 ms a gap at 10M fp32 parameters).
    def can_fuse(self, buckets: List[Bucket]) -> bool:
        lib = _lib()
        runs = fusable_groups(buckets)
        return (lib is not None and runs is not None and len(runs) <= lib.max_groups
                and len({compute_dtype(b.dtype) for b in buckets}) == 1
                and all("table" in b.extra for b in buckets))

    def _norm_calls(self, buckets: Sequence[Bucket], handles, adaptive: Sequence[bool],
                    where, dirs: Optional[Sequence[torch.Tensor]] = None):
        """Stage one of a norm over several tables into one float64 buffer, one partial sum
        per chunk (with ``dirs``, interval=k's dots: three per chunk): the buffer, where each
        table's chunks start (and the total), and the _C calls that fill it."""
        lib = _lib()
        starts = [0]
        for h in handles:
            starts.append(starts[-1] + h.num_chunks)
        per = 1 if dirs is None else 3
        partials = self._partials(buckets[0], per * starts[-1])
        at = partials.data_ptr()
        if dirs is None:
            calls = [(lib.norm_partials, (*where, h, adaptive[k], at + 8 * start))
                     for k, (h, start) in enumerate(zip(handles, starts))]
        else:
            calls = [(lib.dots_partials, (*where, h, dirs[k].data_ptr(), at + 24 * start))
                     for k, (h, start) in enumerate(zip(handles, starts))]
        return partials, starts, calls

    def ascend(self, buckets, grad_scale, save=False):
        """The global norm of g1 (a partial sum per chunk of every table), each group's
        ascent row from it (one finalize per group: on CUDA a one-block kernel), then
        perturb per table with that row's eps and fold (``save``: and g1 into the
        direction)."""
        lib = _lib()
        b0 = buckets[0]
        device, c = b0.device, compute_dtype(b0.dtype)
        where = self._where(device)
        handles = [self._handle(b) for b in buckets]
        dirs = [self._dirs(b).data_ptr() for b in buckets] if save else [0] * len(buckets)
        partials, starts, calls = self._norm_calls(
            buckets, handles, [bool(b.gr["adaptive"]) for b in buckets], where)
        runs = group_runs(buckets)
        rows = torch.empty((len(runs), 3), dtype=c, device=device)
        scale = scale_for(grad_scale, device)
        scale_at = 0 if scale is None else scale.data_ptr()
        size, base, code = rows.element_size(), rows.data_ptr(), _CODES[c]
        k = 0
        for g, (gr, members) in enumerate(runs):
            row, alpha = base + 3 * size * g, gr["alpha"]
            calls.append((lib.ascent_finalize, (
                *where, code, partials.data_ptr(), starts[-1], scale_at, row,
                float(gr["rho"]), float(gr["gamma"]), 0.0 if alpha is None else float(alpha),
                bool(gr["normalize"]), alpha is not None, gr["difference"] == "central",
                float(gr.get("eps_sign", 1.0)), float(gr.get("combine_sign", 1.0)))))
            for _ in members:
                calls.append((lib.perturb, (*where, handles[k], row, row + size,
                                            bool(gr["adaptive"]), dirs[k])))
                k += 1
        for fn, args in calls:
            fn(*args)
        self._hold(b0, partials, scale, rows)
        b0.extra["cext_stream"] = where[1]
        return rows  # [eps, fold, combine] of each group

    def combine_update(self, buckets, ascent, grad_scale, skips, direction_valid=None):
        """The norms of G (a partial sum per chunk), one finalize for every group's gscale,
        found_inf, the skip records and, with one AdamW table, its step counts; then the
        update per table. ``direction_valid`` (an interval=k refresh): the norm pass is the
        dots [Σ G², Σ G·g1, Σ g1²], the finalize adds each group's direction coefficients
        and writes (1 − found_inf)·ok into it, and the updates cache the direction."""
        lib = _lib()
        b0 = buckets[0]
        device, c = b0.device, compute_dtype(b0.dtype)
        where = self._where(device)
        runs = group_runs(buckets)
        G = len(runs)
        rows = ascent
        if rows.dtype != c or rows.device != device or not rows.is_contiguous():
            rows = rows.to(device=device, dtype=c).contiguous()
        elif device.type == "cuda" and b0.extra.get("cext_stream") != where[1]:
            rows.record_stream(torch.cuda.current_stream(device))  # made on another stream
        if rows.shape != (G, 3):
            raise ValueError(f"gr_fused: ascent rows of shape {tuple(rows.shape)} for "
                             f"{G} groups")
        handles = [self._handle(b) for b in buckets]
        refresh = direction_valid is not None
        dirs = [self._dirs(b) for b in buckets] if refresh else None
        partials, starts, calls = self._norm_calls(buckets, handles, [False] * len(buckets),
                                                   where, dirs)
        out = torch.empty(G + 1 + (2 * G if refresh else 0), dtype=c, device=device)
        found_inf = out[G]
        valid = None
        if refresh:
            valid = direction_valid
            if (valid.dtype != c or valid.device != device or valid.dim() != 0):
                valid = torch.empty((), dtype=c, device=device)  # copied into it after
        scale = scale_for(grad_scale, device)
        flag = skips.scaler_found_inf
        fused_flag = fusable_scaler_flag(skips, device)
        one_adamw = self._one_adamw(buckets)
        max_norm = runs[0][0]["max_grad_norm"]
        calls.append((lib.update_finalize, (
            *where, _CODES[c], partials.data_ptr(), self._bounds(runs, starts), rows.data_ptr(),
            0 if scale is None else scale.data_ptr(), out.data_ptr(), skips.count.data_ptr(),
            skips.last.data_ptr(), flag.data_ptr() if fused_flag and flag is not None else 0,
            0 if one_adamw is None else handles[one_adamw].ptrs,
            0 if one_adamw is None else handles[one_adamw].num_tensors,
            max_norm is not None, 1.0 if max_norm is None else float(max_norm),
            [float(gr["combine_sign"]) for gr, _ in runs] if refresh else [],
            0 if valid is None else valid.data_ptr())))
        size, base = out.element_size(), out.data_ptr()
        found_at = base + size * G
        keep = [partials, scale, rows, out, valid]
        k = 0
        for g, (_, members) in enumerate(runs):
            for b in members:
                if refresh:  # this group's (a, c) follow found_inf
                    at = base + size * (G + 1 + 2 * g)
                    fn, args, lr_t = self._update_call(
                        b, base + size * g, found_at, k == one_adamw, where, handles[k], _CACHE,
                        dirs[k].data_ptr(), at, at + size)
                else:
                    fn, args, lr_t = self._update_call(b, base + size * g, found_at,
                                                       k == one_adamw, where, handles[k])
                calls.append((fn, args))
                keep.append(lr_t)
                k += 1
        if refresh and valid is not direction_valid:  # the finalize first, then the copy
            calls.insert(len(calls) - k, (direction_valid.copy_, (valid,)))
        for fn, args in calls:
            fn(*args)
        if not fused_flag:
            skips.raise_scaler_flag(found_inf)
        self._hold(b0, *keep)
        return found_inf

    def reuse(self, buckets, grad_scale, valid, skips):
        """interval=k between refreshes: [Σ g1², Σ g1·v̂, Σ v̂²] per chunk of every table,
        one finalize for every group's (u, v) (reuse_scalars), found_inf, the skip records
        and, with one AdamW table, its step counts; then the reuse update per table (on
        CUDA, one group in one table: 3 launches)."""
        lib = _lib()
        b0 = buckets[0]
        device, c = b0.device, compute_dtype(b0.dtype)
        where = self._where(device)
        runs = group_runs(buckets)
        G = len(runs)
        handles = [self._handle(b) for b in buckets]
        dirs = [self._dirs(b) for b in buckets]
        partials, starts, calls = self._norm_calls(buckets, handles, (), where, dirs)
        out = torch.empty(2 * G + 1, dtype=c, device=device)
        found_inf = out[2 * G]
        valid_t = self._scalar(valid, b0)
        scale = scale_for(grad_scale, device)
        flag = skips.scaler_found_inf
        fused_flag = fusable_scaler_flag(skips, device)
        one_adamw = self._one_adamw(buckets)
        max_norm = runs[0][0]["max_grad_norm"]
        calls.append((lib.reuse_finalize, (
            *where, _CODES[c], partials.data_ptr(), self._bounds(runs, starts),
            [float(gr["combine_sign"]) for gr, _ in runs],
            [float(gr["reuse_scale"]) for gr, _ in runs],
            0 if scale is None else scale.data_ptr(), valid_t.data_ptr(), out.data_ptr(),
            skips.count.data_ptr(), skips.last.data_ptr(),
            flag.data_ptr() if fused_flag and flag is not None else 0,
            0 if one_adamw is None else handles[one_adamw].ptrs,
            0 if one_adamw is None else handles[one_adamw].num_tensors,
            max_norm is not None, 1.0 if max_norm is None else float(max_norm))))
        size, base = out.element_size(), out.data_ptr()
        keep = [partials, scale, out, valid_t]
        k = 0
        for g, (_, members) in enumerate(runs):
            for b in members:
                at = base + size * 2 * g  # this group's (u, v)
                fn, args, lr_t = self._update_call(b, at, base + size * 2 * G, k == one_adamw,
                                                   where, handles[k], _REUSE,
                                                   dirs[k].data_ptr(), at + size)
                calls.append((fn, args))
                keep.append(lr_t)
                k += 1
        for fn, args in calls:
            fn(*args)
        if not fused_flag:
            skips.raise_scaler_flag(found_inf)
        self._hold(b0, *keep)
        return found_inf

    @staticmethod
    def _bounds(runs, starts: List[int]) -> List[int]:
        """Where each group's chunks start in the partials (and the total)."""
        bounds, seen = [0], 0
        for _, members in runs:
            seen += len(members)
            bounds.append(starts[seen])
        return bounds

    def _one_adamw(self, buckets) -> Optional[int]:
        """The index of the step's AdamW table when there is exactly one (its step counts
        advance in the finalize), else None."""
        adamw = [i for i, b in enumerate(buckets) if b.algo == "adamw"]
        if len(adamw) != 1:
            return None
        self._check_state(buckets[adamw[0]], True)
        return adamw[0]


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
