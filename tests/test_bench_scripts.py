"""The benchmark entry points run: the pytest-benchmark suite (each benchmark once, timing
off) and the one-call GPU check, dry-run here (every GPU step says it needs a CUDA device,
at most 8 files come back, inside its budget)."""
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_benchmark_suite_runs():
    env = dict(os.environ, GR_BENCH_PARAMS="20K", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: Triton times CUDA tensors only
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "bench/test_bench.py", "--benchmark-disable"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="240", BUILD="0")
    env.pop("TRITON_INTERPRET", None)
    start = time.time()
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - start < 240
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert sorted(os.path.basename(f) for f in files) == ["details.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    lines = summary.splitlines()
    for step in ("equality suites", "timings (triton)", "timings (cuda)", "profiler"):
        said = [line for line in lines if line.startswith(f"- {step}")]
        assert len(said) == 1 and said[0].endswith(": skipped, needs a CUDA device"), summary
