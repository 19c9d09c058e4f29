"""The CUDA kernels of csrc/ (backend "cuda") on a GPU: every phase's GB/s against a device
copy of the same size, the whole optimizer side of a GR step, launches per step, and a quick
equality check against the torch reference. Results go to OUT.json (and OUT.md) after every
configuration, so a run cut short keeps what it measured.

    python bench/gpu_cuda.py OUT.json [--sizes 1M 16M 64M 5000011] [--dtypes fp32 bf16]
                             [--tensors 100] [--reps 20] [--budget 80] [--tests]

* phases: each phase of the backend (sq_norm, perturb, reflect, restore, and the sgd /
  adamw / none updates) on a bucket of ``--tensors`` tensors of the size in all, the user's
  own tensors walked through the tensor table; timed with CUDA events (median of
  ``--reps``, L2 flushed before each), as GB/s over the bytes the phase must move
  (bench_kernels.PHASE_BYTES) and as % of ``dst.copy_(src)`` of the same size, measured in
  the same run;
* steps: first_step + second_step of GRSGD(backend="cuda"), and of "triton" and "torch"
  where they run, over the same tensors (ms); and a step of GRSGD(interval=k, "cuda")
  between refreshes ("cuda reuse");
* launches: device kernels per GR step (torch.profiler) for one param group and for three
  groups in three tables (6 and 4K + G + 1 = 16 expected), and with interval=3 for one
  group: a refresh (6) and a step between refreshes (3);
* equality: the shared harness (tests/equality.py: check_phases, check_fused_step) and
  test_cext.py's interval=k checks (check_interval_phases, check_fused_interval) on the
  CUDA backend; with ``--tests`` also the CUDA tests of tests/test_cext.py.

Without a CUDA device it says so and exits with status 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from bench_common import parse_size, split  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
SGD = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
GR = dict(rho=0.05, gamma=0.02, alpha=None, normalize=True, difference="forward",
          adaptive=False, max_grad_norm=None, eps_sign=1.0, combine_sign=1.0)
PHASES = ["norm", "perturb", "reflect", "restore", "update-sgd", "update-adamw", "update-none"]


class Timer:
    """Median ms of a CUDA callable with events, L2 flushed before each run."""

    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # warm-up (and first-use work)
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def make_bucket(backend, sizes: List[int], dtype: torch.dtype, algo: str):
    from gr_fused.backends.base import Bucket
    from gr_fused.optim.base import create_missing_state
    params = [torch.randn(s, device="cuda").to(dtype) for s in sizes]
    grads = [torch.randn(s, device="cuda").to(dtype) for s in sizes]
    group = dict(SGD) if algo != "adamw" else dict(ADAMW)
    b = Bucket(params, grads, [{} for _ in sizes], group, algo, {}, gr=dict(GR))
    b.backend = backend
    (b,) = backend.prepare(b)
    create_missing_state(b)
    b.flags = None  # later steps: the state is read
    backend.refresh(b)
    return b


def time_phases(backend, n: int, dtype: torch.dtype, n_tensors: int, timer: Timer,
                phase_bytes: Dict[str, tuple]) -> List[dict]:
    sizes = split(n, n_tensors)
    c = torch.float64 if dtype == torch.float64 else torch.float32
    eps, fold, gscale, found = (torch.tensor(v, dtype=c, device="cuda")
                                for v in (1e-6, 1.0, 1.0, 0.0))
    src = torch.randn(n, device="cuda").to(dtype)
    dst = torch.empty_like(src)
    size = src.element_size()
    copy_ms = timer(lambda: dst.copy_(src))
    copy_gbps = size * sum(phase_bytes["copy"]) * n / (copy_ms * 1e-3) / 1e9
    del src, dst
    rows = [dict(phase="copy", ms=copy_ms, gbps=copy_gbps, pct_of_copy=100.0)]
    sgd = make_bucket(backend, sizes, dtype, "sgd")
    runs = {"norm": lambda: backend.sq_norm(sgd, False),
            "perturb": lambda: backend.perturb(sgd, eps, fold, False),
            "reflect": lambda: backend.reflect(sgd),
            "restore": lambda: backend.restore(sgd),
            "update-sgd": lambda: backend.update(sgd, gscale, found)}
    for phase, fn in runs.items():
        rows.append(row(phase, timer(fn), n, size, phase_bytes, copy_gbps))
    del sgd, runs
    for algo in ("adamw", "none"):
        b = make_bucket(backend, sizes, dtype, algo)
        rows.append(row(f"update-{algo}", timer(lambda: backend.update(b, gscale, found)), n,
                        size, phase_bytes, copy_gbps))
        del b
    torch.cuda.empty_cache()
    return rows


def row(phase, ms, n, size, phase_bytes, copy_gbps):
    reads, writes = phase_bytes.get(phase, (1, 1))
    gbps = size * (reads + writes) * n / (ms * 1e-3) / 1e9
    return dict(phase=phase, ms=ms, gbps=gbps, pct_of_copy=100 * gbps / copy_gbps)


def time_steps(n: int, dtype: torch.dtype, n_tensors: int, timer: Timer) -> Dict[str, float]:
    import gr_fused
    from gr_fused import backends
    out = {}
    for name in ("cuda", "triton", "torch"):
        if backends.unavailable_reason(name, torch.device("cuda")) is not None:
            continue
        params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True)
                  for s in split(n, n_tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = gr_fused.GRSGD(params, lr=1e-3, momentum=0.9, gamma=0.0, alpha=0.5, rho=0.05,
                             backend=name)  # alpha = 0.5: fold = 1 keeps the grads as they are

        def step():
            opt.first_step()
            opt.second_step(zero_grad=False)
        out[name] = timer(step)
        if name == "cuda":  # interval=k between refreshes: dots, reuse finalize, update
            opt = gr_fused.GRSGD(params, lr=1e-3, momentum=0.9, gamma=0.0, alpha=0.5, rho=0.05,
                                 interval=10 ** 9, backend=name)
            step()  # the refresh
            out["cuda reuse"] = timer(opt.step)
        del params, opt
        torch.cuda.empty_cache()
    return out


def _kernels(fn) -> int:
    """Device kernels (not copies) that ``fn`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def count_interval_launches() -> Dict[str, int]:
    """GRSGD(interval=3, "cuda") over one param group: the kernels of a refresh (first_step
    + second_step) and of a step between refreshes, once the state exists."""
    import gr_fused
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 70001, 300, 5000)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, interval=3, backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for step in range(7):
        for p in params:  # "the first backward", into the same grads
            p.grad.copy_(torch.randn_like(p))
        if opt.refresh_due:
            count = _kernels(opt.first_step)
            for p in params:  # "the second backward" accumulates onto the grads
                p.grad.add_(torch.ones_like(p))
            out["refresh"] = count + _kernels(lambda: opt.second_step(zero_grad=False))
        else:
            out["between refreshes"] = _kernels(opt.step)
    return out


def count_launches(groups: int) -> int:
    """Device kernels (not copies) of one GR-SGD step over ``groups`` param groups (one
    table each), once the state exists and the tables are uploaded: first_step and
    second_step profiled, the backward passes simulated outside the profiled windows."""
    import gr_fused
    kernels = _kernels

    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 70001, 300, 5000)]
    param_groups = [{"params": params[g::groups]} for g in range(groups)]
    opt = gr_fused.GRSGD(param_groups, lr=0.1, momentum=0.9, gamma=0.05, backend="cuda")
    count = 0
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):  # the first creates the state, the second uploads new flags
        for p in params:  # "the first backward", into the same grads
            p.grad.copy_(torch.randn_like(p))
        count = kernels(opt.first_step)
        for p in params:  # "the second backward" accumulates onto the grads
            p.grad.add_(torch.ones_like(p))
        count += kernels(lambda: opt.second_step(zero_grad=False))
    return count


def check_equality() -> Dict[str, str]:
    """The shared harness on the CUDA backend: each phase and a fused step."""
    import equality as E
    import test_cext as T
    from gr_fused.backends import get_backend
    be = get_backend("cuda", torch.device("cuda"))
    results = {}
    for name, dtype in DTYPES.items():
        try:
            for algo in ("sgd", "adamw", "none"):
                E.check_phases(be, E.random_bucket(E.SIZES, dtype, "cuda", algo, with_state=True),
                               adaptive=True)
                E.check_phases(be, E.random_bucket(E.SIZES, dtype, "cuda", algo, misalign=True),
                               frozen=(0, 2))
            E.check_fused_step(be, [E.random_bucket(E.SIZES, dtype, "cuda", "adamw",
                                                    gr=E.scalar_group(alpha=0.7))],
                               scale=torch.tensor(1024.0, device="cuda"))
            for algo in ("sgd-momentum-wd", "adamw", "none"):  # interval=k
                T.check_interval_phases(be, T.interval_bucket(algo, dtype, "cuda",
                                                              with_state=True, misalign=True),
                                        adaptive=True)
                bs = T.fused_buckets("cuda", dtype, algo, 2, 2, max_grad_norm=0.5)
                for b in bs:
                    b.gr.update(T.INTERVAL_GR)
                    for p, st in zip(b.params, b.states):
                        st[T.DIRECTION] = torch.zeros_like(p)
                T.check_fused_interval(be, bs, scale=torch.tensor(256.0, device="cuda"))
            results[name] = "pass"
        except AssertionError as exc:
            results[name] = f"FAIL: {str(exc)[:300]}"
    return results


def short_table(res: dict) -> str:
    lines = [f"device: {res['device']}, torch {res['torch']}, gr_fused._C cuda archs "
             f"{res['cuda_archs']}; % = GB/s over the bytes each phase must move, relative "
             "to a device copy of the same size in the same run",
             f"equality (shared harness on 'cuda'): {res['equality']}",
             f"launches per GR-SGD step: {res['launches']}", f"tests: {res['tests']}", ""]
    lines.append("| dtype | n | tensors | copy GB/s | " + " | ".join(PHASES) + " |")
    lines.append("|---" * (4 + len(PHASES)) + "|")
    for cfg in res["configs"]:
        by = {r["phase"]: r for r in cfg["phases"]}
        lines.append(f"| {cfg['dtype']} | {cfg['n']:,} | {cfg['tensors']} | "
                     f"{by['copy']['gbps']:.0f} | "
                     + " | ".join(f"{by[p]['gbps']:.0f} ({by[p]['pct_of_copy']:.0f}%)"
                                  for p in PHASES) + " |")
    if any(cfg.get("steps") for cfg in res["configs"]):
        lines += ["", "optimizer side of a GR + SGD-momentum step, ms"]
        for cfg in res["configs"]:
            if cfg.get("steps"):
                lines.append(f"{cfg['dtype']} {cfg['n']:,}: " + ", ".join(
                    f"GRSGD {k} {v:.3f}" for k, v in cfg["steps"].items()))
    if res["skipped"]:
        lines.append("left out (time budget): " + ", ".join(res["skipped"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="results JSON path (a .md with the tables is written beside it)")
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M", "5000011"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=80.0, help="seconds of timing at most")
    parser.add_argument("--tests", action="store_true", help="run the CUDA tests of test_cext.py first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_cuda.py needs a CUDA device (none is visible here); nothing was measured")
        return 0
    from gr_fused import _ext, backends
    from bench_kernels import PHASE_BYTES, run_pytest, write_results
    why = backends.unavailable_reason("cuda", torch.device("cuda"))
    if why is not None:
        print(f"backend 'cuda' cannot run: {why}")
        return 1
    start = time.time()
    lib = _ext.load()
    backend = backends.get_backend("cuda", torch.device("cuda"))
    phase_bytes = dict(PHASE_BYTES, restore=(1, 1))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda_archs": lib.cuda_archs, "source_hash": lib.source_hash,
           "chunk": backend.chunk, "phase_bytes": phase_bytes,
           "tests": (run_pytest(["tests/test_cext.py", "-k", "cuda"], 300) if args.tests
                     else "not run (--tests)"),
           "equality": check_equality(),
           "launches": {"1 group": count_launches(1), "3 groups in 3 tables": count_launches(3),
                        "interval=3, 1 group": count_interval_launches()},
           "configs": [], "skipped": []}
    write_results(args.out, res, short_table(res) + "\n")
    print(f"tests: {res['tests']}\nequality: {res['equality']}\nlaunches: {res['launches']}",
          flush=True)
    timer = Timer(args.reps)
    for size in args.sizes:
        for name in args.dtypes:
            n, dtype = parse_size(size), DTYPES[name]
            if time.time() - start > args.budget:
                res["skipped"].append(f"{name} {size}")
                continue
            cfg = dict(dtype=name, n=n, tensors=args.tensors,
                       phases=time_phases(backend, n, dtype, args.tensors, timer, phase_bytes))
            if n <= 64 * 2 ** 20 and time.time() - start <= args.budget:
                cfg["steps"] = time_steps(n, dtype, args.tensors, timer)
            res["configs"].append(cfg)
            res["seconds"] = time.time() - start
            write_results(args.out, res, short_table(res) + "\n")  # after every configuration
            print(f"{name} {size} done at {time.time() - start:.0f} s", flush=True)
    print("\n== cuda kernels: summary")
    print(short_table(res))
    ok = all(v == "pass" for v in res["equality"].values()) and "failed" not in res["tests"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
