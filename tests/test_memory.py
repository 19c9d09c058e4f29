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
