"""What every gr_fused Triton kernel shares: the launch shape, int64 element offsets, and the
fp32 → storage-dtype rounding.

All kernels stream 1-D flat buffers (one program per ``BLOCK`` elements) and compute in
float32 whatever the storage dtype (fp32, bf16, fp16), rounding once on the way back, as
``TorchBackend`` does.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 4096      # elements per program: 16 fp32 per thread at NUM_WARPS=8, 128-bit accesses
NUM_WARPS = 8
# No fused multiply-add contraction: every product and sum is rounded as in torch_backend.py's
# separate operations, so compiled GPU code and the interpreter give the same bits.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


def grid(n: int, block: int):
    return (triton.cdiv(n, block),)


@triton.jit
def block_offsets(pid, BLOCK: tl.constexpr):
    """The element offsets of program ``pid``, in int64 so buffers past 2^31 elements work."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even into ``dtype``. For bf16 the rounding is explicit:
    the Triton interpreter truncates fp32 → bf16 (SPEC §4), compiled code and torch round
    to nearest even, and this bit-level rounding gives torch's bits on both (NaN → 0x7FC0)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x == x, bits >> 16, 0x7FC0)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
