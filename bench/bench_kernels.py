"""Speed of the Triton kernels (gr_fused/kernels) against the bytes they must move.

For each size and dtype it times, side by side in one run (medians):

* every phase alone, run by the backend over a list of tensors (its tensor table), as
  achieved GB/s over the bytes that phase must move (``PHASE_BYTES``), next to a
  device-to-device copy of the same number of elements (the practical bandwidth limit);
* the optimizer side of a whole GR step (no backward passes): the fused phases (ascend +
  combine_update), ``GRSGD(backend="triton")`` and ``GRSGD(backend="torch")`` over the same
  tensors, the popular per-parameter SAM pattern (clone θ per tensor, a Python loop of adds,
  then torch.optim.SGD), and a plain torch.optim.SGD step for scale;
* device launches per step for 1, 100 and 10,000 tensors (torch.profiler's kernel events on
  CUDA; on CPU the Triton launches and torch ops as they are issued, :class:`DeviceWork`).

On a GPU it times with CUDA events (``triton.testing.do_bench``, which also clears L2
between runs) at 16M, an odd 11,173,962 and 64M elements (more with ``--sizes``). Without one
the kernels run under the Triton interpreter on tiny sizes: those numbers check that the
script works and are NOT speed figures.

    python bench/bench_kernels.py [--sizes 16M 11173962] [--dtypes fp32 bf16] [--json PATH]
"""
from __future__ import annotations

import argparse
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
from gr_fused.backends.triton_backend import TritonBackend  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import PHASE_BYTES, SAMPattern, parse_size, split, write_results  # noqa: E402,F401

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NOTE_CPU = ("NOTE: no GPU: the Triton kernels ran under the Triton interpreter on tiny "
            "sizes; these numbers are NOT speed figures.")

# host-side calls that start device work (reported beside the kernels on CUDA)
LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
KERNEL_NAMES = set(kernels.KERNEL_NAMES)


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


SGD = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# fixed α = 0.5: fold = (1 − α)/α = 1, so repeated phases keep G's values
GR = dict(rho=0.05, normalize=True, gamma=0.0, alpha=0.5, difference="forward",
          adaptive=False, max_grad_norm=None, eps_sign=1.0, combine_sign=1.0)


def _flat_bucket(n: int, dtype: torch.dtype, algo: str, group: dict,
                 n_tensors: int = 1) -> Bucket:
    """A bucket of ``n_tensors`` fresh random tensors (``split(n, n_tensors)`` elements)
    with their grads and the state of ``algo``'s update (random; never time on zeros), not
    yet prepared by a backend."""
    def rand(size):
        return torch.randn(size, device=DEVICE, dtype=dtype)
    sizes = split(n, n_tensors)
    params, grads = [rand(s) for s in sizes], [rand(s) for s in sizes]
    states = []
    for s in sizes:
        if algo == "sgd":
            states.append({"momentum_buffer": rand(s)})
        elif algo == "adamw":
            states.append({"step": _scalar(3.0), "exp_avg": rand(s), "exp_avg_sq": rand(s).abs()})
        else:
            states.append({})
    return Bucket(params, grads, states, group, algo, {}, gr=dict(GR))


def make_bucket(backend, n: int, dtype: torch.dtype, algo: str, n_tensors: int = 1) -> Bucket:
    """``_flat_bucket`` prepared by ``backend`` (its table built: the bucket as it runs)."""
    group = {"sgd": SGD, "adamw": ADAMW}.get(algo, {})
    b = _flat_bucket(n, dtype, algo, dict(group), n_tensors)
    b.backend = backend
    (part,) = backend.prepare(b)
    return part


def phase_runs(k, sgd: Bucket, adamw: Bucket, none: Bucket) -> Dict[str, Callable[[], object]]:
    """One callable per phase of backend ``k`` on the given prepared buckets (the values they
    hold are kept: fold = 1 and gscale = 1), and ``gr-step``: the fused phases as the step
    driver calls them, scalars included."""
    one, zero, eps = _scalar(1.0), _scalar(0.0), _scalar(1e-4)
    skips = SkipRecord(torch.zeros((), dtype=torch.int64, device=sgd.device),
                       torch.empty((), dtype=torch.bool, device=sgd.device), None)
    k.perturb(sgd, eps, one, False)  # the backup holds θ before reflect/restore/update run

    def gr_step():
        k.combine_update([sgd], k.ascend([sgd], None), None, skips)

    return {
        "norm": lambda: k.sq_norm(sgd, False),
        "perturb": lambda: k.perturb(sgd, eps, one, False),
        "reflect": lambda: k.reflect(sgd),
        "restore": lambda: k.restore(sgd),
        "update-sgd": lambda: k.update(sgd, one, zero),
        "update-adamw": lambda: k.update(adamw, one, zero),
        "update-none": lambda: k.update(none, one, zero),
        "gr-step": gr_step,
    }


