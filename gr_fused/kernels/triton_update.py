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
no other state is read or written (a state buffer created for this step keeps its zeros);
only a refresh's direction is, as below.
Host-side coefficients (1 − damp, 1 − lr·wd, ...) are computed in Python double precision
and passed as fp32, as torch passes its scalars; where torch rounds once (``add(alpha=s)``,
``addcmul``: an FMA) the kernels use ``fma``. AdamW's bias corrections lr/(1 − β1^step) and
√(1 − β2^step) are computed in float64 from each tensor's own ``step`` and the float64
hyperparameters, rounded once to fp32, as torch.optim.AdamW computes them
(``adamw_bias_corrections``).

With interval=k (``MODE``) the same kernels also handle the cached direction d (the
direction state of each tensor, whose addresses a :class:`~.triton_common.StateRow` holds):

  refresh  d = a·G + c·d first (d held g1), then the update above; a frozen tensor's d
           too (its θ only restored); when the step is skipped d = 0 (the saved g1 may
           hold inf/NaN, which the next step's v·d with v = 0 would carry into θ)
  reuse    g = u·G + v·d (G is the one gradient g1 of the step), then the base update from θ
           itself (there is no backup) into θ; none: G = g. When skipped, nothing is
           written at all.

The coefficients are products rounded once each in fp32 and then added, as
tests/reference_phases.py computes them.

Bytes per fp32 element: sgd with momentum reads backup, G, buf (12 B) and writes θ, buf
(8 B); adamw reads 16 B and writes 12 B; none reads 8 B and writes 8 B. A refresh adds d
(read 4 B, written 4 B); a reuse reads θ instead of the backup and d besides G (+4 B read).
A skipped refresh writes d's zeros besides θ (+4 B); a frozen tensor in a refresh reads G
and d and writes d besides θ.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import (FINALIZE_BLOCK, FLAG_FROZEN, FLAG_NEW_STATE, LAUNCH_OPTIONS,
                            MODE_PLAIN, MODE_REFRESH, MODE_REUSE, ROW_FLAGS, ROW_GRAD, ROW_PARAM,
                            ROW_STATE, SMALL_LAUNCH_OPTIONS, adamw_bias_corrections,
                            advance_steps, chunk_of, device_functions, f32, f64_bits,
                            finalize_iters, fma, from_f64_bits, load, row_pointer, store,
                            to_storage)
from .triton_perturb import copy_chunk
from ..backends.tensor_table import rows_of

# 0-dim scalars (views into a step's scalars): their alignment never selects a variant
SCALAR_POINTERS = ["gscale_ptr", "found_inf_ptr", "dir_g_ptr", "dir_d_ptr"]
PLAIN, REFRESH, REUSE = 0, 1, 2  # MODE_PLAIN, MODE_REFRESH, MODE_REUSE


@triton.jit
def _mix(G, d, dir_g, dir_d):
    """A refresh's new direction a·G + c·d: two fp32 products and a sum."""
    return G * dir_g + d * dir_d


@triton.jit
def _gradient(grad, direction, mask, gscale, dir_g, dir_d, MODE: tl.constexpr,
              MASKED: tl.constexpr):
    """g = gscale·G, or in a reuse g = gscale·G + dir_d·d (gscale = u, dir_d = v); a refresh
    stores d = dir_g·G + dir_d·d on the way (dir_g = a, dir_d = c)."""
    G = load(grad, mask, MASKED).to(tl.float32)
    g = G * gscale
    if MODE == MODE_REFRESH:
        d = load(direction, mask, MASKED).to(tl.float32)
        store(direction, to_storage(_mix(G, d, dir_g, dir_d), direction.dtype.element_ty), mask,
              MASKED)
    if MODE == MODE_REUSE:
        g = g + load(direction, mask, MASKED).to(tl.float32) * dir_d
    return g


@triton.jit
def _sgd_chunk(param, grad, origin, buf, direction, mask, gscale, dir_g, dir_d, is_new, neg_lr,
               momentum, one_minus_dampening, weight_decay, HAS_WD: tl.constexpr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MODE: tl.constexpr,
               MASKED: tl.constexpr):
    theta = load(origin, mask, MASKED).to(tl.float32)
    g = _gradient(grad, direction, mask, gscale, dir_g, dir_d, MODE, MASKED)
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


@triton.jit
def _walk(layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, found_inf_ptr, C, T,
          MODE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """What every update kernel's program starts with: its chunk, the tensor's flags, θ,
    where θ is updated from (the backup, or θ itself in a reuse), the direction (or a
    stand-in), whether the step is skipped, whether this tensor is left as it is (skipped
    or frozen) and whether the chunk is full."""
    t, start, n, offset = chunk_of(layout_ptr, C, T, BLOCK)
    dtype = backup_ptr.dtype.element_ty
    flags = tl.load(ptrs_ptr + ROW_FLAGS * T + t)
    param = row_pointer(ptrs_ptr, ROW_PARAM, T, t, dtype, ALIGNED)
    if MODE == MODE_REUSE:
        origin = param
    else:
        origin = backup_ptr + offset
    direction = param
    if MODE != MODE_PLAIN:
        direction = row_pointer(dir_ptrs_ptr, 0, T, t, dtype, ALIGNED)
    skipped = tl.load(found_inf_ptr) != 0
    keep = skipped | ((flags & FLAG_FROZEN) != 0)
    return t, start, n, flags, param, origin, direction, skipped, keep, start + BLOCK <= n


@triton.jit
def _kept_direction(grad, direction, mask, skipped, dir_g, dir_d, MASKED: tl.constexpr):
    """A refresh's direction where θ is only restored: zeros when the step is skipped (the
    saved g1 may hold inf/NaN, which a reuse step's 0·d would carry into θ), else (a frozen
    tensor) d = a·G + c·d."""
    dtype = direction.dtype.element_ty
    if skipped:
        store(direction, to_storage(tl.zeros(mask.shape, dtype=tl.float32), dtype), mask, MASKED)
    else:
        G = load(grad, mask, MASKED).to(tl.float32)
        d = load(direction, mask, MASKED).to(tl.float32)
        store(direction, to_storage(_mix(G, d, dir_g, dir_d), dtype), mask, MASKED)


@triton.jit
def _keep(ptrs_ptr, T, t, param, origin, direction, offs, n, full, skipped, dir_g_ptr,
          dir_d_ptr, MODE: tl.constexpr, ALIGNED: tl.constexpr):
    """A skipped step or a frozen tensor: θ ← backup (nothing at all in a reuse); in a
    refresh the direction too (:func:`_kept_direction`). The rare path: everything it needs
    beyond θ and the backup is read here."""
    if MODE != MODE_REUSE:
        if full:
            copy_chunk(param + offs, origin + offs, offs < n, False)
        else:
            copy_chunk(param + offs, origin + offs, offs < n, True)
    if MODE == MODE_REFRESH:
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, origin.dtype.element_ty, ALIGNED)
        dir_g, dir_d = _scalar(dir_g_ptr), _scalar(dir_d_ptr)
        if full:
            _kept_direction(grad + offs, direction + offs, offs < n, skipped, dir_g, dir_d,
                            False)
        else:
            _kept_direction(grad + offs, direction + offs, offs < n, skipped, dir_g, dir_d,
                            True)


@triton.jit
def _scalar(ptr):
    return tl.load(ptr).to(tl.float32)


@triton.jit(do_not_specialize=["C", "T"],
            do_not_specialize_on_alignment=SCALAR_POINTERS)
def _sgd_kernel(layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, gscale_ptr, found_inf_ptr,
                dir_g_ptr, dir_d_ptr, C, T, neg_lr, momentum, one_minus_dampening, weight_decay,
                HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                MODE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, flags, param, origin, direction, skipped, keep, full = _walk(
        layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, found_inf_ptr, C, T, MODE, ALIGNED, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if keep:
        _keep(ptrs_ptr, T, t, param, origin, direction, offs, n, full, skipped, dir_g_ptr,
              dir_d_ptr, MODE, ALIGNED)
    else:
        dtype = backup_ptr.dtype.element_ty
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
        buf = grad
        if MOMENTUM:
            buf = row_pointer(ptrs_ptr, ROW_STATE, T, t, dtype, ALIGNED)
        gscale, dir_g, dir_d = _scalar(gscale_ptr), _scalar(dir_g_ptr), _scalar(dir_d_ptr)
        is_new = (flags & FLAG_NEW_STATE) != 0
        if full:
            _sgd_chunk(param + offs, grad + offs, origin + offs, buf + offs, direction + offs,
                       offs < n, gscale, dir_g, dir_d, is_new, neg_lr, momentum,
                       one_minus_dampening, weight_decay, HAS_WD, MOMENTUM, NESTEROV, MODE, False)
        else:
            _sgd_chunk(param + offs, grad + offs, origin + offs, buf + offs, direction + offs,
                       offs < n, gscale, dir_g, dir_d, is_new, neg_lr, momentum,
                       one_minus_dampening, weight_decay, HAS_WD, MOMENTUM, NESTEROV, MODE, True)


@triton.jit
def _adamw_chunk(param, grad, origin, exp_avg, exp_avg_sq, direction, mask, gscale, dir_g, dir_d,
                 step_size, bias_correction2_sqrt, decay, one_minus_beta1, beta2,
                 one_minus_beta2, eps, MODE: tl.constexpr, MASKED: tl.constexpr):
    g = _gradient(grad, direction, mask, gscale, dir_g, dir_d, MODE, MASKED)
    theta = load(origin, mask, MASKED).to(tl.float32) * decay
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
def _adamw_kernel(layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, gscale_ptr, found_inf_ptr,
                  dir_g_ptr, dir_d_ptr, C, T, lr_bits, beta1_bits, beta2_bits, decay,
                  one_minus_beta1, beta2, one_minus_beta2, eps, MODE: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, flags, param, origin, direction, skipped, keep, full = _walk(
        layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, found_inf_ptr, C, T, MODE, ALIGNED, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if keep:
        _keep(ptrs_ptr, T, t, param, origin, direction, offs, n, full, skipped, dir_g_ptr,
              dir_d_ptr, MODE, ALIGNED)
    else:
        dtype = backup_ptr.dtype.element_ty
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, dtype, ALIGNED)
        exp_avg = row_pointer(ptrs_ptr, ROW_STATE, T, t, dtype, ALIGNED)
        exp_avg_sq = row_pointer(ptrs_ptr, ROW_STATE + 1, T, t, dtype, ALIGNED)
        step = tl.load(row_pointer(ptrs_ptr, ROW_STATE + 2, T, t, tl.float32, False))
        step_size, bias_correction2_sqrt = adamw_bias_corrections(  # the step was advanced
            from_f64_bits(lr_bits), from_f64_bits(beta1_bits), from_f64_bits(beta2_bits), step)
        gscale, dir_g, dir_d = _scalar(gscale_ptr), _scalar(dir_g_ptr), _scalar(dir_d_ptr)
        if full:
            _adamw_chunk(param + offs, grad + offs, origin + offs, exp_avg + offs,
                         exp_avg_sq + offs, direction + offs, offs < n, gscale, dir_g, dir_d,
                         step_size, bias_correction2_sqrt, decay, one_minus_beta1, beta2,
                         one_minus_beta2, eps, MODE, False)
        else:
            _adamw_chunk(param + offs, grad + offs, origin + offs, exp_avg + offs,
                         exp_avg_sq + offs, direction + offs, offs < n, gscale, dir_g, dir_d,
                         step_size, bias_correction2_sqrt, decay, one_minus_beta1, beta2,
                         one_minus_beta2, eps, MODE, True)


@triton.jit
def _combine_chunk(param, grad, origin, direction, mask, gscale, dir_g, dir_d,
                   MODE: tl.constexpr, MASKED: tl.constexpr):
    if MODE != MODE_REUSE:
        copy_chunk(param, origin, mask, MASKED)
    g = _gradient(grad, direction, mask, gscale, dir_g, dir_d, MODE, MASKED)
    store(grad, to_storage(g, grad.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=["C", "T"],
            do_not_specialize_on_alignment=SCALAR_POINTERS)
def _restore_combine_kernel(layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, gscale_ptr,
                            found_inf_ptr, dir_g_ptr, dir_d_ptr, C, T, MODE: tl.constexpr,
                            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, flags, param, origin, direction, skipped, keep, full = _walk(
        layout_ptr, ptrs_ptr, backup_ptr, dir_ptrs_ptr, found_inf_ptr, C, T, MODE, ALIGNED, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if keep:
        _keep(ptrs_ptr, T, t, param, origin, direction, offs, n, full, skipped, dir_g_ptr,
              dir_d_ptr, MODE, ALIGNED)
    else:
        grad = row_pointer(ptrs_ptr, ROW_GRAD, T, t, backup_ptr.dtype.element_ty, ALIGNED)
        gscale, dir_g, dir_d = _scalar(gscale_ptr), _scalar(dir_g_ptr), _scalar(dir_d_ptr)
        if full:
            _combine_chunk(param + offs, grad + offs, origin + offs, direction + offs, offs < n,
                           gscale, dir_g, dir_d, MODE, False)
        else:
            _combine_chunk(param + offs, grad + offs, origin + offs, direction + offs, offs < n,
                           gscale, dir_g, dir_d, MODE, True)


@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["found_inf_ptr"])
def _advance_steps_kernel(ptrs_ptr, found_inf_ptr, T, STEP_ROW: tl.constexpr,
                          ITERS: tl.constexpr, BLOCK: tl.constexpr):
    taken = 1.0 - tl.load(found_inf_ptr).to(tl.float32)
    advance_steps(ptrs_ptr, T, taken, STEP_ROW, ITERS, BLOCK)


def _check_rows(table, algo: str) -> None:
    assert table.rows == rows_of(algo), (table.rows, algo)


class Mix:
    """How an update launch handles the interval=k direction: ``mode`` (PLAIN, REFRESH or
    REUSE), the direction's :class:`~.triton_common.StateRow` and the two 0-dim fp32
    coefficients: (a, c) of a refresh, d ← a·G + c·d; in a reuse ``dir_d`` is v of
    g = u·G + v·d (u is the launch's gscale)."""

    __slots__ = ("mode", "directions", "dir_g", "dir_d")

    def __init__(self, mode: int = PLAIN, directions=None, dir_g: Optional[torch.Tensor] = None,
                 dir_d: Optional[torch.Tensor] = None):
        self.mode, self.directions, self.dir_g, self.dir_d = mode, directions, dir_g, dir_d


_PLAIN = Mix()


def _common_args(table, gscale, found_inf, mix: Mix):
    """The leading arguments of every update kernel, and whether it may take its ALIGNED
    variant."""
    plain = mix.mode == PLAIN
    dir_ptrs = table.ptrs if plain else mix.directions.ptrs
    dir_g = gscale if mix.dir_g is None else mix.dir_g
    dir_d = gscale if mix.dir_d is None else mix.dir_d
    aligned = table.aligned and (plain or mix.directions.aligned)
    return (table.layout, table.ptrs, table.backup, dir_ptrs, gscale, found_inf, dir_g, dir_d,
            table.num_chunks, table.num_tensors), aligned


def sgd_update(table, gscale: torch.Tensor, found_inf: torch.Tensor, *, lr: float,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool,
               mix: Mix = _PLAIN) -> None:
    """One launch (none for a table without elements). With momentum the table's
    ``momentum_buffer`` row must hold every tensor's buffer (FLAG_NEW_STATE: just created)."""
    _check_rows(table, "sgd")
    if table.num_chunks:
        args, aligned = _common_args(table, gscale, found_inf, mix)
        _sgd_kernel[(table.num_chunks,)](
            *args, f32(-lr), f32(momentum), f32(1 - dampening), f32(weight_decay),
            HAS_WD=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=bool(nesterov),
            MODE=mix.mode, ALIGNED=aligned, BLOCK=table.chunk, **LAUNCH_OPTIONS)


def advance_adamw_steps(table, found_inf: torch.Tensor) -> None:
    """One one-program launch: every non-frozen tensor's ``step`` += 1 unless found_inf."""
    _check_rows(table, "adamw")
    T = table.num_tensors
    _advance_steps_kernel[(1,)](table.ptrs, found_inf, T, STEP_ROW=table.row("step"),
                                ITERS=finalize_iters(T), BLOCK=FINALIZE_BLOCK,
                                **SMALL_LAUNCH_OPTIONS)


def adamw_update(table, gscale: torch.Tensor, found_inf: torch.Tensor, *, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float,
                 advance_step: bool = True, mix: Mix = _PLAIN) -> None:
    """The per-tensor step counts (0-dim float32) move by one unless ``found_inf`` is set,
    then the element-wise update reads them for the bias corrections. One kernel cannot both
    advance a counter and let all its programs read it, so that is two launches, or one when
    ``advance_step=False`` says the caller has advanced them (the update finalize does)."""
    _check_rows(table, "adamw")
    if advance_step:
        advance_adamw_steps(table, found_inf)
    if table.num_chunks:
        args, aligned = _common_args(table, gscale, found_inf, mix)
        _adamw_kernel[(table.num_chunks,)](
            *args, f64_bits(lr), f64_bits(beta1), f64_bits(beta2), f32(1 - lr * weight_decay),
            f32(1 - beta1), f32(beta2), f32(1 - beta2), f32(eps), MODE=mix.mode,
            ALIGNED=aligned, BLOCK=table.chunk, **LAUNCH_OPTIONS)


def restore_and_combine(table, gscale: torch.Tensor, found_inf: torch.Tensor,
                        mix: Mix = _PLAIN) -> None:
    """One launch: θ ← backup; G ← gscale·G unless ``found_inf`` (or the tensor is frozen).
    A reuse: G ← u·G + v·d, θ as it is."""
    if table.num_chunks:
        args, aligned = _common_args(table, gscale, found_inf, mix)
        _restore_combine_kernel[(table.num_chunks,)](
            *args, MODE=mix.mode, ALIGNED=aligned, BLOCK=table.chunk, **LAUNCH_OPTIONS)


device_functions(globals())
