"""The Triton backend (gr_fused/backends/triton_backend.py, gr_fused/kernels/).

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), with a GPU they run compiled: the same tests check both.

* the shared equality cases (tests/equality.py) against the torch backend;
* each kernel against the torch reference phases (TorchBackend on a flat bucket) on flat
  tensors whose sizes are 1 element, not multiples of the block, and many blocks;
* determinism of the norm, int64 offsets, found_inf skips, launches per step, no host sync,
  and the auto selection.
"""
import dataclasses
import os
from functools import partial
import sys

import pytest
import torch
import triton
import triton.language as tl

import gr_fused
from gr_fused import backends
from gr_fused.backends import triton_backend
from gr_fused.backends.torch_backend import TorchBackend
from gr_fused import kernels
from gr_fused.kernels import (triton_common, triton_norm, triton_perturb, triton_scalars,
                              triton_update)
import equality
from equality import (CASE_IDS, CASES, KERNEL_ULPS, SCALAR_HPARAM_IDS, SCALAR_HPARAMS,
                      SGD_GROUPS, assert_close, check_ascent_scalars, check_groups,
                      check_nan_in_G_skips, check_update, check_update_scalars, clone_bucket,
                      closure_for, compare_backends, scalar_group, ulp_close)
from test_nosync import forbid_host_reads
from gr_fused.amp import GradScaler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_kernels import KERNEL_NAMES, DeviceWork  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 1000, 4099]       # one element; not a multiple of any block; > BLOCK (4096)
SMALL_BLOCK = 64              # with it, 4099 elements are 65 programs
ALL_KERNELS = [triton_norm._partial_sq_kernel, triton_norm._finalize_kernel,
               triton_scalars._ascent_scalars_kernel, triton_scalars._update_scalars_kernel,
               triton_perturb._perturb_kernel, triton_perturb._reflect_kernel,
               triton_update._sgd_kernel, triton_update._adamw_kernel,
               triton_update._advance_step_kernel, triton_update._restore_combine_kernel]


# ----------------------------------------------------------------------- shared equality cases
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_backend(case):
    compare_backends(case, "triton", device=DEVICE)


def test_bf16_five_steps_match_torch_backend():
    """The kernels round fp32 → bf16 to nearest even themselves, so even under the
    interpreter (which truncates) a 5-step bf16 trajectory stays within the bf16 tolerance."""
    case = next(c for c in CASES if c.name == "sgd-bf16")
    compare_backends(dataclasses.replace(case, name="sgd-bf16-5-steps", steps=5), "triton",
                     device=DEVICE)


def test_params_run_through_the_kernels_not_the_fallback():
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 4099, 1)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    opt.step(closure_for(opt, params))
    (extra,) = opt._bucket_extra.values()
    assert "flat" in extra, "the triton backend fell back to the per-tensor path"
    assert opt.backends == {str(params[0].device): "triton"}


# ----------------------------------------------------------------------- helpers
def flat_bucket(n, dtype, algo="sgd", group=None, state=None):
    return equality.flat_bucket(n, dtype, DEVICE, algo, group, state)


def scalar(x):
    return torch.tensor(x, dtype=torch.float32, device=DEVICE)


