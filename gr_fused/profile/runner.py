"""``compare()``: profile the training step of each method on one model, side by side."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import __version__, backends as gr_backends
from .measure import MEMORY_MEASURE, TIMER, StepTimer, count_flops, measure_peak_memory
from .methods import (BASELINE_BACKEND, METHODS, analytic_forward_multiple, interval_of,
                      is_gr_method,
                      Hyperparameters, make_step)
from .models import BUILTIN_MODELS, Factory, load_user_factory

# name -> (parameter dtype, autocast dtype or None)
DTYPES: Dict[str, Tuple[torch.dtype, Optional[torch.dtype]]] = {
    "float32": (torch.float32, None),
    "float64": (torch.float64, None),
    "bfloat16": (torch.bfloat16, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
}
DEFAULT_MODEL = "cnn"
DEFAULT_USER_BATCH_SIZE = 32
DEFAULT_REPEATS = {"cuda": (5, 20), "cpu": (2, 10)}  # (warmup, repeat) per device type
MEMORY_STEPS = 2  # the first steps of every run, measured for peak memory (not timed)
FLOP_COUNTER = ("torch.utils.flop_counter.FlopCounterMode: matmul, conv and attention ops of "
                "one step (elementwise ops and the optimizer update are not counted)")


class ModelError(ValueError):
    """The model's factory refused its options or broke the factory contract (a user
    mistake, found when the model is first built: the command line reports it as a usage
    error)."""


@dataclass
class Plan:
    """Everything ``compare`` will do, checked before anything runs."""
    model_name: str
    factory: Factory
    model_options: Dict[str, Any]
    size_note: str
    device: torch.device
    dtype: str
    batch_size: int
    runs: List[Tuple[str, str]]  # (method, backend)
    skipped_backends: Dict[str, str]
    warmup: int
    repeat: int
    hyperparameters: Hyperparameters
    seed: int = 0
    sequential: bool = False


def compare(model: Union[str, Factory] = DEFAULT_MODEL, *, device: Optional[str] = None,
            dtype: str = "float32", batch_size: Optional[int] = None,
            methods: Optional[Union[str, Sequence[str]]] = None,
            backends: Optional[Union[str, Sequence[str]]] = None,
            warmup: Optional[int] = None, repeat: Optional[int] = None,
            hyperparameters: Optional[Hyperparameters] = None,
            model_options: Optional[Dict[str, Any]] = None, seed: int = 0,
            sequential: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Profile one training step of each method on ``model`` and return the report (a dict,
    the JSON schema of ``python -m gr_fused.profile --json``).

    ``model``: a built-in name (``gr_fused.profile.BUILTIN_MODELS``), ``"package.module:
    factory"`` or a factory callable (contract in ``gr_fused.profile.models``).
    ``model_options``: keyword arguments for the factory (the built-in models' sizes).
    ``methods``: names from ``METHODS`` (default all); ``backends``: gr_fused backends to run
    the GR methods on (default every one that can run on ``device``). ``sequential``: run
    the methods one after another, holding one model at a time, instead of interleaving
    their timed steps (which holds every method's model at once).
    Raises ValueError, naming the argument, for bad input.
    """
    plan = make_plan(model, device=device, dtype=dtype, batch_size=batch_size, methods=methods,
                     backends=backends, warmup=warmup, repeat=repeat,
                     hyperparameters=hyperparameters, model_options=model_options, seed=seed,
                     sequential=sequential)
    return run_plan(plan, progress=progress)


