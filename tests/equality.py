"""Shared equality harness: every backend is checked against the torch backend with these
cases (docs/design.md §5), so the Triton, CUDA and host-C++ suites share one definition.

A case builds fresh random parameters (sizes that are not multiples of a block, 1-element
tensors, many tiny tensors, mixed dtypes, several groups, params without grads), an
optimizer, and a smooth non-quadratic loss whose gradient changes between θ and θ'.
``run_case(case, backend)`` runs a few GR steps and returns every parameter and state tensor;
``compare_backends`` runs the same case on two backends from identical inputs and checks
them with :func:`assert_close`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch

import gr_fused
from gr_fused import _scalars
from gr_fused.backends.base import Bucket, SkipRecord, group_runs
from gr_fused.backends.torch_backend import compute_dtype
from reference_phases import ReferencePhases
from gr_fused.optim.base import create_missing_state

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """‖a − b‖/‖b‖ ≤ rtol, with NaN/inf anywhere counted as a mismatch; on failure, say
    where the largest elementwise difference is."""
    a, b = actual.detach().double().flatten(), expected.detach().double().flatten()
    assert a.shape == b.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        bad = (~torch.isfinite(a) | ~torch.isfinite(b)).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{what}: non-finite values at flat indices {bad}")
    err = (a - b).norm() / b.norm().clamp_min(1e-30)
    if err > rtol:
        i = int((a - b).abs().argmax())
        raise AssertionError(f"{what}: relative error {float(err):.3e} > {rtol:.1e}; largest "
                             f"difference at flat index {i}: {float(a[i])!r} vs {float(b[i])!r}")


@dataclasses.dataclass
class Case:
    name: str
    sizes: List[tuple]                      # parameter shapes
    make_opt: Callable[..., torch.optim.Optimizer]
    dtypes: tuple = (torch.float32,)        # cycled over the parameters
    groups: int = 1                         # split parameters into this many groups
    no_grad_every: int = 0                  # every k-th parameter gets no gradient
    steps: int = 5
    odd_group_options: dict = dataclasses.field(default_factory=lambda: {"lr": 0.03})

    def __str__(self):
        return self.name


def loss_of(params: List[torch.Tensor], coeffs: List[torch.Tensor]) -> torch.Tensor:
    """Σ sum(½·c·sin(p) + ¼·p²): smooth, with a Hessian that varies with p, and mild enough
    that rounding differences are not amplified by the dynamics over a few steps."""
    total = 0.0
    for p, c in zip(params, coeffs):
        x = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        total = total + (0.5 * c * torch.sin(x) + 0.25 * x * x).sum()
    return total


def make_inputs(case: Case, device="cpu"):
    params, coeffs = [], []
    for i, shape in enumerate(case.sizes):
        dtype = case.dtypes[i % len(case.dtypes)]
        params.append(torch.randn(shape, device=device).to(dtype).requires_grad_())
        coeffs.append(torch.randn(shape, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    return params, coeffs


def run_case(case: Case, backend: str, inputs, steps: Optional[int] = None):
    params = [p.detach().clone().requires_grad_() for p in inputs[0]]
    coeffs = inputs[1]
    skip = set(range(case.no_grad_every - 1, len(params), case.no_grad_every)) if case.no_grad_every else set()
    used = [i for i in range(len(params)) if i not in skip]
    per_group = [used[g::case.groups] for g in range(case.groups)]
    groups = [{"params": [params[i] for i in idx]} for idx in per_group if idx]
    for g, group in enumerate(groups):
        if g % 2 == 1:
            group.update(case.odd_group_options)  # a second group with its own hyperparameters
    for i in skip:
        groups[0]["params"].append(params[i])  # in a group, but never given a gradient
    opt = case.make_opt(groups, backend)

    def closure():
        opt.zero_grad()
        loss = loss_of([params[i] for i in used], [coeffs[i] for i in used])
        loss.backward()
        return loss

    for _ in range(steps or case.steps):
        gr_step(opt, closure)
    state = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items() if not hasattr(opt, "base_optimizer") else \
                opt.base_optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                state[(i, k)] = v.detach().clone()
    return [p.detach().clone() for p in params], state, opt


def gr_step(opt, closure, scaler=None):
    """``opt.step(closure)`` (``scaler.step(opt, closure)`` with a scaler) with a torch-style
    closure (zero grads, forward, backward). SAM takes the gradients already computed as g1,
    as the SAM implementation it replaces, so for SAM the closure runs once first."""
    if isinstance(opt, gr_fused.SAM):
        with torch.enable_grad():
            closure()
    return opt.step(closure) if scaler is None else scaler.step(opt, closure)


def compare_backends(case: Case, backend: str, reference: str = "torch", device="cpu"):
    """Run ``case`` on both backends from identical inputs; compare all parameters of each
    dtype as one vector (‖a − b‖/‖b‖, docs/design.md §5), and each state key likewise."""
    inputs = make_inputs(case, device)
    got_p, got_s, _ = run_case(case, backend, inputs)
    ref_p, ref_s, _ = run_case(case, reference, inputs)
    for dtype in {p.dtype for p in ref_p}:
        pairs = [(a, b) for a, b in zip(got_p, ref_p) if b.dtype == dtype]
        assert all(a.dtype == dtype for a, _ in pairs)
        assert_close(torch.cat([a.flatten() for a, _ in pairs]),
                     torch.cat([b.flatten() for _, b in pairs]), TOL[dtype],
                     f"{case.name}: {dtype} params ({backend} vs {reference})")
    assert got_s.keys() == ref_s.keys(), f"{case.name}: state keys differ"
    for key in sorted({k for _, k in ref_s}):
        items = [(i, k) for (i, k) in ref_s if k == key]
        if key == "step":
            assert all(float(got_s[i]) == float(ref_s[i]) for i in items), f"{case.name}: step"
            continue
        dtype = ref_s[items[0]].dtype
        assert_close(torch.cat([got_s[i].flatten() for i in items]),
                     torch.cat([ref_s[i].flatten() for i in items]),
                     max(TOL[r.dtype] for r in (ref_s[i] for i in items)),
                     f"{case.name}: state {key!r} ({backend} vs {reference})")


def _sgd(**kw):
    return lambda groups, backend: gr_fused.GRSGD(groups, backend=backend, **kw)


def _adamw(**kw):
    return lambda groups, backend: gr_fused.GRAdamW(groups, backend=backend, **kw)


SGD_MOM = dict(lr=0.02, momentum=0.9, weight_decay=1e-2, gamma=0.002, rho=0.05)
ODD = [(1,), (7,), (1000, 3), (17, 5, 3), (4099,)]
TINY = [(3,)] * 300 + [(1,)] * 200

CASES: List[Case] = [
    Case("sgd-momentum-forward", ODD, _sgd(**SGD_MOM)),
    Case("sgd-nesterov-backward", ODD, _sgd(lr=0.02, momentum=0.9, nesterov=True, gamma=0.002, rho=-0.05)),
    Case("sgd-dampening-unnormalized", ODD, _sgd(lr=0.05, momentum=0.5, dampening=0.3, gamma=0.02, rho=0.01, normalize=False)),
    Case("sgd-plain-central", ODD, _sgd(lr=0.05, gamma=0.002, rho=0.05, difference="central")),
    Case("sgd-clipped", ODD, _sgd(max_grad_norm=0.5, **SGD_MOM)),
    Case("sgd-tiny-tensors", TINY, _sgd(**SGD_MOM)),
    Case("sgd-groups-nograd", ODD * 2, _sgd(**SGD_MOM), groups=2, no_grad_every=3),
    Case("adamw-forward", ODD, _adamw(lr=1e-2, weight_decay=0.1, gamma=0.002, rho=0.05)),
    Case("adamw-central-groups", ODD * 2, _adamw(lr=1e-2, gamma=0.002, rho=0.05, difference="central"), groups=2),
    Case("adamw-backward-clipped", ODD, _adamw(lr=1e-2, gamma=0.002, rho=-0.05, max_grad_norm=1.0)),
    Case("sgd-groups-clipped-asam", ODD * 2, _sgd(max_grad_norm=0.5, **SGD_MOM), groups=2,
         odd_group_options=dict(lr=0.03, rho=0.1, adaptive=True, weight_decay=0.0)),
    Case("adamw-groups-own-clipping", ODD * 2, _adamw(lr=1e-2, gamma=0.002, rho=0.05,
         max_grad_norm=1.0), groups=2, odd_group_options=dict(max_grad_norm=0.05)),
    Case("sam-adaptive", ODD, lambda g, b: gr_fused.SAM(g, torch.optim.SGD, rho=0.05, adaptive=True, lr=0.05, momentum=0.9, backend=b)),
    Case("gnp", ODD, lambda g, b: gr_fused.GNP(g, torch.optim.SGD, rho=0.05, lam=0.02, lr=0.05, backend=b)),
    Case("gr-wrapper-adam", ODD, lambda g, b: gr_fused.GR(g, torch.optim.Adam, gamma=0.002, rho=0.05, lr=1e-2, backend=b)),
    Case("gr-wrapper-adam-groups", ODD * 2, lambda g, b: gr_fused.GR(g, torch.optim.Adam, gamma=0.002, rho=0.05, lr=1e-2, backend=b),
         groups=2, no_grad_every=4, odd_group_options=dict(lr=0.03, rho=0.1)),
    Case("sgd-bf16", ODD, _sgd(**SGD_MOM), dtypes=(torch.bfloat16,), steps=1),
    Case("sgd-fp16", ODD, _sgd(**SGD_MOM), dtypes=(torch.float16,)),
    Case("adamw-mixed-dtypes", ODD * 2, _adamw(lr=1e-2, gamma=0.002, rho=0.05), dtypes=(torch.float32, torch.bfloat16, torch.float16), steps=1),
]
CASE_IDS = [c.name for c in CASES]


# ------------------------------------------------------------ backend-level helpers
# The kernel suites (Triton, csrc) drive a backend through the Backend interface on buckets
# of the user's own tensors and compare every phase with the reference phases
# (tests/reference_phases.py) from identical inputs.
def ulp_close(actual, expected, ulps, what):
    """Each element within ``ulps`` units of the dtype's precision (relative to the element,
    or to 1 below 1: the operands here are O(1)); NaN/inf count as a mismatch."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, b = actual.double(), expected.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: non-finite"
    err = (a - b).abs() / b.abs().clamp_min(1.0)
    worst = int(err.argmax()) if err.numel() else 0
    eps = torch.finfo(expected.dtype).eps
    assert err.numel() == 0 or err.flatten()[worst] <= ulps * eps, (
        f"{what}: {float(err.flatten()[worst] / eps):.2f} ulps at {worst}: "
        f"{float(a.flatten()[worst])!r} vs {float(b.flatten()[worst])!r}")