# ----------------------------------------------------------------------- fp32 → bf16 rounding
@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = triton_common.block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, triton_common.to_storage(x, out_ptr.dtype.element_ty), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_storage_rounds_like_torch_bit_for_bit(dtype):
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.39e38, -3.39e38, 1e-40,
                            -1e-40, float("nan"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    bits = special.view(torch.int32)
    x = torch.cat([special, bits.new_tensor([0x7F800001, -1, 0x3F808000]).view(torch.float32),
                   torch.randn(3000) * torch.logspace(-30, 30, 3000)]).to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    ref = x.to(dtype)
    same = (out.view(torch.int16) == ref.view(torch.int16)) | (out.isnan() & ref.isnan())
    assert same.all(), f"differs at {(~same).nonzero().flatten()[:5].tolist()}"


# ----------------------------------------------------------------------- β^step
@triton.jit
def _powi_kernel(exponent_ptr, out_ptr, base, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, triton_common.powi(base, tl.load(exponent_ptr + offs)))


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.5, 0.0])
def test_powi_is_the_correctly_rounded_fp32_power(beta):
    """AdamW's bias corrections: β^step for integer steps, from the fp32 β as torch.pow
    takes it, rounded once (torch.pow agrees up to its own rare last-bit errors)."""
    steps = torch.cat([torch.arange(0, 1000), torch.tensor([4095, 65537, 2 ** 24])]).float()
    steps = torch.cat([steps, steps.new_full((1024 - steps.numel(),), 3.0)]).to(DEVICE)
    out = torch.empty_like(steps)
    _powi_kernel[(1,)](steps, out, triton_common.f32(beta), BLOCK=1024)
    base = float(torch.tensor(beta, dtype=torch.float32))
    exact = torch.tensor([base ** int(k) for k in steps.tolist()], dtype=torch.float64)
    assert torch.equal(out.cpu(), exact.float())
    close = (out.cpu() == torch.pow(beta, steps.cpu())).float().mean()
    assert close > 0.97


# ----------------------------------------------------------------------- int64 offsets
@triton.jit
def _offsets_kernel(out_ptr, pid, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), triton_common.block_offsets(pid, BLOCK))


def test_block_offsets_are_int64_past_two_to_the_31():
    """Every kernel indexes through block_offsets; for a program id whose first element lies
    past 2^32 the offsets must be exact (int32 arithmetic would wrap)."""
    block = 4096
    pid = 2 ** 20 + 3                                  # first offset (2^20+3)·4096 > 2^32
    out = torch.empty(block, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, pid, BLOCK=block)
    expected = pid * block + torch.arange(block, device=DEVICE)
    assert torch.equal(out, expected)


def test_every_kernel_indexes_through_block_offsets():
    import inspect
    for k in ALL_KERNELS:
        src = inspect.getsource(k.fn)
        if "tl.arange" in src and k is not triton_norm._finalize_kernel:
            assert "block_offsets(" in src, f"{k.fn.__name__} builds its own offsets"


# ----------------------------------------------------------------------- step scalars
def _triton_ascent(grad, param, scale, **hp):
    (row,) = kernels.ascent_scalars([(grad, param)], scale, [scalar_group(**hp)],
                                    block=SMALL_BLOCK)
    return row


def _triton_update(grad, combine, scale, **records):
    ascent = torch.zeros(1, 3, device=grad.device)
    ascent[0, 2] = combine
    return kernels.update_scalars([[grad]], ascent, scale, block=SMALL_BLOCK, **records)


