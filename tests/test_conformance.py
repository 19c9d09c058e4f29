"""What torch.optim's own optimizer tests check, for gr_fused's classes: torch's error
messages for torch's arguments, GR off is torch bit for bit on torch's own input sets,
copies, older checkpoints, state_dict hooks, ``maximize``, empty state, the GR wrapper next
to base optimizers whose arguments share GR's names, and a parameter that gets no gradient
at the perturbed point. The inputs come from ``torch.testing._internal.common_optimizers``,
which ships with the wheel (the tests that use them live in PyTorch's repository)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import gr_fused
from gr_fused import backends
from equality import assert_close, gr_step

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

BACKENDS = ["torch", "cpu", "triton"]
OURS = {torch.optim.SGD: gr_fused.GRSGD, torch.optim.AdamW: gr_fused.GRAdamW}
INPUTS = {torch.optim.SGD: (common_optimizers.optim_inputs_func_sgd,
                            common_optimizers.optim_error_inputs_func_sgd),
          torch.optim.AdamW: (common_optimizers.optim_inputs_func_adamw,
                              common_optimizers.optim_error_inputs_func_adamw)}


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = backends.unavailable_reason(request.param, "cpu")
    if why is not None:
        pytest.skip(f"backend {request.param!r} cannot run here: {why}")
    return request.param


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 4, generator=g), torch.randn(10, 2, generator=g)


def loss_closure(model, opt, x, y, sign=1.0):
    def closure():
        opt.zero_grad()
        loss = sign * F.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


# ---------------------------------------------------------------------------- validation
def _error_cases():
    for torch_cls, (_, errors) in INPUTS.items():
        for i, e in enumerate(errors(device="cpu", dtype=torch.float32)):
            yield pytest.param(torch_cls, e, id=f"{torch_cls.__name__}-{i}")


@pytest.mark.parametrize("torch_cls,error", list(_error_cases()))
def test_torch_error_inputs_raise_torch_errors(torch_cls, error):
    """Each of torch's error inputs for SGD/AdamW raises (or warns) the same for
    GRSGD/GRAdamW, with torch's message."""
    inp = error.optimizer_error_input
    params = inp.params
    if params is None:
        params = [torch.randn(3, requires_grad=True)]
    make = OURS[torch_cls]
    if error.error_on != common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        pytest.skip("step-time error inputs of torch's suite are about torch's own kernels")
    if "duplicate parameters" in error.error_regex:
        # torch warns that this will become an error; GR would move a repeated tensor twice
        # and restore it once, so it is refused now (the group is not added)
        with pytest.raises(ValueError, match="appears twice"):
            make(params, **inp.kwargs)
    elif issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            make(params, **inp.kwargs)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            make(params, **inp.kwargs)


def test_our_own_checks_name_the_argument():
    p = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match="learning rate"):
        gr_fused.GRSGD(p, lr=float("nan"))
    with pytest.raises(ValueError, match="amsgrad"):
        gr_fused.GRAdamW(p, amsgrad=True)


# ---------------------------------------------------------------------------- GR off
def _valid_cases():
    for torch_cls, (inputs, _) in INPUTS.items():
        for i, inp in enumerate(inputs(device="cpu")):
            if inp.kwargs.get("amsgrad"):
                continue  # GRAdamW does not take amsgrad (documented)
            yield pytest.param(torch_cls, inp.kwargs, id=f"{torch_cls.__name__}-{inp.desc or i}")


