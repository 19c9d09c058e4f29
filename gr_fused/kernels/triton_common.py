"""What every gr_fused Triton kernel shares: the walk over a tensor table (one program per
chunk), masked and unmasked memory access, and the arithmetic helpers that make a kernel
round exactly where torch rounds (``fma``, ``powi``, ``f32`` scalars and the fp32 → storage
rounding ``to_storage``).

A kernel receives a bucket's :class:`~gr_fused.backends.tensor_table.TensorTable` as two
int64 device arrays (``layout`` and ``ptrs``, see tensor_table.py) and its element type from
the table's flat backup. Program ``c`` handles chunk ``c``: :func:`chunk_of` reads which
tensor it lies in, where it starts, that tensor's size and backup offset; :func:`row_pointer`
turns a tensor's address in ``ptrs`` into a typed pointer. A full chunk (BLOCK elements)
takes the unmasked path and a tensor's last, shorter chunk the masked one, chosen at run
time, so the compiled code moves 128 bits per instruction on every full chunk whatever the
tensor sizes, as long as the addresses are 16-byte aligned (the ``ALIGNED`` variant, which
tells the compiler so with ``tl.multiple_of``).

Everything is computed in fp32 whatever the storage dtype (fp32, bf16, fp16) and rounded
once on the way back, as ``TorchBackend`` does.
"""
from __future__ import annotations

import os
import struct
from typing import List

import torch
import triton
import triton.language as tl

BLOCK = 4096      # elements per chunk (one program): 16 fp32 per thread at NUM_WARPS=8
NUM_WARPS = 8
FINALIZE_BLOCK = 1024   # lanes of the one-program kernels that add partial sums
# No implicit multiply-add contraction: each product and sum is rounded where
# torch_backend.py's operations round (explicit ``fma`` where torch fuses), so compiled code
# and the interpreter give the same bits.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
SMALL_LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)

# rows of a table's ``ptrs`` (tensor_table.rows_of): param, grad, flags, then the state rows
ROW_PARAM: tl.constexpr = tl.constexpr(0)
ROW_GRAD: tl.constexpr = tl.constexpr(1)
ROW_FLAGS: tl.constexpr = tl.constexpr(2)
ROW_STATE: tl.constexpr = tl.constexpr(3)     # momentum_buffer; exp_avg (then exp_avg_sq, step)
FLAG_NEW_STATE: tl.constexpr = tl.constexpr(1)
FLAG_FROZEN: tl.constexpr = tl.constexpr(2)
BACKUP_ALIGN: tl.constexpr = tl.constexpr(16)  # elements: every backup segment starts on 64 B
F64_MAX: tl.constexpr = tl.constexpr(1.7976931348623157e308)
DIRECTION_TOL: tl.constexpr = tl.constexpr(1.1920928955078125e-07)  # as _scalars.py: 2**-23
# what an update kernel does with the cached direction of interval=k (its MODE)
MODE_PLAIN: tl.constexpr = tl.constexpr(0)    # the GR update (θ from the backup)
MODE_REFRESH: tl.constexpr = tl.constexpr(1)  # and direction ← a·G + c·direction first
MODE_REUSE: tl.constexpr = tl.constexpr(2)    # g = u·G + v·direction, θ updated in place


def _interpreting() -> bool:
    """Whether Triton defines kernels for its interpreter (TRITON_INTERPRET) right now."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton versions before knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpreting()


def f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value, as a Python float. Scalar kernel arguments go
    through this: compiled kernels receive fp32 scalars, the interpreter Python floats, and
    with fp32-exact values both compute the same."""
    return struct.unpack("f", struct.pack("f", x))[0]


def finalize_iters(count: int) -> int:
    """The loop count of a one-program pass over ``count`` items in FINALIZE_BLOCK lanes: a
    compile-time constant (the interpreter cannot loop to a bound read from memory), rounded
    up to a power of two so that a few variants cover every size."""
    return triton.next_power_of_2(max(triton.cdiv(count, FINALIZE_BLOCK), 1))


