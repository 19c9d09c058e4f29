"""The fused combine + restore + base update over a tensor table (phase 3 of a GR step).

Every kernel reads G (the grad: fold·g1 + g2), the backup of θ and the device scalars
``gscale`` and ``found_inf``; with g = gscale·G it restores θ from the backup and applies the
base update in the operation order of ``gr_fused/backends/torch_backend.py``:

  sgd    g = gscale·G (+ wd·backup);  buf = g if the state is new else μ·buf + (1−damp)·g;
         d = g + μ·buf (nesterov) or buf;  θ = backup − lr·d
  adamw  (step advanced first);  θ = backup·(1 − lr·wd);  m = m + (1−β1)·(g − m);
         v = β2·v + (1−β2)·g²;  θ = θ − (lr/(1−β1^step))·m/(√v/√(1−β2^step) + eps)
  none   θ = backup;  G = g   (a torch optimizer steps afterwards)

When ``found_inf`` is set, or for a tensor flagged FROZEN, the kernel only stores θ = backup:
nothing else is read or written (a state buffer created for this step keeps its zeros).
Host-side coefficients (1 − damp, 1 − lr·wd, ...) are computed in Python double precision
and passed as fp32, as torch passes its scalars; where torch rounds once (``add(alpha=s)``,
``addcmul``: an FMA) the kernels use ``fma``. AdamW's bias corrections lr/(1 − β1^step) and
√(1 − β2^step) are computed in float64 from each tensor's own ``step`` and the float64
hyperparameters, rounded once to fp32, as torch.optim.AdamW computes them
(``adamw_bias_corrections``).

Bytes per fp32 element: sgd with momentum reads backup, G, buf (12 B) and writes θ, buf
(8 B); adamw reads 16 B and writes 12 B; none reads 8 B and writes 8 B.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (FINALIZE_BLOCK, FLAG_FROZEN, FLAG_NEW_STATE, LAUNCH_OPTIONS,
                            ROW_FLAGS, ROW_GRAD, ROW_PARAM, ROW_STATE, SMALL_LAUNCH_OPTIONS,
                            adamw_bias_corrections, advance_steps, chunk_of, device_functions, f32,
                            f64_bits, finalize_iters, fma, from_f64_bits, load, row_pointer, store,
                            to_storage)
from .triton_perturb import copy_chunk
from ..backends.tensor_table import rows_of

# 0-dim scalars (views into a step's scalars): their alignment never selects a variant
SCALAR_POINTERS = ["gscale_ptr", "found_inf_ptr"]


@triton.jit
def _sgd_chunk(param, grad, backup, buf, mask, gscale, is_new, neg_lr, momentum,
               one_minus_dampening, weight_decay, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MASKED: tl.constexpr):
    theta = load(backup, mask, MASKED).to(tl.float32)
    g = load(grad, mask, MASKED).to(tl.float32) * gscale
    if HAS_WD:
        g = fma(theta, weight_decay, g)
    d = g
    if MOMENTUM:
        if is_new:  # created for this step: written, never read
            b = g
        else:
            b = fma(g, one_minus_dampening, load(buf, mask, MASKED).to(tl.float32) * momentum)
        store(buf, to_storage(b, buf.dtype.element_ty), mask, MASKED)
        if NESTEROV:
            d = fma(b, momentum, g)
        else:
            d = b
    store(param, to_storage(fma(d, neg_lr, theta), param.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T"],
            do_not_specialize_on_alignment=SCALAR_POINTERS)
def _sgd_kernel(layout_ptr, ptrs_ptr, backup_ptr, gscale_ptr, found_inf_ptr, C, T, neg_lr,
                momentum, one_minus_dampening, weight_decay, HAS_WD: tl.constexpr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    flags = tl.load(ptrs_ptr + ROW_FLAGS * T + t)
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    backup = backup_ptr + offset
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n
    if (tl.load(found_inf_ptr) != 0) | ((flags & FLAG_FROZEN) != 0):
        if full:
            copy_chunk(param + offs, backup + offs, offs < n, False)
        else:
            copy_chunk(param + offs, backup + offs, offs < n, True)
    else:
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
        buf = grad
        if MOMENTUM:
            buf = row_pointer(ptrs_ptr, ROW_STATE, T, t, dtype, ALIGNED)
        gscale = tl.load(gscale_ptr).to(tl.float32)
        is_new = (flags & FLAG_NEW_STATE) != 0
        if full:
            _sgd_chunk(param + offs, grad + offs, backup + offs, buf + offs, offs < n, gscale,
                       is_new, neg_lr, momentum, one_minus_dampening, weight_decay, HAS_WD,
                       MOMENTUM, NESTEROV, False)
        else:
            _sgd_chunk(param + offs, grad + offs, backup + offs, buf + offs, offs < n, gscale,
                       is_new, neg_lr, momentum, one_minus_dampening, weight_decay, HAS_WD,
                       MOMENTUM, NESTEROV, True)


@triton.jit
def _adamw_chunk(param, grad, backup, exp_avg, exp_avg_sq, mask, gscale, step_size,
                 bias_correction2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                 MASKED: tl.constexpr):
    g = load(grad, mask, MASKED).to(tl.float32) * gscale
    theta = load(backup, mask, MASKED).to(tl.float32) * decay
    m = load(exp_avg, mask, MASKED).to(tl.float32)
    m = fma(g - m, one_minus_beta1, m)
    v = fma(one_minus_beta2 * g, g, load(exp_avg_sq, mask, MASKED).to(tl.float32) * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    new = theta - tl.div_rn(step_size * m, denom)
    dtype = param.dtype.element_ty
    store(param, to_storage(new, dtype), mask, MASKED)
    store(exp_avg, to_storage(m, dtype), mask, MASKED)
    store(exp_avg_sq, to_storage(v, dtype), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T", "lr_bits", "beta1_bits", "beta2_bits"],
            do_not_specialize_on_alignment=SCALAR_POINTERS)
def _adamw_kernel(layout_ptr, ptrs_ptr, backup_ptr, gscale_ptr, found_inf_ptr, C, T, lr_bits,
                  beta1_bits, beta2_bits, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    flags = tl.load(ptrs_ptr + ROW_FLAGS * T + t)
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    backup = backup_ptr + offset
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n
    if (tl.load(found_inf_ptr) != 0) | ((flags & FLAG_FROZEN) != 0):
        if full:
            copy_chunk(param + offs, backup + offs, offs < n, False)
        else:
            copy_chunk(param + offs, backup + offs, offs < n, True)
    else:
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
        exp_avg = row_pointer(ptrs_ptr, ROW_STATE, T, t, dtype, ALIGNED)
        exp_avg_sq = row_pointer(ptrs_ptr, ROW_STATE + 1, T, t, dtype, ALIGNED)
        step = tl.load(row_pointer(ptrs_ptr, ROW_STATE + 2, T, t, tl.float32, False))
        step_size, bias_correction2_sqrt = adamw_bias_corrections(  # the step was advanced
            from_f64_bits(lr_bits), from_f64_bits(beta1_bits), from_f64_bits(beta2_bits), step)
        gscale = tl.load(gscale_ptr).to(tl.float32)
        if full:
            _adamw_chunk(param + offs, grad + offs, backup + offs, exp_avg + offs,
                         exp_avg_sq + offs, offs < n, gscale, step_size, bias_correction2_sqrt,
                         decay, one_minus_beta1, beta2, one_minus_beta2, eps, False)
        else:
            _adamw_chunk(param + offs, grad + offs, backup + offs, exp_avg + offs,
                         exp_avg_sq + offs, offs < n, gscale, step_size, bias_correction2_sqrt,
                         decay, one_minus_beta1, beta2, one_minus_beta2, eps, True)


@triton.jit
def _combine_chunk(param, grad, backup, mask, gscale, MASKED: tl.constexpr):
    copy_chunk(param, backup, mask, MASKED)
    g = load(grad, mask, MASKED).to(tl.float32) * gscale
    store(grad, to_storage(g, grad.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T"],
            do_not_specialize_on_alignment=SCALAR_POINTERS)
def _restore_combine_kernel(layout_ptr, ptrs_ptr, backup_ptr, gscale_ptr, found_inf_ptr, C, T,
                            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    flags = tl.load(ptrs_ptr + ROW_FLAGS * T + t)
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    backup = backup_ptr + offset
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n
    if (tl.load(found_inf_ptr) != 0) | ((flags & FLAG_FROZEN) != 0):
        if full:
            copy_chunk(param + offs, backup + offs, offs < n, False)
        else:
            copy_chunk(param + offs, backup + offs, offs < n, True)
    else:
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
        gscale = tl.load(gscale_ptr).to(tl.float32)
        if full:
            _combine_chunk(param + offs, grad + offs, backup + offs, offs < n, gscale, False)
        else:
            _combine_chunk(param + offs, grad + offs, backup + offs, offs < n, gscale, True)


@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["found_inf_ptr"])
def _advance_steps_kernel(ptrs_ptr, found_inf_ptr, T, STEP_ROW: tl.constexpr,
                          ITERS: tl.constexpr, BLOCK: tl.constexpr):
    taken = 1.0 - tl.load(found_inf_ptr).to(tl.float32)
    advance_steps(ptrs_ptr, T, taken, STEP_ROW, ITERS, BLOCK)


def _check_rows(table, algo: str) -> None:
    assert table.rows == rows_of(algo), (table.rows, algo)


def sgd_update(table, gscale: torch.Tensor, found_inf: torch.Tensor, *, lr: float,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool) -> None:
    """One launch (none for a table without elements). With momentum the table's
    ``momentum_buffer`` row must hold every tensor's buffer (FLAG_NEW_STATE: just created)."""
    _check_rows(table, "sgd")
    if table.num_chunks:
        _sgd_kernel[(table.num_chunks,)](
            table.layout, table.ptrs, table.backup, gscale, found_inf, table.num_chunks,
            table.num_tensors, f32(-lr), f32(momentum), f32(1 - dampening), f32(weight_decay),
            HAS_WD=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=bool(nesterov),
            ALIGNED=table.aligned, BLOCK=table.chunk, **LAUNCH_OPTIONS)