@pytest.mark.parametrize("torch_cls,kwargs", list(_valid_cases()))
def test_gr_off_is_torch_bit_for_bit_on_torch_inputs(torch_cls, kwargs):
    model, twin = make_model(), make_model()
    ours = OURS[torch_cls](model.parameters(), gamma=0.0, **kwargs)
    ref = torch_cls(twin.parameters(), **kwargs)
    x, y = batch()
    for _ in range(4):
        for m, o in ((model, ours), (twin, ref)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert ours.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    for k, st in ref.state_dict()["state"].items():
        assert st.keys() == ours.state_dict()["state"][k].keys()


@pytest.mark.parametrize("torch_cls,kwargs", list(_valid_cases()))
def test_gr_on_with_torch_inputs_matches_the_torch_backend(torch_cls, kwargs, backend):
    def run(name):
        model = make_model()
        opt = OURS[torch_cls](model.parameters(), gamma=0.05, rho=0.05, backend=name, **kwargs)
        x, y = batch()
        for _ in range(3):
            opt.step(loss_closure(model, opt, x, y))
        return [p.detach().clone() for p in model.parameters()]
    for a, b in zip(run(backend), run("torch")):
        assert_close(a, b, 1e-6, f"{torch_cls.__name__}{kwargs}")


# ---------------------------------------------------------------------------- maximize
@pytest.mark.parametrize("make", [
    lambda ps, b, **kw: gr_fused.GRSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2,
                                       backend=b, **kw),
    lambda ps, b, **kw: gr_fused.GRAdamW(ps, lr=1e-2, backend=b, **kw),
    lambda ps, b, **kw: gr_fused.GR(ps, torch.optim.SGD, lr=0.05, momentum=0.9, backend=b,
                                    **kw),
], ids=["GRSGD", "GRAdamW", "GR(SGD)"])
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_maximize_is_gr_on_the_negated_loss(make, difference, backend):
    """maximize=True on L takes exactly the steps of maximize=False on −L: GR regularizes
    the objective that is minimized, −L (whose gradients are the negated ones)."""
    results = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        model = make_model()
        opt = make(model.parameters(), backend, gamma=0.05, rho=0.05, difference=difference,
                   maximize=maximize)
        x, y = batch()
        for _ in range(3):
            opt.step(loss_closure(model, opt, x, y, sign))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_maximize_ascends_the_loss():
    model = make_model()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.05, gamma=0.05, maximize=True)
    x, y = batch()
    first = F.mse_loss(model(x), y).item()
    for _ in range(5):
        opt.step(loss_closure(model, opt, x, y))
    assert F.mse_loss(model(x), y).item() > first


# ---------------------------------------------------------------------------- copies
@pytest.mark.parametrize("make", [
    lambda ps: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, gamma=0.05),
    lambda ps: gr_fused.GRAdamW(ps, lr=1e-2, gamma=0.05),
    lambda ps: gr_fused.GR(ps, torch.optim.Adam, lr=1e-2, gamma=0.05),
    lambda ps: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
], ids=["GRSGD", "GRAdamW", "GR(Adam)", "SAM"])
def test_deepcopy_keeps_every_public_attribute_and_steps_alike(make):
    model = make_model()
    opt = make(model.parameters())
    x, y = batch()
    gr_step(opt, loss_closure(model, opt, x, y))
    model2, opt2 = copy.deepcopy((model, opt))
    attrs = {k for k in vars(opt) if not k.startswith("_")}
    assert attrs == {k for k in vars(opt2) if not k.startswith("_")}
    for k in attrs - {"state", "param_groups", "base_optimizer", "defaults"}:
        a, b = getattr(opt, k), getattr(opt2, k)
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), k
    if hasattr(opt2, "base_optimizer"):
        assert opt2.state is opt2.base_optimizer.state
        assert opt2.param_groups is opt2.base_optimizer.param_groups
    for _ in range(2):
        gr_step(opt, loss_closure(model, opt, x, y))
        gr_step(opt2, loss_closure(model2, opt2, x, y))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_without_torchs_backfilled_flags_loads_and_steps():
    model = make_model()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.05)
    x, y = batch()
    opt.step(loss_closure(model, opt, x, y))
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("foreach", "maximize", "differentiable", "fused"):
            group.pop(key, None)
    fresh = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.05)
    fresh.load_state_dict(sd)
    fresh.step(loss_closure(model, fresh, x, y))
    assert fresh.param_groups[0]["foreach"] is None and fresh.param_groups[0]["maximize"] is False