class StateRow:
    """One more row of addresses beside a table's ``ptrs``: a per-tensor state tensor (the
    interval=k direction) of each of the table's tensors, as an int64 device array ``ptrs``
    of ``T`` entries; ``host`` the addresses, ``aligned`` whether each is a multiple of 16
    bytes (a kernel takes its ALIGNED variant when the table and the row both are)."""

    __slots__ = ("host", "ptrs", "aligned")

    def __init__(self, host: List[int], device: torch.device):
        self.host = host
        values = torch.tensor(host or [0], dtype=torch.int64)
        self.ptrs = values if device.type == "cpu" else values.to(device, non_blocking=True)
        self.aligned = all(a % 16 == 0 for a in host)


# ------------------------------------------------------------------------------ the table walk
@triton.jit
def chunk_of(layout_ptr, C, T, BLOCK: tl.constexpr):
    """This program's chunk: ``(t, start, n, offset)``: its tensor's index, its first element
    in that tensor (int64), the tensor's numel and the tensor's offset in the flat backup."""
    c = tl.program_id(0)
    t = tl.load(layout_ptr + c)
    first = tl.load(layout_ptr + C + t)
    n = tl.load(layout_ptr + C + T + t)
    offset = tl.load(layout_ptr + C + 2 * T + t)
    start = (c - first) * BLOCK
    return t, start, n, tl.multiple_of(offset, BACKUP_ALIGN)


