"""The Triton part of the GPU check (called by bench/gpu_check.sh): a quick equality check of
the compiled kernels against the torch backend, the same for interval=k (a few refresh and
reuse steps against the torch backend, the launches of each, a reuse step's time), then the
kernels timed over tensor tables at 16M, an odd 11,173,962 and 64M elements in fp32 and bf16
against a device copy, whole optimizer steps compared, launches counted; a short table is
printed last.

    python bench/gpu_triton.py OUT.json [--tests] [--budget SECONDS] [--sweep-blocks]

OUT.json gets every number (bench/bench_kernels.py's results) and is rewritten after each
part (the check, each launch count, each size), so a timeout keeps what finished; OUT.md
beside it gets the full tables at the end. ``--tests`` first runs tests/test_triton.py
(compiled on the GPU); gpu_check.sh runs that suite itself, so it calls this without
``--tests``. The timing stops adding configurations after ``--budget`` seconds (default 85)
so that the whole script stays inside gpu_check.sh's 120 s; what was left out is listed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_kernels  # noqa: E402
from gr_fused.backends.torch_backend import TorchBackend  # noqa: E402
from gr_fused.backends.triton_backend import TritonBackend  # noqa: E402


def human(n: int) -> str:
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,}"


def check_equality(n: int = 1_000_003, n_tensors: int = 7) -> Dict[str, str]:
    """One GR + SGD-momentum step's phases, compiled Triton kernels against the torch
    backend from identical tensors (odd sizes, several tensors): θ and fold·g1 after the
    perturb, θ and the momentum buffers after the update (the torch backend leaves
    gscale·G in the grads there, the kernels G); the worst error in units of the dtype's
    precision (pass: ≤ 2)."""
    results = {}
    triton, torch_backend = TritonBackend(), TorchBackend()
    for dtype in (torch.float32, torch.bfloat16):
        b = bench_kernels.make_bucket(triton, n, dtype, "sgd", n_tensors)
        ref = bench_kernels._flat_bucket(n, dtype, "sgd", dict(bench_kernels.SGD), n_tensors)
        for mine, theirs in ((b.params, ref.params), (b.grads, ref.grads)):
            for x, y in zip(mine, theirs):
                y.copy_(x)
        for st, rs in zip(b.states, ref.states):
            rs["momentum_buffer"].copy_(st["momentum_buffer"])
        pairs = []
        for k, bucket in ((triton, b), (torch_backend, ref)):
            sq = k.sq_norm(bucket, False)
            eps = (bench_kernels._scalar(0.01) / sq.sqrt()).float()
            k.perturb(bucket, eps, bench_kernels._scalar(0.3), False)
        pairs += [(x.clone(), y.clone())
                  for x, y in zip(b.params + b.grads, ref.params + ref.grads)]
        for k, bucket in ((triton, b), (torch_backend, ref)):
            k.update(bucket, bench_kernels._scalar(0.7), bench_kernels._scalar(0.0))
        pairs += list(zip(b.params, ref.params)) + [
            (s["momentum_buffer"], r["momentum_buffer"]) for s, r in zip(b.states, ref.states)]
        worst = 0.0
        for got, want in pairs:
            err = (got.double() - want.double()).abs() / want.double().abs().clamp_min(1.0)
            worst = max(worst, float(err.max()) / torch.finfo(dtype).eps)
        name = str(dtype).replace("torch.", "")
        results[name] = f"{'pass' if worst <= 2 else 'FAIL'} ({worst:.2f} ulps)"
    return results


def check_interval(n: int = 1_000_003, n_tensors: int = 7, steps: int = 7) -> Dict[str, object]:
    """interval=3 on the compiled kernels: ``steps`` steps of GRSGD (momentum, clipping) and
    GRAdamW with backend="triton" against backend="torch" from the same tensors (a smooth
    loss whose gradient changes with θ): ‖Δθ‖/‖θ‖ (pass: ≤ 1e-5); the device kernels of a
    refresh and of a step between refreshes (6 and 3 expected); a step between refreshes
    timed for both backends (ms, ``n`` fp32 elements)."""
    import gr_fused
    device = bench_kernels.DEVICE
    sizes = bench_kernels.split(n, n_tensors)
    start = [torch.randn(size, device=device) for size in sizes]
    coeffs = [torch.randn(size, device=device) for size in sizes]
    makers = {
        "sgd": lambda ps, b: gr_fused.GRSGD(ps, lr=0.05, momentum=0.9, gamma=0.05, rho=0.1,
                                            max_grad_norm=1.0, interval=3, backend=b),
        "adamw": lambda ps, b: gr_fused.GRAdamW(ps, lr=1e-2, gamma=0.05, interval=3, backend=b)}

    def run(make, backend):
        params = [t.clone().requires_grad_() for t in start]
        opt = make(params, backend)

        def closure():
            opt.zero_grad()
            loss = sum((0.5 * c * p.sin() + 0.25 * p * p).sum() for p, c in zip(params, coeffs))
            loss.backward()
            return loss
        for _ in range(steps):
            opt.step(closure)
        return torch.cat([p.detach().flatten() for p in params])

    out: Dict[str, object] = {}
    for name, make in makers.items():
        got, want = run(make, "triton"), run(make, "torch")
        err = float((got - want).norm() / want.norm())
        out[name] = f"{'pass' if err <= 1e-5 else 'FAIL'} ({err:.1e} after {steps} steps)"
    params = [torch.randn(size, device=device, requires_grad=True) for size in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    opt = gr_fused.GRSGD(params, lr=1e-3, momentum=0.9, gamma=0.0, alpha=0.5, rho=0.05,
                         interval=3, backend="triton")

    def refresh():
        opt.first_step()
        bench_kernels.second_backward(grads)
        opt.second_step(zero_grad=False)
    refresh()
    opt.step()  # the state and tables exist
    opt.step()
    out["launches"] = {"refresh": bench_kernels.step_launches(refresh)["kernels"],
                       "between refreshes": bench_kernels.step_launches(opt.step)["kernels"]}
    timed = {}
    for backend in ("triton", "torch"):
        params = [torch.randn(size, device=device, requires_grad=True) for size in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = gr_fused.GRSGD(params, lr=1e-3, momentum=0.9, gamma=0.0, alpha=0.5, rho=0.05,
                             interval=10 ** 9, backend=backend)  # one refresh, then reuse
        opt.first_step()
        bench_kernels.second_backward([p.grad for p in params])
        opt.second_step(zero_grad=False)
        timed[backend] = bench_kernels.median_ms(opt.step, 10 if bench_kernels.CUDA else 1)
    out["reuse step ms"] = {"n": n, **timed}
    return out


def short_table(results: dict) -> str:
    """One row per (dtype, size): copy bandwidth, each phase as % of it, the step times."""
    pct = {(r["dtype"], r["n"], r["phase"]): r for r in results["phases"]}
    phases = ["norm", "perturb", "update-sgd", "update-adamw", "gr-step"]
    lines = [f"equality (triton vs torch phases): {results.get('equality')}",
             f"interval=3 (triton vs torch steps, launches, reuse step): "
             f"{results.get('interval')}",
             f"tests: {results.get('tests')}",
             "| dtype | n | copy GB/s | " + " | ".join(f"{p} %" for p in phases)
             + " | step ms: floor / fused / triton / torch / SAM / SGD |",
             "|---" * (4 + len(phases)) + "|"]
    for s in results["steps"]:
        key = (s["dtype"], s["n"])
        cells = [f"{pct[key + (p,)]['pct_of_copy']:.0f}" for p in phases]
        times = " / ".join(f"{s[k]:.2f}" for k in ("floor_ms", "fused_phases_ms", "triton", "torch",
                                                    "sam-pattern", "torch-sgd"))
        lines.append(f"| {s['dtype']} | {human(s['n'])} | {pct[key + ('copy',)]['gbps']:.0f} | "
                     + " | ".join(cells) + f" | {times} |")
    for r in results["launches"]:
        lines.append(f"launches (device kernels) per step, {r['n_tensors']} tensors: " + ", ".join(
            f"{m} {v['kernels']}" for m, v in r.items() if m != "n_tensors"))
    if results["skipped"]:
        lines.append("left out (time budget): " + ", ".join(results["skipped"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="results JSON path (a .md with the tables is written beside it)")
    parser.add_argument("--tests", action="store_true", help="run tests/test_triton.py first")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds of timing at most")
    parser.add_argument("--sweep-blocks", action="store_true")
    parser.add_argument("--sizes", nargs="+", help="element counts (default: bench_kernels')")
    args = parser.parse_args()
    start = time.time()
    header = {"tests": "not run here (gpu_check.sh runs them)", "equality": "not run",
              "interval": "not run"}

    def save(results: dict) -> None:
        results.update(header, total_seconds=time.time() - start)
        bench_kernels.write_results(args.out, results)

    save({"phases": [], "steps": [], "launches": [], "skipped": [], "part": "started"})
    if args.tests:
        header["tests"] = bench_kernels.run_pytest(["tests/test_triton.py"], 150)
        save({"phases": [], "steps": [], "launches": [], "skipped": []})
    print(f"tests: {header['tests']}", flush=True)
    header["equality"] = check_equality() if bench_kernels.CUDA else check_equality(5003, 3)
    save({"phases": [], "steps": [], "launches": [], "skipped": []})
    print(f"equality: {header['equality']}", flush=True)
    try:
        header["interval"] = check_interval() if bench_kernels.CUDA else check_interval(5003, 3, 4)
    except Exception as exc:  # recorded, and the timing still runs
        header["interval"] = f"FAIL: {exc!r}"[:300]
    save({"phases": [], "steps": [], "launches": [], "skipped": []})
    print(f"interval=3: {header['interval']}", flush=True)
    argv = ["--budget", str(max(args.budget - (time.time() - start), 1.0))]
    argv += (["--sweep-blocks"] if args.sweep_blocks else [])
    argv += (["--sizes", *args.sizes] if args.sizes else [])
    results = bench_kernels.main(argv, on_part=save)  # prints the full tables
    save(results)
    bench_kernels.write_results(args.out, results,
                                f"tests: {header['tests']}\nequality: {header['equality']}\n\n"
                                f"{bench_kernels.table(results)}\n")
    print("\n== triton kernels: summary (% = achieved GB/s over the bytes each phase must "
          "move, relative to a device copy)")
    if results["interpreted"]:
        print(bench_kernels.NOTE_CPU)
    print(short_table(results))
    failed = "failed" in header["tests"] or "did not finish" in header["tests"]
    failed |= isinstance(header["equality"], dict) and any(
        not v.startswith("pass") for v in header["equality"].values())
    interval = header["interval"]
    failed |= not isinstance(interval, dict) or any(
        not interval[k].startswith("pass") for k in ("sgd", "adamw")) or interval[
        "launches"] != {"refresh": 6, "between refreshes": 3}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
