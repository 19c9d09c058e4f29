"""Backend registry: a name maps to a class implementing :class:`~.base.Backend`.

``get_backend(name, device)`` returns an instance that can run on ``device`` or raises
:class:`BackendUnavailable` saying why. ``"auto"`` tries, in order of speed, the backends
listed in ``AUTO_ORDER`` for the device type and takes the first that can run.
"""
from __future__ import annotations

import importlib
import logging
from typing import Dict, List, Optional, Tuple, Type

import torch

from .base import Backend, Bucket, SkipRecord  # noqa: F401  (re-exported)

log = logging.getLogger("gr_fused")

# name -> "module:Class"; the module is imported only when the backend is asked for.
_REGISTRY: Dict[str, str] = {
    "torch": "gr_fused.backends.torch_backend:TorchBackend",
    "triton": "gr_fused.backends.triton_backend:TritonBackend",
    "cpu": "gr_fused.backends.cext_backend:CpuBackend",
    "cuda": "gr_fused.backends.cext_backend:CudaBackend",
}

AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "torch"],
    "cpu": ["cpu", "torch"],
}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def register(name: str, target: str) -> None:
    """Register a backend class by import path ``"module:Class"``."""
    _REGISTRY[name] = target


def names() -> List[str]:
    return sorted(_REGISTRY) + ["auto"]


def _load(name: str) -> Type[Backend]:
    if name not in _REGISTRY:
        raise ValueError(f"Invalid backend: {name!r} (choose from {', '.join(names())})")
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except Exception as exc:  # an import failure is a reason, never a crash
        raise BackendUnavailable(f"backend {name!r} could not be loaded: {exc}") from exc


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    try:
        return _load(name).unavailable_reason(torch.device(device))
    except BackendUnavailable as exc:
        return str(exc)


_instances: Dict[Tuple[str, str], Backend] = {}


def get_backend(name: str, device: torch.device) -> Backend:
    device = torch.device(device)
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER.get(device.type, ["torch"]):
            if candidate not in _REGISTRY:
                continue
            why = unavailable_reason(candidate, device)
            if why is None:
                if (candidate, device.type) not in _instances:
                    log.info("gr_fused: backend='auto' picked %r for %s tensors%s", candidate,
                             device.type, "".join(f"; skipped {r}" for r in reasons))
                return _instance(candidate, device)
            reasons.append(f"{candidate} ({why})")
        return _instance("torch", device)
    why = unavailable_reason(name, device)
    if why is not None:
        raise BackendUnavailable(f"backend={name!r} cannot run on {device.type} tensors: {why}")
    return _instance(name, device)


def _instance(name: str, device: torch.device) -> Backend:
    key = (name, device.type)
    if key not in _instances:
        _instances[key] = _load(name)()
    return _instances[key]
