"""The user's workflows, on every backend that runs here (torch, the host build "cpu", and
the Triton kernels under the interpreter): each must behave as torch.optim behaves.

The parameters, gradients and optimizer state are the user's own tensors: freezing a layer,
``model.zero_grad()``, ``p.data = ...``, ``model.to(...)``, saving a submodule, reloading or
moving a checkpoint, copies, weight tying and channels_last all keep working. Each workflow
is compared with ``backend="torch"`` (and, where one exists, torch.optim itself or a step
written out by hand); where a fused backend and torch disagree, torch is right.
"""
import contextlib
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import gr_fused
from gr_fused import backends
from equality import assert_close

BACKENDS = ["torch", "cpu", "triton"]


def need(backend):
    why = backends.unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {why}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    need(request.param)
    return request.param


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
                               ).to(dtype)


def data(n=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def grsgd(params, backend, **kw):
    kw = dict(dict(lr=0.05, momentum=0.9, weight_decay=1e-2, gamma=0.05, rho=0.05), **kw)
    return gr_fused.GRSGD(params, backend=backend, **kw)


def closure_of(model, opt, x, y, zero="opt"):
    """A GR closure; ``zero``: who zeroes the grads ("opt", "model": model.zero_grad())."""
    def closure():
        (opt if zero == "opt" else model).zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b, what, rtol=1e-6):
    """All tensors of each dtype as one vector, ‖a − b‖/‖b‖ ≤ rtol (the project's measure)."""
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, what
    flat = [(torch.view_as_real(x) if x.is_complex() else x,
             torch.view_as_real(y) if y.is_complex() else y) for x, y in zip(a, b)]
    for dtype in {x.dtype for x, _ in flat}:
        pairs = [(x, y) for x, y in flat if x.dtype == dtype]
        assert_close(torch.cat([x.flatten() for x, _ in pairs]),
                     torch.cat([y.flatten() for _, y in pairs]), rtol, f"{what} ({dtype})")


def saved_and_loaded(obj, weights_only=True):
    """``obj`` through torch.save and torch.load (in memory)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def run_both(workflow, backend, **kw):
    """``workflow(backend)`` -> tensors, for ``backend`` and for the torch backend."""
    return workflow(backend, **kw), workflow("torch", **kw)


# ---------------------------------------------------------------------------- dtypes
def test_mixed_dtypes_match_the_torch_backend_and_repeat_exactly(backend):
    """fp32 params and one fp64 param in one group: the same results every run (the step
    scalars of each dtype stay alive while the kernels read them) and the torch backend's."""
    def run(name):
        torch.manual_seed(0)
        a = torch.randn(40, 3, requires_grad=True)
        b = torch.randn(17, dtype=torch.float64, requires_grad=True)
        c = torch.randn(9, requires_grad=True)
        opt = gr_fused.GRAdamW([a, b, c], lr=1e-2, gamma=0.05, rho=0.05, backend=name)
        for _ in range(4):
            def closure():
                opt.zero_grad()
                loss = (a.sin().sum() + (b ** 2).sum().float() + (c * a[0, 0]).cos().sum())
                loss.backward()
                return loss
            opt.step(closure)
        return [a.detach().clone(), b.detach().clone(), c.detach().clone()]

    first, again, ref = run(backend), run(backend), run("torch")
    for x, y, z in zip(first, again, ref):
        assert torch.equal(x, y), "two identical runs must give identical bits"
        assert_close(x, z, 1e-6 if x.dtype == torch.float32 else 1e-12, "vs torch backend")


# ---------------------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("where", ["closure", "between_steps"])
def test_model_zero_grad_gives_the_same_step_as_optimizer_zero_grad(backend, where):
    """model.zero_grad() (set_to_none) inside the closure, or between first_step and
    second_step as in the SAM idiom, gives exactly the step of opt.zero_grad()."""
    results = []
    for zero in ("opt", "model"):
        model = make_model()
        opt = grsgd(model.parameters(), backend)
        x, y = data()
        for _ in range(3):
            if where == "closure":
                opt.step(closure_of(model, opt, x, y, zero=zero))
            else:
                F.mse_loss(model(x), y).backward()
                opt.first_step(zero_grad=True)
                if zero == "model":
                    model.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.second_step(zero_grad=True)
        results.append(params_of(model))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_zero_grad_sets_grads_to_none_as_torch_does(backend):
    model = make_model()
    opt = grsgd(model.parameters(), backend)
    x, y = data()
    opt.step(closure_of(model, opt, x, y))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step(closure_of(model, opt, x, y))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# ---------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("how", ["requires_grad", "unused_branch"])
