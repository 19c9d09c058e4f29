"""Speed of the Triton kernels (gr_fused/kernels) against the bytes they must move.

For each size and dtype it times, side by side in one run (medians):

* every phase alone, as achieved GB/s over the bytes that phase must move (``PHASE_BYTES``),
  next to a device-to-device copy of the same size (the practical bandwidth limit);
* the optimizer side of a whole GR step (no backward passes): the fused phases on a flat
  bucket, ``GRSGD(backend="triton")`` and ``GRSGD(backend="torch")`` over a list of tensors,
  the popular per-parameter SAM pattern (clone θ per tensor, a Python loop of adds, then
  torch.optim.SGD), and a plain torch.optim.SGD step for scale;
* device launches per step for 1, 100 and 10,000 tensors (torch.profiler on CUDA; on CPU
  the Triton launches and torch ops as they are issued, :class:`DeviceWork`).

On a GPU it times with CUDA events (``triton.testing.do_bench``, which also clears L2
between runs) at 16M, 64M and 256M elements. Without one the kernels run under the Triton
interpreter on tiny sizes: those numbers check that the script works and are NOT speed
figures.

    python bench/bench_kernels.py [--sizes 16M 64M] [--dtypes fp32 bf16] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of gr_fused.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gr_fused  # noqa: E402
from gr_fused import kernels  # noqa: E402
from gr_fused.backends.base import Bucket, SkipRecord  # noqa: E402
from gr_fused.backends.triton_backend import TritonFlatKernels  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NOTE_CPU = ("NOTE: no GPU: the Triton kernels ran under the Triton interpreter on tiny "
            "sizes; these numbers are NOT speed figures.")

# Elements of the storage dtype each phase must read and write per parameter element.
PHASE_BYTES = {
    "copy":         (1, 1),  # dst ← src, the reference bandwidth
    "norm":         (1, 0),  # Σ g²: read g (norm(g1) and norm(G) each)
    "perturb":      (2, 3),  # read θ, g; write backup, θ, fold·g
    "reflect":      (3, 2),  # read backup, θ, G; write θ, −G   (central difference only)
    "update-sgd":   (3, 2),  # read backup, G, buf; write θ, buf   (SGD with momentum)
    "update-adamw": (4, 3),  # read backup, G, m, v; write θ, m, v
    "update-none":  (2, 2),  # read backup, G; write θ, g   (GR around a torch optimizer)
    # the optimizer side of a GR + SGD-momentum step: norm + perturb + norm + update-sgd
    "gr-step":      (7, 5),  # fp32: 28 B read + 20 B written = 48 B per parameter
}
LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaMemcpyAsync", "cudaMemsetAsync"}  # host-side calls that start device work
KERNEL_NAMES = {"_partial_sq_kernel", "_finalize_kernel", "_ascent_scalars_kernel",
                "_update_scalars_kernel", "_perturb_kernel", "_reflect_kernel",
                "_sgd_kernel", "_adamw_kernel", "_advance_step_kernel",
                "_restore_combine_kernel"}


def run_pytest(args: List[str], timeout_s: int) -> str:
    """The summary line of ``pytest -q -x ARGS`` run from the repository root, or why it did
    not finish (the GPU scripts record it with their results)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x"] + args
    try:
        done = subprocess.run(cmd, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    ".."),
                              capture_output=True, text=True, timeout=timeout_s)
        return (done.stdout + done.stderr).strip().splitlines()[-1]
    except subprocess.TimeoutExpired:
        return f"tests did not finish in {timeout_s} s"


def write_results(path: str, results: dict, markdown: Optional[str] = None) -> None:
    """``results`` as JSON at ``path`` (folders made as needed) and, when given, ``markdown``
    in a .md file beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if markdown is not None:
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(markdown)


def parse_size(text: str) -> int:
    text = text.upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median time of ``fn`` in ms: CUDA events via do_bench on a GPU, wall clock on CPU."""
    if CUDA:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=max(reps * 10, 50),
                                             return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=DEVICE)


def _flat_bucket(n: int, dtype: torch.dtype, algo: str, group: dict) -> Bucket:
    def rand():
        return torch.randn(n, device=DEVICE, dtype=dtype)  # never time on zeros
    state = {"momentum_buffer": rand()} if algo == "sgd" else {}
    if algo == "adamw":
        state = {"step": _scalar(3.0), "exp_avg": rand(), "exp_avg_sq": rand().abs()}
    return Bucket([rand()], [rand()], [state], group, algo, {"backup": [rand()]})


