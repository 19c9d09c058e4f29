"""The flat-buffer layer (gr_fused/backends/flat.py) driven by the torch reference math must
equal the per-tensor torch backend, and keep params, grads and state as views."""
import copy

import pytest
import torch

import gr_fused
from equality import CASE_IDS, CASES, compare_backends


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flat_layer_matches_torch_backend(case):
    compare_backends(case, "flat-torch")


def test_params_grads_and_state_become_views_of_one_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, backend="flat-torch")
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    closure()
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    gptrs = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    bptrs = {opt.state[p]["momentum_buffer"].untyped_storage().data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(gptrs) == len(bptrs) == 1
    # zero_grad keeps the views and zeroes them
    opt.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert {p.grad.untyped_storage().data_ptr() for p in model.parameters()} == gptrs


def test_non_contiguous_params_fall_back_with_one_warning():
    a = torch.randn(5, 4).t().requires_grad_()  # non-contiguous leaf
    b = torch.randn(3, requires_grad=True)
    opt = gr_fused.GRSGD([a, b], lr=0.1, backend="flat-torch")
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = gr_fused.GRSGD([ref_a, ref_b], lr=0.1, backend="torch")

    def closure_for(o, x, y):
        def closure():
            o.zero_grad()
            loss = (x.sin().sum() + (y ** 3).sum())
            loss.backward()
            return loss
        return closure

    with pytest.warns(UserWarning, match="non-contiguous"):
        opt.step(closure_for(opt, a, b))
    ref.step(closure_for(ref, ref_a, ref_b))
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


@pytest.mark.parametrize("backend", [n for n in ("flat-torch", "cpu", "triton")
                                     if gr_fused.backends.unavailable_reason(n, "cpu") is None])
def test_cached_buckets_follow_replaced_grads_new_groups_and_loaded_state(backend):
    """The flat buckets are reused between steps only while nothing was replaced: grads set
    to None by model.zero_grad(), a param group added, a state_dict loaded, all mid-run,
    must give the torch backend's trajectory."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    x = torch.randn(16, 5)
    results = []
    for name in (backend, "torch"):
        model = copy.deepcopy(base)
        extra = torch.nn.Parameter(torch.ones(3))
        opt = gr_fused.GRSGD(model.parameters(), lr=0.05, momentum=0.9, gamma=0.05, backend=name)

        def closure():
            opt.zero_grad()
            loss = model(x).square().mean() + (extra.sin() ** 2).sum()
            loss.backward()
            return loss

        for step in range(6):
            if step == 2:
                model.zero_grad()  # set_to_none: fresh grads next backward
            if step == 3:
                opt.add_param_group({"params": [extra], "lr": 0.1})
            if step == 4:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt.step(closure)
        results.append([p.detach().clone() for p in [*model.parameters(), extra]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
