"""interval=k: the second gradient every k-th step, a cached direction in between.

Against the independent float64 reference (tests/reference.py, written from the rule in
docs/paper.md), on every backend against the torch backend, closure calls, resume in the
middle of a cycle, a skipped refresh, and the hand-written loop."""
import io

import pytest
import torch
import torch.nn.functional as F

import gr_fused
from gr_fused import backends
import reference as ref
from equality import assert_close, gr_step
from test_optim import mlp_loss, mlp_params, reference_hp, run_ours

BACKENDS = ["torch", "cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = backends.unavailable_reason(request.param, "cpu")
    if why is not None:
        pytest.skip(f"backend {request.param!r} cannot run here: {why}")
    return request.param


@pytest.mark.parametrize("cls,algo,kw", [
    (gr_fused.GRSGD, "sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2, gamma=0.05, rho=0.1)),
    (gr_fused.GRSGD, "sgd", dict(lr=0.1, momentum=0.9, gamma=0.05, rho=0.1, max_grad_norm=0.3)),
    (gr_fused.GRSGD, "sgd", dict(lr=0.1, gamma=0.05, rho=0.1, difference="central")),
    (gr_fused.GRAdamW, "adamw", dict(lr=1e-2, weight_decay=0.1, gamma=0.05, rho=0.1)),
], ids=["sgd", "sgd-clipped", "sgd-central", "adamw"])
@pytest.mark.parametrize("k", [1, 3])
def test_matches_the_float64_reference(cls, algo, kw, k):
    init = mlp_params()
    group_hp = [{}, dict(lr=kw["lr"] / 2, rho=kw["rho"] * 1.5, reuse_scale=0.4)]
    ours, _ = run_ours(cls, init, [(0, 2), (2, 4)], group_hp, 8, interval=k, **kw)
    hps = [reference_hp(kw, g) for g in group_hp]
    want = ref.run_reference(mlp_loss, [init[:2], init[2:]], hps, 8, algo, interval=k)
    got = torch.cat([t.detach().flatten() for t in ours])
    exp = torch.cat([t.flatten() for g in want for t in g])
    assert (got - exp).norm() / exp.norm() <= 1e-12


def test_interval_one_is_the_full_step_bit_for_bit():
    init = mlp_params()
    a, _ = run_ours(gr_fused.GRSGD, init, [(0, 4)], [{}], 4, lr=0.1, momentum=0.9)
    b, _ = run_ours(gr_fused.GRSGD, init, [(0, 4)], [{}], 4, lr=0.1, momentum=0.9, interval=1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("make", [
    lambda ps, k: gr_fused.GRSGD(ps, lr=0.05, momentum=0.9, gamma=0.05, interval=k),
    lambda ps, k: gr_fused.GRSGD(ps, lr=0.05, gamma=0.05, difference="central", interval=k),
    lambda ps, k: gr_fused.GR(ps, torch.optim.Adam, lr=1e-2, gamma=0.05, interval=k),
    lambda ps, k: gr_fused.GNP(ps, torch.optim.SGD, rho=0.05, lam=0.02, lr=0.05, interval=k),
    lambda ps, k: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.05, interval=k),
], ids=["GRSGD", "GRSGD-central", "GR(Adam)", "GNP", "SAM"])
@pytest.mark.parametrize("k", [2, 5])
def test_the_closure_runs_once_per_step_plus_once_per_refresh(make, k):
    """10 steps: every step computes g1 once, and each of the 10/k refreshes adds the
    perturbed pass(es)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = make(model.parameters(), k)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(10):
        gr_step(opt, closure)
    passes = 2 if opt.param_groups[0].get("difference") == "central" else 1
    assert len(calls) == 10 + passes * (10 // k)


_g = torch.Generator().manual_seed(1)
DATA = (torch.randn(16, 5, generator=_g), torch.randn(16, 3, generator=_g))


def _step_on_data(model, opt):
    """One gr_step of ``opt`` with a torch-style closure: MSE of ``model`` on DATA."""
    x, y = DATA

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    gr_step(opt, closure)


def _run(backend, k=3, steps=8, save_at=None, make=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    make = make or (lambda ps, b: gr_fused.GRSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2,
                                                 gamma=0.05, rho=0.1, interval=k, backend=b))
    opt = make(model.parameters(), backend)
    saved = None
    for step in range(steps):
        if step == save_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            saved = buf.getvalue()
        _step_on_data(model, opt)
    return model, opt, saved


@pytest.mark.parametrize("algo", ["sgd", "adamw", "sam"])
def test_every_backend_matches_the_torch_backend(backend, algo):
    make = {"sgd": None,
            "adamw": lambda ps, b: gr_fused.GRAdamW(ps, lr=1e-2, gamma=0.05, interval=3, backend=b),
            "sam": lambda ps, b: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.05,
                                              momentum=0.9, interval=3, backend=b)}[algo]
    got, _, _ = _run(backend, make=make)
    want, _, _ = _run("torch", make=make)
    for a, b in zip(got.parameters(), want.parameters()):
        assert_close(a, b, 1e-6, f"{backend} vs torch")


@pytest.mark.parametrize("make", [
    None,
    lambda ps, b: gr_fused.SAM(ps, torch.optim.Adam, rho=0.05, lr=1e-2, interval=3, backend=b),
], ids=["GRSGD", "SAM(Adam)"])
def test_resume_in_the_middle_of_a_cycle_is_bit_for_bit(backend, make):
    """Saved after step 4 of 8 with interval=3 (a step that reuses the cache), loaded into a
    fresh model and optimizer: the same weights as the uninterrupted run."""
    full, _, saved = _run(backend, save_at=4, make=make)
    ckpt = torch.load(io.BytesIO(saved))
    torch.manual_seed(0)
    model, opt, _ = _run(backend, steps=0, make=make)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt._gr_steps == 4 and not opt.refresh_due
    for _ in range(4):
        _step_on_data(model, opt)
    for a, b in zip(model.parameters(), full.parameters()):
        assert torch.equal(a, b)


def test_a_direction_of_another_memory_layout_is_followed_not_misread(backend):
    """A cached direction whose memory layout differs from its parameter's (a checkpoint
    written elsewhere may bring one): that tensor takes the per-tensor path with one
    warning, and the steps equal the torch backend's."""
    def run(b):
        model, opt, _ = _run(b, steps=4)  # step 4 reuses the cache
        w = model[0].weight
        d = opt.state[w]["gr_direction"]
        opt.state[w]["gr_direction"] = d.t().contiguous().t()  # same values, transposed memory
        with pytest.warns(UserWarning, match="gr_direction") if b != "torch" else _quiet():
            for _ in range(4):
                _step_on_data(model, opt)
        return model
    got, want = run(backend), run("torch")
    for a, b in zip(got.parameters(), want.parameters()):
        assert_close(a, b, 1e-6, f"{backend} vs torch")


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_skipped_refresh_leaves_the_steps_until_the_next_one_on_g1(backend):
    """An inf in the refresh's second gradient: the step is skipped and the cached direction
    is gone, so the steps up to the next refresh are plain SGD steps on g1."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20))
    opt = gr_fused.GRSGD([p], lr=0.1, gamma=0.05, rho=0.1, interval=3, backend=backend)
    calls = []

    def closure(poison=False):
        calls.append(1)
        opt.zero_grad()
        loss = (p.sin() * p).sum()
        loss.backward()
        if poison:
            p.grad[3] = float("inf")
        return loss

    for _ in range(3):
        opt.step(closure)
    before = p.detach().clone()
    opt.step(lambda: closure(poison=len(calls) == 5))  # step 3 refreshes; its g2 has an inf
    assert bool(opt.last_step_skipped) and torch.equal(p.detach(), before)
    assert float(opt._gr_valid) == 0.0
    with torch.enable_grad():
        g1 = torch.autograd.grad((p.sin() * p).sum(), p)[0]
    opt.step(closure)  # a reuse step without a direction: SGD on g1
    assert_close(p.detach(), before - 0.1 * g1, 1e-6, "plain step on g1")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_refresh_skipped_for_a_non_finite_first_gradient_leaves_no_trace(backend, bad):
    """An inf/NaN in g1 at a refresh: skipped, and the saved g1 must not reach the weights
    through the direction at the next step (which takes g = g1: no direction is cached)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20))
    opt = gr_fused.GRSGD([p], lr=0.1, gamma=0.05, rho=0.1, interval=3, backend=backend)
    calls = []

    def closure(poison=False):
        calls.append(1)
        opt.zero_grad()
        loss = (p.sin() * p).sum()
        loss.backward()
        if poison:
            p.grad[5] = bad
        return loss

    for _ in range(3):
        opt.step(closure)
    before = p.detach().clone()
    opt.step(lambda: closure(poison=len(calls) == 4))  # the refresh's g1 has an inf/NaN
    assert bool(opt.last_step_skipped) and torch.equal(p.detach(), before)
    with torch.enable_grad():
        g1 = torch.autograd.grad((p.sin() * p).sum(), p)[0]
    opt.step(closure)
    assert torch.isfinite(p).all()
    assert_close(p.detach(), before - 0.1 * g1, 1e-6, "plain step on g1")
    assert all(torch.isfinite(st["gr_direction"]).all() for st in opt.state.values())