KERNEL_ULPS = {torch.float32: 2, torch.float64: 2, torch.bfloat16: 1, torch.float16: 1}
SGD_GROUPS = {
    "momentum-wd": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False),
    "nesterov": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=0.0, nesterov=False),
    "plain": dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False),
}
ADAMW_GROUP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
# sizes: one element, zero elements, not a multiple of any block, more than one chunk, many
SIZES = [(1,), (0,), (7, 3), (1000,), (4099,), (70001,), (33, 65)]


def scalar_group(rho=0.05, gamma=0.02, alpha=None, normalize=True, central=False,
                 adaptive=False, max_grad_norm=None, eps_sign=1.0, combine_sign=1.0):
    """The GR hyperparameters of a bucket (``Bucket.gr``), as the driver resolves them."""
    return dict(rho=rho, gamma=gamma, alpha=alpha, normalize=normalize,
                difference="central" if central else "forward", adaptive=adaptive,
                max_grad_norm=max_grad_norm, eps_sign=eps_sign, combine_sign=combine_sign)


def random_bucket(sizes, dtype, device, algo="sgd", group=None, gr=None, misalign=False,
                  channels_last=False, with_state=False, index=0):
    """A bucket of fresh random params and grads of ``sizes`` (``misalign``: every tensor
    starts one element past its storage's start, so off a 16-byte boundary; with a 4-D size,
    ``channels_last`` lays it out so). ``with_state``: the base update's state exists (random
    momentum buffer / Adam moments, step 4), else the first update creates it."""
    def rand(shape, like=None):
        n = 1
        for d in shape:
            n *= d
        if misalign:
            t = torch.randn(n + 1, device=device).to(dtype)[1:].view(shape)
        else:
            t = torch.randn(shape, device=device).to(dtype)
        if channels_last and len(shape) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    params = [rand(s) for s in sizes]
    grads = [rand(s) for s in sizes]
    states = [{} for _ in sizes]
    if group is None:
        group = dict(ADAMW_GROUP) if algo == "adamw" else dict(SGD_GROUPS["momentum-wd"])
    if with_state:
        for p, st in zip(params, states):
            if algo == "sgd" and group["momentum"]:
                st["momentum_buffer"] = rand(p.shape)
            elif algo == "adamw":
                st["exp_avg"] = rand(p.shape)
                st["exp_avg_sq"] = rand(p.shape).abs()
                st["step"] = torch.tensor(4.0, device=device)
    b = Bucket(params, grads, states, group, algo, {}, gr=gr or scalar_group())
    b.group_index = index
    return b


