"""Test accuracy of F-GR, B-GR, DB-GR, SAM and SGD on scikit-learn's digits (paper, Sec. 3.3).

The paper trains ResNets on CIFAR and finds the forward difference (F-GR) generalizes best,
improving as the ascent step grows, ahead of the backward difference (B-GR) and of exact GR
by double backprop (DB). This is the same comparison at laptop scale: an MLP on the 8×8
digits of ``sklearn.datasets.load_digits`` (1797 images, 10 classes), trained on a small
random subset so that regularization matters, with the package's own optimizers:

* SGD:    GRSGD(gamma=0)                               (torch.optim.SGD bit for bit)
* F-GR:   GRSGD(gamma=γ, rho=ρ)                         ε_t = ρ/‖g1‖ (normalize=True)
* B-GR:   GRSGD(gamma=γ, rho=−ρ)
* DB:     db_gr_backward(loss, params, γ) + GRSGD(gamma=0)
* SAM:    gr_fused.SAM(params, torch.optim.SGD, rho=ρ)  (GR with α = 1, i.e. γ = ε_t)

all with the same learning rate, momentum, batch size and epochs. For each ascent step ρ
it reports the final test accuracy, mean ± std over seeds (the seed draws the train/test
split, the init and the batch order), and plots accuracy against ρ.

    pip install scikit-learn
    python examples/generalization.py            # under a minute on a 2-core CPU
    python examples/generalization.py --smoke    # seconds (CI)
    python examples/generalization.py --full     # width 512, 100 epochs, 10 seeds, 7 values
                                                 # of ρ; the same 500 images (GPU if any)
    python examples/generalization.py --out DIR  # where generalization.png/.json go
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import gr_fused


@functools.lru_cache(maxsize=1)
def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - the message is the point
        raise SystemExit("examples/generalization.py needs scikit-learn: "
                         "pip install scikit-learn") from e
    digits = sk_load_digits()
    return (torch.tensor(digits.data, dtype=torch.float32) / 16.0,
            torch.tensor(digits.target, dtype=torch.int64))


def load_digits_split(n_train: int, seed: int, device) -> Dict[str, torch.Tensor]:
    """A random split (drawn by ``seed``), standardized with the training set's statistics."""
    x, y = load_digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    mean = x[tr].mean(0)
    std = x[tr].std(0) + 0.1    # some pixels are (almost) constant on a small subset
    x = (x - mean) / std
    return dict(x_tr=x[tr].to(device), y_tr=y[tr].to(device),
                x_te=x[te].to(device), y_te=y[te].to(device))


def make_model(hidden: int, seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10)).to(device)


