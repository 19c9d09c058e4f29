"""Bad input and faults (docs/design.md §2): a clear error or a visible skip, and nothing lost."""
import copy

import pytest
import torch

import gr_fused
from gr_fused import backends

# every backend that can run here (the kernels run through the Triton interpreter and the
# host build of csrc/ on a CPU machine)
BACKENDS = [n for n in ("torch", "triton", "cpu")
            if backends.unavailable_reason(n, "cpu") is None]


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.randn(16, 4), torch.randn(16, 1)


def mse_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))


@pytest.mark.parametrize("kwargs,name", [
    (dict(gamma=-0.1), "gamma"), (dict(gamma=float("nan")), "gamma"),
    (dict(gamma=0.1, rho=0.0), "rho"), (dict(rho=float("inf")), "rho"),
    (dict(gamma=0.0, alpha=0.0), "alpha"), (dict(gamma=0.1, alpha=0.5), "gamma"),
    (dict(difference="backward"), "difference"), (dict(normalize=1), "normalize"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(lr=-1.0), "learning rate"),
    (dict(momentum=-0.5), "momentum"), (dict(backend="nope"), "backend"),
    (dict(nesterov=True), "(?i)nesterov"),  # torch's own message
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    model, _, _ = model_and_data()
    kw = dict(lr=0.1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        gr_fused.GRSGD(model.parameters(), **kw)


def test_invalid_hyperparameter_in_added_group_raises():
    model, _, _ = model_and_data()
    opt = gr_fused.GRSGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": list(model.parameters())[2:], "rho": 0.0})


def test_adamw_rejects_amsgrad_and_bad_betas():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="beta"):
        gr_fused.GRAdamW(model.parameters(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="eps"):
        gr_fused.GRAdamW(model.parameters(), eps=-1)


def test_mixing_gr_on_and_off_groups_is_an_error():
    model, x, y = model_and_data()
    ps = list(model.parameters())
    opt = gr_fused.GRSGD([{"params": ps[:2]}, {"params": ps[2:], "gamma": 0.0}], lr=0.1, gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        opt.step(lambda: None)


def test_unavailable_backend_says_why():
    class Never(backends.Backend):
        name = "never"

        @classmethod
        def unavailable_reason(cls, device):
            return "it needs a quantum computer"

    import sys
    sys.modules[__name__].Never = Never
    backends.register("never", f"{__name__}:Never")
    model, x, y = model_and_data()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, backend="never")
    with pytest.raises(backends.BackendUnavailable, match="quantum"):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y).backward())


def test_auto_backend_reports_its_choice():
    model, x, y = model_and_data()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1)
    assert set(opt.backends.values()) <= set(backends.names())


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    model, x, y = model_and_data()
    unused = torch.nn.Parameter(torch.randn(3))
    before = unused.detach().clone()
    opt = gr_fused.GRSGD([*model.parameters(), unused], lr=0.1, momentum=0.9,
                         weight_decay=0.1, gamma=0.05, backend=backend)

    closure = mse_closure(opt, model, x, y)

    opt.step(closure)
    assert torch.equal(unused, before) and unused not in opt.state


def test_sparse_grads_raise_and_leave_weights_intact():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = gr_fused.GRSGD(emb.parameters(), lr=0.1, gamma=0.05)

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure)
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_closure_raising_in_perturbed_pass_restores_weights_exactly(backend, difference):
    model, x, y = model_and_data()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.05,
                         difference=difference, backend=backend)
    calls = {"n": 0, "fail_at": None}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt("user pressed ctrl-c")
        return loss

    opt.step(closure)  # creates momentum
    n_per_step = calls["n"]
    theta = snapshot(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for fail_offset in range(2, n_per_step + 1):  # every perturbed pass
        calls["fail_at"] = calls["n"] + fail_offset
        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
        assert same(model, theta)
        assert all(torch.equal(opt.state[p]["momentum_buffer"], m)
                   for p, m in zip(model.parameters(), momentum))
    calls["fail_at"] = None
    opt.step(closure)  # the optimizer is usable afterwards
    assert not same(model, theta)


def _poison_hook(when):
    """A tensor hook that turns the gradient of the n-th backward into NaN/inf."""
    state = {"n": 0}

    def hook(grad):
        state["n"] += 1
        if state["n"] == when:
            return torch.full_like(grad, float("inf") if when % 2 else float("nan"))
        return grad
    return hook


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned_pass", [1, 2])
def test_nonfinite_gradient_skips_step_visibly_with_weights_at_theta(backend, poisoned_pass):
    model, x, y = model_and_data()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.05, backend=backend)

    closure = mse_closure(opt, model, x, y)

    opt.step(closure)
    theta = snapshot(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    handle = model[0].weight.register_hook(_poison_hook(poisoned_pass))
    opt.step(closure)
    handle.remove()
    assert same(model, theta)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m)
               for p, m in zip(model.parameters(), momentum))
    assert bool(opt.last_step_skipped) and int(opt.skipped_steps) == 1
    opt.step(closure)
    assert not bool(opt.last_step_skipped) and int(opt.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [gr_fused.GRSGD, gr_fused.GRAdamW])