def test_a_layer_frozen_mid_training_stops_moving_and_resumes_when_unfrozen(backend, how):
    """A layer frozen mid-training (requires_grad_(False), or a branch that stops receiving
    gradients) is not touched at all: no weight decay, no momentum, as torch.optim skips a
    param whose grad is None. Unfrozen again, it trains on like the torch backend."""
    def run(name):
        model = make_model()
        opt = grsgd(model.parameters(), name)
        x, y = data()
        frozen = model[0]
        use_first = [True]

        def closure():
            opt.zero_grad()
            h = model[0](x) if use_first[0] else x @ torch.ones(5, 8) * 0.1
            loss = F.mse_loss(model[2](torch.tanh(h)), y)
            loss.backward()
            return loss

        opt.step(closure)
        if how == "requires_grad":
            frozen.requires_grad_(False)
        else:
            use_first[0] = False
        before = [p.detach().clone() for p in frozen.parameters()]
        for _ in range(3):
            opt.step(closure)
        for p, b in zip(frozen.parameters(), before):
            assert torch.equal(p, b), "a frozen layer moved"
            assert p.grad is None or how == "requires_grad"
        frozen.requires_grad_(True)
        use_first[0] = True
        for _ in range(2):
            opt.step(closure)
        return params_of(model)

    got, want = run_both(run, backend)
    same(got, want, "after unfreezing")


def test_frozen_layer_with_gamma_zero_is_torch_sgd_bit_for_bit(backend):
    """With GR off the optimizer is torch.optim.SGD, freezing included."""
    model, twin = make_model(), make_model()
    opt = grsgd(model.parameters(), backend, gamma=0.0)
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    x, y = data()
    for step in range(5):
        if step == 2:
            model[0].requires_grad_(False)
            twin[0].requires_grad_(False)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- p.data
@pytest.mark.parametrize("which", [0, 1, 3])
def test_assigning_p_data_on_any_parameter_keeps_it_training(backend, which):
    """``p.data = new`` on any parameter between steps: that parameter keeps training from
    its new value, like with the torch backend."""
    def run(name):
        model = make_model()
        opt = grsgd(model.parameters(), name)
        x, y = data()
        opt.step(closure_of(model, opt, x, y))
        p = list(model.parameters())[which]
        p.data = torch.full_like(p, 0.3)
        start = p.detach().clone()
        for _ in range(3):
            opt.step(closure_of(model, opt, x, y))
        assert not torch.equal(p.detach(), start), "the re-assigned parameter did not move"
        return params_of(model)

    got, want = run_both(run, backend)
    same(got, want, "after p.data =")


# ---------------------------------------------------------------------------- model.to
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_model_cast_after_the_optimizer_is_built(backend, dtype):
    """model.double() / .half() after the optimizer exists (and before its first step, the
    usual order): zero_grad clears the new grads and every step uses fresh gradients."""
    def run(name):
        model = make_model()
        opt = grsgd(model.parameters(), name, lr=0.02)
        model.to(dtype)
        x, y = data(dtype=dtype)
        for _ in range(3):
            opt.step(closure_of(model, opt, x, y))
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        return params_of(model)

    got, want = run_both(run, backend)  # (Triton has no float64 kernels: the torch path)
    assert all(a.dtype == dtype for a in got)
    same(got, want, "cast model", 1e-12 if dtype == torch.float64 else 1e-2)


