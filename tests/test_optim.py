"""The optimizers against the independent float64 reference (tests/reference.py), against
torch.optim when GR is off, against SAM, and against exact DB-GR as ε → 0 (docs/design.md §1, §5)."""
import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gr_fused
import reference as ref
from equality import gr_step

X = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def mlp_loss(groups):
    w1, b1, w2, b2 = [t for g in groups for t in g]
    return ((torch.tanh(X @ w1.T + b1) @ w2.T + b2 - Y) ** 2).mean()


def mlp_params(dtype=torch.float64):
    return [torch.randn(6, 4, dtype=dtype) * 0.7, torch.randn(6, dtype=dtype) * 0.1,
            torch.randn(1, 6, dtype=dtype) * 0.7, torch.zeros(1, dtype=dtype)]


GR_KEYS = ("gamma", "rho", "normalize", "difference", "alpha", "adaptive", "max_grad_norm")
GR_DEFAULT = dict(gamma=0.05, rho=0.05, normalize=True, difference="forward", alpha=None,
                  adaptive=False, max_grad_norm=None)


def _train(opt, params, steps):
    def closure():
        opt.zero_grad()
        loss = mlp_loss([params])
        loss.backward()
        return loss
    for _ in range(steps):
        gr_step(opt, closure)


def run_ours(cls, init, split, group_hp, steps, **common):
    """Run ``cls`` (torch backend) on the MLP loss with params split into groups."""
    params = [t.clone().requires_grad_() for t in init]
    groups = [dict(params=params[a:b], **hp) for (a, b), hp in zip(split, group_hp)]
    opt = cls(groups, backend="torch", **common)
    _train(opt, params, steps)
    return params, opt


def reference_hp(common, group_hp):
    hp = dict(GR_DEFAULT)
    hp.update(common)
    hp.update(group_hp)
    return hp


SGD_CASES = {
    "forward-normalized-momentum-wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2, gamma=0.05, rho=0.1),
    "backward-difference": dict(lr=0.1, momentum=0.9, gamma=0.05, rho=-0.1),
    "central-difference": dict(lr=0.1, momentum=0.5, gamma=0.05, rho=0.1, difference="central"),
    "unnormalized": dict(lr=0.1, gamma=0.05, rho=0.02, normalize=False),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, gamma=0.05, rho=0.1),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.5, gamma=0.05, rho=0.1),
    "sam-alpha-1": dict(lr=0.1, momentum=0.9, gamma=0.0, alpha=1.0, rho=0.05),
    "gnp-alpha": dict(lr=0.1, gamma=0.0, alpha=0.4, rho=0.05),
    "adaptive": dict(lr=0.1, gamma=0.05, rho=0.1, adaptive=True),
    "clipped": dict(lr=0.1, momentum=0.9, gamma=0.05, rho=0.1, max_grad_norm=0.05),
}


@pytest.mark.parametrize("name", list(SGD_CASES))
def test_grsgd_matches_float64_reference(name):
    kw = SGD_CASES[name]
    init = mlp_params()
    # two groups with their own learning rate and ascent step; the norm is global
    group_hp = [{}, dict(lr=kw["lr"] / 2, rho=kw["rho"] * 1.5)]
    ours, _ = run_ours(gr_fused.GRSGD, init, [(0, 2), (2, 4)], group_hp, 5, **kw)
    hps = [reference_hp(kw, g) for g in group_hp]
    want = ref.run_reference(mlp_loss, [init[:2], init[2:]], hps, 5, "sgd")
    for got, exp in zip(ours, [t for g in want for t in g]):
        torch.testing.assert_close(got.detach(), exp, rtol=1e-12, atol=1e-13)
        assert (got.detach() - exp).norm() / exp.norm().clamp_min(1e-300) <= 1e-12


@pytest.mark.parametrize("difference,rho", [("forward", 0.1), ("forward", -0.1), ("central", 0.1)])
def test_gradamw_matches_float64_reference(difference, rho):
    kw = dict(lr=1e-2, weight_decay=0.1, gamma=0.05, rho=rho, difference=difference)
    init = mlp_params()
    group_hp = [{}, dict(lr=5e-3, betas=(0.8, 0.99))]
    ours, _ = run_ours(gr_fused.GRAdamW, init, [(0, 2), (2, 4)], group_hp, 5, **kw)
    hps = [reference_hp(kw, g) for g in group_hp]
    want = ref.run_reference(mlp_loss, [init[:2], init[2:]], hps, 5, "adamw")
    for got, exp in zip(ours, [t for g in want for t in g]):
        assert (got.detach() - exp).norm() / exp.norm() <= 1e-12


