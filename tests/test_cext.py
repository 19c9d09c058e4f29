"""The compiled kernels of csrc/ (gr_fused._C, backends "cpu" and "cuda") over tensor tables.

The host build runs on every machine, so CI checks the C++ math and the table walk that the
CUDA kernels also run (csrc/grf_math.h and grf_ops.h are compiled for both); on a GPU the
same checks also run the CUDA kernels.

* the shared equality cases (tests/equality.py) against the torch backend;
* every phase against the torch reference phases through the shared harness (check_phases,
  check_restore, check_reflect, check_fused_step): every dtype, every base update, fresh
  and existing state, skipped steps, frozen tensors, unaligned tensors, channels_last,
  sizes of 0 and 1 element and of several chunks, adaptive norms;
* interval=k: each phase against the reference phases, the finalizes against _scalars.py
  (the same bits on the host), a refresh and a reuse step through the fused calls against
  the general path, and the calls into _C they are;
* the same bits for any thread count, for the AVX2 and the baseline host code, and for the
  CUDA kernels' 16-byte pack code run on the host;
* rounding to fp16/bf16 bit for bit like torch, over all 65536 bit patterns;
* a tensor learning rate read by the kernels (no host read), scalars of another dtype
  converted and kept alive while _C reads them;
* what nvcc made of cuda.cu (cuobjdump, no GPU needed);
* errors: CUDA errors and bad arguments become Python exceptions; a broken or missing
  gr_fused._C costs one warning, never ``import gr_fused``.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import gr_fused
from gr_fused import _ext, backends
from gr_fused.backends.base import DIRECTION, Bucket, SkipRecord, group_runs
from gr_fused.backends.torch_backend import compute_dtype
from gr_fused.optim.base import create_missing_state
import equality as E
from test_nosync import forbid_host_reads

HAS_CUDA = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; the same math and "
                               "table walk are tested through the host build on every machine")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_GPU)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
ALGOS = [f"sgd-{name}" for name in E.SGD_GROUPS] + ["adamw", "none"]
REPO = Path(__file__).resolve().parent.parent
FOUR_D = [(2, 3, 5, 7), (1, 16, 3, 3), (4, 1, 1, 1), (3, 8, 1, 5)]


@pytest.fixture(scope="module")
def lib():
    C = _ext.load()
    assert C is not None, f"gr_fused._C is unavailable: {_ext.unavailable_reason()}"
    return C


def backend_name(device):
    return "cuda" if device == "cuda" else "cpu"


def kernel_backend(device):
    return backends.get_backend(backend_name(device), torch.device(device))


def bucket(algo, dtype, device="cpu", sizes=E.SIZES, gr=None, **kw):
    """E.random_bucket for ``algo`` ("sgd-<SGD_GROUPS name>", "adamw" or "none")."""
    if algo.startswith("sgd-"):
        return E.random_bucket(sizes, dtype, device, "sgd", dict(E.SGD_GROUPS[algo[4:]]),
                               gr=gr, **kw)
    return E.random_bucket(sizes, dtype, device, algo, gr=gr, **kw)


# ----------------------------------------------------------------------- shared equality cases
@pytest.mark.parametrize("case", E.CASES, ids=E.CASE_IDS)
def test_host_build_matches_torch_backend(case, lib):
    E.compare_backends(case, "cpu")


@NEEDS_GPU
@pytest.mark.parametrize("case", E.CASES, ids=E.CASE_IDS)
def test_cuda_kernels_match_torch_backend(case, lib):
    E.compare_backends(case, "cuda", device="cuda")


# fp32 and fp64 params in one group: the driver's general path converts each group's
# scalars to every bucket's dtype (temporaries that must live while _C reads them)
MIXED = E.Case("sgd-fp32-fp64", E.ODD * 2, E._sgd(**E.SGD_MOM), dtypes=(torch.float32, torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_and_fp64_params_in_one_group_match_torch_backend(device, lib):
    E.compare_backends(MIXED, backend_name(device), device=device)


# ----------------------------------------------------------------------- every phase
VARIANTS = {
    # name: (random_bucket options, check_phases options)
    "fresh-state": (dict(), dict()),
    "state-adaptive-misaligned": (dict(with_state=True, misalign=True), dict(adaptive=True)),
    "skip": (dict(with_state=True), dict(skip=True)),
    "skip-fresh-state": (dict(), dict(skip=True)),
    "frozen": (dict(with_state=True), dict(frozen=(0, 3, 5))),
    "channels-last": (dict(with_state=True, channels_last=True, sizes=FOUR_D), dict(adaptive=True)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_phases_match_torch_backend(device, dtype, algo, variant, lib):
    """sq_norm, perturb, sq_norm of G and the update against TorchBackend (shared harness):
    SIZES has 0- and 1-element tensors and one of several chunks."""
    make, check = VARIANTS[variant]
    make = dict(make)
    b = bucket(algo, dtype, device, sizes=make.pop("sizes", E.SIZES), **make)
    if make.get("channels_last"):
        assert not b.params[0].is_contiguous() and b.params[0].is_contiguous(
            memory_format=torch.channels_last)
    E.check_phases(kernel_backend(device), b, **check)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_restore_and_reflect_match_torch_backend(device, dtype, misalign, lib):
    be = kernel_backend(device)
    E.check_restore(be, bucket("sgd-momentum-wd", dtype, device, misalign=misalign))
    E.check_reflect(be, bucket("sgd-momentum-wd", dtype, device, misalign=misalign))


def test_misaligned_tables_say_so(lib):
    """The table's aligned flag (CUDA: 16-byte packs on every chunk, else checked per chunk)
    follows the tensors' addresses."""
    be = kernel_backend("cpu")
    aligned = E.prepared(be, bucket("adamw", torch.float32, with_state=True))
    misaligned = E.prepared(be, bucket("adamw", torch.float32, with_state=True, misalign=True))
    assert aligned.extra["table"].aligned and not misaligned.extra["table"].aligned


# ----------------------------------------------------------------------- the fused step
def fused_buckets(device, dtype, algo, groups, per_group, hp=None, max_grad_norm=None,
                  sign=1.0, adaptive=False):
    """``groups`` param groups of ``per_group`` buckets each (the buckets of a group in a
    row, as the driver collects them)."""
    out = []
    for g in range(groups):
        hp_g = dict(hp or E.SCALAR_HPARAMS[0])
        gr = E.scalar_group(rho=0.05 * (g + 1), gamma=0.02, max_grad_norm=max_grad_norm,
                            eps_sign=sign, combine_sign=sign, adaptive=adaptive and g % 2 == 0,
                            **hp_g)
        for k in range(per_group):
            sizes = [E.SIZES[(g + k + i) % len(E.SIZES)] for i in range(4)]
            out.append(bucket(algo, dtype, device, sizes=sizes, gr=gr, index=g,
                              with_state=(k % 2 == 1), misalign=(k == 2)))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hp", E.SCALAR_HPARAMS, ids=E.SCALAR_HPARAM_IDS)
@pytest.mark.parametrize("algo", ["sgd-momentum-wd", "adamw", "none"])
def test_fused_step_one_group(device, algo, hp, lib):
    E.check_fused_step(kernel_backend(device), fused_buckets(device, torch.float32, algo, 1, 1, hp))


