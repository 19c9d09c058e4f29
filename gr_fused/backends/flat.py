"""Flat buffers: the parameters of one bucket in one contiguous buffer, so that every phase
of a step is one kernel launch whatever the number of tensors.

For a bucket (one param group on one (device, dtype)) a :class:`FlatLayout` owns

* ``param``: one 1-D buffer; each parameter's ``.data`` becomes a view into it;
* ``grad``: one 1-D buffer; each ``p.grad`` is a view into it, so autograd accumulates
  straight into it (the optimizer's ``zero_grad`` zeroes it in place and keeps the views);
* ``state``: the optimizer state as flat tensors under torch.optim's key names
  (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``); ``optimizer.state[p]`` holds
  views into them, so ``state_dict`` and ``load_state_dict`` keep working;
* ``backup``: the exact copy of θ kept during a GR step (never in a state_dict).

A kernel backend then implements the phases of :class:`~.base.Backend` for a *flat bucket*:
a :class:`~.base.Bucket` whose lists hold exactly one tensor each (``params[0]`` is the flat
param, ``grads[0]`` the flat grad, ``states[0]`` the flat state dict, and
``extra["backup"][0]`` the flat backup). :class:`~.torch_backend.TorchBackend` satisfies that
contract too, which is how the flat layer itself is tested.

Tensors that cannot be flattened (non-contiguous, DTensor/FSDP shards, views into storage
they do not own, e.g. shared with another optimizer, or a dtype the kernels lack) take the
per-tensor torch path instead, and that is said once in a warning.
"""
from __future__ import annotations

import warnings
from operator import attrgetter, is_
from typing import Any, Dict, List, Optional, Sequence

import torch

from .base import Backend, Bucket, fusable_scaler_flag
from .torch_backend import TorchBackend

_grad_of = attrgetter("grad")
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq"), "none": ()}


def views_intact(params, grads) -> bool:
    """``p.grad is g`` for every pair, checked at C speed (no per-tensor Python loop)."""
    return all(map(is_, map(_grad_of, params), grads))


def _why_not_flat(p: torch.Tensor, supported_dtypes) -> Optional[str]:
    if p.dtype not in supported_dtypes:
        return f"dtype {p.dtype} has no kernel"
    if type(p.data) is not torch.Tensor:
        return f"{type(p.data).__name__} parameters (e.g. FSDP/DTensor shards)"
    if not p.is_contiguous():
        return "non-contiguous parameters"
    if p.untyped_storage().nbytes() != p.numel() * p.element_size():
        return "parameters that are views into a larger storage (shared with another optimizer?)"
    return None


