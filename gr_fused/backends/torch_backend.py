"""The pure-PyTorch backend: what runs where no kernel does (Apple MPS, Intel XPU, CUDA
without Triton, any machine without the compiled extension), and the one every kernel
backend is held to.

It moves as few bytes as PyTorch allows: in-place ``torch._foreach_*`` ops on the user's
tensors, no copies for dtypes that need no upcast (reduced-precision tensors are computed in
float32 inside the ops), the step scalars folded into the ops that read the tensors, and
torch's own fused optimizer kernels (``torch._fused_sgd_``, ``torch._fused_adamw_``) for the
base update, which read the skip flag on the device: no phase reads a tensor back to the host.
On a device without fused kernels, the update takes torch's foreach optimizers after one
read of the skip flag; where a device lacks a foreach op, that op runs tensor by tensor, said
once in a warning.

On a CPU (host memory: reading a scalar or the flag costs nothing, and torch's foreach ops
are much faster than its fused CPU kernels) the step scalars are read as numbers, each phase
runs its ops run by run over ~2 MB of parameters at a time (the later ops of a phase find
the tensors in cache), norms of large fp32/fp64 tensors are BLAS dots, and SGD's update is
written here in place (g = gscale·G + wd·θ folded into the momentum update, no temporaries;
G stays in ``p.grad``), AdamW's by torch's foreach AdamW.

The math of each phase (the kernels compute the same; tests/reference_phases.py writes it out
in their operation order):

  perturb   backup = θ;  θ = θ + eps·w·g (w = θ² if adaptive else 1);  g = fold·g
  reflect   θ = 2·backup − θ;  g = −g
  update    θ = backup;  g = gscale·G;  then torch.optim.SGD's or AdamW's step with g
            ("none": θ = backup and G = g, for a base optimizer that steps afterwards)
When found_inf is set, θ = backup and all state is unchanged; a tensor flagged FROZEN gets
θ = backup only.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

from .base import DIRECTION, FLAG_FROZEN, FLAG_NEW_STATE, Backend, Bucket, state_tensors

_LOW = (torch.float16, torch.bfloat16)
HOST_BATCH_BYTES = 2 << 20  # see TorchBackend._batches
DOT_SLICE = 1 << 18  # elements per float64 slice in TorchBackend.dots


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(ts: List[torch.Tensor]) -> List[torch.Tensor]:
    """Tensors in their compute dtype (the same tensors when already there)."""
    return [t.to(compute_dtype(t.dtype)) if t.dtype in _LOW else t for t in ts]


# ------------------------------------------------------------------ foreach, or tensor by tensor
_PER_TENSOR: Dict[tuple, bool] = {}  # (op, device type) -> the device lacks the foreach op


def foreach(op: str, *lists: Sequence, **kwargs):
    """``torch._foreach_<op>(*lists, **kwargs)``, or, where the device has no such foreach op,
    the same op tensor by tensor (said once per op and device type in a warning). Each
    positional argument is a list (of tensors or scalars, one per tensor) or one scalar for
    all; ``op`` ending in ``_`` is in place."""
    tensors = lists[0]
    if not tensors:
        return None if op.endswith("_") else []
    key = (op, tensors[0].device.type)
    if not _PER_TENSOR.get(key):
        try:
            return getattr(torch, f"_foreach_{op}")(*lists, **kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            if not _missing_op(exc):
                raise
            _PER_TENSOR[key] = True
            warnings.warn(f"gr_fused backend 'torch': {tensors[0].device.type} tensors have no "
                          f"torch._foreach_{op}; it runs tensor by tensor ({exc})", stacklevel=3)
    fn = getattr(torch.Tensor, op)
    per_tensor = [a if isinstance(a, (list, tuple)) else [a] * len(tensors) for a in lists]
    out = [fn(*args, **kwargs) for args in zip(*per_tensor)]
    return None if op.endswith("_") else out


def _base_foreach(device: torch.device) -> bool:
    """Whether torch's optimizers can take their foreach path on ``device`` (a probe on
    one-element tensors, once per device type; without it they run tensor by tensor)."""
    key = ("optimizer", device.type)
    if key not in _PER_TENSOR:
        probe = [torch.zeros(1, device=device)]
        try:
            torch._foreach_add_(probe, probe, alpha=1.0)
            torch._foreach_mul_(probe, 1.0)
            torch._foreach_addcmul_(probe, probe, probe, value=1.0)
            _PER_TENSOR[key] = False
        except (NotImplementedError, RuntimeError) as exc:
            if not _missing_op(exc):
                raise
            _PER_TENSOR[key] = True
    return not _PER_TENSOR[key]


def _host_sq_norm(ts: List[torch.Tensor]) -> torch.Tensor:
    """Σ t² over host tensors as a float64 0-dim tensor, each tensor's sum taken in its compute
    dtype: a BLAS dot for large contiguous fp32/fp64 tensors (about twice as fast as torch's
    norm there, and more accurate), torch's norms for the rest (non-finite when an element is
    inf/NaN, or when the sum overflows its dtype; the caller then sums in float64)."""
    is_big = [t.numel() >= 1 << 15 and t.dtype in (torch.float32, torch.float64)
              and t.is_contiguous() for t in ts]
    parts = [torch.dot(t.view(-1), t.view(-1)).double() for t, big in zip(ts, is_big) if big]
    rest = [t for t, big in zip(ts, is_big) if not big]
    if rest:
        low = rest[0].dtype in _LOW
        norms = foreach("norm", rest, 2, dtype=torch.float32) if low else foreach("norm", rest, 2)
        parts.append(torch.stack(norms).double().square().sum())
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def _add_into(out: List[torch.Tensor], a: List[torch.Tensor], b: List[torch.Tensor],
              alpha: float) -> None:
    """out = a + alpha·b, one pass over large tensors (``torch.add(out=)``, tensor by
    tensor), a copy and an add over the small ones (one foreach call each)."""
    small = [i for i, t in enumerate(out) if t.numel() < 1 << 15]
    for i, t in enumerate(out):
        if t.numel() >= 1 << 15:
            torch.add(a[i], b[i], alpha=alpha, out=t)
    if small:
        foreach("copy_", _pick(out, small), _pick(a, small))
        foreach("add_", _pick(out, small), _pick(b, small), alpha=alpha)


def _combined(x: List[torch.Tensor], s, y: List[torch.Tensor], t) -> List[torch.Tensor]:
    """x·s + y·t in float32 (new tensors) for bf16/fp16 ``x`` and ``y``: the scalars stay
    float32 (an op of a bf16 tensor with a scalar rounds the scalar to bf16 first)."""
    n = len(x)
    out = foreach("mul", _up(x), [s] * n)
    foreach("add_", out, foreach("mul", _up(y), [t] * n))
    return out


def _pick(items: Sequence, idx: List[int]) -> list:
    return list(items) if len(idx) == len(items) else [items[i] for i in idx]


def _missing_op(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or "not implemented" in text or \
        "not supported" in text or "could not run" in text


def _fused_devices() -> List[str]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - torch versions before fused optimizers
        return ["cuda"]


_FUSED_DEVICES = _fused_devices()


class TorchBackend(Backend):
    name = "torch"
    supports_reuse = True
    # device types whose tensors live in host memory: reading a flag there is no sync, and
    # torch's foreach optimizers beat its fused kernels (tests empty it to check the
    # sync-free path every other device takes)
    host_devices = {"cpu"}

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None

    def _backups(self, b: Bucket) -> List[torch.Tensor]:
        backups = b.extra.get("backup")
        if backups is None or len(backups) != len(b.params) or any(
                x.shape != p.shape or x.dtype != p.dtype or x.device != p.device
                for x, p in zip(backups, b.params)):
            backups = [torch.empty_like(p, memory_format=torch.preserve_format) for p in b.params]
            b.extra["backup"] = backups
        return backups

    # ------------------------------------------------------------------ phases 1 and 2
    def sq_norm(self, b: Bucket, adaptive: bool) -> torch.Tensor:
        ts = b.grads
        if adaptive:
            ts = foreach("mul", _up(b.params), _up(b.grads))
        # per-tensor norms, squared and summed in float64: a finite fp32/bf16/fp16 gradient
        # cannot overflow, and an inf/NaN element shows. On a CPU the norms are taken in the
        # compute dtype first (a float64 norm is ~30x slower there) and again in float64
        # only if that sum is not finite (an inf/NaN, or a huge finite gradient).
        if ts[0].device.type in self.host_devices:
            total = _host_sq_norm(ts)
            if bool(torch.isfinite(total)):
                return total
        norms = foreach("norm", ts, 2, dtype=torch.float64)
        return torch.stack(norms).square().sum()

    def dots(self, b: Bucket, key: str) -> torch.Tensor:
        """[Σ g², Σ g·d, Σ d²] in float64, over slices of DOT_SLICE elements: the float64
        copies of a slice are the only temporaries (not a float64 copy of every tensor)."""
        sums = []
        for g, d in zip(b.grads, state_tensors(b, key)):
            for x, y in zip(g.reshape(-1).split(DOT_SLICE), d.reshape(-1).split(DOT_SLICE)):
                x, y = x.double(), y.double()
                sums.append(torch.stack([x.dot(x), x.dot(y), y.dot(y)]))
        return torch.stack(sums).sum(0)

    def perturb(self, b, eps, fold, adaptive, save=False):
        backups = self._backups(b)
        host = b.params[0].device.type in self.host_devices
        low = b.params[0].dtype in _LOW
        if host:  # the scalars as numbers (free to read there; foreach ops take them faster)
            eps, fold = eps.item(), fold.item()
        dirs = state_tensors(b, DIRECTION) if save else None
        for idx in self._batches(b, host):
            params, grads = _pick(b.params, idx), _pick(b.grads, idx)
            foreach("copy_", _pick(backups, idx), params)
            if save:  # interval=k refresh: g1 into the direction state, for the update
                foreach("copy_", _pick(dirs, idx), grads)
            n = len(params)
            if adaptive or low:  # θ + (g·eps)·θ² (·1 unless adaptive) in the compute dtype,
                wide = _up(grads)  # rounded once (an op of a bf16/fp16 tensor with a
                step = foreach("mul", wide, [eps] * n)  # scalar rounds the scalar first)
                if adaptive:
                    theta = _up(params)
                    foreach("mul_", step, foreach("mul", theta, theta))
                foreach("add_", params, step)
            elif host:
                foreach("add_", params, grads, alpha=eps)
            else:
                foreach("addcmul_", params, grads, [eps] * n)
            if low:
                foreach("mul_", wide, [fold] * n)
                foreach("copy_", grads, wide)
            else:
                foreach("mul_", grads, [fold] * n)

    def _batches(self, b: Bucket, host: bool) -> List[List[int]]:
        """The tensors' indices in runs of at most HOST_BATCH_BYTES of parameters on host
        memory (a tensor alone when larger), else one run of all: a phase's ops run run by
        run, so its second and later ops find the tensors in the caches the first brought
        them to (on a 2-core EPYC ~20% off a step's update at 10M parameters)."""
        n = len(b.params)
        if not host:
            return [list(range(n))]
        key = tuple(p.numel() * p.element_size() for p in b.params)
        cached = b.extra.get("host_batches")
        if cached is not None and cached[0] == key:
            return cached[1]
        runs: List[List[int]] = [[]]
        size = 0
        for i, nbytes in enumerate(key):
            if runs[-1] and size + nbytes > HOST_BATCH_BYTES:
                runs.append([])
                size = 0
            runs[-1].append(i)
            size += nbytes
        b.extra["host_batches"] = (key, runs)
        return runs

    def reflect(self, b):
        foreach("mul_", b.params, -1.0)
        foreach("add_", b.params, self._backups(b), alpha=2.0)
        foreach("neg_", b.grads)

    def restore(self, b):
        foreach("copy_", b.params, self._backups(b))

    # ------------------------------------------------------------------ phase 3
    def update(self, b, gscale, found_inf, direction=None):
        backups = self._backups(b)
        live = [i for i in range(len(b.params)) if not b.flag(i, FLAG_FROZEN)]
        if direction is not None:  # interval=k refresh: v̂ = a·G + c·g1 into the direction,
            a, c = direction       # zeros when the step is skipped (g1 may hold inf/NaN)
            dirs = state_tensors(b, DIRECTION)
            if dirs and dirs[0].dtype in _LOW:
                foreach("copy_", dirs, _combined(b.grads, a, dirs, c))
            else:
                foreach("mul_", dirs, [c] * len(dirs))
                foreach("addcmul_", dirs, b.grads, [a] * len(dirs))
            self._where_skipped(dirs, [torch.zeros((), dtype=d.dtype, device=d.device)
                                       for d in dirs], found_inf)
        host = b.params[0].device.type in self.host_devices
        frozen = set(range(len(b.params))) - set(live)
        group = b.group
        if (host and b.algo == "sgd" and group["momentum"] and not group["nesterov"]
                and b.params[0].dtype not in _LOW and not bool(found_inf)):
            # SGD with momentum on host memory: θ = backup − lr·buf written once (the
            # restore folded into the update), the decay read from the backup
            gs = 1.0 if gscale is None else float(gscale)
            bufs = state_tensors(b, "momentum_buffer")
            for idx in self._batches(b, host):
                kept = [i for i in idx if i in frozen]
                if kept:
                    foreach("copy_", _pick(b.params, kept), _pick(backups, kept))
                run = [i for i in idx if i not in frozen] if kept else idx
                if run:
                    self._host_sgd(b, run, _pick(b.params, run), _pick(b.grads, run),
                                   _pick(bufs, run), gs, origin=_pick(backups, run))
            return
        for idx in self._batches(b, host):
            # θ restored (and left so when skipped or frozen), then the base update
            foreach("copy_", _pick(b.params, idx), _pick(backups, idx))
            self._step(b, [i for i in idx if i not in frozen] if frozen else idx,
                       found_inf, gscale)

    def reuse_update(self, b, u, v, found_inf):
        """interval=k between refreshes: g = u·g1 + v·v̂, then the base update of θ in
        place (there is no backup); nothing changes when ``found_inf``."""
        live = list(range(len(b.params)))
        g = b.grads
        if b.algo == "none":  # G stays as it is when skipped
            kept = [x.clone() for x in g]
        wide = None
        if g and g[0].dtype in _LOW:  # the step reads g in float32, p.grad gets it rounded
            wide = _combined(g, u, state_tensors(b, DIRECTION), v)
            foreach("copy_", g, wide)
        else:
            foreach("mul_", g, [u] * len(g))
            foreach("addcmul_", g, state_tensors(b, DIRECTION), [v] * len(g))
        if b.algo == "none":
            self._where_skipped(g, kept, found_inf)
            return
        self._step(b, live, found_inf, None, wide)

    @staticmethod
    def _where_skipped(tensors, kept, found_inf) -> None:
        """Put ``kept`` back into ``tensors`` where the step is skipped (no host read)."""
        skip = found_inf != 0
        for t, k in zip(tensors, kept):
            torch.where(skip, k, t, out=t)

    def _step(self, b: Bucket, live: List[int], found_inf, gscale, wide=None) -> None:
        """The base update of the ``live`` tensors with g = gscale·G (G as is when ``gscale``
        is None; ``wide``: G in float32 for bf16/fp16 tensors, read instead of the grads), by
        torch's optimizers; the other tensors keep θ and their state.

        fp32/fp64 tensors are updated in place (by torch's fused kernels off the CPU, which
        skip on the device flag). bf16/fp16 tensors go through float32 working copies,
        rounded back once (the kernels' fp32 math; a skipped step rounds back the same bits;
        torch 2.13's fused CPU SGD rounds reduced-precision tensors wrongly)."""
        params, grads = _pick(b.params, live), _pick(b.grads, live)
        if not params:
            return
        if b.algo == "none":  # G = gscale·G, or G kept when skipped (×1 keeps inf/NaN as is)
            if gscale is not None and not (params[0].device.type in self.host_devices
                                           and gscale.item() == 1.0):  # (SAM: ×1, a no-op)
                factor = torch.where(found_inf != 0, torch.ones_like(gscale), gscale)
                if grads[0].dtype in _LOW:  # in float32: off the CPU, a 0-dim tensor in an
                    # op of bf16 tensors is rounded to bf16 first
                    foreach("copy_", grads, foreach("mul", _up(grads), [factor] * len(grads)))
                else:
                    foreach("mul_", grads, [factor] * len(grads))
            return
        if b.algo == "sgd":
            keys: tuple = ("momentum_buffer",) if b.group["momentum"] else ()
        else:
            keys = ("exp_avg", "exp_avg_sq")
        states = {k: _pick(state_tensors(b, k), live) for k in keys}
        low = params[0].dtype in _LOW
        if low:
            work = [p.float() for p in params]
            wgrads = [g.float() for g in grads] if wide is None else _pick(wide, live)
            wstates = {k: [t.float() for t in ts] for k, ts in states.items()}
        else:
            work, wgrads, wstates = params, grads, states
        # torch's fused kernels, where a device has them (on a CPU its foreach ops are much
        # faster, and reading the flag costs nothing there); they walk contiguous memory
        device = params[0].device.type
        fused = (device not in self.host_devices and device in _FUSED_DEVICES
                 and not params[0].is_complex()
                 and all(t.is_contiguous() for ts in (work, wgrads, *wstates.values())
                         for t in ts))
        if not fused and bool(found_inf):  # skipped (a host read, free on a CPU)
            return
        if device in self.host_devices and b.algo == "sgd":
            self._host_sgd(b, live, work, wgrads, wstates.get("momentum_buffer"),
                           1.0 if gscale is None else float(gscale))
        else:
            if gscale is not None:
                foreach("mul_", wgrads, [gscale] * len(wgrads))
            self._torch_step(b, live, work, wgrads, wstates, fused, found_inf)
        if low:  # round back once (a skipped step gives back the same bits)
            foreach("copy_", params, work)
            for k in keys:
                foreach("copy_", states[k], wstates[k])

    def _torch_step(self, b, live, work, wgrads, wstates, fused, found_inf) -> None:
        """The update by torch's own SGD or AdamW (fused kernels, else foreach)."""
        params = work
        kw = dict(fused=True, found_inf=found_inf.to(torch.float32)) if fused else \
            dict(foreach=_base_foreach(params[0].device))
        group = b.group
        if not fused and isinstance(group["lr"], torch.Tensor):
            # torch's foreach kernels take a tensor lr only when capturable; its value is
            # read here as torch's single-tensor path reads it (the flag was read above)
            group = {**group, "lr": group["lr"].item()}
        if b.algo == "sgd":
            self._sgd(b, live, work, wgrads, wstates.get("momentum_buffer"), group, kw,
                      found_inf)
        else:
            beta1, beta2 = group["betas"]
            torch_adamw(work, wgrads, wstates["exp_avg"], wstates["exp_avg_sq"], [],
                        _pick(state_tensors(b, "step"), live), capturable=False,
                        differentiable=False, amsgrad=False, beta1=beta1, beta2=beta2,
                        lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                        maximize=False, **kw)

    @staticmethod
    def _host_sgd(b, live, params, grads, bufs, gscale: float, origin=None) -> None:
        """torch.optim.SGD's step with g = gscale·G + wd·θ, in place, on host memory: the
        scale and the weight decay ride in the ops that read the tensors, so nothing is
        allocated and G stays as it is in ``p.grad`` (torch's foreach SGD adds the decay into
        a new list of tensors; 40 MB of fresh pages a step at 10M parameters). ``origin``
        (momentum without nesterov only): θ is read from these tensors, written to
        ``params``."""
        group = b.group
        lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
        if not momentum:
            if wd:
                foreach("mul_", params, 1.0 - lr * wd)
            foreach("add_", params, grads, alpha=-lr * gscale)
            return
        dampening, nesterov = group["dampening"], group["nesterov"]
        new = [b.flag(i, FLAG_NEW_STATE) for i in live]
        for is_new in (True, False):
            idx = [j for j, n in enumerate(new) if n == is_new]
            if not idx:
                continue
            p, g, buf = ([ts[j] for j in idx] for ts in (params, grads, bufs))
            theta = p if origin is None else [origin[j] for j in idx]
            # buf = m·buf + (1 − dampening)·g; a new buffer (zeros) becomes g, as torch's
            keep = 1.0 if is_new else 1.0 - dampening
            if not is_new:
                foreach("mul_", buf, momentum)
            foreach("add_", buf, g, alpha=keep * gscale)
            if wd:
                foreach("add_", buf, theta, alpha=keep * wd)
            if origin is not None:
                _add_into(p, theta, buf, -lr)
            elif nesterov:  # θ −= lr·(g + m·buf)
                if wd:
                    foreach("mul_", p, 1.0 - lr * wd)
                foreach("add_", p, g, alpha=-lr * gscale)
                foreach("add_", p, buf, alpha=-lr * momentum)
            else:
                foreach("add_", p, buf, alpha=-lr)

    @staticmethod
    def _sgd(b, live, params, grads, bufs, group, kw, found_inf) -> None:
        common = dict(weight_decay=group["weight_decay"], momentum=group["momentum"],
                      lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                      maximize=False, has_sparse_grad=False)
        if bufs is None:  # no momentum
            torch_sgd(params, grads, [None] * len(params), **common, **kw)
            return
        first = [j for j, i in enumerate(live) if b.flag(i, FLAG_NEW_STATE)]
        rest = [j for j, i in enumerate(live) if not b.flag(i, FLAG_NEW_STATE)]
        if rest:
            torch_sgd([params[j] for j in rest], [grads[j] for j in rest],
                      [bufs[j] for j in rest], **common, **kw)
        if first:  # torch's first step: buf = g; the zeros created for it stay if skipped
            new: List[Optional[torch.Tensor]] = [None] * len(first)
            torch_sgd([params[j] for j in first], [grads[j] for j in first], new, **common, **kw)
            skip = found_inf != 0
            for j, buf in zip(first, new):
                bufs[j].copy_(torch.where(skip, torch.zeros_like(buf), buf))