def test_gradamw_loads_a_step_saved_as_a_number_or_on_the_cpu(backend):
    """An older checkpoint's step is a plain number; torch.optim.AdamW saves it as a CPU
    tensor. Both load (the step moves to the parameter's device as float32) and the run
    continues like torch.optim.AdamW."""
    model, twin = make_model(), make_model()
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x, y = batch()
    for _ in range(2):
        ref.zero_grad()
        F.mse_loss(twin(x), y).backward()
        ref.step()
    model.load_state_dict(twin.state_dict())
    for as_number in (False, True):
        sd = copy.deepcopy(ref.state_dict())
        if as_number:
            for st in sd["state"].values():
                st["step"] = float(st["step"])
        opt = gr_fused.GRAdamW(model.parameters(), lr=1e-2, gamma=0.0, backend=backend)
        opt.load_state_dict(sd)
        for st in opt.state.values():
            assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32
            assert float(st["step"]) == 2.0
    ref.zero_grad()
    F.mse_loss(twin(x), y).backward()
    ref.step()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for group in opt.param_groups:
        group["gamma"] = 0.05
    opt.step(loss_closure(model, opt, x, y))  # and a GR step from the loaded state
    assert all(float(st["step"]) == 4.0 for st in opt.state.values())


def test_loading_a_torch_sgd_checkpoint_keeps_gr_as_the_optimizer_was_built():
    model, twin = make_model(), make_model()
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.0)
    x, y = batch()
    ref.zero_grad()
    F.mse_loss(twin(x), y).backward()
    ref.step()
    model.load_state_dict(twin.state_dict())
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # (a state_dict holds references)
    assert opt.param_groups[0]["gamma"] == 0.0 and not opt.gr_active()
    for m, o in ((model, opt), (twin, ref)):
        o.zero_grad()
        F.mse_loss(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    on = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.02, rho=0.1)
    on.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert on.param_groups[0]["gamma"] == 0.02 and on.param_groups[0]["rho"] == 0.1


# ---------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("make", [
    lambda ps: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9),
    lambda ps: gr_fused.GR(ps, torch.optim.Adam, lr=1e-2),
    lambda ps: gr_fused.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
], ids=["GRSGD", "GR(Adam)", "SAM"])
def test_state_dict_hooks_registered_on_the_optimizer_run(make):
    model = make_model()
    opt = make(model.parameters())
    x, y = batch()
    gr_step(opt, loss_closure(model, opt, x, y))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (calls.append("post"), sd)[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: (calls.append("load-pre"), sd)[1])
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "load-pre", "load-post"]
    assert sd["state"], "the saved state holds the real (base optimizer's) state"


# ---------------------------------------------------------------------------- state
def test_state_is_empty_without_momentum_as_torchs():
    model, twin = make_model(), make_model()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    x, y = batch()
    opt.step(loss_closure(model, opt, x, y))
    ref.zero_grad()
    F.mse_loss(twin(x), y).backward()
    ref.step()
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}


def test_sam_state_is_the_state_a_user_sees_and_saves():
    model = make_model()
    opt = gr_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x, y = batch()
    gr_step(opt, loss_closure(model, opt, x, y))
    p = next(model.parameters())
    assert "momentum_buffer" in opt.state[p]
    assert opt.state is opt.base_optimizer.state
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


# ---------------------------------------------------------------------------- no gradient at θ'
def _branch_run(make, backend, b_at_theta=True):
    """Params a (always used) and b: used at θ only, not at the perturbed point (or, with
    ``b_at_theta=False``, at the perturbed point only)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.full((3,), 0.89))
    opt = make([a, b], backend)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = a.sin().sum()
        if (len(calls) == 1) == b_at_theta:
            loss = loss + (b * b * a[0]).sum()
        loss.backward()
        return loss
    gr_step(opt, closure)
    return a, b, opt


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_a_param_without_a_second_gradient_gets_the_base_step_on_g1(backend, difference):
    """b has a gradient at θ but none at the perturbed point: its curvature term is
    unknown, so it gets SGD's step (momentum, weight decay) on g1 alone."""
    lr, wd = 0.1, 0.05
    a, b, _ = _branch_run(lambda ps, be: gr_fused.GRSGD(
        ps, lr=lr, momentum=0.9, weight_decay=wd, gamma=0.05, rho=0.05,
        difference=difference, backend=be), backend)
    torch.manual_seed(0)
    a0 = torch.randn(5)
    b0 = torch.full((3,), 0.89)
    g1 = 2 * b0 * a0[0]
    want = b0 - lr * (g1 + wd * b0)
    assert_close(b.detach(), want, 1e-6, "b")
    assert torch.isfinite(a).all()


