"""Benchmarks (pytest-benchmark) of the optimizer side of a step and of a whole training
step, with the baselines in the same run, so that one run gives ratios side by side:

    pytest bench/ --benchmark-only                          # everything that runs here
    pytest bench/ --benchmark-only --benchmark-save=before  # then, after a change:
    pytest bench/ --benchmark-only --benchmark-compare      # against the saved run
    GR_BENCH_PARAMS=2M pytest bench/ --benchmark-only       # a smaller model

Groups (``--benchmark-group-by=group``, the default here):

* ``optimizer-side``: GR_BENCH_PARAMS parameters (default 10M on CUDA, 4M on a CPU) in 50
  fp32 tensors, SGD with momentum 0.9 and weight decay. Every entry includes writing its
  gradients in place of the backward passes (one device copy per gradient it needs: one
  for SGD, two for the GR methods), so what differs is the optimizer. Entries: a copy of
  the parameters (the memory bandwidth floor), ``torch.optim.SGD`` (foreach), the popular
  per-parameter SAM pattern (clone θ, per-tensor ascent, ``p.data = old``, torch SGD), and
  ``GRSGD`` and ``SAM`` on every gr_fused backend that runs here.
* ``whole-step``: an MLP of 2.9M parameters (1024-1024-1024-10, batch 128) with real
  forward and backward passes: SGD, the popular SAM pattern, and ``GRSGD`` and ``SAM`` on
  every backend.

On a CPU, absolute times on a shared machine are noise; compare entries of one run. The
Triton kernels run on CUDA tensors only (under the interpreter they are not timed here).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import gr_fused
from gr_fused import backends

from bench_common import SAMPattern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TENSORS = 50


def _count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


PARAMS = _count(os.environ.get("GR_BENCH_PARAMS", "10M" if DEVICE == "cuda" else "4M"))
BACKENDS = [name for name in ("torch", "cpu", "cuda", "triton")
            if backends.unavailable_reason(name, DEVICE) is None
            and not (name == "triton" and DEVICE == "cpu")]  # the interpreter: not a timing


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def tensors():
    torch.manual_seed(0)
    per = PARAMS // TENSORS
    params = [torch.nn.Parameter(torch.randn(per, device=DEVICE)) for _ in range(TENSORS)]
    g1 = [torch.randn(per, device=DEVICE) for _ in range(TENSORS)]
    g2 = [torch.randn(per, device=DEVICE) for _ in range(TENSORS)]
    return params, g1, g2


def _write(params, grads, accumulate=False):
    """The stand-in backward: the gradients written (accumulated) into p.grad."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        elif accumulate:
            p.grad.add_(g)
        else:
            p.grad.copy_(g)


# ---------------------------------------------------------------------------- optimizer side
@pytest.mark.benchmark(group="optimizer-side")
def test_copy_of_the_parameters(benchmark, tensors):
    params, g1, _ = tensors
    dst = [torch.empty_like(p) for p in params]

    def run():
        torch._foreach_copy_(dst, params)
        _sync()
    benchmark(run)


@pytest.mark.benchmark(group="optimizer-side")
def test_torch_sgd(benchmark, tensors):
    params, g1, _ = tensors
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=1e-4, foreach=True)

    def run():
        _write(params, g1)
        opt.step()
        _sync()
    benchmark(run)


@pytest.mark.benchmark(group="optimizer-side")
def test_sam_pattern(benchmark, tensors):
    """The popular per-parameter SAM: clone θ, θ += ρ·g/‖g‖ tensor by tensor, the second
    gradient, p.data = old θ, torch SGD."""
    params, g1, g2 = tensors
    opt = SAMPattern(params, rho=0.05, lr=1e-6, momentum=0.9, weight_decay=1e-4, foreach=True)

    def run():
        _write(params, g1)
        opt.first_step()
        _write(params, g2)
        opt.second_step()
        _sync()
    benchmark(run)


def _gr_run(opt, params, g1, g2, sam=False):
    def run():
        _write(params, g1)
        opt.first_step()
        _write(params, g2, accumulate=True)
        opt.second_step(zero_grad=False)
        _sync()
    return run


@pytest.mark.benchmark(group="optimizer-side")
@pytest.mark.parametrize("backend", BACKENDS)
def test_grsgd(benchmark, tensors, backend):
    params, g1, g2 = tensors
    opt = gr_fused.GRSGD(params, lr=1e-6, momentum=0.9, weight_decay=1e-4, gamma=0.05,
                         rho=0.05, backend=backend)
    benchmark(_gr_run(opt, params, g1, g2))


@pytest.mark.benchmark(group="optimizer-side")
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam(benchmark, tensors, backend):
    params, g1, g2 = tensors
    opt = gr_fused.SAM(params, torch.optim.SGD, rho=0.05, lr=1e-6, momentum=0.9,
                       weight_decay=1e-4, backend=backend)
    benchmark(_gr_run(opt, params, g1, g2))


# ---------------------------------------------------------------------------- whole step
@pytest.fixture(scope="module")
def mlp_data():
    torch.manual_seed(1)
    return torch.randn(128, 1024, device=DEVICE), torch.randint(0, 10, (128,), device=DEVICE)


def _mlp():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 10)).to(DEVICE)


@pytest.mark.benchmark(group="whole-step")
def test_whole_step_sgd(benchmark, mlp_data):
    model, (x, y) = _mlp(), mlp_data
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def run():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        _sync()
    benchmark(run)


@pytest.mark.benchmark(group="whole-step")
def test_whole_step_sam_pattern(benchmark, mlp_data):
    model, (x, y) = _mlp(), mlp_data
    opt = SAMPattern(list(model.parameters()), rho=0.05, lr=1e-3, momentum=0.9,
                     weight_decay=1e-4)

    def run():
        opt.base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        opt.base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
        _sync()
    benchmark(run)


@pytest.mark.benchmark(group="whole-step")
@pytest.mark.parametrize("method", ["GRSGD", "SAM"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_step_gr(benchmark, mlp_data, method, backend):
    model, (x, y) = _mlp(), mlp_data
    if method == "GRSGD":
        opt = gr_fused.GRSGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
                             gamma=0.05, rho=0.05, backend=backend)
    else:
        opt = gr_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3,
                           momentum=0.9, weight_decay=1e-4, backend=backend)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def run():
        if method == "SAM":
            closure()  # SAM.step takes the gradients already computed, as the popular SAM
        opt.step(closure)
        _sync()
    benchmark(run)