def clone_bucket(b: Bucket) -> Bucket:
    """Same values, new tensors (strides kept), new ``extra``; for the reference phases."""
    c = Bucket([p.clone() for p in b.params], [g.clone() for g in b.grads],
               [{k: v.clone() for k, v in st.items()} for st in b.states], dict(b.group),
               b.algo, {}, gr=dict(b.gr))
    c.flags = None if b.flags is None else list(b.flags)
    c.group_index = b.group_index
    c.backend = TORCH
    return c


TORCH = ReferencePhases()  # the kernels' operation order (tests/reference_phases.py)


def prepared(backend, b: Bucket) -> Bucket:
    """``b`` as ``backend`` runs it (its table built); all its tensors must be walkable."""
    b.backend = backend
    parts = backend.prepare(b)
    assert len(parts) == 1 and parts[0].backend is backend, "a tensor took the torch path"
    return parts[0]


def device_scalar(value, b: Bucket) -> torch.Tensor:
    return torch.tensor(value, dtype=compute_dtype(b.dtype), device=b.device)


def assert_same_tensors(got, want, dtype, what, exact=False):
    for i, (a, w) in enumerate(zip(got, want)):
        assert a.shape == w.shape and a.dtype == w.dtype, f"{what}[{i}]"
        if exact:
            assert torch.equal(a, w), f"{what}[{i}] differs"
        else:
            ulp_close(a, w, KERNEL_ULPS[dtype], f"{what}[{i}]")


