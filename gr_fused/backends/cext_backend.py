"""The backends of csrc/'s compiled kernels (``gr_fused._C``), over flat buffers:

* ``"cpu"``: the host build (OpenMP loops) for CPU tensors;
* ``"cuda"``: the CUDA kernels for CUDA tensors.

Both run the same per-element math (csrc/grf_math.h), in torch_backend.py's operation
order. Each phase of a flat bucket is one call into ``gr_fused._C`` with raw data pointers
(``tensor.data_ptr()``), element counts, a dtype code and, on CUDA, the current stream; the
step scalars (eps, fold, gscale, found_inf, AdamW's step) stay in device memory and are
read by the kernels, so no phase synchronizes with the host.

On a CPU both element-wise phases are bound by memory traffic, and in place each spends one
of its streams on a buffer it only writes (where every store first reads its cache line).
So there perturb writes θ' into the backup's buffer (θ stays), update writes the new θ into
the backup's buffer in place, and after each the flat param's and the backup's storages
trade memory (``UntypedStorage._swap_data_ptr_``, O(1)): exactly the state of the in-place
phases, one stream less each. A restore (a perturbed pass raised) trades them back instead
of copying. So a step, whole or aborted, swaps twice and the params end it in the memory
they started in; only during a step (the perturbed forward and backward) do they live at
the backup's address. Every view of the flat param (the parameters, ``.data``,
``.detach()``, user references) shares its storage and follows. On CUDA the phases stay in
place: CUDA graphs captured during a perturbed pass would keep the backup's address.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .base import Backend, Bucket, adamw_state, fusable_scaler_flag, scale_for
from .flat import FlatBackend, fusable_groups, group_runs, raise_scaler_flag
from .torch_backend import compute_dtype

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _where(p: torch.Tensor):
    """(device, stream, threads) of a _C call on p's device: the CUDA device and its current
    stream, or -1 and torch's thread count for the host build."""
    if p.is_cuda:
        return p.device.index, torch.cuda.current_stream(p.device).cuda_stream, 0
    return -1, 0, torch.get_num_threads()


