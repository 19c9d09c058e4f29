"""Implicit bias of gradient regularization on a diagonal linear network (paper, Section 4).

Model: w = u⊙u − v⊙v with u = v = α0·1 at init (α0 = the init scale), squared loss
L = ‖Xw − y‖² / (2n) on a sparse regression problem with more features than samples.
Every run trains to interpolation (L < tol) with full-batch steps of the package's own
optimizers:

* GD:    GRSGD(gamma=0)                                    (plain gradient descent)
* F-GR:  GRSGD(gamma=γ, rho=ε,  normalize=False)            (forward difference, ε > 0)
* B-GR:  GRSGD(gamma=γ, rho=−ε, normalize=False)            (backward difference)
* DB:    db_gr_backward(loss, [u, v], γ) + GRSGD(gamma=0)   (exact GR, the ε → 0 limit)

Under gradient flow u⊙v is conserved; GD, and GR much more, shrink it. The converged
√(u⊙v) is the *effective* init scale: the interpolator found is (approximately) the
minimizer of a hyperbolic-entropy potential with that scale, which tends to the min-ℓ1
(sparse, "rich") solution as the scale → 0 and to the min-ℓ2 ("kernel") one as it grows.
The paper predicts: GR shrinks the effective scale, more so with a larger forward ascent
step ε, less with the backward difference.

We report, per method: the mean effective scale (also split into the support of the truth
and its complement), ‖w‖₁, and ‖w − w*‖₂, averaged over problem seeds. A GD sweep over
α0 gives the reference curve "distance vs (uniform) scale".

    python examples/dln.py            # about half a minute on a 2-core CPU
    python examples/dln.py --smoke    # a few seconds
    python examples/dln.py --out DIR  # where dln.png and dln.json go (default: .)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List, Optional

import torch

import gr_fused

DTYPE = torch.float64


def make_problem(n: int, d: int, k: int, seed: int) -> Dict[str, torch.Tensor]:
    """Gaussian X (n × d), a k-sparse truth w* with ±1 entries, noiseless y = X w*."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DTYPE)
    w_star = torch.zeros(d, dtype=DTYPE)
    support = torch.randperm(d, generator=gen)[:k]
    w_star[support] = torch.randint(0, 2, (k,), generator=gen).to(DTYPE) * 2 - 1
    return dict(X=X, y=X @ w_star, w_star=w_star, support=support)


def train(problem: Dict[str, torch.Tensor], method: str, init_scale, lr: float,
          gamma: float = 0.0, eps: Optional[float] = None, max_steps: int = 20000,
          tol: float = 1e-10) -> Dict:
    """Train the DLN to L < tol with one method ("GD", "F-GR", "B-GR", "DB").

    ``init_scale`` is α0 (a number) or a vector: u = v = α0 at init. ``eps`` is the
    (positive) size of the ascent step; B-GR uses −eps. The result also holds the final
    ``w`` and the effective-scale vector ``scale_vec`` (tensors)."""
    X, y = problem["X"], problem["y"]
    d = X.shape[1]
    init = torch.as_tensor(init_scale, dtype=DTYPE).expand(d)
    u = init.clone().requires_grad_(True)
    v = init.clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        return 0.5 * (X @ (u * u - v * v) - y).pow(2).mean()

    if method in ("GD", "DB"):
        opt = gr_fused.GRSGD([u, v], lr=lr, gamma=0.0)
    elif method == "F-GR":
        opt = gr_fused.GRSGD([u, v], lr=lr, gamma=gamma, rho=eps, normalize=False)
    elif method == "B-GR":
        opt = gr_fused.GRSGD([u, v], lr=lr, gamma=gamma, rho=-eps, normalize=False)
    else:
        raise ValueError(f"unknown method {method!r}")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        if method == "DB":
            gr_fused.db_gr_backward(loss, [u, v], gamma)
        else:
            loss.backward()
        return loss

    status = "max_steps"
    steps = max_steps
    for t in range(max_steps):
        loss = opt.step(closure).item()
        if not math.isfinite(loss) or loss > 1e6:
            status, steps = "diverged", t
            break
        if loss < tol:
            status, steps = "converged", t + 1
            break
    return summarize(problem, u.detach(), v.detach(), loss_fn().item(), status, steps)


