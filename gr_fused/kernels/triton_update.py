"""The fused combine + restore + base update over flat buffers (phase 3 of a GR step).

Every kernel reads G (the grad buffer: fold·g1 + g2), the backup of θ and the device scalars
``gscale`` and ``found_inf``; with g = gscale·G it restores θ from the backup and applies the
base update in the operation order of ``gr_fused/backends/torch_backend.py``:

  sgd    g = gscale·G (+ wd·backup);  buf = g on the first step else μ·buf + (1−damp)·g;
         d = g + μ·buf (nesterov) or buf;  θ = backup − lr·d
  adamw  step += 1;  θ = backup·(1 − lr·wd);  m = m + (1−β1)·(g − m);
         v = β2·v + (1−β2)·g²;  θ = θ − (lr/(1−β1^step))·m/(√v/√(1−β2^step) + eps)
  none   θ = backup;  G = g   (a torch optimizer steps afterwards)

When ``found_inf`` is set: θ = backup and every state buffer keeps its bits (a buffer created
by this step is zeros). Host-side coefficients (1 − damp, 1 − lr·wd, ...) are computed in
Python double precision and passed as fp32, as torch passes its scalars; where torch rounds
once (``add(alpha=s)``, ``addcmul``: an FMA) the kernels use ``fma``, and β^step is torch.pow's
fp32 value (``powi``).

Bytes per fp32 element: sgd with momentum reads backup, G, buf (12 B) and writes θ, buf
(8 B); adamw reads 16 B and writes 12 B; none reads 8 B and writes 8 B.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (BLOCK, LAUNCH_OPTIONS, block_offsets, f32, fma, grid, powi,
                            to_storage)


@triton.jit
def _sgd_kernel(param_ptr, grad_ptr, backup_ptr, buf_ptr, gscale_ptr, found_inf_ptr, n,
                neg_lr, momentum, one_minus_dampening, weight_decay,
                HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    skip = tl.load(found_inf_ptr) != 0
    gscale = tl.load(gscale_ptr).to(tl.float32)
    backup = tl.load(backup_ptr + offs, mask=mask)
    theta = backup.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32) * gscale
    if HAS_WD:
        g = fma(theta, weight_decay, g)
    d = g
    if MOMENTUM:
        if FIRST:
            buf = g
            kept = tl.zeros_like(g).to(buf_ptr.dtype.element_ty)
        else:
            kept = tl.load(buf_ptr + offs, mask=mask)
            buf = fma(g, one_minus_dampening, kept.to(tl.float32) * momentum)
        tl.store(buf_ptr + offs, tl.where(skip, kept, to_storage(buf, buf_ptr.dtype.element_ty)),
                 mask=mask)
        if NESTEROV:
            d = fma(buf, momentum, g)
        else:
            d = buf
    new = to_storage(fma(d, neg_lr, theta), param_ptr.dtype.element_ty)
    tl.store(param_ptr + offs, tl.where(skip, backup, new), mask=mask)


@triton.jit
def _advance_step_kernel(step_ptr, found_inf_ptr):
    taken = tl.where(tl.load(found_inf_ptr) != 0, 0.0, 1.0)
    tl.store(step_ptr, tl.load(step_ptr) + taken)


@triton.jit
def _adamw_kernel(param_ptr, grad_ptr, backup_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr,
                  gscale_ptr, found_inf_ptr, n, lr, decay, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, eps, BLOCK: tl.constexpr):
    offs = block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    skip = tl.load(found_inf_ptr) != 0
    gscale = tl.load(gscale_ptr).to(tl.float32)
    step = tl.load(step_ptr).to(tl.float32)  # already advanced by _advance_step_kernel
    bias_correction1 = 1.0 - powi(beta1, step)
    bias_correction2_sqrt = tl.sqrt_rn(1.0 - powi(beta2, step))
    step_size = tl.div_rn(1.0, bias_correction1) * lr  # torch's lr / bc1 is bc1⁻¹·lr

    backup = tl.load(backup_ptr + offs, mask=mask)
    old_m = tl.load(exp_avg_ptr + offs, mask=mask)
    old_v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32) * gscale
    theta = backup.to(tl.float32) * decay
    m = old_m.to(tl.float32)
    m = fma(g - m, one_minus_beta1, m)
    v = fma(one_minus_beta2 * g, g, old_v.to(tl.float32) * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    new = theta - tl.div_rn(step_size * m, denom)

    dtype = param_ptr.dtype.element_ty
    tl.store(param_ptr + offs, tl.where(skip, backup, to_storage(new, dtype)), mask=mask)
    tl.store(exp_avg_ptr + offs, tl.where(skip, old_m, to_storage(m, dtype)), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, tl.where(skip, old_v, to_storage(v, dtype)), mask=mask)


@triton.jit
def _restore_combine_kernel(param_ptr, grad_ptr, backup_ptr, gscale_ptr, found_inf_ptr, n,
                            BLOCK: tl.constexpr):
    offs = block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    skip = tl.load(found_inf_ptr) != 0
    gscale = tl.load(gscale_ptr).to(tl.float32)
    tl.store(param_ptr + offs, tl.load(backup_ptr + offs, mask=mask), mask=mask)
    G = tl.load(grad_ptr + offs, mask=mask)
    g = to_storage(G.to(tl.float32) * gscale, grad_ptr.dtype.element_ty)
    tl.store(grad_ptr + offs, tl.where(skip, G, g), mask=mask)


def sgd_update(param, grad, backup, momentum_buffer, gscale, found_inf, *, lr: float,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool,
               first: bool, block: int = BLOCK) -> None:
    """One launch. ``momentum_buffer`` is None when momentum is 0; ``first`` says it holds
    nothing yet (it is then written: g, or zeros when the step is skipped)."""
    n = param.numel()
    if n == 0:
        return
    has_momentum = momentum != 0
    _sgd_kernel[grid(n, block)](
        param, grad, backup, momentum_buffer if has_momentum else param, gscale, found_inf, n,
        f32(-lr), f32(momentum), f32(1 - dampening), f32(weight_decay),
        HAS_WD=weight_decay != 0, MOMENTUM=has_momentum, FIRST=bool(first),
        NESTEROV=bool(nesterov), BLOCK=block, **LAUNCH_OPTIONS)


def adamw_update(param, grad, backup, exp_avg, exp_avg_sq, step, gscale, found_inf, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 advance_step: bool = True, block: int = BLOCK) -> None:
    """The step counter (a 0-dim float32 tensor) moves by one unless ``found_inf`` is set,
    then the element-wise update reads it for the bias corrections. One kernel cannot both
    advance the counter and let all its programs read it, so that is two launches, or one
    when ``advance_step=False`` says the caller has advanced it (``update_scalars`` does)."""
    if advance_step:
        _advance_step_kernel[(1,)](step, found_inf, num_warps=1)
    n = param.numel()
    if n == 0:
        return
    _adamw_kernel[grid(n, block)](
        param, grad, backup, exp_avg, exp_avg_sq, step, gscale, found_inf, n,
        f32(lr), f32(1 - lr * weight_decay), f32(beta1), f32(1 - beta1), f32(beta2),
        f32(1 - beta2), f32(eps), BLOCK=block,
        **LAUNCH_OPTIONS)


def restore_and_combine(param, grad, backup, gscale, found_inf, block: int = BLOCK) -> None:
    """One launch: θ ← backup; G ← gscale·G unless ``found_inf``."""
    n = param.numel()
    if n:
        _restore_combine_kernel[grid(n, block)](param, grad, backup, gscale, found_inf, n,
                                                BLOCK=block, **LAUNCH_OPTIONS)