# --------------------------------------------------------------------------- planning
def make_plan(model: Union[str, Factory] = DEFAULT_MODEL, *, device: Optional[str] = None,
              dtype: str = "float32", batch_size: Optional[int] = None,
              methods=None, backends=None, warmup: Optional[int] = None,
              repeat: Optional[int] = None, hyperparameters: Optional[Hyperparameters] = None,
              model_options: Optional[Dict[str, Any]] = None, seed: int = 0,
              sequential: bool = False) -> Plan:
    """Check every argument of :func:`compare` and resolve the defaults."""
    device = _resolve_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"Invalid dtype: {dtype!r} (choose from {', '.join(DTYPES)})")
    model_name, factory, options, size_note, default_batch = _resolve_model(
        model, dict(model_options or {}), device)
    batch_size = default_batch if batch_size is None else batch_size
    default_warmup, default_repeat = DEFAULT_REPEATS[device.type]
    warmup = default_warmup if warmup is None else warmup
    repeat = default_repeat if repeat is None else repeat
    for name, value, least in (("batch_size", batch_size, 1), ("warmup", warmup, 0),
                               ("repeat", repeat, 1)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise ValueError(f"Invalid {name}: {value!r} (an integer >= {least})")
    methods = _resolve_methods(methods)
    hp = hyperparameters or Hyperparameters()
    if not isinstance(hp, Hyperparameters):
        raise ValueError(f"Invalid hyperparameters: {hp!r} (a gr_fused.profile.Hyperparameters)")
    for name, value in asdict(hp).items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid {name}: {value!r} (a finite number >= 0)")
    for name in ("gamma", "rho"):
        if getattr(hp, name) == 0:
            raise ValueError(f"Invalid {name}: 0 ({name} > 0; with {name} = 0 GR is off and "
                             "every GR method is a plain SGD step)")
    run_backends, skipped = _resolve_backends(backends, device, any(is_gr_method(m)
                                                                    for m in methods))
    runs = []
    for method in methods:
        if is_gr_method(method):
            runs += [(method, b) for b in run_backends]
        else:
            runs.append((method, BASELINE_BACKEND))
    return Plan(model_name, factory, options, size_note, device, dtype, batch_size, runs,
                skipped, warmup, repeat, hp, seed, sequential)


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Invalid device: {device!r} ({exc})") from exc
    if resolved.type not in DEFAULT_REPEATS:
        raise ValueError(f"Invalid device: {device!r} (cpu or cuda)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r} (CUDA is not available here)")
    return resolved


def _resolve_model(model, options: Dict[str, Any], device: torch.device):
    """(name, factory, options, size note, default batch size)."""
    if callable(model):
        name = getattr(model, "__qualname__", repr(model))
        return name, model, options, "", DEFAULT_USER_BATCH_SIZE
    if not isinstance(model, str):
        raise ValueError(f"Invalid model: {model!r} (a name, 'package.module:factory' or a "
                         "factory callable)")
    if ":" in model:
        return model, load_user_factory(model), options, "", DEFAULT_USER_BATCH_SIZE
    if model not in BUILTIN_MODELS:
        raise ValueError(f"Invalid model: {model!r} (built-in: {', '.join(BUILTIN_MODELS)}; or "
                         "'package.module:factory')")
    builtin = BUILTIN_MODELS[model]
    unknown = sorted(set(options) - set(builtin.full))
    if unknown:
        raise ValueError(f"Invalid model option for {model}: {', '.join(unknown)} (it takes "
                         f"{', '.join(builtin.full)})")
    resolved = dict(builtin.full)
    reduced = {}
    if device.type == "cpu":
        reduced = {k: v for k, v in builtin.cpu.items() if k not in options}
        resolved.update(reduced)
    resolved.update(options)
    builtin.check_options(resolved)
    size_note = ""
    if reduced:
        size_note = ("reduced for CPU: " + ", ".join(f"{k}={v}" for k, v in reduced.items())
                     + " (full size: " + ", ".join(f"{k}={builtin.full[k]}" for k in reduced)
                     + "; give the size options to change it)")
    batch = builtin.batch_size
    if device.type == "cpu" and builtin.cpu_batch_size:
        batch = builtin.cpu_batch_size
    return model, builtin.factory, resolved, size_note, batch


def _as_list(value, what: str) -> List[str]:
    """A comma-separated string or a sequence of names, as a list of names."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    else:
        try:
            value = list(value)
        except TypeError:
            raise ValueError(f"Invalid {what}: {value!r} (a comma-separated string or a list "
                             "of names)") from None
    if not value:
        raise ValueError(f"Invalid {what}: empty")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"Invalid {what}: {item!r} in {value!r} (names are strings)")
    return value


def _resolve_methods(methods) -> List[str]:
    if methods is None:
        return list(METHODS)
    methods = _as_list(methods, "methods")
    unknown = [m for m in methods if m not in METHODS and interval_of(m) == 1]
    if unknown:
        raise ValueError(f"Invalid methods: {', '.join(map(repr, unknown))} (choose from "
                         f"{', '.join(METHODS)}, or fd-gr-kN)")
    known = [m for m in METHODS if m in methods]
    return known + list(dict.fromkeys(m for m in methods if m not in known))


def _resolve_backends(requested, device: torch.device, needed: bool
                      ) -> Tuple[List[str], Dict[str, str]]:
    """(backends to run, {backend: why it is not run}) for the GR methods; ``needed`` is
    False when no GR method is profiled (then the names are checked, no backend loaded)."""
    concrete = [n for n in gr_backends.names() if n != "auto"]
    every = requested is None or requested == "all"
    names = concrete if every else list(dict.fromkeys(_as_list(requested, "backends")))
    for name in names:
        if name not in concrete:
            raise ValueError(f"Invalid backend: {name!r} (choose from {', '.join(concrete)}, "
                             "or 'all')")
    if not needed:
        return [], {}
    reasons = {name: gr_backends.unavailable_reason(name, device) for name in names}
    run = [name for name, why in reasons.items() if why is None]
    skipped = {name: why for name, why in reasons.items() if why is not None}
    if skipped and not every:
        name, why = next(iter(skipped.items()))
        raise ValueError(f"Invalid backend: {name!r} cannot run on {device}: {why}")
    if not run:
        raise ValueError(f"Invalid backends: none can run on {device} ({skipped})")
    return run, skipped


# --------------------------------------------------------------------------- running
class _Workload:
    """One freshly built model with its batch, on the plan's device and dtype."""

    def __init__(self, plan: Plan):
        param_dtype, autocast_dtype = DTYPES[plan.dtype]
        torch.manual_seed(plan.seed)
        try:
            built = plan.factory(plan.batch_size, plan.device, **plan.model_options)
        except (TypeError, ValueError) as exc:  # options it does not take, or refuses
            raise ModelError(f"Invalid model: the factory of {plan.model_name!r} failed with "
                             f"{_one_line(exc)}") from exc
        if not (isinstance(built, tuple) and len(built) == 3):
            raise ModelError(f"Invalid model: the factory of {plan.model_name!r} must return "
                             f"(model, batch, loss_fn), got {type(built).__name__}")
        model, batch, self.loss_fn = built
        if not isinstance(model, torch.nn.Module) or not callable(self.loss_fn):
            raise ModelError(f"Invalid model: the factory of {plan.model_name!r} must return "
                             "(torch.nn.Module, batch, loss_fn callable)")
        self.model = model.to(device=plan.device, dtype=param_dtype)
        self.batch = _move(batch, plan.device, param_dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ModelError(f"Invalid model: {plan.model_name!r} has no trainable parameters")
        self.device_type, self.autocast_dtype = plan.device.type, autocast_dtype

    def compute_loss(self) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.loss_fn(self.model, self.batch)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            return self.loss_fn(self.model, self.batch)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {lines[0]}" if lines else "")


def _move(batch, device: torch.device, dtype: torch.dtype):
    if isinstance(batch, torch.Tensor):
        return batch.to(device=device, dtype=dtype if batch.is_floating_point() else None)
    if isinstance(batch, (list, tuple)):
        moved = [_move(item, device, dtype) for item in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return {k: _move(v, device, dtype) for k, v in batch.items()}
    return batch


def _forward_flops(plan: Plan) -> Tuple[int, int]:
    """(matmul/conv FLOPs of one forward pass, number of trainable parameters)."""
    work = _Workload(plan)
    with torch.no_grad():
        losses = []
        flops = count_flops(lambda: losses.append(work.compute_loss()))
    loss = losses[0]
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise ModelError(f"Invalid model: loss_fn of {plan.model_name!r} must return a 0-dim "
                         f"tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    return flops, sum(p.numel() for p in work.params)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: count steps without a bar
        return contextlib.nullcontext(_NoBar())
    return tqdm(total=total, disable=not enabled, unit="step", leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass


def run_plan(plan: Plan, progress: bool = True) -> Dict[str, Any]:
    """Run a checked :class:`Plan` and return the report.

    Unless ``plan.sequential``, every method keeps its model alive and the timed steps are
    taken in rounds, one step of each method per round, so that a drift of the machine's
    speed (other jobs, clocks) hits every method alike and the ratios stay honest."""
    forward_flops, n_params = _forward_flops(plan)
    runs = [_Run(plan, method, backend) for method, backend in plan.runs]
    steps_per_run = MEMORY_STEPS + plan.warmup + plan.repeat + 1
    results = []
    with _progress_bar(len(runs) * steps_per_run, progress) as bar:
        def shown(run: _Run) -> _Run:
            bar.set_description(f"{run.method} ({run.backend})")
            return run

        if plan.sequential:
            for run in runs:
                shown(run).start(bar.update)
                run.warm(bar.update)
                run.time(plan.repeat, bar.update)
                result = run.finish(bar.update)
                if result is not None:
                    results.append(result)
                _free_memory(plan.device)
        else:
            for run in runs:
                shown(run).start(bar.update)
            for run in runs:
                shown(run).warm(bar.update)
            for _ in range(plan.repeat):
                for run in runs:
                    shown(run).time(1, bar.update)
            results = [r for r in (shown(run).finish(bar.update) for run in runs)
                       if r is not None]
    not_runnable = [{"method": run.method, "backend": run.backend, "reason": run.failure}
                    for run in runs if run.failure is not None]
    del runs
    _free_memory(plan.device)
    for r in results:
        r["flops_per_forward"] = r["flops"] / forward_flops if forward_flops else None
        r["analytic_flops_per_forward"] = analytic_forward_multiple(r["method"])
        r["analytic_flops"] = analytic_forward_multiple(r["method"]) * forward_flops
    _add_ratios(results)
    return {
        "device": str(plan.device),
        "device_name": _device_name(plan.device),
        "model": plan.model_name,
        "model_options": plan.model_options,
        "size_note": plan.size_note,
        "parameters": n_params,
        "dtype": plan.dtype,
        "batch_size": plan.batch_size,
        "warmup": plan.warmup,
        "repeat": plan.repeat,
        "schedule": "sequential" if plan.sequential else "interleaved",
        "hyperparameters": asdict(plan.hyperparameters),
        "forward_flops": forward_flops,
        "torch_version": torch.__version__,
        "gr_fused_version": __version__,
        "python_version": platform.python_version(),
        "timer": TIMER[plan.device.type],
        "memory_measure": MEMORY_MEASURE[plan.device.type].format(steps=MEMORY_STEPS),
        "flop_counter": FLOP_COUNTER,
        "skipped_backends": plan.skipped_backends,
        "not_runnable": not_runnable,
        "results": results,
    }


class _StepFailed(Exception):
    """A method's training step raised on this model (the message: why, on one line)."""


class _Run:
    """One (method, backend): its own freshly built model, optimizer and measurements.

    If DB's step raises a RuntimeError on this model (double backpropagation through an op
    that has no double backward), the run stops, frees its model and keeps the reason in
    ``failure``; the other methods run on. Any other method's error is raised."""

    def __init__(self, plan: Plan, method: str, backend: str):
        self.plan, self.method, self.backend = plan, method, backend
        self.timer = StepTimer(plan.device)
        self.losses: List[torch.Tensor] = []
        self.peak_memory_bytes = 0
        # what one measurement covers: a step, or a whole cycle of fd-gr-kN (one FD step and
        # N − 1 one-gradient steps, whatever step the cycle starts at), reported per step
        self.unit = interval_of(method)
        self.failure: Optional[str] = None  # why the method's step cannot run on this model

    def _step(self) -> None:
        try:
            loss = self.step_fn()
        except RuntimeError as exc:  # only DB's step itself: see _Run
            if self.method != "db-gr":
                raise
            raise _StepFailed(f"its step fails on this model: {_one_line(exc)}") from None
        self.losses.append(loss.detach())
        del self.losses[1:-1]  # keep the first and the latest

    def _unit(self) -> None:
        for _ in range(self.unit):
            self._step()

    @contextlib.contextmanager
    def _unless_failed(self):
        """Run the body unless the run has failed; a failing step ends the run."""
        if self.failure is not None:
            yield False
            return
        try:
            yield True
        except _StepFailed as exc:
            self.failure = str(exc)
            for name in ("workload", "step_fn", "optimizer", "losses"):
                self.__dict__.pop(name, None)

    def start(self, on_step: Callable[[], None]) -> None:
        """Build the model and take the first steps, measuring peak memory."""
        def first_steps():
            for _ in range(MEMORY_STEPS):
                self._step()
                on_step()

        with self._unless_failed() as running:
            if running:
                self.peak_memory_bytes = measure_peak_memory(self._build, first_steps,
                                                             self.plan.device)

    def _build(self) -> None:
        self.workload = _Workload(self.plan)
        self.step_fn, self.optimizer = make_step(
            self.method, self.workload.params, self.workload.compute_loss,
            self.plan.hyperparameters, self.backend if is_gr_method(self.method) else None)

    def warm(self, on_step: Callable[[], None]) -> None:
        with self._unless_failed() as running:
            for _ in range(self.plan.warmup if running else 0):
                self._step()
                on_step()

    def time(self, count: int, on_step: Callable[[], None]) -> None:
        with self._unless_failed() as running:
            for _ in range(count if running else 0):
                self.timer.time(self._unit)
                on_step()

    def finish(self, on_step: Callable[[], None]) -> Optional[Dict[str, Any]]:
        """One more step (cycle) under the FLOP counter; the result (None if the run failed,
        see ``failure``); then free the model."""
        flops = None
        with self._unless_failed() as running:
            if running:
                flops = count_flops(self._unit) / self.unit
        if self.failure is not None:
            return None
        on_step()
        times = [t / self.unit for t in self.timer.times_ms()]
        skipped = getattr(self.optimizer, "skipped_steps", None)
        result = {
            "method": self.method,
            "backend": self.backend,
            "step_time_ms": statistics.median(times),
            "step_time_ms_min": min(times),
            "step_time_ms_max": max(times),
            "peak_memory_bytes": int(self.peak_memory_bytes),
            "flops": int(flops) if self.unit == 1 else flops,  # a cycle's average per step
            "loss_first": float(self.losses[0]),
            "loss_last": float(self.losses[-1]),
            "skipped_steps": 0 if skipped is None else int(skipped),
        }
        del self.workload, self.step_fn, self.optimizer, self.losses
        return result


def _add_ratios(results: List[Dict[str, Any]]) -> None:
    reference = {m: next((r["step_time_ms"] for r in results if r["method"] == m), None)
                 for m in ("sgd", "db-gr")}
    for r in results:
        for m, key in (("sgd", "ratio_to_sgd"), ("db-gr", "ratio_to_db_gr")):
            r[key] = r["step_time_ms"] / reference[m] if reference[m] else None


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