def summarize(problem, u, v, loss, status, steps) -> Dict:
    w = u * u - v * v
    uv = u * v
    off = torch.ones_like(w, dtype=torch.bool)
    off[problem["support"]] = False
    # √(u⊙v) is only defined while no coordinate flipped sign (a too large step flips it)
    scale = uv.clamp(min=0).sqrt() if bool((uv > 0).all()) else torch.full_like(uv, math.nan)
    if status == "diverged":
        w = torch.full_like(w, math.nan)
    return dict(status=status, steps=steps, loss=loss,
                scale=scale.mean().item(),
                scale_support=scale[~off].mean().item(),
                scale_off=scale[off].mean().item(),
                l1=w.abs().sum().item(),
                dist=(w - problem["w_star"]).norm().item(),
                w=w, scale_vec=scale)


def mean_over_seeds(runs: List[Dict]) -> Dict[str, float]:
    keys = [k for k in ("scale", "scale_support", "scale_off", "l1", "dist", "steps",
                        "restart_gap") if k in runs[0]]
    out = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    out["status"] = ",".join(sorted({r["status"] for r in runs}))
    return out


def run_all(cfg: Dict) -> Dict:
    problems = [make_problem(cfg["n"], cfg["d"], cfg["k"], s) for s in cfg["seeds"]]
    common = dict(lr=cfg["lr"], max_steps=cfg["max_steps"], tol=cfg["tol"])
    results: Dict = dict(config=cfg, gd_init_sweep={}, gd={}, gr={})

    def over_seeds(restart=False, **kw):
        runs = [train(p, **kw, **common) for p in problems]
        if restart:  # does the effective-scale vector alone explain the solution found?
            for p, r in zip(problems, runs):
                again = train(p, method="GD", init_scale=r["scale_vec"], **common)
                r["restart_gap"] = (again["w"] - r["w"]).norm().item()
        return mean_over_seeds(runs)

    for a0 in cfg["gd_init_scales"]:
        results["gd_init_sweep"][str(a0)] = over_seeds(method="GD", init_scale=a0)
    a0 = cfg["init_scale"]
    results["gd"] = results["gd_init_sweep"].get(str(a0)) or over_seeds(method="GD",
                                                                        init_scale=a0)
    refs = [torch.linalg.pinv(p["X"]) @ p["y"] for p in problems]
    results["min_l2"] = dict(
        l1=sum(r.abs().sum().item() for r in refs) / len(refs),
        dist=sum((r - p["w_star"]).norm().item() for r, p in zip(refs, problems)) / len(refs))
    results["truth_l1"] = float(cfg["k"])
    for gamma in cfg["gammas"]:
        restart = cfg["restart_check"] and gamma == max(cfg["gammas"])
        row = {"DB": over_seeds(method="DB", init_scale=a0, gamma=gamma, restart=restart)}
        for eps in cfg["eps"]:
            for method in ("F-GR", "B-GR"):
                row[f"{method} {eps}"] = over_seeds(method=method, init_scale=a0,
                                                     gamma=gamma, eps=eps, restart=restart)
        results["gr"][str(gamma)] = row
    return results


def print_table(results: Dict) -> None:
    cfg = results["config"]
    print(f"n={cfg['n']} d={cfg['d']} k={cfg['k']} seeds={cfg['seeds']} lr={cfg['lr']} "
          f"tol={cfg['tol']} (means over seeds)")
    print(f"reference: ‖w*‖₁={results['truth_l1']:.3f}; min-ℓ2 interpolator: "
          f"‖w‖₁={results['min_l2']['l1']:.3f} ‖w−w*‖={results['min_l2']['dist']:.3f}")
    head = (f"{'method':<14}{'γ':>6}{'scale':>9}{'supp':>8}{'off':>8}{'‖w‖₁':>8}"
            f"{'‖w−w*‖':>9}{'steps':>8}{'restart':>9}  status")
    print("\nGD, init-scale sweep")
    print(head)
    for a0, r in results["gd_init_sweep"].items():
        _row(f"GD α0={a0}", "-", r)
    print(f"\nGR at α0={cfg['init_scale']}")
    print(head)
    _row("GD", "-", results["gd"])
    for gamma, row in results["gr"].items():
        for name, r in row.items():
            _row(name, gamma, r)
    print("\nscale: mean √(u⊙v) at convergence; supp/off: its mean on the truth's support / "
          "elsewhere;\nrestart: ‖w − w'‖ where w' is GD's solution from u = v = that run's "
          "final √(u⊙v) vector")


