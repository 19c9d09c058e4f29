"""The Triton backend: every phase of a GR step is one kernel launch over a bucket's tensor
table (``tensor_table.py``, ``gr_fused/kernels``), whatever the number of tensors; the user's
parameters, gradients and state stay their own tensors.

With one param group a GR step is 6 launches with SGD or AdamW (7 for the central
difference): the norm of g1 and the ascent scalars (2), perturb (1), the norm of G and the
update scalars (2), the update (1). With G groups in K tables it is 4K + G + 1 (AdamW with
several tables: + K step advances). The kernels never sync with the host.

With ``interval=k`` (``supports_reuse``) a refresh step is the same 6 launches: perturb also
saves g1 into each tensor's direction state, the norm of G also sums G·g1 and g1², the
update finalize also computes the direction's coefficients (``_scalars.direction_scalars``)
and the update caches the direction. A step in between is 3 launches: [Σ g1², Σ g1·v̂, Σ v̂²]
per chunk, a finalize (``_scalars.reuse_scalars``, the skip records, AdamW's steps), and the
update of θ in place from g = u·g1 + v·v̂ (2K + 1 with G groups in K tables; AdamW with
several tables + K). The direction's addresses are not a row of the shared tensor table: a
``StateRow`` beside it holds them (built when the direction state exists, which the driver
creates after the table).

Every launch runs under a device guard for the tensors' device (Triton launches on the
current CUDA device and its current stream). The norms' partial sums go to scratch kept in
the bucket, one buffer per CUDA stream, so that a first and a second step issued on
different streams never share one.

The kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``gr_fused.kernels`` is first imported), which is how CI
checks the same kernel code without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import List, Optional

import torch

from .base import (DIRECTION, Bucket, fusable_groups, fusable_scaler_flag, group_runs,
                   scale_for, state_tensors)
from .multi_tensor import MultiTensorBackend, table_of

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = exc

MAX_FUSED_GROUPS = 64   # param groups one update finalize handles (its loop is unrolled)
_SCRATCH = "triton_scratch"
_STATE_ROWS = "triton_state_rows"


def _getter(key: str):
    return lambda state: state.get(key)


def _interpret_requested() -> bool:
    """Whether Triton would define kernels for its interpreter now (TRITON_INTERPRET)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton versions before knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    import gr_fused.kernels as kernels  # defines the kernels on first import
    return kernels


def _defined_interpreted() -> Optional[bool]:
    """How the kernels were defined (None: not imported yet, so they will follow the env)."""
    module = sys.modules.get("gr_fused.kernels")
    return None if module is None else module.INTERPRETED