def _torch_vs_ours(torch_cls, our_cls, kw, steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    theirs = torch_cls(model.parameters(), **kw)
    ours = our_cls(twin.parameters(), gamma=0.0, backend="torch", **kw)
    calls = {"n": 0}
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    for _ in range(steps):
        for m, opt in ((model, theirs), (twin, ours)):
            def closure(m=m, opt=opt):
                calls["n"] += opt is ours
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert calls["n"] == steps  # one gradient per step when GR is off
    return theirs, ours


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
                                dict(lr=0.1, momentum=0.9, nesterov=True),
                                dict(lr=0.1, momentum=0.9, dampening=0.2)])
def test_gamma_zero_is_torch_sgd_bitwise(kw):
    theirs, ours = _torch_vs_ours(torch.optim.SGD, gr_fused.GRSGD, kw)
    for p_t, p_o in zip(theirs.param_groups[0]["params"], ours.param_groups[0]["params"]):
        if kw.get("momentum"):
            assert torch.equal(theirs.state[p_t]["momentum_buffer"], ours.state[p_o]["momentum_buffer"])


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, eps=1e-6)])
def test_gamma_zero_is_torch_adamw_bitwise(kw):
    theirs, ours = _torch_vs_ours(torch.optim.AdamW, gr_fused.GRAdamW, kw)
    for p_t, p_o in zip(theirs.param_groups[0]["params"], ours.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(theirs.state[p_t][key], ours.state[p_o][key])
        assert float(theirs.state[p_t]["step"]) == float(ours.state[p_o]["step"])


def test_gamma_zero_gr_wrapper_is_base_optimizer_bitwise():
    _torch_vs_ours(torch.optim.Adam, lambda p, gamma, backend, **kw: gr_fused.GR(
        p, torch.optim.Adam, gamma=gamma, backend=backend, **kw), dict(lr=1e-2))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_preset_follows_the_sam_trajectory(adaptive):
    init = mlp_params()
    params = [t.clone().requires_grad_() for t in init]
    opt = gr_fused.SAM(params, torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1,
                       momentum=0.9, backend="torch")
    for _ in range(5):
        # the popular implementation's documented loop: first_step / second_step
        mlp_loss([params]).backward()
        opt.first_step(zero_grad=True)
        mlp_loss([params]).backward()
        opt.second_step(zero_grad=True)
    want = ref.sam_reference(mlp_loss, [init], 0.05, 0.1, 0.9, 5, adaptive=adaptive)[0]
    for got, exp in zip(params, want):
        assert (got.detach() - exp).norm() / exp.norm() <= 1e-12


def test_sam_step_takes_the_existing_gradients_and_calls_the_closure_once():
    """SAM.step(closure) is the popular implementation's: the gradients of the user's own
    backward are g1, the closure runs once at the perturbed point, and the result equals the
    hand-written first_step/second_step loop and the float64 SAM reference."""
    init = mlp_params()
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    opt_a = gr_fused.SAM(a, torch.optim.SGD, rho=0.05, lr=0.1, backend="torch")
    opt_b = gr_fused.SAM(b, torch.optim.SGD, rho=0.05, lr=0.1, backend="torch")
    calls = []

    def closure():
        calls.append(1)
        loss = mlp_loss([a])
        loss.backward()
        return loss

    for _ in range(3):
        mlp_loss([a]).backward()
        opt_a.step(closure)
        opt_a.zero_grad()
        mlp_loss([b]).backward()
        opt_b.first_step(zero_grad=True)
        mlp_loss([b]).backward()
        opt_b.second_step(zero_grad=True)
    assert len(calls) == 3
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="loss.backward"):
        opt_a.step(closure)  # no gradient computed yet: a clear error, nothing moved
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _combined_gradient(difference, rho, gamma=0.05):
    """g of one GR step at θ0: GRSGD with lr=1 and no momentum moves θ by exactly −g."""
    init = mlp_params()
    params = [t.clone().requires_grad_() for t in init]
    opt = gr_fused.GRSGD(params, lr=1.0, gamma=gamma, rho=rho, normalize=False,
                         difference=difference, backend="torch")

    def closure():
        opt.zero_grad()
        loss = mlp_loss([params])
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([(t - p.detach()).flatten() for t, p in zip(init, params)])


def _db_gradient(gamma=0.05):
    params = [t.clone().requires_grad_() for t in mlp_params()]
    gr_fused.db_gr_backward(mlp_loss([params]), params, gamma)
    return torch.cat([p.grad.flatten() for p in params])


