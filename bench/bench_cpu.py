"""CPU speed of the host build of csrc/ (backend="cpu") on the optimizer side of a GR step.

One GR + SGD-momentum step without its backward passes: norm(g1), perturb, norm(G) and
the fused combine/restore/update, over ~10M fp32 parameters in ~50 tensors. The backward
passes are simulated by writing random gradients between the calls (not timed): g1 before
``first_step``; before ``second_step`` g2 is added onto the grads (gr_fused: the second
backward accumulates onto fold·g1) or written fresh (the SAM pattern zeroes its grads).

Timed side by side in one run, interleaved round by round, medians of many rounds:

* ``GRSGD(backend="cpu")``, the host build (OpenMP, vectorized);
* the same phases called directly on one flat bucket (no step driver: its Python overhead);
* ``GRSGD(backend="torch")``, the same optimizer on the pure-PyTorch backend;
* the popular per-parameter SAM pattern (bench_kernels.SAMPattern: clone θ per tensor, a
  Python loop of adds, then torch.optim.SGD);
* a plain torch.optim.SGD momentum step and a copy of all parameters, for scale;

then each element-wise phase of the host build alone (norm, perturb, update) as the step
runs it, with its GB/s, and the cost of a whole step over 50 and 500 tiny tensors (the
step's Python and dispatch).

On a CPU the host build's perturb writes θ' into the backup and its update writes the new θ
into the backup in place, each followed by an O(1) exchange of the two storages' memory
(cext_backend._trades_memory): 44 B per parameter in all (``HOST_BYTES``), 4 B less than
the in-place phases' 48 B (bench_kernels.PHASE_BYTES), and no buffer only written.

    python bench/bench_cpu.py [--numel 10M] [--tensors 50] [--rounds 21] [--json PATH]
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
from gr_fused.backends.base import Bucket, SkipRecord  # noqa: E402
from gr_fused.backends.cext_backend import CKernels  # noqa: E402
from bench_kernels import PHASE_BYTES, SAMPattern, _split, write_results  # noqa: E402

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
METHODS = ["gr_fused cpu", "host phases", "gr_fused torch", "SAM pattern", "torch SGD", "copy"]
# (elements read, elements written) per parameter by each host phase as the step runs it:
# bench_kernels.PHASE_BYTES, except that perturb writes θ' into the backup's memory and
# leaves θ where it is (read θ, g; write θ', fold·g); the update writes the new θ into the
# backup's memory instead of θ's, the same count.
HOST_BYTES = {"norm": PHASE_BYTES["norm"], "perturb": (2, 2),
              "update-sgd": PHASE_BYTES["update-sgd"]}
STEP_BYTES = 4 * (2 * sum(HOST_BYTES["norm"]) + sum(HOST_BYTES["perturb"])
                  + sum(HOST_BYTES["update-sgd"]))  # per fp32 parameter: 44 B


class Setup:
    """Parameters, two sets of random gradients and a (first, second) pair of timed calls."""

    def __init__(self, method: str, sizes: List[int], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(s, generator=gen).requires_grad_() for s in sizes]
        self.g1 = [torch.randn(s, generator=gen) for s in sizes]
        self.g2 = [torch.randn(s, generator=gen) for s in sizes]
        for p, g in zip(self.params, self.g1):
            p.grad = g.clone()
        self.method = method
        if method.startswith("gr_fused"):
            self.opt = gr_fused.GRSGD(self.params, gamma=0.02, rho=0.05,
                                      backend=method.split()[1], **SGD)
        elif method == "SAM pattern":
            self.opt = SAMPattern(self.params, rho=0.05, **SGD)
        elif method == "torch SGD":
            self.opt = torch.optim.SGD(self.params, **SGD)
        elif method == "copy":
            self.dst = [torch.empty_like(g) for g in self.g1]
        elif method == "host phases":  # the kernels alone on one flat bucket, no step driver
            flat = torch.cat([p.detach().flatten() for p in self.params])
            group = dict(SGD, dampening=0.0, nesterov=False, rho=0.05, gamma=0.02, alpha=None,
                         normalize=True, difference="forward", adaptive=False,
                         max_grad_norm=None)
            self.flat = Bucket([flat], [torch.randn_like(flat)], [{}], group, "sgd",
                               {"backup": [torch.empty_like(flat)]})
            self.skips = SkipRecord(torch.zeros((), dtype=torch.int64),
                                    torch.empty((), dtype=torch.bool), None)
            self.g1, self.g2 = [torch.randn_like(flat)], [torch.randn_like(flat)]
            self.kernels = CKernels()

    def grads(self) -> List[torch.Tensor]:
        if self.method == "host phases":
            return self.flat.grads
        return [p.grad for p in self.params]

    def phases(self) -> float:
        """norm(g1) + scalars, perturb | norm(G) + scalars, update: what the driver calls."""
        k, b = self.kernels, self.flat
        start = time.perf_counter()
        ascended = k.ascend([b], None)
        first = time.perf_counter() - start
        torch._foreach_add_(self.grads(), self.g2)
        start = time.perf_counter()
        k.combine_update([b], ascended, None, self.skips)
        return first + time.perf_counter() - start

    def step(self) -> float:
        """One step; returns the seconds spent in the optimizer (gradient writes excluded)."""
        torch._foreach_copy_(self.grads(), self.g1)            # "first backward"
        if self.method == "copy":
            start = time.perf_counter()
            torch._foreach_copy_(self.dst, [p.detach() for p in self.params])
            return time.perf_counter() - start
        if self.method == "host phases":
            return self.phases()
        if self.method == "torch SGD":
            start = time.perf_counter()
            self.opt.step()
            return time.perf_counter() - start
        start = time.perf_counter()
        self.opt.first_step()
        first = time.perf_counter() - start
        if self.method == "SAM pattern":                        # "second backward"
            torch._foreach_copy_(self.grads(), self.g2)
        else:
            torch._foreach_add_(self.grads(), self.g2)
        start = time.perf_counter()
        self.opt.second_step(zero_grad=False)
        return first + time.perf_counter() - start


def phase_times(setup: Setup, rounds: int) -> Dict[str, float]:
    """Median ms of each element-wise phase of the host build alone, on the "host phases"
    flat bucket, as the step driver runs it (with the memory exchange after perturb and
    update) but without the finalize calls between them. The gradients are rewritten before
    each round, as in Setup.step."""
    b, k = setup.flat, setup.kernels
    grad = b.grads[0]
    partials = torch.empty(1, dtype=torch.float64)
    eps, fold, gscale, found_inf = (torch.tensor(v) for v in (1e-3, 1.0, 1.0, 0.0))
    phases = {
        "norm": lambda: k._call("norm_partials", grad, grad.data_ptr(), 0, partials.data_ptr()),
        "perturb": lambda: k._perturb_at(b, eps.data_ptr(), fold.data_ptr(), False),
        "update-sgd": lambda: k._update_at(b, gscale.data_ptr(), found_inf.data_ptr(), False),
    }
    times: Dict[str, List[float]] = {name: [] for name in phases}
    for _ in range(rounds):
        torch._foreach_copy_(setup.grads(), setup.g1)
        for name, phase in phases.items():
            start = time.perf_counter()
            phase()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def driver_overhead_us(n_tensors: int, steps: int = 200) -> float:
    """Median µs of a whole GRSGD(backend="cpu") step (first_step + second_step) over
    ``n_tensors`` 16-element tensors: the kernels' work is negligible there, so this is
    the Python and dispatch cost that every step pays, whatever its size."""
    params = [torch.randn(16).requires_grad_() for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = gr_fused.GRSGD(params, gamma=0.02, rho=0.05, backend="cpu", **SGD)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.first_step()
        opt.second_step(zero_grad=False)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times[steps // 10:])


def paired_ratio(a: List[float], b: List[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def run(numel: int, n_tensors: int, rounds: int, warmup: int = 2) -> dict:
    sizes = _split(numel, n_tensors)
    setups = {m: Setup(m, sizes) for m in METHODS}
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    for r in range(warmup + rounds):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]  # rotate the order
        for m in order:
            t = setups[m].step()
            if r >= warmup:
                times[m].append(t)
    backends = setups["gr_fused cpu"].opt.backends
    phase_ms = phase_times(setups["host phases"], rounds)
    ms = {m: 1e3 * statistics.median(ts) for m, ts in times.items()}
    numel = sum(sizes)
    return {
        "numel": numel, "tensors": len(sizes), "rounds": rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "host_isa": _ext.load().host_isa() if _ext.load() else None,
        "backends": backends, "median_ms": ms,
        # the median over rounds of each round's ratio: both timed in the same round
        "ratio_cpu_vs_sam": paired_ratio(times["gr_fused cpu"], times["SAM pattern"]),
        "ratio_cpu_vs_torch_backend": paired_ratio(times["gr_fused cpu"], times["gr_fused torch"]),
        "gr_step_gbps": STEP_BYTES * numel / (ms["gr_fused cpu"] * 1e-3) / 1e9,
        "copy_gbps": 8 * numel / (ms["copy"] * 1e-3) / 1e9,
        # each phase alone: GB/s over the bytes it reads and writes (HOST_BYTES)
        "phases": {name: {"ms": t, "gbps": 4 * sum(HOST_BYTES[name]) * numel / (t * 1e-3) / 1e9}
                   for name, t in phase_ms.items()},
        "driver_overhead_us": {n: driver_overhead_us(n) for n in (50, 500)},
    }


def table(res: dict) -> str:
    lines = [f"GR + SGD-momentum step, optimizer side only: {res['numel']:,} fp32 params in "
             f"{res['tensors']} tensors, {res['threads']} threads, torch {res['torch']}, "
             f"host code {res['host_isa']}, medians of {res['rounds']} rounds",
             "", "| method | ms | vs SAM pattern |", "|---|---|---|"]
    sam = res["median_ms"]["SAM pattern"]
    for m, t in res["median_ms"].items():
        lines.append(f"| {m} | {t:.1f} | {t / sam:.2f}x |")
    lines += ["", f"host build / SAM pattern: {res['ratio_cpu_vs_sam']:.2f}x   "
              f"host build / torch backend: {res['ratio_cpu_vs_torch_backend']:.2f}x   "
              "(medians of the per-round ratios)",
              f"host build moves {STEP_BYTES} B/param at {res['gr_step_gbps']:.1f} GB/s; "
              f"a copy runs at {res['copy_gbps']:.1f} GB/s",
              "", "| host phase alone | ms | GB/s over the bytes it reads and writes |",
              "|---|---|---|"]
    for name, p in res["phases"].items():
        reads, writes = HOST_BYTES[name]
        lines.append(f"| {name} ({4 * reads} B read, {4 * writes} B written) | {p['ms']:.2f} | "
                     f"{p['gbps']:.1f} |")
    lines += ["", "a whole step over tiny tensors (its Python and dispatch cost): " + ", ".join(
        f"{n} tensors {us:.0f} µs" for n, us in res["driver_overhead_us"].items())]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", default="10M", help="parameters in all (e.g. 10M, 250K)")
    ap.add_argument("--tensors", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    scale = {"K": 1e3, "M": 1e6}.get(args.numel[-1].upper())
    numel = int(float(args.numel[:-1]) * scale) if scale else int(args.numel)
    res = run(numel, args.tensors, args.rounds)
    if args.json:
        write_results(args.json, res)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
