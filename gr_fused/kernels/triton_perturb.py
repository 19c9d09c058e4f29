"""The ascent-perturb phase over a tensor table, its central-difference reflection, and the
restore of θ from the backup.

perturb:  backup ← θ;  θ ← θ + eps·w·g (w = θ² if adaptive, else 1);  g ← fold·g
          (an interval=k refresh also saves g into the direction state: one more stream)
reflect:  θ ← 2·backup − θ;  g ← −g
restore:  θ ← backup

``eps`` and ``fold`` are 0-dim fp32 tensors read on the device. Bytes per fp32 element:
perturb reads θ, g (8 B) and writes backup, θ, g (12 B; 16 B saving g); reflect reads
backup, θ, g (12 B) and writes θ, g (8 B); restore reads 4 B and writes 4 B.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (LAUNCH_OPTIONS, ROW_GRAD, ROW_PARAM, chunk_of, device_functions,
                            load, row_pointer, store, to_storage)


@triton.jit
def _perturb_chunk(param, grad, backup, direction, mask, eps, fold, ADAPTIVE: tl.constexpr,
                   SAVE: tl.constexpr, MASKED: tl.constexpr):
    raw = load(param, mask, MASKED)
    store(backup, raw, mask, MASKED)
    theta = raw.to(tl.float32)
    raw_g = load(grad, mask, MASKED)
    if SAVE:  # interval=k refresh: g1 as it is, for the update to build the direction from
        store(direction, raw_g, mask, MASKED)
    g = raw_g.to(tl.float32)
    step = g * eps
    if ADAPTIVE:
        step = step * (theta * theta)
    store(param, to_storage(theta + step, param.dtype.element_ty), mask, MASKED)
    store(grad, to_storage(g * fold, grad.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T"],
            do_not_specialize_on_alignment=["eps_ptr", "fold_ptr"])
def _perturb_kernel(layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, eps_ptr, fold_ptr, C, T,
                    ADAPTIVE: tl.constexpr, SAVE: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
    direction = grad
    if SAVE:
        direction = row_pointer(dir_ptrs_ptr, 0, T, t, dtype, ALIGNED)
    backup = backup_ptr + offset
    eps = tl.load(eps_ptr).to(tl.float32)
    fold = tl.load(fold_ptr).to(tl.float32)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _perturb_chunk(param + offs, grad + offs, backup + offs, direction + offs, offs < n,
                       eps, fold, ADAPTIVE, SAVE, False)
    else:
        _perturb_chunk(param + offs, grad + offs, backup + offs, direction + offs, offs < n,
                       eps, fold, ADAPTIVE, SAVE, True)


@triton.jit
def _reflect_chunk(param, grad, backup, mask, MASKED: tl.constexpr):
    b = load(backup, mask, MASKED).to(tl.float32)
    theta = load(param, mask, MASKED).to(tl.float32)
    store(param, to_storage(b * 2.0 - theta, param.dtype.element_ty), mask, MASKED)
    # negated in fp32: exact, and the interpreter cannot negate bf16 (it holds bf16 as raw
    # 16-bit integers)
    g = load(grad, mask, MASKED).to(tl.float32)
    store(grad, to_storage(-g, grad.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T"])
def _reflect_kernel(layout_ptr, ptrs_ptr, backup_ptr, C, T, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
    backup = backup_ptr + offset
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _reflect_chunk(param + offs, grad + offs, backup + offs, offs < n, False)
    else:
        _reflect_chunk(param + offs, grad + offs, backup + offs, offs < n, True)


@triton.jit
def copy_chunk(dst, src, mask, MASKED: tl.constexpr):
    """dst ← src for one chunk (θ ← backup)."""
    store(dst, load(src, mask, MASKED), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T"])
def _restore_kernel(layout_ptr, ptrs_ptr, backup_ptr, C, T, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, backup_ptr.dtype.element_ty, ALIGNED)
    backup = backup_ptr + offset
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        copy_chunk(param + offs, backup + offs, offs < n, False)
    else:
        copy_chunk(param + offs, backup + offs, offs < n, True)


def _grid(table):
    return (table.num_chunks,)


def perturb(table, eps: torch.Tensor, fold: torch.Tensor, adaptive: bool,
            directions=None) -> None:
    """One launch (none for a table without elements); see the module docstring.
    ``directions`` (a :class:`~.triton_common.StateRow` of the direction state): g is saved
    there too."""
    if table.num_chunks:
        save = directions is not None
        _perturb_kernel[_grid(table)](
            table.layout, table.ptrs, table.backup, directions.ptrs if save else table.ptrs,
            eps, fold, table.num_chunks, table.num_tensors, ADAPTIVE=bool(adaptive), SAVE=save,
            ALIGNED=table.aligned and (not save or directions.aligned), BLOCK=table.chunk,
            **LAUNCH_OPTIONS)


def reflect(table) -> None:
    if table.num_chunks:
        _reflect_kernel[_grid(table)](table.layout, table.ptrs, table.backup, table.num_chunks,
                                      table.num_tensors, ALIGNED=table.aligned,
                                      BLOCK=table.chunk, **LAUNCH_OPTIONS)


def restore(table) -> None:
    if table.num_chunks:
        _restore_kernel[_grid(table)](table.layout, table.ptrs, table.backup, table.num_chunks,
                                      table.num_tensors, ALIGNED=table.aligned,
                                      BLOCK=table.chunk, **LAUNCH_OPTIONS)


device_functions(globals())
