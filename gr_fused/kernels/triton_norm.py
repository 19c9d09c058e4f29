"""Deterministic squared norm of a flat buffer: Σ x² (or Σ (x·y)², the adaptive norm Σ (θ·g)²).

Two stages and no float atomics, so the same input gives the same bits every run:
``_partial_sq_kernel`` writes one partial sum per block into a small buffer, and
``_finalize_kernel`` (one program) adds the partials in a fixed order into a 0-dim fp32
tensor on the device. Nothing is read back to the host. The squares are summed in fp64 (as
torch's CPU norms accumulate), so the result is Σx² rounded once to fp32 whatever the block
size or device; the kernels stay memory-bound (one fp64 multiply-add per element).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import BLOCK, LAUNCH_OPTIONS, block_offsets

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
def sum_partial_range(partial_ptr, start, stop, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """partials[start:stop] added in a fixed order (one program) in fp64, rounded once to
    fp32. ITERS·BLOCK must cover stop − start."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < stop, other=0.0)
    return tl.sum(acc, axis=0).to(tl.float32)


@triton.jit
def sum_partials(partial_ptr, num_partials, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """All ``num_partials`` partial sums, as :func:`sum_partial_range`."""
    return sum_partial_range(partial_ptr, 0, num_partials, ITERS, BLOCK)


@triton.jit
def _finalize_kernel(partial_ptr, out_ptr, num_partials, ITERS: tl.constexpr,
                     BLOCK: tl.constexpr):
    tl.store(out_ptr, sum_partials(partial_ptr, num_partials, ITERS, BLOCK))


def partial_sums(inputs: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                 block: int = BLOCK) -> Tuple[torch.Tensor, List[int]]:
    """Stage one over several buffers at once: for each ``(x, y)`` (y None: Σ x²; else
    Σ (x·y)²) one launch writes a partial sum per block into its own slice of one float64
    buffer (an empty x launches nothing). Returns the buffer and the slice boundaries,
    ``bounds[i]:bounds[i + 1]`` for input i; a one-program kernel adds them with
    :func:`sum_partials` or :func:`sum_partial_range`."""
    bounds = [0]
    for x, _ in inputs:
        bounds.append(bounds[-1] + triton.cdiv(x.numel(), block))
    partials = torch.empty(max(bounds[-1], 1), dtype=torch.float64, device=inputs[0][0].device)
    for (x, y), start, stop in zip(inputs, bounds, bounds[1:]):
        if stop > start:
            _partial_sq_kernel[(stop - start,)](x, x if y is None else y, partials[start:],
                                                x.numel(), HAS_Y=y is not None, BLOCK=block,
                                                **LAUNCH_OPTIONS)
    return partials, bounds


def finalize_iters(num_partials: int) -> int:
    """The loop count of a one-program sum over ``num_partials`` partials: a compile-time
    constant (the interpreter cannot loop to a runtime bound), rounded up to a power of two
    so that a few variants cover every size."""
    return triton.next_power_of_2(max(triton.cdiv(num_partials, FINALIZE_BLOCK), 1))


def sq_norm(x: torch.Tensor, y: Optional[torch.Tensor] = None, block: int = BLOCK) -> torch.Tensor:
    """Σ x² (Σ (x·y)² when ``y`` is given) over flat buffers, as a 0-dim float32 tensor on
    x's device. Two launches."""
    out = torch.empty((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out.zero_()
    partials, bounds = partial_sums([(x, y)], block)
    _finalize_kernel[(1,)](partials, out, bounds[-1], ITERS=finalize_iters(bounds[-1]),
                           BLOCK=FINALIZE_BLOCK, **LAUNCH_OPTIONS)
    return out
