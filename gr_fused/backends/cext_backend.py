"""The backends of csrc/'s compiled kernels (``gr_fused._C``), over flat buffers:

* ``"cpu"``: the host build (OpenMP loops) for CPU tensors;
* ``"cuda"``: the CUDA kernels for CUDA tensors.

Both run the same per-element math (csrc/grf_math.h), in torch_backend.py's operation
order. Each phase of a flat bucket is one call into ``gr_fused._C`` with raw data pointers
(``tensor.data_ptr()``), element counts, a dtype code and, on CUDA, the current stream; the
step scalars (eps, fold, gscale, found_inf, AdamW's step) stay in device memory and are
read by the kernels, so no phase synchronizes with the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .base import Backend, Bucket, adamw_state, fusable_scaler_flag, scale_for
from .flat import FlatBackend
from .torch_backend import compute_dtype

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class CKernels(Backend):
    """The phases for one *flat* bucket (flat.py): ``params[0]``, ``grads[0]``,
    ``states[0]`` and ``extra["backup"][0]`` are single contiguous 1-D buffers."""

    name = "c-kernels"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return _ext.unavailable_reason()

    @staticmethod
    def _call(fn: str, p: torch.Tensor, *args) -> None:
        """gr_fused._C.<fn>(device, stream, threads, dtype, n, *args) for the buffer ``p``."""
        if p.is_cuda:
            where = (p.device.index, torch.cuda.current_stream(p.device).cuda_stream, 0)
        else:
            where = (-1, 0, torch.get_num_threads())
        getattr(_ext.load(), fn)(*where, _CODES[p.dtype], p.numel(), *args)

    @staticmethod
    def _scalar(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A step scalar in p's compute dtype on p's device (itself when it already is)."""
        return t.to(device=p.device, dtype=compute_dtype(p.dtype))

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
        return len(fbs) == 1  # csrc's ascent_scalars/update_scalars take one buffer

    def ascend(self, fbs, grad_scale):
        """The norm of g1 and the ascent scalars in one call (csrc's ascent_scalars: on CUDA
        the norm's finalize kernel computes them), then perturb."""
        (b,) = fbs
        p, group = b.params[0], b.group
        out = torch.empty(3, dtype=compute_dtype(p.dtype), device=p.device)
        scale = scale_for(grad_scale, p)
        alpha = group["alpha"]
        self._call("ascent_scalars", p, b.grads[0].data_ptr(),
                   p.data_ptr() if group["adaptive"] else 0, self._partials(p).data_ptr(),
                   0 if scale is None else scale.data_ptr(), out.data_ptr(),
                   float(group["rho"]), float(group["gamma"]),
                   0.0 if alpha is None else float(alpha), bool(group["normalize"]),
                   alpha is not None, group["difference"] == "central")
        eps, fold, _ = out
        self.perturb(b, eps, fold, group["adaptive"])
        return out  # [eps, fold, combine]

    def combine_update(self, fbs, ascent, grad_scale, skips):
        """The norm of G, the update scalars and the skip records in one call (csrc's
        update_scalars), then the update."""
        (b,) = fbs
        p = b.params[0]
        out = torch.empty(2, dtype=compute_dtype(p.dtype), device=p.device)
        scale, flag = scale_for(grad_scale, p), skips.scaler_found_inf
        fused_flag = fusable_scaler_flag(skips, p.device)
        max_norm = b.group["max_grad_norm"]
        self._call("update_scalars", p, b.grads[0].data_ptr(), self._partials(p).data_ptr(),
                   ascent[2].data_ptr(), 0 if scale is None else scale.data_ptr(),
                   out.data_ptr(), skips.count.data_ptr(), skips.last.data_ptr(),
                   flag.data_ptr() if fused_flag and flag is not None else 0,
                   adamw_state(b)["step"].data_ptr() if b.algo == "adamw" else 0,
                   max_norm is not None, 1.0 if max_norm is None else float(max_norm))
        gscale, found_inf = out
        if not fused_flag:
            flag.copy_(torch.maximum(flag, found_inf.to(flag)))
        self.update(b, gscale, found_inf, step_advanced=True)
        return found_inf

    def perturb(self, b, eps, fold, adaptive):
        p = b.params[0]
        eps, fold = self._scalar(eps, p), self._scalar(fold, p)
        self._call("perturb", p, p.data_ptr(), b.grads[0].data_ptr(),
                   b.extra["backup"][0].data_ptr(), eps.data_ptr(), fold.data_ptr(), adaptive)

    def reflect(self, b):
        p = b.params[0]
        self._call("reflect", p, p.data_ptr(), b.grads[0].data_ptr(),
                   b.extra["backup"][0].data_ptr())

    def restore(self, b):
        p = b.params[0]
        self._call("restore", p, p.data_ptr(), b.extra["backup"][0].data_ptr())

    def update(self, b, gscale, found_inf, step_advanced=False):
        p, G, backup, st, group = b.params[0], b.grads[0], b.extra["backup"][0], b.states[0], b.group
        gscale, found_inf = self._scalar(gscale, p), self._scalar(found_inf, p)
        head = (p.data_ptr(), G.data_ptr(), backup.data_ptr())
        if b.algo == "none":
            self._call("update_none", p, *head, gscale.data_ptr(), found_inf.data_ptr())
        elif b.algo == "sgd":
            buf, first = st.get("momentum_buffer"), False
            if group["momentum"] != 0 and buf is None:  # buf = g; zeros if the step is skipped
                buf = st["momentum_buffer"] = torch.empty_like(p)
                first = True
            self._call("update_sgd", p, *head,
                       buf.data_ptr() if group["momentum"] != 0 else 0, first,
                       gscale.data_ptr(), found_inf.data_ptr(), float(group["lr"]),
                       float(group["momentum"]), float(group["dampening"]),
                       float(group["weight_decay"]), bool(group["nesterov"]))
        elif b.algo == "adamw":
            st = adamw_state(b)
            beta1, beta2 = group["betas"]
            self._call("update_adamw", p, *head, st["exp_avg"].data_ptr(),
                       st["exp_avg_sq"].data_ptr(), st["step"].data_ptr(), gscale.data_ptr(),
                       found_inf.data_ptr(), float(group["lr"]), float(beta1), float(beta2),
                       float(group["eps"]), float(group["weight_decay"]), step_advanced)
        else:
            raise ValueError(f"unknown base update {b.algo!r}")


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