def test_sam_leaves_a_param_without_a_second_gradient_unchanged(backend):
    """SAM keeps no copy of g1 (its grad holds 0·g1 during the step), so such a param is
    restored and not stepped, as the SAM implementations leave a param whose grad is None."""
    a, b, _ = _branch_run(lambda ps, be: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1,
                                                       momentum=0.9, weight_decay=0.05,
                                                       backend=be), backend)
    assert torch.equal(b.detach(), torch.full((3,), 0.89))


# ---------------------------------------------------------------------------- the GR wrapper
def test_sam_around_rmsprop_keeps_rmsprops_alpha():
    """SAM(RMSprop): RMSprop's own alpha stays RMSprop's (GR's α = 1 lives under
    "gr_alpha"); the step equals SAM written out by hand with torch.optim.RMSprop."""
    model, twin = make_model(), make_model()
    opt = gr_fused.SAM(model.parameters(), torch.optim.RMSprop, rho=0.05, lr=1e-2, alpha=0.9)
    ref = torch.optim.RMSprop(twin.parameters(), lr=1e-2, alpha=0.9)
    assert opt.param_groups[0]["alpha"] == 0.9 and opt.param_groups[0]["gr_alpha"] == 1.0
    x, y = batch()
    for _ in range(4):
        gr_step(opt, loss_closure(model, opt, x, y))
        ref.zero_grad()
        F.mse_loss(twin(x), y).backward()
        with torch.no_grad():
            params = list(twin.parameters())
            norm = torch.stack([p.grad.norm() for p in params]).norm()
            saved = [p.clone() for p in params]
            for p in params:
                p.add_(p.grad * (0.05 / (norm + 1e-12)))
        ref.zero_grad()
        F.mse_loss(twin(x), y).backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, 1e-5, "SAM(RMSprop)")
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("base,kwargs,name", [
    (torch.optim.Adadelta, {"rho": 0.8}, "rho"),
    (torch.optim.ASGD, {"alpha": 0.5}, "alpha"),
    (torch.optim.RMSprop, {"alpha": 0.7}, "alpha"),
])
def test_gr_wrapper_keeps_the_base_optimizers_own_arguments(base, kwargs, name):
    model = make_model()
    opt = gr_fused.GR(model.parameters(), base, gamma=0.05, rho=0.05, alpha=None,
                      base_kwargs=kwargs)
    group = opt.param_groups[0]
    assert group[name] == kwargs[name] and group[f"gr_{name}"] != kwargs[name]
    assert opt.base_optimizer.defaults[name] == kwargs[name]
    x, y = batch()
    for _ in range(2):
        opt.step(loss_closure(model, opt, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="given twice"):
        gr_fused.GR(model.parameters(), base, base_kwargs={"lr": 0.1}, lr=0.2)


def test_a_fixed_alpha_needs_no_gamma():
    p = [torch.randn(3, requires_grad=True)]
    opt = gr_fused.GRSGD(p, lr=0.1, alpha=0.7, rho=0.05)
    assert opt.param_groups[0]["gamma"] == 0.0 and opt.param_groups[0]["alpha"] == 0.7
    q = torch.randn(2, requires_grad=True)
    opt.add_param_group({"params": [q], "alpha": 0.5})
    r = torch.randn(2, requires_grad=True)
    gr = gr_fused.GRSGD(p, lr=0.1, gamma=0.05)
    gr.add_param_group({"params": [q, r], "alpha": 0.3})
    assert gr.param_groups[1]["gamma"] == 0.0
    with pytest.raises(ValueError, match="gamma"):
        gr_fused.GRSGD(p, lr=0.1, gamma=0.05, alpha=0.5)


# ---------------------------------------------------------------------------- the wrapper's SGD
# GR, SAM and GNP around a plain torch.optim.SGD: the backend applies SGD's update itself, in
# the pass that restores θ (as GRSGD's), instead of a restore and then SGD's own step. The
# reference is the same optimizer made to take the other path: a step hook on its SGD (the
# wrapper then calls SGD's own step, so the hook runs).
WRAPPED_SGD = {
    "SAM-momentum-wd": lambda ps, be: gr_fused.SAM(
        ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=0.05, backend=be),
    "GR-nesterov": lambda ps, be: gr_fused.GR(
        ps, torch.optim.SGD, gamma=0.05, rho=0.05, lr=0.1, momentum=0.9, nesterov=True,
        backend=be),
    "GR-maximize": lambda ps, be: gr_fused.GR(
        ps, torch.optim.SGD, gamma=0.05, rho=0.05, lr=0.1, momentum=0.5, weight_decay=0.01,
        maximize=True, backend=be),
    "SAM-dampening": lambda ps, be: gr_fused.SAM(
        ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, dampening=0.3, backend=be),
    "GNP-plain-groups": lambda ps, be: gr_fused.GNP(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03, "weight_decay": 0.1}],
        torch.optim.SGD, rho=0.05, lam=0.02, lr=0.1, backend=be),
}


