"""The step driver shared by every optimizer in gr_fused.

It turns a finite-difference GR step (docs/design.md) into the backend phases of
``gr_fused.backends.base``: norm of g1 → perturb → (second backward) → norm of G → update.
Subclasses only say which base update the backend applies (``_algo``) and how the plain
base optimizer steps when GR is off (``_plain_step``).

Each step collects the parameters that have a gradient, as torch.optim does: the tensors
are the user's own (nothing is re-pointed), so freezing a layer, ``model.zero_grad()``,
``p.data = ...`` and ``model.to(...)`` between steps behave as they do with torch.optim.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from .. import backends as _backends
from .._bn import FreezeRunningStats
from .._scalars import ascent_scalars, direction_scalars, reuse_scalars, update_scalars
from ..backends.base import DIRECTION, FLAG_FROZEN, FLAG_NEW_STATE, group_runs, real
from ..backends.tensor_table import STATE_ROWS
from ..backends.torch_backend import compute_dtype
from ..distributed import all_reduce_max, all_reduce_sq_norm, local_shard

GR_KEYS = ("gamma", "rho", "normalize", "difference", "alpha", "adaptive", "max_grad_norm",
           "interval", "reuse_scale")
GR_DEFAULTS = dict(gamma=0.05, rho=0.05, normalize=True, difference="forward", alpha=None,
                   adaptive=False, max_grad_norm=None, interval=1, reuse_scale=0.7)
DIFFERENCES = ("forward", "central")
_grad_of = attrgetter("grad")
_version_of = attrgetter("_version")
_is_sparse = attrgetter("is_sparse")
_device_of = attrgetter("device")
_dtype_of = attrgetter("dtype")
_PLAIN = {torch.Tensor, torch.nn.Parameter}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_gamma(gamma: Optional[float], alpha: Optional[float]) -> float:
    """``gamma`` left unset means the default γ, or 0 when a fixed ``alpha`` is given."""
    if gamma is not None:
        return gamma
    return 0.0 if alpha is not None else GR_DEFAULTS["gamma"]


def check_gr_hparams(gr: Dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid GR hyperparameter of a param group."""
    gamma, rho, alpha = gr["gamma"], gr["rho"], gr["alpha"]
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
    if gr["difference"] not in DIFFERENCES:
        raise ValueError(f"Invalid difference: {gr['difference']!r} (choose from "
                         f"{DIFFERENCES}; a negative rho gives the backward difference)")
    for flag in ("normalize", "adaptive"):
        if not isinstance(gr[flag], bool):
            raise ValueError(f"Invalid {flag}: {gr[flag]!r} (a bool)")
    mgn = gr["max_grad_norm"]
    if mgn is not None and (not _is_number(mgn) or mgn <= 0):
        raise ValueError(f"Invalid max_grad_norm: {mgn!r} (a number > 0, or None)")
    k = gr["interval"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid interval: {k!r} (an int >= 1; 1 takes a second gradient "
                         "every step)")
    if not _is_number(gr["reuse_scale"]) or gr["reuse_scale"] < 0:
        raise ValueError(f"Invalid reuse_scale: {gr['reuse_scale']!r} (a number >= 0)")


def check_base_hparams(optimizer_class, **hparams) -> Dict[str, Any]:
    """Validate a torch optimizer's own hyperparameters with torch's checks and messages
    (by building that optimizer over an empty tensor), and refuse a learning rate that is
    not finite. Returns the defaults torch builds from them: its keys, for this version."""
    defaults = dict(optimizer_class([torch.zeros(0)], **hparams).defaults)
    lr = hparams.get("lr")
    value = lr.item() if isinstance(lr, torch.Tensor) else lr
    if lr is not None and not math.isfinite(value):
        raise ValueError(f"Invalid learning rate: {lr}")
    return defaults


def gr_enabled(gr: Dict[str, Any]) -> bool:
    return gr["gamma"] != 0 or gr["alpha"] is not None


class _Pending:
    """What lives between first_step() and second_step(): the buckets, the backend that runs
    the step fused (or None), each group's ascent row [eps, fold, combine] (``rows``, which
    ``distributed.local_ascent_step`` edits) and whether the central difference has been
    reflected."""

    def __init__(self, buckets, fused, rows, main_device):
        self.buckets = buckets
        self.fused = fused
        self.rows = rows
        self.main_device = main_device
        self.reflected = False
        self.zeroing_check: Optional[_InPlaceZeroingCheck] = None

    def close(self) -> None:
        if self.zeroing_check is not None:
            self.zeroing_check.close()
            self.zeroing_check = None


class _InPlaceZeroingCheck:
    """What happened to the grads that carry fold·g1 before the next backward reached them,
    seen on one parameter: a hook runs before each gradient is accumulated into its grad
    (torch runs a leaf tensor's hooks before the accumulation), and its first call looks.

    * ``zeroed``: the grad is still the tensor holding fold·g1 but its version moved, so it
      was changed in place (``model.zero_grad(set_to_none=False)``, ``p.grad.zero_()``).
      Not checked for a view (views of one base share its version counter: DDP's bucket
      views move with every write to their bucket). ``p.grad.data.zero_()`` goes around the
      version counter and is not seen.
    * ``copied``: the grad was replaced by a tensor equal to fold·g1 (DDP rebuilding its
      buckets copies each grad into a new bucket view), so the backward accumulates onto a
      copy of fold·g1, and the fresh grad holds all of G.
    * ``cleared``: the grad was None. If the held tensor is the grad again after the
      backward, its owner put it back after writing the fresh gradient into it (DDP with
      gradient_as_bucket_view): fold·g1 is gone.

    A grad set to None is fine (the optimizer adds the fresh gradient onto the one it
    holds). DDP and FSDP edit grads only after the accumulation."""

    def __init__(self, param: torch.Tensor, grad: torch.Tensor):
        self.param, self.grad, self.version = param, grad, grad._version
        self.versioned = not grad._is_view()
        self.seen = self.zeroed = self.copied = self.cleared = False
        self.handle = param.register_hook(self)

    def __call__(self, incoming: torch.Tensor) -> None:
        if self.seen:
            return
        self.seen = True
        now = self.param.grad
        self.cleared = now is None
        if now is self.grad:
            self.zeroed = self.versioned and self.grad._version != self.version
        elif now is not None:  # rare: one comparison of one tensor
            self.copied = now.shape == self.grad.shape and bool(torch.equal(now, self.grad))

    def close(self) -> None:
        self.handle.remove()


class GROptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose step is a finite-difference GR step.

    Two ways to drive it:

    * ``step(closure)``: the closure zeroes grads, runs forward and backward and returns the
      loss; it is called once per gradient needed, and the loss at θ is returned.
    * ``loss.backward(); opt.first_step(); loss_at_perturbed.backward(); opt.second_step()``
      (with ``opt.reflect_step()`` and one more backward in between for the central
      difference).

    Between ``first_step`` and ``second_step`` the grads hold ``fold·g1``; the second backward
    accumulates onto them. ``optimizer.zero_grad()`` knows this and keeps them, and a
    ``model.zero_grad()`` (set_to_none) in between is handled too; zeroing them in place
    (``set_to_none=False``, ``p.grad.zero_()``) erases fold·g1 and is refused with an error
    (``_InPlaceZeroingCheck``), the weights restored.
    ``second_step()`` is the optimizer step of such a loop: the step hooks run around it.
    """

    _algo = "none"
    _step_supports_amp_scaling = True
    # GR hyperparameter -> its key in the param groups (the GR wrapper renames the ones its
    # base optimizer also uses, e.g. RMSprop's alpha, to "gr_alpha")
    _gr_names: Dict[str, str] = {k: k for k in GR_KEYS}
    # attributes kept by copy.deepcopy / pickle / torch.save besides torch's three
    _COPIED = ("_backend_name", "freeze_bn_stats", "skipped_steps", "last_step_skipped",
               "_gr_names", "_gr_steps", "_gr_valid")

    def __init__(self, params, defaults: Dict[str, Any], backend: str = "auto",
                 freeze_bn_stats: bool = True):
        for k, v in GR_DEFAULTS.items():
            defaults.setdefault(self._gr_names[k], v)
        check_gr_hparams(self._gr(defaults))
        if backend != "auto" and backend not in _backends.names():
            raise ValueError(f"Invalid backend: {backend!r} (choose from {_backends.names()})")
        self._backend_name = backend
        self.freeze_bn_stats = freeze_bn_stats
        self.skipped_steps: Optional[torch.Tensor] = None
        self.last_step_skipped: Optional[torch.Tensor] = None
        self._gr_steps = 0  # GR steps taken (interval=k refreshes the direction when k divides it)
        self._gr_valid: Optional[torch.Tensor] = None  # 1. once a refresh cached a direction
        self._init_runtime()
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        """What a step uses and a copy does not carry (rebuilt on first use)."""
        d = self.__dict__
        d["_pending"] = None
        d["_bucket_extra"] = {}
        d["_bn"] = FreezeRunningStats()
        d["_fuse_scalars"] = True  # False: the general path, whose combines can be edited
        d["_unsettled"] = None  # new momentum buffers whose step may have been skipped

    # ------------------------------------------------------------------ param groups
    def _gr(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The GR hyperparameters of a param group, under their own names."""
        names = self._gr_names
        return {k: group[names[k]] for k in GR_KEYS}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if getattr(self, "_pending", None) is not None:
            raise RuntimeError("add_param_group() between first_step() and second_step()")
        names = self._gr_names
        gamma, alpha = names["gamma"], names["alpha"]
        if alpha in param_group and gamma not in param_group and param_group[alpha] is not None:
            param_group[gamma] = 0.0       # a group's own fixed alpha: no inherited gamma
        elif gamma in param_group and alpha not in param_group and param_group[gamma]:
            param_group[alpha] = None      # a group's own gamma: no inherited alpha
        with warnings.catch_warnings():  # torch only warns of duplicates: refused below
            warnings.filterwarnings("ignore", message=".*duplicate parameters")
            super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            params = group["params"]
            if len(set(map(id, params))) != len(params):
                raise ValueError("a parameter appears twice in one param group: GR would move "
                                 "it twice and restore it once; pass each parameter once "
                                 "(model.parameters() lists a tied weight once)")
            check_gr_hparams(self._gr(group))
            self._check_group(group)
        except BaseException:
            self.param_groups.pop()
            raise

    def _check_group(self, group: Dict[str, Any]) -> None:
        """Subclasses validate their base hyperparameters here (raise ValueError)."""

    # ------------------------------------------------------------------ copies, checkpoints
    def __getstate__(self) -> Dict[str, Any]:
        if self.__dict__.get("_pending") is not None:
            raise RuntimeError("cannot copy or pickle the optimizer between first_step() and "
                               "second_step(): the weights are at the perturbed point")
        self._settle_new_state()
        state = super().__getstate__()
        for name in self._COPIED:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_pending" not in self.__dict__:  # a copy (load_state_dict keeps what is there)
            self._init_runtime()
        d = self.__dict__
        d.setdefault("_backend_name", "auto")
        d.setdefault("freeze_bn_stats", True)
        d.setdefault("skipped_steps", None)
        d.setdefault("last_step_skipped", None)
        d.setdefault("_gr_steps", 0)
        d.setdefault("_gr_valid", None)
        for group in self.param_groups:  # keys older checkpoints lack, as torch backfills them
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def state_dict(self):
        if self._pending is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): the "
                               "weights are at the perturbed point; save between steps")
        self._settle_new_state()
        state_dict = super().state_dict()
        if self._interval() > 1:  # where the interval=k cycle stands (the direction is state)
            state_dict["gr_fused"] = {"steps": self._gr_steps, "direction_valid": self._gr_valid}
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        """torch's load_state_dict; a param group key the checkpoint lacks (a torch.optim
        checkpoint has no GR keys, an older one may lack a flag) keeps this optimizer's value
        for that group."""
        if self._pending is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        before = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        saved = state_dict["param_groups"]
        for old, loaded in zip(before, saved):  # refuse before anything is replaced
            group = dict(old, **{k: v for k, v in loaded.items() if k != "params"})
            check_gr_hparams(self._gr(group))
            self._check_group(group)
        cycle = state_dict.get("gr_fused", {})
        super().load_state_dict(state_dict)
        self._unsettled = None
        self._gr_steps = int(cycle.get("steps", 0))
        valid = cycle.get("direction_valid")
        self._gr_valid = None if valid is None else valid.detach().clone()
        self._bucket_extra.clear()  # the tensors may be new: tables and checks start over
        for group, old, loaded in zip(self.param_groups, before, saved):
            for k, v in old.items():
                if k not in loaded:
                    group[k] = v

    # ------------------------------------------------------------------ backends
    def backend_for(self, device) -> _backends.Backend:
        """The backend instance this optimizer uses for tensors on ``device``."""
        return _backends.get_backend(self._backend_name, torch.device(device))

    @property
    def backends(self) -> Dict[str, str]:
        """Which backend runs each device's tensors, e.g. ``{"cuda:0": "triton"}``."""
        devices = {p.device for g in self.param_groups for p in g["params"]}
        return {str(d): self.backend_for(d).name for d in sorted(devices, key=str)}

    def _state_of(self, p) -> Dict[str, Any]:
        """The state dict a bucket carries for ``p`` (the GR wrapper keeps its own apart from
        its base optimizer's)."""
        return self.state[p]

    def _signs(self, group: Dict[str, Any]) -> Tuple[float, float]:
        """(sign of the ascent step, sign of the combined gradient): ``maximize`` runs GR on
        −L, whose gradients are the negated ones (the wrapper's base optimizer negates the
        combined gradient itself)."""
        d = -1.0 if group.get("maximize", False) else 1.0
        return d, d

    def _buckets(self) -> List[_backends.Bucket]:
        """The params that have a grad, by (param group, device, dtype, shard groups), as the
        backends will run them. FSDP2/DTensor params are stepped through their local shards
        with the torch backend; their bucket records the process groups its norms are summed
        over. Complex params are stepped as their real views."""
        self._settle_new_state()
        buckets = []
        stateful = bool(STATE_ROWS[self._algo])
        for gi, group in enumerate(self.param_groups):
            gr = self._gr(group)
            gr["eps_sign"], gr["combine_sign"] = self._signs(group)
            needs_state = ((stateful and not (self._algo == "sgd" and group["momentum"] == 0))
                           or gr["interval"] > 1)
            for (device, dtype, shards), (ps, gs, sts, sources) in \
                    self._collect(gi, group, needs_state).items():
                sharded = ps is not sources and any(
                    type(s) is not torch.Tensor and type(s) is not torch.nn.Parameter
                    for s in sources)
                backend = (_backends.get_backend("torch", device) if sharded
                           else self.backend_for(device))
                if gr["interval"] > 1 and not backend.supports_reuse:
                    backend = _backends.get_backend("torch", device)
                extra = self._bucket_extra.setdefault((gi, device, dtype, shards, self._algo),
                                                      {})
                b = _backends.Bucket(ps, gs, sts, group, self._algo, extra, gr=gr,
                                     sources=sources)
                b.group_index, b.backend, b.shard_groups = gi, backend, shards
                for part in backend.prepare(b):
                    part.group_index, part.shard_groups = gi, shards
                    buckets.append(part)
        return buckets

    def _collect(self, gi: int, group: Dict[str, Any], needs_state: bool) -> Dict[tuple, tuple]:
        """A param group's params that have a grad, as ``{(device, dtype, shard groups):
        (params, grads, states, sources)}``, the lists parallel; params and grads are the
        tensors the math runs on (local shards, real views), sources the user's params."""
        params = group["params"]
        grads = list(map(_grad_of, params))
        if not all(map(is_not, grads, repeat(None))):
            has = list(map(is_not, grads, repeat(None)))
            params, grads = list(compress(params, has)), list(compress(grads, has))
        if not params:
            return {}
        if any(map(_is_sparse, grads)):
            p = next(p for p, g in zip(params, grads) if g.is_sparse)
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               f"(param of shape {tuple(p.shape)} in group {gi})")
        # the common case, at C speed: plain tensors of one device and one real dtype
        if set(map(type, params)) <= _PLAIN:
            devices, dtypes = set(map(_device_of, params)), set(map(_dtype_of, params))
            if len(devices) == 1 and len(dtypes) == 1 and not next(iter(dtypes)).is_complex:
                states = (list(map(self._state_of, params)) if needs_state
                          else [{} for _ in params])
                return {(devices.pop(), dtypes.pop(), ()): (params, grads, states, params)}
        split: Dict[tuple, Tuple[list, list, list, list]] = {}
        for p in params:
            local_p, local_g, shards = local_shard(p)  # DTensor (FSDP2): its shard
            if local_p.is_complex():
                local_p, local_g = torch.view_as_real(local_p), torch.view_as_real(local_g)
            lists = split.get((local_p.device, local_p.dtype, shards))
            if lists is None:
                lists = split[(local_p.device, local_p.dtype, shards)] = ([], [], [], [])
            lists[0].append(local_p)
            lists[1].append(local_g)
            lists[2].append(self._state_of(p) if needs_state else {})
            lists[3].append(p)
        return split

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
        flags = {gr_enabled(self._gr(g)) for g in self.param_groups}
        if len(flags) > 1:
            raise ValueError("Invalid gamma: GR must be on (gamma > 0 or alpha set) in every "
                             "param group or off (gamma = 0, alpha None) in all of them")
        return flags.pop()

    def _interval(self) -> int:
        intervals = {self._gr(g)["interval"] for g in self.param_groups}
        if len(intervals) > 1:
            raise ValueError(f"Invalid interval: {sorted(intervals)} (one interval for every "
                             "param group: a step takes a second gradient for all or none)")
        return intervals.pop() if intervals else 1

    @property
    def refresh_due(self) -> bool:
        """Whether this step takes the second gradient: always with ``interval=1``; with
        ``interval=k`` every k-th step (the first included), which also refreshes the cached
        direction the steps in between reuse."""
        k = self._interval()
        return k == 1 or self._gr_steps % k == 0 or self._gr_valid is None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One optimizer step. With GR on, ``closure`` is required and is called 2 times
        (forward/backward difference) or 3 times (central); returns the loss at θ. With
        ``interval=k`` only every k-th step takes the second gradient; the steps in between
        call the closure once and reuse the cached direction (see ``refresh_due``).

        Called without a closure after ``first_step()`` and the backward at the perturbed
        point, it completes that step (as ``second_step(zero_grad=False)``): training loops
        that end each iteration with ``optimizer.step()`` (accelerate's, Hugging Face's
        Trainer through ``gr_fused.integrations.transformers``) can drive a GR step."""
        if self._pending is not None:
            if closure is not None:
                raise RuntimeError("step(closure) while a GR step is in progress: after "
                                   "first_step(), finish it with step() or second_step()")
            self._finish_step(zero_grad=False)
            return None
        if not self.gr_active():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._plain_step()
            return loss
        if not self.refresh_due:  # interval=k: one gradient, the cached direction
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._reuse_step()
            return loss
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure that zeroes grads, "
                               "runs forward and backward and returns the loss (GR evaluates "
                               "the gradient twice); or use first_step()/second_step()")
        probe = _grad_and_version(self)  # did the closure zero the grads? (one tells)
        with torch.enable_grad():
            loss = closure()
        grad, version = _grad_and_version(self)
        if grad is not None and grad is probe[0] and version == probe[1] + 1:
            _warn_accumulated_onto(type(self).__name__)
        self._perturbed_passes(closure)
        return loss

    def _perturbed_passes(self, closure: Callable[[], Any]) -> Any:
        """first_step, the closure at the perturbed point(s), second_step; returns the
        closure's loss at θ + ε·g1. The weights are restored if the closure raises."""
        self.first_step()
        try:
            with torch.enable_grad():
                loss = closure()
            if self._pending is not None and self._needs_reflect():
                self.reflect_step()
                with torch.enable_grad():
                    closure()
        except BaseException:
            self.abort_step()
            raise
        self._finish_step(zero_grad=False)
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
        if not self.refresh_due:
            raise RuntimeError("with interval=k only every k-th step takes a second gradient; "
                               "this one reuses the cached direction: call step() (no closure) "
                               "after the backward. opt.refresh_due tells which step is which")
        buckets = self._buckets()
        refresh = self._interval() > 1
        if refresh:
            for b in buckets:
                create_direction_state(b)
        if not buckets:
            self._pending = _Pending([], None, None, None)
            return
        main = buckets[0].device
        scale = self._grad_scale(main)
        fused = self._fusing_backend(buckets)
        if fused is not None:  # the scalars come out of the norms' kernels
            rows = fused.ascend(buckets, scale, save=True) if refresh else fused.ascend(buckets, scale)
        else:
            rows = self._ascend_general(buckets, main, scale, save=refresh)
        for b in buckets:  # to tell, later, whether a backward wrote into these grads
            b.held = list(map(_grad_of, b.sources))
            b.extra["_versions"] = list(map(_version_of, b.grads))
        self._pending = _Pending(buckets, fused, rows, main)
        self._arm_zeroing_check()
        if self.freeze_bn_stats:
            self._bn.start()

    def _fusing_backend(self, buckets, update: bool = False) -> Optional[_backends.Backend]:
        """The backend that can run this step with its scalars fused into the norms: one
        backend for every bucket, one device, no sharded (FSDP2/DTensor) bucket, the skip
        counter on that device, no frozen tensor (``update``), and the backend's can_fuse.
        None: the general path."""
        backend, device = buckets[0].backend, buckets[0].device
        if not self._fuse_scalars or (self.skipped_steps is not None
                                      and self.skipped_steps.device != device):
            return None
        for b in buckets:  # (sharded params run on the torch backend, which does not fuse)
            if b.backend is not backend or b.device != device or b.shard_groups:
                return None
            if update and b.flags is not None and any(f & FLAG_FROZEN for f in b.flags):
                return None
        return backend if backend.can_fuse(buckets) else None

    @staticmethod
    def _rows_dtype(buckets) -> torch.dtype:
        return (torch.float64 if any(b.dtype == torch.float64 for b in buckets)
                else torch.float32)

    def _ascend_general(self, buckets, main, scale, save: bool = False) -> torch.Tensor:
        """first_step on the general path (any buckets: param groups, devices, dtypes,
        shards): the global norm and each group's ascent scalars with torch ops, then
        perturb. Returns each group's row [eps, fold, combine] (see Backend.ascend)."""
        inv = None if scale is None else scale.reciprocal()
        sq = _global_sq_norm(main, buckets, adaptive=True)
        dtype = self._rows_dtype(buckets)
        rows = []
        for gr, members in group_runs(buckets):
            eps, fold, combine = ascent_scalars(
                sq, inv, rho=gr["rho"], normalize=gr["normalize"], gamma=gr["gamma"],
                alpha=gr["alpha"], difference=gr["difference"], dtype=dtype)
            eps, combine = eps * gr["eps_sign"], combine * gr["combine_sign"]
            for b in members:
                c = compute_dtype(b.dtype)
                b_eps, b_fold = eps.to(b.device, c), fold.to(b.device, c)
                if save:  # interval=k refresh: g1 goes to the direction state too
                    b.backend.perturb(b, b_eps, b_fold, gr["adaptive"], save=True)
                else:
                    b.backend.perturb(b, b_eps, b_fold, gr["adaptive"])
            rows.append(torch.stack([eps, fold, combine]))
        return torch.stack(rows)

    def _update_general(self, buckets, rows, main, scale, refresh: bool = False) -> torch.Tensor:
        """second_step on the general path: per-group norms of G, the update scalars
        (global clipping, one found_inf for all) with torch ops, then each bucket's update.
        ``refresh`` (interval=k): the same pass caches the new direction (see
        ``direction_scalars``)."""
        inv = None if scale is None else scale.reciprocal()
        runs = group_runs(buckets)
        if refresh:
            sums = [_global_sums(main, members, DIRECTION) for _, members in runs]
            sq_by_group = [t[0] for t in sums]
        else:
            sq_by_group = [_global_sq_norm(main, members, adaptive=False) for _, members in runs]
        gscales, found_inf = update_scalars(
            sq_by_group, [rows[i, 2] for i in range(len(runs))], inv,
            [gr["max_grad_norm"] for gr, _ in runs])
        directions = [None] * len(runs)
        if refresh:
            directions, valid = direction_scalars(
                sums, [rows[i, 2] for i in range(len(runs))],
                [gr["combine_sign"] for gr, _ in runs], inv)
            self._gr_valid = valid * (1 - found_inf.to(valid.dtype))
        for gscale, direction, (_, members) in zip(gscales, directions, runs):
            for b in members:
                c = compute_dtype(b.dtype)
                b_gscale, b_found = gscale.to(b.device, c), found_inf.to(b.device, c)
                if direction is None:
                    b.backend.update(b, b_gscale, b_found)
                else:
                    ab = tuple(t.to(b.device, c) for t in direction)
                    b.backend.update(b, b_gscale, b_found, direction=ab)
        return found_inf

    def _reuse_step(self) -> None:
        """A step of interval=k between refreshes: one gradient g1, and
        g = g1 + reuse_scale·‖g1‖·v̂ with v̂ the cached direction (clipped like any step),
        then the base update of θ in place. Skipped, with nothing changed, on inf/NaN."""
        buckets = self._buckets()
        self._gr_steps += 1
        if not buckets:
            return
        for b in buckets:
            create_direction_state(b)
            create_missing_state(b)
            b.backend.refresh(b)
        main = buckets[0].device
        scale = self._grad_scale(main)
        valid = self._gr_valid.to(main)
        fused = self._fusing_backend(buckets)
        if fused is not None:  # the norms, the scalars and the update: three launches
            found_inf = fused.reuse(buckets, scale, valid, self._skip_record(main))
            self._note_new_state(buckets, found_inf)
            self._after_update(found_inf, buckets)
            return
        inv = None if scale is None else scale.reciprocal()
        runs = group_runs(buckets)
        sums = [_global_sums(main, members, DIRECTION) for _, members in runs]
        coefs, found_inf = reuse_scalars(sums, [gr for gr, _ in runs], inv, valid)
        for (u, v), (_, members) in zip(coefs, runs):
            for b in members:
                c = compute_dtype(b.dtype)
                b.backend.reuse_update(b, u.to(b.device, c), v.to(b.device, c),
                                       found_inf.to(b.device, c))
        self._skip_record(main).record(found_inf)
        self._note_new_state(buckets, found_inf)
        self._after_update(found_inf, buckets)

    def _note_new_state(self, buckets, found_inf: torch.Tensor) -> None:
        """SGD momentum buffers this step created (zeros, FLAG_NEW_STATE) where torch.optim.SGD
        would have none after it: a frozen tensor's (not stepped), and every new one if the
        step was skipped. With dampening they would step differently from torch's (its first
        step sets buf = g, an existing zero buffer gets (1 − dampening)·g), so they go: the
        frozen ones now, the others once the skip flag is read (``_settle_new_state``, at the
        next step, state_dict or copy: one host read, after the step that made them)."""
        unsettled = []
        for b in buckets:
            if (b.algo != "sgd" or b.flags is None or not b.group["momentum"]
                    or not b.group["dampening"]):
                continue
            for src, st, flag in zip(b.sources, b.states, b.flags):
                if not flag & FLAG_NEW_STATE:
                    continue
                if flag & FLAG_FROZEN:
                    _drop_momentum(self.state, src, st)
                else:
                    unsettled.append((src, st))
        if unsettled:
            self._unsettled = (found_inf, unsettled)

    def _settle_new_state(self) -> None:
        """Drop the momentum buffers ``_note_new_state`` kept if their step was skipped."""
        unsettled = self.__dict__.get("_unsettled")
        if unsettled is None:
            return
        self._unsettled = None
        found_inf, created = unsettled
        if bool(found_inf):
            for src, st in created:
                _drop_momentum(self.state, src, st)

    def _needs_reflect(self) -> bool:
        return any(b.gr["difference"] == "central" for b in self._pending.buckets)

    @torch.no_grad()
    def reflect_step(self) -> None:
        """Central difference only, after the backward at θ + ε_t·g1: move to θ − ε_t·g1."""
        if self._pending is None:
            raise RuntimeError("reflect_step() called without first_step()")
        if not self._needs_reflect() or self._pending.reflected:
            raise RuntimeError("reflect_step() is for difference='central', once per step")
        self._refuse_zeroed_grads()
        self._adopt_replaced_grads()
        for b in self._pending.buckets:
            b.backend.reflect(b)
            b.extra["_versions"] = list(map(_version_of, b.grads))
        self._pending.reflected = True
        self._arm_zeroing_check()

    def second_step(self, zero_grad: bool = True) -> None:
        """After the backward at the perturbed point: combine, restore θ exactly and apply
        the base update (or skip it, with θ restored, when either gradient had inf/NaN).

        This call is the optimizer step of a hand-written loop: the step pre- and post-hooks
        run around it, and an LR scheduler sees the optimizer stepped (as with ``step()``)."""
        args, kwargs = (self,), {"zero_grad": zero_grad}
        pre = (_torch_optimizer._global_optimizer_pre_hooks, self._optimizer_step_pre_hooks)
        for hook in chain.from_iterable(h.values() for h in pre if h):
            hook(self, args, kwargs)
        self._finish_step(zero_grad)
        self._opt_called = True  # what torch's LR schedulers check (set by step()'s wrapper)
        post = (self._optimizer_step_post_hooks, _torch_optimizer._global_optimizer_post_hooks)
        for hook in chain.from_iterable(h.values() for h in post if h):
            hook(self, args, kwargs)

    @torch.no_grad()
    def _finish_step(self, zero_grad: bool) -> None:
        """second_step without the hooks (``step()`` runs them around itself)."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("second_step() called without first_step()")
        if self._needs_reflect() and not pending.reflected:
            self.abort_step()
            raise RuntimeError("difference='central' needs reflect_step() and a third backward "
                               "before second_step(); the weights were restored")
        self._refuse_zeroed_grads()
        last_skipped = self.last_step_skipped  # kept if this step raises before reporting
        try:
            missing = self._adopt_replaced_grads()
            buckets = pending.buckets
            if buckets:
                self._without_second_gradient(missing)
                for b in buckets:
                    create_missing_state(b)
                    b.backend.refresh(b)
                main = pending.main_device
                scale = self._grad_scale(main)
                skips = self._skip_record(main)
                fused = pending.fused
                refresh = self._interval() > 1
                if fused is not None and self._fusing_backend(buckets, update=True) is fused:
                    if refresh:
                        valid = torch.empty_like(pending.rows[0, 0])
                        found_inf = fused.combine_update(buckets, pending.rows, scale, skips,
                                                         direction_valid=valid)
                        self._gr_valid = valid
                    else:
                        found_inf = fused.combine_update(buckets, pending.rows, scale, skips)
                else:
                    found_inf = self._update_general(buckets, pending.rows, main, scale,
                                                     refresh=refresh)
                    skips.record(found_inf)
                self._note_new_state(buckets, found_inf)
                self._after_update(found_inf, buckets)
            self._gr_steps += 1
        except BaseException:
            self.last_step_skipped = last_skipped
            raise
        finally:
            pending.close()
            self._pending = None
            self._bn.stop()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abort_step(self) -> None:
        """Give up the GR step in progress: θ is restored exactly, no state changes (but an
        interval=k direction the step began to refresh: the next step refreshes it)."""
        pending, self._pending = self._pending, None
        self._bn.stop()
        if pending is not None:
            pending.close()
        if pending is not None and pending.buckets and self._interval() > 1:
            self._gr_valid = None
        if pending is not None:
            for b in pending.buckets:
                b.backend.restore(b)
                if b.held is not None:  # put back the grads first_step saw
                    for s, held in zip(b.sources, b.held):
                        if s.grad is not held and held is not None:
                            s.grad = held

    def _arm_zeroing_check(self) -> None:
        """Watch one grad that carries fold·g1 (fold ≠ 0: not SAM's) for in-place zeroing
        until the next backward reaches it (_InPlaceZeroingCheck)."""
        pending = self._pending
        pending.close()
        if torch.compiler.is_compiling():
            return  # versions are runtime facts, not values to trace (a compiled opt.step)
        for b in pending.buckets:
            if b.gr["alpha"] == 1:
                continue  # the grads hold 0·g1: zeroing them changes nothing
            for src, held in zip(b.sources, b.held):
                if type(src) in _PLAIN and type(held) is torch.Tensor and src.requires_grad:
                    pending.zeroing_check = _InPlaceZeroingCheck(src, held)
                    return

    def _refuse_zeroed_grads(self) -> None:
        check = self._pending.zeroing_check
        if check is not None and check.zeroed:
            self.abort_step()
            raise RuntimeError(
                "the grads were zeroed in place during the GR step (model.zero_grad("
                "set_to_none=False) or p.grad.zero_() after first_step()): that erased the "
                "first gradient they carry until the step ends. Zero them with "
                "optimizer.zero_grad() or model.zero_grad() (set_to_none=True, the default). "
                "The weights were restored and nothing was stepped.")

    def _refuse_overwritten_grads(self) -> None:
        self.abort_step()
        raise RuntimeError(
            "the grads were set to None during the GR step, and their owner then wrote the "
            "new gradient into the memory that held the first one (DDP with "
            "gradient_as_bucket_view=True): the first gradient is gone. Zero the grads with "
            "optimizer.zero_grad() (it keeps them during the step), or use "
            "gradient_as_bucket_view=False. The weights were restored and nothing was stepped.")

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pending is not None:
            return  # the grads carry the folded first gradient until second_step()
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------------ second gradient
    def _adopt_replaced_grads(self) -> Dict[int, List[int]]:
        """Bring every grad back to the tensor that holds the folded first gradient, and
        return, for each bucket (by index), the tensors no backward wrote into since the
        last phase: they got no gradient at the perturbed point.

        If a closure replaced p.grad (``model.zero_grad()`` sets it to None, then backward
        allocates a fresh tensor), the fresh gradient is added onto the held one and that
        one is put back as p.grad. (For a DTensor shard the fresh local grad takes the held
        one in, and the bucket follows it.)"""
        missing: Dict[int, List[int]] = {}
        check = self._pending.zeroing_check
        copied = check is not None and check.copied
        if check is not None and check.cleared and check.param.grad is check.grad:
            self._refuse_overwritten_grads()
        for k, b in enumerate(self._pending.buckets):
            versions = b.extra["_versions"]
            now = list(map(_grad_of, b.sources))
            if all(map(is_, now, b.held)):
                written = list(map(_version_of, b.grads))
                if all(map(int.__ne__, written, versions)):
                    continue  # the common case: every grad was accumulated into
                missing[k] = [i for i, (w, v) in enumerate(zip(written, versions)) if w == v]
                continue
            lost = []
            for i, (src, held, grad) in enumerate(zip(b.sources, b.held, now)):
                target = b.grads[i]
                if grad is held:
                    if target._version == versions[i]:
                        lost.append(i)
                    continue
                if grad is None:
                    lost.append(i)
                else:
                    fresh = local_shard(src)[1]
                    fresh = real(fresh)
                    if b.shard_groups or type(src) not in (torch.Tensor, torch.nn.Parameter):
                        if fresh.data_ptr() != target.data_ptr():
                            fresh.add_(target)
                            b.grads[i] = fresh
                            b.held[i] = grad
                        continue
                    if fresh.data_ptr() == target.data_ptr() and b.gr["alpha"] != 1:
                        # the owner of the memory (DDP's bucket, with gradient_as_bucket_view)
                        # wrote a fresh gradient over fold·g1: it is gone
                        self._refuse_overwritten_grads()
                    if target._version != versions[i] or copied:
                        # the new tensor already holds all of G: the backward accumulated into
                        # the held buffer before p.grad was replaced (DDP without bucket views
                        # installs its bucket), or into a copy of it (DDP rebuilding buckets)
                        target.copy_(fresh)
                    else:  # a fresh gradient only (model.zero_grad() set p.grad to None)
                        target.add_(fresh)
                src.grad = held
            if lost:
                missing[k] = lost
            b.extra["_versions"] = list(map(_version_of, b.grads))
        return missing

    def _without_second_gradient(self, missing: Dict[int, List[int]]) -> None:
        """Tensors with a gradient at θ and none at the perturbed point (stochastic depth,
        routing, a branch skipped in the second pass): their curvature term is unknown, so
        they get the base optimizer's step on g1 alone. With the forward or backward
        difference their grad holds fold·g1 = ((1−α)/α)·g1, rescaled here by 1/(1−α) so that
        the update's α·G is g1; the central difference gives g1 by itself. When α = 1 (SAM)
        the grad holds 0·g1 and g1 is gone: such a tensor is restored and left as it is
        (frozen), as the SAM implementations do when p.grad is None."""
        if not missing:
            return
        buckets, rows = self._pending.buckets, self._pending.rows
        run_of = {}
        for i, (_, members) in enumerate(group_runs(buckets)):
            for b in members:
                run_of[id(b)] = i
        for k, idx in missing.items():
            b = buckets[k]
            if b.gr["difference"] == "central":
                continue
            if b.gr["alpha"] == 1:
                b.flags = list(b.flags) if b.flags is not None else [0] * len(b.params)
                for i in idx:
                    b.flags[i] |= FLAG_FROZEN
                continue
            alpha = rows[run_of[id(b)], 2] * b.gr["combine_sign"]
            rescale = (1 - alpha).reciprocal().to(b.device, compute_dtype(b.dtype))
            torch._foreach_mul_([b.grads[i] for i in idx], rescale)

    def _after_update(self, found_inf: torch.Tensor, buckets) -> None:
        """Called after the backend update of ``buckets`` (the GR wrapper steps its base
        optimizer here)."""

    # ------------------------------------------------------------------ GR off
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
        self._settle_new_state()
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
        clip = [i for i, g in enumerate(self.param_groups)
                if self._gr(g)["max_grad_norm"] is not None]
        if clip and by_kind:  # clip_grad_norm_ semantics: the global norm of every group's grads
            main = next(iter(by_kind.values()))[0].device
            total = _sum_on(main, [all_reduce_sq_norm(torch.stack(torch._foreach_norm(
                grads, 2, dtype=torch.float64)).square().sum(), shard)
                for (shard, _, _), grads in by_kind.items()]).sqrt()
            for i in clip:
                limit = self._gr(self.param_groups[i])["max_grad_norm"]
                coef = torch.clamp(limit / (total + 1e-6), max=1.0)
                for device in {grad.device for grad, _ in per_group[i]}:
                    grads = [grad for grad, _ in per_group[i] if grad.device == device]
                    torch._foreach_mul_(grads, coef.to(device, grads[0].dtype
                                                       if grads[0].dtype == torch.float64
                                                       else torch.float32))
        return found is None or not bool(found.item())


def _grad_and_version(opt: Optimizer) -> Tuple[Optional[torch.Tensor], int]:
    """The first grad of the optimizer's params, and its version counter (None under
    torch.compile: versions are runtime facts, not values to trace)."""
    if torch.compiler.is_compiling():
        return None, -1
    grad = next((p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None),
                None)
    return grad, (-1 if grad is None else grad._version)


def _warn_accumulated_onto(name: str) -> None:
    """The closure's backward added to a gradient that was there before step() (it did not
    zero it, neither in place nor by setting it to None): g1 then includes that gradient, but
    the second call of the closure cannot give the matching g2."""
    warnings.warn(
        f"{name}.step(closure): the closure's backward accumulated onto gradients computed "
        "before step() (it did not zero them). GR's first gradient then includes them, but "
        "its second gradient comes from the closure alone, so the step is not the GR step of "
        "either batch. Zero the grads in the closure; to accumulate micro-batches, run them "
        "all inside the closure (Lightning: use accumulate_grad_batches=1, or manual "
        "optimization).", stacklevel=3)


def _drop_momentum(state, param, st: Dict[str, Any]) -> None:
    """Remove a momentum buffer from a param's state (and the param's entry, left empty)."""
    st.pop("momentum_buffer", None)
    if not st and state.get(param) is st:
        del state[param]


def create_missing_state(b: _backends.Bucket) -> None:
    """Create the state a first update needs (torch.optim's keys, zeros; AdamW's step a
    float32 scalar on the parameter's device) and flag it FLAG_NEW_STATE."""
    if b.algo == "sgd":
        if b.group["momentum"] == 0:
            return
        keys: Tuple[str, ...] = ("momentum_buffer",)
    elif b.algo == "adamw":
        keys = ("exp_avg", "exp_avg_sq")
    else:
        return
    flags = b.flags
    for i, st in enumerate(b.states):
        if keys[0] in st:
            continue
        src = b.sources[i]
        like = src if type(src) in (torch.Tensor, torch.nn.Parameter) else local_shard(src)[0]
        for key in keys:
            st[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
        if b.algo == "adamw":
            st["step"] = torch.zeros((), dtype=torch.float32, device=b.device)
        if flags is None:
            flags = b.flags = [0] * len(b.params)
        flags[i] |= FLAG_NEW_STATE


def create_direction_state(b: _backends.Bucket) -> None:
    """interval=k: the cached direction of each tensor (zeros until a refresh)."""
    for i, st in enumerate(b.states):
        if DIRECTION not in st:
            src = b.sources[i]
            like = src if type(src) in (torch.Tensor, torch.nn.Parameter) else local_shard(src)[0]
            st[DIRECTION] = torch.zeros_like(like, memory_format=torch.preserve_format)


def _global_sums(main, buckets: List[_backends.Bucket], key: str) -> torch.Tensor:
    """[Σ g², Σ g·s, Σ s²] over ``buckets`` (s: the ``key`` state), float64 on ``main``,
    summed over shard groups like the norms."""
    parts = []
    for b in buckets:
        t = b.backend.dots(b, key)
        parts.append(all_reduce_sq_norm(t, b.shard_groups) if b.shard_groups else t)
    return torch.stack([t.to(device=main, dtype=torch.float64) for t in parts]).sum(0)


def _global_sq_norm(main, buckets: List[_backends.Bucket], adaptive: bool) -> torch.Tensor:
    """Σ over ``buckets`` of their squared norms (float64; with each group's ``adaptive``
    weighting if ``adaptive``), on ``main``. Buckets of sharded parameters (FSDP2 / DTensor
    local shards) are summed over their process groups, so every rank gets the global norm
    and takes the same skip decision."""
    parts: Dict[Tuple[Any, ...], List[torch.Tensor]] = defaultdict(list)
    for b in buckets:
        sq = b.backend.sq_norm(b, adaptive and b.gr["adaptive"])
        parts[b.shard_groups].append(sq)
    return _sum_on(main, [all_reduce_sq_norm(_sum_on(main, sqs), groups) if groups
                          else _sum_on(main, sqs) for groups, sqs in parts.items()])


def _sum_on(device, tensors: List[torch.Tensor]) -> torch.Tensor:
    """Deterministic float64 sum of 0-dim tensors from several devices, on ``device``."""
    if len(tensors) == 1:
        return tensors[0].to(device=device, dtype=torch.float64)
    return torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors]).sum()
