"""The ascent-perturb phase over flat buffers, and its central-difference reflection.

perturb:  backup ← θ;  θ ← θ + eps·w·g (w = θ² if adaptive, else 1);  g ← fold·g
reflect:  θ ← 2·backup − θ;  g ← −g

``eps`` and ``fold`` are 0-dim tensors read on the device. Bytes per fp32 element: perturb
reads θ, g (8 B) and writes backup, θ, g (12 B); reflect reads backup, θ, g (12 B) and writes
θ, g (8 B).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import BLOCK, LAUNCH_OPTIONS, block_offsets, grid, to_storage


@triton.jit
def _perturb_kernel(param_ptr, grad_ptr, backup_ptr, eps_ptr, fold_ptr, n,
                    ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    eps = tl.load(eps_ptr).to(tl.float32)
    fold = tl.load(fold_ptr).to(tl.float32)
    raw = tl.load(param_ptr + offs, mask=mask)
    tl.store(backup_ptr + offs, raw, mask=mask)
    theta = raw.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    step = g * eps
    if ADAPTIVE:
        step = step * (theta * theta)
    tl.store(param_ptr + offs, to_storage(theta + step, param_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_ptr + offs, to_storage(g * fold, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reflect_kernel(param_ptr, grad_ptr, backup_ptr, n, BLOCK: tl.constexpr):
    offs = block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    backup = tl.load(backup_ptr + offs, mask=mask).to(tl.float32)
    theta = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    tl.store(param_ptr + offs, to_storage(backup * 2.0 - theta, param_ptr.dtype.element_ty),
             mask=mask)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)  # negated in fp32: exact, and the
    tl.store(grad_ptr + offs, to_storage(-g, grad_ptr.dtype.element_ty), mask=mask)  # interpreter
    # cannot negate bf16 (it holds bf16 as raw 16-bit integers)


def perturb(param: torch.Tensor, grad: torch.Tensor, backup: torch.Tensor, eps: torch.Tensor,
            fold: torch.Tensor, adaptive: bool, block: int = BLOCK) -> None:
    """One launch; see the module docstring."""
    n = param.numel()
    if n:
        _perturb_kernel[grid(n, block)](param, grad, backup, eps, fold, n, ADAPTIVE=adaptive,
                                        BLOCK=block, **LAUNCH_OPTIONS)


def reflect(param: torch.Tensor, grad: torch.Tensor, backup: torch.Tensor,
            block: int = BLOCK) -> None:
    """One launch; see the module docstring."""
    n = param.numel()
    if n:
        _reflect_kernel[grid(n, block)](param, grad, backup, n, BLOCK=block, **LAUNCH_OPTIONS)
