"""Shared equality harness: every backend is checked against the torch backend with these
cases (SPEC §4), so the Triton, CUDA, host-C++ and flat-buffer suites share one definition.

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
from gr_fused.backends.base import Bucket

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
        opt.step(closure)
    state = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items() if not hasattr(opt, "base_optimizer") else \
                opt.base_optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                state[(i, k)] = v.detach().clone()
    return [p.detach().clone() for p in params], state, opt


def compare_backends(case: Case, backend: str, reference: str = "torch", device="cpu"):
    """Run ``case`` on both backends from identical inputs; compare all parameters of each
    dtype as one vector (‖a − b‖/‖b‖, SPEC §4), and each state key likewise."""
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


# ------------------------------------------------------------ kernel-level helpers (flat buckets)
def ulp_close(actual, expected, ulps, what):
    """Each element within ``ulps`` units of the dtype's precision (relative to the element,
    or to 1 below 1: the operands here are O(1)); NaN/inf count as a mismatch."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, b = actual.double(), expected.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: non-finite"
    err = (a - b).abs() / b.abs().clamp_min(1.0)
    worst = int(err.argmax())
    eps = torch.finfo(expected.dtype).eps
    assert err[worst] <= ulps * eps, (f"{what}: {float(err[worst] / eps):.2f} ulps at {worst}: "
                                      f"{float(a[worst])!r} vs {float(b[worst])!r}")


def flat_bucket(n, dtype, device, algo="sgd", group=None, state=None, offset=0):
    """A flat bucket (see gr_fused/backends/flat.py) of n random elements; ``offset`` > 0
    makes every buffer start off a 16-byte boundary."""
    def buf():
        return torch.randn(n + offset, device=device).to(dtype)[offset:]
    return Bucket([buf()], [buf()], [state or {}], group or {}, algo, {"backup": [buf()]})


def clone_bucket(b):
    state = {k: v.clone() for k, v in b.states[0].items()}
    return Bucket([b.params[0].clone()], [b.grads[0].clone()], [state], dict(b.group), b.algo,
                  {"backup": [b.extra["backup"][0].clone()]})


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


# ------------------------------------------------------------------ fused step scalars
# Backends that compute the step scalars where they finalize a norm (Triton's finalize
# kernels, csrc's ascent_scalars/update_scalars) are held to gr_fused/_scalars.py here.
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


def check_ascent_scalars(fused, device, dtype, hp, amp):
    """``fused(grad, param_or_None, scale, rho=, gamma=, alpha=, normalize=, central=)``
    returns [eps, fold, combine]; it must match _scalars.ascent_scalars of the same squared
    norm, for gradients from 1e-6 to 1e5, plain and adaptive (ASAM)."""
    scale = torch.tensor(2.0 ** 12, device=device) if amp else None
    gamma = 0.0 if hp["alpha"] else 0.05
    for magnitude in (1e-6, 1.0, 1e5):
        for adaptive in (False, True):
            b = flat_bucket(1000 + int(magnitude) % 7, dtype, device)
            grad, param = b.grads[0].mul_(magnitude), b.params[0] if adaptive else None
            got = fused(grad, param, scale, rho=0.1, gamma=gamma, alpha=hp["alpha"],
                        normalize=hp["normalize"], central=hp["central"])
            sq = exact_sq_norm(grad, param)
            want = _scalars.ascent_scalars(
                sq, None if scale is None else scale.reciprocal(), rho=0.1,
                normalize=hp["normalize"], gamma=gamma, alpha=hp["alpha"],
                difference="central" if hp["central"] else "forward")
            scalars_close(got, torch.stack(want), f"eps/fold/combine at |g|~{magnitude}")


def check_update_scalars(fused, device, dtype, max_grad_norm, amp, poison):
    """``fused(G, combine, scale, max_grad_norm=, skipped_steps=, last_step_skipped=,
    scaler_found_inf=, adam_step=)`` returns [gscale, found_inf] and updates the records: the
    skip count, the last-step flag, the GradScaler's flag and AdamW's step (which advances
    only on a taken step). It must match _scalars.update_scalars."""
    scale = torch.tensor(2.0 ** 12, device=device) if amp else None
    b = flat_bucket(4099, dtype, device)
    grad = b.grads[0]
    if poison is not None:
        grad[1234] = poison
    combine = torch.tensor(-0.37, device=device, dtype=grad.dtype if grad.dtype ==
                           torch.float64 else torch.float32)
    count = torch.tensor(5, dtype=torch.int64, device=device)
    last = torch.empty((), dtype=torch.bool, device=device)
    scaler_flag, adam_step = torch.zeros((), device=device), torch.tensor(9.0, device=device)
    got = fused(grad, combine, scale, max_grad_norm=max_grad_norm, skipped_steps=count,
                last_step_skipped=last, scaler_found_inf=scaler_flag, adam_step=adam_step)
    sq = exact_sq_norm(grad, None)
    (gscale,), found_inf = _scalars.update_scalars(
        [sq], [combine], None if scale is None else scale.reciprocal(), [max_grad_norm])
    skipped = poison is not None
    assert float(found_inf) == float(got[1]) == float(skipped)
    if not skipped:
        scalars_close(got[:1], gscale.reshape(1), "gscale")
    assert int(count) == 5 + skipped and bool(last) == skipped
    assert float(scaler_flag) == float(skipped) and float(adam_step) == 9.0 + (not skipped)