def _own_step_counter(opt):
    """A step hook on the wrapped SGD: the wrapper must then call SGD's own step."""
    calls = []
    handle = opt.base_optimizer.register_step_post_hook(lambda o, a, k: calls.append(1))
    return calls, handle


def _wrapped_sgd_run(make, backend, steps=4, hooked=()):
    """``steps`` GR steps; on the steps in ``hooked`` the wrapped SGD has a step hook."""
    model = make_model()
    opt = make(list(model.parameters()), backend)
    x, y = batch()
    own_steps = []
    for step in range(steps):
        handle = None
        if step in hooked:
            calls, handle = _own_step_counter(opt)
        gr_step(opt, loss_closure(model, opt, x, y))
        if handle is not None:
            own_steps.append(len(calls))
            handle.remove()
    return model, opt, own_steps


@pytest.mark.parametrize("name", list(WRAPPED_SGD))
def test_wrapped_sgd_update_runs_fused_and_equals_sgds_own_step(name, backend, monkeypatch):
    make = WRAPPED_SGD[name]
    hooked, hooked_opt, own_steps = _wrapped_sgd_run(make, backend, hooked=range(4))
    assert own_steps == [1, 1, 1, 1]  # the reference took SGD's own step every time
    # the fused path never calls SGD's step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: pytest.fail("SGD.step ran"))
    fused, fused_opt, _ = _wrapped_sgd_run(make, backend)
    for a, b in zip(fused.parameters(), hooked.parameters()):
        assert_close(a, b, 1e-6, name)
    assert fused_opt.state is fused_opt.base_optimizer.state
    ours, theirs = fused_opt.state_dict()["state"], hooked_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].keys() == theirs[k].keys()
        for key in theirs[k]:
            assert_close(ours[k][key], theirs[k][key], 1e-6, f"{name} state {k}/{key}")


def test_wrapped_sgd_alternating_between_both_paths_keeps_its_state(backend):
    """Steps with and without a hook on the wrapped SGD, in any order, share one state:
    the momentum buffers either path creates are the ones the other continues."""
    make = WRAPPED_SGD["SAM-momentum-wd"]
    hooked, _, _ = _wrapped_sgd_run(make, backend, steps=6, hooked=range(6))
    mixed, _, own_steps = _wrapped_sgd_run(make, backend, steps=6, hooked=(0, 3, 4))
    assert own_steps == [1, 1, 1]
    for a, b in zip(mixed.parameters(), hooked.parameters()):
        assert_close(a, b, 1e-6, "alternating paths")