def bench_phases(n: int, dtype: torch.dtype, n_tensors: int, reps: int) -> Dict[str, float]:
    """Median ms of each phase over ``n_tensors`` tensors of n elements in all, and of a copy
    of n elements."""
    k = TritonBackend()
    sgd, adamw, none = (make_bucket(k, n, dtype, algo, n_tensors)
                        for algo in ("sgd", "adamw", "none"))
    src = torch.randn(n, device=DEVICE, dtype=dtype)
    dst = torch.empty(n, device=DEVICE, dtype=dtype)
    runs = {"copy": lambda: dst.copy_(src), **phase_runs(k, sgd, adamw, none)}
    return {name: median_ms(fn, reps) for name, fn in runs.items()}


METHODS = ["triton", "torch", "sam-pattern", "torch-sgd"]


def make_method(method: str, n: int, dtype: torch.dtype, n_tensors: int):
    """A zero-argument step function for the optimizer side of one step (grads stay set)."""
    params = [torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True)
              for s in split(n, n_tensors)]
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

    grads = [p.grad for p in params]

    def step():
        opt.first_step()
        second_backward(grads)
        opt.second_step(zero_grad=False)
    return step


def second_backward(grads: List[torch.Tensor]) -> None:
    """What the second backward does to the grads, as far as the step driver can tell (it
    checks that each grad was written after first_step): their version counters move. The
    values stay (fold = 1 keeps G = g), and no device work is issued."""
    try:
        torch.autograd.graph.increment_version(grads)
    except TypeError:  # torch versions whose increment_version takes one tensor
        for g in grads:
            torch.autograd.graph.increment_version(g)


def bench_steps(n: int, dtype: torch.dtype, n_tensors: int, reps: int) -> Dict[str, float]:
    out = {}
    for method in METHODS:
        step = make_method(method, n, dtype, n_tensors)
        out[method] = median_ms(step, reps)
        del step
        if CUDA:
            torch.cuda.empty_cache()
    return out


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
        self._saved: List[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (not self._paused and not func.is_view
                and func.overloadpacket.__name__ not in self.NO_KERNEL):
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
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        work = self
        for cls in (JITFunction, InterpretedFunction):  # every kernel launch goes through run
            original = cls.__dict__["run"]

            def run(kernel, *args, _original=original, **kw):
                if not work._paused:
                    work.names.append(kernel.fn.__name__)
                return work.excluding(_original)(kernel, *args, **kw)

            self._saved.append((cls, original))
            cls.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        while self._saved:
            cls, original = self._saved.pop()
            cls.run = original
        return super().__exit__(*exc)


def device_work(fn) -> List[str]:
    """The names of the device work ``fn()`` issues (see :class:`DeviceWork`)."""
    with DeviceWork() as work:
        fn()
    return work.names


def step_launches(step: Callable[[], object]) -> Dict[str, object]:
    """The device work of one call of ``step``: ``kernels`` (how many kernels ran on the
    device), ``triton`` (how many of them are gr_fused's Triton kernels) and ``names`` (the
    kernels' names, in order). On CUDA from torch.profiler's device kernel events only
    (``copies``: its memcpy/memset events, and ``launch_calls``: the host-side launch API
    calls, are reported apart); on CPU every Triton launch and every torch op that runs a
    kernel, as issued (:class:`DeviceWork`)."""
    if not CUDA:
        names = device_work(step)
        return {"kernels": len(names), "triton": sum(n in KERNEL_NAMES for n in names),
                "copies": 0, "names": names}
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in events if e.name.startswith(("Memcpy", "Memset"))]
    device = [e for e in events if e not in copies]
    names = [next((k for k in KERNEL_NAMES if e.name.startswith(k)), e.name) for e in device]
    api = [e for e in prof.events() if e.name in LAUNCH_CALLS]
    return {"kernels": len(device), "triton": sum(n in KERNEL_NAMES for n in names),
            "copies": len(copies), "launch_calls": len(api), "names": names}


def count_launches(method: str, n_tensors: int, dtype=torch.float32) -> Dict[str, object]:
    """Device kernels in one steady-state step of ``method`` over n_tensors tensors
    (:func:`step_launches`, without the names)."""
    step = make_method(method, 64 * n_tensors, dtype, n_tensors)
    step()  # the first step builds the tables and state
    counts = step_launches(step)
    counts.pop("names")
    return counts


def gbps(name: str, n: int, dtype: torch.dtype, ms: float) -> float:
    reads, writes = PHASE_BYTES[name]
    return (reads + writes) * n * dtype.itemsize / (ms * 1e-3) / 1e9