def _row(name, gamma, r) -> None:
    print(f"{name:<14}{gamma:>6}{r['scale']:>9.4f}{r['scale_support']:>8.4f}"
          f"{r['scale_off']:>8.4f}{r['l1']:>8.3f}{r['dist']:>9.4f}{r['steps']:>8.0f}"
          f"{r.get('restart_gap', math.nan):>9.4f}  {r['status']}")


def plot(results: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    axes = axes.ravel()
    eps = cfg["eps"]
    xs = [-e for e in reversed(eps)] + [0.0] + list(eps)
    ratio = {"scale_ratio": lambda r: r["scale_support"] / r["scale_off"]}
    for key, ax, label in (("scale", axes[0], "mean effective scale √(u⊙v)"),
                           ("dist", axes[1], "‖w − w*‖₂"),
                           ("scale_ratio", axes[3], "effective scale: support / off-support")):
        get = ratio.get(key, lambda r: r[key])
        for gamma, row in results["gr"].items():
            ys = ([get(row[f"B-GR {e}"]) for e in reversed(eps)] + [get(row["DB"])]
                  + [get(row[f"F-GR {e}"]) for e in eps])
            ax.plot(xs, ys, "o-", label=f"γ={gamma}")
        ax.axhline(get(results["gd"]), color="k", ls="--", label="GD")
        ax.set_xlabel("ascent step ε   (<0: B-GR, 0: DB, >0: F-GR)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax = axes[2]
    sweep = results["gd_init_sweep"]
    ax.plot([r["scale"] for r in sweep.values()], [r["dist"] for r in sweep.values()],
            "k.--", label="GD, α0 swept (uniform scale)")
    for gamma, row in results["gr"].items():
        ax.plot([r["scale"] for r in row.values()], [r["dist"] for r in row.values()],
                "o", label=f"GR/DB, γ={gamma}, α0={cfg['init_scale']}")
    ax.set_xlabel("mean effective scale")
    ax.set_ylabel("‖w − w*‖₂")
    ax.legend(fontsize=8)
    fig.suptitle(f"Diagonal linear network, n={cfg['n']}, d={cfg['d']}, k={cfg['k']}, "
                 f"lr={cfg['lr']}, {len(cfg['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


CONFIGS = {
    "smoke": dict(n=20, d=60, k=3, seeds=[0], lr=0.05, tol=1e-6, max_steps=3000,
                  init_scale=0.3, gd_init_scales=[1.0], gammas=[1.0], eps=[0.05, 0.5],
                  restart_check=False),
    "default": dict(n=20, d=60, k=3, seeds=[0, 1, 2], lr=0.02, tol=1e-10, max_steps=20000,
                    init_scale=0.3, gd_init_scales=[0.1, 0.2, 0.3, 0.5, 1.0],
                    gammas=[1.0, 2.0], eps=[0.05, 0.1, 0.2, 0.5], restart_check=True),
}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--out", default=".", help="folder for dln.png and dln.json")
    ap.add_argument("--lr", type=float, default=None, help="override the learning rate")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny problems: threads only add overhead
    cfg = dict(CONFIGS["smoke" if args.smoke else "default"])
    if args.lr is not None:
        cfg["lr"] = args.lr
    t0 = time.perf_counter()
    results = run_all(cfg)
    results["seconds"] = time.perf_counter() - t0
    print_table(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dln.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "dln.png"))
    print(f"\n{results['seconds']:.1f} s; wrote {args.out}/dln.png and dln.json")
    return results


if __name__ == "__main__":
    main()