def test_wrapped_sgd_with_an_lr_scheduler_on_it_takes_its_own_step(recwarn):
    """An LR scheduler attached to the wrapped SGD wraps its step to record that it ran:
    the wrapper then calls that step, so the scheduler sees it (no warning) and the
    schedule applies."""
    model = make_model()
    opt = gr_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    x, y = batch()
    for _ in range(2):
        gr_step(opt, loss_closure(model, opt, x, y))
        sched.step()
    assert getattr(opt.base_optimizer, "_opt_called", False)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_wrapped_sgd_with_an_lr_scheduler_on_the_wrapper_stays_fused(monkeypatch, backend):
    """An LR scheduler attached to SAM itself wraps SAM's step, not SGD's: the update stays
    fused and reads the scheduled lr (0 after one step: θ does not move, and is restored
    exactly after the ascent)."""
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: pytest.fail("SGD.step ran"))
    model = make_model()
    opt = gr_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    x, y = batch()
    gr_step(opt, loss_closure(model, opt, x, y))
    sched.step()
    theta = [p.detach().clone() for p in model.parameters()]
    gr_step(opt, loss_closure(model, opt, x, y))
    assert opt.param_groups[0]["lr"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), theta))


def test_wrapped_sgd_takes_its_own_step_with_interval():
    """interval=k keeps GR's own direction state apart from SGD's."""
    model = make_model()
    opt = gr_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       interval=2)
    calls, _ = _own_step_counter(opt)
    x, y = batch()
    for _ in range(4):
        gr_step(opt, loss_closure(model, opt, x, y))  # (a reuse step runs no closure)
    assert len(calls) == 4


# ---------------------------------------------------------------------------- skipped steps
SKIPPED_FIRST = {
    "GRSGD": lambda ps, be: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, dampening=0.3,
                                           weight_decay=1e-2, gamma=0.05, backend=be),
    "SAM(SGD)": lambda ps, be: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1,
                                            momentum=0.9, dampening=0.3, backend=be),
}


@pytest.mark.parametrize("name", list(SKIPPED_FIRST))
def test_a_skipped_first_step_leaves_no_momentum_buffer(name, backend):
    """A first step skipped for inf/NaN leaves no state, as torch.optim.SGD (with
    GradScaler, which skips its step) does: the next step is a first step (buf = g, not
    (1 − dampening)·g). So a run with a skipped step first equals one without it."""
    make = SKIPPED_FIRST[name]
    x, y = batch()

    def run(skip_first):
        model = make_model()
        opt = make(list(model.parameters()), backend)
        if skip_first:
            gr_step(opt, loss_closure(model, opt, x, y, sign=float("nan")))
            assert bool(opt.last_step_skipped) and opt.state_dict()["state"] == {}
        for _ in range(3):
            gr_step(opt, loss_closure(model, opt, x, y))
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()["state"]

    (got, got_state), (want, want_state) = run(True), run(False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got_state.keys() == want_state.keys()
    for k in want_state:
        assert torch.equal(got_state[k]["momentum_buffer"], want_state[k]["momentum_buffer"])


# ---------------------------------------------------------------------------- found by use
@pytest.mark.parametrize("make", [
    lambda ps, be: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, gamma=0.05, backend=be),
    lambda ps, be: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, backend=be),
    lambda ps, be: gr_fused.GR(ps, torch.optim.Adam, gamma=0.05, lr=0.1, backend=be),
], ids=["GRSGD", "SAM(SGD)", "GR(Adam)"])
def test_a_parameter_listed_twice_is_refused(make, backend):
    """Tied weights passed twice (``[*emb.parameters(), *head.parameters()]``): torch warns
    that this will become an error; GR would move the tensor twice and restore it once, so
    it is refused now, with the weights untouched and no group added."""
    model = make_model()
    tied = list(model.parameters())
    with pytest.raises(ValueError, match="appears twice"):
        make(tied + tied[:1], backend)
    opt = make(tied[1:], backend)
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [tied[0], tied[0]]})
    assert len(opt.param_groups) == 1
    assert torch.equal(tied[0], make_model()[0].weight)