class CKernels(Backend):
    """The phases for one *flat* bucket (flat.py): ``params[0]``, ``grads[0]``,
    ``states[0]`` and ``extra["backup"][0]`` are single contiguous 1-D buffers."""

    name = "c-kernels"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return _ext.unavailable_reason()

    @staticmethod
    def _call(fn: str, p: torch.Tensor, *args):
        """gr_fused._C.<fn>(device, stream, threads, dtype, n, *args) for the buffer ``p``."""
        return getattr(_ext.load(), fn)(*_where(p), _CODES[p.dtype], p.numel(), *args)

    @staticmethod
    def _scalar(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A step scalar in p's compute dtype on p's device (itself when it already is)."""
        return t.to(device=p.device, dtype=compute_dtype(p.dtype))

    @staticmethod
    def _scratch(fb: Bucket, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A step's scratch tensor, kept in the flat bucket ``fb`` and reused every step: a
        fused step reads what it writes there within the same step (on CUDA, in stream
        order), so no allocation runs between the kernels."""
        scratch = fb.extra.setdefault("c_scratch", {})
        t = scratch.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = scratch[name] = torch.empty(shape, dtype=dtype, device=fb.params[0].device)
        return t

    @staticmethod
    def _partials(p: torch.Tensor) -> torch.Tensor:
        """Scratch for the CUDA norm's partial sums (the host build needs none)."""
        return torch.empty(_ext.load().max_norm_blocks if p.is_cuda else 0,
                           dtype=torch.float64, device=p.device)

    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        p, g = b.params[0], b.grads[0]
        out = torch.empty((), dtype=compute_dtype(p.dtype), device=p.device)
        self._call("sq_norm", p, g.data_ptr(), p.data_ptr() if adaptive else 0,
                   self._partials(p).data_ptr(), out.data_ptr())
        return out

    def can_fuse(self, fbs):
        runs = fusable_groups(fbs)
        return (runs is not None and len(runs) <= _ext.load().max_groups
                and len({compute_dtype(fb.dtype) for fb in fbs}) == 1)

    def _partial_sums(self, inputs, keep_in: Optional[Bucket] = None):
        """Stage one of a norm over several flat buffers into one float64 buffer (``_C``'s
        norm_partials: one launch per CUDA buffer, one host loop each on a CPU), kept in the
        bucket ``keep_in`` (see _scratch) if given. Returns it and each input's
        ``bounds[i]:bounds[i + 1]`` in it."""
        p = inputs[0][0]
        shape = (len(inputs) * (_ext.load().max_norm_blocks if p.is_cuda else 1),)
        partials = (torch.empty(shape, dtype=torch.float64, device=p.device) if keep_in is None
                    else self._scratch(keep_in, "partials", shape, torch.float64))
        bounds, at = [0], partials.data_ptr()
        for g, theta in inputs:
            written = self._call("norm_partials", g, g.data_ptr(),
                                 0 if theta is None else theta.data_ptr(), at + 8 * bounds[-1])
            bounds.append(bounds[-1] + written)
        return partials, bounds

    def ascend(self, fbs, grad_scale):
        """The global norm of g1 (stage one per buffer), each group's ascent scalars from it
        (one finalize per group: on CUDA a one-block kernel), then perturb per buffer."""
        runs = group_runs(fbs)
        p = fbs[0].params[0]
        partials, bounds = self._partial_sums(
            [(fb.grads[0], fb.params[0] if fb.group["adaptive"] else None) for fb in fbs], fbs[0])
        ascent = self._scratch(fbs[0], "ascent", (len(runs), 3), compute_dtype(p.dtype))
        scale = scale_for(grad_scale, p)
        where, size = _where(p), ascent.element_size()
        for i, (group, members) in enumerate(runs):
            row, alpha = ascent.data_ptr() + 3 * size * i, group["alpha"]  # [eps, fold, combine]
            _ext.load().ascent_finalize(
                *where, _CODES[ascent.dtype], partials.data_ptr(), bounds[-1],
                0 if scale is None else scale.data_ptr(), row, float(group["rho"]),
                float(group["gamma"]), 0.0 if alpha is None else float(alpha),
                bool(group["normalize"]), alpha is not None, group["difference"] == "central")
            for fb in members:
                self._perturb_at(fb, row, row + size, group["adaptive"])
        return ascent  # rows [eps, fold, combine], one per group

    def combine_update(self, fbs, ascent, grad_scale, skips):
        """The norms of G (stage one per buffer), one finalize for every group's gscale,
        found_inf and the skip records, then the update per buffer."""
        runs = group_runs(fbs)
        p = fbs[0].params[0]
        partials, bounds = self._partial_sums([(fb.grads[0], None) for fb in fbs], fbs[0])
        group_bounds, buffers = [0], 0  # group g's partials: group_bounds[g]:[g + 1]
        for _, members in runs:
            buffers += len(members)
            group_bounds.append(bounds[buffers])
        out = self._scratch(fbs[0], "out", (len(runs) + 1,), ascent.dtype)
        scale, flag = scale_for(grad_scale, p), skips.scaler_found_inf
        fused_flag = fusable_scaler_flag(skips, p.device)
        one_adamw = len(fbs) == 1 and fbs[0].algo == "adamw"  # its step advances in-kernel
        max_norm = runs[0][0]["max_grad_norm"]
        _ext.load().update_finalize(
            *_where(p), _CODES[ascent.dtype], partials.data_ptr(), group_bounds,
            ascent.data_ptr(), 0 if scale is None else scale.data_ptr(), out.data_ptr(),
            skips.count.data_ptr(), skips.last.data_ptr(),
            flag.data_ptr() if fused_flag and flag is not None else 0,
            adamw_state(fbs[0])["step"].data_ptr() if one_adamw else 0,
            max_norm is not None, 1.0 if max_norm is None else float(max_norm))
        found_inf = out[len(runs)]
        raise_scaler_flag(skips, found_inf)
        size, found_inf_at = out.element_size(), out.data_ptr() + out.element_size() * len(runs)
        for i, (_, members) in enumerate(runs):
            for fb in members:  # gscale of group i, then found_inf, as _C pointers into out
                self._update_at(fb, out.data_ptr() + size * i, found_inf_at, one_adamw)
        return found_inf

    def perturb(self, b, eps, fold, adaptive):
        p = b.params[0]
        self._perturb_at(b, self._scalar(eps, p).data_ptr(), self._scalar(fold, p).data_ptr(),
                         adaptive)

    def _perturb_at(self, b, eps_at: int, fold_at: int, adaptive: bool) -> None:
        """perturb, with eps and fold given as addresses of the compute dtype's scalars."""
        p, backup = b.params[0], b.extra["backup"][0]
        swap = _trades_memory(p, backup)
        self._call("perturb", p, p.data_ptr(), b.grads[0].data_ptr(), backup.data_ptr(),
                   eps_at, fold_at, adaptive, swap)
        if swap:  # θ' is in the backup's memory, θ in the params': trade them
            _swap_memory(p, backup)

    def reflect(self, b):
        p = b.params[0]
        self._call("reflect", p, p.data_ptr(), b.grads[0].data_ptr(),
                   b.extra["backup"][0].data_ptr())

    def restore(self, b):
        p, backup = b.params[0], b.extra["backup"][0]
        if _trades_memory(p, backup):  # θ is in the backup's memory since perturb: take it back
            _swap_memory(p, backup)
        else:
            self._call("restore", p, p.data_ptr(), backup.data_ptr())

    def update(self, b, gscale, found_inf, step_advanced=False):
        p = b.params[0]
        self._update_at(b, self._scalar(gscale, p).data_ptr(),
                        self._scalar(found_inf, p).data_ptr(), step_advanced)

    def _update_at(self, b, gscale_at: int, found_inf_at: int, step_advanced: bool) -> None:
        """update, with gscale and found_inf given as addresses of the compute dtype's
        scalars."""
        p, G, backup, st, group = b.params[0], b.grads[0], b.extra["backup"][0], b.states[0], b.group
        swap = _trades_memory(p, backup)  # then the new θ goes into the backup, in place
        head = ((backup if swap else p).data_ptr(), G.data_ptr(), backup.data_ptr())
        if b.algo == "none":
            self._call("update_none", p, *head, gscale_at, found_inf_at)
        elif b.algo == "sgd":
            buf, first = st.get("momentum_buffer"), False
            if group["momentum"] != 0 and buf is None:  # buf = g; zeros if the step is skipped
                buf = st["momentum_buffer"] = torch.empty_like(p)
                first = True
            self._call("update_sgd", p, *head,
                       buf.data_ptr() if group["momentum"] != 0 else 0, first,
                       gscale_at, found_inf_at, float(group["lr"]),
                       float(group["momentum"]), float(group["dampening"]),
                       float(group["weight_decay"]), bool(group["nesterov"]))
        elif b.algo == "adamw":
            st = adamw_state(b)
            beta1, beta2 = group["betas"]
            self._call("update_adamw", p, *head, st["exp_avg"].data_ptr(),
                       st["exp_avg_sq"].data_ptr(), st["step"].data_ptr(), gscale_at,
                       found_inf_at, float(group["lr"]), float(beta1), float(beta2),
                       float(group["eps"]), float(group["weight_decay"]), step_advanced)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")
        if swap:  # the new θ (θ itself, if the step was skipped) into the params' storage
            _swap_memory(p, backup)


# torch's O(1) exchange of two storages' memory, which every view follows. It is private
# (CUDA graph trees and FSDP2 use it), so its absence only turns the swap off.
_SWAP_DATA_PTR = getattr(torch.UntypedStorage, "_swap_data_ptr_", None)
swap_on_cpu = True  # tests turn it off to check the in-place phases on a CPU too


def _trades_memory(p: torch.Tensor, backup: torch.Tensor) -> bool:
    """Whether the flat param ``p`` and ``backup`` trade memory after perturb and update:
    on a CPU, where torch can, when each is its storage's whole buffer (as FlatLayout
    makes them). Checked before a phase writes anything, so a swap cannot fail after it."""
    if not (swap_on_cpu and _SWAP_DATA_PTR is not None and p.device.type == "cpu"):
        return False
    nbytes = p.numel() * p.element_size()
    return (p.storage_offset() == 0 and backup.storage_offset() == 0
            and p.untyped_storage().nbytes() == nbytes == backup.untyped_storage().nbytes())


def _swap_memory(p: torch.Tensor, backup: torch.Tensor) -> None:
    _SWAP_DATA_PTR(p.untyped_storage(), backup.untyped_storage())


class _CompiledBackend(FlatBackend):
    kernel = CKernels()
    supported_dtypes = tuple(_CODES)
    device_type = "?"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if device.type != cls.device_type:
            return f"backend {cls.name!r} runs {cls.device_type} tensors only"
        return _ext.unavailable_reason() or cls._device_reason(device)

    @classmethod
    def _device_reason(cls, device: torch.device) -> Optional[str]:
        return None


class CpuBackend(_CompiledBackend):
    """The host build of csrc/ (OpenMP, vectorized by the compiler) for CPU tensors."""

    name = "cpu"
    device_type = "cpu"


class CudaBackend(_CompiledBackend):
    """The CUDA kernels of csrc/ for CUDA tensors."""

    name = "cuda"
    device_type = "cuda"

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