FUSED = {
    # name: (dtype, algo, groups, buckets per group, options, scale, poison)
    "groups-tables-clip-amp": (torch.float32, "sgd-nesterov", 3, 2,
                               dict(max_grad_norm=0.1, adaptive=True), 1024.0, None),
    "adamw-several-tables": (torch.float32, "adamw", 2, 2, dict(), None, None),
    "adamw-one-table-amp-poison": (torch.float32, "adamw", 1, 1, dict(), 256.0, float("nan")),
    "adamw-several-tables-poison": (torch.float32, "adamw", 2, 1, dict(), None, float("inf")),
    "sgd-poison-clip": (torch.float32, "sgd-dampening", 2, 1, dict(max_grad_norm=1.0), None,
                        float("inf")),
    "maximize": (torch.float32, "sgd-momentum-wd", 2, 1, dict(sign=-1.0), None, None),
    # fp64 with a fixed alpha: with α = γ/ε near 1, fold = (1 − α)/α magnifies the last-bit
    # difference of two correct float64 sums (the harness's exact norm and ours) by
    # 1/(1 − α), past check_fused_step's 4 ulps; fp32 rows round that away
    "fp64-groups-clip": (torch.float64, "adamw", 2, 2,
                         dict(max_grad_norm=0.5, hp=E.SCALAR_HPARAMS[2]), 128.0, None),
    "bf16-groups": (torch.bfloat16, "sgd-plain", 2, 3, dict(adaptive=True), None, None),
    "fp16-amp-poison": (torch.float16, "none", 1, 2, dict(), 512.0, float("nan")),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_step(device, name, lib):
    """ascend and combine_update (the step scalars from the norms' finalize, the skip
    records, AdamW's step counts) against the driver's general path (shared harness)."""
    dtype, algo, groups, per_group, opts, scale, poison = FUSED[name]
    bs = fused_buckets(device, dtype, algo, groups, per_group, **opts)
    scale = None if scale is None else torch.tensor(scale, device=device)
    E.check_fused_step(kernel_backend(device), bs, scale=scale, poison=poison)


def test_fused_step_is_these_calls_into_C(lib, monkeypatch):
    """G groups in K tables: a partial sum per chunk of each table, one ascent finalize per
    group followed by its tables' perturb, the partials of G, one update finalize for all,
    an update per table (on CUDA one launch each: 4K + G + 1; AdamW's step counts advance in
    the finalize when there is one table, in each update's own launch otherwise)."""
    calls = []

    class Counting:  # gr_fused._C with every call recorded
        def __getattr__(self, name):
            attr = getattr(lib, name)
            if not callable(attr) or name == "Table":
                return attr
            return lambda *a: (calls.append((name, a)), attr(*a))[1]

    be = kernel_backend("cpu")
    for algo, groups, per_group in (("sgd-momentum-wd", 1, 1), ("adamw", 1, 1), ("adamw", 2, 2),
                                    ("sgd-momentum-wd", 3, 2)):
        calls.clear()
        monkeypatch.setattr(_ext, "load", lambda: Counting())
        E.check_fused_step(be, fused_buckets("cpu", torch.float32, algo, groups, per_group))
        monkeypatch.undo()
        k = groups * per_group
        update = "update_adamw" if algo == "adamw" else "update_sgd"
        names = [n for n, _ in calls]
        want = (["norm_partials"] * k
                + (["ascent_finalize"] + ["perturb"] * per_group) * groups
                + ["norm_partials"] * k + ["update_finalize"] + [update] * k)
        assert names == want, names
        if algo == "adamw":  # steps_advanced: True only for the one table of a one-table step
            advanced = [a[13] for n, a in calls if n == "update_adamw"]
            assert advanced == ([True] if k == 1 else [False] * k)


# ----------------------------------------------------------------------- interval=k
INTERVAL_GR = dict(interval=3, reuse_scale=0.7)


def interval_bucket(algo, dtype, device="cpu", sizes=E.SIZES, gr=None, misalign=False, **kw):
    """``bucket`` with interval=k's DIRECTION state: random values, the param's layout
    (``misalign``: off 16 bytes, like the params)."""
    b = bucket(algo, dtype, device, sizes=sizes, gr=dict(gr or E.scalar_group(), **INTERVAL_GR),
               misalign=misalign, **kw)
    for p_, st in zip(b.params, b.states):
        d = torch.empty_like(p_)
        if misalign:
            d = torch.empty(p_.numel() + 1, dtype=dtype, device=device)[1:].view(p_.shape)
        st[DIRECTION] = d.copy_(torch.randn(p_.shape, device=device))
    return b


def directions(b):
    return [st[DIRECTION] for st in b.states]


DOTS_RTOL = 1e-12  # the kernels' float64 sums against exact ones


def assert_dots_close(got, want, what):
    """[Σ g², Σ g·d, Σ d²] within 1e-12 (the cross term relative to √(Σg²·Σd²))."""
    assert got.dtype == torch.float64 and got.shape == (3,), what
    g, w = got.double().cpu(), want.double().cpu()
    scale = torch.stack([w[0].abs(), (w[0] * w[2]).sqrt(), w[2].abs()])
    assert bool(((g - w).abs() <= DOTS_RTOL * scale).all()), f"{what}: {g.tolist()} vs {w.tolist()}"


def assert_updated_like(kb, ref, dtype, keep, old, what, rewritten=()):
    """θ, the grads and every state tensor of ``kb`` against ``ref`` within KERNEL_ULPS (0-dim
    state exactly); the tensors in ``keep`` have ``old``'s θ and state bit for bit, but for
    the ``rewritten`` keys (a refresh's direction: zeros when skipped, G·a + d·c when
    frozen), compared with ``ref`` as the others."""
    E.assert_same_tensors(kb.params, ref.params, dtype, f"{what} theta")
    for i, (g, w) in enumerate(zip(kb.grads, ref.grads)):
        if torch.isfinite(w).all():
            E.ulp_close(g, w, E.KERNEL_ULPS[dtype], f"{what}: grads[{i}]")
        else:  # a poisoned gradient, kept as it is
            assert torch.equal(g, w), f"{what}: grads[{i}]"
    for i, (st, want) in enumerate(zip(kb.states, ref.states)):
        assert set(st) == set(want), f"{what}: state keys of tensor {i}"
        if i in keep:
            assert torch.equal(kb.params[i], old[i]["theta"]), f"{what}: theta[{i}] changed"
        for key, w in want.items():
            got = st[key]
            if i in keep and key in old[i] and key not in rewritten:
                assert torch.equal(got, old[i][key]), f"{what}: {key}[{i}] changed"
            elif w.dim() == 0:
                assert torch.equal(got, w), f"{what}: {key}[{i}]: {got} vs {w}"
            else:
                E.ulp_close(got, w, E.KERNEL_ULPS[dtype], f"{what}: {key}[{i}]")


def snapshot(b, theta=None):
    """Each tensor's state and θ (or ``theta``: θ before the perturbation) as they are."""
    theta = b.params if theta is None else theta
    return [dict({k: v.clone() for k, v in st.items()}, theta=t.clone())
            for t, st in zip(theta, b.states)]


def check_interval_phases(backend, b, adaptive=False, skip=False, frozen=()):
    """interval=k's phases of ``backend`` against the reference phases on a clone: a refresh
    (perturb saving g1 into the direction, the dots of G and g1, the update caching the
    direction a·G + c·g1, frozen tensors' too, or zeros with ``skip``), then a step between
    refreshes (the dots of a fresh g1 and the direction, the reuse update g = u·g1 + v·v̂ of
    θ in place, with ``skip``)."""
    dtype = b.dtype
    ref = E.clone_bucket(b)
    kb = E.prepared(backend, b)
    theta0 = [p_.clone() for p_ in kb.params]
    eps, fold = E.device_scalar(0.0371, kb), E.device_scalar(-0.42, kb)
    backend.perturb(kb, eps, fold, adaptive, save=True)
    E.TORCH.perturb(ref, eps, fold, adaptive, save=True)
    E.assert_same_tensors(directions(kb), directions(ref), dtype, "saved g1", exact=True)
    E.assert_same_tensors(kb.params, ref.params, dtype, "perturbed theta")
    E.assert_same_tensors(kb.grads, ref.grads, dtype, "fold*g1")
    for g, r in zip(kb.grads, ref.grads):  # the second backward accumulates onto the grads
        g2 = torch.randn(g.shape, device=g.device).to(dtype)
        g.add_(g2)
        r.add_(g2)
    assert_dots_close(backend.dots(kb, DIRECTION), E.TORCH.dots(ref, DIRECTION), "dots of G")
    for bb in (kb, ref):
        create_missing_state(bb)
        for i in frozen:
            bb.flags = bb.flags or [0] * len(bb.params)
            bb.flags[i] |= 2  # FLAG_FROZEN
    backend.refresh(kb)
    old = snapshot(kb, theta0)
    gscale, found_inf = E.device_scalar(0.8125, kb), E.device_scalar(float(skip), kb)
    ac = (E.device_scalar(0.61, kb), E.device_scalar(-0.27, kb))
    backend.update(kb, gscale, found_inf, direction=ac)
    E.TORCH.update(ref, gscale, found_inf, direction=ac)
    keep = set(range(len(kb.params))) if skip else set(frozen)
    assert_updated_like(kb, ref, dtype, keep, old, "refresh", rewritten=(DIRECTION,))
    if skip:  # the saved g1 is gone: a skipped refresh caches no direction
        assert all(not d.any() for d in directions(kb))
    # a step between refreshes: a fresh g1; two tensors' momentum buffers created for it
    for g, r in zip(kb.grads, ref.grads):
        g1 = torch.randn(g.shape, device=g.device).to(dtype)
        g.copy_(g1)
        r.copy_(g1)
    for bb in (kb, ref):
        bb.flags = [1 if i in (1, 4) else 0 for i in range(len(bb.params))]  # FLAG_NEW_STATE
    backend.refresh(kb)
    assert_dots_close(backend.dots(kb, DIRECTION), E.TORCH.dots(ref, DIRECTION), "dots of g1")
    old = snapshot(kb)
    u, v = E.device_scalar(0.93, kb), E.device_scalar(0.0123, kb)
    backend.reuse_update(kb, u, v, found_inf)
    E.TORCH.reuse_update(ref, u, v, found_inf)
    assert_updated_like(kb, ref, dtype, set(range(len(kb.params))) if skip else set(), old,
                        "reuse")


INTERVAL_VARIANTS = {
    # name: (interval_bucket options, check_interval_phases options)
    "fresh-state": (dict(), dict()),
    "state-adaptive-misaligned": (dict(with_state=True, misalign=True), dict(adaptive=True)),
    "skip": (dict(with_state=True), dict(skip=True)),
    "frozen": (dict(with_state=True), dict(frozen=(0, 3, 5))),
    "channels-last": (dict(with_state=True, channels_last=True, sizes=FOUR_D), dict()),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(INTERVAL_VARIANTS))
@pytest.mark.parametrize("algo", ["sgd-momentum-wd", "sgd-nesterov", "adamw", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interval_phases_match_reference_phases(device, dtype, algo, variant, lib):
    """dots, perturb(save=True), update(direction=(a, c)) and reuse_update of the kernels
    against tests/reference_phases.py (the torch backend's math in the kernels' operation
    order)."""
    make, check = INTERVAL_VARIANTS[variant]
    make = dict(make)
    b = interval_bucket(algo, dtype, device, sizes=make.pop("sizes", E.SIZES), **make)
    check_interval_phases(kernel_backend(device), b, **check)


def test_interval_direction_of_another_layout_takes_the_torch_path(lib):
    """A direction state the kernels cannot walk like its parameter (here: another memory
    layout, as a checkpoint may bring) sends that tensor to the torch backend with one
    warning; a direction missing at a call is a clear error."""
    be = kernel_backend("cpu")
    b = interval_bucket("sgd-momentum-wd", torch.float32, sizes=[(7, 3), (300,), (5,)],
                        with_state=True)
    b.states[0][DIRECTION] = torch.randn(3, 7).t()
    b.backend = be
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = be.prepare(b)
    assert [part.backend.name for part in parts] == ["cpu", "torch"]
    assert [len(part.params) for part in parts] == [2, 1]
    assert sum(DIRECTION in str(w.message) for w in caught) == 1
    kb = parts[0]
    assert_dots_close(be.dots(kb, DIRECTION), E.TORCH.dots(kb, DIRECTION), "dots")
    kb.states[1].pop(DIRECTION)
    with pytest.raises(ValueError, match=DIRECTION):
        be.dots(kb, DIRECTION)


# ------------------------------------------------------------ interval=k: the finalize math
def _split_sums(gen, sums, chunks):
    """Each group's three sums as ``chunks`` partials per chunk (interleaved, 3 per chunk)
    whose sums in chunk order are, in double, exactly the returned sums."""
    parts, exact = [], []
    for t in sums:
        pieces = [[float(x) for x in t]]
        for _ in range(chunks - 1):
            pieces.append([float(x) * float(torch.rand((), generator=gen)) * 0.1 for x in t])
        total = [0.0, 0.0, 0.0]
        for piece in pieces:
            parts += piece
            total = [a + b for a, b in zip(total, piece)]
        exact.append(torch.tensor(total, dtype=torch.float64))
    return parts, exact


def finalize_cases(gen, ctype):
    """(G groups' dots sums, signs, reuse scales, ascent rows, scale, max_norm) cases,
    the edge ones first: g1 parallel to G in every group, no g1 at all, nothing at all, an
    inf, one group, the most groups."""
    cases = []
    for k in range(24):
        G = [1, 3, 16, 2][k % 4]
        x = torch.randn(G, 40, generator=gen, dtype=torch.float64)
        y = torch.randn(G, 40, generator=gen, dtype=torch.float64) + 0.3 * x
        if k == 0:
            y = 2 * x                      # parallel in every group: v = 0 up to rounding
        elif k == 1:
            y = torch.zeros_like(x)        # Q = 0: β = 0
        elif k == 2:
            x, y = torch.zeros_like(x), torch.zeros_like(x)  # no direction: ok = 0
        sums = torch.stack([(x * x).sum(1), (x * y).sum(1), (y * y).sum(1)], 1) * 1e3
        if k == 3:
            sums[0, 0] = float("inf")      # found_inf
        signs = [1.0 if torch.rand((), generator=gen) < 0.7 else -1.0 for _ in range(G)]
        reuse = [float(torch.rand((), generator=gen)) for _ in range(G)]
        rows = torch.rand(G, 3, generator=gen, dtype=torch.float64).to(ctype) + 0.05
        rows[:, 2] *= torch.tensor(signs, dtype=ctype)
        scale = torch.tensor(2.0 ** (k % 11)) if k % 3 else None
        max_norm = [None, 0.05, 3.0][k % 3]
        cases.append((sums, signs, reuse, rows, scale, max_norm))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ctype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_interval_finalize_scalars_match_scalars_py(device, ctype, lib):
    """update_finalize with the direction (a refresh) and reuse_finalize against
    _scalars.direction_scalars and reuse_scalars (and update_scalars) on the same float64
    sums: the host build the same bits (the same double operations in the same order, one
    rounding to the compute dtype), the CUDA kernels (whose sums of partials add in another
    order) within a few ulps; the skip records."""
    from gr_fused import _scalars
    gen = torch.Generator().manual_seed(7)
    dev = torch.device(device)
    where = (-1, 0, 1) if device == "cpu" else (dev.index or 0, torch.cuda.current_stream().cuda_stream, 0)
    code = 3 if ctype == torch.float64 else 0

    def close(got, want, what):
        if device == "cpu":
            torch.testing.assert_close(got.cpu(), want.cpu().to(got.dtype), rtol=0, atol=0,
                                       equal_nan=True, msg=f"{what}: {got.tolist()} vs "
                                       f"{want.tolist()}")
        else:
            E.scalars_close(got.cpu(), want.cpu().to(got.dtype), what)

    for n, (sums, signs, reuse, rows, scale, max_norm) in enumerate(finalize_cases(gen, ctype)):
        G, chunks = len(signs), 1 + n % 3
        parts, exact = _split_sums(gen, sums, chunks)
        partials = torch.tensor(parts, dtype=torch.float64, device=dev)
        bounds = [chunks * g for g in range(G + 1)]
        inv = None if scale is None else scale.reciprocal()
        rows_d, scale_d = rows.to(dev), None if scale is None else scale.to(dev)
        scale_at = 0 if scale_d is None else scale_d.data_ptr()
        count = torch.tensor(5, dtype=torch.int64, device=dev)
        last = torch.empty((), dtype=torch.bool, device=dev)
        clip = max_norm is not None
        what = f"case {n} ({G} groups, scale {scale}, max_norm {max_norm})"
        # a refresh
        out = torch.empty(3 * G + 1, dtype=ctype, device=dev)
        valid = torch.empty((), dtype=ctype, device=dev)
        lib.update_finalize(*where, code, partials.data_ptr(), bounds, rows_d.data_ptr(),
                            scale_at, out.data_ptr(), count.data_ptr(), last.data_ptr(), 0, 0, 0,
                            clip, 1.0 if max_norm is None else max_norm, signs, valid.data_ptr())
        gscales, found = _scalars.update_scalars([t[0] for t in exact], list(rows[:, 2]), inv,
                                                 [max_norm] * G)
        coefs, ok = _scalars.direction_scalars(exact, list(rows[:, 2]), signs, inv)
        # (update_scalars' clipping total is a torch .sum(), in another order: a few ulps)
        E.scalars_close(out[:G].cpu(), torch.stack(gscales).to(ctype), f"{what}: gscales")
        close(out[G], found, f"{what}: found_inf")
        close(out[G + 1:], torch.stack([c for ab in coefs for c in ab]), f"{what}: (a, c)")
        close(valid, ok * (1 - found), f"{what}: valid")
        assert int(count) == 5 + int(found) and bool(last) == bool(found)
        if n == 0:  # g1 parallel to G: no direction, or one from rounding noise
            assert float(ok) in (0.0, 1.0)
        if n == 2:
            assert float(ok) == 0.0 and float(valid) == 0.0 and not out[G + 1:].any()
        # a step between refreshes, with and without a cached direction
        for valid_value in (1.0, 0.0):
            v_t = torch.tensor(valid_value, dtype=ctype, device=dev)
            out = torch.empty(2 * G + 1, dtype=ctype, device=dev)
            lib.reuse_finalize(*where, code, partials.data_ptr(), bounds, signs, reuse, scale_at,
                               v_t.data_ptr(), out.data_ptr(), count.data_ptr(), last.data_ptr(),
                               0, 0, 0, clip, 1.0 if max_norm is None else max_norm)
            grs = [dict(combine_sign=s_, reuse_scale=r_, max_grad_norm=max_norm)
                   for s_, r_ in zip(signs, reuse)]
            uv, found = _scalars.reuse_scalars(exact, grs, inv, v_t.cpu())
            close(out[:2 * G], torch.stack([c for ab in uv for c in ab]), f"{what}: (u, v)")
            close(out[2 * G], found, f"{what}: reuse found_inf")


# ------------------------------------------------------------ interval=k: the fused calls
def exact_dots(buckets):
    """[Σ g², Σ g·d, Σ d²] of each group of ``buckets`` in float64 (d the direction)."""
    out = []
    for _, members in group_runs(buckets):
        x = [g.double().flatten() for b in members for g in b.grads]
        y = [d.double().flatten() for b in members for d in directions(b)]
        out.append(torch.stack([sum((a * a).sum() for a in x), sum((a * c).sum() for a, c in zip(x, y)),
                                sum((c * c).sum() for c in y)]).cpu())
    return out


def finalized_close(actual, expected, kappa, what):
    """A finalize's scalars against _scalars.py on exact sums: within 4 ulps of the compute
    dtype plus what the kernels' own float64 sums may carry (DOTS_RTOL, times the condition
    number ``kappa`` of the formula; in float32 the 4 ulps dominate)."""
    got = actual.double().cpu()
    want = torch.stack([torch.as_tensor(x) for x in expected]).double().cpu()
    bound = 4 * torch.finfo(actual.dtype).eps + 2 * kappa * DOTS_RTOL
    err = ((got - want).abs() / want.abs().clamp_min(1e-300)).max()
    assert err <= bound, f"{what}: {got.tolist()} vs {want.tolist()} (bound {bound:.2e})"


def direction_condition(sums, combines, runs, inv):
    """κ of _scalars.direction_scalars' ‖v‖² = Σ A²ΣG² − 2βAB·ΣGg1 + β²B²Σg1²: the sum of
    the terms' magnitudes over the result (at least 1)."""
    scale = 1.0 if inv is None else float(inv)
    A = [float(c) * scale for c in combines]
    B = [gr["combine_sign"] * scale for gr, _ in runs]
    t = [[float(x) for x in s] for s in sums]
    P = sum(a * b * s[1] for a, b, s in zip(A, B, t))
    Q = sum(b * b * s[2] for b, s in zip(B, t))
    beta = P / Q if Q > 0 else 0.0
    terms = [(a * a * s[0], -2 * beta * a * b * s[1], beta * beta * b * b * s[2])
             for a, b, s in zip(A, B, t)]
    v2 = sum(sum(x) for x in terms)
    size = sum(abs(y) for x in terms for y in x)
    return max(1.0, size / v2) if v2 > 0 else float("inf")


def check_fused_interval(backend, buckets, scale=None, poison=None):
    """A refresh through ``ascend(save=True)`` and ``combine_update(direction_valid=...)``,
    then a step between refreshes through ``reuse``, against the general path (the scalars
    of _scalars.py on exact float64 sums, the reference phases with them). ``poison``:
    "refresh" (an inf in the refresh's second gradient: skipped, no direction cached, the
    reuse step is plain) or "reuse" (an inf in the reuse step's g1: skipped)."""
    from gr_fused import _scalars
    refs = [E.clone_bucket(b) for b in buckets]
    kbs = [E.prepared(backend, b) for b in buckets]
    assert backend.can_fuse(kbs)
    device = kbs[0].device
    inv = None if scale is None else scale.reciprocal().cpu()
    runs = group_runs(kbs)
    theta0 = [[p_.clone() for p_ in kb.params] for kb in kbs]
    want_rows = E.general_ascent(kbs, scale)
    rows = backend.ascend(kbs, scale, save=True)
    E.scalars_close(rows.cpu(), want_rows.to(rows.dtype).cpu(), "ascent rows")
    for (gr, members), row in zip(group_runs(refs), rows):
        for r in members:
            c = compute_dtype(r.dtype)
            E.TORCH.perturb(r, row[0].to(r.device, c), row[1].to(r.device, c), gr["adaptive"],
                            save=True)
    for kb, r in zip(kbs, refs):
        E.assert_same_tensors(directions(kb), directions(r), kb.dtype, "saved g1", exact=True)
        E.assert_same_tensors(kb.params, r.params, kb.dtype, "perturbed theta")
        for g, rg in zip(kb.grads, r.grads):
            g2 = torch.randn(g.shape, device=g.device).to(g.dtype)
            g.add_(g2)
            rg.add_(g2)

    def poison_grads():
        kb = next(b for b in kbs if b.numel())
        t = next(g for g in kb.grads if g.numel())
        rt = refs[kbs.index(kb)].grads[kb.grads.index(t)]
        for x in (t, rt):
            x.view(-1)[t.numel() // 2] = float("inf")

    def skip_record():
        return SkipRecord(torch.tensor(3, dtype=torch.int64, device=device),
                          torch.empty((), dtype=torch.bool, device=device),
                          torch.zeros((), dtype=torch.float32, device=device))

    if poison == "refresh":
        poison_grads()
    for kb, r in zip(kbs, refs):
        create_missing_state(kb)
        create_missing_state(r)
        backend.refresh(kb)
    sums = exact_dots(kbs)
    combines = [rows[i, 2].cpu() for i in range(len(runs))]
    gscales, found = _scalars.update_scalars([t[0] for t in sums], combines, inv,
                                             [gr["max_grad_norm"] for gr, _ in runs])
    coefs, ok = _scalars.direction_scalars(sums, combines, [gr["combine_sign"] for gr, _ in runs],
                                           inv)
    want_valid = ok * (1 - found)
    valid = torch.empty((), dtype=rows.dtype, device=device)
    skips = skip_record()
    old = [snapshot(kb, t0) for kb, t0 in zip(kbs, theta0)]
    found_inf = backend.combine_update(kbs, rows, scale, skips, direction_valid=valid)
    assert float(found_inf) == float(found) == float(poison == "refresh")
    assert int(skips.count) == 3 + int(found) and bool(skips.last) == bool(found)
    assert float(skips.scaler_found_inf) == float(found)
    E.scalars_close(valid.cpu().reshape(1), want_valid.reshape(1), "valid")
    # out = [gscale per group, found_inf, (a, c) per group]: within 4 ulps of the scalars of
    # the exact sums; the reference phases then run with the kernel's own scalars (a few
    # ulps in a scalar move an ill-conditioned element, e.g. AdamW's where √v̂ is small,
    # by more than the per-element bound)
    out = found_inf._base.cpu()
    G = len(runs)
    assert out.shape == (3 * G + 1,)
    if not bool(found):
        kappa = direction_condition(sums, combines, runs, inv)
        finalized_close(out[:G], gscales, 1.0, "gscales")
        finalized_close(out[G + 1::2], [a for a, _ in coefs], kappa, "a")
        finalized_close(out[G + 2::2], [c for _, c in coefs], kappa, "c")
    for i, (_, members) in enumerate(group_runs(refs)):
        for r in members:
            c = compute_dtype(r.dtype)
            E.TORCH.update(r, out[i].to(r.device, c), found.to(r.device, c),
                           direction=(out[G + 1 + 2 * i].to(r.device, c),
                                      out[G + 2 + 2 * i].to(r.device, c)))
    for kb, r, o in zip(kbs, refs, old):
        keep = set(range(len(kb.params))) if bool(found) else set()
        assert_updated_like(kb, r, kb.dtype, keep, o, "refresh", rewritten=(DIRECTION,))
        if bool(found):  # a skipped refresh caches no direction (the saved g1 had an inf)
            assert all(not d.any() for d in directions(kb))
    # a step between refreshes
    for kb, r in zip(kbs, refs):
        for g, rg in zip(kb.grads, r.grads):
            g1 = torch.randn(g.shape, device=g.device).to(g.dtype)
            g.copy_(g1)
            rg.copy_(g1)
        kb.flags = r.flags = None
        backend.refresh(kb)
    if poison == "reuse":
        poison_grads()
    sums = exact_dots(kbs)
    uv, found = _scalars.reuse_scalars(sums, [gr for gr, _ in runs], inv, valid.cpu())
    skips = skip_record()
    old = [snapshot(kb) for kb in kbs]
    found_inf = backend.reuse(kbs, scale, valid, skips)
    assert float(found_inf) == float(found) == float(poison == "reuse")
    assert int(skips.count) == 3 + int(found) and bool(skips.last) == bool(found)
    out = found_inf._base.cpu()  # [(u, v) per group, found_inf]
    assert out.shape == (2 * G + 1,)
    if not bool(found):
        finalized_close(out[0:2 * G:2], [u for u, _ in uv], 1.0, "u")
        finalized_close(out[1:2 * G:2], [v for _, v in uv], 1.0, "v")
    for i, (_, members) in enumerate(group_runs(refs)):
        for r in members:
            c = compute_dtype(r.dtype)
            E.TORCH.reuse_update(r, out[2 * i].to(r.device, c), out[2 * i + 1].to(r.device, c),
                                 found.to(r.device, c))
    for kb, r, o in zip(kbs, refs, old):
        keep = set(range(len(kb.params))) if bool(found) else set()
        assert_updated_like(kb, r, kb.dtype, keep, o, "reuse")
    return kbs


FUSED_INTERVAL = {
    # name: (dtype, algo, groups, buckets per group, fused_buckets options, scale, poison)
    "sgd-one-group": (torch.float32, "sgd-momentum-wd", 1, 1, dict(), None, None),
    "groups-tables-clip-amp": (torch.float32, "sgd-nesterov", 3, 2,
                               dict(max_grad_norm=0.1, adaptive=True), 1024.0, None),
    "adamw-one-table-amp": (torch.float32, "adamw", 1, 1, dict(), 256.0, None),
    "adamw-several-tables": (torch.float32, "adamw", 2, 2, dict(), None, None),
    "maximize-clip": (torch.float32, "sgd-momentum-wd", 2, 1, dict(sign=-1.0, max_grad_norm=1.0),
                      None, None),
    "fp64-groups-clip": (torch.float64, "adamw", 2, 2,
                         dict(max_grad_norm=0.5, hp=E.SCALAR_HPARAMS[2]), 128.0, None),
    "bf16-none": (torch.bfloat16, "none", 2, 1, dict(), None, None),
    "refresh-poisoned": (torch.float32, "sgd-momentum-wd", 2, 1, dict(), 512.0, "refresh"),
    "reuse-poisoned": (torch.float16, "adamw", 1, 2, dict(), 64.0, "reuse"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED_INTERVAL))
def test_fused_interval_steps(device, name, lib):
    dtype, algo, groups, per_group, opts, scale, poison = FUSED_INTERVAL[name]
    bs = fused_buckets(device, dtype, algo, groups, per_group, **opts)
    for b in bs:
        b.gr.update(INTERVAL_GR)
        for p_, st in zip(b.params, b.states):
            st[DIRECTION] = torch.zeros_like(p_)
    scale = None if scale is None else torch.tensor(scale, device=device)
    check_fused_interval(kernel_backend(device), bs, scale=scale, poison=poison)


def test_fused_interval_steps_are_these_calls_into_C(lib, monkeypatch):
    """A refresh: the norm partials, ascent finalizes and perturbs (saving g1) of a step,
    then dots partials for G, one update finalize, an update per table (caching the
    direction); a step between refreshes: dots partials, one reuse finalize, an update per
    table. On CUDA one launch each: for one group in one table 3 + 3 and 3."""
    calls = []

    class Counting:
        def __getattr__(self, name):
            attr = getattr(lib, name)
            if not callable(attr) or name == "Table":
                return attr
            return lambda *a: (calls.append((name, a)), attr(*a))[1]

    be = kernel_backend("cpu")
    for algo, groups, per_group in (("sgd-momentum-wd", 1, 1), ("adamw", 1, 1), ("adamw", 2, 2)):
        calls.clear()
        bs = fused_buckets("cpu", torch.float32, algo, groups, per_group)
        for b in bs:
            b.gr.update(INTERVAL_GR)
            for p_, st in zip(b.params, b.states):
                st[DIRECTION] = torch.zeros_like(p_)
        monkeypatch.setattr(_ext, "load", lambda: Counting())
        check_fused_interval(be, bs)
        monkeypatch.undo()
        k = groups * per_group
        update = "update_adamw" if algo == "adamw" else "update_sgd"
        names = [n for n, _ in calls if n not in ("dots",)]
        want = (["norm_partials"] * k + (["ascent_finalize"] + ["perturb"] * per_group) * groups
                + ["dots_partials"] * k + ["update_finalize"] + [update] * k
                + ["dots_partials"] * k + ["reuse_finalize"] + [update] * k)
        assert names == want, names
        assert all(a[-1] != 0 for n, a in calls if n == "perturb")  # saving g1
        kinds = [a[-4] for n, a in calls if n == update]
        assert kinds == [1] * k + [2] * k
        if algo == "adamw":  # the finalize advanced the one table's steps
            advanced = [a[13] for n, a in calls if n == "update_adamw"]
            assert advanced == ([True, True] if k == 1 else [False] * (2 * k))


def test_interval_optimizer_runs_the_fused_calls(lib, monkeypatch):
    """GRSGD(interval=3, backend="cpu"): the refresh and the steps between go through ascend,
    combine_update and reuse (the fused path), not the driver's torch ops."""
    be = kernel_backend("cpu")
    seen = []
    for name in ("ascend", "combine_update", "reuse", "dots", "reuse_update"):
        method = getattr(type(be), name)
        monkeypatch.setattr(type(be), name,
                            lambda self, *a, _m=method, _n=name, **k: (seen.append(_n),
                                                                       _m(self, *a, **k))[1])
    params = [torch.randn(s, requires_grad=True) for s in (7, 300, 4099)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, interval=3, backend="cpu")
    for _ in range(4):
        opt.step(E.closure_for(opt, params))
    assert seen == ["ascend", "combine_update", "reuse", "reuse", "ascend", "combine_update"]


def cuda_kernels(fn):
    """The names of the CUDA kernels ``fn`` runs (copies and memsets left out)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset"))]


@NEEDS_GPU
def test_cuda_interval_steps_are_six_and_three_launches(lib):
    """interval=3 on the CUDA kernels: a refresh is 3 + 3 launches (norm partials, ascent
    finalize, perturb saving g1; dots partials, update finalize, update caching the
    direction), a step between refreshes 3 (dots partials, reuse finalize, update)."""
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 70001, 300)]
    for opt in (gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, interval=3,
                               backend="cuda"),
                gr_fused.GRAdamW(params, lr=1e-2, gamma=0.05, interval=3, backend="cuda")):
        for p_ in params:
            p_.grad = torch.randn_like(p_)
        for step in range(7):
            for p_ in params:  # "the first backward", into the same grads
                p_.grad.copy_(torch.randn_like(p_))
            if opt.refresh_due:
                first = cuda_kernels(opt.first_step)
                for p_ in params:
                    p_.grad.add_(torch.ones_like(p_))
                second = cuda_kernels(lambda: opt.second_step(zero_grad=False))
                if step >= 3:
                    assert len(first) == 3 and len(second) == 3, (first, second)
            else:
                reuse = cuda_kernels(opt.step)
                if step >= 3:
                    assert len(reuse) == 3, reuse


# ----------------------------------------------------------------------- through the optimizer
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend=b),
    lambda p, b: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend=b),
    lambda p, b: gr_fused.GR(p, torch.optim.Adam, gamma=0.05, lr=1e-2, backend=b),
    lambda p, b: gr_fused.GNP(p, torch.optim.SGD, rho=0.05, lam=0.02, lr=0.1, momentum=0.9,
                              backend=b),
], ids=["sgd", "adamw", "gr-wrapper-adam", "gnp-sgd"])
def test_nan_in_G_skips_with_theta_restored_and_state_untouched(device, make, lib):
    params = [torch.randn(s, device=device, requires_grad=True) for s in (7, 300, 1, 4099)]
    E.check_nan_in_G_skips(make(params, backend_name(device)), params)


@pytest.mark.parametrize("device", DEVICES)
def test_params_run_through_the_kernels_in_their_own_memory(device, lib):
    """The parameters, their grads and state stay the user's tensors (same addresses, no
    flat buffer), walked by the kernels (no torch fallback)."""
    params = [torch.randn(s, device=device, requires_grad=True) for s in (7, 4099, 1)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend=backend_name(device))
    addresses = [p.data_ptr() for p in params]
    opt.step(E.closure_for(opt, params))
    grads = [p.grad for p in params]
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    opt.step(E.closure_for(opt, params))
    assert [p.data_ptr() for p in params] == addresses
    assert all(opt.state[p]["momentum_buffer"] is b for p, b in zip(params, bufs))
    assert all(p.grad is None or p.grad.data_ptr() != 0 for p in params) and grads
    (extra,) = opt._bucket_extra.values()
    assert "table" in extra and "fallback" not in extra
    assert opt.backends == {str(params[0].device): backend_name(device)}


def test_unwalkable_tensors_take_the_torch_path_with_a_warning(lib):
    """A non-dense parameter (a strided view) cannot be walked as raw memory: it goes to the
    torch backend (one warning), the others stay in the table, the result is the same."""
    def make():
        torch.manual_seed(5)
        ps = [torch.randn(6, 10)[:, ::2].detach().requires_grad_(),
              torch.randn(300, requires_grad=True), torch.randn(17, requires_grad=True)]
        return ps
    results = []
    for name in ("cpu", "torch"):
        params = make()
        opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend=name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(E.closure_for(opt, params))
        if name == "cpu":
            assert sum("torch path" in str(w.message) for w in caught) == 1
        results.append([p.detach().clone() for p in params])
    for got, want in zip(*results):
        E.ulp_close(got, want, 8, "theta")


def test_tensor_lr_is_read_by_the_kernels_not_the_host(lib):
    """A tensor lr goes to the kernel by address: no host read during a step, the value at
    the step is used (a scheduler may change it in place), and the result matches the torch
    backend (which reads it with .item()) within the fp32 tolerance of a few steps (the two
    round SGD's momentum update in different orders)."""
    def run(name, lr, steps=3):
        torch.manual_seed(3)
        params = [torch.randn(s, requires_grad=True) for s in (7, 300, 4099)]
        opts = [gr_fused.GRSGD(params, lr=lr, momentum=0.9, gamma=0.05, backend=name),
                gr_fused.GRAdamW(params, lr=lr, gamma=0.05, backend=name)]
        for opt in opts:
            opt.step(E.closure_for(opt, params))  # creates state
            ctx = forbid_host_reads() if name == "cpu" else _nothing()
            with ctx:
                for _ in range(steps):
                    opt.step(E.closure_for(opt, params))
            if isinstance(lr, torch.Tensor):
                with torch.no_grad():
                    lr.mul_(0.5)
        return [p.detach().clone() for p in params]
    for dtype in (torch.float32, torch.float64):
        got = run("cpu", torch.tensor(0.05, dtype=dtype))
        want = run("torch", torch.tensor(0.05, dtype=dtype))
        for g, w in zip(got, want):
            E.assert_close(g, w, 1e-6, f"theta with a {dtype} lr")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("device", DEVICES)
def test_gr_step_reads_nothing_back_to_the_host(device, lib):
    for make in (lambda p: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, max_grad_norm=1.0,
                                          difference="central", backend=backend_name(device)),
                 lambda p: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend=backend_name(device))):
        params = [torch.randn(s, device=device, requires_grad=True) for s in (7, 300, 4099)]
        opt = make(params)
        opt.step(E.closure_for(opt, params))  # the first step creates the state
        with forbid_host_reads():
            opt.step(E.closure_for(opt, params))


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_of_another_dtype_are_converted_and_kept_alive(device, lib):
    """perturb and update with step scalars of another dtype (the driver's general path with
    mixed dtypes) give the bits of scalars already in the compute dtype: the converted
    temporaries are alive while _C reads them."""
    be = kernel_backend(device)
    a = bucket("sgd-momentum-wd", torch.float32, device, with_state=True)
    b = E.prepared(be, E.clone_bucket(a))
    a = E.prepared(be, a)
    be.perturb(a, torch.tensor(0.0371, device=device), torch.tensor(-0.42, device=device), False)
    be.perturb(b, torch.tensor(0.0371, dtype=torch.float64, device=device),
               torch.tensor(-0.42, dtype=torch.float64, device=device), False)
    for bb in (a, b):
        be.update(bb, torch.tensor(0.8125, dtype=torch.float64, device=device),
                  torch.tensor(0.0, dtype=torch.float64, device=device))
    for x, y in zip(a.params + a.grads, b.params + b.grads):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------- the host build's bits
BIG = [(1_500_007,), (700_001,), (5,), (0,)]


def big_bucket(algo="sgd-momentum-wd", dtype=torch.float32, **kw):
    """Enough elements (2.2M) that the host build runs several threads and, for fp32 and
    fp64, streams perturb's backup (and direction) and the updates' θ (tables of 8 MiB and
    more)."""
    return bucket(algo, dtype, sizes=BIG, **kw)


def all_phases(lib, dtype=torch.float32, seed=1):
    """Every phase of the host build on big buckets; returns every output."""
    be = kernel_backend("cpu")
    torch.manual_seed(seed)
    c = compute_dtype(dtype)
    out = []
    for algo in ("sgd-nesterov", "adamw"):  # ("none" moves θ and G like these)
        b = E.prepared(be, big_bucket(algo, dtype, with_state=True))
        out += [be.sq_norm(b, False), be.sq_norm(b, True)]
        be.perturb(b, torch.tensor(0.01, dtype=c), torch.tensor(0.3, dtype=c), True)
        out += [p.clone() for p in b.params] + [g.clone() for g in b.grads]
        be.reflect(b)
        out += [p.clone() for p in b.params] + [g.clone() for g in b.grads]
        be.update(b, torch.tensor(0.7, dtype=c), torch.tensor(0.0, dtype=c))
        out += b.params + b.grads + [v for st in b.states for _, v in sorted(st.items())]
    first = E.prepared(be, big_bucket("sgd-momentum-wd", dtype))
    be.perturb(first, torch.tensor(0.01, dtype=c), torch.tensor(0.3, dtype=c), False)
    create_missing_state(first)
    be.refresh(first)
    be.update(first, torch.tensor(0.7, dtype=c), torch.tensor(0.0, dtype=c))
    out += first.params + [st["momentum_buffer"] for st in first.states]
    for algo in ("sgd-momentum-wd", "adamw", "none"):  # interval=k: a refresh, then a reuse
        b = E.prepared(be, interval_bucket(algo, dtype, sizes=BIG, with_state=True))
        be.perturb(b, torch.tensor(0.01, dtype=c), torch.tensor(0.3, dtype=c), False, save=True)
        out += [be.dots(b, DIRECTION)] + [d.clone() for d in directions(b)]
        be.update(b, torch.tensor(0.7, dtype=c), torch.tensor(0.0, dtype=c),
                  direction=(torch.tensor(0.61, dtype=c), torch.tensor(-0.27, dtype=c)))
        out += [x.clone() for x in b.params + b.grads + directions(b)] + [be.dots(b, DIRECTION)]
        be.reuse_update(b, torch.tensor(0.93, dtype=c), torch.tensor(0.0123, dtype=c),
                        torch.tensor(0.0, dtype=c))
        out += b.params + b.grads + [v for st in b.states for _, v in sorted(st.items())]
    return out


def assert_same_bits(xs, ys):
    assert len(xs) == len(ys) > 10
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x.view(-1).view(torch.uint8) if x.dim() else x,
                           y.view(-1).view(torch.uint8) if y.dim() else y), f"output {i} differs"


def test_same_bits_for_any_thread_count(lib):
    """Chunks are fixed by the table, the norm's partial sums added in chunk order: the
    norm and every phase give the same bits with 1, 2 or 3 threads."""
    saved = torch.get_num_threads()
    outs, norms = [], set()
    be = kernel_backend("cpu")
    b = E.prepared(be, big_bucket())
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            norms.add((float(be.sq_norm(b, False)), float(be.sq_norm(b, True))))
            if threads < 3:
                outs.append(all_phases(lib))
    finally:
        torch.set_num_threads(saved)
    assert len(norms) == 1, norms
    assert_same_bits(outs[0], outs[1])


def test_host_avx2_and_baseline_code_give_the_same_bits(lib):
    """host.cpp is compiled twice (x86-64 baseline and AVX2+FMA, -ffp-contract=off): both
    give the same bits, so a run does not depend on the CPU it lands on."""
    if lib.host_isa() != "avx2":
        pytest.skip(f"this CPU/build runs only the {lib.host_isa()} host code")
    outs = {}
    for isa in ("baseline", "avx2"):
        lib.host_isa(isa)
        try:
            outs[isa] = all_phases(lib)
        finally:
            lib.host_isa("avx2")
    assert_same_bits(outs["baseline"], outs["avx2"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_host_pack_code_gives_the_same_bits(dtype, lib):
    """The CUDA kernels read and write 16-byte packs (apply<V>, accumulate<V> with V > 1);
    the host build runs that same code on aligned chunks when asked (set_host_packs), so CI
    checks it without a GPU: every phase gives the bits of the one-element loops."""
    plain = all_phases(lib, dtype, seed=2)
    lib.set_host_packs(True)
    try:
        packed = all_phases(lib, dtype, seed=2)
    finally:
        lib.set_host_packs(False)
    assert_same_bits(plain, packed)


def test_norm_is_exact_in_double_and_finds_inf_and_nan(lib):
    be = kernel_backend("cpu")
    b = E.prepared(be, big_bucket())
    g = b.grads[0]
    g.mul_(torch.logspace(-3, 3, g.numel()))
    want = sum(x.double().square().sum() for x in b.grads)
    got = be.sq_norm(b, False)
    assert got.dtype == torch.float64 and abs(float(got) - float(want)) <= 1e-12 * float(want)
    huge = E.prepared(be, bucket("sgd-plain", torch.float32, sizes=[(70001,)]))
    huge.grads[0].fill_(1e30)  # each square overflows fp32, not the double sum
    assert torch.isfinite(be.sq_norm(huge, False))
    g[4321] = float("inf")
    assert torch.isinf(be.sq_norm(b, False))
    g[17] = float("nan")
    assert torch.isnan(be.sq_norm(b, False))
    d = E.prepared(be, bucket("sgd-plain", torch.float64, sizes=[(3,)]))
    d.grads[0].fill_(1e200)  # float64: an overflow of the sum is non-finite too
    assert not torch.isfinite(be.sq_norm(d, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_to_16_bits_is_torchs_bit_for_bit(dtype, lib):
    """Every one of the 65536 bit patterns through the host conversions, by the 'none'
    update (G = gscale·G in fp32, rounded once): the same bits as torch's conversion (any
    NaN for NaN). gscale = 1 checks the exact round trip, 1/3 and 3 rounding, 2^-10
    underflow to subnormals, 3 overflow to inf."""
    be = kernel_backend("cpu")
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    patterns = bits.view(dtype)
    gr = E.scalar_group()
    for gscale in (1.0, 1.0 / 3.0, 3.0, 2.0 ** -10):
        b = Bucket([torch.zeros_like(patterns)], [patterns.clone()], [{}], {}, "none", {}, gr=gr)
        b = E.prepared(be, b)
        g = torch.tensor(gscale)
        be.update(b, g, torch.tensor(0.0))
        want = (patterns.float() * g).to(dtype)
        got = b.grads[0]
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert same.all(), f"gscale {gscale}: differs at {(~same).nonzero().flatten()[:5].tolist()}"


# ----------------------------------------------------------------------- the CUDA build's code
def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy Triton's wheel ships."""
    found = shutil.which("cuobjdump")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and (Path(root) / "bin" / "cuobjdump").is_file():
            found = str(Path(root) / "bin" / "cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


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
    and sm_90; every element-wise and norm kernel (template argument V > 1: 4 floats, 8
    halves, 2 doubles per pack) loads with 128-bit LDG and, when it writes, stores with
    128-bit STG; and an address read from a table is global memory (LDG/STG), never a
    generic access (LD/ST)."""
    if not lib.with_cuda:
        pytest.skip("gr_fused._C was built without CUDA (no nvcc at build time)")
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's NVIDIA backend) to read the SASS")
    functions = _sass_functions(lib.__file__)
    names = {arch: {n for a, n in functions if a == arch} for arch in ("sm_80", "sm_90")}
    assert names["sm_80"] and names["sm_80"] == names["sm_90"]
    packed = 0
    for (arch, name), sass in functions.items():
        width = re.search(r"ELi(\d+)ELb[01]EEEv", name)  # <Op, V, CHECK>
        if not width:  # the finalize kernels and the step counts: no packs
            continue
        assert int(width.group(1)) > 1, name
        packed += 1
        assert "LDG.E.128" in sass, f"{arch} {name}: no 128-bit load"
        if "foreach_kernel" in name:
            assert "STG.E.128" in sass, f"{arch} {name}: no 128-bit store"
        generic = re.findall(r"\b(?:LD|ST)\.E[.\w]*", sass)
        assert not generic, f"{arch} {name}: generic accesses {generic[:3]}"
    # per arch, for each of 4 storage types and both CHECK variants: 15 element-wise ops
    # (perturb ×4: adaptive or not, saving the direction or not; reflect, restore; none,
    # sgd, adamw ×3 kinds: plain, caching the direction, reusing it) and 3 norms (plain,
    # adaptive, interval=k's dots)
    assert packed == 2 * 4 * 2 * (15 + 3), packed


# ----------------------------------------------------------------------- CUDA only
@NEEDS_GPU
def test_cuda_device_guard_leaves_the_current_device(lib):
    """A call on tensors of another device runs there and leaves the caller's device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    b = E.prepared(kernel_backend("cuda"), bucket("sgd-momentum-wd", torch.float32, "cuda:1"))
    E.check_phases(kernel_backend("cuda"), b)
    assert torch.cuda.current_device() == 0


@NEEDS_GPU
def test_cuda_first_and_second_step_on_different_streams(lib):
    """The ascent rows are made on first_step's stream and read on second_step's: the
    result is the same as on one stream."""
    def run(two_streams):
        torch.manual_seed(11)
        params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 70001, 300)]
        opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="cuda")
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        for _ in range(3):
            with torch.cuda.stream(s1):
                E.closure_for(opt, params)()
                opt.first_step()
            (s2 if two_streams else s1).wait_stream(s1)
            with torch.cuda.stream(s2 if two_streams else s1):
                for p in params:
                    p.grad.add_(p.detach().cos())
                opt.second_step()
            s1.wait_stream(s2)
        torch.cuda.synchronize()
        return [p.detach().clone() for p in params]
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@NEEDS_GPU
def test_cuda_norm_is_deterministic_and_exact_in_double(lib):
    """A float64 partial per chunk (a fixed tree per block), added in a fixed order by one
    block: the same bits on every call, within 1e-12 of the exact sum."""
    be = kernel_backend("cuda")
    for misalign in (False, True):
        b = E.prepared(be, bucket("sgd-plain", torch.float32, "cuda", misalign=misalign,
                                  sizes=[(3_000_017,), (70001,), (1,), (0,)]))
        want = float(sum(g.double().square().sum() for g in b.grads))
        got = {float(be.sq_norm(b, False)) for _ in range(5)}
        assert len(got) == 1 and abs(got.pop() - want) <= 1e-12 * want


@NEEDS_GPU
def test_cuda_step_syncs_nothing_with_a_tensor_lr(lib):
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 300, 4099)]
    opt = gr_fused.GRAdamW(params, lr=torch.tensor(1e-2, device="cuda"), gamma=0.05,
                           backend="cuda")
    opt.step(E.closure_for(opt, params))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step(E.closure_for(opt, params))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@NEEDS_GPU
def test_cuda_one_group_step_is_six_launches(lib):
    """first_step + second_step of one param group: norm partials, ascent finalize, perturb,
    norm partials, update finalize, update (AdamW's steps advance in the finalize): kernels
    only (a table whose addresses changed is uploaded with a copy first). The backward
    passes are simulated outside the profiled windows."""
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 70001, 300)]
    for opt in (gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="cuda"),
                gr_fused.GRAdamW(params, lr=1e-2, gamma=0.05, backend="cuda")):
        for p in params:
            p.grad = torch.randn_like(p)
        for step in range(3):  # the first creates the state, the second uploads new flags
            for p in params:  # "the first backward", into the same grads
                p.grad.copy_(torch.randn_like(p))
            first = cuda_kernels(opt.first_step)
            for p in params:  # "the second backward" accumulates onto the grads
                p.grad.add_(torch.ones_like(p))
            second = cuda_kernels(lambda: opt.second_step(zero_grad=False))
        assert len(first) == 3 and len(second) == 3, (first, second)


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


