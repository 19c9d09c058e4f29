"""Loading the compiled kernels, ``gr_fused._C`` (built from csrc/).

``load()`` returns the module or None. In order it tries:

1. the module built by ``pip install`` / ``python setup.py build_ext --inplace``;
2. in a source checkout (csrc/ beside the package), when that module is missing or was built
   from other sources, a build on first use into a cache directory
   (``$GR_FUSED_CACHE``, default ``~/.cache/gr_fused``), keyed by the sources' hash; it
   includes the CUDA kernels when nvcc is found and a GPU is visible, or when
   ``GR_FUSED_BUILD_CUDA=1``. ``GR_FUSED_JIT=0`` turns this off.

When neither works, one warning names the cause, ``unavailable_reason()`` returns it, and
the "cpu"/"cuda" backends report it, so ``backend="auto"`` falls back to Triton or torch.
Nothing here runs at ``import gr_fused``; the first backend that asks triggers it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

log = logging.getLogger("gr_fused")

_PACKAGE = Path(__file__).resolve().parent
_CSRC = _PACKAGE.parent / "csrc"
_lock = threading.Lock()
_result: Optional[Tuple[Optional[ModuleType], Optional[str]]] = None


def load() -> Optional[ModuleType]:
    """gr_fused._C, or None (after one warning saying why)."""
    global _result
    if _result is None:
        with _lock:
            if _result is None:
                _result = _load()
                if _result[1] is not None:
                    warnings.warn(f"gr_fused: the compiled kernels are unavailable: {_result[1]}."
                                  " The 'cpu' and 'cuda' backends are off; 'auto' uses Triton "
                                  "or torch.", RuntimeWarning, stacklevel=2)
    return _result[0]


def unavailable_reason() -> Optional[str]:
    """None when gr_fused._C is loaded, else why it is not."""
    load()
    return _result[1]


def _csrc_build() -> ModuleType:
    """csrc/build.py, the build recipe shared with setup.py."""
    spec = importlib.util.spec_from_file_location("gr_fused_csrc_build", _CSRC / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> Tuple[Optional[ModuleType], Optional[str]]:
    why, _C = None, None
    if importlib.util.find_spec(f"{__package__}._C") is None:
        why = "gr_fused._C was not built"
    else:
        try:
            _C = importlib.import_module(f"{__package__}._C")
        except ImportError as exc:
            why = f"gr_fused._C failed to load ({exc})"
    checkout = (_CSRC / "build.py").is_file()
    if _C is not None:
        if not checkout or getattr(_C, "source_hash", None) == _csrc_build().source_hash():
            return _C, None
        why = f"gr_fused._C at {_C.__file__} was built from other sources than csrc/"
    if not checkout:
        return None, f"{why} (no csrc/ here to build it from; reinstall with a C++ compiler)"
    if os.environ.get("GR_FUSED_JIT", "1") == "0":
        return None, f"{why}, and the build on first use is off (GR_FUSED_JIT=0)"
    try:
        return _jit(), None
    except Exception as exc:  # any build or load failure is a reason, never a crash
        return None, f"{why}, and building it on first use failed: {exc}"


def _want_cuda(build) -> bool:
    flag = os.environ.get("GR_FUSED_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if build.find_nvcc() is None:
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _jit() -> ModuleType:
    build = _csrc_build()
    cuda = _want_cuda(build)
    cache = Path(os.environ.get("GR_FUSED_CACHE") or Path.home() / ".cache" / "gr_fused")
    tag = f"{build.source_hash()}-py{sys.version_info[0]}{sys.version_info[1]}-" \
          f"{'cuda' if cuda else 'host'}"
    where = cache / tag
    path = where / build.extension_filename()
    if not path.is_file():
        where.mkdir(parents=True, exist_ok=True)
        import fcntl
        with open(where / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test workers)
            if not path.is_file():
                log.warning("gr_fused: building gr_fused._C (%s) into %s, once",
                            "host + CUDA" if cuda else "host", where)
                build.build(path, where / "build", cuda=cuda)
    loader = importlib.machinery.ExtensionFileLoader(f"{__package__}._C", str(path))
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[f"{__package__}._C"] = module
    setattr(sys.modules[__package__], "_C", module)
    return module