def exact_sq_norm(grad, param):
    """Σ g² (Σ (θ·g)²) in float64, rounded once to the compute dtype: what fused norms give."""
    x = grad.double() if param is None else grad.double() * param.double()
    return x.square().sum().to(torch.float64 if grad.dtype == torch.float64 else torch.float32)


def scalar_group(rho, gamma, alpha, normalize, central):
    """The GR keys of a param group, as the fused ascent reads them."""
    return dict(rho=rho, gamma=gamma, alpha=alpha, normalize=normalize,
                difference="central" if central else "forward")


def check_groups(ascent_rows, update_out, device, max_grad_norm):
    """Three param groups in five flat buffers of three dtypes, through a backend's fused
    stages: ``ascent_rows(inputs, scale, groups)`` (inputs: (grad, param or None) per buffer)
    gives each group's [eps, fold, combine] from the global norm with the group's own
    hyperparameters; ``update_out(grads_by_group, rows, scale, max_grad_norm=,
    skipped_steps=, last_step_skipped=)`` gives each group's gscale from its own norm of G,
    one clip factor over all groups, and found_inf, as the driver's torch-op path does."""
    sizes = [[1000, 7], [4099], [1, 333]]
    dtypes = [[torch.float32, torch.bfloat16], [torch.float32], [torch.float16, torch.float32]]
    grads = [[torch.randn(n, device=device).to(dt) for n, dt in zip(ns, dts)]
             for ns, dts in zip(sizes, dtypes)]
    params = [[torch.randn_like(g) for g in group] for group in grads]
    groups = [scalar_group(0.05, 0.02, None, True, False), scalar_group(0.1, 0.0, 0.6, True, True),
              scalar_group(0.2, 0.03, None, False, False)]
    adaptive = [False, True, False]
    inputs = [(g, p if a else None) for gs, ps, a in zip(grads, params, adaptive)
              for g, p in zip(gs, ps)]
    rows = ascent_rows(inputs, None, groups)
    sq1 = sum(exact_sq_norm(g, p).double() for g, p in inputs).float()
    for row, group in zip(rows, groups):
        want = _scalars.ascent_scalars(sq1, None, rho=group["rho"], normalize=group["normalize"],
                                       gamma=group["gamma"], alpha=group["alpha"],
                                       difference=group["difference"])
        scalars_close(row, torch.stack(want), f"ascent row of {group}")
    count = torch.zeros((), dtype=torch.int64, device=device)
    last = torch.empty((), dtype=torch.bool, device=device)
    out = update_out(grads, rows, None, max_grad_norm=max_grad_norm, skipped_steps=count,
                     last_step_skipped=last)
    sq_by_group = [sum(exact_sq_norm(g, None).double() for g in gs).float() for gs in grads]
    gscales, found_inf = _scalars.update_scalars(sq_by_group, list(rows[:, 2]), None,
                                                 [max_grad_norm] * 3)
    scalars_close(out, torch.stack(gscales + [found_inf]), "gscales, found_inf")
    assert int(count) == 0 and not bool(last)


# ------------------------------------------------------------------ kernel phases vs torch
# Per-phase checks shared by the Triton and csrc suites.
KERNEL_ULPS = {torch.float32: 2, torch.float64: 2, torch.bfloat16: 1, torch.float16: 1}
SGD_GROUPS = {
    "momentum-wd": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False),
    "nesterov": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=0.0, nesterov=False),
    "plain": dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False),
}


def check_update(b, ref, skip, dtype, keys, old_state):
    """A kernel's update of flat bucket ``b`` against the torch backend's of ``ref``: θ and
    the ``keys`` of the state within KERNEL_ULPS (0-dim state exactly); when ``skip``, θ is
    the backup as it was before the update (``ref``'s; on a CPU the host build's backup
    holds the dead θ' afterwards, see cext_backend) and every state buffer in ``old_state``
    kept its bits."""
    ulp_close(b.params[0], ref.params[0], KERNEL_ULPS[dtype], "theta")
    if skip:
        assert torch.equal(b.params[0], ref.extra["backup"][0]), "theta must be the backup"
    assert set(b.states[0]) == set(ref.states[0]) >= set(keys)
    for key in keys:
        got, want = b.states[0][key], ref.states[0][key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if key in old_state and skip:
            assert torch.equal(got, old_state[key]), f"{key} changed in a skipped step"
        elif want.dim() == 0:
            assert torch.equal(got, want), key
        else:
            ulp_close(got, want, KERNEL_ULPS[dtype], key)


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
    state_of = getattr(opt, "base_optimizer", opt).state
    theta = [p.detach().clone() for p in params]
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in state_of[p].items()
             if isinstance(v, torch.Tensor)}
    opt.step(closure)
    assert len(calls) == 4 and bool(opt.last_step_skipped)
    for p, t in zip(params, theta):
        assert torch.equal(p, t), "theta must be restored bit for bit"
    for (i, k), v in state.items():
        assert torch.equal(state_of[params[i]][k], v), (i, k)
    opt.step(closure)  # and the next step is taken
    assert not bool(opt.last_step_skipped) and not torch.equal(params[0], theta[0])
