"""The CUDA part of the GPU check (called by bench/gpu_check.sh): time the CUDA kernels of
csrc/ (backend "cuda") beside the Triton kernels and a device copy, at 16M, 64M and 256M
elements in fp32 and bf16, write the results and print a short table last.

    python bench/gpu_cuda.py OUT.json [--tests] [--budget SECONDS] [--sizes 16M 64M 256M]

* every phase on flat buffers (the same buffers for both kernel sets), timed with CUDA
  events (triton.testing.do_bench: medians, L2 cleared between runs; every buffer is ≥ 64 MB,
  beyond the H200's L2), as GB/s over the bytes the phase must move (bench_kernels.PHASE_BYTES)
  and as % of the copy's GB/s measured in the same run;
* the optimizer side of a whole GR step, GRSGD(backend="cuda"/"triton"/"torch") over 100
  tensors;
* a quick equality check of the timed kernels against the torch reference phases (every
  run), and with ``--tests`` the CUDA tests of tests/test_cext.py first (gpu_check.sh runs
  that file itself, so it calls this without ``--tests``).

OUT.json gets every number, OUT.md beside it the tables. Timing stops adding
configurations after ``--budget`` seconds (default 80), so the script fits in 120 s; what
was left out is listed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import gr_fused  # noqa: E402
from gr_fused import _ext, backends  # noqa: E402
from gr_fused.backends.cext_backend import CKernels  # noqa: E402
from gr_fused.backends.torch_backend import TorchBackend  # noqa: E402
import bench_kernels as bk  # noqa: E402  (shared helpers: buckets, timing, bytes per phase)

PHASES = ["norm", "perturb", "reflect", "update-sgd", "update-adamw", "update-none", "gr-step"]


def kernel_sets() -> Dict[str, object]:
    sets = {"cuda": CKernels()}
    if backends.unavailable_reason("triton", torch.device("cuda")) is None:
        from gr_fused.backends.triton_backend import TritonFlatKernels
        sets["triton"] = TritonFlatKernels()
    return sets


def time_phases(n: int, dtype: torch.dtype, reps: int) -> List[dict]:
    sgd, adamw = bk._flat_bucket(n, dtype, "sgd", bk.SGD), bk._flat_bucket(n, dtype, "adamw", bk.ADAMW)
    none = bk._flat_bucket(n, dtype, "none", {})
    src, dst = torch.randn(n, device="cuda", dtype=dtype), torch.empty(n, device="cuda", dtype=dtype)
    copy_ms = bk.median_ms(lambda: dst.copy_(src), reps)
    copy_bw = bk.gbps("copy", n, dtype, copy_ms)
    rows = [dict(kernels="torch", phase="copy", ms=copy_ms, gbps=copy_bw, pct_of_copy=100.0)]
    runs = {name: bk.phase_runs(k, sgd, adamw, none) for name, k in kernel_sets().items()}
    for phase in PHASES:
        for name, fns in runs.items():  # cuda and triton side by side, phase by phase
            ms = bk.median_ms(fns[phase], reps)
            bw = bk.gbps(phase, n, dtype, ms)
            rows.append(dict(kernels=name, phase=phase, ms=ms, gbps=bw,
                             pct_of_copy=100 * bw / copy_bw))
    return rows


def time_step(name: str, n: int, dtype: torch.dtype, n_tensors: int, reps: int) -> float:
    """Optimizer side of one GR + SGD-momentum step (grads stay set; fold = 1 keeps them)."""
    params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True)
              for s in bk._split(n, n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = gr_fused.GRSGD(params, lr=1e-3, momentum=0.9, gamma=0.0, alpha=0.5, rho=0.05,
                         backend=name)

    def step():
        opt.first_step()
        opt.second_step(zero_grad=False)
    return bk.median_ms(step, reps)


def time_steps(n: int, dtype: torch.dtype, n_tensors: int, reps: int) -> Dict[str, float]:
    out = {}
    for name in ["cuda", "torch"] + (["triton"] if "triton" in kernel_sets() else []):
        out[name] = time_step(name, n, dtype, n_tensors, reps)
        torch.cuda.empty_cache()
    return out


def check_equality(n: int = 1_000_003) -> Dict[str, str]:
    """The timed CUDA kernels against the torch reference phases, one GR step's phases on
    an odd size: max error in units of the dtype's precision (≤ 2 passes)."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        b = bk._flat_bucket(n, dtype, "sgd", bk.SGD)
        ref = bk._flat_bucket(n, dtype, "sgd", bk.SGD)
        for x, y in ((b.params, ref.params), (b.grads, ref.grads), (b.extra["backup"], ref.extra["backup"])):
            y[0].copy_(x[0])
        ref.states[0]["momentum_buffer"].copy_(b.states[0]["momentum_buffer"])
        worst = 0.0
        for k, bucket in ((CKernels(), b), (TorchBackend(), ref)):
            sq = k.sq_norm(bucket, False)
            k.perturb(bucket, bk._scalar(0.01) / sq.sqrt(), bk._scalar(0.3), False)
            k.update(bucket, bk._scalar(0.7), bk._scalar(0.0))
        for got, want in ((b.params[0], ref.params[0]), (b.grads[0], ref.grads[0]),
                          (b.states[0]["momentum_buffer"], ref.states[0]["momentum_buffer"])):
            err = (got.double() - want.double()).abs() / want.double().abs().clamp_min(1.0)
            worst = max(worst, float(err.max()) / torch.finfo(dtype).eps)
        results[str(dtype).replace("torch.", "")] = f"{'pass' if worst <= 2 else 'FAIL'} ({worst:.2f} ulps)"
    return results