def test_zero_gradient_gives_no_nan(backend, cls):
    model, x, y = model_and_data()
    opt = cls(model.parameters(), lr=0.1, weight_decay=0.1, gamma=0.05, backend=backend)
    theta = snapshot(model)

    def closure():
        opt.zero_grad()
        loss = 0.0 * model(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not bool(opt.last_step_skipped)
    # weight decay still applies: θ ← θ·(1 − lr·wd) for both SGD and AdamW here
    for p, t in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach(), t * (1 - 0.1 * 0.1))


@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_running_stats_not_updated_by_perturbed_pass(freeze):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    twin = copy.deepcopy(model)
    twin(x)  # one forward at θ: what the running stats should be after one GR step
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05, freeze_bn_stats=freeze)

    closure = mse_closure(opt, model, x, y)

    opt.step(closure)
    bn, bn_twin = model[1], twin[1]
    assert bn.track_running_stats  # switched back after the step
    if freeze:
        assert int(bn.num_batches_tracked) == 1
        assert torch.equal(bn.running_mean, bn_twin.running_mean)
        assert torch.equal(bn.running_var, bn_twin.running_var)
    else:
        assert int(bn.num_batches_tracked) == 2


def test_lr_scheduler_drives_the_learning_rate():
    model, x, y = model_and_data()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)

    closure = mse_closure(opt, model, x, y)

    opt.step(closure)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    theta = snapshot(model)
    opt.step(closure)
    assert same(model, theta)  # lr 0: no move, and θ restored exactly after the ascent


def test_manual_first_second_step_equals_step_with_closure():
    m1, x, y = model_and_data()
    m2 = copy.deepcopy(m1)
    o1 = gr_fused.GRSGD(m1.parameters(), lr=0.1, momentum=0.9, gamma=0.05, difference="central")
    o2 = gr_fused.GRSGD(m2.parameters(), lr=0.1, momentum=0.9, gamma=0.05, difference="central")
    for _ in range(3):
        o1.step(mse_closure(o1, m1, x, y))
        torch.nn.functional.mse_loss(m2(x), y).backward()
        o2.first_step()
        torch.nn.functional.mse_loss(m2(x), y).backward()
        o2.reflect_step()
        torch.nn.functional.mse_loss(m2(x), y).backward()
        o2.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_misordered_manual_calls_raise_and_restore():
    model, x, y = model_and_data()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05, difference="central")
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    theta = snapshot(model)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="reflect_step"):
        opt.second_step()
    assert same(model, theta)


def test_model_zero_grad_inside_closure_is_handled():
    """model.zero_grad() sets grads to None, so backward allocates fresh ones; the optimizer
    adds them onto the buffer that carries the first gradient."""
    m1, x, y = model_and_data()
    m2 = copy.deepcopy(m1)
    o1 = gr_fused.GRSGD(m1.parameters(), lr=0.1, gamma=0.05, backend="torch")
    o2 = gr_fused.GRSGD(m2.parameters(), lr=0.1, gamma=0.05, backend="torch")
    for model, opt, zero in ((m1, o1, lambda: o1.zero_grad()), (m2, o2, lambda: m2.zero_grad())):
        def closure(model=model, zero=zero):
            zero()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        for _ in range(2):
            opt.step(closure)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_in_the_middle_of_a_gr_step_is_refused():
    model, x, y = model_and_data()
    for opt in (gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05),
                gr_fused.SAM(model.parameters(), torch.optim.SGD, lr=0.1)):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.first_step()
        with pytest.raises(RuntimeError, match="perturbed"):
            opt.state_dict()
        opt.abort_step()
        opt.state_dict()
        opt.zero_grad()
