"""The compiled kernels of csrc/ (gr_fused._C, backends "cpu" and "cuda") over tensor tables.

The host build runs on every machine, so CI checks the C++ math and the table walk that the
CUDA kernels also run (csrc/grf_math.h and grf_ops.h are compiled for both); on a GPU the
same checks also run the CUDA kernels.

* the shared equality cases (tests/equality.py) against the torch backend;
* every phase against the torch reference phases through the shared harness (check_phases,
  check_restore, check_reflect, check_fused_step): every dtype, every base update, fresh
  and existing state, skipped steps, frozen tensors, unaligned tensors, channels_last,
  sizes of 0 and 1 element and of several chunks, adaptive norms;
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
from gr_fused.backends.base import Bucket, SkipRecord
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
            advanced = [a[-1] for n, a in calls if n == "update_adamw"]
            assert advanced == ([True] if k == 1 else [False] * k)


# ----------------------------------------------------------------------- through the optimizer
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend=b),
    lambda p, b: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend=b),
    lambda p, b: gr_fused.GR(p, torch.optim.SGD, gamma=0.05, lr=0.1, momentum=0.9, backend=b),
], ids=["sgd", "adamw", "gr-wrapper"])
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
    backend (which reads it with .item())."""
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
            E.ulp_close(g, w, 8, f"theta with a {dtype} lr")


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
def big_bucket(algo="sgd-momentum-wd", dtype=torch.float32, **kw):
    """Enough elements (2.2M) that the host build runs several threads and, for fp32 and
    fp64, streams perturb's backup (tables of 8 MiB and more)."""
    return bucket(algo, dtype, sizes=[(1_500_007,), (700_001,), (5,), (0,)], **kw)


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
    return out + first.params + [st["momentum_buffer"] for st in first.states]


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
    # per arch, for each of 4 storage types and both CHECK variants: 7 element-wise ops
    # (perturb ×2, reflect, restore, none, sgd, adamw) and 2 norms
    assert packed == 2 * 4 * 2 * (7 + 2), packed


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
    from torch.profiler import ProfilerActivity, profile

    def kernels(fn):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memcpy", "Memset"))]

    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 70001, 300)]
    for opt in (gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="cuda"),
                gr_fused.GRAdamW(params, lr=1e-2, gamma=0.05, backend="cuda")):
        for p in params:
            p.grad = torch.randn_like(p)
        for step in range(3):  # the first creates the state, the second uploads new flags
            for p in params:  # "the first backward", into the same grads
                p.grad.copy_(torch.randn_like(p))
            first = kernels(opt.first_step)
            for p in params:  # "the second backward" accumulates onto the grads
                p.grad.add_(torch.ones_like(p))
            second = kernels(lambda: opt.second_step(zero_grad=False))
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
    with pytest.raises(ValueError, match="tensor lr"):
        lib.update_sgd(-1, 0, 1, table, x.data_ptr(), x.data_ptr(), 0.0, x.data_ptr(), 1,
                       0.9, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="host_isa"):
        lib.host_isa("sse9")
    out = torch.zeros(4)
    args = (out.data_ptr(), 0, out.data_ptr(), out.data_ptr(), out.data_ptr(), 0, 0, 0, False, 1.0)
    for bounds in ([0], [0, 3, 2], list(range(lib.max_groups + 2))):
        with pytest.raises(ValueError, match="update_finalize"):
            lib.update_finalize(-1, 0, 1, 0, out.data_ptr(), bounds, *args)


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