def short_table(res: dict) -> str:
    lines = [f"device: {res['device']}, torch {res['torch']}, gr_fused._C cuda archs "
             f"{res['cuda_archs']}; % = GB/s over the bytes each phase must move, relative to a "
             "device copy in the same run", f"equality (cuda vs torch phases): {res['equality']}",
             f"tests: {res['tests']}", ""]
    kinds = sorted({r["kernels"] for r in res["phases"]} - {"torch"})
    lines.append("| dtype | n | copy GB/s | " + " | ".join(f"{p} % ({'/'.join(kinds)})" for p in PHASES)
                 + " |")
    lines.append("|---" * (3 + len(PHASES)) + "|")
    by = {}
    for r in res["phases"]:
        by[(r["dtype"], r["n"], r["kernels"], r["phase"])] = r
    for dtype, n in res["configs"]:
        cells = ["/".join(f"{by[(dtype, n, k, p)]['pct_of_copy']:.0f}" for k in kinds) for p in PHASES]
        copy = by[(dtype, n, "torch", "copy")]["gbps"]
        lines.append(f"| {dtype} | {n // 2 ** 20}M | {copy:.0f} | " + " | ".join(cells) + " |")
    if res["steps"]:
        lines += ["", "optimizer side of a GR + SGD-momentum step over 100 tensors, ms"]
        for s in res["steps"]:
            lines.append(f"{s['dtype']} {s['n'] // 2 ** 20}M: " + ", ".join(
                f"GRSGD {k} {v:.3f}" for k, v in s.items() if k not in ("dtype", "n")))
    if res["skipped"]:
        lines.append("left out (time budget): " + ", ".join(res["skipped"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="results JSON path (a .md with the tables is written beside it)")
    parser.add_argument("--tests", action="store_true", help="run the CUDA tests of test_cext.py first")
    parser.add_argument("--budget", type=float, default=80.0, help="seconds of timing at most")
    parser.add_argument("--sizes", nargs="+", default=["16M", "64M", "256M"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(bk.DTYPES))
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_cuda.py needs a CUDA device")
        return 2
    why = backends.unavailable_reason("cuda", torch.device("cuda"))
    if why is not None:
        print(f"backend 'cuda' cannot run: {why}")
        return 1
    start = time.time()
    lib = _ext.load()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda_archs": lib.cuda_archs, "source_hash": lib.source_hash,
           "tests": (bk.run_pytest(["tests/test_cext.py", "-k", "cuda"], 150) if args.tests
                     else "not run here (gpu_check.sh runs them)"),
           "equality": check_equality(), "phases": [], "steps": [], "configs": [], "skipped": []}
    print(f"tests: {res['tests']}\nequality: {res['equality']}", flush=True)
    for size in args.sizes:
        for name in args.dtypes:
            n, dtype = bk.parse_size(size), bk.DTYPES[name]
            if time.time() - start > args.budget:
                res["skipped"].append(f"{name} {size}")
                continue
            for row in time_phases(n, dtype, args.reps):
                res["phases"].append(dict(dtype=name, n=n, **row))
            torch.cuda.empty_cache()
            res["configs"].append((name, n))
            if n <= 64 * 2 ** 20 and time.time() - start <= args.budget:
                res["steps"].append(dict(dtype=name, n=n, **time_steps(n, dtype, 100, args.reps)))
            print(f"{name} {size} done at {time.time() - start:.0f} s", flush=True)
    res["seconds"] = time.time() - start
    table = short_table(res)
    bk.write_results(args.out, res, table + "\n")
    print("\n== cuda kernels: summary")
    print(table)
    ok = all(v.startswith("pass") for v in res["equality"].values()) and "failed" not in res["tests"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
