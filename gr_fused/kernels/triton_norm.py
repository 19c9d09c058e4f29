"""Deterministic squared norm of a flat buffer: Σ x² (or Σ (x·y)², the adaptive norm Σ (θ·g)²).

Two stages and no float atomics, so the same input gives the same bits every run:
``_partial_sq_kernel`` writes one partial sum per block into a small buffer, and
``_finalize_kernel`` (one program) adds the partials in a fixed order into a 0-dim fp32
tensor on the device. Nothing is read back to the host. The squares are summed in fp64 (as
torch's CPU norms accumulate), so the result is Σx² rounded once to fp32 whatever the block
size or device; the kernels stay memory-bound (one fp64 multiply-add per element).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import BLOCK, LAUNCH_OPTIONS, block_offsets, grid

FINALIZE_BLOCK = 1024


@triton.jit
def _partial_sq_kernel(x_ptr, y_ptr, partial_ptr, n, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = block_offsets(pid, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        v = v * tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v.to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(v * v, axis=0))


@triton.jit
def sum_partials(partial_ptr, num_partials, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """The fp64 partial sums added in a fixed order (one program), rounded once to fp32."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(ITERS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0)
    return tl.sum(acc, axis=0).to(tl.float32)


@triton.jit
def _finalize_kernel(partial_ptr, out_ptr, num_partials, ITERS: tl.constexpr,
                     BLOCK: tl.constexpr):
    tl.store(out_ptr, sum_partials(partial_ptr, num_partials, ITERS, BLOCK))


def sq_norm_partials(x: torch.Tensor, y: Optional[torch.Tensor] = None, block: int = BLOCK
                     ) -> Tuple[torch.Tensor, Dict[str, int]]:
    """Stage one: one launch writing a partial sum of x² (or (x·y)²) per block. Returns the
    partials and the launch arguments of a finalize over them (``num_partials``, ``ITERS``,
    ``BLOCK``), for :func:`sum_partials` in any one-program kernel. ``x`` must be non-empty."""
    n = x.numel()
    partials = torch.empty(triton.cdiv(n, block), dtype=torch.float64, device=x.device)
    _partial_sq_kernel[grid(n, block)](x, x if y is None else y, partials, n,
                                       HAS_Y=y is not None, BLOCK=block, **LAUNCH_OPTIONS)
    # The loop count is a compile-time constant (rounded up to a power of two, so a few
    # variants cover every size): the interpreter cannot loop to a runtime bound.
    iters = triton.next_power_of_2(triton.cdiv(partials.numel(), FINALIZE_BLOCK))
    return partials, dict(num_partials=partials.numel(), ITERS=iters, BLOCK=FINALIZE_BLOCK)


def sq_norm(x: torch.Tensor, y: Optional[torch.Tensor] = None, block: int = BLOCK) -> torch.Tensor:
    """Σ x² (Σ (x·y)² when ``y`` is given) over flat buffers, as a 0-dim float32 tensor on
    x's device. Two launches."""
    out = torch.empty((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out.zero_()
    partials, finalize = sq_norm_partials(x, y, block)
    _finalize_kernel[(1,)](partials, out, **finalize, **LAUNCH_OPTIONS)
    return out
