"""Triton kernels over tensor tables (see docs/kernels.md and
gr_fused/backends/tensor_table.py).

Each function takes a bucket's :class:`~gr_fused.backends.tensor_table.TensorTable` (or the
partial sums of one) and 0-dim device scalars, launches one kernel (one program per chunk of
the table, or one program for a finalize) and never reads anything back to the host:

* :func:`partial_sq`, :func:`partial_dots`, :func:`finalize_sq` (triton_norm.py): Σ g² or
  Σ (θ·g)², and [Σ g², Σ g·s, Σ s²] with a state tensor s (interval=k), two-stage, float64,
  deterministic;
* :func:`ascent_finalize`, :func:`update_finalize`, :func:`reuse_finalize`
  (triton_scalars.py): the norm of g1 or G and, in the same one-program launch, the step
  scalars of ``gr_fused/_scalars.py`` (with interval=k also the direction's and the reuse
  step's);
* :func:`perturb`, :func:`reflect`, :func:`restore` (triton_perturb.py);
* :func:`sgd_update`, :func:`adamw_update`, :func:`advance_adamw_steps`,
  :func:`restore_and_combine` (triton_update.py): combine + restore + base update, skipping
  when ``found_inf`` is set; with a :class:`Mix`, the interval=k refresh (caching the
  direction) and reuse (the update from g1 and the cached direction) variants.

Importing this package defines the kernels, so ``TRITON_INTERPRET=1`` must be set before it
is imported for them to run on CPU tensors under the Triton interpreter; ``INTERPRETED``
says which way they were defined.
"""
from __future__ import annotations

from triton.runtime.interpreter import InterpretedFunction

from .triton_common import BLOCK, StateRow
from .triton_norm import (_finalize_sq_kernel, _partial_dots_kernel, _partial_sq_kernel,
                          finalize_sq, partial_dots, partial_sq)
from .triton_perturb import (_perturb_kernel, _reflect_kernel, _restore_kernel, perturb, reflect,
                             restore)
from .triton_scalars import (_ascent_scalars_kernel, _reuse_scalars_kernel,
                             _update_scalars_kernel, ascent_finalize, reuse_finalize,
                             update_finalize)
from .triton_update import (PLAIN, REFRESH, REUSE, Mix, _adamw_kernel, _advance_steps_kernel,
                            _restore_combine_kernel, _sgd_kernel, adamw_update,
                            advance_adamw_steps, restore_and_combine, sgd_update)

INTERPRETED = isinstance(_partial_sq_kernel, InterpretedFunction)

# every kernel a step can launch: the streaming ones walk a table (one program per chunk),
# the others are one-program finalizes
STREAMING_KERNELS = (_partial_sq_kernel, _partial_dots_kernel, _perturb_kernel, _reflect_kernel,
                     _restore_kernel, _sgd_kernel, _adamw_kernel, _restore_combine_kernel)
SINGLE_PROGRAM_KERNELS = (_finalize_sq_kernel, _ascent_scalars_kernel, _update_scalars_kernel,
                          _reuse_scalars_kernel, _advance_steps_kernel)
ALL_KERNELS = STREAMING_KERNELS + SINGLE_PROGRAM_KERNELS
KERNEL_NAMES = frozenset(k.fn.__name__ for k in ALL_KERNELS)

__all__ = ["BLOCK", "INTERPRETED", "ALL_KERNELS", "KERNEL_NAMES", "STREAMING_KERNELS",
           "SINGLE_PROGRAM_KERNELS", "StateRow", "Mix", "PLAIN", "REFRESH", "REUSE",
           "partial_sq", "partial_dots", "finalize_sq", "ascent_finalize", "update_finalize",
           "reuse_finalize", "perturb", "reflect", "restore", "sgd_update", "adamw_update",
           "advance_adamw_steps", "restore_and_combine"]