def advance_adamw_steps(table, found_inf: torch.Tensor) -> None:
    """One one-program launch: every non-frozen tensor's ``step`` += 1 unless found_inf."""
    _check_rows(table, "adamw")
    T = table.num_tensors
    _advance_steps_kernel[(1,)](table.ptrs, found_inf, T, STEP_ROW=table.row("step"),
                                ITERS=finalize_iters(T), BLOCK=FINALIZE_BLOCK,
                                **SMALL_LAUNCH_OPTIONS)


def adamw_update(table, gscale: torch.Tensor, found_inf: torch.Tensor, *, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float,
                 advance_step: bool = True) -> None:
    """The per-tensor step counts (0-dim float32) move by one unless ``found_inf`` is set,
    then the element-wise update reads them for the bias corrections. One kernel cannot both
    advance a counter and let all its programs read it, so that is two launches, or one when
    ``advance_step=False`` says the caller has advanced them (the update finalize does)."""
    _check_rows(table, "adamw")
    if advance_step:
        advance_adamw_steps(table, found_inf)
    if table.num_chunks:
        _adamw_kernel[(table.num_chunks,)](
            table.layout, table.ptrs, table.backup, gscale, found_inf, table.num_chunks,
            table.num_tensors, f64_bits(lr), f64_bits(beta1), f64_bits(beta2),
            f32(1 - lr * weight_decay), f32(1 - beta1), f32(beta2), f32(1 - beta2), f32(eps),
            ALIGNED=table.aligned, BLOCK=table.chunk,
            **LAUNCH_OPTIONS)


def restore_and_combine(table, gscale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """One launch: θ ← backup; G ← gscale·G unless ``found_inf`` (or the tensor is frozen)."""
    if table.num_chunks:
        _restore_combine_kernel[(table.num_chunks,)](
            table.layout, table.ptrs, table.backup, gscale, found_inf, table.num_chunks,
            table.num_tensors, ALIGNED=table.aligned, BLOCK=table.chunk, **LAUNCH_OPTIONS)


device_functions(globals())