def guard_index(device: torch.device) -> Optional[int]:
    """The CUDA device that must be current while kernels for tensors on ``device`` launch,
    or None (CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.current_device() if device.index is None else device.index
    return None


def device_guard(device: torch.device):
    """The context every launch runs in: ``device`` made the current CUDA device (Triton
    launches on the current device's current stream), restored afterwards."""
    index = guard_index(device)
    return contextlib.nullcontext() if index is None else torch.cuda.device(index)


def _stream_key(device: torch.device) -> int:
    """Which stream the launches issued now run on (0 off CUDA)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _number(x) -> float:
    """A hyperparameter as a Python float (a tensor lr costs one read, as in torch.optim)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class TritonBackend(MultiTensorBackend):
    """``backend="triton"``: the phases as Triton kernels walking each bucket's table."""

    name = "triton"
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    supports_reuse = True

    def __init__(self, chunk: Optional[int] = None):
        from ..kernels.triton_common import BLOCK
        chunk = BLOCK if chunk is None else int(chunk)
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, not {chunk}")
        self.chunk = chunk  # elements per table chunk = per program (the kernels' BLOCK)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return f"triton is not importable ({_IMPORT_ERROR!r})"
        device = torch.device(device)
        defined = _defined_interpreted()
        interpreted = _interpret_requested() if defined is None else defined
        if device.type == "cuda":
            if interpreted:
                return ("the kernels were defined for the Triton interpreter (TRITON_INTERPRET=1) "
                        "and would run on the host")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
            return None
        if device.type == "cpu":
            if interpreted:
                return None
            if _interpret_requested():
                return ("TRITON_INTERPRET=1 was set after gr_fused.kernels was imported; set it "
                        "before the first import")
            return ("the Triton kernels need CUDA tensors (on CPU they run only under the Triton "
                    "interpreter, TRITON_INTERPRET=1, which is for tests)")
        return f"the Triton kernels do not run on {device.type} tensors"

    # ------------------------------------------------------------------ scratch
    @staticmethod
    def _scratch(b: Bucket, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of at least ``size`` elements kept in ``b.extra`` for the stream the
        launches go to now: what a step writes there it reads back in the same stream, so
        steps on one stream reuse it in order, and another stream gets its own."""
        cache = b.extra.setdefault(_SCRATCH, {})
        key = (name, _stream_key(b.device))
        t = cache.get(key)
        if t is None or t.numel() < size or t.dtype != dtype:
            t = cache[key] = torch.empty(max(size, 1), dtype=dtype, device=b.device)
        return t

    @staticmethod
    def _uploaded(b: Bucket, name: str, values: tuple, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a device tensor, uploaded again only when they change (one per
        ``name`` and stream)."""
        cache = b.extra.setdefault(_SCRATCH, {})
        key = (name, _stream_key(b.device))
        held = cache.get(key)
        if held is None or held[0] != values:
            host = torch.tensor(values, dtype=dtype)
            held = cache[key] = (values, host if b.device.type == "cpu"
                                 else host.to(b.device, non_blocking=True))
        return held[1]

    def _bounds(self, b: Bucket, edges: tuple) -> torch.Tensor:
        """``edges`` as an int64 device tensor, uploaded once per layout (and stream)."""
        return self._uploaded(b, "bounds", edges, torch.int64)

    @staticmethod
    def _check_state(b: Bucket) -> None:
        """The update's state rows must hold every tensor's state (the driver creates what is
        missing before the update); a kernel would otherwise write to address 0."""
        table = table_of(b)
        if b.extra.get("triton_checked") is table.ptrs:
            return
        if b.algo == "sgd":
            keys: tuple = ("momentum_buffer",) if b.group["momentum"] != 0 else ()
        else:
            keys = ("exp_avg", "exp_avg_sq", "step") if b.algo == "adamw" else ()
        for key in keys:  # (an empty tensor's address may be 0: no chunk reads it)
            if any(a == 0 and (n or key == "step")
                   for a, n in zip(table.host_row(key), table.numels)):
                raise RuntimeError(f"gr_fused triton backend: a tensor has no {key!r} state at "
                                   "the update (create_missing_state runs first)")
        b.extra["triton_checked"] = table.ptrs

    # ------------------------------------------------------------------ interval=k rows
    @staticmethod
    def _state_row(b: Bucket, key: str = DIRECTION):
        """The addresses of each tensor's ``key`` state (the interval=k direction) as a
        :class:`~gr_fused.kernels.triton_common.StateRow` beside the bucket's table, kept in
        the bucket and uploaded again when an address changes. A state tensor whose dtype or
        memory layout differs from its parameter's (a checkpoint of another layout) is
        replaced by a copy laid out like the parameter."""
        host = [0 if t is None else t.data_ptr() for t in map(_getter(key), b.states)]
        cache = b.extra.setdefault(_STATE_ROWS, {})
        row = cache.get(key)
        if row is not None and row.host == host and row.ptrs.device == b.device:
            return row
        for i, (p, t) in enumerate(zip(b.params, state_tensors(b, key))):
            if t is None:
                if p.numel():
                    raise RuntimeError(f"gr_fused triton backend: a tensor has no {key!r} state "
                                       "(create_direction_state runs first)")
                continue
            if t.dtype != p.dtype or t.shape != p.shape or (p.numel() and t.stride() != p.stride()):
                fresh = torch.empty_like(b.sources[i], memory_format=torch.preserve_format)
                fresh.copy_(b.states[i][key])
                b.states[i][key] = fresh
                host[i] = fresh.data_ptr()
        row = cache[key] = _kernels().StateRow(host, b.device)
        return row

    def _group_hparams(self, b: Bucket, runs, reuse: bool) -> torch.Tensor:
        """Each group's combine sign, then its reuse_scale (a refresh reads the signs only),
        as a float64 device tensor (uploaded once per set of values and stream)."""
        values = tuple(float(gr.get("combine_sign", 1.0)) for gr, _ in runs) + tuple(
            float(gr["reuse_scale"] if reuse else gr.get("reuse_scale", 0.0)) for gr, _ in runs)
        return self._uploaded(b, "hparams", values, torch.float64)

    # ------------------------------------------------------------------ the phases
    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        k, table = _kernels(), table_of(b)
        with device_guard(b.device):
            partials = self._scratch(b, "partials", table.num_chunks, torch.float64)
            k.partial_sq(table, partials, 0, adaptive)
            out = torch.empty((), dtype=torch.float64, device=b.device)
            k.finalize_sq(partials, table.num_chunks, out)
        return out

    def dots(self, b: Bucket, key: str) -> torch.Tensor:
        """[Σ g², Σ g·s, Σ s²] (float64, 3) with s the ``key`` state: two launches."""
        k, table = _kernels(), table_of(b)
        with device_guard(b.device):
            row = self._state_row(b, key)
            count = table.num_chunks
            partials = self._scratch(b, "partials", 3 * count, torch.float64)
            k.partial_dots(table, row, partials, 0, count)
            out = torch.empty(3, dtype=torch.float64, device=b.device)
            k.finalize_sq(partials, count, out, planes=3, stride=count)
        return out

    def perturb(self, b, eps, fold, adaptive, save=False):
        with device_guard(b.device):
            _kernels().perturb(table_of(b), eps, fold, adaptive,
                               self._state_row(b) if save else None)

    def reflect(self, b):
        with device_guard(b.device):
            _kernels().reflect(table_of(b))

    def restore(self, b):
        with device_guard(b.device):
            _kernels().restore(table_of(b))

    def update(self, b, gscale, found_inf, direction=None):
        with device_guard(b.device):
            mix = None
            if direction is not None:  # interval=k refresh: d ← a·G + c·d on the way
                k = _kernels()
                mix = k.Mix(k.REFRESH, self._state_row(b), direction[0], direction[1])
            self._update(b, gscale, found_inf, step_advanced=False, mix=mix)

    def reuse_update(self, b, u, v, found_inf):
        """interval=k between refreshes: g = u·G + v·d, the base update of θ in place."""
        with device_guard(b.device):
            k = _kernels()
            self._update(b, u, found_inf, step_advanced=False,
                         mix=k.Mix(k.REUSE, self._state_row(b), None, v))

    def _update(self, b: Bucket, gscale: torch.Tensor, found_inf: torch.Tensor,
                step_advanced: bool, mix=None) -> None:
        k, table, group = _kernels(), table_of(b), b.group
        mix = k.Mix() if mix is None else mix
        self._check_state(b)
        if b.algo == "none":
            k.restore_and_combine(table, gscale, found_inf, mix=mix)
        elif b.algo == "sgd":
            k.sgd_update(table, gscale, found_inf, lr=_number(group["lr"]),
                         momentum=group["momentum"], dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"], mix=mix)
        elif b.algo == "adamw":
            beta1, beta2 = group["betas"]
            k.adamw_update(table, gscale, found_inf, lr=_number(group["lr"]), beta1=beta1,
                           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           advance_step=not step_advanced, mix=mix)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")

    # ------------------------------------------------------------------ the fused step
    def can_fuse(self, buckets: List[Bucket]) -> bool:
        runs = fusable_groups(buckets)
        return runs is not None and len(runs) <= MAX_FUSED_GROUPS

    def ascend(self, buckets, grad_scale, save=False):
        """Stage one of the norm of g1 per table into one buffer of partial sums, each group's
        ascent finalize over all of them (the norm is global), each group's perturbs (with
        ``save``, an interval=k refresh: saving g1 into the direction state)."""
        k, runs, first = _kernels(), group_runs(buckets), buckets[0]
        device = first.device
        with device_guard(device):
            tables = [table_of(b) for b in buckets]
            total = sum(t.num_chunks for t in tables)
            partials = self._scratch(first, "partials", total, torch.float64)
            base = 0
            for b, table in zip(buckets, tables):
                k.partial_sq(table, partials, base, b.gr["adaptive"])
                base += table.num_chunks
            rows = torch.empty((len(runs), 3), dtype=torch.float32, device=device)
            scale = scale_for(grad_scale, device)
            for i, (gr, members) in enumerate(runs):
                k.ascent_finalize(partials, total, scale, rows, i, gr)
                eps, fold = rows[i, 0], rows[i, 1]
                for b in members:
                    k.perturb(table_of(b), eps, fold, gr["adaptive"],
                              self._state_row(b) if save else None)
        return rows

    def _partials_by_group(self, runs, tables, first, k, rows_of_state=None):
        """Stage one of each table into one buffer: Σ G² (one plane), or with
        ``rows_of_state`` (each table's StateRow) the three planes of [Σ g², Σ g·s, Σ s²].
        Returns (partials, edges of each group's range, the widest range, the plane stride)."""
        total = sum(t.num_chunks for t in tables)
        planes = 1 if rows_of_state is None else 3
        partials = self._scratch(first, "partials", planes * total, torch.float64)
        edges, base, at = [0], 0, 0
        for _, members in runs:
            for _ in members:
                table = tables[at]
                if rows_of_state is None:
                    k.partial_sq(table, partials, base, False)
                else:
                    k.partial_dots(table, rows_of_state[at], partials, base, total)
                base += table.num_chunks
                at += 1
            edges.append(base)
        widest = max(hi - lo for lo, hi in zip(edges, edges[1:]))
        return partials, edges, widest, total

    def combine_update(self, buckets, ascent, grad_scale, skips, direction_valid=None):
        """Stage one of the norm of G per table, one update finalize for every group
        (gscale, found_inf, the skip records, AdamW's steps when there is one table), then
        each table's update. ``direction_valid`` (an interval=k refresh): the norm pass reads
        the saved g1 too, the finalize adds each group's direction coefficients and writes
        whether there is a direction into it, and the updates cache the direction."""
        k, runs, first = _kernels(), group_runs(buckets), buckets[0]
        device = first.device
        refresh = direction_valid is not None
        with device_guard(device):
            ascent = ascent.to(device=device, dtype=torch.float32).contiguous()
            if device.type == "cuda":  # allocated where first_step ran; read on this stream
                ascent.record_stream(torch.cuda.current_stream(device))
            tables = [table_of(b) for b in buckets]
            state_rows = [self._state_row(b) for b in buckets] if refresh else None
            partials, edges, widest, stride = self._partials_by_group(runs, tables, first, k,
                                                                      state_rows)
            G = len(runs)
            out = torch.empty(3 * G + 1 if refresh else G + 1, dtype=torch.float32,
                              device=device)
            fused_flag = fusable_scaler_flag(skips, device)
            one_adamw = len(buckets) == 1 and first.algo == "adamw"  # its steps advance there
            if one_adamw:
                self._check_state(first)
            direction = None
            if refresh:
                direction = (stride, self._group_hparams(first, runs, False), direction_valid)
            k.update_finalize(partials, self._bounds(first, tuple(edges)), widest, ascent,
                              scale_for(grad_scale, device), out,
                              max_grad_norm=runs[0][0]["max_grad_norm"],
                              skipped_steps=skips.count, last_step_skipped=skips.last,
                              scaler_found_inf=skips.scaler_found_inf if fused_flag else None,
                              steps_table=tables[0] if one_adamw else None, direction=direction)
            found_inf = out[G]
            if not fused_flag:
                skips.raise_scaler_flag(found_inf)
            at = 0
            for i, (_, members) in enumerate(runs):
                gscale = out[i]
                for b in members:
                    mix = None
                    if refresh:
                        mix = k.Mix(k.REFRESH, state_rows[at], out[G + 1 + i], out[2 * G + 1 + i])
                    self._update(b, gscale, found_inf, step_advanced=one_adamw, mix=mix)
                    at += 1
        return found_inf

    def reuse(self, buckets, grad_scale, valid, skips):
        """An interval=k step between refreshes, fused: the three sums [Σ g1², Σ g1·v̂, Σ v̂²]
        per table (one launch each), one finalize for every group (``reuse_scalars``, the
        skip records, AdamW's steps when there is one table), each table's reuse update:
        3 launches with one param group."""
        k, runs, first = _kernels(), group_runs(buckets), buckets[0]
        device = first.device
        with device_guard(device):
            tables = [table_of(b) for b in buckets]
            state_rows = [self._state_row(b) for b in buckets]
            partials, edges, widest, stride = self._partials_by_group(runs, tables, first, k,
                                                                      state_rows)
            G = len(runs)
            out = torch.empty(2 * G + 1, dtype=torch.float32, device=device)
            fused_flag = fusable_scaler_flag(skips, device)
            one_adamw = len(buckets) == 1 and first.algo == "adamw"
            if one_adamw:
                self._check_state(first)
            valid = valid.to(device=device, dtype=torch.float32)
            k.reuse_finalize(partials, self._bounds(first, tuple(edges)), widest, stride,
                             self._group_hparams(first, runs, True), scale_for(grad_scale, device),
                             valid, out, max_grad_norm=runs[0][0]["max_grad_norm"],
                             skipped_steps=skips.count, last_step_skipped=skips.last,
                             scaler_found_inf=skips.scaler_found_inf if fused_flag else None,
                             steps_table=tables[0] if one_adamw else None)
            found_inf = out[G]
            if not fused_flag:
                skips.raise_scaler_flag(found_inf)
            at = 0
            for i, (_, members) in enumerate(runs):
                for b in members:
                    mix = k.Mix(k.REUSE, state_rows[at], None, out[G + 1 + i])
                    self._update(b, out[i], found_inf, step_advanced=one_adamw, mix=mix)
                    at += 1
        return found_inf