def make_optimizer(method: str, params, cfg: Dict, rho: float):
    base = dict(lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if method in ("SGD", "DB"):
        return gr_fused.GRSGD(params, gamma=0.0, **base)
    if method == "F-GR":
        return gr_fused.GRSGD(params, gamma=cfg["gamma"], rho=rho, **base)
    if method == "B-GR":
        return gr_fused.GRSGD(params, gamma=cfg["gamma"], rho=-rho, **base)
    if method == "SAM":
        return gr_fused.SAM(params, torch.optim.SGD, rho=rho, **base)
    raise ValueError(f"unknown method {method!r}")


def train(method: str, cfg: Dict, seed: int, rho: float = 0.0) -> Dict[str, float]:
    device = torch.device(cfg["device"])
    data = load_digits_split(cfg["n_train"], seed, device)
    model = make_model(cfg["hidden"], seed, device)
    params = list(model.parameters())
    opt = make_optimizer(method, params, cfg, rho)
    cfg.setdefault("backends", opt.backends)   # which gr_fused backend ran the steps
    gen = torch.Generator().manual_seed(seed)
    n = len(data["y_tr"])
    for _ in range(cfg["epochs"]):
        for idx in torch.randperm(n, generator=gen).split(cfg["batch"]):
            idx = idx.to(device)
            x, y = data["x_tr"][idx], data["y_tr"][idx]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if method == "DB":
                    gr_fused.db_gr_backward(loss, params, cfg["gamma"])
                else:
                    loss.backward()
                return loss

            if isinstance(opt, gr_fused.SAM):
                closure()  # SAM.step takes the gradients already computed, as the popular SAM
            opt.step(closure)
    with torch.no_grad():
        out_tr, out_te = model(data["x_tr"]), model(data["x_te"])
        return dict(
            test_acc=(out_te.argmax(1) == data["y_te"]).float().mean().item(),
            train_acc=(out_tr.argmax(1) == data["y_tr"]).float().mean().item(),
            train_loss=F.cross_entropy(out_tr, data["y_tr"]).item(),
            test_loss=F.cross_entropy(out_te, data["y_te"]).item())


def mean_std(xs: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation; NaN in, NaN out (a diverged run shows)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def stats(runs: List[Dict[str, float]]) -> Dict[str, float]:
    out = {}
    for k in runs[0]:
        out[k], out[k + "_std"] = mean_std([r[k] for r in runs])
    out["test_acc_all"] = [r["test_acc"] for r in runs]
    out["diverged"] = sum(not math.isfinite(r["train_loss"]) for r in runs)
    return out


def run_all(cfg: Dict) -> Dict:
    def over_seeds(method, rho=0.0):
        return stats([train(method, cfg, s, rho) for s in cfg["seeds"]])

    results = dict(config=cfg, SGD=over_seeds("SGD"), DB=over_seeds("DB"), by_rho={})
    for rho in cfg["rhos"]:
        results["by_rho"][str(rho)] = {m: over_seeds(m, rho) for m in ("F-GR", "B-GR", "SAM")}
    sgd = results["SGD"]["test_acc_all"]
    for r in [results["DB"]] + [r for ms in results["by_rho"].values() for r in ms.values()]:
        paired_vs_sgd(r, sgd)
    return results


def paired_vs_sgd(r: Dict, sgd: List[float]) -> None:
    """Each seed shares its split, init and batch order across methods: compare per seed."""
    deltas = [a - b for a, b in zip(r["test_acc_all"], sgd)]
    r["delta_vs_sgd"], r["delta_vs_sgd_std"] = mean_std(deltas)
    r["seeds_better_than_sgd"] = sum(d > 0 for d in deltas)


def print_table(results: Dict) -> None:
    cfg = results["config"]
    print(f"digits: {cfg['n_train']} train / {1797 - cfg['n_train']} test, MLP 64-"
          f"{cfg['hidden']}-{cfg['hidden']}-10, {cfg['epochs']} epochs, batch {cfg['batch']}, "
          f"lr {cfg['lr']}, momentum {cfg['momentum']}, wd {cfg['weight_decay']}, "
          f"γ={cfg['gamma']}, seeds {cfg['seeds']}, device {cfg['device']}, "
          f"backend {cfg.get('backends')}")
    n = len(cfg["seeds"])
    print(f"{'method':<8}{'ρ':>7}{'test acc':>18}{'Δ vs SGD, paired':>22}{'better':>8}"
          f"{'train loss':>12}")

    def row(name, rho, r):
        delta = (f"{100 * r['delta_vs_sgd']:+6.2f} ± {100 * r['delta_vs_sgd_std']:5.2f}"
                 f"{r['seeds_better_than_sgd']:>6}/{n}" if "delta_vs_sgd" in r else " " * 21)
        print(f"{name:<8}{rho:>7}  {100 * r['test_acc']:6.2f} ± {100 * r['test_acc_std']:5.2f} %"
              f"   {delta}{r['train_loss']:>12.4f}"
              + (f"  ({r['diverged']} run(s) diverged)" if r["diverged"] else ""))

    row("SGD", "-", results["SGD"])
    row("DB", "-", results["DB"])
    for rho, ms in results["by_rho"].items():
        for name, r in ms.items():
            row(name, rho, r)


def plot(results: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    rhos = [float(r) for r in results["by_rho"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    accs = [100 * ms[name]["test_acc"] for ms in results["by_rho"].values() for name in ms]
    ymin = 100 * results["SGD"]["test_acc"] - 3.0   # zoom in; collapsed runs are marked
    for i, name in enumerate(("F-GR", "B-GR", "SAM")):
        ms = [results["by_rho"][str(r)][name] for r in cfg["rhos"]]
        xs = [r * (1 + 0.04 * (i - 1)) for r in rhos]
        ys = [100 * m["test_acc"] for m in ms]
        errs = [100 * m["test_acc_std"] if y >= ymin else 0.0 for m, y in zip(ms, ys)]
        line = ax.errorbar(xs, [max(y, ymin) for y in ys], errs, marker="o", capsize=3,
                           label=name)
        for x, y in zip(xs, ys):
            if y < ymin:
                ax.annotate(f"{name}: {y:.0f}%", (x, ymin), xytext=(-30, 12 + 12 * i),
                            textcoords="offset points", fontsize=7, ha="center",
                            color=line[0].get_color(), arrowprops=dict(arrowstyle="->"))
    ax.set_ylim(ymin - 0.3, max(accs + [100 * results["SGD"]["test_acc"]]) + 1.0)
    for name, color in (("SGD", "k"), ("DB", "gray")):
        m = results[name]
        ax.axhline(100 * m["test_acc"], color=color, ls="--",
                   label=f"{name} ({100 * m['test_acc']:.2f} ± {100 * m['test_acc_std']:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("ascent step ρ (ε_t = ρ/‖g1‖; B-GR uses −ρ)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits, {cfg['n_train']} train, γ={cfg['gamma']}, "
                 f"{len(cfg['seeds'])} seeds (mean ± std)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


CONFIGS = {
    "smoke": dict(n_train=300, hidden=64, epochs=3, batch=64, lr=0.05, momentum=0.9,
                  weight_decay=0.0, gamma=1.0, rhos=[0.05, 0.5], seeds=[0]),
    "default": dict(n_train=500, hidden=256, epochs=40, batch=64, lr=0.05, momentum=0.9,
                    weight_decay=0.0, gamma=1.0, rhos=[0.05, 0.2, 0.5, 1.0],
                    seeds=[0, 1, 2, 3, 4]),
    "full": dict(n_train=500, hidden=512, epochs=100, batch=64, lr=0.05, momentum=0.9,
                 weight_decay=0.0, gamma=1.0, rhos=[0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
                 seeds=list(range(10))),
}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="seconds (CI)")
    mode.add_argument("--full", action="store_true", help="longer runs (a GPU helps)")
    ap.add_argument("--out", default=".", help="folder for generalization.png and .json")
    ap.add_argument("--gamma", type=float, default=None, help="override γ")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    cfg = dict(CONFIGS["smoke" if args.smoke else "full" if args.full else "default"])
    if args.gamma is not None:
        cfg["gamma"] = args.gamma
    cfg["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["device"] == "cpu":
        torch.set_num_threads(1)   # small matrices: one thread is as fast and shares better
    t0 = time.perf_counter()
    results = run_all(cfg)
    results["seconds"] = time.perf_counter() - t0
    results["versions"] = dict(torch=torch.__version__, gr_fused=gr_fused.__version__)
    print_table(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generalization.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "generalization.png"))
    print(f"{results['seconds']:.1f} s; wrote {args.out}/generalization.png and .json")
    return results


if __name__ == "__main__":
    main()
