"""How the profiler measures a step: time, peak memory and matmul/conv FLOPs."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, List, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

TIMER = {"cuda": "CUDA events around each step (torch.cuda.Event)",
         "cpu": "time.perf_counter around each step"}

MEMORY_MEASURE = {
    "cuda": "the most bytes of CUDA tensors allocated at once during the first {steps} steps,"
            " counted from before the model was built (torch.cuda.max_memory_allocated): "
            "model, batch, grads, optimizer state and buffers, activations",
    "cpu": "the most bytes of CPU tensors allocated at once during the first {steps} steps, "
           "counted from before the model was built (running sum of torch.profiler's "
           "allocation and free events): model, batch, grads, optimizer state and buffers, "
           "activations",
}


class StepTimer:
    """Times steps on one device; ``times_ms()`` waits for the device and returns them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda_events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._times_ms: List[float] = []

    def time(self, step: Callable[[], Any]) -> Any:
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = step()
            end.record()
            self._cuda_events.append((start, end))
            return out
        start = time.perf_counter()
        out = step()
        self._times_ms.append((time.perf_counter() - start) * 1e3)
        return out

    def times_ms(self) -> List[float]:
        if self._cuda_events:
            torch.cuda.synchronize(self.device)
            self._times_ms += [start.elapsed_time(end) for start, end in self._cuda_events]
            self._cuda_events.clear()
        return list(self._times_ms)


def measure_peak_memory(build: Callable[[], None], run: Callable[[], None],
                        device: torch.device) -> int:
    """Call ``build()`` then ``run()``; return the most tensor bytes allocated on ``device``
    at once during ``run()``, counting from just before ``build()`` (so what ``build`` keeps,
    the model and batch, is counted, and what was allocated before it is not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        build()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_measure_peak(build, run)


_RUN_MARK = "gr_fused.profile:run"


def _cpu_measure_peak(build, run) -> int:
    """The same from the allocation (+bytes) and free (−bytes) events of CPU blocks that
    torch.profiler records with profile_memory: the bytes live at once, counting only blocks
    allocated since the start of ``build``, maximized over the ``run`` part (marked by a
    record_function range)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():  # some torch builds log a line at profiler start and stop
        prof.start()
    try:
        build()
        with record_function(_RUN_MARK):
            run()
    finally:
        with _stderr_silenced():
            prof.stop()
    nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    run_start = min(n.start_time_ns for n in nodes if n.name == _RUN_MARK)
    allocations = sorted((n for n in nodes if n.tag == _EventType.Allocation
                          and n.extra_fields.device.type == "cpu"),
                         key=lambda n: n.start_time_ns)
    block_bytes = {}  # address -> size of the blocks allocated in this session and live
    live, peak = 0, None  # peak: None until run() has started
    for node in allocations:
        if peak is None and node.start_time_ns >= run_start:
            peak = live  # the bytes live when run() started count too
        size, address = node.extra_fields.alloc_size, node.extra_fields.ptr
        if size > 0:
            block_bytes[address] = size
            live += size
        else:  # a free; one of a block from before build() is not ours
            live -= block_bytes.pop(address, 0)
        if peak is not None:
            peak = max(peak, live)
    return live if peak is None else peak


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_flops(run: Callable[[], None]) -> int:
    """Matmul/conv FLOPs of ``run()`` as counted by torch.utils.flop_counter.FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()