def run(sizes: List[int], dtypes: List[str], n_tensors: int, launch_counts: List[int],
        reps: int, budget_s: float = float("inf"), sweep_blocks: bool = False,
        on_part: Optional[Callable[[dict], None]] = None) -> dict:
    """Time everything: launch counts first, then sizes in the order given, so that when
    ``budget_s`` seconds have passed only the last configurations are left out.
    ``on_part(results)`` is called after each part (to save what has finished)."""
    start = time.time()
    results = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
               "torch": torch.__version__, "triton": __import__("triton").__version__,
               "interpreted": kernels.INTERPRETED, "phase_bytes": PHASE_BYTES,
               "chunk": TritonBackend().chunk, "n_tensors": n_tensors,
               "launches": [], "phases": [], "steps": [], "blocks": [], "skipped": []}

    def done_part():
        results["seconds"] = time.time() - start
        if on_part is not None:
            on_part(results)

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
            done_part()
    for n in sizes:
        for name in dtypes:
            if out_of_time(f"{name} n={n}"):
                continue
            dtype = DTYPES[name]
            ms = bench_phases(n, dtype, n_tensors, reps)
            copy_bw = gbps("copy", n, dtype, ms["copy"])
            for phase, t in ms.items():
                bw = gbps(phase, n, dtype, t)
                results["phases"].append(dict(dtype=name, n=n, n_tensors=n_tensors, phase=phase,
                                              ms=t, gbps=bw, pct_of_copy=100 * bw / copy_bw))
            floor_ms = ms["copy"] * sum(PHASE_BYTES["gr-step"]) / sum(PHASE_BYTES["copy"])
            steps = bench_steps(n, dtype, n_tensors, reps)
            results["steps"].append(dict(dtype=name, n=n, n_tensors=n_tensors,
                                         floor_ms=floor_ms, fused_phases_ms=ms["gr-step"], **steps))
            if CUDA:
                torch.cuda.empty_cache()
            done_part()
    if sweep_blocks and not out_of_time("chunk sweep"):
        results["blocks"] = sweep_chunks(sizes[0], DTYPES[dtypes[0]], n_tensors, reps)
        done_part()
    results["seconds"] = time.time() - start
    return results


def sweep_chunks(n: int, dtype: torch.dtype, n_tensors: int, reps: int) -> List[dict]:
    """GB/s of perturb and the SGD update for a few chunk sizes (elements per program)."""
    rows = []
    one, zero, eps = _scalar(1.0), _scalar(0.0), _scalar(1e-4)
    for chunk in (1024, 2048, 4096, 8192):
        k = TritonBackend(chunk)
        b = make_bucket(k, n, dtype, "sgd", n_tensors)
        k.perturb(b, eps, one, False)
        for phase, fn in (("perturb", lambda: k.perturb(b, eps, one, False)),
                          ("update-sgd", lambda: k.update(b, one, zero))):
            t = median_ms(fn, reps)
            rows.append(dict(chunk=chunk, phase=phase, n=n, ms=t, gbps=gbps(phase, n, dtype, t)))
    return rows


def _launch_cell(v: dict) -> str:
    return f"{v['kernels']} ({v['triton']})"


def table(results: dict) -> str:
    """The short markdown summary."""
    lines = [f"device: {results['device']}, torch {results['torch']}, triton {results['triton']}, "
             f"chunk {results['chunk']}"]
    if results["interpreted"]:
        lines.append(NOTE_CPU)
    lines += ["", f"phases over {results['n_tensors']} tensors (a tensor table); copy: one "
              "tensor of the same size",
              "| dtype | n | phase | ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
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
        methods = [k for k in results["launches"][0] if k != "n_tensors"]
        lines += ["", "device kernels per steady-state step, gr_fused's Triton kernels in brackets"
                  + ("" if CUDA else " (CPU: Triton launches and torch ops, as issued)"),
                  "| tensors | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for r in results["launches"]:
            lines.append(f"| {r['n_tensors']:,} | "
                         + " | ".join(_launch_cell(r[m]) for m in methods) + " |")
    if results["blocks"]:
        lines += ["", "elements per chunk (one program), GB/s", "| chunk | phase | ms | GB/s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['chunk']} | {r['phase']} | {r['ms']:.4f} | {r['gbps']:.1f} |"
                  for r in results["blocks"]]
    if results["skipped"]:
        lines.append(f"\nskipped (time budget): {', '.join(results['skipped'])}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None,
         on_part: Optional[Callable[[dict], None]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+",
                        default=["16M", "11173962", "64M"] if CUDA else ["8K", "10001"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--tensors", type=int, default=100 if CUDA else 3,
                        help="tensors the phases and step comparisons split the elements into")
    parser.add_argument("--launch-counts", nargs="*", type=int,
                        default=[1, 100, 10000] if CUDA else [1, 100])
    parser.add_argument("--reps", type=int, default=10 if CUDA else 1)
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds")
    parser.add_argument("--sweep-blocks", action="store_true",
                        help="also time a few chunk sizes at the first size")
    parser.add_argument("--json", help="write all results here (after each part)")
    args = parser.parse_args(argv)

    def save(results):
        if args.json:
            write_results(args.json, results)
        if on_part is not None:
            on_part(results)

    results = run([parse_size(s) for s in args.sizes], args.dtypes, args.tensors,
                  args.launch_counts, args.reps, args.budget, args.sweep_blocks, save)
    save(results)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
