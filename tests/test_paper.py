"""The paper's claims that are cheap to check (docs/paper.md), and the examples' smoke runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gr_fused
from gr_fused.functional import fd_penalty_grad, flooded, gradient
from equality import gr_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import dln  # noqa: E402  (examples/dln.py)


def _mlp(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 2)).to(dtype)


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flooding_ascent_then_descent_is_an_fd_step_on_the_gradient_norm(seed):
    """Paper §5: with lr η, flooding's ascent step (L < b) then descent step (L ≥ b) is
    θ − η²·(∇L(θ + η∇L) − ∇L)/η, a forward-FD step on ½‖∇L‖² with ε = η, step size η²."""
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=gen)
    model = _mlp(seed)
    params = list(model.parameters())

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    lr = 0.3
    g = gradient(loss_fn, params)
    loss0 = loss_fn().item()
    sq = sum(t.pow(2).sum().item() for t in g)
    b = loss0 + 0.5 * lr * sq          # L(θ) < b < L(θ + ηg) ≈ L(θ) + η‖g‖²
    theta0 = _flat(params)
    expected = theta0 - lr * lr * _flat(fd_penalty_grad(loss_fn, params, eps=lr))
    assert torch.equal(_flat(params), theta0)       # fd_penalty_grad put θ back exactly

    opt = gr_fused.GRSGD(params, lr=lr, gamma=0.0)  # plain SGD
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn()
        losses.append(loss.item())
        flooded(loss, b).backward()
        opt.step()
    assert losses[0] < b <= losses[1]               # one ascent, then one descent
    theta2 = _flat(params)
    step = theta2 - theta0
    assert step.norm() > 1e-3 * theta0.norm()       # a real step, not a no-op
    assert ((theta2 - expected).norm() / step.norm()).item() < 1e-10
    # and it is not simply two descent steps (the check can fail)
    assert ((theta2 - (theta0 - 2 * lr * _flat(g))).norm() / step.norm()).item() > 0.1


def test_fd_penalty_grad_approaches_the_hessian_gradient_product():
    """forward/backward FD error O(ε), central O(ε²), against double backprop."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    model = _mlp(0)
    params = list(model.parameters())

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    hg = _flat(torch.autograd.grad(0.5 * sum(g.pow(2).sum() for g in grads), params))
    errs = {}
    for diff in ("forward", "central"):
        for eps in (1e-2, 1e-3):
            errs[diff, eps] = _rel(_flat(fd_penalty_grad(loss_fn, params, eps, diff)), hg)
    errs["backward", 1e-3] = _rel(_flat(fd_penalty_grad(loss_fn, params, -1e-3)), hg)
    assert errs["forward", 1e-3] < 1e-2
    assert 5 < errs["forward", 1e-2] / errs["forward", 1e-3] < 20       # O(ε)
    assert 50 < errs["central", 1e-2] / errs["central", 1e-3] < 200     # O(ε²)
    assert errs["central", 1e-3] < errs["forward", 1e-3] / 10
    assert errs["backward", 1e-3] < 1e-2


def test_flooded_descends_above_and_ascends_below_the_level():
    w = torch.tensor([2.0], requires_grad=True)
    for b, sign in ((1.0, 1.0), (9.0, -1.0)):
        w.grad = None
        flooded((w ** 2).sum(), b).backward()
        assert w.grad.item() == sign * 4.0
        assert flooded((w ** 2).sum(), b).item() == abs(4.0 - b) + b


def test_sam_is_gr_with_alpha_one():
    """SAM = GR with α = 1 and a normalized ascent (γ = ε_t): GRSGD(alpha=1) and
    gr_fused.SAM follow a float64 SAM written out by hand, step for step."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 2, (24,))
    lr, rho, momentum = 0.1, 0.2, 0.9
    models = [_mlp(1) for _ in range(3)]
    gr = gr_fused.GRSGD(models[0].parameters(), lr=lr, momentum=momentum, gamma=0.0,
                        alpha=1.0, rho=rho, normalize=True)
    sam = gr_fused.SAM(models[1].parameters(), torch.optim.SGD, rho=rho, lr=lr,
                       momentum=momentum)
    ref_params = list(models[2].parameters())
    bufs = [torch.zeros_like(p) for p in ref_params]

    def loss_of(m):
        return torch.nn.functional.cross_entropy(m(x), y)

    for _ in range(5):
        for m, opt in zip(models[:2], (gr, sam)):
            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = loss_of(m)
                loss.backward()
                return loss
            gr_step(opt, closure)
        # hand-written SAM + SGD momentum (torch's convention: buf = μ·buf + g)
        g1 = gradient(lambda: loss_of(models[2]), ref_params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in g1))
        with torch.no_grad():
            perturbed = [p + rho * g / (norm + 1e-12) for p, g in zip(ref_params, g1)]
            saved = [p.clone() for p in ref_params]
            for p, q in zip(ref_params, perturbed):
                p.copy_(q)
        g2 = gradient(lambda: loss_of(models[2]), ref_params)
        with torch.no_grad():
            for p, s, g, buf in zip(ref_params, saved, g2, bufs):
                buf.mul_(momentum).add_(g)
                p.copy_(s - lr * buf)
    ref = _flat(ref_params)
    assert _rel(_flat(models[0].parameters()), ref) < 1e-12
    assert _rel(_flat(models[1].parameters()), ref) < 1e-12
    assert _rel(ref, _flat(_mlp(1).parameters())) > 1e-3   # it moved


def test_dln_effective_scale_trend():
    """Paper §4: GR shrinks the effective init scale √(u⊙v); more with a larger forward
    ascent step; the backward difference shrinks it less; DB (ε → 0) lies in between."""
    problem = dln.make_problem(20, 60, 3, seed=0)
    kw = dict(init_scale=0.3, lr=0.05, tol=1e-6, max_steps=3000)
    gd = dln.train(problem, "GD", **kw)
    fgr = {e: dln.train(problem, "F-GR", gamma=1.0, eps=e, **kw) for e in (0.05, 0.5)}
    bgr = {e: dln.train(problem, "B-GR", gamma=1.0, eps=e, **kw) for e in (0.05, 0.5)}
    db = dln.train(problem, "DB", gamma=1.0, **kw)
    for r in [gd, db, *fgr.values(), *bgr.values()]:
        assert r["status"] == "converged" and r["loss"] < 1e-6
    assert fgr[0.5]["scale"] < fgr[0.05]["scale"] < db["scale"] < gd["scale"]
    for e in (0.05, 0.5):
        assert bgr[e]["scale"] > fgr[e]["scale"]
    assert fgr[0.05]["scale"] < db["scale"] < bgr[0.05]["scale"]


@pytest.mark.parametrize("name,expect", [
    ("dln", ["config", "gd", "gr", "gd_init_sweep"]),
    ("flooding", ["config", "check", "flooding", "fd_view"]),
    ("generalization", ["config", "SGD", "DB", "by_rho"]),
    ("interval", ["config", "results", "step_time"]),
])
def test_example_smoke(name, expect, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    png = tmp_path / f"{name}.png"
    assert png.exists() and png.stat().st_size > 5000
    with open(tmp_path / f"{name}.json") as f:
        results = json.load(f)
    for key in expect:
        assert key in results
    if name == "interval":
        assert {"SGD", "F-GR", "interval 2", "interval 5", "curvature 5"} <= set(results["results"])
        assert {"sgd", "fd-gr", "fd-gr-k2", "fd-gr-k5"} <= set(results["step_time"])
    if name == "flooding":
        assert results["check"]["pairs"] > 10
        assert results["check"]["max_rel_err"] < 1e-10