def test_model_to_channels_last_keeps_training_like_the_torch_backend(backend):
    """Conv weights in channels_last (dense but not contiguous) are walked in memory order."""
    def run(name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                    torch.nn.Conv2d(4, 2, 3))
        model.to(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
        opt = grsgd(model.parameters(), name)
        x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                return loss
            opt.step(closure)
        return params_of(model)

    with _no_fallback_warning():
        got = run(backend)
    same(got, run("torch"), "channels_last")


@contextlib.contextmanager
def _no_fallback_warning():
    """Asserts that no tensor was sent to the per-tensor torch path."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    msgs = [str(r.message) for r in records if "per-tensor torch path" in str(r.message)]
    assert not msgs, msgs


# ---------------------------------------------------------------------------- views, saving
def test_a_numpy_view_keeps_aliasing_the_weight_through_a_step(backend):
    model = make_model()
    opt = grsgd(model.parameters(), backend)
    x, y = data()
    w = model[0].weight
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    view = w.detach().numpy()  # taken at the perturbed point
    F.mse_loss(model(x), y).backward()
    opt.second_step()
    assert torch.equal(torch.from_numpy(view.copy()), w.detach()), "the view stopped aliasing"
    assert view.__array_interface__["data"][0] == w.data_ptr()
    expected = w.detach().clone()
    del opt, model, w
    assert torch.equal(torch.from_numpy(view.copy()), expected)  # readable after the optimizer


def test_saving_a_submodule_writes_only_its_parameters(backend, tmp_path):
    model = make_model()
    opt = grsgd(model.parameters(), backend)
    x, y = data()
    for _ in range(2):
        opt.step(closure_of(model, opt, x, y))
    buf = io.BytesIO()
    torch.save(model[2].state_dict(), buf)
    own = sum(p.numel() * p.element_size() for p in model[2].parameters())
    assert len(buf.getvalue()) < own + 4096, "the saved submodule holds more than its own tensors"
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_model(model, str(tmp_path / "m.safetensors"))
    fresh = make_model(seed=3)
    safetensors.load_model(fresh, str(tmp_path / "m.safetensors"))
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- checkpoints
def test_a_step_zero_checkpoint_resets_the_state(backend):
    """Loading the state_dict of a fresh optimizer (no state yet) into a trained one empties
    its state, as torch does: AdamW's step counts from 1 again."""
    model = make_model()
    opt = gr_fused.GRAdamW(model.parameters(), lr=1e-2, gamma=0.05, backend=backend)
    fresh = gr_fused.GRAdamW(make_model().parameters(), lr=1e-2, gamma=0.05, backend=backend)
    x, y = data()
    for _ in range(5):
        opt.step(closure_of(model, opt, x, y))
    opt.load_state_dict(fresh.state_dict())
    assert len(opt.state) == 0
    opt.step(closure_of(model, opt, x, y))
    assert all(float(st["step"]) == 1.0 for st in opt.state.values())


def test_model_load_state_dict_mid_training_matches_the_torch_backend(backend):
    def run(name):
        model = make_model()
        opt = grsgd(model.parameters(), name)
        x, y = data()
        opt.step(closure_of(model, opt, x, y))
        model.load_state_dict(make_model(seed=5).state_dict())  # copies into the same tensors
        for _ in range(2):
            opt.step(closure_of(model, opt, x, y))
        return params_of(model)
    got, want = run_both(run, backend)
    same(got, want, "after model.load_state_dict")


@pytest.mark.parametrize("to", BACKENDS)
def test_a_checkpoint_moves_between_backends(backend, to):
    """Save model + optimizer mid-run with one backend, resume with another: the same
    trajectory as the uninterrupted run."""
    need(to)

    def fresh_run(name_a, name_b):
        model = make_model()
        opt = gr_fused.GRAdamW(model.parameters(), lr=1e-2, gamma=0.05, backend=name_a)
        x, y = data()
        for _ in range(3):
            opt.step(closure_of(model, opt, x, y))
        ckpt = saved_and_loaded({"model": model.state_dict(), "opt": opt.state_dict()})
        model2 = make_model(seed=9)
        model2.load_state_dict(ckpt["model"])
        opt2 = gr_fused.GRAdamW(model2.parameters(), lr=1e-2, gamma=0.05, backend=name_b)
        opt2.load_state_dict(ckpt["opt"])
        for _ in range(3):
            opt2.step(closure_of(model2, opt2, x, y))
        return params_of(model2)

    same(fresh_run(backend, to), fresh_run("torch", "torch"), f"{backend} -> {to}")


# ---------------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_optimizer_keep_working(backend, how):
    """deepcopy / pickle / torch.save(opt) + torch.load(weights_only=False) of a model and
    its optimizer together: the copy steps exactly as the original does."""
    model = make_model()
    opt = grsgd(model.parameters(), backend)
    x, y = data()
    opt.step(closure_of(model, opt, x, y))
    pair = (model, opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy(pair)
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps(pair))
    else:
        model2, opt2 = saved_and_loaded(pair, weights_only=False)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(opt2) if not k.startswith("_")}
    assert opt2.backends == opt.backends
    for _ in range(2):
        opt.step(closure_of(model, opt, x, y))
        opt2.step(closure_of(model2, opt2, x, y))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_copying_in_the_middle_of_a_step_is_refused_with_the_weights_intact(backend):
    model = make_model()
    opt = grsgd(model.parameters(), backend)
    x, y = data()
    F.mse_loss(model(x), y).backward()
    before = params_of(model)
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        copy.deepcopy(opt)
    opt.abort_step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- weight tying