@pytest.mark.parametrize("bad", [dict(gamma=-1.0), dict(rho=0.0), dict(difference="bogus"),
                                 dict(momentum=-0.5)])
def test_a_refused_checkpoint_leaves_the_optimizer_as_it_was(bad, backend):
    """load_state_dict raises on an invalid value and changes nothing (torch's rule for a
    refused load): the next step is the step the optimizer would have taken."""
    model, twin = make_model(), make_model()
    x, y = batch()
    opts = [gr_fused.GRSGD(m.parameters(), lr=0.1, momentum=0.9, gamma=0.05, backend=backend)
            for m in (model, twin)]
    for m, opt in zip((model, twin), opts):
        opt.step(loss_closure(m, opt, x, y))
    sd = opts[0].state_dict()
    sd["param_groups"][0].update(bad)
    sd["state"] = {}
    with pytest.raises(ValueError):
        opts[0].load_state_dict(sd)
    for m, opt in zip((model, twin), opts):
        opt.step(loss_closure(m, opt, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_gradamw_with_gr_off_steps_where_torchs_adamw_steps():
    """gamma=0 is torch.optim.AdamW (capturable=False), also on a device torch's capturable
    AdamW refuses (meta here; Apple MPS likewise)."""
    model = torch.nn.Linear(4, 3, device="meta")
    opt = gr_fused.GRAdamW(model.parameters(), gamma=0.0, backend="torch")
    ref = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ref.step()
    assert opt.state[model.weight]["step"].device.type == "meta"


@pytest.mark.parametrize("base", [torch.optim.LBFGS, torch.optim.SparseAdam])
def test_gr_refuses_base_optimizers_that_cannot_take_its_step(base):
    with pytest.raises(ValueError, match=base.__name__):
        gr_fused.GR(make_model().parameters(), base, lr=0.1)


@pytest.mark.parametrize("make", [
    lambda ps, be: gr_fused.GR(ps, torch.optim.AdamW, gamma=0.05, lr=0.1, backend=be),
    lambda ps, be: gr_fused.GRAdamW(ps, gamma=0.05, lr=0.1, backend=be),
    lambda ps, be: gr_fused.SAM(ps, torch.optim.AdamW, rho=0.05, lr=0.1, backend=be),
    lambda ps, be: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, backend=be),
], ids=["GR(AdamW)", "GRAdamW", "SAM(AdamW)", "SAM(SGD)"])
def test_a_param_with_a_gradient_only_at_the_perturbed_point_is_not_stepped(make, backend):
    """A tensor with no gradient at θ is not part of the step, whether the base update is
    fused or the base optimizer takes its own step; its grad from the perturbed pass stays."""
    _, b, opt = _branch_run(make, backend, b_at_theta=False)
    assert torch.equal(b.detach(), torch.full((3,), 0.89))
    assert b.grad is not None and not opt.state.get(b)


@pytest.mark.parametrize("make", [
    lambda ps, be: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, gamma=0.05, backend=be),
    lambda ps, be: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, backend=be),
], ids=["GRSGD", "SAM(SGD)"])
def test_second_step_is_the_optimizer_step_of_a_hand_written_loop(make, backend, recwarn):
    """first_step()/second_step(): the step hooks run once per GR step, around second_step,
    and an LR scheduler does not warn that it stepped before the optimizer."""
    model = make_model()
    x, y = batch()
    opt = make(model.parameters(), backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for _ in range(2):
        F.mse_loss(model(x), y).backward()
        opt.first_step()
        F.mse_loss(model(x), y).backward()
        opt.second_step()
        sched.step()
    assert calls == ["pre", "post"] * 2
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    calls.clear()
    F.mse_loss(model(x), y).backward()  # SAM.step takes these as g1; GRSGD's closure zeroes
    opt.step(loss_closure(model, opt, x, y))  # step(): torch's wrapper runs them, once
    assert calls == ["pre", "post"]


def test_a_closure_that_does_not_zero_the_grads_is_reported(backend):
    """A closure that adds onto gradients already there (Lightning's automatic optimization
    with accumulate_grad_batches > 1 calls the closure for the last micro-batch only)
    warns: GR's second gradient cannot match such a first gradient. A closure that zeroes,
    in place or by setting to None, does not."""
    model = make_model()
    x, y = batch()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05, backend=backend)

    def accumulating():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    F.mse_loss(model(x), y).backward()  # an earlier micro-batch
    with pytest.warns(UserWarning, match="accumulated onto gradients"):
        opt.step(accumulating)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss_closure(model, opt, x, y))