SGD = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
           rho=0.05, normalize=True, gamma=0.0, alpha=0.5, difference="forward",
           adaptive=False, max_grad_norm=None)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def phase_runs(k, sgd: Bucket, adamw: Bucket, none: Bucket) -> Dict[str, object]:
    """One callable per phase of kernel set ``k`` on the given flat buckets (the values they
    hold are kept: fold = 1 and gscale = 1), and ``gr-step``: the fused phases as the step
    driver calls them, scalars included."""
    one, zero, eps = _scalar(1.0), _scalar(0.0), _scalar(1e-4)
    skips = SkipRecord(torch.zeros((), dtype=torch.int64, device=sgd.device),
                       torch.empty((), dtype=torch.bool, device=sgd.device), None)

    def gr_step():  # fixed α = 0.5 (SGD's GR keys): fold = 1, so G keeps its values
        k.combine_update([sgd], k.ascend([sgd], None), None, skips)

    return {
        "norm": lambda: k.sq_norm(sgd, False),
        "perturb": lambda: k.perturb(sgd, eps, one, False),
        "reflect": lambda: k.reflect(sgd),
        "update-sgd": lambda: k.update(sgd, one, zero),
        "update-adamw": lambda: k.update(adamw, one, zero),
        "update-none": lambda: k.update(none, one, zero),
        "gr-step": gr_step,
    }


def bench_phases(n: int, dtype: torch.dtype, reps: int) -> Dict[str, float]:
    """Median ms of each phase on flat buffers of n elements, and of a same-size copy."""
    sgd, adamw = _flat_bucket(n, dtype, "sgd", SGD), _flat_bucket(n, dtype, "adamw", ADAMW)
    none = _flat_bucket(n, dtype, "none", {})
    src, dst = torch.randn(n, device=DEVICE, dtype=dtype), torch.empty(n, device=DEVICE, dtype=dtype)
    runs = {"copy": lambda: dst.copy_(src), **phase_runs(TritonFlatKernels(), sgd, adamw, none)}
    return {name: median_ms(fn, reps) for name, fn in runs.items()}


