"""CPU speed of the host build of csrc/ (backend="cpu") on the optimizer side of a GR step.

One GR + SGD-momentum step without its backward passes: norm(g1), perturb, norm(G) and the
update, over ~10M fp32 parameters in ~50 tensors. The backward passes are simulated by
writing gradients between the calls (not timed): g1 before ``first_step``; before
``second_step`` g2 is added onto the grads (gr_fused: the second backward accumulates onto
fold·g1) or written fresh (the SAM pattern zeroes its grads). The simulated backward writes
the grads last tensor first, as autograd does (the output layer's gradients come first), so
the first tensors' grads are the ones still in the caches when the optimizer starts;
``--grad-order forward`` writes them first tensor first (as this script used to).

Timed in one process, each method in its own pair with ``GRSGD(backend="cpu")``, interleaved
round by round (which of the two goes first alternates), and reported as medians and as the
median over rounds of each round's ratio. (In one loop over all four methods, a method's
allocations slow the step after it: with a torch backend that allocated large temporaries,
the SAM pattern's step took ~15% longer than beside ours alone.)

* ``GRSGD(backend="cpu")``, the host build walking the parameters' own tensors;
* ``GRSGD(backend="torch")``, the same optimizer on the pure-PyTorch backend;
* the popular per-parameter SAM pattern (``SAMPattern``: clone θ per tensor, a Python loop
  of adds, then torch.optim.SGD);
* a plain torch.optim.SGD momentum step, for scale;
* the pure-PyTorch backend against the SAM pattern, each in its own pair: ``GRSGD`` and
  ``gr_fused.SAM`` around torch.optim.SGD (``backend="torch"``), and ``gr_fused.SAM`` on
  the host build;

then each element-wise phase of the host build alone (norm, perturb, update) with its GB/s
over the bytes it must move (bench_kernels.PHASE_BYTES: 48 B per fp32 parameter for the
step), and the host cost of a whole ``backend="cpu"`` GR step over 50 and 500 tiny tensors
next to ``torch.optim.SGD(foreach=True)`` over the same tensors (median of per-round
ratios): there the kernels' work is negligible, so that is the step's Python and dispatch.

    python bench/bench_cpu.py [--numel 10M] [--tensors 50] [--rounds 31] [--json PATH]
                              [--grad-order backward|forward]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import gr_fused  # noqa: E402
from gr_fused import _ext  # noqa: E402
from gr_fused.backends import get_backend  # noqa: E402
from gr_fused.backends.base import Bucket  # noqa: E402
from gr_fused.optim.base import create_missing_state  # noqa: E402

from bench_common import PHASE_BYTES, SAMPattern, split, write_results  # noqa: E402

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
METHODS = ["gr_fused cpu", "gr_fused torch", "SAM pattern", "torch SGD"]
STEP_BYTES = 4 * sum(PHASE_BYTES["gr-step"])  # per fp32 parameter: 48 B
TINY = (50, 500)


class Setup:
    """Parameters, two sets of random gradients and the optimizer of one method."""

    def __init__(self, method: str, sizes: List[int], seed: int = 0,
                 grad_order: str = "backward"):
        gen = torch.Generator().manual_seed(seed)
        self.reverse = grad_order == "backward"
        self.params = [torch.randn(s, generator=gen).requires_grad_() for s in sizes]
        self.g1 = [torch.randn(s, generator=gen) for s in sizes]
        self.g2 = [torch.randn(s, generator=gen) for s in sizes]
        for p, g in zip(self.params, self.g1):
            p.grad = g.clone()
        self.method = method
        if method.startswith("gr_fused"):
            self.opt = gr_fused.GRSGD(self.params, gamma=0.02, rho=0.05,
                                      backend=method.split()[1], **SGD)
        elif method.startswith("SAM ") and method != "SAM pattern":
            self.opt = gr_fused.SAM(self.params, torch.optim.SGD, rho=0.05,
                                    backend=method.split()[1], **SGD)
        elif method == "SAM pattern":
            self.opt = SAMPattern(self.params, rho=0.05, **SGD)
        elif method == "torch SGD":
            self.opt = torch.optim.SGD(self.params, **SGD)

    def grads(self) -> List[torch.Tensor]:
        return [p.grad for p in self.params]

    def _order(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """``tensors`` in the order the simulated backward writes them."""
        return tensors[::-1] if self.reverse else tensors

    def step(self) -> float:
        """One step; returns the seconds spent in the optimizer (gradient writes excluded)."""
        grads = self._order(self.grads())
        torch._foreach_copy_(grads, self._order(self.g1))      # "first backward"
        if self.method == "torch SGD":
            start = time.perf_counter()
            self.opt.step()
            return time.perf_counter() - start
        start = time.perf_counter()
        self.opt.first_step()
        first = time.perf_counter() - start
        if self.method == "SAM pattern":                        # "second backward"
            torch._foreach_copy_(grads, self._order(self.g2))
        else:
            torch._foreach_add_(grads, self._order(self.g2))
        start = time.perf_counter()
        self.opt.second_step(zero_grad=False)
        return first + time.perf_counter() - start


def phase_times(sizes: List[int], rounds: int) -> Dict[str, float]:
    """Median ms of each element-wise phase of the host build alone, on a bucket of the
    same tensors as the step (the backend's phases, without the driver and without the
    step scalars' finalize)."""
    be = get_backend("cpu", torch.device("cpu"))
    params = [torch.randn(s) for s in sizes]
    grads = [torch.randn(s) for s in sizes]
    group = dict(SGD, dampening=0.0, nesterov=False)
    gr = dict(rho=0.05, gamma=0.02, alpha=None, normalize=True, difference="forward",
              adaptive=False, max_grad_norm=None, eps_sign=1.0, combine_sign=1.0)
    b = Bucket(params, grads, [{} for _ in sizes], group, "sgd", {}, gr=gr)
    b.backend = be
    (b,) = be.prepare(b)
    create_missing_state(b)
    be.refresh(b)
    b.flags = None  # a later step: the momentum buffers are read
    be.refresh(b)
    eps, fold, gscale, found_inf = (torch.tensor(v) for v in (1e-3, 1.0, 1.0, 0.0))
    phases = {
        "norm": lambda: be.sq_norm(b, False),
        "perturb": lambda: be.perturb(b, eps, fold, False),
        "update-sgd": lambda: be.update(b, gscale, found_inf),
    }
    times: Dict[str, List[float]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, phase in phases.items():
            start = time.perf_counter()
            phase()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def host_cost(n_tensors: int, rounds: int, steps: int = 20) -> dict:
    """A whole GRSGD(backend="cpu") step (first_step + second_step) over ``n_tensors``
    16-element tensors beside a torch.optim.SGD(foreach=True) momentum step over the same
    tensors (each its own copy), interleaved: µs per step (medians) and the median of the
    per-round ratios. Each backward is simulated by adding to the grads (not timed), so the
    step sees gradients written as after a backward."""
    def tensors():
        gen = torch.Generator().manual_seed(n_tensors)
        ps = [torch.randn(16, generator=gen).requires_grad_() for _ in range(n_tensors)]
        for p in ps:
            p.grad = torch.randn(16, generator=gen)
        return ps, [p.grad for p in ps], [torch.randn(16, generator=gen) for _ in ps]
    (gr_params, gr_grads, gr_g2), (sgd_params, sgd_grads, sgd_g2) = tensors(), tensors()
    gr = gr_fused.GRSGD(gr_params, gamma=0.02, rho=0.05, backend="cpu", **SGD)
    sgd = torch.optim.SGD(sgd_params, foreach=True, **SGD)

    def gr_step() -> float:
        torch._foreach_add_(gr_grads, gr_g2)  # "first backward"
        start = time.perf_counter()
        gr.first_step()
        first = time.perf_counter() - start
        torch._foreach_add_(gr_grads, gr_g2)  # "second backward"
        start = time.perf_counter()
        gr.second_step(zero_grad=False)
        return first + time.perf_counter() - start

    def sgd_step() -> float:
        torch._foreach_add_(sgd_grads, sgd_g2)  # "backward"
        start = time.perf_counter()
        sgd.step()
        return time.perf_counter() - start

    runs = {"gr_fused cpu": gr_step, "torch SGD foreach": sgd_step}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    for r in range(rounds + 2):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            spent = sum(runs[name]() for _ in range(steps))
            if r >= 2:
                times[name].append(spent / steps)
    return {"us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
            "ratio": paired_ratio(times["gr_fused cpu"], times["torch SGD foreach"])}


def paired_ratio(a: List[float], b: List[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def pair(a: "Setup", b: "Setup", rounds: int, warmup: int):
    """Steps of ``a`` and ``b`` interleaved round by round (which goes first alternates):
    their times after ``warmup`` rounds."""
    times_a, times_b = [], []
    for r in range(warmup + rounds):
        if r % 2:
            t_b, t_a = b.step(), a.step()
        else:
            t_a, t_b = a.step(), b.step()
        if r >= warmup:
            times_a.append(t_a)
            times_b.append(t_b)
    return times_a, times_b


def run(numel: int, n_tensors: int, rounds: int, warmup: int = 2,
        grad_order: str = "backward") -> dict:
    sizes = split(numel, n_tensors)
    setups = {m: Setup(m, sizes, grad_order=grad_order)
              for m in METHODS + ["SAM torch", "SAM cpu"]}
    ours = METHODS[0]
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    paired: Dict[str, List[float]] = {}
    for other in METHODS[1:]:  # each method in its own pair with ours, interleaved
        mine, theirs = pair(setups[ours], setups[other], rounds, warmup)
        times[ours] += mine
        times[other] = theirs
        paired[other] = [a / b for a, b in zip(mine, theirs)]
    # the pure-PyTorch backend against the SAM pattern, each in its own pair: GRSGD, and
    # gr_fused.SAM around torch.optim.SGD; and gr_fused.SAM on the host build
    torch_vs_sam = {}
    for name in ("gr_fused torch", "SAM torch"):
        mine, theirs = pair(setups[name], setups["SAM pattern"], rounds, warmup)
        torch_vs_sam[name] = statistics.median(a / b for a, b in zip(mine, theirs))
    mine, theirs = pair(setups["SAM cpu"], setups["SAM pattern"], rounds, warmup)
    sam_cpu_vs_sam = statistics.median(a / b for a, b in zip(mine, theirs))
    backends = setups[ours].opt.backends
    del setups
    phase_ms = phase_times(sizes, rounds)
    ms = {m: 1e3 * statistics.median(ts) for m, ts in times.items()}
    numel = sum(sizes)
    return {
        "numel": numel, "tensors": len(sizes), "rounds": rounds, "grad_order": grad_order,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "host_isa": _ext.load().host_isa() if _ext.load() else None,
        "backends": backends, "median_ms": ms,
        # the median over rounds of each round's ratio: both timed in the same round
        "ratio_cpu_vs_sam": statistics.median(paired["SAM pattern"]),
        "ratio_cpu_vs_torch_backend": statistics.median(paired["gr_fused torch"]),
        "ratio_cpu_vs_torch_sgd": statistics.median(paired["torch SGD"]),
        "ratio_torch_backend_vs_sam": torch_vs_sam,
        "ratio_sam_cpu_vs_sam": sam_cpu_vs_sam,
        "gr_step_gbps": STEP_BYTES * numel / (ms["gr_fused cpu"] * 1e-3) / 1e9,
        # each phase alone: GB/s over the bytes it reads and writes (PHASE_BYTES)
        "phases": {name: {"ms": t, "gbps": 4 * sum(PHASE_BYTES[name]) * numel / (t * 1e-3) / 1e9}
                   for name, t in phase_ms.items()},
        "host_cost": {n: host_cost(n, max(5, rounds // 2)) for n in TINY},
    }


def table(res: dict) -> str:
    lines = [f"GR + SGD-momentum step, optimizer side only: {res['numel']:,} fp32 params in "
             f"{res['tensors']} tensors, {res['threads']} threads, torch {res['torch']}, "
             f"host code {res['host_isa']}, medians of {res['rounds']} rounds, grads written "
             f"{res['grad_order']} (last tensor first when backward)",
             "", "| method | ms | vs SAM pattern |", "|---|---|---|"]
    sam = res["median_ms"]["SAM pattern"]
    for m, t in res["median_ms"].items():
        lines.append(f"| {m} | {t:.1f} | {t / sam:.2f}x |")
    lines += ["", f"host build / SAM pattern: {res['ratio_cpu_vs_sam']:.2f}x   "
              f"host build / torch backend: {res['ratio_cpu_vs_torch_backend']:.2f}x   "
              f"host build / torch SGD: {res['ratio_cpu_vs_torch_sgd']:.2f}x   "
              "(medians of the per-round ratios)",
              "torch backend / SAM pattern, each in its own pair: " + "   ".join(
                  f"{'GRSGD' if k == 'gr_fused torch' else 'SAM'} {v:.2f}x"
                  for k, v in res["ratio_torch_backend_vs_sam"].items()),
              f"gr_fused.SAM(SGD) on the host build / SAM pattern: {res['ratio_sam_cpu_vs_sam']:.2f}x",
              f"the host build's step moves {STEP_BYTES} B/param at {res['gr_step_gbps']:.1f} GB/s",
              "", "| host phase alone | ms | GB/s over the bytes it reads and writes |",
              "|---|---|---|"]
    for name, p in res["phases"].items():
        reads, writes = PHASE_BYTES[name]
        lines.append(f"| {name} ({4 * reads} B read, {4 * writes} B written) | {p['ms']:.2f} | "
                     f"{p['gbps']:.1f} |")
    lines += ["", "host cost of a whole step over tiny (16-element) tensors, µs per step "
              "(ratio: median of per-round ratios)", "",
              "| tensors | GRSGD cpu | torch SGD foreach | ratio |", "|---|---|---|---|"]
    for n, h in res["host_cost"].items():
        lines.append(f"| {n} | {h['us']['gr_fused cpu']:.0f} | {h['us']['torch SGD foreach']:.0f} "
                     f"| {h['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", default="10M", help="parameters in all (e.g. 10M, 250K)")
    ap.add_argument("--tensors", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--grad-order", choices=("backward", "forward"), default="backward",
                    help="the order the simulated backward passes write the grads in "
                         "(backward: last tensor first, as autograd does)")
    args = ap.parse_args(argv)
    scale = {"K": 1e3, "M": 1e6}.get(args.numel[-1].upper())
    numel = int(float(args.numel[:-1]) * scale) if scale else int(args.numel)
    res = run(numel, args.tensors, args.rounds, grad_order=args.grad_order)
    if args.json:
        write_results(args.json, res, table(res) + "\n")
    print(table(res))
    return res


if __name__ == "__main__":
    main()
