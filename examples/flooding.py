"""Flooding performs finite-difference GR (paper, Section 5).

Flooding (Ishida et al. 2020) trains on |L − b| + b: gradient descent while the training
loss L is above the flood level b, gradient *ascent* while it is below. With learning
rate η, once L hovers around b, an ascent step followed by a descent step gives

    θ'  = θ + η·g,            g = ∇L(θ)          (ascent, L(θ) < b)
    θ'' = θ' − η·∇L(θ + η·g)                      (descent, L(θ') ≥ b)
        = θ − η²·(∇L(θ + η·g) − g)/η
        = θ − η²·fd_penalty_grad(L, θ, eps=η)

i.e. one forward finite-difference step on the penalty ½‖∇L‖² alone, with ascent step
ε = η and step size η². This script

1. trains a small MLP (float64, full batch) with flooding, using the package's GRSGD with
   gamma=0 (torch.optim.SGD bit for bit) on ``gr_fused.functional.flooded(L, b)``, and at
   every ascent step predicts θ_{t+2} with ``gr_fused.functional.fd_penalty_grad``; it
   reports how many (ascent, descent) pairs occurred and the largest relative error
   ‖θ_{t+2} − prediction‖ / ‖θ_{t+2} − θ_t‖;
2. trains the "FD-GR view" of flooding from the same init: a descent step on L while
   L ≥ b, else one FD step on ½‖∇L‖² (ε = η, step η², counted as two iterations);
3. trains plain GD for reference, and plots the three training / test curves.

    python examples/flooding.py            # about 10 s on a 2-core CPU
    python examples/flooding.py --smoke    # a few seconds
    python examples/flooding.py --out DIR  # where flooding.png and flooding.json go
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import gr_fused
from gr_fused.functional import fd_penalty_grad, flooded

DTYPE = torch.float64


def make_data(n_train: int, n_test: int, flip: float, seed: int) -> Dict[str, torch.Tensor]:
    """Two interleaved half moons in 2-D, Gaussian noise 0.2, a fraction ``flip`` of the
    training labels flipped (so that driving the training loss to 0 overfits)."""
    gen = torch.Generator().manual_seed(seed)

    def moons(n):
        y = torch.randint(0, 2, (n,), generator=gen)
        t = torch.rand(n, generator=gen, dtype=DTYPE) * math.pi
        x = torch.stack([torch.cos(t), torch.sin(t)], 1)
        x = torch.where(y[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
        return x + 0.2 * torch.randn(n, 2, generator=gen, dtype=DTYPE), y

    x_tr, y_tr = moons(n_train)
    flip_mask = torch.rand(n_train, generator=gen) < flip
    y_tr = torch.where(flip_mask, 1 - y_tr, y_tr)
    x_te, y_te = moons(n_test)
    return dict(x_tr=x_tr, y_tr=y_tr, x_te=x_te, y_te=y_te)


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 2)).to(DTYPE)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class Recorder:
    """Training loss, test loss and test accuracy every ``every`` iterations."""

    def __init__(self, model, data, every):
        self.model, self.data, self.every, self.next = model, data, every, 0
        self.curve: Dict[str, List[float]] = dict(iter=[], train_loss=[], test_loss=[],
                                                  test_acc=[])

    @torch.no_grad()
    def __call__(self, it: int, train_loss: float) -> None:
        if it < self.next:   # (the FD view jumps two iterations at a time)
            return
        self.next = (it // self.every + 1) * self.every
        out = self.model(self.data["x_te"])
        self.curve["iter"].append(it)
        self.curve["train_loss"].append(train_loss)
        self.curve["test_loss"].append(F.cross_entropy(out, self.data["y_te"]).item())
        self.curve["test_acc"].append((out.argmax(1) == self.data["y_te"]).double().mean().item())


def train_flooding(data, cfg, b) -> Dict:
    """GD (b=None) or flooding at level b, with GRSGD(gamma=0); for flooding, every
    (ascent, descent) pair is checked against θ_t − η²·fd_penalty_grad(eps=η)."""
    lr = cfg["lr"]
    model = make_model(cfg["hidden"], cfg["seed"])
    params = list(model.parameters())
    opt = gr_fused.GRSGD(params, lr=lr, gamma=0.0)
    rec = Recorder(model, data, cfg["every"])

    def loss_fn():
        return F.cross_entropy(model(data["x_tr"]), data["y_tr"])

    pending = None                  # (θ_t, prediction of θ_{t+2}) after an ascent at t
    check = dict(ascents=0, pairs=0, ascent_after_ascent=0, max_rel_err=0.0, rel_errs=[],
                 pair_iters=[], double_ascent_iters=[])
    trajectory = {}
    for it in range(cfg["iters"]):
        opt.zero_grad()
        loss = loss_fn()
        rec(it, loss.item())
        if it % cfg["every"] in (0, 1):
            trajectory[it] = flat(params)
        ascent = b is not None and loss.item() < b
        descent_after_ascent = pending is not None and not ascent
        if pending is not None and ascent:
            check["ascent_after_ascent"] += 1
            check["double_ascent_iters"].append(it - 1)
            pending = None
        prev = pending
        pending = None
        (flooded(loss, b) if b is not None else loss).backward()
        if ascent:  # (after backward: fd_penalty_grad moves the params and puts them back)
            check["ascents"] += 1
            theta = flat(params)
            hg = fd_penalty_grad(loss_fn, params, eps=lr)
            pending = (theta, theta - lr * lr * torch.cat([h.reshape(-1) for h in hg]))
        opt.step()
        if descent_after_ascent:
            theta_t, predicted = prev
            now = flat(params)
            err = ((now - predicted).norm() / (now - theta_t).norm()).item()
            check["pairs"] += 1
            check["rel_errs"].append(err)
            check["pair_iters"].append(it - 1)
            check["max_rel_err"] = max(check["max_rel_err"], err)
    rec(cfg["iters"], loss_fn().item())
    trajectory[cfg["iters"]] = flat(params)
    return dict(curve=rec.curve, check=check if b is not None else None,
                trajectory=trajectory)


def train_fd_view(data, cfg, b) -> Dict:
    """Flooding rewritten as GR: descent on L while L ≥ b, else one forward-FD step on
    ½‖∇L‖² with ε = η and step size η² (two iterations' worth)."""
    lr = cfg["lr"]
    model = make_model(cfg["hidden"], cfg["seed"])
    params = list(model.parameters())
    descent = gr_fused.GRSGD(params, lr=lr, gamma=0.0)
    penalty = gr_fused.GRSGD(params, lr=lr * lr, gamma=0.0)
    rec = Recorder(model, data, cfg["every"])

    def loss_fn():
        return F.cross_entropy(model(data["x_tr"]), data["y_tr"])

    it, fd_steps, trajectory = 0, 0, {}
    while it < cfg["iters"]:
        descent.zero_grad()
        loss = loss_fn()
        rec(it, loss.item())
        if it % cfg["every"] in (0, 1):   # the FD view skips the iterate between a pair
            trajectory[it] = flat(params)
        if loss.item() >= b:
            loss.backward()
            descent.step()
            it += 1
        else:
            for p, h in zip(params, fd_penalty_grad(loss_fn, params, eps=lr)):
                p.grad = h
            penalty.step()
            fd_steps += 1
            it += 2         # the iteration jumped over is not observable (nor recorded)
    rec(it, loss_fn().item())
    trajectory[it] = flat(params)
    return dict(curve=rec.curve, fd_steps=fd_steps, trajectory=trajectory)


def run_all(cfg: Dict) -> Dict:
    data = make_data(cfg["n_train"], cfg["n_test"], cfg["flip"], cfg["seed"])
    b = cfg["flood"]
    gd = train_flooding(data, cfg, None)
    flood = train_flooding(data, cfg, b)
    view = train_fd_view(data, cfg, b)
    common = sorted(set(flood["trajectory"]) & set(view["trajectory"]))
    gap = [((flood["trajectory"][i] - view["trajectory"][i]).norm()
            / flood["trajectory"][i].norm()).item() for i in common]
    return dict(config=cfg, gd=gd["curve"], flooding=flood["curve"], fd_view=view["curve"],
                check=flood["check"], fd_steps=view["fd_steps"],
                trajectory_gap=dict(iter=common, rel=gap))


def summary(results: Dict) -> str:
    c, cfg, gap = results["check"], results["config"], results["trajectory_gap"]
    first = (c["double_ascent_iters"] or [math.inf])[0]
    before = max([g for i, g in zip(gap["iter"], gap["rel"]) if i <= first], default=0.0)
    lines = [f"two moons, n_train={cfg['n_train']} ({cfg['flip']:.0%} labels flipped), MLP "
             f"2-{cfg['hidden']}-{cfg['hidden']}-2 tanh, float64, full batch, "
             f"lr η={cfg['lr']}, flood level b={cfg['flood']}, {cfg['iters']} iterations",
             f"flooding: {c['ascents']} ascent steps; {c['pairs']} followed by a descent, "
             f"{c['ascent_after_ascent']} by another ascent (first at iteration "
             f"{(c['double_ascent_iters'] or [None])[0]})",
             f"identity θ_t+2 = θ_t − η²·fd_penalty_grad(eps=η): max relative error "
             f"{c['max_rel_err']:.2e} over {c['pairs']} pairs",
             f"FD-GR view: {results['fd_steps']} FD penalty steps; relative distance to the "
             f"flooding trajectory: max {max(gap['rel']):.2e} overall, {before:.2e} before the "
             f"first double ascent"]
    for name in ("gd", "flooding", "fd_view"):
        cur = results[name]
        lines.append(f"{name:>9}: final train loss {cur['train_loss'][-1]:.4f}, test loss "
                     f"{cur['test_loss'][-1]:.4f}, test acc {cur['test_acc'][-1]:.4f}")
    return "\n".join(lines)


def plot(results: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    styles = (("gd", "GD (no flooding)", "-"), ("flooding", f"flooding, b={cfg['flood']}", "-"),
              ("fd_view", "FD-GR view (η² step on ½‖∇L‖², ε=η)", "--"))
    for key, ax in (("train_loss", axes[0]), ("test_loss", axes[1])):
        for name, label, ls in styles:
            cur = results[name]
            ax.plot(cur["iter"], cur[key], ls, label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_yscale("log")
    axes[0].axhline(cfg["flood"], color="gray", lw=0.5)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    errs = results["check"]["rel_errs"]
    if errs:
        ax.semilogy(results["check"]["pair_iters"], errs, ".", ms=2,
                    label="(ascent, descent) pair vs its fd_penalty_grad step")
    gap = results["trajectory_gap"]
    ax.semilogy(gap["iter"], [max(g, 1e-18) for g in gap["rel"]], "-", lw=1,
                label="‖θ_flooding − θ_FD-view‖ / ‖θ_flooding‖")
    doubles = results["check"]["double_ascent_iters"]
    for i, it in enumerate(doubles):
        ax.axvline(it, color="gray", lw=0.3, label="ascent followed by ascent" if i == 0 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative difference")
    ax.legend(fontsize=7, loc="center left")
    fig.suptitle("Flooding = FD-GR on ½‖∇L‖² (float64)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


CONFIGS = {
    "smoke": dict(n_train=100, n_test=300, flip=0.1, seed=0, hidden=32, lr=0.5, flood=0.3,
                  iters=300, every=10),
    "default": dict(n_train=100, n_test=2000, flip=0.1, seed=0, hidden=64, lr=0.5,
                    flood=0.2, iters=3000, every=10),
}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--out", default=".", help="folder for flooding.png and flooding.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = dict(CONFIGS["smoke" if args.smoke else "default"])
    t0 = time.perf_counter()
    results = run_all(cfg)
    results["seconds"] = time.perf_counter() - t0
    print(summary(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flooding.json"), "w") as f:
        json.dump(results, f)
    plot(results, os.path.join(args.out, "flooding.png"))
    print(f"{results['seconds']:.1f} s; wrote {args.out}/flooding.png and flooding.json")
    return results


if __name__ == "__main__":
    main()