def state_of(b: Bucket, key: str):
    return [st[key] for st in b.states]


def check_phases(backend, b: Bucket, *, adaptive=False, skip=False, frozen=(),
                 second_grad=True):
    """Every phase of ``backend`` on ``b`` against the reference phases on a clone: sq_norm of g1,
    perturb (θ', fold·g1, and restore gives θ back bit for bit on a copy), a second gradient
    accumulated onto the grads (``second_grad``), sq_norm of G, then the state a first update
    creates and the update with ``skip`` (found_inf) and the ``frozen`` tensors. θ, the
    grads and every state tensor must match within KERNEL_ULPS (0-dim state exactly); a
    skipped or frozen tensor keeps θ = its old value and its state bit for bit."""
    dtype = b.dtype
    ref = clone_bucket(b)
    theta0 = [p.clone() for p in b.params]
    kb = prepared(backend, b)
    sq, sq_ref = backend.sq_norm(kb, adaptive), TORCH.sq_norm(ref, adaptive)
    assert sq.dtype == torch.float64 and sq.shape == ()
    torch.testing.assert_close(sq, sq_ref, rtol=1e-12, atol=0)
    eps, fold = device_scalar(0.0371, kb), device_scalar(-0.42, kb)
    backend.perturb(kb, eps, fold, adaptive)
    TORCH.perturb(ref, eps, fold, adaptive)
    assert_same_tensors(kb.params, ref.params, dtype, "perturbed theta")
    assert_same_tensors(kb.grads, ref.grads, dtype, "fold*g1")
    if second_grad:
        for g, r in zip(kb.grads, ref.grads):
            g2 = torch.randn(g.shape, device=g.device).to(dtype)
            g.add_(g2)
            r.add_(g2)
    sq, sq_ref = backend.sq_norm(kb, False), TORCH.sq_norm(ref, False)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-12, atol=0)
    old_state = [{k: v.clone() for k, v in st.items()} for st in kb.states]
    for bucket in (kb, ref):
        create_missing_state(bucket)
        for i in frozen:
            bucket.flags = bucket.flags or [0] * len(bucket.params)
            bucket.flags[i] |= 2  # FLAG_FROZEN
    backend.refresh(kb)
    gscale, found_inf = device_scalar(0.8125, kb), device_scalar(1.0 if skip else 0.0, kb)
    backend.update(kb, gscale, found_inf)
    TORCH.update(ref, gscale, found_inf)
    assert_same_tensors(kb.params, ref.params, dtype, "updated theta")
    assert_same_tensors(kb.grads, ref.grads, dtype, "grads after the update")
    for i, (st, want) in enumerate(zip(kb.states, ref.states)):
        assert set(st) == set(want), f"state keys of tensor {i}"
        keep = skip or i in frozen
        if keep:
            assert torch.equal(kb.params[i], theta0[i]), f"theta[{i}] must be restored exactly"
        for key, w in want.items():
            got = st[key]
            assert got.dtype == w.dtype and got.shape == w.shape, key
            if keep and key in old_state[i]:
                assert torch.equal(got, old_state[i][key]), f"{key}[{i}] changed"
            elif w.dim() == 0:
                assert torch.equal(got, w), f"{key}[{i}]: {got} vs {w}"
            else:
                ulp_close(got, w, KERNEL_ULPS[dtype], f"{key}[{i}]")
    return kb, ref


