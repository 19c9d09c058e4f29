"""What every gr_fused Triton kernel shares: the launch shape, int64 element offsets, and the
arithmetic helpers that make a kernel round exactly where torch rounds (``fma``, ``powi``,
``f32`` scalars, and the fp32 → storage-dtype rounding ``to_storage``).

All kernels stream 1-D flat buffers (one program per ``BLOCK`` elements) and compute in
float32 whatever the storage dtype (fp32, bf16, fp16), rounding once on the way back, as
``TorchBackend`` does.
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl

BLOCK = 4096      # elements per program: 16 fp32 per thread at NUM_WARPS=8, 128-bit accesses
NUM_WARPS = 8
# No implicit multiply-add contraction: each product and sum is rounded where torch_backend.py's
# operations round (explicit ``fma`` where torch fuses), so compiled code and the interpreter
# give the same bits.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


def grid(n: int, block: int):
    return (triton.cdiv(n, block),)


@triton.jit
def block_offsets(pid, BLOCK: tl.constexpr):
    """The element offsets of program ``pid``, in int64 so buffers past 2^31 elements work."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


def f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value, as a Python float. Scalar kernel arguments go
    through this: compiled kernels receive fp32 scalars, the interpreter Python floats, and
    with fp32-exact values both compute the same."""
    return struct.unpack("f", struct.pack("f", x))[0]


@triton.jit
def fma(x, y, z):
    """x·y + z in fp32 with one rounding, as torch computes ``add(z, x, alpha=y)`` and
    ``addcmul`` (an FMA on GPUs and in ATen's vectorized CPU kernels). ``x`` is an fp32 tensor,
    ``y`` an fp32 tensor or a scalar argument (see ``f32``). Computed in fp64, where the
    product is exact, because the interpreter's ``tl.fma`` rounds twice."""
    return (x.to(tl.float64) * y + z.to(tl.float64)).to(tl.float32)


@triton.jit
def powi(base, exponent):
    """``base ** exponent`` for a scalar argument ``base`` and an integer-valued fp32 scalar
    tensor ``exponent`` in [0, 2^32), as torch.pow's fp32 result: square-and-multiply in fp64,
    then one rounding (the interpreter has no libdevice pow)."""
    n = exponent.to(tl.int64)
    result = exponent.to(tl.float64) * 0.0 + 1.0
    square = result * base
    for bit in tl.static_range(32):
        result = tl.where(((n >> bit) & 1) != 0, result * square, result)
        square = square * square
    return result.to(tl.float32)


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