@triton.jit
def row_pointer(ptrs_ptr, row, T, t, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Row ``row`` of tensor ``t`` in ``ptrs`` as a pointer to ``dtype``; with ALIGNED the
    compiler is told that the address is a multiple of 16 bytes (128-bit accesses)."""
    p = tl.load(ptrs_ptr + row * T + t).to(tl.pointer_type(dtype))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load(ptrs, mask, MASKED: tl.constexpr):
    """``tl.load`` of a chunk: masked (a tensor's last chunk; 0 outside) or not (a full one)."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


# ------------------------------------------------------------------------------ arithmetic
@triton.jit
def fma_native(x, y, z):
    """x·y + z with one rounding: ``tl.fma`` (``fma.rn.f32`` in compiled code)."""
    return tl.fma(x, y, z)


@triton.jit
def fma_rn_fp64(x, y, z):
    """x·y + z in fp32 with one rounding, from fp64 arithmetic only (for the interpreter,
    whose ``tl.fma`` rounds the product and then the sum). The product of two fp32 values is
    exact in fp64; the sum s = p + z is rounded to odd (TwoSum gives its exact error, and an
    inexact s whose last bit is even moves one ulp towards the error), and rounding that to
    fp32 is the correctly rounded x·y + z: with 29 extra bits, round-to-odd never lands on
    an fp32 tie that the exact value is not on."""
    p = x.to(tl.float64) * y
    q = z.to(tl.float64)
    s = p + q
    pp = s - q
    err = (p - pp) + (q - (s - pp))
    bits = s.to(tl.int64, bitcast=True)
    inexact_even = ((err > 0) | (err < 0)) & ((bits & 1) == 0)  # false for inf/NaN
    toward = tl.where((err > 0) == (s > 0), 1, -1).to(tl.int64)
    bits = tl.where(inexact_even, bits + toward, bits)
    return bits.to(tl.float64, bitcast=True).to(tl.float32)


# ``fma``: what the kernels call wherever torch computes ``add(z, x, alpha=y)`` or
# ``addcmul`` (one rounding). Compiled: the hardware FMA. Interpreted: the fp64 version.
fma = fma_rn_fp64 if INTERPRETED else fma_native


def f64_bits(x: float) -> int:
    """``x`` as the bits of a float64, read as a signed int64: how a kernel receives a scalar
    it needs with all 53 bits (Triton passes Python floats to compiled kernels as fp32). The
    kernel turns it back with :func:`from_f64_bits`; mark such arguments ``do_not_specialize``
    (their divisibility by 16 would otherwise select variants)."""
    return struct.unpack("q", struct.pack("d", float(x)))[0]


@triton.jit
def from_f64_bits(bits):
    """The float64 whose bits :func:`f64_bits` passed (an i32 argument, for 0.0, is widened
    with its sign first)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def powi(base, exponent):
    """``base ** exponent`` in float64, for a float64 scalar ``base`` and an integer-valued
    fp32 scalar tensor ``exponent`` in [0, 2^32): square-and-multiply (as many rounds as the
    exponent has bits; the interpreter has no libdevice pow), not rounded any further. Each
    product rounds once, so the relative error is below exponent·2^-53: within an ulp or two
    of float64 for the step counts of training runs."""
    n = exponent.to(tl.int64)
    result = exponent.to(tl.float64) * 0.0 + 1.0
    square = result * base
    while n > 0:
        result = tl.where((n & 1) != 0, result * square, result)
        square = square * square
        n = n >> 1
    return result


@triton.jit
def adamw_bias_corrections(lr, beta1, beta2, step):
    """``(lr / (1 − β1^step), √(1 − β2^step))`` as torch.optim.AdamW computes them (its
    default, foreach and fused paths): in float64 from the step count, each rounded once to
    fp32. ``lr``, ``beta1``, ``beta2``: float64 scalars (the hyperparameters' exact values,
    see :func:`f64_bits`); ``step``: the fp32 step count, already advanced. The float64
    division and square root are IEEE-rounded, compiled (``div.rn.f64``, ``sqrt.rn.f64``)
    and interpreted alike."""
    step_size = (lr / (1.0 - powi(beta1, step))).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - powi(beta2, step)).to(tl.float32)
    return step_size, bias_correction2_sqrt


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even into ``dtype``. For bf16 the rounding is explicit:
    the Triton interpreter truncates fp32 → bf16, compiled code and torch round to nearest
    even, and this bit-level rounding gives torch's bits on both (NaN → 0x7FC0)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x == x, bits >> 16, 0x7FC0)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def sum_partial_range(partial_ptr, start, stop, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """partials[start:stop] (float64) added in a fixed order by one program, in float64.
    ITERS·BLOCK must cover stop − start."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < stop, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def advance_steps(ptrs_ptr, T, taken, STEP_ROW: tl.constexpr, ITERS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One program: AdamW's per-tensor ``step`` (0-dim float32, its address in row
    STEP_ROW) += ``taken`` for every tensor of the table that is not FROZEN."""
    for i in range(ITERS):
        idx = i * BLOCK + tl.arange(0, BLOCK)
        inside = idx < T
        address = tl.load(ptrs_ptr + STEP_ROW * T + idx, mask=inside, other=0)
        flags = tl.load(ptrs_ptr + ROW_FLAGS * T + idx, mask=inside, other=0)
        live = inside & (address != 0) & ((flags & FLAG_FROZEN) == 0)
        step = address.to(tl.pointer_type(tl.float32))
        tl.store(step, tl.load(step, mask=live, other=0.0) + taken, mask=live)


def device_functions(namespace: dict) -> None:
    """Called at the end of each kernel module with its ``globals()``. Under the interpreter,
    a call of a ``@triton.jit`` function from a kernel patches ``triton.language`` again
    (Triton does it for every device-function call; it costs more than the function), but
    the launch of the kernel has already patched it, and gr_fused's device functions use
    only ``triton.language`` and functions of this package. So theirs skip that step:
    identical results, about 2x faster kernels under the interpreter. Compiled kernels are
    not affected."""
    if not INTERPRETED:
        return
    from triton.runtime.interpreter import InterpretedFunction
    for value in list(namespace.values()):
        if type(value) is InterpretedFunction:
            value.__class__ = _PatchedDeviceFunction


if INTERPRETED:
    from triton.runtime.interpreter import InterpretedFunction, InterpreterError

    class _PatchedDeviceFunction(InterpretedFunction):
        """A gr_fused ``@triton.jit`` function under the interpreter; launched as a kernel
        (``run``) it behaves as any other, called from a kernel it runs directly."""

        def __call__(self, *args, **kwargs):
            try:
                return self.rewrite()(*args, **kwargs)
            except InterpreterError:
                raise
            except Exception as exc:
                raise InterpreterError(repr(exc)) from exc


device_functions(globals())
