"""The step driver shared by every optimizer in gr_fused.

It turns a finite-difference GR step (SPEC §1) into the backend phases of
``gr_fused.backends.base``: norm of g1 → perturb → (second backward) → norm of G → update.
Subclasses only say which base update the backend applies (``_algo``) and how the plain
base optimizer steps when GR is off (``_plain_step``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from .. import backends as _backends
from .._bn import FreezeRunningStats
from ..backends.flat import views_intact, zero_flat_grads
from .._scalars import ascent_scalars, update_scalars
from ..distributed import all_reduce_max, all_reduce_sq_norm, local_shard

GR_DEFAULTS = dict(gamma=0.05, rho=0.05, normalize=True, difference="forward", alpha=None,
                   adaptive=False, max_grad_norm=None)
DIFFERENCES = ("forward", "central")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_gr_hparams(group: Dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid GR hyperparameter of a param group."""
    gamma, rho, alpha = group["gamma"], group["rho"], group["alpha"]
    if not _is_number(gamma) or gamma < 0:
        raise ValueError(f"Invalid gamma: {gamma!r} (a finite number >= 0; 0 turns GR off)")
    if not _is_number(rho):
        raise ValueError(f"Invalid rho: {rho!r} (a finite number; < 0 is the backward difference)")
    if alpha is not None:
        if not _is_number(alpha) or alpha == 0:
            raise ValueError(f"Invalid alpha: {alpha!r} (a finite nonzero number, or None)")
        if gamma != 0:
            raise ValueError(f"Invalid gamma: {gamma!r} with alpha={alpha!r}: give gamma or a "
                             "fixed alpha, not both")
    if gamma != 0 and rho == 0:  # α = γ/ε needs ε ≠ 0; a fixed α with ρ = 0 is the base step
        raise ValueError("Invalid rho: 0 (GR needs a nonzero ascent step; rho > 0 is the "
                         "forward difference, rho < 0 the backward difference)")
    if group["difference"] not in DIFFERENCES:
        raise ValueError(f"Invalid difference: {group['difference']!r} (choose from "
                         f"{DIFFERENCES}; a negative rho gives the backward difference)")
    for flag in ("normalize", "adaptive"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r} (a bool)")
    mgn = group["max_grad_norm"]
    if mgn is not None and (not _is_number(mgn) or mgn <= 0):
        raise ValueError(f"Invalid max_grad_norm: {mgn!r} (a number > 0, or None)")


def check_lr(lr) -> None:
    """Raise ValueError unless ``lr`` is a number (or 1-element tensor) >= 0."""
    value = lr.item() if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"Invalid learning rate: {lr!r}")


def _record_grad_versions(b) -> None:
    """Remember the grad buffers' version counters, to tell later whether a backward wrote
    into them (flat views share their buffer's counter)."""
    layout = b.extra.get("flat")
    b.extra["_grad_versions"] = ([layout.grad._version] * len(b.grads) if layout is not None
                                 else [g._version for g in b.grads])


def gr_enabled(group: Dict[str, Any]) -> bool:
    return group["gamma"] != 0 or group["alpha"] is not None


class _Pending:
    """What lives between first_step() and second_step(): the buckets, the backend that runs
    the step fused (or None), what the ascent left for the update (each group's combine
    coefficient; the fused backend's own tensors), and whether the central difference has
    been reflected."""

    def __init__(self, buckets, fused, ascended, main_device):
        self.buckets = buckets
        self.fused = fused
        self.ascended = ascended
        self.main_device = main_device
        self.reflected = False


class GROptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose step is a finite-difference GR step.

    Two ways to drive it (SPEC §2):

    * ``step(closure)``: the closure zeroes grads, runs forward and backward and returns the
      loss; it is called once per gradient needed, and the loss at θ is returned.
    * ``loss.backward(); opt.first_step(); loss_at_perturbed.backward(); opt.second_step()``
      (with ``opt.reflect_step()`` and one more backward in between for the central
      difference).

    Between ``first_step`` and ``second_step`` the grads hold ``fold·g1``; the second backward
    accumulates onto them. ``optimizer.zero_grad()`` knows this and keeps them; a
    ``model.zero_grad()`` (set_to_none) is also handled; do not zero them in place by hand.
    """

    _algo = "none"
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: Dict[str, Any], backend: str = "auto",
                 freeze_bn_stats: bool = True):
        for k, v in GR_DEFAULTS.items():
            defaults.setdefault(k, v)
        check_gr_hparams(defaults)
        if backend != "auto" and backend not in _backends.names():
            raise ValueError(f"Invalid backend: {backend!r} (choose from {_backends.names()})")
        self._backend_name = backend
        self.freeze_bn_stats = freeze_bn_stats
        self._pending: Optional[_Pending] = None
        self._bucket_extra: Dict[Tuple[int, torch.device, torch.dtype], Dict[str, Any]] = defaultdict(dict)
        self._bn = FreezeRunningStats()
        self._cached_buckets: Optional[List[_backends.Bucket]] = None
        self._fuse_scalars = True  # False: the general path, whose combines can be edited
        self.skipped_steps: Optional[torch.Tensor] = None
        self.last_step_skipped: Optional[torch.Tensor] = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_gr_hparams(self.param_groups[-1])
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: Dict[str, Any]) -> None:
        """Subclasses validate their base hyperparameters here (raise ValueError)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_fuse_scalars", True)
        for group in self.param_groups:
            for k, v in GR_DEFAULTS.items():
                group.setdefault(k, v)

    # ------------------------------------------------------------------ backends
    def backend_for(self, device) -> _backends.Backend:
        """The backend instance this optimizer uses for tensors on ``device``."""
        return _backends.get_backend(self._backend_name, torch.device(device))

    @property
    def backends(self) -> Dict[str, str]:
        """Which backend runs each device's tensors, e.g. ``{"cuda:0": "triton"}``."""
        devices = {p.device for g in self.param_groups for p in g["params"]}
        return {str(d): self.backend_for(d).name for d in sorted(devices, key=str)}

    def _buckets(self) -> List[_backends.Bucket]:
        """Group the params that have a grad by (param group, device, dtype, shard groups).
        FSDP2/DTensor params are stepped through their local shards with the per-tensor torch
        backend; their bucket records the process groups its norms are summed over.

        When every param lives in flat buffers and nothing was replaced since the last step
        (the grads are still the flat views, the params still view their buffer, no param was
        added, no state was loaded), last step's buckets are reused: the step then has no
        per-tensor Python loop."""
        cached = self._cached_buckets
        if cached is not None and self._cache_holds(cached):
            return cached
        buckets = self._build_buckets()
        n_params = sum(len(g["params"]) for g in self.param_groups)
        all_flat = all("flat" in b.extra for b in buckets)
        self._cached_buckets = (buckets if buckets and all_flat and
                                sum(len(b.params) for b in buckets) == n_params else None)
        return buckets

    def _cache_holds(self, buckets) -> bool:
        if sum(len(g["params"]) for g in self.param_groups) != sum(len(b.params) for b in buckets):
            return False
        for b in buckets:
            layout = b.extra["flat"]
            if (layout.params[0].data_ptr() != layout.param.data_ptr()
                    or not views_intact(layout.params, b.grads)):
                return False
        return True

    def load_state_dict(self, state_dict) -> None:
        self._cached_buckets = None  # the loaded state is copied into the flat buffers
        super().load_state_dict(state_dict)

    def _build_buckets(self) -> List[_backends.Bucket]:
        buckets = []
        for gi, group in enumerate(self.param_groups):
            split: Dict[tuple, Tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(param of shape {tuple(p.shape)} in group {gi})")
                local_p, local_g, shard_groups = local_shard(p)  # DTensor (FSDP2): its shard
                lists = split.setdefault((local_p.device, local_p.dtype, shard_groups),
                                         ([], [], [], []))
                lists[0].append(local_p)
                lists[1].append(local_g)
                lists[2].append(self.state[p])
                lists[3].append(p)
            for (device, dtype, shard_groups), (ps, gs, sts, originals) in split.items():
                sharded = any(o is not q for o, q in zip(originals, ps))
                backend = _backends.get_backend("torch", device) if sharded else self.backend_for(device)
                extra = self._bucket_extra[(gi, device, dtype, shard_groups)]
                b = backend.make_bucket(ps, gs, sts, group, self._algo, extra)
                b.extra["_group_index"] = gi
                b.extra["_backend"] = backend
                if sharded:
                    b.extra["shard_params"] = originals
                if shard_groups:
                    b.extra["shard_groups"] = shard_groups
                buckets.append(b)
        return buckets

    @staticmethod
    def _backend(b: _backends.Bucket) -> _backends.Backend:
        return b.extra["_backend"]

    # ------------------------------------------------------------------ AMP
    def _grad_scale(self, device) -> Optional[torch.Tensor]:
        """The scale S (float32 on ``device``) when gr_fused.amp.GradScaler drives this GR
        step (it sets ``grad_scale``); None without AMP."""
        if hasattr(self, "found_inf") and not getattr(self, "_gr_grad_scaler", False):
            for name in ("grad_scale", "found_inf"):
                delattr(self, name)
            raise RuntimeError(
                "torch.amp.GradScaler cannot drive a GR step: it checks the gradients for inf/NaN "
                "before step() has computed them, so it would never see an overflow of either "
                "gradient. Use gr_fused.amp.GradScaler, a drop-in subclass, with the same "
                "scaler.step(opt, closure) and scaler.update(). The weights are unchanged.")
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return None
        return scale.to(device=device, dtype=torch.float32)

    def _skip_record(self, device) -> _backends.SkipRecord:
        """Where this step's skip flag goes: ``skipped_steps`` (a running count),
        ``last_step_skipped`` (a fresh 0-dim bool each step) and the GradScaler's flag."""
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.last_step_skipped = torch.empty((), dtype=torch.bool, device=self.skipped_steps.device)
        scaler_flag = getattr(self, "found_inf", None)
        return _backends.SkipRecord(self.skipped_steps, self.last_step_skipped,
                                    scaler_flag if isinstance(scaler_flag, torch.Tensor) else None)

    def _report_found_inf(self, found_inf: torch.Tensor) -> None:
        """Record the skip flag where users (and GradScaler) can see it, without a sync."""
        self._skip_record(found_inf.device).record(found_inf)

    # ------------------------------------------------------------------ public API
    def gr_active(self) -> bool:
        """True when this step is a GR step (γ != 0 or α set); False runs the base optimizer."""
        flags = {gr_enabled(g) for g in self.param_groups}
        if len(flags) > 1:
            raise ValueError("Invalid gamma: GR must be on (gamma > 0 or alpha set) in every "
                             "param group or off (gamma = 0, alpha None) in all of them")
        return flags.pop()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One optimizer step. With GR on, ``closure`` is required and is called 2 times
        (forward/backward difference) or 3 times (central); returns the loss at θ."""
        if not self.gr_active():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._plain_step()
            return loss
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure that zeroes grads, "
                               "runs forward and backward and returns the loss (GR evaluates "
                               "the gradient twice); or use first_step()/second_step()")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        try:
            with torch.enable_grad():
                closure()
            if self._pending is not None and self._needs_reflect():
                self.reflect_step()
                with torch.enable_grad():
                    closure()
        except BaseException:
            self.abort_step()
            raise
        self.second_step(zero_grad=False)
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """After the backward at θ: move θ to the ascent point θ + ε_t·g1.

        The grads are left holding ``fold·g1`` for the next backward to accumulate onto, so
        ``zero_grad`` is accepted for compatibility with SAM code and has no effect."""
        if self._pending is not None:
            raise RuntimeError("first_step() called twice without second_step()")
        if not self.gr_active():
            raise RuntimeError("first_step() with GR off (gamma=0, alpha=None): call step()")
        buckets = self._buckets()
        if not buckets:
            self._pending = _Pending([], None, {}, None)
            return
        main = buckets[0].device
        scale = self._grad_scale(main)
        fused = self._fusing_backend(buckets)
        if fused is not None:  # the scalars come out of the norms' kernels (6 launches)
            ascended = fused.ascend(buckets, scale)
        else:
            ascended = self._ascend_buckets(buckets, main, scale)
        for b in buckets:  # to tell, later, whether backward wrote into these buffers
            _record_grad_versions(b)
        self._pending = _Pending(buckets, fused, ascended, main)
        if self.freeze_bn_stats:
            self._bn.start()

    def _fusing_backend(self, buckets) -> Optional[_backends.Backend]:
        """The backend that can run this step with its scalars fused into the norms: one
        backend for every bucket, one device, no sharded (FSDP2/DTensor) bucket, the skip
        counter on that device, and the backend's can_fuse. None: the general path."""
        backend, device = self._backend(buckets[0]), buckets[0].device
        if not self._fuse_scalars or (self.skipped_steps is not None
                                      and self.skipped_steps.device != device):
            return None
        for b in buckets:
            if (self._backend(b) is not backend or b.device != device
                    or "shard_params" in b.extra or "shard_groups" in b.extra):
                return None
        return backend if backend.can_fuse(buckets) else None

    def _ascend_buckets(self, buckets, main, scale) -> Dict[int, torch.Tensor]:
        """first_step on the general path (any buckets: param groups, devices, dtypes,
        shards): the global norm and each group's ascent scalars with torch ops, then
        perturb. Returns each group's combine (``_pending.ascended``, which
        ``distributed.local_ascent_step`` edits)."""
        inv = None if scale is None else scale.reciprocal()
        adaptive = {b.extra["_group_index"]: b.group["adaptive"] for b in buckets}
        sq = _global_sq_norm(main, buckets, adaptive=True)
        scalars = {}
        for gi in sorted(adaptive):
            g = self.param_groups[gi]
            scalars[gi] = ascent_scalars(sq, inv, rho=g["rho"], normalize=g["normalize"],
                                         gamma=g["gamma"], alpha=g["alpha"],
                                         difference=g["difference"])
        for b in buckets:
            eps, fold, _ = scalars[b.extra["_group_index"]]
            self._backend(b).perturb(b, eps.to(b.device), fold.to(b.device),
                                     b.group["adaptive"])
        return {gi: s[2] for gi, s in scalars.items()}

    def _update_buckets(self, buckets, combine, main, scale) -> torch.Tensor:
        """second_step on the general path: per-group norms of G, the update scalars
        (global clipping, one found_inf for all) with torch ops, then each bucket's update."""
        inv = None if scale is None else scale.reciprocal()
        groups = sorted(combine)
        sq_by_group = [_global_sq_norm(main, [b for b in buckets
                                              if b.extra["_group_index"] == gi], adaptive=False)
                       for gi in groups]
        gscales, found_inf = update_scalars(
            sq_by_group, [combine[gi] for gi in groups], inv,
            [self.param_groups[gi]["max_grad_norm"] for gi in groups])
        for gi, gscale in zip(groups, gscales):
            for b in buckets:
                if b.extra["_group_index"] == gi:
                    self._backend(b).update(b, gscale.to(b.device), found_inf.to(b.device))
        return found_inf

    def _needs_reflect(self) -> bool:
        return any(b.group["difference"] == "central" for b in self._pending.buckets)

    @torch.no_grad()
    def reflect_step(self) -> None:
        """Central difference only, after the backward at θ + ε_t·g1: move to θ − ε_t·g1."""
        if self._pending is None:
            raise RuntimeError("reflect_step() called without first_step()")
        if not self._needs_reflect() or self._pending.reflected:
            raise RuntimeError("reflect_step() is for difference='central', once per step")
        self._adopt_replaced_grads()
        for b in self._pending.buckets:
            self._backend(b).reflect(b)
            _record_grad_versions(b)
        self._pending.reflected = True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """After the backward at the perturbed point: combine, restore θ exactly and apply
        the base update (or skip it, with θ restored, when either gradient had inf/NaN)."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("second_step() called without first_step()")
        if self._needs_reflect() and not pending.reflected:
            self.abort_step()
            raise RuntimeError("difference='central' needs reflect_step() and a third backward "
                               "before second_step(); the weights were restored")
        last_skipped = self.last_step_skipped  # kept if this step raises before reporting
        try:
            self._adopt_replaced_grads()
            buckets = pending.buckets
            if buckets:
                main = pending.main_device
                scale = self._grad_scale(main)
                skips = self._skip_record(main)
                if pending.fused is not None:
                    found_inf = pending.fused.combine_update(buckets, pending.ascended, scale,
                                                             skips)
                else:
                    found_inf = self._update_buckets(buckets, pending.ascended, main, scale)
                    skips.record(found_inf)
                self._after_update(found_inf)
        except BaseException:
            self.last_step_skipped = last_skipped
            raise
        finally:
            self._pending = None
            self._bn.stop()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abort_step(self) -> None:
        """Give up the GR step in progress: θ is restored exactly, no state changes."""
        pending, self._pending = self._pending, None
        self._bn.stop()
        if pending is not None:
            for b in pending.buckets:
                self._backend(b).restore(b)

    def state_dict(self):
        if self._pending is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): the "
                               "weights are at the perturbed point; save between steps")
        return super().state_dict()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pending is not None:
            return  # the grads carry the folded first gradient until second_step()
        kept = zero_flat_grads(self._bucket_extra.values())  # flat grads: zeroed in place
        if len(kept) == sum(len(g["params"]) for g in self.param_groups):
            return
        kept = set(map(id, kept))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in kept:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    # ------------------------------------------------------------------ hooks
    def _adopt_replaced_grads(self) -> None:
        """If a closure replaced p.grad (``model.zero_grad()`` sets it to None, then backward
        allocates a fresh tensor), add the fresh gradient onto the buffer that holds the
        folded first gradient and put that buffer back as p.grad. (For a DTensor shard the
        fresh local grad takes the held one in, and the bucket follows it.)"""
        for b in self._pending.buckets:
            originals = b.extra.get("shard_params")
            if originals is None and views_intact(b.params, b.grads):
                continue
            for i, p in enumerate(b.params):
                held = b.grads[i]
                if originals is not None:
                    grad = originals[i].grad
                    local = None if grad is None else local_shard(originals[i])[1]
                    if local is not None and local.data_ptr() != held.data_ptr():
                        local.add_(held)
                        b.grads[i] = local
                    continue
                if p.grad is held:
                    continue
                if p.grad is not None:
                    if held._version != b.extra["_grad_versions"][i]:
                        # backward accumulated into the held buffer before p.grad was replaced
                        # (DDP with gradient_as_bucket_view copies it into its bucket, all-reduces
                        # and installs the bucket view): the new tensor already holds all of G
                        held.copy_(p.grad)
                    else:  # a fresh gradient only (model.zero_grad() set p.grad to None)
                        held.add_(p.grad)
                p.grad = held
            _record_grad_versions(b)

    def _after_update(self, found_inf: torch.Tensor) -> None:
        """Called after the backend update (the GR wrapper steps its base optimizer here)."""

    def _plain_step(self) -> None:
        raise NotImplementedError

    def _plain_grads(self, group) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _plain_prepare(self) -> bool:
        """AMP unscale and clipping for the plain (GR off) path, on local shards for FSDP2 /
        DTensor grads (norms and inf flags reduced over the shard groups). Returns False when
        the step must be skipped for inf/NaN (one host sync, as torch.amp.GradScaler does for
        any non-fused optimizer)."""
        per_group = [[local_shard(p)[1:] for p in g["params"] if p.grad is not None]
                     for g in self.param_groups]
        by_kind = defaultdict(list)  # (shard groups, device, dtype) -> local grads
        for grads in per_group:
            for grad, shard in grads:
                by_kind[(shard, grad.device, grad.dtype)].append(grad)
        scale = getattr(self, "grad_scale", None)
        found = None
        if scale is not None:
            found = torch.zeros((), device=scale.device)
            for (shard, device, _), grads in by_kind.items():
                f = torch.zeros((), device=device)
                inv = scale.to(device=device, dtype=torch.float32).reciprocal()
                torch._amp_foreach_non_finite_check_and_unscale_(grads, f, inv)
                found = torch.maximum(found, all_reduce_max(f, shard).to(found.device))
            self._report_found_inf(found)
        elif isinstance(getattr(self, "found_inf", None), torch.Tensor):
            found = self.found_inf  # scaler.unscale_(opt) already unscaled and checked them
            self._report_found_inf(found)
        clip = [i for i, g in enumerate(self.param_groups) if g["max_grad_norm"] is not None]
        if clip and by_kind:  # clip_grad_norm_ semantics: the global norm of every group's grads
            main = next(iter(by_kind.values()))[0].device
            total = _sum_on(main, [all_reduce_sq_norm(torch.stack(torch._foreach_norm(
                grads, 2)).float().square().sum(), shard)
                for (shard, _, _), grads in by_kind.items()]).sqrt()
            for i in clip:
                coef = torch.clamp(self.param_groups[i]["max_grad_norm"] / (total + 1e-6), max=1.0)
                for device in {grad.device for grad, _ in per_group[i]}:
                    torch._foreach_mul_([grad for grad, _ in per_group[i] if grad.device == device],
                                        coef.to(device))
        return found is None or not bool(found.item())


def _global_sq_norm(main, buckets: List[_backends.Bucket], adaptive: bool) -> torch.Tensor:
    """Σ over ``buckets`` of their squared norms (with each group's ``adaptive`` weighting if
    ``adaptive``), on ``main``. Buckets of sharded parameters (FSDP2 / DTensor local shards,
    whose process groups ``_buckets`` puts in ``extra["shard_groups"]``) are summed over those
    groups, so every rank gets the global norm and takes the same skip decision."""
    parts: Dict[Tuple[Any, ...], List[torch.Tensor]] = defaultdict(list)
    for b in buckets:
        sq = b.extra["_backend"].sq_norm(b, adaptive and b.group["adaptive"])
        parts[b.extra.get("shard_groups", ())].append(sq)
    return _sum_on(main, [all_reduce_sq_norm(_sum_on(main, sqs), groups) if groups
                          else _sum_on(main, sqs) for groups, sqs in parts.items()])


def _sum_on(device, tensors: List[torch.Tensor]) -> torch.Tensor:
    """Deterministic sum of 0-dim tensors from several devices, on ``device``."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.stack([t.to(device=device, dtype=dtype) for t in tensors]).sum()