@pytest.mark.parametrize("hp", SCALAR_HPARAMS, ids=SCALAR_HPARAM_IDS)
@pytest.mark.parametrize("amp", [False, True], ids=["fp", "amp"])
def test_ascent_scalars_kernel_matches_the_reference(hp, amp):
    """kernels.ascent_scalars: the norm of g1 and ε, fold, combine in its finalize launch."""
    check_ascent_scalars(_triton_ascent, DEVICE, torch.float32, hp, amp)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 1e3], ids=["no-clip", "clip", "no-op-clip"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp", "amp"])
@pytest.mark.parametrize("poison", [None, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
def test_update_scalars_kernel_matches_the_reference_and_records_the_skip(max_grad_norm, amp,
                                                                          poison):
    """kernels.update_scalars: the norm of G and gscale, found_inf and the skip records in
    its finalize launch."""
    check_update_scalars(_triton_update, DEVICE, torch.float32, max_grad_norm, amp, poison)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3], ids=["no-clip", "clip"])
def test_scalar_kernels_over_several_groups_and_buffers_match_the_reference(max_grad_norm):
    check_groups(partial(kernels.ascent_scalars, block=SMALL_BLOCK),
                 partial(kernels.update_scalars, block=SMALL_BLOCK), DEVICE, max_grad_norm)


# ----------------------------------------------------------------------- norm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sq_norm_matches_float64_sum(n, dtype, adaptive):
    b = flat_bucket(n, dtype)
    x, y = b.grads[0], b.params[0] if adaptive else None
    ref = ((x.double() * y.double()) if adaptive else x.double()).square().sum()
    one_ulp = 2.0 ** -23 * float(ref)  # summed in fp64, then rounded once to fp32
    for block in (SMALL_BLOCK, triton_common.BLOCK):
        got = kernels.sq_norm(x, y, block=block)
        assert got.dtype == torch.float32 and got.dim() == 0 and got.device == x.device
        assert abs(float(got) - float(ref)) <= one_ulp
    got = triton_backend.TritonFlatKernels().sq_norm(b, adaptive)  # the backend's phase
    assert abs(float(got) - float(ref)) <= one_ulp


def test_sq_norm_with_many_partials_and_determinism():
    """More partial sums than one finalize block (several finalize iterations), and the
    same bits on every call."""
    x = torch.randn(20011, device=DEVICE)
    block = 16                                         # 1251 partials > FINALIZE_BLOCK
    first = kernels.sq_norm(x, block=block)
    assert abs(float(first) - float(x.double().square().sum())) <= 2.0 ** -23 * float(first)
    for _ in range(2):
        assert torch.equal(kernels.sq_norm(x, block=block), first)
    y = torch.randn(9001, device=DEVICE)
    assert torch.equal(kernels.sq_norm(y), kernels.sq_norm(y.clone()))


def test_sq_norm_reports_inf_and_nan():
    x = torch.randn(5000, device=DEVICE)
    x[4321] = float("inf")
    assert torch.isinf(kernels.sq_norm(x))
    x[17] = float("nan")
    assert torch.isnan(kernels.sq_norm(x))


# ----------------------------------------------------------------------- perturb / reflect / restore
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_matches_torch(n, dtype, adaptive):
    b = flat_bucket(n, dtype)
    ref = clone_bucket(b)
    old_theta, eps, fold = b.params[0].clone(), scalar(0.037), scalar(-0.61)
    kernels.perturb(*b.params, *b.grads, *b.extra["backup"], eps, fold, adaptive,
                    block=SMALL_BLOCK)
    TorchBackend().perturb(ref, eps, fold, adaptive)
    assert torch.equal(b.extra["backup"][0], old_theta)
    ulp_close(b.params[0], ref.params[0], KERNEL_ULPS[dtype], "theta")
    ulp_close(b.grads[0], ref.grads[0], KERNEL_ULPS[dtype], "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_reflect_and_restore_match_torch(n, dtype):
    b = flat_bucket(n, dtype)
    ref = clone_bucket(b)
    kernels.reflect(*b.params, *b.grads, *b.extra["backup"], block=SMALL_BLOCK)
    TorchBackend().reflect(ref)
    ulp_close(b.params[0], ref.params[0], KERNEL_ULPS[dtype], "theta")
    assert torch.equal(b.grads[0], ref.grads[0])
    triton_backend.TritonFlatKernels().restore(b)
    assert torch.equal(b.params[0], b.extra["backup"][0])


# ----------------------------------------------------------------------- update
def _run_update(b, gscale, found_inf):
    triton_backend.TritonFlatKernels(block=SMALL_BLOCK).update(b, gscale, found_inf)


@pytest.mark.parametrize("skip", [False, True], ids=["taken", "found-inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("hp", list(SGD_GROUPS), ids=list(SGD_GROUPS))
@pytest.mark.parametrize("dtype,n", [(torch.float32, 4099), (torch.bfloat16, 1000),
                                     (torch.float16, 1)], ids=["fp32-4099", "bf16-1000", "fp16-1"])
def test_sgd_update_matches_torch(hp, first, skip, dtype, n):
    group = SGD_GROUPS[hp]
    state = {} if first or group["momentum"] == 0 else \
        {"momentum_buffer": torch.randn(n, device=DEVICE).to(dtype)}
    b = flat_bucket(n, dtype, "sgd", group, state)
    ref = clone_bucket(b)
    old_state = {k: v.clone() for k, v in state.items()}
    gscale, found_inf = scalar(0.73), scalar(float(skip))
    _run_update(b, gscale, found_inf)
    TorchBackend().update(ref, gscale, found_inf)
    keys = ["momentum_buffer"] if group["momentum"] else []
    check_update(b, ref, skip, dtype, keys, old_state)
    if skip and first and keys:
        assert not b.states[0]["momentum_buffer"].any()


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # skipped step 0: 1/0
@pytest.mark.parametrize("skip", [False, True], ids=["taken", "found-inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "step-7"])
@pytest.mark.parametrize("dtype,n", [(torch.float32, 4099), (torch.bfloat16, 1000),
                                     (torch.float16, 1)], ids=["fp32-4099", "bf16-1000", "fp16-1"])
def test_adamw_update_matches_torch(first, skip, dtype, n):
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    m = 0.1 * torch.randn(n, device=DEVICE)  # a reachable state: v ≥ m², so |m|/√v ≤ 1
    state = {} if first else {
        "step": torch.tensor(7.0, device=DEVICE), "exp_avg": m.to(dtype),
        "exp_avg_sq": (m * m + 0.01 * torch.rand(n, device=DEVICE)).to(dtype)}
    b = flat_bucket(n, dtype, "adamw", group, state)
    ref = clone_bucket(b)
    old_state = {k: v.clone() for k, v in state.items()}
    gscale, found_inf = scalar(0.73), scalar(float(skip))
    _run_update(b, gscale, found_inf)
    TorchBackend().update(ref, gscale, found_inf)
    check_update(b, ref, skip, dtype, ["step", "exp_avg", "exp_avg_sq"], old_state)


@pytest.mark.parametrize("skip", [False, True], ids=["taken", "found-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_and_combine_matches_torch(dtype, skip):
    b = flat_bucket(4099, dtype, "none")
    ref = clone_bucket(b)
    old_grad = b.grads[0].clone()
    gscale, found_inf = scalar(-1.37), scalar(float(skip))
    _run_update(b, gscale, found_inf)
    TorchBackend().update(ref, gscale, found_inf)
    assert torch.equal(b.params[0], b.extra["backup"][0])
    ulp_close(b.grads[0], ref.grads[0], KERNEL_ULPS[dtype], "grad")
    if skip:
        assert torch.equal(b.grads[0], old_grad)


# ----------------------------------------------------------------------- through the optimizer
def _params(n_tensors=4):
    return [torch.randn(s, device=DEVICE, requires_grad=True)
            for s in ([7, 300, 1, 4099] * n_tensors)[:n_tensors]]


@pytest.mark.parametrize("make", [
    lambda p: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend="triton"),
    lambda p: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend="triton"),
], ids=["sgd", "adamw"])
def test_found_inf_skips_with_theta_restored_and_state_untouched(make):
    params = _params()
    check_nan_in_G_skips(make(params), params)


@pytest.mark.parametrize("algo,options,groups,expected", [
    ("sgd", {}, 1, 6), ("adamw", {}, 1, 6), ("sgd", dict(max_grad_norm=1.0, adaptive=True), 1, 6),
    ("adamw", dict(difference="central"), 1, 7), ("sgd", dict(max_grad_norm=1.0), 2, 11),
    ("adamw", {}, 3, 4 * 3 + 3 + 1 + 3)],
    ids=["sgd", "adamw", "sgd-clip-asam", "central", "sgd-2-groups", "adamw-3-groups"])
def test_a_gr_step_is_six_launches_in_all_whatever_the_number_of_tensors(algo, options, groups,
                                                                          expected):
    """SPEC §3's "≤ 6 in all": every unit of device work on the optimizer side of a step,
    Triton launches and torch ops alike (the closure's forward/backward aside), counted as
    issued. The step scalars are computed in the norms' finalize kernels, so there is no
    torch op at all; the central difference adds its reflection. With G param groups in K
    flat buffers it is 4K + G + 1 (AdamW: + K step counts)."""
    per_step = {}
    for n_tensors in (6, 198):
        params = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(n_tensors)]
        param_groups = [{"params": params[g::groups], "weight_decay": 0.01 * g}
                        for g in range(groups)]
        opt = (gr_fused.GRSGD(param_groups, lr=0.1, momentum=0.9, gamma=0.05, backend="triton",
                              **options) if algo == "sgd"
               else gr_fused.GRAdamW(param_groups, lr=1e-2, gamma=0.05, backend="triton",
                                     **options))
        opt.step(closure_for(opt, params))  # the first step builds the flat buffers and state
        with DeviceWork() as work:
            opt.step(work.excluding(closure_for(opt, params)))
        per_step[n_tensors] = work.names
    assert len(per_step[6]) == expected, per_step[6]
    assert set(per_step[6]) <= KERNEL_NAMES, per_step[6]
    assert per_step[198] == per_step[6]


def test_an_amp_step_adds_no_launch_to_the_optimizer_side():
    """With gr_fused.amp.GradScaler the kernels read the scale S themselves; the one extra
    op is the scaler zeroing its own found_inf flag."""
    params = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(30)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    scaler = GradScaler(DEVICE, init_scale=2.0 ** 10)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        scaler.scale(loss).backward()
        return loss
    scaler.step(opt, closure)
    scaler.update()
    with DeviceWork() as work:
        scaler.step(opt, work.excluding(closure))
    assert [n for n in work.names if not n.startswith("aten.")] == [
        "_partial_sq_kernel", "_ascent_scalars_kernel", "_perturb_kernel",
        "_partial_sq_kernel", "_update_scalars_kernel", "_sgd_kernel"]
    assert work.names.count("aten.zeros") + work.names.count("aten.fill_") + \
        work.names.count("aten.zero_") == len(work.names) - 6 == 1, work.names


def test_gr_step_reads_nothing_back_to_the_host():
    params = _params()
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, max_grad_norm=1.0,
                         difference="central", backend="triton")
    opt.step(closure_for(opt, params))
    with forbid_host_reads():
        opt.step(closure_for(opt, params))
    params = _params()
    adamw = gr_fused.GRAdamW(params, lr=1e-2, gamma=0.05, backend="triton")
    adamw.step(closure_for(adamw, params))
    with forbid_host_reads():
        adamw.step(closure_for(adamw, params))
    for o in (opt, adamw):
        (extra,) = o._bucket_extra.values()
        assert "flat" in extra


# ----------------------------------------------------------------------- availability and auto
def test_auto_prefers_triton_on_cuda_and_reasons_are_given(monkeypatch):
    assert backends.AUTO_ORDER["cuda"][0] == "triton"
    assert "triton" not in backends.AUTO_ORDER["cpu"]  # the interpreter is for tests only
    kernels_cls = triton_backend.TritonFlatKernels
    # as compiled on a GPU machine: cuda runs, cpu says why not
    monkeypatch.setattr(triton_backend, "_defined_interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "_interpret_requested", lambda: False)
    assert backends.unavailable_reason("triton", "cuda") is None
    assert "CUDA" in kernels_cls.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(backends, "_instances", {})
    assert isinstance(backends.get_backend("auto", torch.device("cuda")),
                      triton_backend.TritonBackend)
    with pytest.raises(backends.BackendUnavailable, match="CUDA tensors"):
        backends.get_backend("triton", torch.device("cpu"))
    # as under the interpreter: cpu runs, cuda says why not (and auto moves on)
    monkeypatch.setattr(triton_backend, "_defined_interpreted", lambda: True)
    assert kernels_cls.unavailable_reason(torch.device("cpu")) is None
    assert "interpreter" in kernels_cls.unavailable_reason(torch.device("cuda"))
    assert backends.get_backend("auto", torch.device("cuda")).name != "triton"
    # interpreter asked for after compiled kernels were defined
    monkeypatch.setattr(triton_backend, "_defined_interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "_interpret_requested", lambda: True)
    assert "before the first import" in kernels_cls.unavailable_reason(torch.device("cpu"))
    # no triton at all
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", ImportError("No module named 'triton'"))
    assert "not importable" in backends.unavailable_reason("triton", "cuda")


def test_other_devices_get_a_reason():
    assert "mps" in triton_backend.TritonFlatKernels.unavailable_reason(torch.device("mps"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the same kernels "
                    "are tested above under the Triton interpreter)")
def test_auto_picks_triton_for_cuda_tensors_and_matches_torch_without_syncs():
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 4099, 1)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="auto")
    ref_opt = gr_fused.GRSGD(ref, lr=0.1, momentum=0.9, gamma=0.05, backend="torch")
    assert opt.backends == {"cuda:0": "triton"}
    for _ in range(3):
        opt.step(closure_for(opt, params))
        ref_opt.step(closure_for(ref_opt, ref))
    for a, b in zip(params, ref):
        assert_close(a, b, 1e-6, "cuda: triton vs torch backend")
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(closure_for(opt, params))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------- compiled for the GPU
def _nvidia_backend_missing():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton wheel
        return f"triton's NVIDIA backend is not importable ({exc!r})"
    return None


@pytest.mark.skipif(_nvidia_backend_missing() is not None,
                    reason=str(_nvidia_backend_missing()))
def test_every_kernel_compiles_for_sm80_and_sm90_with_vector_loads_and_exact_math(tmp_path):
    """tests/triton_aot.py compiles every kernel variant the wrappers can launch for sm_80 and
    sm_90 with Triton's own compiler and ptxas (no GPU needed), then reads the PTX: every
    streaming kernel loads 128 bits per instruction, and no kernel divides, takes a reciprocal
    or a square root approximately (the scalars must round as torch rounds)."""
    import json
    import subprocess
    out = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_aot.py"),
                          str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.read_text())
    single_program = {"_finalize_kernel", "_ascent_scalars_kernel", "_update_scalars_kernel",
                      "_advance_step_kernel"}
    for arch in (80, 90):
        assert {r["kernel"] for r in records if r["arch"] == arch} == \
            {k.fn.__name__ for k in ALL_KERNELS}
    for r in records:
        assert not r["approx"], r
        assert r["v4"] or r["kernel"] in single_program, r


# ----------------------------------------------------------------------- the benchmark script
def test_bench_script_runs_and_accounts_bytes(tmp_path):
    """bench/bench_kernels.py on a tiny size (interpreter numbers are not speed figures):
    every phase and method is timed, and the launch count is the one asserted above."""
    import json
    import bench_kernels
    out = tmp_path / "r.json"
    bench_kernels.main(["--sizes", "4K", "--dtypes", "fp32", "--tensors", "3",
                        "--launch-counts", "2", "--reps", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    assert {r["phase"] for r in results["phases"]} == set(bench_kernels.PHASE_BYTES)
    assert all(r["ms"] > 0 for r in results["phases"])
    (step,) = results["steps"]
    assert all(step[m] > 0 for m in bench_kernels.METHODS)
    assert results["launches"][0]["triton"] == {"device_ops": 6, "triton": 6}
    assert sum(bench_kernels.PHASE_BYTES["gr-step"]) * 4 == 48  # bytes per fp32 parameter