class FlatLayout:
    """Flat buffers for one bucket; see the module docstring."""

    def __init__(self, params: Sequence[torch.Tensor], states: Sequence[Dict[str, Any]],
                 algo: str):
        self.params = list(params)
        self.algo = algo
        self.offsets: List[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        first = self.params[0]
        self.param = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.param)
        self.backup = torch.empty_like(self.param)
        for p, view in zip(self.params, self.views(self.param)):
            view.copy_(p.data)
            p.data = view
        self.state: Dict[str, torch.Tensor] = {}
        self._ingest_state(states)
        self._grad_views = self.views(self.grad)
        self._state_views: Dict[str, List[torch.Tensor]] = {}

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return [flat[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """True when ``params`` are exactly this layout's params, still viewing its buffer."""
        if len(params) != len(self.params):
            return False
        base = self.param.data_ptr()
        size = self.param.element_size()
        return all(p is q and p.data_ptr() == base + o * size
                   for p, q, o in zip(params, self.params, self.offsets))

    def _ingest_state(self, states: Sequence[Dict[str, Any]]) -> None:
        """Copy per-parameter state (e.g. just loaded from a checkpoint) into flat tensors."""
        for key in _STATE_KEYS[self.algo]:
            if all(key in st for st in states):
                flat = torch.empty_like(self.param)
                for view, st in zip(self.views(flat), states):
                    view.copy_(st[key])
                self.state[key] = flat
        if self.algo == "adamw" and "step" in states[0]:
            self.state["step"] = states[0]["step"].detach().to(
                device=self.param.device, dtype=torch.float32).clone()

    def adopt(self, grads: Sequence[torch.Tensor], states: Sequence[Dict[str, Any]]) -> None:
        """Make every p.grad and state entry a view of the flat buffers again, copying in
        any tensor that replaced one (set_to_none zero_grad, load_state_dict)."""
        for p, g, view in zip(self.params, grads, self._grad_views):
            if g is not view:
                view.copy_(g)
                p.grad = view
        for key, flat in self.state.items():
            if key == "step":
                if any(st.get("step") is not flat for st in states):
                    if states[0].get("step") is not None and states[0]["step"] is not flat:
                        flat.copy_(states[0]["step"])
                    for st in states:
                        st["step"] = flat
                continue
            views = self._state_views.get(key)
            if views is None:
                views = self._state_views[key] = self.views(flat)
            for st, view in zip(states, views):
                held = st.get(key)
                if held is not view:
                    if held is not None:
                        view.copy_(held)
                    st[key] = view

    def flat_bucket(self, group: Dict[str, Any], algo: str) -> Bucket:
        return Bucket([self.param], [self.grad], [self.state], group, algo,
                      {"backup": [self.backup]})


class FlatBackend(Backend):
    """Runs a kernel backend over flat buffers. Subclasses set ``name``, ``kernel`` (a
    :class:`~.base.Backend` for flat buckets) and ``supported_dtypes``."""

    name = "flat-torch"
    kernel: Backend = TorchBackend()
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    _fallback = TorchBackend()

    @classmethod
    def unavailable_reason(cls, device):
        return cls.kernel.unavailable_reason(device)

    def make_bucket(self, params, grads, states, group, algo, extra):
        layout: Optional[FlatLayout] = extra.get("flat")
        if layout is None or not layout.matches(params):
            reasons = {r for r in (_why_not_flat(p, self.supported_dtypes) for p in params) if r}
            if reasons:
                if not extra.get("warned"):
                    warnings.warn(f"gr_fused backend {self.name!r}: {len(params)} tensors take the "
                                  f"per-tensor torch path because of {'; '.join(sorted(reasons))}",
                                  stacklevel=4)
                    extra["warned"] = True
                extra.pop("flat", None)
                return Bucket(params, grads, states, group, algo, extra)
            layout = FlatLayout(params, states, algo)
            extra["flat"] = layout
            extra["flat_bucket"] = layout.flat_bucket(group, algo)
        layout.adopt(grads, states)
        flat_bucket: Bucket = extra["flat_bucket"]
        flat_bucket.group = group
        return Bucket(params, layout._grad_views, states, group, algo, extra)

    def _flat(self, b: Bucket) -> Optional[Bucket]:
        return b.extra["flat_bucket"] if "flat" in b.extra else None

    def sq_norm(self, b, adaptive):
        fb = self._flat(b)
        return self._fallback.sq_norm(b, adaptive) if fb is None else self.kernel.sq_norm(fb, adaptive)

    def perturb(self, b, eps, fold, adaptive):
        fb = self._flat(b)
        if fb is None:
            return self._fallback.perturb(b, eps, fold, adaptive)
        self.kernel.perturb(fb, eps, fold, adaptive)

    def reflect(self, b):
        fb = self._flat(b)
        self._fallback.reflect(b) if fb is None else self.kernel.reflect(fb)

    def restore(self, b):
        fb = self._flat(b)
        self._fallback.restore(b) if fb is None else self.kernel.restore(fb)

    def update(self, b, gscale, found_inf):
        fb = self._flat(b)
        if fb is None:
            return self._fallback.update(b, gscale, found_inf)
        keys = _state_keys([b])
        self.kernel.update(fb, gscale, found_inf)
        _adopt_created_state([b], keys)

    def can_fuse(self, buckets):
        return (all("flat" in b.extra for b in buckets)
                and self.kernel.can_fuse([self._flat(b) for b in buckets]))

    def ascend(self, buckets, grad_scale):
        return self.kernel.ascend([self._flat(b) for b in buckets], grad_scale)

    def combine_update(self, buckets, ascended, grad_scale, skips):
        keys = _state_keys(buckets)
        found_inf = self.kernel.combine_update([self._flat(b) for b in buckets], ascended,
                                               grad_scale, skips)
        _adopt_created_state(buckets, keys)
        return found_inf


def _state_keys(buckets: Sequence[Bucket]) -> List[set]:
    """The flat state each bucket's layout holds, before an update that may create some."""
    return [set(b.extra["flat"].state) for b in buckets]


def _adopt_created_state(buckets: Sequence[Bucket], before: List[set]) -> None:
    """Where the update created flat state (a first step), point the per-parameter state
    entries at it."""
    for b, keys in zip(buckets, before):
        if set(b.extra["flat"].state) != keys:
            b.extra["flat"].adopt(b.grads, b.states)


def group_runs(fbs: Sequence[Bucket]) -> List[tuple]:
    """Flat buckets as runs of one param group each: ``[(group, [bucket, ...]), ...]``."""
    runs: List[tuple] = []
    for fb in fbs:
        if runs and runs[-1][0] is fb.group:
            runs[-1][1].append(fb)
        else:
            runs.append((fb.group, [fb]))
    return runs


def fusable_groups(fbs: Sequence[Bucket]) -> Optional[List[tuple]]:
    """``group_runs(fbs)`` when a kernel backend can fuse the step's scalars over them: each
    group's buckets in a row and one ``max_grad_norm`` for all groups (clip_grad_norm_ over
    all of them; per-group thresholds take the driver's torch-op path). Else None."""
    runs = group_runs(fbs)
    if (len({id(group) for group, _ in runs}) != len(runs)
            or len({group["max_grad_norm"] for group, _ in runs}) != 1):
        return None
    return runs


def raise_scaler_flag(skips, found_inf: torch.Tensor) -> None:
    """Raise the GradScaler's flag to found_inf with torch ops where the finalize kernel
    could not (see ``base.fusable_scaler_flag``)."""
    if not fusable_scaler_flag(skips, found_inf.device):
        skips.raise_scaler_flag(found_inf)


def update_all(kernel: Backend, runs: List[tuple], out: torch.Tensor, skips,
               step_advanced: bool) -> torch.Tensor:
    """The end of a fused ``combine_update``, after its finalize wrote ``out`` = [gscale of
    each group..., found_inf]: raise the GradScaler's flag if the finalize could not (see
    ``base.fusable_scaler_flag``), then update every flat bucket with its group's gscale.
    Returns found_inf."""
    found_inf = out[len(runs)]
    raise_scaler_flag(skips, found_inf)
    for gscale, (_, members) in zip(out, runs):
        for fb in members:
            kernel.update(fb, gscale, found_inf, step_advanced=step_advanced)
    return found_inf


def zero_flat_grads(extras) -> list:
    """Zero the flat grad buffers in place (one fill per bucket) and return the parameters
    whose grads are still views of them, so ``zero_grad`` leaves those alone."""
    kept = []
    for extra in extras:
        layout: Optional[FlatLayout] = extra.get("flat")
        if layout is None:
            continue
        layout.grad.zero_()
        if views_intact(layout.params, layout._grad_views):
            kept.extend(layout.params)
        else:
            kept.extend(p for p, v in zip(layout.params, layout._grad_views) if p.grad is v)
    return kept