GR_ON = {
    "GRSGD": lambda ps, be: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, gamma=0.05, backend=be),
    "GRSGD-central": lambda ps, be: gr_fused.GRSGD(ps, lr=0.1, gamma=0.05,
                                                   difference="central", backend=be),
    "GRAdamW": lambda ps, be: gr_fused.GRAdamW(ps, lr=0.01, gamma=0.05, backend=be),
    "GR(Adam)": lambda ps, be: gr_fused.GR(ps, torch.optim.Adam, gamma=0.05, lr=0.01,
                                           backend=be),
    "GNP(SGD)": lambda ps, be: gr_fused.GNP(ps, torch.optim.SGD, rho=0.05, lam=0.02, lr=0.1,
                                            backend=be),
}
IN_PLACE = {
    "model.zero_grad(set_to_none=False)": lambda model: model.zero_grad(set_to_none=False),
    "p.grad.zero_()": lambda model: [p.grad.zero_() for p in model.parameters()
                                     if p.grad is not None],
    "torch.optim.SGD.zero_grad(set_to_none=False)":
        lambda model: torch.optim.SGD(model.parameters()).zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("zero", list(IN_PLACE))
@pytest.mark.parametrize("name", list(GR_ON))
def test_grads_zeroed_in_place_during_a_gr_step_are_refused(name, zero, backend):
    """The grads carry fold·g1 from first_step to second_step: zeroing them in place in the
    closure erases it. That is refused with an error that names the fix, the weights are
    restored, and nothing is stepped; zeroing by setting them to None works."""
    model = make_model()
    x, y = batch()
    opt = GR_ON[name](model.parameters(), backend)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        IN_PLACE[zero](model)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    F.mse_loss(model(x), y).backward()  # grads exist, as after an earlier step
    with pytest.raises(RuntimeError, match="zeroed in place"):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert opt._pending is None and not opt.state.get(model[0].weight)
    twin = make_model()
    ref = GR_ON[name](twin.parameters(), "torch")
    for m, o in ((model, opt), (twin, ref)):
        o.step(loss_closure(m, o, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), 1e-6, "the step after the refused one")


def test_grads_zeroed_in_place_between_first_and_second_step_are_refused(backend):
    model = make_model()
    x, y = batch()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=0.05, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    model.zero_grad(set_to_none=False)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="zeroed in place"):
        opt.second_step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_sam_accepts_grads_zeroed_in_place(backend):
    """SAM's grads hold 0·g1 during the step: zeroing them in place changes nothing, so the
    popular idiom with model.zero_grad(set_to_none=False) steps as with set_to_none."""
    x, y = batch()
    results = []
    for set_to_none in (False, True):
        model = make_model()
        opt = gr_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1,
                           momentum=0.9, backend=backend)
        for _ in range(2):
            F.mse_loss(model(x), y).backward()
            opt.first_step()
            model.zero_grad(set_to_none=set_to_none)
            F.mse_loss(model(x), y).backward()
            opt.second_step()
        results.append([p.detach() for p in model.parameters()])
    for p, q in zip(*results):
        assert_close(p, q, 1e-6, "SAM, in place vs set_to_none")
