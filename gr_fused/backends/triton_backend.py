"""The Triton backend: every phase of a GR step is one kernel launch over a bucket's tensor
table (``tensor_table.py``, ``gr_fused/kernels``), whatever the number of tensors; the user's
parameters, gradients and state stay their own tensors.

With one param group a GR step is 6 launches with SGD or AdamW (7 for the central
difference): the norm of g1 and the ascent scalars (2), perturb (1), the norm of G and the
update scalars (2), the update (1). With G groups in K tables it is 4K + G + 1 (AdamW with
several tables: + K step advances). The kernels never sync with the host.

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

from .base import Bucket, fusable_groups, fusable_scaler_flag, group_runs, scale_for
from .multi_tensor import MultiTensorBackend, table_of

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = exc

MAX_FUSED_GROUPS = 64   # param groups one update finalize handles (its loop is unrolled)
_SCRATCH = "triton_scratch"


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
    def _bounds(b: Bucket, edges: tuple) -> torch.Tensor:
        """``edges`` as an int64 device tensor, uploaded once per layout (and stream)."""
        cache = b.extra.setdefault(_SCRATCH, {})
        key = ("bounds", _stream_key(b.device))
        held = cache.get(key)
        if held is None or held[0] != edges:
            host = torch.tensor(edges, dtype=torch.int64)
            held = cache[key] = (edges, host if b.device.type == "cpu"
                                 else host.to(b.device, non_blocking=True))
        return held[1]

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

    # ------------------------------------------------------------------ the phases
    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        k, table = _kernels(), table_of(b)
        with device_guard(b.device):
            partials = self._scratch(b, "partials", table.num_chunks, torch.float64)
            k.partial_sq(table, partials, 0, adaptive)
            out = torch.empty((), dtype=torch.float64, device=b.device)
            k.finalize_sq(partials, table.num_chunks, out)
        return out

    def perturb(self, b, eps, fold, adaptive):
        with device_guard(b.device):
            _kernels().perturb(table_of(b), eps, fold, adaptive)

    def reflect(self, b):
        with device_guard(b.device):
            _kernels().reflect(table_of(b))

    def restore(self, b):
        with device_guard(b.device):
            _kernels().restore(table_of(b))

    def update(self, b, gscale, found_inf):
        with device_guard(b.device):
            self._update(b, gscale, found_inf, step_advanced=False)

    def _update(self, b: Bucket, gscale: torch.Tensor, found_inf: torch.Tensor,
                step_advanced: bool) -> None:
        k, table, group = _kernels(), table_of(b), b.group
        self._check_state(b)
        if b.algo == "none":
            k.restore_and_combine(table, gscale, found_inf)
        elif b.algo == "sgd":
            k.sgd_update(table, gscale, found_inf, lr=_number(group["lr"]),
                         momentum=group["momentum"], dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"])
        elif b.algo == "adamw":
            beta1, beta2 = group["betas"]
            k.adamw_update(table, gscale, found_inf, lr=_number(group["lr"]), beta1=beta1,
                           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           advance_step=not step_advanced)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")

    # ------------------------------------------------------------------ the fused step
    def can_fuse(self, buckets: List[Bucket]) -> bool:
        runs = fusable_groups(buckets)
        return runs is not None and len(runs) <= MAX_FUSED_GROUPS

    def ascend(self, buckets, grad_scale):
        """Stage one of the norm of g1 per table into one buffer of partial sums, each group's
        ascent finalize over all of them (the norm is global), each group's perturbs."""
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
                    k.perturb(table_of(b), eps, fold, gr["adaptive"])
        return rows

    def combine_update(self, buckets, ascent, grad_scale, skips):
        """Stage one of the norm of G per table, one update finalize for every group
        (gscale, found_inf, the skip records, AdamW's steps when there is one table), then
        each table's update."""
        k, runs, first = _kernels(), group_runs(buckets), buckets[0]
        device = first.device
        with device_guard(device):
            ascent = ascent.to(device=device, dtype=torch.float32).contiguous()
            if device.type == "cuda":  # allocated where first_step ran; read on this stream
                ascent.record_stream(torch.cuda.current_stream(device))
            tables = [table_of(b) for b in buckets]
            partials = self._scratch(first, "partials", sum(t.num_chunks for t in tables),
                                     torch.float64)
            edges, base, at = [0], 0, 0
            for _, members in runs:
                for _ in members:
                    table = tables[at]
                    k.partial_sq(table, partials, base, False)
                    base += table.num_chunks
                    at += 1
                edges.append(base)
            widest = max(hi - lo for lo, hi in zip(edges, edges[1:]))
            out = torch.empty(len(runs) + 1, dtype=torch.float32, device=device)
            fused_flag = fusable_scaler_flag(skips, device)
            one_adamw = len(buckets) == 1 and first.algo == "adamw"  # its steps advance there
            if one_adamw:
                self._check_state(first)
            k.update_finalize(partials, self._bounds(first, tuple(edges)), widest, ascent,
                              scale_for(grad_scale, device), out,
                              max_grad_norm=runs[0][0]["max_grad_norm"],
                              skipped_steps=skips.count, last_step_skipped=skips.last,
                              scaler_found_inf=skips.scaler_found_inf if fused_flag else None,
                              steps_table=tables[0] if one_adamw else None)
            found_inf = out[len(runs)]
            if not fused_flag:
                skips.raise_scaler_flag(found_inf)
            for i, (_, members) in enumerate(runs):
                gscale = out[i]
                for b in members:
                    self._update(b, gscale, found_inf, step_advanced=one_adamw)
        return found_inf