def test_tied_weights_are_stepped_once(backend):
    """A weight shared by two modules is one parameter: stepped once per step, as the torch
    backend does."""
    def run(name):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(11, 6)
        head = torch.nn.Linear(6, 11, bias=False)
        head.weight = emb.weight
        params = list({id(p): p for p in [*emb.parameters(), *head.parameters()]}.values())
        assert len(params) == 1
        opt = gr_fused.GRAdamW(params, lr=1e-2, gamma=0.05, backend=name)
        idx = torch.randint(0, 11, (7,))
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(head(emb(idx)), idx)
                loss.backward()
                return loss
            opt.step(closure)
        return [emb.weight.detach().clone()]
    got, want = run_both(run, backend)
    same(got, want, "tied")


# ---------------------------------------------------------------------------- edge tensors
def test_complex_parameters_train_as_torch_optim_does(backend):
    """Complex params are stepped as their real views (torch.optim's convention): GR off is
    torch.optim.SGD bit for bit, GR on matches the torch backend."""
    def run(name, gamma):
        torch.manual_seed(0)
        z = torch.randn(6, 4, dtype=torch.complex64, requires_grad=True)
        w = torch.randn(4, requires_grad=True)
        opt = grsgd([z, w], name, gamma=gamma)
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = (z * w).abs().square().sum() + z.real.sin().sum()
                loss.backward()
                return loss
            opt.step(closure)
        return [z.detach().clone(), w.detach().clone()]

    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    ref = torch.optim.SGD([z, w], lr=0.05, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        ref.zero_grad()
        ((z * w).abs().square().sum() + z.real.sin().sum()).backward()
        ref.step()
    got = run(backend, 0.0)
    assert torch.equal(got[0], z.detach()) and torch.equal(got[1], w.detach())
    with _no_fallback_warning():
        got = run(backend, 0.05)
    same(got, run("torch", 0.05), "complex GR")


def test_a_zero_element_parameter_changes_nothing_for_the_others(backend):
    def run(name):
        model = make_model()
        empty = torch.nn.Parameter(torch.empty(0, 3))
        opt = grsgd([*model.parameters(), empty], name)
        x, y = data()
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), y) + empty.sum()
                loss.backward()
                return loss
            opt.step(closure)
        assert empty.grad is not None and empty.numel() == 0
        return params_of(model)
    with _no_fallback_warning():
        got = run(backend)
    same(got, run("torch"), "with an empty param")


