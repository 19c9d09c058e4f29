"""The step path makes no host sync (docs/design.md §2, §4): no .item(), bool() or float() of a
tensor while GRSGD/GRAdamW step. On a GPU, torch.cuda.set_sync_debug_mode checks the same.

The torch backend reads its skip flag where tensors live in host memory (a CPU: no sync
there, and torch's foreach optimizers beat its fused kernels); here it is also run as on any
other device (``TorchBackend.host_devices`` emptied), where it must read nothing."""
import contextlib

import pytest
import torch

import gr_fused


@contextlib.contextmanager
def forbid_host_reads():
    names = ["item", "__bool__", "__float__", "__int__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def trap(name):
        def raiser(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called in the step path")
        return raiser

    for n in names:
        setattr(torch.Tensor, n, trap(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.fixture
def as_on_a_device(monkeypatch):
    """The torch backend's path for tensors off the host (fused kernels, device flags)."""
    from gr_fused.backends.torch_backend import TorchBackend
    monkeypatch.setattr(TorchBackend, "host_devices", set())


@pytest.mark.parametrize("backend", [n for n in ("torch", "triton", "cpu")
                                     if gr_fused.backends.unavailable_reason(n, "cpu") is None])
@pytest.mark.parametrize("make", [
    lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, max_grad_norm=1.0, backend=b),
    lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, difference="central", backend=b),
    lambda p, b: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend=b),
    lambda p, b: gr_fused.GR(p, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4,
                             gamma=0.05, backend=b),
], ids=["sgd-clip", "sgd-central", "adamw", "gr-around-sgd"])
def test_gr_step_reads_nothing_back_to_the_host(make, backend, as_on_a_device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = make(model.parameters(), backend)
    losses = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        return loss

    opt.step(closure)  # first step creates state (allowed to do anything)
    with forbid_host_reads():
        for _ in range(3):
            opt.step(closure)
    assert float(losses[-1]) < float(losses[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_sync_on_cuda_with_sync_debug_mode():
    model = torch.nn.Linear(64, 64).cuda()
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.05)
    x = torch.randn(32, 64, device="cuda")

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