def check_restore(backend, b: Bucket):
    """perturb then restore: θ is back bit for bit (the path of a closure that raised)."""
    theta0 = [p.clone() for p in b.params]
    kb = prepared(backend, b)
    backend.perturb(kb, device_scalar(0.5, kb), device_scalar(0.25, kb), False)
    backend.restore(kb)
    assert_same_tensors(kb.params, theta0, b.dtype, "restored theta", exact=True)


def check_reflect(backend, b: Bucket):
    ref = clone_bucket(b)
    kb = prepared(backend, b)
    for bucket, be in ((kb, backend), (ref, TORCH)):
        be.perturb(bucket, device_scalar(0.3, bucket), device_scalar(1.5, bucket), False)
        be.reflect(bucket)
    assert_same_tensors(kb.params, ref.params, b.dtype, "reflected theta")
    assert_same_tensors(kb.grads, ref.grads, b.dtype, "negated grads", exact=True)


# ------------------------------------------------------------------ fused step scalars
# Backends that compute the step scalars where they finalize a norm (Triton's finalize
# kernels, csrc's finalize) are held, through Backend.ascend / combine_update, to the
# driver's general path with TorchBackend (gr_fused/_scalars.py).
SCALAR_HPARAMS = [dict(normalize=True, alpha=None, central=False),
                  dict(normalize=False, alpha=None, central=True),
                  dict(normalize=True, alpha=0.7, central=False),
                  dict(normalize=True, alpha=None, central=True)]
