"""Compile every Triton kernel variant a GR step can launch for NVIDIA GPUs, without a GPU.

    python tests/triton_aot.py OUT.json [--archs 80 90]

The interpreter checks the kernels' arithmetic on CPU; this checks that the same kernels
compile (the compiler is stricter than the interpreter about types) and what the compiler
made of them, from the PTX:

* ``v4``: the streaming kernels load 128 bits per instruction (the precondition for
  reaching copy bandwidth);
* ``approx``: no approximate division, reciprocal or square root, which would break the
  bit-equality with torch that the kernels are written for (div_rn, sqrt_rn).

It runs the kernels' Python wrappers on CPU tensors with Triton's launcher replaced by an
ahead-of-time compile for each target (``triton.compile`` with an explicit ``GPUTarget``
and the launcher's own argument specialization), so every variant the wrappers can produce
is compiled exactly as a launch on a GPU would compile it. Must run with TRITON_INTERPRET
unset (tests/test_triton.py runs it in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from gr_fused import kernels  # noqa: E402

APPROX = re.compile(r"\b(div\.full|div\.approx|rcp\.approx|sqrt\.approx|rsqrt\.approx)")


def compile_all(archs):
    """Run every wrapper variant; return one record per distinct compiled kernel."""
    records = {}

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            backend = CUDABackend(target)
            binder = create_function_from_signature(self.signature, self.params, backend)
            kwargs.setdefault("debug", False)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(
                backend, kwargs, bound, specialization, options)
            key = f"{self.fn.__name__} sm_{arch} {signature} {constexprs} {attrs}"
            if key in records:
                continue
            compiled = triton.compile(ASTSource(self, signature, constexprs, attrs),
                                      target=target, options=options.__dict__)
            ptx = compiled.asm["ptx"]
            records[key] = {"kernel": self.fn.__name__, "arch": arch,
                            "v4": "ld.global.v4" in ptx,
                            "approx": sorted(set(APPROX.findall(ptx)))}

    original, JITFunction.run = JITFunction.run, compile_instead_of_launch
    try:
        _run_every_variant()
    finally:
        JITFunction.run = original
    return list(records.values())


def _run_every_variant(n=10_000):
    """Call each kernel wrapper with every combination of its compile-time switches."""
    k = kernels
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def buf():
            return torch.randn(n).to(dtype)
        param, grad, backup = buf(), buf(), buf()
        scale, ascent = torch.tensor(1024.0), torch.full((3, 3), 0.5)
        count, last = torch.zeros((), dtype=torch.int64), torch.empty((), dtype=torch.bool)
        flag, step = torch.zeros(()), torch.zeros(())
        k.sq_norm(grad)
        k.sq_norm(grad, param)
        for normalize, alpha, central, amp, adaptive in [
                (True, None, False, False, False), (False, None, True, True, True),
                (True, 0.5, False, True, False), (True, None, True, False, True)]:
            group = dict(rho=0.05, normalize=normalize, gamma=0.0 if alpha else 0.05,
                         alpha=alpha, difference="central" if central else "forward")
            k.ascent_scalars([(grad, param if adaptive else None)], scale if amp else None,
                             [group])
        for groups, clip, amp, with_flag, with_step in [(1, None, False, False, False),
                                                        (1, 1.0, True, True, True),
                                                        (2, 1.0, False, False, False),
                                                        (3, None, True, True, False)]:
            k.update_scalars([[grad]] * groups, ascent, scale if amp else None,
                             max_grad_norm=clip, skipped_steps=count, last_step_skipped=last,
                             scaler_found_inf=flag if with_flag else None,
                             adam_step=step if with_step else None)
        eps, fold = torch.tensor(1e-3), torch.tensor(1.0)
        for adaptive in (False, True):
            k.perturb(param, grad, backup, eps, fold, adaptive)
        k.reflect(param, grad, backup)
        found_inf = torch.zeros(())
        for momentum, first, nesterov, wd in [(0.0, False, False, 0.0), (0.9, True, False, 0.0),
                                              (0.9, False, True, 1e-4), (0.9, False, False, 0.0)]:
            k.sgd_update(param, grad, backup, buf(), ascent[0, 2], found_inf, lr=0.1,
                         momentum=momentum, dampening=0.0, weight_decay=wd, nesterov=nesterov,
                         first=first)
        for advance in (True, False):
            k.adamw_update(param, grad, backup, buf(), buf(), step, ascent[0, 2], found_inf,
                           lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                           advance_step=advance)
        k.restore_and_combine(param, grad, backup, ascent[0, 2], found_inf)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--archs", nargs="*", type=int, default=[80, 90])
    args = parser.parse_args(argv)
    records = compile_all(args.archs)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"compiled {len(records)} kernel variants for sm_{args.archs}")


if __name__ == "__main__":
    main()