def test_huge_but_finite_gradients_are_not_skipped(backend):
    """Gradients of 1e20 per element: finite, so the step is taken (the norm is summed in
    float64 and does not overflow); θ stays finite and matches the torch backend."""
    def run(name):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300))
        opt = gr_fused.GRSGD([p], lr=1e-22, alpha=0.5, rho=0.05, backend=name)
        before = p.detach().clone()

        def closure():
            opt.zero_grad()
            loss = (1e20 * p.sin()).sum()
            loss.backward()
            return loss
        opt.step(closure)
        assert not bool(opt.last_step_skipped), "a finite step was skipped"
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)
        return [p.detach().clone()]
    got, want = run_both(run, backend)
    same(got, want, "huge gradients")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_element_skips_the_step(backend, bad):
    model = make_model()
    opt = grsgd(model.parameters(), backend)
    x, y = data()
    opt.step(closure_of(model, opt, x, y))
    before = params_of(model)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        model[2].bias.grad[1] = bad
        return loss
    opt.step(closure)
    assert bool(opt.last_step_skipped)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- SAM around SGD
# SAM, GR and GNP around a plain torch.optim.SGD apply SGD's update themselves (in the pass
# that restores θ). Each workflow runs that way and with SGD taking its own step after the
# restore (a step hook on the wrapped SGD makes the wrapper call it), which is torch.optim's
# behaviour by construction; the two must agree.
def _sam_idiom_step(model, opt, x, y, complex_param=None):
    """The popular SAM loop: backward, first_step(zero_grad=True), backward at the perturbed
    point, second_step(zero_grad=True); the model zeroes its own grads in between."""
    def loss():
        out = F.mse_loss(model(x), y)
        if complex_param is not None:
            out = out + (complex_param * complex_param.conj()).real.sum() * 1e-2 \
                + complex_param.imag.sin().sum()
        return out
    model.zero_grad()
    loss().backward()
    opt.first_step(zero_grad=True)
    model.zero_grad()
    loss().backward()
    opt.second_step(zero_grad=True)


SAM_WORKFLOWS = ["freeze-unfreeze", "p-data", "checkpoint-into-new-optimizer", "complex",
                 "deepcopy"]


@pytest.mark.parametrize("workflow", SAM_WORKFLOWS)
def test_sam_around_sgd_workflows_equal_sgds_own_step(backend, workflow, monkeypatch):
    own_steps = []

    def run(own_step):
        model = make_model()
        extra = []
        if workflow == "complex":
            torch.manual_seed(3)
            extra = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))]

        def make(params):
            opt = gr_fused.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                               weight_decay=1e-2, backend=backend)
            if own_step:
                opt.base_optimizer.register_step_post_hook(lambda *a: own_steps.append(1))
            return opt
        opt = make([*model.parameters(), *extra])
        x, y = data()
        cp = extra[0] if extra else None
        for step in range(6):
            if step == 2:
                if workflow == "freeze-unfreeze":
                    model[0].requires_grad_(False)
                elif workflow == "p-data":
                    model[2].weight.data = torch.full_like(model[2].weight, 0.2)
                elif workflow == "checkpoint-into-new-optimizer":
                    ckpt = saved_and_loaded({"model": model.state_dict(),
                                             "opt": opt.state_dict()})
                    model = make_model(seed=5)
                    model.load_state_dict(ckpt["model"])
                    opt = make(list(model.parameters()))
                    opt.load_state_dict(ckpt["opt"])
                elif workflow == "deepcopy":  # (a copy does not carry the hook)
                    model, opt = copy.deepcopy((model, opt))
                    if own_step:
                        opt.base_optimizer.register_step_post_hook(
                            lambda *a: own_steps.append(1))
            if step == 4 and workflow == "freeze-unfreeze":
                model[0].requires_grad_(True)
            _sam_idiom_step(model, opt, x, y, cp)
        state = [opt.state[p].get("momentum_buffer") for p in opt.param_groups[0]["params"]]
        return params_of(model) + ([cp.detach().clone()] if cp is not None else []), state

    want, want_state = run(True)
    assert len(own_steps) == 6  # SGD took its own step every time
    with monkeypatch.context() as m:  # and here never
        m.setattr(torch.optim.SGD, "step", lambda *a, **k: pytest.fail("SGD.step ran"))
        got, got_state = run(False)
    same(got, want, workflow)
    assert [s is None for s in got_state] == [s is None for s in want_state]
    same([s for s in got_state if s is not None], [s for s in want_state if s is not None],
         f"{workflow}: momentum")
