"""Compile every Triton kernel variant the triton backend can launch for NVIDIA GPUs, without
a GPU, and read what the compiler made of them.

    python tests/triton_aot.py OUT.json [--archs 80 90] [--jobs N]

The interpreter checks the kernels' arithmetic on CPU; this checks that the same kernels
compile (the compiler is stricter than the interpreter about types) and, from the PTX:

* ``ld_v4`` / ``st_v4``: 128-bit loads and stores (``ld.global.v4``/``st.global.v4``), the
  precondition for reaching copy bandwidth; every streaming kernel's ALIGNED variant must
  have them, for tables of tensors of any size (the sizes here are odd: 10,001 and
  11,173,962 elements);
* ``approx``: no approximate division, reciprocal or square root, which would break the
  bit-equality with torch that the kernels are written for (div_rn, sqrt_rn);
* ``fma``: the kernels that call ``fma`` get ``fma.rn.f32`` (one rounding).

It drives the backend itself (``TritonBackend``'s phases, ascend and combine_update, and
the interval=k ones: refresh and reuse, fused and phase by phase, on CPU tensors, every
algorithm, option, dtype and alignment) with Triton's launcher replaced by an
ahead-of-time compile for each target (``triton.compile`` with an explicit ``GPUTarget`` and
the launcher's own argument specialization), so every variant is compiled exactly as a
launch on a GPU would compile it; nothing runs. Must run with TRITON_INTERPRET unset
(tests/test_triton.py runs it in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from gr_fused import kernels  # noqa: E402
from gr_fused.backends.base import DIRECTION, Bucket, SkipRecord  # noqa: E402
from gr_fused.backends.triton_backend import TritonBackend  # noqa: E402
from gr_fused.optim.base import create_direction_state, create_missing_state  # noqa: E402

APPROX = re.compile(r"\b(div\.full|div\.approx|rcp\.approx|sqrt\.approx|rsqrt\.approx)")
SIZES = (10_001, 11_173_962)
STREAMING = {k.fn.__name__ for k in kernels.STREAMING_KERNELS}
SGD_OPTIONS = [dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
               dict(momentum=0.0, dampening=0.0, weight_decay=1e-4, nesterov=False),
               dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
               dict(momentum=0.9, dampening=0.1, weight_decay=1e-4, nesterov=False),
               dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True),
               dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True)]
GR_OPTIONS = [dict(normalize=True, alpha=None, difference="forward", adaptive=False),
              dict(normalize=False, alpha=None, difference="central", adaptive=True),
              dict(normalize=True, alpha=0.5, difference="forward", adaptive=False),
              dict(normalize=True, alpha=None, difference="central", adaptive=False)]


def collect_variants():
    """Run every path of the backend with launches replaced by recording their compile
    inputs; returns {key: (kernel, signature, constexprs, attrs, options)} per arch."""
    variants = {}
    backends = {}

    def record(self, *args, grid, warmup, **kwargs):
        for arch in ARCHS:
            target = GPUTarget("cuda", arch, 32)
            backend = backends.setdefault(arch, CUDABackend(target))
            binder = create_function_from_signature(self.signature, self.params, backend)
            kwargs.setdefault("debug", False)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(
                backend, kwargs, bound, specialization, options)
            key = f"{self.fn.__name__} sm_{arch} {signature} {constexprs} {attrs}"
            if key not in variants:
                names = list(self.arg_names)
                named = {names[path[0]]: value for path, value in constexprs.items()}
                variants[key] = dict(kernel=self.fn.__name__, arch=arch,
                                     aligned=bool(named.get("ALIGNED", True)),
                                     dtype=_element_type(signature),
                                     constexprs={k: repr(v) for k, v in named.items()},
                                     compile=(self.fn.__module__, self.fn.__name__, signature,
                                              constexprs, attrs, options.__dict__))

    original, JITFunction.run = JITFunction.run, record
    try:
        _run_every_path()
    finally:
        JITFunction.run = original
    return variants


def _element_type(signature) -> str:
    """The storage dtype of a streaming kernel (its ``backup_ptr``), or '-'."""
    return str(signature.get("backup_ptr", "-")).lstrip("*")


def _bucket(sizes, dtype, algo, group, gr, misalign=False, index=0):
    def tensor(n):
        t = torch.empty(n + misalign, dtype=dtype)
        return t[1:] if misalign else t
    params, grads = [tensor(n) for n in sizes], [tensor(n) for n in sizes]
    b = Bucket(params, grads, [{} for _ in sizes], group, algo, {}, gr=gr)
    b.group_index = index
    return b


def _run_every_path():
    backend = TritonBackend()
    sgd = [("sgd", dict(lr=0.1, **o)) for o in SGD_OPTIONS]
    algos = sgd + [("adamw", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
                   ("none", {})]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for misalign in (False, True):
            # the ascent variants (normalize, fixed alpha, central, adaptive) with one update,
            # then every update variant with one ascent
            runs = [(sgd[3], o) for o in GR_OPTIONS] + [(a, GR_OPTIONS[0]) for a in algos]
            for (algo, group), gr_options in runs:
                gr = dict(rho=0.05, gamma=0.0 if gr_options["alpha"] else 0.05,
                          max_grad_norm=None, eps_sign=1.0, combine_sign=1.0, **gr_options)
                _one_step(backend, [_bucket(SIZES, dtype, algo, group, gr, misalign)])
            # several groups and tables, clipping, AMP and the GradScaler's flag
            for algo, group in (sgd[3], algos[-2]):
                gr = dict(rho=0.05, gamma=0.05, normalize=True, alpha=None, difference="forward",
                          adaptive=False, max_grad_norm=1.0, eps_sign=-1.0, combine_sign=-1.0)
                buckets = [_bucket(SIZES, dtype, algo, group, gr, misalign, index=g)
                           for g in (0, 0, 1)]
                _one_step(backend, buckets, scale=torch.tensor(1024.0), with_flag=True)
            # interval=k: a refresh and a reuse step of every algorithm, fused and phase by
            # phase (fp16 stores as bf16 does: its plain variants cover them); the finalizes'
            # options (several groups, clipping, AMP, the GradScaler's flag) once, as they
            # do not depend on the storage dtype
            if dtype == torch.float16:
                continue
            for algo, group in (sgd[3], algos[-2], algos[-1]):
                gr = dict(rho=0.05, gamma=0.05, max_grad_norm=None, eps_sign=1.0,
                          combine_sign=1.0, reuse_scale=0.7, **GR_OPTIONS[0])
                _interval_steps(backend, [_bucket(SIZES, dtype, algo, group, gr, misalign)])
            if dtype == torch.float32 and not misalign:
                gr = dict(rho=0.05, gamma=0.05, max_grad_norm=1.0, eps_sign=-1.0,
                          combine_sign=-1.0, reuse_scale=0.7, **GR_OPTIONS[0])
                buckets = [_bucket(SIZES, dtype, *sgd[3], gr, misalign, index=g)
                           for g in (0, 0, 1)]
                _interval_steps(backend, buckets, scale=torch.tensor(1024.0), with_flag=True)


def _one_step(backend, buckets, scale=None, with_flag=False):
    parts = [p for b in buckets for p in _prepared(backend, b)]
    rows = backend.ascend(parts, scale)
    if parts[0].gr["difference"] == "central":
        for b in parts:
            backend.reflect(b)
    for b in parts:
        backend.restore(b)
        backend.sq_norm(b, b.gr["adaptive"])
        create_missing_state(b)
        backend.refresh(b)
    skips = SkipRecord(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.bool),
                       torch.zeros(()) if with_flag else None)
    backend.combine_update(parts, rows, scale, skips)
    gscale, found_inf = torch.ones(()), torch.zeros(())
    for b in parts:  # the general path's update (AdamW: with its own step advance)
        backend.update(b, gscale, found_inf)


def _interval_steps(backend, buckets, scale=None, with_flag=False):
    """interval=k: a fused refresh (perturb saving g1, the norm pass with the direction, the
    finalize with the direction's scalars, the updates caching it) and a fused reuse step,
    then the same phase by phase (dots, update with a direction, reuse_update)."""
    parts = [p for b in buckets for p in _prepared(backend, b)]
    for b in parts:
        create_direction_state(b)
    rows = backend.ascend(parts, scale, save=True)
    for b in parts:
        create_missing_state(b)
        backend.refresh(b)
    skips = SkipRecord(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.bool),
                       torch.zeros(()) if with_flag else None)
    valid = torch.zeros(())
    backend.combine_update(parts, rows, scale, skips, direction_valid=valid)
    backend.reuse(parts, scale, valid, skips)
    one, zero = torch.ones(()), torch.zeros(())
    for b in parts:
        backend.perturb(b, one, one, False, save=True)
        backend.dots(b, DIRECTION)
        backend.update(b, one, zero, direction=(one, one))
        backend.reuse_update(b, one, one, zero)


def _prepared(backend, b):
    b.backend = backend
    return backend.prepare(b)


SPECS: list = []   # the variants to compile (a forked worker reads them from here)


def compile_variant(index: int) -> dict:
    """Compile one recorded variant and read its PTX."""
    spec = SPECS[index]
    module, name, signature, constexprs, attrs, options = spec["compile"]
    kernel = getattr(sys.modules[module], name)
    target = GPUTarget("cuda", spec["arch"], 32)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options)
    ptx = compiled.asm["ptx"]
    record = {k: v for k, v in spec.items() if k != "compile"}
    record.update(ld_v4="ld.global.v4" in ptx, st_v4="st.global.v4" in ptx,
                  ld_count=dict(v4=len(re.findall(r"\bld\.global(?:\.\w+)*\.v4", ptx)),
                                scalar=len(re.findall(r"\bld\.global(?:\.(?!v\d)\w+)*\s", ptx))),
                  stores=bool(re.search(r"\bst\.global", ptx)),
                  fma="fma.rn.f32" in ptx, approx=sorted(set(APPROX.findall(ptx))),
                  streaming=spec["kernel"] in STREAMING)
    return record


ARCHS = (80, 90)


def main(argv=None):
    global ARCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--archs", nargs="*", type=int, default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    ARCHS = tuple(args.archs)
    SPECS[:] = collect_variants().values()
    indices = range(len(SPECS))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            records = list(pool.map(compile_variant, indices))
    else:
        records = [compile_variant(i) for i in indices]
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"compiled {len(records)} kernel variants for sm_{list(ARCHS)}")


if __name__ == "__main__":
    main()