def _empty_table(lib, dtype=0):
    x = torch.zeros(8, dtype=torch.int64)
    return lib.Table(x.data_ptr(), x.data_ptr(), 0, 0, 4096, 0, True, dtype), x


def test_cuda_errors_become_python_exceptions(lib):
    """A failing CUDA call raises RuntimeError carrying the CUDA error string (here: a device
    that does not exist, or no usable device/driver at all); a build without CUDA says so."""
    x = torch.zeros(64, dtype=torch.int64)
    table = lib.Table(x.data_ptr(), x.data_ptr(), 1, 1, 4096, x.data_ptr(), True, 0)
    device = 63 if HAS_CUDA else 0
    with pytest.raises(RuntimeError) as info:
        lib.restore(device, 0, 0, table)
    if lib.with_cuda:
        assert "gr_fused CUDA error" in str(info.value) and "cuda" in str(info.value).lower()
    else:
        assert "built without CUDA" in str(info.value)


def test_bad_arguments_raise_value_errors(lib):
    x = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        lib.Table(x.data_ptr(), x.data_ptr(), 0, 0, 4096, 0, True, 7)
    with pytest.raises(ValueError, match="chunk"):
        lib.Table(x.data_ptr(), x.data_ptr(), 0, 0, 100, 0, True, 0)
    with pytest.raises(ValueError, match="64-byte"):
        lib.Table(x.data_ptr(), x.data_ptr(), 1, 1, 4096, x.data_ptr() + 8, True, 0)
    table, _ = _empty_table(lib)
    p = x.data_ptr()
    with pytest.raises(ValueError, match="tensor lr"):
        lib.update_sgd(-1, 0, 1, table, p, p, 0.0, p, 1, 0.9, 0.0, 0.0, False, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="update kind 7"):
        lib.update_sgd(-1, 0, 1, table, p, p, 0.1, 0, 0, 0.9, 0.0, 0.0, False, 7, p, p, p)
    for kind, dirs, s1, s2 in ((1, 0, p, p), (1, p, p, 0), (2, p, 0, 0)):  # what a kind needs
        with pytest.raises(ValueError, match="needs the direction"):
            lib.update_none(-1, 0, 1, table, p, p, kind, dirs, s1, s2)
    with pytest.raises(ValueError, match="no direction row"):
        lib.dots(-1, 0, 1, table, 0, 0, p)
    with pytest.raises(ValueError, match="host_isa"):
        lib.host_isa("sse9")
    out = torch.zeros(4)
    o = out.data_ptr()
    args = (o, 0, o, o, o, 0, 0, 0, False, 1.0)
    for bounds in ([0], [0, 3, 2], list(range(lib.max_groups + 2))):
        with pytest.raises(ValueError, match="update_finalize"):
            lib.update_finalize(-1, 0, 1, 0, o, bounds, *args, [], 0)
        with pytest.raises(ValueError, match="reuse_finalize"):
            lib.reuse_finalize(-1, 0, 1, 0, o, bounds, [1.0], [0.7], 0, o, o, o, o, 0, 0, 0,
                               False, 1.0)
    with pytest.raises(ValueError, match="one sign"):  # signs: none or one per group
        lib.update_finalize(-1, 0, 1, 0, o, [0, 1, 2], *args, [1.0], o)
    with pytest.raises(ValueError, match="signs without valid"):
        lib.update_finalize(-1, 0, 1, 0, o, [0, 1], *args, [1.0], 0)
    with pytest.raises(ValueError, match="one sign"):
        lib.reuse_finalize(-1, 0, 1, 0, o, [0, 1], [1.0], [], 0, o, o, o, o, 0, 0, 0, False, 1.0)