SCALAR_HPARAM_IDS = ["normalized", "fixed-eps-central", "fixed-alpha", "normalized-central"]


def scalars_close(actual, expected, what):
    """Within 4 ulps of the compute dtype, relative: the fused code divides and takes square
    roots correctly rounded; torch's CPU sqrt is not always, and a 1-ulp root moves ε_t and
    what follows by a few ulps. NaN must match NaN."""
    a, b = actual.double(), expected.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    err = torch.where(both_nan, 0.0, (a - b).abs() / b.abs().clamp_min(1e-300))
    ulps = 4 * torch.finfo(expected.dtype).eps
    assert bool((err <= ulps).all()), f"{what}: {actual.tolist()} vs {expected.tolist()}"


def exact_sq_norm(grad, param=None):
    """Σ g² (Σ (θ·g)²) in float64: what every backend's norm gives."""
    x = grad.double() if param is None else grad.double() * param.double()
    return x.square().sum()


def general_ascent(buckets, scale):
    """The driver's general-path rows [eps, fold, combine] per group, from exact float64
    norms (perturbing nothing)."""
    inv = None if scale is None else scale.reciprocal()
    sq = sum(exact_sq_norm(g, p if b.gr["adaptive"] else None)
             for b in buckets for g, p in zip(b.grads, b.params))
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32
    rows = []
    for gr, _ in group_runs(buckets):
        eps, fold, combine = _scalars.ascent_scalars(
            torch.as_tensor(sq, dtype=torch.float64), inv, rho=gr["rho"],
            normalize=gr["normalize"], gamma=gr["gamma"], alpha=gr["alpha"],
            difference=gr["difference"], dtype=dtype)
        rows.append(torch.stack([eps * gr["eps_sign"], fold, combine * gr["combine_sign"]]))
    return torch.stack(rows)


def general_update(buckets, rows, scale):
    """The driver's general-path [gscale per group..., found_inf] from exact norms."""
    inv = None if scale is None else scale.reciprocal()
    runs = group_runs(buckets)
    sq = [sum(exact_sq_norm(g) for b in members for g in b.grads) for _, members in runs]
    gscales, found_inf = _scalars.update_scalars(
        [torch.as_tensor(s, dtype=torch.float64) for s in sq],
        [rows[i, 2] for i in range(len(runs))], inv, [gr["max_grad_norm"] for gr, _ in runs])
    return torch.stack(gscales + [found_inf])


