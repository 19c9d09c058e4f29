"""The Triton part of the GPU check (called by bench/gpu_check.sh): time the kernels at 16M,
64M and 256M elements in fp32 and bf16 against a device copy, compare whole optimizer steps,
count launches, write the results and print a short table last.

    python bench/gpu_triton.py OUT.json [--tests] [--budget SECONDS] [--sweep-blocks]

OUT.json gets every number (bench/bench_kernels.py's results); OUT.md beside it the full
tables. ``--tests`` first runs tests/test_triton.py and tests/test_flat.py (compiled on the
GPU); gpu_check.sh runs those suites itself, so it calls this without ``--tests``. The timing
stops adding configurations after ``--budget`` seconds (default 85) so that the whole script
stays inside gpu_check.sh's 120 s; what was left out is listed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_kernels  # noqa: E402


def human(n: int) -> str:
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,}"


def short_table(results: dict) -> str:
    """One row per (dtype, size): copy bandwidth, each phase as % of it, the step times."""
    pct = {(r["dtype"], r["n"], r["phase"]): r for r in results["phases"]}
    phases = ["norm", "perturb", "update-sgd", "update-adamw", "gr-step"]
    lines = ["| dtype | n | copy GB/s | " + " | ".join(f"{p} %" for p in phases)
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
        lines.append(f"launches, {r['n_tensors']} tensors: " + ", ".join(
            f"{m} {v.get('device_ops', v['triton'])}" for m, v in r.items() if m != "n_tensors"))
    if results["skipped"]:
        lines.append("left out (time budget): " + ", ".join(results["skipped"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="results JSON path (a .md with the tables is written beside it)")
    parser.add_argument("--tests", action="store_true", help="run the Triton/flat tests first")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds of timing at most")
    parser.add_argument("--sweep-blocks", action="store_true")
    args = parser.parse_args()
    start = time.time()
    tests = (bench_kernels.run_pytest(["tests/test_triton.py", "tests/test_flat.py"], 150)
             if args.tests else "not run here (gpu_check.sh runs them)")
    print(f"tests: {tests}", flush=True)
    argv = ["--budget", str(args.budget)] + (["--sweep-blocks"] if args.sweep_blocks else [])
    results = bench_kernels.main(argv)  # prints the full tables
    results["tests"] = tests
    results["total_seconds"] = time.time() - start
    bench_kernels.write_results(args.out, results,
                                f"tests: {tests}\n\n{bench_kernels.table(results)}\n")
    print("\n== triton kernels: summary (% = achieved GB/s over the bytes each phase must "
          "move, relative to a device copy)")
    if results["interpreted"]:
        print(bench_kernels.NOTE_CPU)
    print(short_table(results))
    return 0 if "failed" not in tests and "did not finish" not in tests else 1


if __name__ == "__main__":
    sys.exit(main())
