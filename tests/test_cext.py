"""The compiled kernels of csrc/ (gr_fused._C, backends "cpu" and "cuda").

The host build runs on every machine, so CI checks the C++ math that the CUDA kernels also
run (csrc/grf_math.h is compiled for both); on a GPU the same tests also run the CUDA
kernels, against torch and against Triton.

* the shared equality cases (tests/equality.py) against the torch backend;
* each phase against the torch reference phases (TorchBackend on a flat bucket): sizes of
  1 element, not a multiple of a vector or a host chunk, unaligned buffers, every dtype;
* rounding to fp16/bf16 bit for bit like torch, over all 65536 bit patterns;
* found_inf skips (θ == backup bit for bit, state untouched), determinism of the norm;
* errors: CUDA errors and bad arguments become Python exceptions; a broken or missing
  gr_fused._C costs one warning, never ``import gr_fused``.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gr_fused
from gr_fused import _ext, backends
from gr_fused.backends.base import Bucket
from gr_fused.backends import cext_backend
from gr_fused.backends.cext_backend import _CODES as CODES, CKernels, _where
from gr_fused.backends.torch_backend import TorchBackend, compute_dtype
from equality import (CASE_IDS, CASES, KERNEL_ULPS, make_inputs, run_case, SCALAR_HPARAM_IDS, SCALAR_HPARAMS,
                      SGD_GROUPS, check_ascent_scalars, check_groups, check_nan_in_G_skips,
                      check_update, check_update_scalars, clone_bucket, closure_for,
                      compare_backends, flat_bucket, scalar_group, ulp_close)
from test_nosync import forbid_host_reads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_kernels import DeviceWork  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; the same math is "
                               "tested through the host build on every machine")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_GPU)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 4099, 70001]     # one element; odd; > two host chunks (2^15) and many CUDA blocks
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lib():
    C = _ext.load()
    assert C is not None, f"gr_fused._C is unavailable: {_ext.unavailable_reason()}"
    return C


def backend_name(device):
    return "cuda" if device == "cuda" else "cpu"


# ----------------------------------------------------------------------- shared equality cases
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_host_build_matches_torch_backend(case, lib):
    compare_backends(case, "cpu")


@NEEDS_GPU
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_kernels_match_torch_backend(case, lib):
    compare_backends(case, "cuda", device="cuda")


@NEEDS_GPU
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_kernels_match_triton(case, lib):
    why = backends.unavailable_reason("triton", torch.device("cuda"))
    if why is not None:
        pytest.skip(f"the triton backend cannot run here: {why}")
    compare_backends(case, "cuda", reference="triton", device="cuda")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_host_build_swapping_memory_gives_the_in_place_bits(case, lib, monkeypatch):
    """On a CPU perturb and update write into the backup and the two storages trade memory
    (cext_backend._trades_memory); in place (as on CUDA) they write θ directly. Same bits."""
    inputs = make_inputs(case)
    swapped = run_case(case, "cpu", inputs)
    monkeypatch.setattr(cext_backend, "swap_on_cpu", False)
    in_place = run_case(case, "cpu", inputs)
    for got, want in zip(swapped[0], in_place[0]):
        assert torch.equal(got, want), f"{case.name}: params differ"
    assert swapped[1].keys() == in_place[1].keys()
    for key, want in in_place[1].items():
        assert torch.equal(swapped[1][key], want), f"{case.name}: state {key} differs"


@pytest.mark.skipif(cext_backend._SWAP_DATA_PTR is None,
                    reason="this torch lacks UntypedStorage._swap_data_ptr_, so the host build "
                    "runs its phases in place (tested by every other host-build test)")
def test_cpu_steps_trade_memory_and_every_view_follows(lib):
    """The swap moves the flat param's memory, not the tensors: the parameters, a
    user-held ``.detach()`` and the optimizer's own layout all see θ' after first_step and the
    new θ after second_step; the backup holds θ exactly while perturbed."""
    params = [torch.randn(s, requires_grad=True) for s in (300, 7, 4099)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="cpu")
    opt.step(closure_for(opt, params))  # the first step moves the params into the flat buffer
    held = [p.detach() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    theta = [p.detach().clone() for p in params]
    addresses = [p.data_ptr() for p in params]
    opt.first_step()
    layout = next(iter(opt._bucket_extra.values()))["flat"]
    assert all(p.data_ptr() != a for p, a in zip(params, addresses)), "no swap happened"
    assert layout.matches(params), "the params no longer view the flat buffer"
    backup_views = layout.views(layout.backup)
    for p, h, t, b in zip(params, held, theta, backup_views):
        assert h.data_ptr() == p.data_ptr() and torch.equal(b, t)
        assert not torch.equal(p, t), "the params are not at the perturbed point"
    for p in params:
        p.grad.add_(torch.randn_like(p))
    opt.second_step()
    assert [p.data_ptr() for p in params] == addresses, "two swaps bring the memory back"
    assert layout.matches(params) and all(h.data_ptr() == p.data_ptr()
                                          for p, h in zip(params, held))
    theta = [p.detach().clone() for p in params]
    opt.first_step()
    opt.abort_step()  # as when the perturbed pass raises: θ back, in its own memory
    assert [p.data_ptr() for p in params] == addresses
    assert all(torch.equal(p, t) and torch.equal(h, t) for p, h, t in zip(params, held, theta))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_into_writes_theta_prime_to_backup_and_keeps_theta(device, dtype, lib):
    """_C.perturb with into=True: the backup gets what the in-place perturb leaves in θ, θ
    keeps its bits, and g is folded the same way."""
    for offset in (0, 1):
        b = flat_bucket(70001, dtype, device, offset=offset)
        ref = clone_bucket(b)
        theta = b.params[0].clone()
        eps, fold = scalar(0.037, device, dtype), scalar(-0.61, device, dtype)
        for bucket, into in ((b, True), (ref, False)):
            p, backup = bucket.params[0], bucket.extra["backup"][0]
            CKernels._call("perturb", p, p.data_ptr(), bucket.grads[0].data_ptr(),
                           backup.data_ptr(), eps.data_ptr(), fold.data_ptr(), False, into)
        assert torch.equal(b.params[0], theta)
        assert torch.equal(b.extra["backup"][0], ref.params[0])
        assert torch.equal(b.grads[0], ref.grads[0])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_five_steps_match_torch_backend(device, lib):
    case = next(c for c in CASES if c.name == "sgd-bf16")
    compare_backends(dataclasses.replace(case, name="sgd-bf16-5-steps", steps=5),
                     backend_name(device), device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_params_run_through_the_kernels_not_the_fallback(device, lib):
    params = [torch.randn(s, device=device, requires_grad=True) for s in (7, 4099, 1)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend=backend_name(device))
    opt.step(closure_for(opt, params))
    (extra,) = opt._bucket_extra.values()
    assert "flat" in extra, "the compiled backend fell back to the per-tensor path"
    assert opt.backends == {str(params[0].device): backend_name(device)}


# ----------------------------------------------------------------------- helpers
def scalar(x, device, dtype=torch.float32):
    """A step scalar for buffers of ``dtype``: a 0-dim tensor of its compute dtype."""
    return torch.tensor(x, dtype=compute_dtype(dtype), device=device)


# ----------------------------------------------------------------------- phase 1: the norm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_sq_norm_matches_float64_sum(device, dtype, n, adaptive, lib):
    for offset in (0, 1):
        b = flat_bucket(n, dtype, device, offset=offset)
        x = b.grads[0].double() * (b.params[0].double() if adaptive else 1.0)
        ref = float(x.square().sum())
        got = CKernels().sq_norm(b, adaptive)
        assert got.dtype == compute_dtype(dtype) and got.dim() == 0
        assert got.device == b.grads[0].device
        assert abs(float(got) - ref) <= 1e-6 * ref, (float(got), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_sq_norm_is_deterministic(device, lib):
    """The same bits on every call, whatever the host thread count (fixed chunks, partial
    sums added in a fixed order; on CUDA a fixed tree and no atomics)."""
    g = torch.randn(1_000_003, device=device) * torch.logspace(-3, 3, 1_000_003, device=device)
    out = torch.empty((), device=device)
    partials = torch.empty(lib.max_norm_blocks, dtype=torch.float64, device=device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    dev = 0 if device == "cuda" else -1
    results = set()
    for threads in (1, 2, 3, 1, 2):
        lib.sq_norm(dev, stream, threads, 0, g.numel(), g.data_ptr(), 0, partials.data_ptr(),
                    out.data_ptr())
        results.add(out.item())
    assert len(results) == 1, results
    assert abs(results.pop() - float(g.double().square().sum())) <= 1e-6 * float(g.double().square().sum())


@pytest.mark.parametrize("device", DEVICES)
def test_sq_norm_reports_inf_and_nan(device, lib):
    b = flat_bucket(5000, torch.float32, device)
    b.grads[0][4321] = float("inf")
    assert torch.isinf(CKernels().sq_norm(b, False))
    b.grads[0][17] = float("nan")
    assert torch.isnan(CKernels().sq_norm(b, False))


# ----------------------------------------------------------------------- step scalars
def _c_ascent_rows(inputs, scale, groups):
    """csrc's two stages of the ascent: norm_partials per buffer, ascent_finalize per group
    (through CKernels' own helpers, as the backend calls them)."""
    kernels = CKernels()
    grad = inputs[0][0]
    partials, bounds = kernels._partial_sums(inputs)
    rows = torch.empty((len(groups), 3), dtype=compute_dtype(grad.dtype), device=grad.device)
    for row, group in zip(rows, groups):
        alpha = group["alpha"]
        _ext.load().ascent_finalize(*_where(grad), CODES[row.dtype], partials.data_ptr(),
                                    bounds[-1], 0 if scale is None else scale.data_ptr(),
                                    row.data_ptr(), group["rho"], group["gamma"],
                                    0.0 if alpha is None else alpha, group["normalize"],
                                    alpha is not None, group["difference"] == "central")
    return rows


def _c_update_out(grads, ascent, scale, *, max_grad_norm, skipped_steps, last_step_skipped,
                  scaler_found_inf=None, adam_step=None):
    """csrc's norm_partials per buffer and one update_finalize for all groups."""
    flat = [g for group in grads for g in group]
    partials, bounds = CKernels()._partial_sums([(g, None) for g in flat])
    group_bounds, seen = [0], 0
    for group in grads:
        seen += len(group)
        group_bounds.append(bounds[seen])
    out = torch.empty(len(grads) + 1, dtype=ascent.dtype, device=flat[0].device)
    _ext.load().update_finalize(
        *_where(flat[0]), CODES[ascent.dtype], partials.data_ptr(), group_bounds,
        ascent.data_ptr(), 0 if scale is None else scale.data_ptr(), out.data_ptr(),
        skipped_steps.data_ptr(), last_step_skipped.data_ptr(),
        0 if scaler_found_inf is None else scaler_found_inf.data_ptr(),
        0 if adam_step is None else adam_step.data_ptr(), max_grad_norm is not None,
        1.0 if max_grad_norm is None else max_grad_norm)
    return out


def _c_ascent(grad, param, scale, **hp):
    return _c_ascent_rows([(grad, param)], scale, [scalar_group(**hp)])[0]


def _c_update(grad, combine, scale, **records):
    ascent = torch.zeros(1, 3, dtype=combine.dtype, device=grad.device)
    ascent[0, 2] = combine
    return _c_update_out([[grad]], ascent, scale, **records)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("hp", SCALAR_HPARAMS, ids=SCALAR_HPARAM_IDS)
@pytest.mark.parametrize("amp", [False, True], ids=["fp", "amp"])
def test_ascent_scalars_match_the_reference(device, dtype, hp, amp, lib):
    """csrc's ascent_scalars (grf_math.h's ascent_scalars_of where the norm is finalized)."""
    check_ascent_scalars(_c_ascent, device, dtype, hp, amp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_grad_norm", [None, 1e-3], ids=["no-clip", "clip"])
def test_finalize_over_several_groups_and_buffers_matches_the_reference(device, max_grad_norm,
                                                                        lib):
    check_groups(_c_ascent_rows, _c_update_out, device, max_grad_norm)


def test_update_finalize_refuses_bad_group_bounds(lib):
    """A clear ValueError before any memory is touched (ascent, out, count, last: a dummy)."""
    out = torch.empty(3)
    args = (out.data_ptr(), 0, out.data_ptr(), out.data_ptr(), out.data_ptr(), 0, 0, False, 1.0)
    for bounds in ([0], [0, 3, 2], list(range(lib.max_groups + 2))):
        with pytest.raises(ValueError, match="update_finalize"):
            lib.update_finalize(-1, 0, 1, CODES[torch.float32], out.data_ptr(), bounds, *args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 1e3], ids=["no-clip", "clip", "no-op-clip"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp", "amp"])
@pytest.mark.parametrize("poison", [None, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
def test_update_scalars_match_the_reference_and_record_the_skip(device, dtype, max_grad_norm,
                                                                amp, poison, lib):
    """csrc's update_scalars: gscale, found_inf and the skip records (count, last flag,
    GradScaler flag, AdamW step) from the norm of G."""
    check_update_scalars(_c_update, device, dtype, max_grad_norm, amp, poison)


# ----------------------------------------------------------------------- phase 2
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_perturb_matches_torch(device, dtype, n, adaptive, lib):
    for offset in (0, 1):
        b = flat_bucket(n, dtype, device, offset=offset)
        ref = clone_bucket(b)
        old_theta = b.params[0].clone()
        eps, fold = scalar(0.037, device, dtype), scalar(-0.61, device, dtype)
        CKernels().perturb(b, eps, fold, adaptive)
        TorchBackend().perturb(ref, eps, fold, adaptive)
        assert torch.equal(b.extra["backup"][0], old_theta)
        ulp_close(b.params[0], ref.params[0], KERNEL_ULPS[dtype], "theta")
        ulp_close(b.grads[0], ref.grads[0], KERNEL_ULPS[dtype], "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reflect_and_restore_match_torch(device, dtype, lib):
    b = flat_bucket(4099, dtype, device, offset=1)
    ref = clone_bucket(b)
    CKernels().reflect(b)
    TorchBackend().reflect(ref)
    ulp_close(b.params[0], ref.params[0], KERNEL_ULPS[dtype], "theta")
    assert torch.equal(b.grads[0], ref.grads[0])
    for bucket in (b, flat_bucket(4099, dtype, device)):  # unaligned: a copy; aligned: a swap
        theta = bucket.extra["backup"][0].clone()
        CKernels().restore(bucket)
        assert torch.equal(bucket.params[0], theta)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounding_to_16_bits_is_torchs_bit_for_bit(device, dtype, lib):
    """Every one of the 65536 bit patterns, through the 'none' update (G = gscale·G in fp32,
    rounded once): the same bits as torch's conversion (any NaN for NaN). gscale = 1 checks
    the exact round trip, 1/3 and 3 rounding, underflow to subnormals and overflow to inf."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    patterns = bits.view(dtype).to(device)
    for gscale in (1.0, 1.0 / 3.0, 3.0, 2.0 ** -10):
        b = Bucket([torch.zeros_like(patterns)], [patterns.clone()], [{}], {}, "none",
                   {"backup": [torch.zeros_like(patterns)]})
        g = scalar(gscale, device)
        CKernels().update(b, g, scalar(0.0, device))
        want = (patterns.float() * g).to(dtype)
        got = b.grads[0]
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert same.all(), f"gscale {gscale}: differs at {(~same).nonzero().flatten()[:5].tolist()}"


# ----------------------------------------------------------------------- phase 3
UPDATE_SHAPES = [(torch.float32, 4099, 0), (torch.float32, 70001, 1), (torch.bfloat16, 1000, 0),
                 (torch.float16, 1, 0), (torch.float64, 333, 0)]
UPDATE_IDS = ["fp32-4099", "fp32-70001-unaligned", "bf16-1000", "fp16-1", "fp64-333"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [False, True], ids=["taken", "found-inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("hp", list(SGD_GROUPS))
@pytest.mark.parametrize("dtype,n,offset", UPDATE_SHAPES, ids=UPDATE_IDS)
def test_sgd_update_matches_torch(device, hp, first, skip, dtype, n, offset, lib):
    group = SGD_GROUPS[hp]
    state = {} if first or group["momentum"] == 0 else \
        {"momentum_buffer": torch.randn(n, device=device).to(dtype)}
    b = flat_bucket(n, dtype, device, "sgd", group, state, offset=offset)
    ref = clone_bucket(b)
    old_state = {k: v.clone() for k, v in state.items()}
    gscale, found_inf = scalar(0.73, device, dtype), scalar(float(skip), device, dtype)
    CKernels().update(b, gscale, found_inf)
    TorchBackend().update(ref, gscale, found_inf)
    keys = ["momentum_buffer"] if group["momentum"] else []
    check_update(b, ref, skip, dtype, keys, old_state)
    if skip and first and keys:
        assert not b.states[0]["momentum_buffer"].any(), "a buffer born in a skipped step is 0"


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [False, True], ids=["taken", "found-inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "step-7"])
@pytest.mark.parametrize("dtype,n,offset", UPDATE_SHAPES, ids=UPDATE_IDS)
def test_adamw_update_matches_torch(device, first, skip, dtype, n, offset, lib):
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    m = 0.1 * torch.randn(n, device=device)  # a reachable state: v ≥ m²
    state = {} if first else {
        "step": torch.tensor(7.0, device=device), "exp_avg": m.to(dtype),
        "exp_avg_sq": (m * m + 0.01 * torch.rand(n, device=device)).to(dtype)}
    b = flat_bucket(n, dtype, device, "adamw", group, state, offset=offset)
    ref = clone_bucket(b)
    old_state = {k: v.clone() for k, v in state.items()}
    gscale, found_inf = scalar(0.73, device, dtype), scalar(float(skip), device, dtype)
    CKernels().update(b, gscale, found_inf)
    TorchBackend().update(ref, gscale, found_inf)
    check_update(b, ref, skip, dtype, ["step", "exp_avg", "exp_avg_sq"], old_state)
    assert float(b.states[0]["step"]) == (0.0 if first else 7.0) + (0.0 if skip else 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [False, True], ids=["taken", "found-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_and_combine_matches_torch(device, dtype, skip, lib):
    b = flat_bucket(4099, dtype, device, "none")
    ref = clone_bucket(b)
    old_grad = b.grads[0].clone()
    gscale, found_inf = scalar(-1.37, device, dtype), scalar(float(skip), device, dtype)
    CKernels().update(b, gscale, found_inf)
    TorchBackend().update(ref, gscale, found_inf)
    assert torch.equal(b.params[0], ref.extra["backup"][0])  # θ restored: the old backup
    ulp_close(b.grads[0], ref.grads[0], KERNEL_ULPS[dtype], "grad")
    if skip:
        assert torch.equal(b.grads[0], old_grad)


def test_host_avx2_and_baseline_code_give_the_same_bits(lib):
    """host.cpp is compiled twice (x86-64 baseline and AVX2+FMA, -ffp-contract=off): both
    must produce identical results, so a run does not depend on the CPU it lands on."""
    if lib.host_isa() != "avx2":
        pytest.skip(f"this CPU/build runs only the {lib.host_isa()} host code")
    group = SGD_GROUPS["momentum-wd"]
    outs = {}
    for isa in ("baseline", "avx2"):
        lib.host_isa(isa)
        try:
            torch.manual_seed(1)
            b = flat_bucket(70001, torch.float32, "cpu", "sgd", group,
                            {"momentum_buffer": torch.randn(70001)})
            k = CKernels()
            sq = k.sq_norm(b, True)
            k.perturb(b, scalar(0.01, "cpu"), scalar(0.3, "cpu"), True)
            a = flat_bucket(70001, torch.float32, "cpu", "adamw",
                            dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
            k.update(b, scalar(0.7, "cpu"), scalar(0.0, "cpu"))
            k.update(a, scalar(0.7, "cpu"), scalar(0.0, "cpu"))
            big = flat_bucket(300_001, torch.float32, "cpu")  # ten chunks of the norm
            sums = k._partial_sums([(big.grads[0], None), (big.grads[0], big.params[0])])[0]
            outs[isa] = [sq, sums, b.params[0],
                         b.grads[0], b.states[0]["momentum_buffer"], a.params[0],
                         a.states[0]["exp_avg_sq"]]
        finally:
            lib.host_isa("avx2")
    for x, y in zip(outs["baseline"], outs["avx2"]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_pack_code_gives_the_same_bits(dtype, lib):
    """The CUDA kernels read and write 16-byte packs (apply<V>, accumulate<V> with V > 1);
    the host build runs that same code when asked (set_host_packs), so CI checks it without
    a GPU: every phase must give the bits of the one-element loops."""
    def run_all():
        torch.manual_seed(2)
        n = 70001
        b = flat_bucket(n, dtype, "cpu", "sgd", SGD_GROUPS["nesterov"],
                        {"momentum_buffer": torch.randn(n).to(dtype)})
        a = flat_bucket(n, dtype, "cpu", "adamw",
                        dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
        none = flat_bucket(n, dtype, "cpu", "none")
        c, k = compute_dtype(dtype), CKernels()
        out = [k.sq_norm(b, False), k.sq_norm(b, True)]
        k.perturb(b, scalar(0.01, "cpu", c), scalar(0.3, "cpu", c), True)
        k.reflect(b)
        out += [b.params[0].clone(), b.grads[0].clone()]
        for bucket in (b, a, none):
            k.update(bucket, scalar(0.7, "cpu", c), scalar(0.0, "cpu", c))
            out += [bucket.params[0], bucket.grads[0]] + [
                v for _, v in sorted(bucket.states[0].items())]
        first = flat_bucket(n, dtype, "cpu", "sgd", SGD_GROUPS["momentum-wd"])
        k.update(first, scalar(0.7, "cpu", c), scalar(1.0, "cpu", c))  # skipped, buffer born
        return out + [first.params[0], first.states[0]["momentum_buffer"]]

    plain = run_all()
    lib.set_host_packs(True)
    try:
        packed = run_all()
    finally:
        lib.set_host_packs(False)
    assert len(plain) == len(packed) > 10
    for i, (x, y) in enumerate(zip(plain, packed)):
        assert torch.equal(x, y) or (x.isnan() & y.isnan()).all(), f"output {i} differs"


# ----------------------------------------------------------------------- through the optimizer
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend=b),
    lambda p, b: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend=b),
    lambda p, b: gr_fused.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=b),
], ids=["sgd", "adamw", "sam-wrapper"])
def test_nan_in_G_skips_with_theta_restored_and_state_untouched(device, make, lib):
    params = [torch.randn(s, device=device, requires_grad=True) for s in (7, 300, 1, 4099)]
    check_nan_in_G_skips(make(params, backend_name(device)), params)


@pytest.mark.parametrize("device", DEVICES)
def test_gr_step_reads_nothing_back_to_the_host(device, lib):
    for make in (lambda p: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, max_grad_norm=1.0,
                                          difference="central", backend=backend_name(device)),
                 lambda p: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend=backend_name(device))):
        params = [torch.randn(s, device=device, requires_grad=True) for s in (7, 300, 4099)]
        opt = make(params)
        opt.step(closure_for(opt, params))  # the first step creates flat buffers and state
        with forbid_host_reads():
            opt.step(closure_for(opt, params))
        (extra,) = opt._bucket_extra.values()
        assert "flat" in extra, "the step ran the per-tensor fallback, not the kernels"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo,groups", [("sgd", 1), ("adamw", 1), ("sgd", 2), ("adamw", 3)])
def test_gr_step_runs_no_torch_op_on_the_optimizer_side(device, algo, groups, lib):
    """The step scalars come out of csrc's finalize calls, so the optimizer side of a step is
    calls into gr_fused._C and not a single torch op, with clipping and 200 tensors. With one
    group: stage one of the norm, its finalize, perturb, the same for G, the update (on CUDA
    one launch each); with G groups in K buffers, one finalize per group for the ascent and
    one for all of the update."""
    params = [torch.randn(5, device=device, requires_grad=True) for _ in range(200)]
    param_groups = [{"params": params[g::groups], "weight_decay": 0.01 * g}
                    for g in range(groups)]
    opt = (gr_fused.GRSGD(param_groups, lr=0.1, momentum=0.9, gamma=0.05, max_grad_norm=1.0,
                          backend=backend_name(device)) if algo == "sgd"
           else gr_fused.GRAdamW(param_groups, lr=1e-2, gamma=0.05, backend=backend_name(device)))
    opt.step(closure_for(opt, params))  # the first step creates flat buffers and state
    calls = []
    module = _ext.load()

    class Counting:  # gr_fused._C with every call recorded
        def __getattr__(self, name):
            attr = getattr(module, name)
            if not callable(attr):
                return attr
            return lambda *a: (calls.append(name), attr(*a))[1]

    with DeviceWork() as work:
        original, _ext.load = _ext.load, Counting
        try:
            opt.step(work.excluding(closure_for(opt, params)))
        finally:
            _ext.load = original
    assert work.names == []
    update = f"update_{algo}"
    assert calls == (["norm_partials"] * groups + ["ascent_finalize", "perturb"] * groups
                     + ["norm_partials"] * groups + ["update_finalize"] + [update] * groups)


# ----------------------------------------------------------------------- the CUDA build's code
def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy Triton's wheel ships."""
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or (str(bundled) if bundled.is_file() else None)


def _sass_functions(module_file):
    """{(arch, mangled kernel name): SASS text} of every kernel in the module's fatbin."""
    dump = subprocess.run([_cuobjdump(), "-sass", module_file], capture_output=True, text=True,
                          timeout=300).stdout
    functions, arch, name = {}, None, None
    for line in dump.splitlines():
        if "code for sm_" in line:
            arch, name = line.split("code for ")[1].strip(), None
        elif "Function : " in line:
            name = line.split("Function : ")[1].strip()
            functions[(arch, name)] = []
        elif name is not None:
            functions[(arch, name)].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


def test_cuda_kernels_move_16_bytes_per_access_on_sm80_and_sm90(lib):
    """No GPU is needed to read what nvcc made of cuda.cu: every kernel is there for sm_80
    and sm_90, and each variant for aligned buffers (a pack of V > 1 elements: 4 floats, 8
    halves, 2 doubles) loads with 128-bit LDG and, when it writes, stores with 128-bit STG."""
    if not lib.with_cuda:
        pytest.skip("gr_fused._C was built without CUDA (no nvcc at build time)")
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's NVIDIA backend) to read the SASS")
    functions = _sass_functions(lib.__file__)
    names = {arch: {n for a, n in functions if a == arch} for arch in ("sm_80", "sm_90")}
    assert names["sm_80"] and names["sm_80"] == names["sm_90"]
    packed = 0
    for (arch, name), sass in functions.items():
        width = re.search(r"Li(\d+)EEEv", name)  # the template argument V of the kernel
        if not width or int(width.group(1)) == 1:
            continue
        packed += 1
        assert "LDG.E.128" in sass, f"{arch} {name}: no 128-bit load"
        if "foreach_kernel" in name:
            assert "STG.E.128" in sass, f"{arch} {name}: no 128-bit store"
    # per arch: 8 element-wise op variants and 2 norm variants, for each of 4 storage types
    assert packed >= 2 * 4 * (8 + 2), packed


# ----------------------------------------------------------------------- availability, errors
def test_auto_picks_the_host_build_for_cpu_tensors(lib):
    assert backends.AUTO_ORDER["cpu"][0] == "cpu"
    assert backends.unavailable_reason("cpu", torch.device("cpu")) is None
    assert backends.get_backend("auto", torch.device("cpu")).name == "cpu"
    assert "cpu tensors only" in backends.unavailable_reason("cpu", torch.device("cuda"))
    assert "cuda tensors only" in backends.unavailable_reason("cuda", torch.device("cpu"))
    why_cuda = backends.unavailable_reason("cuda", torch.device("cuda"))
    if not lib.with_cuda:
        assert "built without CUDA" in why_cuda
    elif not HAS_CUDA:
        assert "no CUDA device" in why_cuda
    else:
        assert why_cuda is None or "compute capability" in why_cuda


def test_cuda_errors_become_python_exceptions(lib):
    """A failing CUDA call raises RuntimeError carrying the CUDA error string (here: a device
    that does not exist, or no usable device/driver at all); a build without CUDA says so."""
    device = 999 if HAS_CUDA else 0
    with pytest.raises(RuntimeError) as info:
        lib.restore(device, 0, 0, 0, 16, 0, 0)
    if lib.with_cuda:
        assert "gr_fused CUDA error" in str(info.value) and "cuda" in str(info.value).lower()
    else:
        assert "built without CUDA" in str(info.value)


def test_bad_arguments_raise_value_errors(lib):
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        lib.restore(-1, 0, 1, 7, 4, x.data_ptr(), x.data_ptr())
    with pytest.raises(ValueError, match="host_isa"):
        lib.host_isa("sse9")


def test_build_info(lib):
    assert lib.source_hash == _ext._csrc_build().source_hash(), "gr_fused._C is stale"
    assert lib.dtype_codes == {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
    if lib.with_cuda:
        assert lib.cuda_archs == "sm_80,sm_90"
    if os.environ.get("GR_FUSED_BUILD_CUDA") == "1":  # CI forces the CUDA part: it was built
        assert lib.with_cuda, "GR_FUSED_BUILD_CUDA=1, yet gr_fused._C has no CUDA kernels"


# ----------------------------------------------------------------------- a broken gr_fused._C
SURVIVOR = textwrap.dedent("""
    import sys, warnings, torch
    # only the copy on PYTHONPATH: an editable install's finder would supply the repo's _C
    sys.meta_path = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import gr_fused
        p = [torch.randn(5, requires_grad=True)]
        opt = gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend="auto")
        def closure():
            opt.zero_grad(); loss = (p[0].sin() * p[0]).sum(); loss.backward(); return loss
        opt.step(closure); opt.step(closure)
        try:
            gr_fused.GRSGD(p, lr=0.1, backend="cpu").step(closure)
            raised = "nothing"
        except gr_fused.BackendUnavailable as exc:
            raised = str(exc)
    ours = [str(w.message) for w in caught if "compiled kernels" in str(w.message)]
    print("BACKENDS", opt.backends)
    print("WARNINGS", len(ours))
    print("MESSAGE", ours[0] if ours else "")
    print("RAISED", raised)
""")


def run_with_package_copy(tmp_path, so_bytes, with_csrc=False, env=None):
    """Run SURVIVOR against a copy of the package whose gr_fused._C is ``so_bytes`` (None:
    missing), with or without a csrc/ beside it."""
    shutil.copytree(REPO / "gr_fused", tmp_path / "gr_fused",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if with_csrc:
        shutil.copytree(REPO / "csrc", tmp_path / "csrc")
    if so_bytes is not None:
        name = "_C" + (__import__("sysconfig").get_config_var("EXT_SUFFIX") or ".so")
        (tmp_path / "gr_fused" / name).write_bytes(so_bytes)
    full_env = dict(os.environ, PYTHONPATH=str(tmp_path), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", SURVIVOR], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return out, proc.stderr


def test_import_survives_a_broken_C_with_one_warning(tmp_path):
    out, _ = run_with_package_copy(tmp_path, b"not a shared library")
    assert out["BACKENDS"] == "{'cpu': 'torch'}"
    assert out["WARNINGS"] == "1"
    assert "failed to load" in out["MESSAGE"] and "failed to load" in out["RAISED"]


def test_missing_C_in_a_source_checkout_without_jit_says_so_once(tmp_path):
    out, _ = run_with_package_copy(tmp_path, None, with_csrc=True, env={"GR_FUSED_JIT": "0"})
    assert out["BACKENDS"] == "{'cpu': 'torch'}"
    assert out["WARNINGS"] == "1"
    for cause in ("was not built", "GR_FUSED_JIT=0"):
        assert cause in out["MESSAGE"] and cause in out["RAISED"]


# ----------------------------------------------------------------------- the CPU benchmark
def test_bench_cpu_script_runs(tmp_path, lib):
    """bench/bench_cpu.py on a tiny size (a check that it works, not a speed figure): every
    method is timed and the host build is the backend that ran."""
    import json
    sys.path.insert(0, str(REPO / "bench"))
    import bench_cpu
    out = tmp_path / "cpu.json"
    res = bench_cpu.main(["--numel", "20K", "--tensors", "5", "--rounds", "2",
                          "--json", str(out)])
    assert json.loads(out.read_text())["median_ms"].keys() == set(bench_cpu.METHODS)
    assert all(t > 0 for t in res["median_ms"].values())
    assert res["backends"] == {"cpu": "cpu"} and res["ratio_cpu_vs_sam"] > 0
    assert set(res["phases"]) == {"norm", "perturb", "update-sgd"}
    assert all(p["ms"] > 0 and p["gbps"] > 0 for p in res["phases"].values())
    assert set(res["driver_overhead_us"]) == {50, 500}
    assert all(us > 0 for us in res["driver_overhead_us"].values())