def test_hand_written_loop_follows_refresh_due(backend):
    """With interval=k, loss.backward(); then first_step/backward/second_step when
    opt.refresh_due, else opt.step(): the same as step(closure)."""
    want, _, _ = _run(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = gr_fused.GRSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2,
                         gamma=0.05, rho=0.1, interval=3, backend=backend)
    x, y = DATA
    for step in range(8):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if opt.refresh_due:
            opt.first_step()
            F.mse_loss(model(x), y).backward()
            opt.second_step()
        else:
            with pytest.raises(RuntimeError, match="refresh_due"):
                opt.first_step()
            opt.step()
    for a, b in zip(model.parameters(), want.parameters()):
        assert torch.equal(a, b)


def test_invalid_intervals_are_refused():
    p = [torch.randn(3, requires_grad=True)]
    for bad in (0, 2.5, True, -1):
        with pytest.raises(ValueError, match="interval"):
            gr_fused.GRSGD(p, lr=0.1, interval=bad)
    opt = gr_fused.GRSGD(p, lr=0.1, interval=2)
    opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "interval": 3})
    with pytest.raises(ValueError, match="one interval"):
        opt.refresh_due


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_direction_is_cached_when_the_gr_gradient_is_parallel_to_g1(backend, dtype):
    """Loss ½‖θ‖² (Hessian I): g2 ∥ g1, so g has no part orthogonal to g1. What the sums
    leave of ‖v‖² is rounding, below eps·‖g‖²: no direction is cached (valid stays 0) and the
    steps between refreshes are SGD on g1, equal to the float64 run. (With a large fold,
    normalize=False and a small α, the rounding used to pass for a direction.)"""
    x0 = torch.randn(100, dtype=torch.float64)
    runs = {}
    for run_dtype, be in ((dtype, backend), (torch.float64, "torch")):
        p = torch.nn.Parameter(x0.to(run_dtype).clone())
        opt = gr_fused.GRSGD([p], lr=0.05, gamma=0.001, rho=0.05, normalize=False, interval=2,
                             backend=be)

        def closure():
            opt.zero_grad()
            loss = 0.5 * (p * p).sum()
            loss.backward()
            return loss
        for _ in range(6):
            opt.step(closure)
            assert float(opt._gr_valid) == 0.0
        runs[(run_dtype, be)] = p.detach().double()
    got, want = runs[(dtype, backend)], runs[(torch.float64, "torch")]
    assert_close(got, want, 1e-6 if dtype == torch.float32 else 1e-12, "vs float64")