def _split(n: int, n_tensors: int) -> List[int]:
    """n elements as n_tensors sizes of a few different shapes (not multiples of a block)."""
    base = max(n // n_tensors, 1)
    sizes = [base + (i % 7) * 13 for i in range(n_tensors)]
    sizes[-1] += n - sum(sizes) if n > sum(sizes) else 0
    return sizes


class SAMPattern:
    """The optimizer side of the popular per-parameter SAM implementation: first_step clones
    θ per tensor and adds ρ·g/‖g‖ in a Python loop; second_step puts θ back and steps
    torch.optim.SGD (with its default foreach implementation)."""

    def __init__(self, params, rho=0.05, **sgd):
        self.params, self.rho = params, rho
        self.base = torch.optim.SGD(params, **sgd)

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        self.old = []
        for p in self.params:
            self.old.append(p.data.clone())
            p.add_(p.grad * scale.to(p))

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for p, old in zip(self.params, self.old):
            p.data = old
        self.base.step()


def make_method(method: str, n: int, dtype: torch.dtype, n_tensors: int):
    """A zero-argument step function for the optimizer side of one step (grads stay set)."""
    params = [torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True)
              for s in _split(n, n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = dict(lr=SGD["lr"], momentum=SGD["momentum"])
    if method in ("triton", "torch"):  # fixed α = 0.5: fold = 1, so G keeps its values
        opt = gr_fused.GRSGD(params, gamma=0.0, alpha=0.5, rho=0.05, backend=method, **sgd)
    elif method == "sam-pattern":
        opt = SAMPattern(params, **sgd)
    elif method == "torch-sgd":
        opt = torch.optim.SGD(params, **sgd)
        return opt.step
    else:
        raise ValueError(method)

    def step():
        opt.first_step()
        opt.second_step(zero_grad=False)
    return step


METHODS = ["triton", "torch", "sam-pattern", "torch-sgd"]


def bench_steps(n: int, dtype: torch.dtype, n_tensors: int, reps: int) -> Dict[str, float]:
    out = {}
    for method in METHODS:
        step = make_method(method, n, dtype, n_tensors)
        out[method] = median_ms(step, reps)
        del step
        if CUDA:
            torch.cuda.empty_cache()
    return out


def count_launches(method: str, n_tensors: int, dtype=torch.float32) -> Dict[str, int]:
    """Device operations in one steady-state step: all kernels, memcpy/memset, and how many
    of the kernels are gr_fused's Triton kernels. On CUDA torch.profiler sees them; on CPU
    they are counted as they are issued (:func:`device_work`)."""
    step = make_method(method, 64 * n_tensors, dtype, n_tensors)
    step()  # the first step builds flat buffers and state
    if not CUDA:
        work = device_work(step)
        return {"device_ops": len(work), "triton": sum(name in KERNEL_NAMES for name in work)}
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    api = [e for e in events if e.name in LAUNCH_CALLS]
    return {"device_ops": len(device), "launch_calls": len(api),
            "triton": sum(any(e.name.startswith(k) for k in KERNEL_NAMES) for e in device)}


class DeviceWork(TorchDispatchMode):
    """Names every unit of device work as it is issued, on any device: each Triton kernel
    launch (compiled or interpreted; the tensor ops the interpreter runs inside a launch are
    its own business and not counted) and each torch op that runs a kernel (views and
    allocations do not). ``excluding(fn)`` wraps a function (a closure) whose work is not
    counted, so a GR step's optimizer side can be counted apart from its backward passes."""

    NO_KERNEL = {"empty", "empty_like", "empty_strided", "lift_fresh",
                 "_record_function_enter_new", "_record_function_exit"}  # profiler marks

    def __init__(self):
        super().__init__()
        self.names: List[str] = []
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused and not func.is_view and func.overloadpacket.__name__ not in self.NO_KERNEL:
            self.names.append("aten." + func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def excluding(self, fn):
        def run(*args, **kw):
            self._paused += 1
            try:
                return fn(*args, **kw)
            finally:
                self._paused -= 1
        return run

    def __enter__(self):
        cls = type(kernels.triton_norm._partial_sq_kernel)  # JITFunction or InterpretedFunction
        self._cls, self._original = cls, cls.run
        work = self

        def run(kernel, *args, **kw):
            if not work._paused:
                work.names.append(kernel.fn.__name__)
            return work.excluding(work._original)(kernel, *args, **kw)

        cls.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        self._cls.run = self._original
        return super().__exit__(*exc)


def device_work(fn) -> List[str]:
    """The names of the device work ``fn()`` issues (see :class:`DeviceWork`)."""
    with DeviceWork() as work:
        fn()
    return work.names


def gbps(name: str, n: int, dtype: torch.dtype, ms: float) -> float:
    reads, writes = PHASE_BYTES[name]
    return (reads + writes) * n * dtype.itemsize / (ms * 1e-3) / 1e9


def run(sizes: List[int], dtypes: List[str], n_tensors: int, launch_counts: List[int],
        reps: int, budget_s: float = float("inf"), sweep_blocks: bool = False) -> dict:
    """Time everything: launch counts first, then sizes from small to large, so that when
    ``budget_s`` seconds have passed only the largest configurations are left out."""
    start = time.time()
    results = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
               "torch": torch.__version__, "triton": __import__("triton").__version__,
               "interpreted": kernels.INTERPRETED, "phase_bytes": PHASE_BYTES,
               "launches": [], "phases": [], "steps": [], "blocks": [], "skipped": []}

    def out_of_time(what):
        if time.time() - start > budget_s:
            results["skipped"].append(what)
            return True
        return False

    for count in launch_counts:
        if not out_of_time(f"launch count for {count} tensors"):
            row = {"n_tensors": count}
            for method in METHODS if CUDA else ["triton"]:
                row[method] = count_launches(method, count)
            results["launches"].append(row)
    for n in sizes:
        for name in dtypes:
            if out_of_time(f"{name} n={n}"):
                continue
            dtype = DTYPES[name]
            ms = bench_phases(n, dtype, reps)
            copy_bw = gbps("copy", n, dtype, ms["copy"])
            for phase, t in ms.items():
                bw = gbps(phase, n, dtype, t)
                results["phases"].append(dict(dtype=name, n=n, phase=phase, ms=t, gbps=bw,
                                              pct_of_copy=100 * bw / copy_bw))
            floor_ms = ms["copy"] * sum(PHASE_BYTES["gr-step"]) / sum(PHASE_BYTES["copy"])
            steps = bench_steps(n, dtype, n_tensors, reps)
            results["steps"].append(dict(dtype=name, n=n, n_tensors=n_tensors,
                                         floor_ms=floor_ms, fused_phases_ms=ms["gr-step"], **steps))
            if CUDA:
                torch.cuda.empty_cache()
    if sweep_blocks and not out_of_time("block sweep"):
        results["blocks"] = sweep_block_sizes(sizes[0], DTYPES[dtypes[0]], reps)
    results["seconds"] = time.time() - start
    return results


def sweep_block_sizes(n: int, dtype: torch.dtype, reps: int) -> List[dict]:
    """GB/s of perturb and the SGD update for a few elements-per-program choices."""
    rows = []
    one, zero, eps = _scalar(1.0), _scalar(0.0), _scalar(1e-4)
    b = _flat_bucket(n, dtype, "sgd", SGD)
    for block in (1024, 2048, 4096, 8192):
        k = TritonFlatKernels(block=block)
        for phase, fn in (("perturb", lambda: k.perturb(b, eps, one, False)),
                          ("update-sgd", lambda: k.update(b, one, zero))):
            t = median_ms(fn, reps)
            rows.append(dict(block=block, phase=phase, n=n, ms=t, gbps=gbps(phase, n, dtype, t)))
    return rows


def table(results: dict) -> str:
    """The short markdown summary."""
    lines = [f"device: {results['device']}, torch {results['torch']}, triton {results['triton']}"]
    if results["interpreted"]:
        lines.append(NOTE_CPU)
    lines += ["", "| dtype | n | phase | ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for r in results["phases"]:
        lines.append(f"| {r['dtype']} | {r['n']:,} | {r['phase']} | {r['ms']:.4f} | "
                     f"{r['gbps']:.1f} | {r['pct_of_copy']:.0f}% |")
    lines += ["", "optimizer side of one GR + SGD-momentum step (no backward), ms; floor: the "
              "48 B/param (fp32; 24 B bf16) it must move, at copy bandwidth",
              "| dtype | n | tensors | floor | fused phases | GRSGD triton | GRSGD torch | "
              "SAM pattern | torch SGD |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["steps"]:
        lines.append(f"| {r['dtype']} | {r['n']:,} | {r['n_tensors']} | {r['floor_ms']:.3f} | "
                     f"{r['fused_phases_ms']:.3f} | {r['triton']:.3f} | {r['torch']:.3f} | "
                     f"{r['sam-pattern']:.3f} | {r['torch-sgd']:.3f} |")
    if results["launches"]:
        lines += ["", "device work per steady-state step: every launch, gr_fused's Triton kernels in "
                  "brackets" + ("" if CUDA else " (CPU: Triton launches and torch ops, as issued)"),
                  "| tensors | " + " | ".join(k for k in results["launches"][0] if k != "n_tensors")
                  + " |", "|---" * len(results["launches"][0]) + "|"]
        for r in results["launches"]:
            cells = [f"{v['device_ops']} ({v['triton']})" if "device_ops" in v else str(v["triton"])
                     for k, v in r.items() if k != "n_tensors"]
            lines.append(f"| {r['n_tensors']:,} | " + " | ".join(cells) + " |")
    if results["blocks"]:
        lines += ["", "elements per program (BLOCK), GB/s", "| BLOCK | phase | ms | GB/s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['block']} | {r['phase']} | {r['ms']:.4f} | {r['gbps']:.1f} |"
                  for r in results["blocks"]]
    if results["skipped"]:
        lines.append(f"\nskipped (time budget): {', '.join(results['skipped'])}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["16M", "64M", "256M"] if CUDA else ["32K"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--tensors", type=int, default=100 if CUDA else 8,
                        help="tensors the step comparisons split the parameters into")
    parser.add_argument("--launch-counts", nargs="*", type=int,
                        default=[1, 100, 10000] if CUDA else [1, 100])
    parser.add_argument("--reps", type=int, default=10 if CUDA else 3)
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds")
    parser.add_argument("--sweep-blocks", action="store_true",
                        help="also time a few BLOCK sizes at the first size")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args(argv)
    results = run([parse_size(s) for s in args.sizes], args.dtypes, args.tensors,
                  args.launch_counts, args.reps, args.budget, args.sweep_blocks)
    if args.json:
        write_results(args.json, results)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