def test_db_gr_matches_analytic_gradient_of_the_penalty():
    """DB-GR against a float64 finite difference of L + γ/2‖∇L‖² itself."""
    torch.manual_seed(0)  # fix mlp_params so the reference below matches
    init = mlp_params()
    gamma = 0.3

    def regularized(flat):
        parts, i = [], 0
        for t in init:
            parts.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        leaves = [p.detach().requires_grad_() for p in parts]
        g = torch.autograd.grad(mlp_loss([leaves]), leaves)
        return float(mlp_loss([parts]) + gamma / 2 * sum((x * x).sum() for x in g))

    params = [t.clone().requires_grad_() for t in init]
    gr_fused.db_gr_backward(mlp_loss([params]), params, gamma)
    got = torch.cat([p.grad.flatten() for p in params])
    flat = torch.cat([t.flatten() for t in init])
    h = 1e-6
    for i in torch.randperm(flat.numel())[:8].tolist():
        e = torch.zeros_like(flat)
        e[i] = h
        numeric = (regularized(flat + e) - regularized(flat - e)) / (2 * h)
        assert abs(numeric - float(got[i])) <= 1e-6 * max(1.0, abs(numeric))


@pytest.mark.parametrize("difference,sign,order", [("forward", 1, 1), ("forward", -1, 1), ("central", 1, 2)])
def test_fd_converges_to_db_at_the_right_order(difference, sign, order):
    torch.manual_seed(0)
    exact = _db_gradient()
    errs = []
    for eps in (4e-2, 2e-2, 1e-2):
        torch.manual_seed(0)
        errs.append(float((_combined_gradient(difference, sign * eps) - exact).norm()))
    rates = [errs[i] / errs[i + 1] for i in range(2)]
    for r in rates:  # halving ε divides the error by 2**order
        assert abs(r - 2 ** order) < 0.25 * 2 ** order, (errs, rates)


@pytest.mark.parametrize("make", [
    lambda p: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend="torch"),
    lambda p: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend="torch"),
    lambda p: gr_fused.GR(p, torch.optim.Adam, gamma=0.05, lr=1e-2, backend="torch"),
    lambda p: gr_fused.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="torch"),
])
def test_state_dict_resume_is_bitwise(make):
    init = mlp_params()
    run = [t.clone().requires_grad_() for t in init]
    opt = make(run)
    _train(opt, run, 3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in run], "opt": opt.state_dict()}, buf)
    _train(opt, run, 3)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = [t.clone().requires_grad_() for t in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, resumed, 3)
    for a, b in zip(run, resumed):
        assert torch.equal(a, b)


def test_state_dict_holds_no_perturbation_buffers():
    params = [t.clone().requires_grad_() for t in mlp_params()]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="torch")
    _train(opt, params, 2)
    for param_state in opt.state_dict()["state"].values():
        assert set(param_state) == {"momentum_buffer"}


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=4),
       gamma=st.floats(1e-3, 0.2), rho=st.floats(0.01, 0.2), backward=st.booleans(),
       normalize=st.booleans(), momentum=st.sampled_from([0.0, 0.9]),
       difference=st.sampled_from(["forward", "central"]))
def test_hypothesis_shapes_and_hyperparameters(shapes, gamma, rho, backward, normalize,
                                                momentum, difference):
    gen = torch.Generator().manual_seed(len(shapes))
    init = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
    coef = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]

    def loss_fn(groups):
        return sum((c * torch.sin(t) + 0.3 * t * t).sum() for c, t in zip(coef, groups[0]))

    rho = -rho if backward else rho
    params = [t.clone().requires_grad_() for t in init]
    kw = dict(lr=0.05, momentum=momentum, gamma=gamma, rho=rho, normalize=normalize,
              difference=difference)
    opt = gr_fused.GRSGD(params, backend="torch", **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn([params])
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    want = ref.run_reference(loss_fn, [init], [reference_hp(kw, {})], 3, "sgd")[0]
    got = torch.cat([p.detach().flatten() for p in params])
    exp = torch.cat([t.flatten() for t in want])
    assert (got - exp).norm() / exp.norm() <= 1e-11


def test_sam_with_rho_zero_is_the_base_optimizer_bitwise():
    init = mlp_params()
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    sam = gr_fused.SAM(a, torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, backend="torch")
    sgd = torch.optim.SGD(b, lr=0.1, momentum=0.9)
    for _ in range(4):
        mlp_loss([a]).backward()
        sam.first_step(zero_grad=True)
        mlp_loss([a]).backward()
        sam.second_step(zero_grad=True)
        sgd.zero_grad()
        mlp_loss([b]).backward()
        sgd.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
