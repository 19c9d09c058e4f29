"""Extra persistent memory over the base optimizer: one copy of the parameters (the exact
backup of θ) for every GR mode, none with GR off. Counted, not timed (bench/memory.py)."""
import importlib.util
import pathlib

import pytest

spec = importlib.util.spec_from_file_location(
    "bench_memory", pathlib.Path(__file__).parents[1] / "bench" / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("mode", list(memory.MODES))
def test_extra_memory_is_at_most_one_copy_of_the_parameters(mode, backend):
    ours, base = memory.MODES[mode]
    base_bytes, param_bytes = memory.measure(base)
    our_bytes, _ = memory.measure(lambda p: ours(p, backend))
    extra = our_bytes - base_bytes
    if "gamma=0" in mode:
        assert extra <= 64  # at most a few scalars
    else:
        assert abs(extra - param_bytes) <= 1024  # the backup, give or take a few scalars


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_interval_steps_peak_at_one_more_copy_than_full_gr(backend):
    """interval=k keeps one more copy of the parameters (the cached direction), and its
    steps need no more temporaries than a full GR step: peak memory of fd-gr-k5 within one
    copy (plus slack) of fd-gr's, measured by the profiler on one 4 MiB weight."""
    torch = pytest.importorskip("torch")
    from gr_fused.profile import compare

    n = 1024

    def factory(batch_size, device):
        model = torch.nn.Linear(n, n, bias=False)
        return model, torch.randn(batch_size, n), lambda m, x: m(x).pow(2).mean()

    report = compare(factory, device="cpu", batch_size=2, warmup=0, repeat=1, progress=False,
                     methods="fd-gr,fd-gr-k5", backends=backend)
    peak = {r["method"]: r["peak_memory_bytes"] for r in report["results"]}
    weight = n * n * 4
    assert peak["fd-gr-k5"] <= peak["fd-gr"] + 1.25 * weight, (peak, weight)
