"""Cheaper GR: the second gradient every k-th step only. Accuracy and cost on digits.

On the digits task of examples/generalization.py (same split, model, seeds and batches), it
compares the final test accuracy of

* SGD (GRSGD with gamma=0) and full F-GR (GRSGD, a second gradient every step);
* ``GRSGD(interval=k)`` for k = 2, 5, 10: every k-th step is the full FD step and caches the
  unit direction v̂ of its combined gradient's component orthogonal to g1 (LookSAM's rule);
  the steps in between take g = g1 + reuse_scale·‖g1‖·v̂;
* the same intervals under the curvature rule, written out here: the FD step caches
  h = (g2 − g1)/(ε·‖g1‖) ≈ H·g1/‖g1‖ and the steps in between take g = g1 + γ·‖g1‖·h;

paired over seeds (the difference to SGD on the same seed, mean ± std, and on how many
seeds it is ahead), and the step time of each interval against SGD, measured side by side
by the profiler (``gr_fused.profile.compare``, methods ``fd-gr-kN``) on its CPU MLP.

    python examples/interval.py            # about 6 minutes on a 2-core CPU (30 seeds)
    python examples/interval.py --smoke    # seconds (CI)
    python examples/interval.py --out DIR  # interval.png / interval.json
    python examples/interval.py --seeds 10 # fewer paired seeds (time grows with them)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generalization import load_digits_split, make_model, mean_std  # noqa: E402

import gr_fused  # noqa: E402

CONFIGS = {
    "smoke": dict(n_train=200, hidden=32, epochs=2, batch=64, lr=0.05, momentum=0.9,
                  gamma=1.0, rho=0.5, intervals=[2, 5], seeds=[0, 1], profile_repeat=1,
                  profile=dict(backends="torch", warmup=0, batch_size=8,
                               model_options=dict(width=32, depth=2))),
    "default": dict(n_train=500, hidden=256, epochs=40, batch=64, lr=0.05, momentum=0.9,
                    gamma=1.0, rho=0.5, intervals=[2, 5, 10], seeds=list(range(30)),
                    profile_repeat=10, profile={}),
}


def train(rule: str, k: int, cfg: Dict, seed: int) -> float:
    """Final test accuracy of ``rule`` ("sgd", "ours" (GRSGD(interval=k)), "curvature")."""
    data = load_digits_split(cfg["n_train"], seed, "cpu")
    model = make_model(cfg["hidden"], seed, "cpu")
    params = list(model.parameters())
    base = dict(lr=cfg["lr"], momentum=cfg["momentum"])
    if rule == "curvature":
        opt = torch.optim.SGD(params, **base)
    else:
        opt = gr_fused.GRSGD(params, gamma=0.0 if rule == "sgd" else cfg["gamma"],
                             rho=cfg["rho"], interval=k, **base)
    gen = torch.Generator().manual_seed(seed)
    n, t, cache = len(data["y_tr"]), 0, None
    for _ in range(cfg["epochs"]):
        for idx in torch.randperm(n, generator=gen).split(cfg["batch"]):
            x, y = data["x_tr"][idx], data["y_tr"][idx]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if rule != "curvature":
                opt.step(closure)
                continue
            closure()
            g1 = [p.grad.clone() for p in params]
            norm = torch.sqrt(sum((g * g).sum() for g in g1))
            if t % k == 0 or cache is None:  # the FD step, caching h ≈ H·g1/‖g1‖
                eps = cfg["rho"] / (norm + 1e-12)
                with torch.no_grad():
                    saved = [p.clone() for p in params]
                    for p, g in zip(params, g1):
                        p.add_(eps * g)
                closure()
                g2 = [p.grad.clone() for p in params]
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
                cache = [(b - a) / (eps * norm) for a, b in zip(g1, g2)]
            with torch.no_grad():
                for p, g, h in zip(params, g1, cache):
                    p.grad = g + cfg["gamma"] * norm * h
            opt.step()
            t += 1
    with torch.no_grad():
        return (model(data["x_te"]).argmax(1) == data["y_te"]).float().mean().item()


def step_times(cfg: Dict) -> Dict[str, float]:
    """Step time per method as a multiple of SGD's, from the profiler (median, side by side)."""
    from gr_fused.profile import compare
    methods = ["sgd", "fd-gr"] + [f"fd-gr-k{k}" for k in cfg["intervals"]]
    report = compare("mlp", device="cpu", methods=methods, repeat=cfg["profile_repeat"],
                     progress=False, **cfg["profile"])
    best = {}
    for r in report["results"]:  # the fastest backend of each method
        if r["method"] not in best or r["step_time_ms"] < best[r["method"]]["step_time_ms"]:
            best[r["method"]] = r
    return {m: dict(x_sgd=r["ratio_to_sgd"], backend=r["backend"], ms=r["step_time_ms"])
            for m, r in best.items()}


