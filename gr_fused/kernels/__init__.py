"""Triton kernels over 1-D flat buffers (see docs/kernels.md).

Each function takes flat tensors (one dtype, contiguous) and 0-dim device scalars, launches
one or two kernels and never reads anything back to the host:

* :func:`sq_norm` (triton_norm.py): Σ x² or Σ (x·y)², two-stage and deterministic;
* :func:`ascent_scalars`, :func:`update_scalars` (triton_scalars.py): the norm of g1 or G
  and, in the same finalize launch, the step scalars of ``gr_fused/_scalars.py``;
* :func:`perturb`, :func:`reflect` (triton_perturb.py): the ascent step and its reflection;
* :func:`sgd_update`, :func:`adamw_update`, :func:`restore_and_combine` (triton_update.py):
  combine + restore + base update, skipping when ``found_inf`` is set.

Importing this package defines the kernels, so ``TRITON_INTERPRET=1`` must be set before it
is imported for them to run on CPU tensors under the Triton interpreter; ``INTERPRETED``
says which way they were defined.
"""
from __future__ import annotations

from triton.runtime.interpreter import InterpretedFunction

from .triton_norm import _partial_sq_kernel, sq_norm
from .triton_perturb import perturb, reflect
from .triton_scalars import ascent_scalars, update_scalars
from .triton_update import adamw_update, restore_and_combine, sgd_update

INTERPRETED = isinstance(_partial_sq_kernel, InterpretedFunction)

__all__ = ["INTERPRETED", "sq_norm", "ascent_scalars", "update_scalars", "perturb", "reflect",
           "sgd_update", "adamw_update", "restore_and_combine"]
