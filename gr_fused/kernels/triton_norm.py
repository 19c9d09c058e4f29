"""Deterministic squared norm over a tensor table: Σ g² (or Σ (θ·g)², the adaptive norm), and
for interval=k the three sums [Σ g², Σ g·s, Σ s²] of the grads and one state tensor each (the
cached direction).

Two stages and no atomics, so the same input gives the same bits every run:
``_partial_sq_kernel`` writes one float64 partial sum per chunk into a scratch buffer, and a
one-program kernel adds the partials in a fixed order (``_finalize_sq_kernel`` here, or the
step-scalar kernels of triton_scalars.py). Each element is squared and summed in float64
(θ·g is the fp32 product), so no finite fp32 gradient overflows the sum and an inf or NaN
element makes it non-finite. Nothing is read back to the host.

The three sums go to three *planes* of the partials buffer: chunk c's terms at
``partials[k·stride + base + c]`` for k = 0, 1, 2, so that each plane is added as one range.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (FINALIZE_BLOCK, LAUNCH_OPTIONS, ROW_GRAD, ROW_PARAM,
                            SMALL_LAUNCH_OPTIONS, chunk_of, device_functions, finalize_iters, load,
                            row_pointer, sum_partial_range)


@triton.jit
def _sq_chunk(grad, param, mask, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    v = load(grad, mask, MASKED).to(tl.float32)
    if ADAPTIVE:
        v = v * load(param, mask, MASKED).to(tl.float32)
    v = v.to(tl.float64)
    return tl.sum(v * v, axis=0)


@triton.jit(do_not_specialize=["C", "T", "base"])
def _partial_sq_kernel(layout_ptr, ptrs_ptr, backup_ptr, partial_ptr, C, T, base,
                       ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, _ = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        s = _sq_chunk(grad + offs, param + offs, offs < n, ADAPTIVE, False)
    else:
        s = _sq_chunk(grad + offs, param + offs, offs < n, ADAPTIVE, True)
    tl.store(partial_ptr + base + tl.program_id(0), s)


@triton.jit
def _dots_chunk(grad, state, mask, MASKED: tl.constexpr):
    g = load(grad, mask, MASKED).to(tl.float32).to(tl.float64)
    s = load(state, mask, MASKED).to(tl.float32).to(tl.float64)
    return tl.sum(g * g, axis=0), tl.sum(g * s, axis=0), tl.sum(s * s, axis=0)


@triton.jit(do_not_specialize=["C", "T", "base", "stride"])
def _partial_dots_kernel(layout_ptr, ptrs_ptr, backup_ptr, state_ptrs_ptr, partial_ptr, C, T,
                         base, stride, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, _ = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
    state = row_pointer(state_ptrs_ptr, 0, T, t, dtype, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        gg, gs, ss = _dots_chunk(grad + offs, state + offs, offs < n, False)
    else:
        gg, gs, ss = _dots_chunk(grad + offs, state + offs, offs < n, True)
    out = partial_ptr + base + tl.program_id(0)
    tl.store(out, gg)
    tl.store(out + stride, gs)
    tl.store(out + 2 * stride, ss)


@triton.jit(do_not_specialize=["count", "stride"], do_not_specialize_on_alignment=["out_ptr"])
def _finalize_sq_kernel(partial_ptr, count, stride, out_ptr, PLANES: tl.constexpr,
                        ITERS: tl.constexpr, BLOCK: tl.constexpr):
    for k in tl.static_range(PLANES):
        tl.store(out_ptr + k, sum_partial_range(partial_ptr + k * stride, 0, count, ITERS, BLOCK))


def partial_sq(table, partials: torch.Tensor, base: int, adaptive: bool) -> None:
    """Stage one over ``table``: the partial sum of chunk c goes to ``partials[base + c]``
    (one launch; none for a table without elements)."""
    if table.num_chunks:
        _partial_sq_kernel[(table.num_chunks,)](
            table.layout, table.ptrs, table.backup, partials, table.num_chunks,
            table.num_tensors, base, ADAPTIVE=bool(adaptive), ALIGNED=table.aligned,
            BLOCK=table.chunk, **LAUNCH_OPTIONS)


def partial_dots(table, states, partials: torch.Tensor, base: int, stride: int) -> None:
    """Stage one of [Σ g², Σ g·s, Σ s²] over ``table`` (g its grads, s the state tensors whose
    addresses ``states.ptrs`` holds, one per tensor): chunk c's three terms go to
    ``partials[k·stride + base + c]`` (one launch; none for a table without elements)."""
    if table.num_chunks:
        _partial_dots_kernel[(table.num_chunks,)](
            table.layout, table.ptrs, table.backup, states.ptrs, partials, table.num_chunks,
            table.num_tensors, base, stride, ALIGNED=table.aligned and states.aligned,
            BLOCK=table.chunk, **LAUNCH_OPTIONS)


def finalize_sq(partials: torch.Tensor, count: int, out: torch.Tensor, planes: int = 1,
                stride: int = 0) -> None:
    """``out[k]`` (float64) ← Σ partials[k·stride : k·stride + count] for each of the
    ``planes`` planes, in a fixed order (one launch); ``out`` 0-dim for one plane."""
    _finalize_sq_kernel[(1,)](partials, count, stride, out, PLANES=planes,
                              ITERS=finalize_iters(count), BLOCK=FINALIZE_BLOCK,
                              **SMALL_LAUNCH_OPTIONS)


device_functions(globals())