def test_missing_state_is_a_clear_error(lib):
    be = kernel_backend("cpu")
    b = E.prepared(be, bucket("sgd-momentum-wd", torch.float32))  # no momentum buffers yet
    with pytest.raises(ValueError, match="momentum_buffer"):
        be.update(b, torch.tensor(1.0), torch.tensor(0.0))


def test_build_info(lib):
    assert lib.source_hash == _ext._csrc_build().source_hash(), "gr_fused._C is stale"
    assert lib.dtype_codes == {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
    if lib.with_cuda:
        assert lib.cuda_archs == "sm_80,sm_90"
    if os.environ.get("GR_FUSED_BUILD_CUDA") == "1":  # CI forces the CUDA part: it was built
        assert lib.with_cuda, "GR_FUSED_BUILD_CUDA=1, yet gr_fused._C has no CUDA kernels"


def test_no_private_storage_api_on_the_step_path():
    """The backend never trades storages (UntypedStorage._swap_data_ptr_) or re-points data."""
    source = (REPO / "gr_fused" / "backends" / "cext_backend.py").read_text()
    assert "_swap_data_ptr_" not in source and ".set_(" not in source


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


# ----------------------------------------------------------------------- the benchmarks
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
    assert res["ratio_sam_cpu_vs_sam"] > 0
    assert all(r > 0 for r in res["ratio_torch_backend_vs_sam"].values())
    assert set(res["phases"]) == {"norm", "perturb", "update-sgd"}
    assert all(p["ms"] > 0 and p["gbps"] > 0 for p in res["phases"].values())
    assert set(res["host_cost"]) == {50, 500}
    assert all(h["ratio"] > 0 and h["us"]["gr_fused cpu"] > 0 for h in res["host_cost"].values())


def test_bench_gpu_cuda_script_exits_cleanly_without_a_gpu(tmp_path):
    if HAS_CUDA:
        pytest.skip("a CUDA device is here: the script would run the benchmark")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_cuda.py"),
                           str(tmp_path / "out.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs a CUDA device" in proc.stdout