def run_all(cfg: Dict) -> Dict:
    seeds = cfg["seeds"]
    runs = {"SGD": [train("sgd", 1, cfg, s) for s in seeds],
            "F-GR": [train("ours", 1, cfg, s) for s in seeds]}
    for k in cfg["intervals"]:
        runs[f"interval {k}"] = [train("ours", k, cfg, s) for s in seeds]
        runs[f"curvature {k}"] = [train("curvature", k, cfg, s) for s in seeds]
    results = {}
    for name, accs in runs.items():
        deltas = [a - b for a, b in zip(accs, runs["SGD"])]
        acc_mean, acc_std = mean_std(accs)
        d_mean, d_std = mean_std(deltas)
        results[name] = dict(test_acc=acc_mean, test_acc_std=acc_std, delta_vs_sgd=d_mean,
                             delta_vs_sgd_std=d_std, seeds_ahead=sum(d > 0 for d in deltas),
                             per_seed=accs)
    full_gain = results["F-GR"]["delta_vs_sgd"]
    for r in results.values():
        r["share_of_full_gain"] = r["delta_vs_sgd"] / full_gain if full_gain > 0 else None
    return dict(config=cfg, results=results, step_time=step_times(cfg))


def print_table(out: Dict) -> None:
    cfg, n = out["config"], len(out["config"]["seeds"])
    print(f"digits, n_train={cfg['n_train']}, MLP {cfg['hidden']}, {cfg['epochs']} epochs, "
          f"γ={cfg['gamma']}, ρ={cfg['rho']}, {n} paired seeds")
    print(f"{'method':<14}{'test acc':>16}{'Δ vs SGD (paired)':>22}{'ahead':>8}"
          f"{'share of F-GR gain':>20}{'step × SGD':>12}")
    for name, r in out["results"].items():
        k = name.split()[-1]
        time_key = {"SGD": "sgd", "F-GR": "fd-gr"}.get(name, f"fd-gr-k{k}")
        t = out["step_time"].get(time_key) if not name.startswith("curvature") else None
        share = "" if r["share_of_full_gain"] is None else f"{r['share_of_full_gain']:.2f}"
        print(f"{name:<14}{r['test_acc']:>9.4f} ± {r['test_acc_std']:.4f}"
              f"{r['delta_vs_sgd']:>+13.4f} ± {r['delta_vs_sgd_std']:.4f}"
              f"{r['seeds_ahead']:>5}/{n}{share:>20}"
              f"{'' if t is None else format(t['x_sgd'], '.2f'):>12}")
    print("step × SGD: the profiler's CPU MLP, whole step (median of per-step times over "
          "whole cycles), fastest backend")


def plot(out: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    r, cfg = out["results"], out["config"]
    ks = cfg["intervals"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("interval", "interval k (cached orthogonal direction)"),
                        ("curvature", "curvature rule (cached H·g1/‖g1‖)")):
        ys = [r[f"{name} {k}"]["delta_vs_sgd"] for k in ks]
        es = [r[f"{name} {k}"]["delta_vs_sgd_std"] for k in ks]
        ax.errorbar(ks, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.axhline(r["F-GR"]["delta_vs_sgd"], color="tab:green", ls="--", label="full F-GR")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("interval k (second gradient every k steps)")
    ax.set_ylabel("test accuracy − SGD's (paired, mean ± std)")
    full = r["F-GR"]["delta_vs_sgd"]
    ax.set_ylim(-max(0.01, 2.5 * abs(full)), max(0.01, 2.5 * abs(full)))  # off the scale: below
    ax.legend(fontsize=8)
    ax.set_title(f"digits, γ={cfg['gamma']}, ρ={cfg['rho']}, {len(cfg['seeds'])} seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds (CI)")
    parser.add_argument("--out", default=".", help="where interval.png and interval.json go")
    parser.add_argument("--seeds", type=int, default=None,
                        help="paired seeds 0..N-1 (default: 30, the smoke run 2)")
    args = parser.parse_args(argv)
    cfg = dict(CONFIGS["smoke" if args.smoke else "default"])
    if args.seeds is not None:
        if args.seeds < 2:
            parser.error("--seeds needs at least 2 (the spread of paired differences)")
        cfg["seeds"] = list(range(args.seeds))
    torch.set_num_threads(1 if not args.smoke else torch.get_num_threads())
    start = time.time()
    out = run_all(cfg)
    out["seconds"] = round(time.time() - start, 1)
    print_table(out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "interval.json"), "w") as f:
        json.dump(out, f, indent=1)
    try:
        plot(out, os.path.join(args.out, "interval.png"))
    except ImportError:
        print("(matplotlib not installed: no plot)")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--replot":  # interval.json -> interval.png
        with open(sys.argv[2]) as f:
            plot(json.load(f), os.path.join(os.path.dirname(sys.argv[2]), "interval.png"))
    else:
        main()
