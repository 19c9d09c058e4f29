"""Single-process training concerns: torch.compile'd models, gradient accumulation over
micro-batches, clipping by global norm (clip_grad_norm_ semantics), BatchNorm running
statistics, and checkpoints that resume bit for bit."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import gr_fused
from equality import assert_close, gr_step

GAMMA, RHO = 0.05, 0.05

OPTIMIZERS = {
    "grsgd": lambda ps: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, gamma=GAMMA,
                                       rho=RHO),
    "gradamw": lambda ps: gr_fused.GRAdamW(ps, lr=0.01, gamma=GAMMA, rho=RHO),
    "gr": lambda ps: gr_fused.GR(ps, torch.optim.Adam, lr=0.01, gamma=GAMMA, rho=RHO),
    "sam": lambda ps: gr_fused.SAM(ps, torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9),
    "gnp": lambda ps: gr_fused.GNP(ps, torch.optim.SGD, rho=RHO, lam=0.02, lr=0.1),
}


def make_mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_bn():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def step(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    return gr_step(opt, closure)


def opt_state(opt):
    return [v.clone() for st in opt.state_dict()["state"].values() for v in st.values()
            if torch.is_tensor(v)]


# ---------------------------------------------------------------------------- torch.compile
def _graphs():
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_model_trains_with_every_optimizer(name):
    """Inductor-compiled model, 3 GR steps: same parameters as the eager model, and the
    optimizer's step adds no graph and no graph break (every model instance of one class
    shares one graph, so the count is also bounded across the parametrized cases)."""
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    model = make_mlp()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)  # inductor
    opt, twin_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](twin.parameters())
    step(compiled, opt, x, y)  # the first call compiles (or reuses the graph of this class)
    graphs, breaks = _graphs()
    for _ in range(2):
        step(compiled, opt, x, y)
    assert _graphs() == (graphs, breaks), "GR steps recompiled the model or broke its graph"
    assert counters["stats"]["unique_graphs"] <= 2 * len(OPTIMIZERS)
    for _ in range(3):
        step(twin, twin_opt, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, 1e-5, f"{name}: compiled vs eager")


def test_compiled_batchnorm_model_keeps_running_stats_frozen():
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    model = make_bn()
    twin = copy.deepcopy(model)
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=GAMMA, rho=RHO)
    twin_opt = gr_fused.GRSGD(twin.parameters(), lr=0.1, gamma=GAMMA, rho=RHO)
    compiled = torch.compile(model, backend="aot_eager")  # the freeze is a dynamo matter
    graphs, _ = _graphs()
    for _ in range(3):
        step(compiled, opt, x, y)
        step(twin, twin_opt, x, y)
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # the frozen pass: one recompile
    bn, twin_bn = model[1], twin[1]
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)
    torch.testing.assert_close(bn.running_var, twin_bn.running_var)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch < 2.13's dynamo refuses the optimizer's attribute writes "
                           "under a compiled opt.step (its GR step runs eagerly otherwise)")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiled_optimizer_step_equals_eager(backend, recwarn):
    """torch.compile(opt.step): the same steps as eager, and no false alarm from the checks
    of the grads' version counters (skipped while dynamo traces: versions are runtime
    facts). gr_fused does not import torch._dynamo itself (importing it made gloo's
    destroy_process_group deadlock now and then)."""
    if gr_fused.backends.unavailable_reason(backend, "cpu"):
        pytest.skip(gr_fused.backends.unavailable_reason(backend, "cpu"))
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    model = make_mlp()
    twin = copy.deepcopy(model)
    make = lambda ps: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, gamma=GAMMA, rho=RHO,  # noqa: E731
                                     backend=backend)
    opt, twin_opt = make(model.parameters()), make(twin.parameters())
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss
        compiled_step(closure)
        step(twin, twin_opt, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, 1e-6, "compiled step vs eager")
    assert not [w for w in recwarn if "accumulated onto" in str(w.message)]


def test_importing_gr_fused_does_not_import_dynamo():
    import subprocess
    import sys
    code = "import gr_fused, sys; sys.exit('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("name", ["grsgd", "gradamw", "sam"])
def test_gradient_accumulation_over_micro_batches_equals_the_large_batch(name):
    """The closure runs every micro-batch, each backward accumulating (loss / k); both GR
    gradients are then those of the large batch."""
    k, x, y = 4, torch.randn(16, 6), torch.randn(16, 3)
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt, twin_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](twin.parameters())
    for _ in range(3):
        def closure():
            opt.zero_grad()
            total = 0.0
            for xm, ym in zip(x.chunk(k), y.chunk(k)):
                loss = F.mse_loss(model(xm), ym) / k
                loss.backward()
                total += loss.detach()
            return total
        loss = gr_step(opt, closure)
        big = step(twin, twin_opt, x, y)
        torch.testing.assert_close(loss, big.detach())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, 1e-6, f"{name}: accumulated vs large batch")


# ---------------------------------------------------------------------------- clipping
def _grad(model, params, x, y):
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("groups", [1, 2])
def test_max_grad_norm_is_clip_grad_norm_of_the_combined_gradient(groups):
    """max_grad_norm: combined g = (1−α)g1 + αg2, then clip_grad_norm_ over all groups'
    parameters, then torch.optim.SGD; written by hand here."""
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    max_norm = 0.05
    model = make_mlp()
    scratch = copy.deepcopy(model)
    ps = list(model.parameters())
    param_groups = [dict(params=ps)] if groups == 1 else [dict(params=ps[:2]),
                                                          dict(params=ps[2:], lr=0.05)]
    opt = gr_fused.GRSGD(param_groups, lr=0.1, momentum=0.9, gamma=GAMMA, rho=RHO,
                         max_grad_norm=max_norm)
    theta = [p.detach().clone().requires_grad_() for p in ps]
    ref_groups = [dict(params=theta)] if groups == 1 else [dict(params=theta[:2]),
                                                           dict(params=theta[2:], lr=0.05)]
    sgd = torch.optim.SGD(ref_groups, lr=0.1, momentum=0.9)
    for _ in range(3):
        step(model, opt, x, y)
        g1 = _grad(scratch, theta, x, y)
        eps = RHO / (torch.sqrt(sum((g * g).sum() for g in g1)) + 1e-12)
        g2 = _grad(scratch, [t + eps * g for t, g in zip(theta, g1)], x, y)
        alpha = GAMMA / eps
        for t, a, b in zip(theta, g1, g2):
            t.grad = (1 - alpha) * a + alpha * b
        total = torch.nn.utils.clip_grad_norm_(theta, max_norm)
        assert total > 2 * max_norm, "the test must exercise clipping"
        sgd.step()
    for a, b in zip(ps, theta):
        assert_close(a, b, 1e-6, "clipped GR step")


def test_max_grad_norm_with_gr_off_is_clip_grad_norm_then_sgd():
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.0, max_grad_norm=0.05)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        step(model, opt, x, y)
        ref.zero_grad()
        F.mse_loss(twin(x), y).backward()
        assert torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05) > 0.1
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, 1e-6, "clipped plain step")


# ---------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_running_stats_only_from_the_pass_at_theta(freeze):
    """Frozen (default): after a GR step the running stats are those of one forward at θ.
    freeze_bn_stats=False: the perturbed pass updates them too."""
    x, y = torch.randn(12, 6) * 2 + 1, torch.randn(12, 3)
    model = make_bn()
    twin = copy.deepcopy(model)
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, gamma=GAMMA, rho=RHO,
                         freeze_bn_stats=freeze)
    step(model, opt, x, y)
    twin(x)  # one forward at θ
    bn, ref = model[1], twin[1]
    if freeze:
        assert int(bn.num_batches_tracked) == 1
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)
    else:
        assert int(bn.num_batches_tracked) == 2
        assert not torch.allclose(bn.running_mean, ref.running_mean)
    assert bn.track_running_stats, "the layer must be switched back after the step"


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("at", [0, 2])
def test_checkpoint_between_steps_resumes_bit_for_bit(name, at):
    """Save model (with BN buffers) + optimizer + LR scheduler after ``at`` steps, load into
    fresh objects built from different weights, continue, compare with torch.equal."""
    data = [(torch.randn(12, 6), torch.randn(12, 3)) for _ in range(5)]

    def build():
        model = make_bn()
        opt = OPTIMIZERS[name](model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def run(model, opt, sched, part):
        for x, y in part:
            step(model, opt, x, y)
            sched.step()

    model, opt, sched = build()
    run(model, opt, sched, data[:at])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    run(model, opt, sched, data[at:])

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh, fresh_opt, fresh_sched = build()
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    fresh_sched.load_state_dict(ckpt["sched"])
    run(fresh, fresh_opt, fresh_sched, data[at:])
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {k} differs after resuming"
    for a, b in zip(opt_state(fresh_opt), opt_state(opt)):
        assert torch.equal(a, b), f"{name}: optimizer state differs after resuming"