def check_fused_step(backend, buckets, scale=None, poison=None):
    """``backend.ascend`` and ``backend.combine_update`` on ``buckets`` (one device; each
    group's buckets in a row) against the general path: the rows [eps, fold, combine] of
    every group and the update scalars within 4 ulps of _scalars.py on exact norms, θ, the
    grads and the state against TorchBackend's phases with those same scalars, and the skip
    records. ``poison`` (a value) goes into one element of the second gradient: the step is
    skipped. Returns the kernel buckets."""
    refs = [clone_bucket(b) for b in buckets]
    theta0 = [[p.clone() for p in b.params] for b in buckets]
    kbs = [prepared(backend, b) for b in buckets]
    assert backend.can_fuse(kbs)
    want_rows = general_ascent(kbs, scale)
    rows = backend.ascend(kbs, scale)
    scalars_close(rows, want_rows.to(rows.dtype), "ascent rows")
    for (gr, members), row in zip(group_runs(refs), rows):
        for r in members:
            c = compute_dtype(r.dtype)
            TORCH.perturb(r, row[0].to(r.device, c), row[1].to(r.device, c), gr["adaptive"])
    for kb, r in zip(kbs, refs):
        assert_same_tensors(kb.params, r.params, kb.dtype, "perturbed theta")
        assert_same_tensors(kb.grads, r.grads, kb.dtype, "fold*g1")
        for g, rg in zip(kb.grads, r.grads):
            g2 = torch.randn(g.shape, device=g.device).to(g.dtype)
            g.add_(g2)
            rg.add_(g2)
    if poison is not None:
        target = next(kb for kb in kbs if kb.numel())
        t = next(g for g in target.grads if g.numel())
        t.view(-1)[t.numel() // 2] = poison
        ref_t = refs[kbs.index(target)].grads[target.grads.index(t)]
        ref_t.view(-1)[t.numel() // 2] = poison
    for kb, r in zip(kbs, refs):
        create_missing_state(kb)
        create_missing_state(r)
        backend.refresh(kb)
    device = kbs[0].device
    count = torch.tensor(3, dtype=torch.int64, device=device)
    last = torch.empty((), dtype=torch.bool, device=device)
    flag = torch.zeros((), dtype=torch.float32, device=device)
    want = general_update(kbs, rows, scale)
    found_inf = backend.combine_update(kbs, rows, scale, SkipRecord(count, last, flag))
    skipped = poison is not None
    assert float(found_inf) == float(want[-1]) == float(skipped)
    assert int(count) == 3 + skipped and bool(last) == skipped and float(flag) == float(skipped)
    for i, (_, members) in enumerate(group_runs(refs)):
        for r in members:
            c = compute_dtype(r.dtype)
            TORCH.update(r, want[i].to(r.device, c), want[-1].to(r.device, c))
    for kb, r, t0 in zip(kbs, refs, theta0):
        if skipped:
            assert_same_tensors(kb.params, t0, kb.dtype, "restored theta", exact=True)
        assert_same_tensors(kb.params, r.params, kb.dtype, "updated theta")
        for i, (st, w) in enumerate(zip(kb.states, r.states)):
            assert set(st) == set(w)
            for key, v in w.items():
                if v.dim() == 0:
                    assert torch.equal(st[key], v), f"{key}[{i}]"
                else:
                    ulp_close(st[key], v, KERNEL_ULPS[kb.dtype], f"{key}[{i}]")
    return kbs


def closure_for(opt, params, after_backward=None):
    """A GR closure over a smooth loss of ``params``; ``after_backward`` may poison grads."""
    def closure():
        opt.zero_grad()
        loss = sum((p.sin() * p).sum() for p in params)
        loss.backward()
        if after_backward is not None:
            after_backward()
        return loss
    return closure


def check_nan_in_G_skips(opt, params):
    """Two GR steps of ``opt`` over ``params`` (sizes at least (7, 300, 1, 4099)), the second
    with a NaN in g2 only, so that it lands in G = fold·g1 + g2: that step is skipped, θ is
    restored bit for bit and every state tensor (the base optimizer's, for a wrapper) keeps
    its bits; the step after it is taken."""
    calls = []

    def poison_second_gradient():
        calls.append(1)
        if len(calls) == 4:
            params[3].grad[123] += float("nan")

    closure = closure_for(opt, params, poison_second_gradient)
    opt.step(closure)
    state_of_opt = opt.state
    theta = [p.detach().clone() for p in params]
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in state_of_opt[p].items()
             if isinstance(v, torch.Tensor)}
    opt.step(closure)
    assert len(calls) == 4 and bool(opt.last_step_skipped)
    for p, t in zip(params, theta):
        assert torch.equal(p, t), "theta must be restored bit for bit"
    for (i, k), v in state.items():
        assert torch.equal(state_of_opt[params[i]][k], v), (i, k)
    opt.step(closure)  # and the next step is taken
    assert not bool(opt.last_step_skipped) and not torch.equal(params[0], theta[0])
