"""The torch backend on a device that lacks a foreach op: that op runs tensor by tensor, said
once in a warning, with the same results (forced here by making the foreach ops raise as
torch does for a device without the kernel)."""
import warnings

import pytest
import torch

import gr_fused
from gr_fused.backends import torch_backend

MISSING = ("mul_", "addcmul_", "copy_", "norm", "add_", "neg_")


def _run(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = gr_fused.GRSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2,
                         gamma=0.05, difference="central", backend="torch")
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def without_foreach(monkeypatch):
    def missing(name):
        def raiser(*args, **kwargs):
            raise NotImplementedError(f"Could not run 'aten::_foreach_{name}' with arguments "
                                      "from the 'CPU' backend")
        return raiser
    for name in MISSING:
        monkeypatch.setattr(torch, f"_foreach_{name}", missing(name))
    monkeypatch.setattr(torch_backend, "_PER_TENSOR", {})


def test_ops_a_device_lacks_run_tensor_by_tensor_with_one_warning(without_foreach):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        got = _run()
    said = [str(r.message) for r in records if "tensor by tensor" in str(r.message)]
    ops = {m.split("torch._foreach_")[1].split(";")[0] for m in said}
    assert len(said) == len(ops), "one warning per missing op"
    assert {"mul_", "add_", "copy_", "norm"} <= ops
    torch_backend._PER_TENSOR.clear()
    with pytest.MonkeyPatch.context() as undo:  # the real foreach ops for the reference
        for name in MISSING:
            undo.setattr(torch, f"_foreach_{name}", getattr(torch._C._VariableFunctions,
                                                              f"_foreach_{name}"))
        want = _run()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_real_error_is_not_taken_for_a_missing_op(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")
    monkeypatch.setattr(torch, "_foreach_mul_", broken)
    monkeypatch.setattr(torch_backend, "_PER_TENSOR", {})
    with pytest.raises(RuntimeError, match="must match"):
        _run(steps=1)


@pytest.mark.parametrize("make", [
    lambda ps, lr: gr_fused.GRSGD(ps, lr=lr, momentum=0.9, gamma=0.05, backend="torch"),
    lambda ps, lr: gr_fused.GRAdamW(ps, lr=lr, gamma=0.05, backend="torch"),
], ids=["GRSGD", "GRAdamW"])
def test_a_tensor_lr_steps_as_its_value_does(make):
    """torch.optim takes lr as a tensor (schedulers and capturable setups do); the step at each
    moment uses the value the tensor holds, changed in place between steps."""
    def run(lr_of_step):
        torch.manual_seed(1)
        params = [torch.randn(s, requires_grad=True) for s in ((4, 3), (3,), (50,))]
        opt = make(params, lr_of_step(0))
        for step in range(4):
            if isinstance(opt.param_groups[0]["lr"], torch.Tensor):
                opt.param_groups[0]["lr"].fill_(lr_of_step(step))
            else:
                opt.param_groups[0]["lr"] = lr_of_step(step)

            def closure():
                opt.zero_grad()
                loss = sum((p * p).sum() + p.sin().sum() for p in params)
                loss.backward()
                return loss
            opt.step(closure)
        return params
    schedule = [0.05, 0.02, 0.01, 0.03]
    got = run(lambda s: torch.tensor(schedule[s]) if s == 0 else schedule[s])
    want = run(lambda s: schedule[s])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_reduced_precision_perturb_rounds_once_from_float32_math(dtype, adaptive):
    """bf16/fp16 parameters: θ' = θ + eps·g (·θ² when adaptive) and fold·g computed in float32
    with the float32 scalars and rounded once, bit for bit as the reference phases (an op of a
    bf16 tensor with a scalar would round eps and fold to bf16 first)."""
    import equality as E
    backend = torch_backend.TorchBackend()
    b = E.random_bucket(E.SIZES, dtype, "cpu", "sgd", dict(E.SGD_GROUPS["momentum-wd"]))
    ref = E.clone_bucket(b)
    kb = E.prepared(backend, b)
    eps, fold = E.device_scalar(0.0371, kb), E.device_scalar(-0.4237, kb)
    assert float(eps.to(dtype)) != float(eps) and float(fold.to(dtype)) != float(fold)
    backend.perturb(kb, eps, fold, adaptive)
    E.TORCH.perturb(ref, eps, fold, adaptive)
    for what, got, want in (("theta'", kb.params, ref.params), ("fold*g1", kb.grads, ref.grads)):
        for i, (a, w) in enumerate(zip(got, want)):
            assert torch.equal(a, w), f"{what}[{i}]: {int((a != w).sum())} elements differ"



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algo", ["sgd", "adamw", "none"])
def test_reduced_precision_interval_phases_compute_in_float32(dtype, algo):
    """interval=k on bf16/fp16: the refresh caches v̂ = a·G + c·g1 and a step between refreshes
    steps with g = u·g1 + v·v̂, each computed in float32 with float32 scalars and rounded once,
    bit for bit as the reference phases (v̂, and g in p.grad); θ within the kernels' bound."""
    import equality as E
    from gr_fused.backends.base import DIRECTION
    from gr_fused.optim.base import create_direction_state, create_missing_state
    backend = torch_backend.TorchBackend()
    group = dict(E.SGD_GROUPS["momentum-wd"]) if algo == "sgd" else None
    b = E.random_bucket(E.SIZES, dtype, "cpu", algo, group, with_state=algo != "none")
    create_direction_state(b)
    for d in E.state_of(b, DIRECTION):
        d.copy_(torch.randn(d.shape).to(dtype))
    ref = E.clone_bucket(b)
    kb = E.prepared(backend, b)
    for x in (kb, ref):
        create_missing_state(x)
    backend.refresh(kb)
    def scalar(value):  # float32, not representable in bf16/fp16
        return E.device_scalar(value, kb)
    a, c, gscale, zero = scalar(0.3127), scalar(-0.0419), scalar(0.8125), scalar(0.0)
    eps, fold = scalar(0.0371), scalar(-0.4237)
    backend.perturb(kb, eps, fold, False)
    E.TORCH.perturb(ref, eps, fold, False)
    backend.update(kb, gscale, zero, direction=(a, c))
    E.TORCH.update(ref, gscale, zero, direction=(a, c))
    for i, (d, w) in enumerate(zip(E.state_of(kb, DIRECTION), E.state_of(ref, DIRECTION))):
        assert torch.equal(d, w), f"cached direction[{i}]"
    E.assert_same_tensors(kb.params, ref.params, dtype, "refresh theta")
    # a step between refreshes, from a fresh g1
    for g, r in zip(kb.grads, ref.grads):
        g.copy_(torch.randn(g.shape).to(dtype))
        r.copy_(g)
    g1 = [g.clone() for g in kb.grads]
    u, v = scalar(1.0 / 3.0), scalar(0.2371)
    backend.reuse_update(kb, u, v, zero)
    E.TORCH.reuse_update(ref, u, v, zero)
    for i, (g, x, d) in enumerate(zip(kb.grads, g1, E.state_of(ref, DIRECTION))):
        want = (x.float() * u + d.float() * v).to(dtype)
        assert torch.equal(g, want), f"g in p.grad[{i}]"
    E.assert_same_tensors(kb.params, ref.params, dtype, "reuse theta")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_wrapper_update_scales_in_float32(dtype):
    """GR around a torch optimizer (algo "none") on bf16/fp16: the update leaves
    G = gscale·G in the grads, computed in float32 with the float32 scale and rounded once,
    bit for bit as the reference phases, θ restored bit for bit."""
    import equality as E
    backend = torch_backend.TorchBackend()
    b = E.random_bucket(E.SIZES, dtype, "cpu", "none")
    ref = E.clone_bucket(b)
    theta0 = [p.clone() for p in b.params]
    kb = E.prepared(backend, b)
    eps, fold = E.device_scalar(0.0371, kb), E.device_scalar(-0.4237, kb)
    backend.perturb(kb, eps, fold, False)
    E.TORCH.perturb(ref, eps, fold, False)
    gscale, zero = E.device_scalar(0.8131, kb), E.device_scalar(0.0, kb)
    assert float(gscale.to(dtype)) != float(gscale)
    backend.update(kb, gscale, zero)
    E.TORCH.update(ref, gscale, zero)
    for i, (g, w) in enumerate(zip(kb.grads, ref.grads)):
        assert torch.equal(g, w), f"gscale*G[{i}]"
    for i, (p, t) in enumerate(zip(kb.params, theta0)):
        assert torch.equal(p, t), f"theta[{i}] restored"
