"""The Triton backend (gr_fused/backends/triton_backend.py, gr_fused/kernels/).

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), with a GPU they run compiled: the same tests check both.

* the shared equality cases (tests/equality.py) against the torch backend;
* every phase against TorchBackend on the user's own tensors (tensor tables): each dtype,
  algorithm, with and without state, skipped, frozen tensors, misaligned tensors (the
  unaligned kernel variant), channels_last, empty, one-element and many tiny tensors;
* the fused step (ascend / combine_update) against the driver's general path: groups,
  several tables and dtypes, AMP, clipping, inf/NaN;
* the arithmetic helpers bit for bit (fma, bf16 rounding, β^step), int64 offsets;
* determinism of the norm, launches per step, no host sync, a device guard around every
  launch, scratch reuse, the auto selection, and (tests/triton_aot.py) what the compiler
  makes of every kernel variant for sm_80 and sm_90.
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import gr_fused
from gr_fused import _scalars, backends, kernels
from gr_fused.amp import GradScaler
from gr_fused.backends import triton_backend
from gr_fused.backends.base import DIRECTION, SkipRecord
from gr_fused.backends.multi_tensor import table_of
from gr_fused.backends.triton_backend import TritonBackend
from gr_fused.kernels import triton_common
from gr_fused.optim.base import create_direction_state, create_missing_state
import equality
from equality import (ADAMW_GROUP, CASE_IDS, CASES, SCALAR_HPARAM_IDS, SCALAR_HPARAMS,
                      SGD_GROUPS, SIZES, assert_close, check_fused_step, check_nan_in_G_skips,
                      check_phases, check_reflect, check_restore, closure_for, compare_backends,
                      TORCH, assert_same_tensors, clone_bucket, device_scalar, prepared,
                      random_bucket, scalar_group, scalars_close, state_of)
from test_nosync import forbid_host_reads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = kernels.INTERPRETED
BACKEND = TritonBackend()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
SMALL = [(1,), (0,), (7, 3), (1000,), (4099,)]  # 0 and 1 element, odd, two chunks


def bucket(sizes=SIZES, dtype=torch.float32, algo="sgd", group=None, **kw):
    return random_bucket(sizes, dtype, DEVICE, algo, group=group, **kw)


# ----------------------------------------------------------------------- shared equality cases
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_backend(case):
    if INTERPRETED and case.name == "sgd-tiny-tensors":
        # 500 one-program tensors per launch; under the interpreter 2 steps say as much as 5
        case = dataclasses.replace(case, steps=2)
    compare_backends(case, "triton", device=DEVICE)


def test_bf16_steps_match_torch_one_step_at_a_time():
    """bf16 through the optimizer, each step compared from identical inputs (the reference's
    parameters and state are copied over after each comparison), so rounding differences
    are not compounded by the dynamics."""
    shapes = [(7,), (1000, 3), (4099,), (1,)]
    params = [torch.randn(s, device=DEVICE).bfloat16().requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in params]
    coeffs = [torch.randn(s, device=DEVICE) for s in shapes]
    opts = [gr_fused.GRSGD(ps, backend=b, lr=0.02, momentum=0.9, weight_decay=1e-2,
                           gamma=0.002, rho=0.05) for ps, b in ((params, "triton"), (ref, "torch"))]

    def closure_of(opt, ps):
        def closure():
            opt.zero_grad()
            loss = equality.loss_of(ps, coeffs)
            loss.backward()
            return loss
        return closure

    for step in range(3):
        for opt, ps in zip(opts, (params, ref)):
            opt.step(closure_of(opt, ps))
        assert_close(torch.cat([p.flatten() for p in params]),
                     torch.cat([p.flatten() for p in ref]), equality.TOL[torch.bfloat16],
                     f"bf16 params after step {step + 1}")
        for p, r in zip(params, ref):
            mine, theirs = opts[0].state[p]["momentum_buffer"], opts[1].state[r]["momentum_buffer"]
            assert_close(mine, theirs, equality.TOL[torch.bfloat16], f"bf16 momentum, step {step}")
            with torch.no_grad():
                p.copy_(r)
                mine.copy_(theirs)


def test_params_run_through_the_kernels_and_stay_the_users_tensors():
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 4099, 1)]
    addresses = [p.data_ptr() for p in params]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    for _ in range(2):
        opt.step(closure_for(opt, params))
    (extra,) = opt._bucket_extra.values()
    table = extra["table"]
    assert "fallback" not in extra and table.num_tensors == 3
    assert table.host_row("param") == addresses == [p.data_ptr() for p in params]
    assert opt.backends == {str(params[0].device): "triton"}


def test_tensors_a_kernel_cannot_walk_take_the_torch_path_with_a_warning():
    base = torch.randn(10, 10, device=DEVICE)
    view = base[:, ::2]  # gaps in memory: not walkable
    params = [torch.nn.Parameter(torch.randn(33, device=DEVICE)), torch.nn.Parameter(view)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    ref_opt = gr_fused.GRSGD(ref, lr=0.1, momentum=0.9, gamma=0.05, backend="torch")
    with pytest.warns(UserWarning, match="torch path"):
        opt.step(closure_for(opt, params))
    ref_opt.step(closure_for(ref_opt, ref))
    for a, b in zip(params, ref):
        assert_close(a, b, 1e-6, "mixed kernel / torch path")


# ----------------------------------------------------------------------- every phase
ALGOS = [("sgd", name) for name in SGD_GROUPS] + [("adamw", None), ("none", None)]
ALGO_IDS = [f"sgd-{name}" for name in SGD_GROUPS] + ["adamw", "none"]


def _group(algo, name):
    if algo == "sgd":
        return dict(SGD_GROUPS[name])
    return dict(ADAMW_GROUP) if algo == "adamw" else {}


@pytest.mark.parametrize("with_state", [False, True], ids=["new-state", "with-state"])
@pytest.mark.parametrize("algo,name", ALGOS, ids=ALGO_IDS)
def test_phases_fp32(algo, name, with_state):
    check_phases(BACKEND, bucket(SIZES, torch.float32, algo, _group(algo, name),
                                 with_state=with_state))


@pytest.mark.parametrize("with_state", [False, True], ids=["new-state", "with-state"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("algo,name", ALGOS, ids=ALGO_IDS)
def test_phases_low_precision(algo, name, dtype, with_state):
    """bf16 and fp16: computed in fp32, rounded once to nearest even on the way back (the
    sizes of SMALL and a 2-D one: a full chunk, masked ones, empty and one-element tensors;
    the tensors of many chunks are the fp32 tests')."""
    check_phases(BACKEND, bucket(SMALL + [(33, 65)] if with_state else SMALL, dtype, algo,
                                 _group(algo, name), with_state=with_state))


@pytest.mark.parametrize("with_state", [False, True], ids=["new-state", "with-state"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("algo,name", ALGOS, ids=ALGO_IDS)
def test_skipped_update_restores_theta_and_writes_nothing_else(algo, name, dtype, with_state):
    check_phases(BACKEND, bucket(SMALL, dtype, algo, _group(algo, name), with_state=with_state),
                 skip=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("algo,name", [("sgd", "momentum-wd"), ("adamw", None), ("none", None)],
                         ids=["sgd", "adamw", "none"])
def test_frozen_tensors_are_only_restored(algo, name, dtype):
    check_phases(BACKEND, bucket(SMALL, dtype, algo, _group(algo, name), with_state=True),
                 frozen=(2, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("algo,name", [("sgd", "nesterov"), ("adamw", None), ("none", None)],
                         ids=["sgd", "adamw", "none"])
def test_misaligned_tensors_take_the_unaligned_variant(algo, name, dtype):
    b = bucket(SMALL, dtype, algo, _group(algo, name), with_state=True, misalign=True)
    kb, _ = check_phases(BACKEND, b)
    assert not table_of(kb).aligned
    aligned = prepared(BACKEND, bucket(SMALL, dtype, algo, _group(algo, name)))
    assert table_of(aligned).aligned


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("algo,name", [("sgd", "momentum-wd"), ("adamw", None)],
                         ids=["sgd", "adamw"])
def test_channels_last_tensors(algo, name, dtype):
    b = bucket([(2, 3, 4, 5), (3, 8, 2, 2), (5,)], dtype, algo, _group(algo, name),
               with_state=True, channels_last=True)
    assert not b.params[0].is_contiguous()
    check_phases(BACKEND, b)


def test_many_tiny_tensors():
    check_phases(BACKEND, bucket([(3,)] * 40 + [(1,)] * 20 + [(0,)] * 3, torch.float32, "sgd",
                                 with_state=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adaptive_norm_and_perturb(dtype):
    check_phases(BACKEND, bucket(SIZES, dtype, "sgd", with_state=True), adaptive=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_restore_gives_theta_back_bit_for_bit(dtype):
    check_restore(BACKEND, bucket(SIZES, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reflect(dtype):
    check_reflect(BACKEND, bucket(SIZES, dtype))


def test_small_chunks_walk_tensors_of_many_chunks():
    """A 64-element chunk: the 4099- and 70001-element tensors are many chunks each, every
    tensor's last chunk masked."""
    small = TritonBackend(chunk=64)
    check_phases(small, bucket([(1,), (4099,), (0,), (129,), (64,)], torch.float32, "adamw",
                               with_state=True))
    check_reflect(small, bucket([(4099,), (63,)], torch.bfloat16))


# ----------------------------------------------------------------------- norm
def test_norm_is_deterministic_and_a_float64_sum():
    kb = prepared(BACKEND, bucket([(70001,), (4099,), (3,)]))
    first = BACKEND.sq_norm(kb, False)
    assert first.dtype == torch.float64 and first.shape == ()
    exact = sum(g.double().square().sum() for g in kb.grads)
    assert abs(float(first) - float(exact)) <= 1e-12 * float(exact)
    for _ in range(2):
        assert torch.equal(BACKEND.sq_norm(kb, False), first)


def test_norm_of_huge_finite_gradients_is_finite_and_inf_nan_are_not():
    kb = prepared(BACKEND, bucket([(5000,), (7,)]))
    kb.grads[0].fill_(3e38)  # squares overflow fp32, not float64
    assert torch.isfinite(BACKEND.sq_norm(kb, False))
    kb.grads[1][3] = float("inf")
    assert torch.isinf(BACKEND.sq_norm(kb, False))
    kb.grads[0][17] = float("nan")
    assert torch.isnan(BACKEND.sq_norm(kb, False))


# ----------------------------------------------------------------------- the fused step
def _groups_of_buckets(specs, algo, group, gr):
    """Buckets of several groups: ``specs`` is [(group index, dtype, sizes)], each group's
    buckets in a row; buckets of one group share its dicts."""
    groups = {}
    out = []
    for index, dtype, sizes in specs:
        g, r = groups.setdefault(index, (dict(group), dict(gr)))
        out.append(random_bucket(sizes, dtype, DEVICE, algo, group=g, gr=r, index=index))
    return out


@pytest.mark.parametrize("hp", SCALAR_HPARAMS, ids=SCALAR_HPARAM_IDS)
def test_fused_step_one_group(hp):
    check_fused_step(BACKEND, [bucket(SMALL, group=dict(SGD_GROUPS["momentum-wd"]),
                                      gr=scalar_group(**hp))])


@pytest.mark.parametrize("algo", ["sgd", "adamw", "none"])
def test_fused_step_amp_scale_and_clipping(algo):
    gr = scalar_group(max_grad_norm=0.5)
    check_fused_step(BACKEND, [bucket(SMALL, torch.float32, algo, _group(algo, "momentum-wd"),
                                      gr=gr, with_state=True)],
                     scale=torch.tensor(1024.0, device=DEVICE))


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["no-clip", "clip"])
def test_fused_step_several_groups_tables_and_dtypes(algo, max_grad_norm):
    """Two groups in three tables of two dtypes (AdamW: each table advances its steps in its
    own launch), clipping over all groups, ASAM in one of them, maximize in none."""
    buckets = _groups_of_buckets(
        [(0, torch.float32, [(7, 3), (1,)]), (0, torch.bfloat16, [(1000,), (0,)]),
         (1, torch.float32, [(4099,), (5,)])], algo, _group(algo, "momentum-wd"),
        scalar_group(max_grad_norm=max_grad_norm))
    buckets[2].gr.update(adaptive=True, rho=0.1)
    check_fused_step(BACKEND, buckets, scale=torch.tensor(64.0, device=DEVICE))


def test_fused_step_maximize_signs():
    check_fused_step(BACKEND, [bucket(SMALL, gr=scalar_group(eps_sign=-1.0, combine_sign=-1.0))])


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("tables", [1, 2], ids=["one-table", "two-tables"])
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_fused_step_skips_on_inf_or_nan(algo, tables, poison):
    specs = [(0, torch.float32, SMALL)] + [(1, torch.float16, [(33,), (2,)])] * (tables - 1)
    buckets = _groups_of_buckets(specs, algo, _group(algo, "momentum-wd"),
                                 scalar_group(max_grad_norm=1.0))
    for b in buckets:
        for p, st in zip(b.params, b.states):  # with state: a skip must leave it bit for bit
            if algo == "sgd":
                st["momentum_buffer"] = torch.randn_like(p)
            else:
                st.update(exp_avg=torch.randn_like(p), exp_avg_sq=torch.rand_like(p),
                          step=torch.tensor(4.0, device=DEVICE))
    old = [[{k: v.clone() for k, v in st.items()} for st in b.states] for b in buckets]
    kbs = check_fused_step(BACKEND, buckets, poison=poison)
    for kb, before in zip(kbs, old):
        for st, was in zip(kb.states, before):
            for key, value in was.items():
                assert torch.equal(st[key], value), key


@pytest.mark.parametrize("make", [
    lambda p: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend="triton"),
    lambda p: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend="triton"),
], ids=["sgd", "adamw"])
def test_nan_in_G_skips_with_theta_restored_and_state_untouched(make):
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 300, 1, 4099)]
    check_nan_in_G_skips(make(params), params)


# ----------------------------------------------------------------------- interval=k
# The refresh and reuse steps, phase by phase and fused, against the reference phases
# (tests/reference_phases.py: perturb(save=True), dots, update(direction=), reuse_update),
# the fused scalars against gr_fused/_scalars.py (direction_scalars, reuse_scalars).
def _interval_bucket(sizes, dtype, algo, name=None, gr=None, misalign_direction=False, **kw):
    b = bucket(sizes, dtype, algo, _group(algo, name), gr=gr, **kw)
    b.gr.setdefault("reuse_scale", 0.7)
    create_direction_state(b)
    if misalign_direction:  # each direction one element past a 16-byte boundary
        for p, st in zip(b.params, b.states):
            st[DIRECTION] = torch.zeros(p.numel() + 1, dtype=dtype, device=DEVICE)[1:].view(p.shape)
    return b


def _pair(b):
    """(the bucket as the kernels run it, a clone for the reference phases)."""
    ref = clone_bucket(b)
    return prepared(BACKEND, b), ref


def _compare(kb, ref, what, before=None, kept=(), refresh=False):
    """θ, the grads and every state tensor (the direction included) within KERNEL_ULPS of the
    reference, 0-dim state exactly; the tensors in ``kept`` bit for bit as in ``before``
    (``refresh``: all but the direction, which a refresh's update writes for every tensor,
    zeros when the step is skipped)."""
    dtype = kb.dtype
    assert_same_tensors(kb.params, ref.params, dtype, f"{what}: theta")
    for i, (g, w) in enumerate(zip(kb.grads, ref.grads)):  # a poisoned G keeps its inf/NaN
        bad = ~torch.isfinite(w)
        assert torch.equal(bad, ~torch.isfinite(g)), f"{what}: grads[{i}]: inf/NaN elsewhere"
        assert torch.allclose(g[bad], w[bad], equal_nan=True), f"{what}: grads[{i}]"
        equality.ulp_close(torch.where(bad, 0, g), torch.where(bad, 0, w),
                           equality.KERNEL_ULPS[dtype], f"{what}: grads[{i}]")
    for i, (st, want) in enumerate(zip(kb.states, ref.states)):
        assert set(st) == set(want), f"{what}: state keys of tensor {i}"
        for key, w in want.items():
            got = st[key]
            if i in kept and not (refresh and key == DIRECTION):
                assert torch.equal(got, before[i][key]), f"{what}: {key}[{i}] changed"
            elif w.dim() == 0:
                assert torch.equal(got, w), f"{what}: {key}[{i}]: {got} vs {w}"
            else:
                equality.ulp_close(got, w, equality.KERNEL_ULPS[dtype], f"{what}: {key}[{i}]")


def _states(b):
    return [{k: v.clone() for k, v in st.items()} for st in b.states]


def _new_gradient(pairs, poison=None):
    """The one gradient of a reuse step, the same in both buckets of each pair; ``poison``
    goes into one element."""
    for kb, ref in pairs:
        for g, r in zip(kb.grads, ref.grads):
            g.copy_(torch.randn(g.shape, device=g.device).to(g.dtype))
            r.copy_(g)
    if poison is not None:
        kb, ref = pairs[0]
        i = next(i for i, g in enumerate(kb.grads) if g.numel())
        kb.grads[i].view(-1)[0] = poison
        ref.grads[i].view(-1)[0] = poison


def _second_gradient(pairs, poison=None):
    for kb, ref in pairs:
        for g, r in zip(kb.grads, ref.grads):
            g2 = torch.randn(g.shape, device=g.device).to(g.dtype)
            g.add_(g2)
            r.add_(g2)
    if poison is not None:
        kb, ref = pairs[0]
        i = next(i for i, g in enumerate(kb.grads) if g.numel())
        kb.grads[i].view(-1)[kb.grads[i].numel() // 2] = poison
        ref.grads[i].view(-1)[kb.grads[i].numel() // 2] = poison


INTERVAL_ALGOS = [("sgd", "momentum-wd"), ("sgd", "nesterov"), ("adamw", None), ("none", None)]
INTERVAL_ALGO_IDS = ["sgd", "sgd-nesterov", "adamw", "none"]


@pytest.mark.parametrize("skip", [False, True], ids=["taken", "skipped"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("algo,name", INTERVAL_ALGOS, ids=INTERVAL_ALGO_IDS)
def test_interval_phases(algo, name, dtype, skip):
    """A refresh (perturb saving g1, dots of G and g1, the update caching the direction
    d = a·G + c·g1, a frozen tensor's too) and then a reuse step (dots of g1 and d, the
    update from g = u·G + v·d with θ updated in place), each phase against the reference
    phases. Skipped: θ restored and the direction zeroed (refresh; g1 holds an inf, which
    must not stay in it) or untouched (reuse), nothing else written."""
    kb, ref = _pair(_interval_bucket(SMALL, dtype, algo, name))
    pairs = [(kb, ref)]
    eps, fold = device_scalar(0.0371, kb), device_scalar(-0.42, kb)
    g1 = [g.clone() for g in kb.grads]
    BACKEND.perturb(kb, eps, fold, False, save=True)
    TORCH.perturb(ref, eps, fold, False, save=True)
    assert_same_tensors(state_of(kb, DIRECTION), g1, dtype, "saved g1", exact=True)
    _compare(kb, ref, "perturb")
    _second_gradient(pairs)
    torch.testing.assert_close(BACKEND.dots(kb, DIRECTION), TORCH.dots(ref, DIRECTION),
                               rtol=1e-12, atol=0)
    for x in (kb, ref):
        create_missing_state(x)
        x.flags = list(x.flags or [0] * len(x.params))
        x.flags[2] |= 2  # FLAG_FROZEN: restored, its state kept, its direction cached
    if skip:  # what skips a refresh: an inf/NaN in g1, saved in the direction
        for x in (kb, ref):
            dirs = state_of(x, DIRECTION)
            dirs[2].view(-1)[1] = float("nan")    # the frozen tensor
            dirs[4].view(-1)[-1] = float("inf")   # a last, masked chunk
    BACKEND.refresh(kb)
    before = _states(kb)
    found = device_scalar(1.0 if skip else 0.0, kb)
    direction = (device_scalar(0.37, kb), device_scalar(-0.81, kb))
    BACKEND.update(kb, device_scalar(0.8125, kb), found, direction=direction)
    TORCH.update(ref, device_scalar(0.8125, kb), found, direction=direction)
    kept = range(len(kb.params)) if skip else (2,)
    _compare(kb, ref, "refresh update", before, kept, refresh=True)
    if skip:
        assert all(torch.equal(d, torch.zeros_like(d)) for d in state_of(kb, DIRECTION))
    else:  # the frozen tensor's direction was written
        assert not torch.equal(kb.states[2][DIRECTION], before[2][DIRECTION])
    # the reuse step: a fresh gradient, the cached direction, no backup
    _new_gradient(pairs)
    for x in (kb, ref):
        x.flags = None
        create_missing_state(x)
    BACKEND.refresh(kb)
    torch.testing.assert_close(BACKEND.dots(kb, DIRECTION), TORCH.dots(ref, DIRECTION),
                               rtol=1e-12, atol=0)
    before, theta = _states(kb), [p.clone() for p in kb.params]
    u, v = device_scalar(0.9, kb), device_scalar(0.45, kb)
    BACKEND.reuse_update(kb, u, v, found)
    TORCH.reuse_update(ref, u, v, found)
    _compare(kb, ref, "reuse update", before, range(len(kb.params)) if skip else ())
    if skip:
        assert_same_tensors(kb.params, theta, dtype, "untouched theta", exact=True)


def test_interval_phases_misaligned_direction():
    """Directions off a 16-byte boundary: the kernels take their unaligned variant."""
    kb, ref = _pair(_interval_bucket(SMALL, torch.float32, "adamw", with_state=True,
                                     misalign_direction=True))
    assert table_of(kb).aligned and not BACKEND._state_row(kb).aligned
    one = device_scalar(1.0, kb)
    for x, be in ((kb, BACKEND), (ref, TORCH)):
        be.perturb(x, device_scalar(0.03, x), device_scalar(0.5, x), False, save=True)
        be.update(x, device_scalar(0.7, x), one * 0, direction=(one * 0.3, one * -0.2))
        be.reuse_update(x, one * 0.9, one * 0.4, one * 0)
    _compare(kb, ref, "misaligned directions")


def test_a_direction_laid_out_unlike_its_parameter_is_relaid():
    """A direction state with other strides than its parameter (a checkpoint of another
    layout) is replaced by a copy laid out like the parameter, values kept."""
    kb = prepared(BACKEND, _interval_bucket([(7, 3), (5,)], torch.float32, "sgd", "momentum-wd"))
    odd = torch.randn(3, 7, device=DEVICE).t()
    kb.states[0][DIRECTION] = odd
    row = BACKEND._state_row(kb)
    now = kb.states[0][DIRECTION]
    assert now.stride() == kb.params[0].stride() and torch.equal(now, odd)
    assert row.host[0] == now.data_ptr() and BACKEND._state_row(kb) is row


def _exact_sums(members, key=DIRECTION):
    """[Σ g², Σ g·s, Σ s²] of a group's buckets in float64 (s the ``key`` state)."""
    g = torch.cat([x.double().flatten() for b in members for x in b.grads])
    s = torch.cat([x.double().flatten() for b in members for x in state_of(b, key)])
    return torch.stack([(g * g).sum(), (g * s).sum(), (s * s).sum()])


def check_fused_interval(buckets, scale=None, refresh_poison=None, reuse_poison=None):
    """``ascend(save=True)``, ``combine_update(direction_valid=)`` and ``reuse`` of
    ``buckets`` against the general path: the scalars (gscale, found_inf, the direction's
    a and c, valid; u, v, found_inf) within 4 ulps of _scalars.py on exact float64 sums,
    every tensor against the reference phases run with the kernels' scalars, the skip
    records. Returns the kernel buckets."""
    pairs = [_pair(b) for b in buckets]
    kbs, refs = [k for k, _ in pairs], [r for _, r in pairs]
    assert BACKEND.can_fuse(kbs)
    runs = equality.group_runs(kbs)
    G = len(runs)
    want_rows = equality.general_ascent(kbs, scale)
    rows = BACKEND.ascend(kbs, scale, save=True)
    scalars_close(rows, want_rows, "ascent rows")
    for (gr, members), row in zip(equality.group_runs(refs), rows):
        for r in members:
            TORCH.perturb(r, row[0], row[1], gr["adaptive"], save=True)
    for kb, r in pairs:
        _compare(kb, r, "perturb saving g1")
    _second_gradient(pairs, refresh_poison)
    for kb, r in pairs:
        create_missing_state(kb)
        create_missing_state(r)
        BACKEND.refresh(kb)
    device = kbs[0].device
    count = torch.tensor(3, dtype=torch.int64, device=device)
    last = torch.empty((), dtype=torch.bool, device=device)
    flag = torch.zeros((), dtype=torch.float32, device=device)
    skips = SkipRecord(count, last, flag)
    inv = None if scale is None else scale.reciprocal()
    sums = [_exact_sums(members) for _, members in runs]
    combines = [rows[i, 2] for i in range(G)]
    gscales, found = _scalars.update_scalars([t[0] for t in sums], combines, inv,
                                             [gr["max_grad_norm"] for gr, _ in runs])
    coefs, ok = _scalars.direction_scalars(sums, combines, [gr["combine_sign"] for gr, _ in runs],
                                           inv)
    valid = torch.empty((), dtype=torch.float32, device=device)
    before = [_states(kb) for kb in kbs]
    found_inf = BACKEND.combine_update(kbs, rows, scale, skips, direction_valid=valid)
    out = found_inf._base
    skipped = refresh_poison is not None
    assert out.shape == (3 * G + 1,) and float(found_inf) == float(found) == float(skipped)
    assert int(count) == 3 + skipped and bool(last) == skipped and float(flag) == float(skipped)
    assert float(valid) == float(ok) * (1 - skipped)
    if not skipped:
        scalars_close(out[:G], torch.stack(gscales), "gscales")
        scalars_close(out[G + 1:2 * G + 1], torch.stack([a for a, _ in coefs]), "a")
        scalars_close(out[2 * G + 1:], torch.stack([c for _, c in coefs]), "c")
    for i, (_, members) in enumerate(equality.group_runs(refs)):
        for r in members:
            TORCH.update(r, out[i], found_inf, direction=(out[G + 1 + i], out[2 * G + 1 + i]))
    for (kb, r), was in zip(pairs, before):
        _compare(kb, r, "refresh update", was, range(len(kb.params)) if skipped else (),
                 refresh=True)
        if skipped:
            assert all(torch.equal(d, torch.zeros_like(d)) for d in state_of(kb, DIRECTION))
    # a reuse step with the direction just cached (or none, valid = 0, if skipped)
    _new_gradient(pairs, reuse_poison)
    for kb, r in pairs:
        kb.flags = r.flags = None
        BACKEND.refresh(kb)
    sums = [_exact_sums(members) for _, members in runs]
    want, want_found = _scalars.reuse_scalars(sums, [gr for gr, _ in runs], inv, valid)
    before = [_states(kb) for kb in kbs]
    found_inf = BACKEND.reuse(kbs, scale, valid, skips)
    out = found_inf._base
    skipped2 = reuse_poison is not None
    assert out.shape == (2 * G + 1,) and float(found_inf) == float(want_found) == skipped2
    assert int(count) == 3 + skipped + skipped2 and bool(last) == skipped2
    if not skipped2:
        scalars_close(out[:G], torch.stack([u for u, _ in want]), "u")
        scalars_close(out[G + 1:], torch.stack([v for _, v in want]), "v")
    for i, (_, members) in enumerate(equality.group_runs(refs)):
        for r in members:
            TORCH.reuse_update(r, out[i], out[G + 1 + i], found_inf)
    for (kb, r), was in zip(pairs, before):
        _compare(kb, r, "reuse update", was, range(len(kb.params)) if skipped2 else ())
    return kbs


@pytest.mark.parametrize("algo", ["sgd", "adamw", "none"])
def test_fused_interval_one_group(algo):
    check_fused_interval([_interval_bucket(SMALL, torch.float32, algo, "momentum-wd")])


def test_fused_interval_amp_scale_and_clipping():
    """AdamW in one table (the finalizes advance its steps), the AMP scale, clipping."""
    check_fused_interval([_interval_bucket(SMALL, torch.float32, "adamw", with_state=True,
                                           gr=scalar_group(max_grad_norm=0.3))],
                         scale=torch.tensor(1024.0, device=DEVICE))


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_fused_interval_several_groups_tables_and_dtypes(algo):
    """Two groups in three tables of two dtypes, clipping over all groups, each group its
    own reuse_scale, maximize (negative signs) in the second."""
    buckets = _groups_of_buckets(
        [(0, torch.float32, [(7, 3), (1,)]), (0, torch.bfloat16, [(1000,), (0,)]),
         (1, torch.float32, [(4099,), (5,)])], algo, _group(algo, "momentum-wd"),
        scalar_group(max_grad_norm=0.05))
    buckets[0].gr["reuse_scale"] = 0.7
    buckets[2].gr.update(reuse_scale=0.4, eps_sign=-1.0, combine_sign=-1.0, rho=0.1)
    for b in buckets:
        create_direction_state(b)
    check_fused_interval(buckets, scale=torch.tensor(64.0, device=DEVICE))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("when", ["refresh", "reuse"])
def test_fused_interval_skips_on_inf_or_nan(when):
    """An inf in G at the refresh: θ restored, no state written but the direction's
    zeros, valid = 0 (the reuse that follows is a step on g1 alone); a NaN in g1 at a
    reuse: nothing written."""
    buckets = [_interval_bucket(SMALL, torch.float32, "sgd", "momentum-wd", with_state=True,
                                gr=scalar_group(max_grad_norm=1.0))]
    check_fused_interval(buckets, refresh_poison=float("inf") if when == "refresh" else None,
                         reuse_poison=float("nan") if when == "reuse" else None)


def _interval_launches(opt, params):
    """The device work of a refresh and of the reuse step after it (steady state)."""
    grads = [p.grad for p in params]

    def step():
        if opt.refresh_due:
            opt.first_step()
            bench_kernels.second_backward(grads)
            opt.second_step(zero_grad=False)
        else:
            bench_kernels.second_backward(grads)
            opt.step()

    for _ in range(2):  # the first refresh and reuse build the tables, the state, the rows
        step()
    return bench_kernels.step_launches(step), bench_kernels.step_launches(step)


@pytest.mark.parametrize("algo,groups,expected", [
    ("sgd", 1, (6, 3)), ("adamw", 1, (6, 3)), ("sgd", 2, (11, 5)), ("adamw", 2, (13, 7))],
    ids=["sgd", "adamw", "sgd-2-groups", "adamw-2-groups"])
def test_interval_launches_per_step(algo, groups, expected):
    """interval=2: a refresh is a normal step's launches (4K + G + 1; AdamW + K step
    advances with several tables), a reuse step K partials, one finalize for every group
    and K updates (2K + 1; AdamW with several tables + K): 6 and 3 with one group."""
    params = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = _optimizer(algo, params, groups, interval=2, max_grad_norm=1.0)
    refresh, reuse = _interval_launches(opt, params)
    for work, n in zip((refresh, reuse), expected):
        assert work["kernels"] == work["triton"] == n, work["names"]
    if groups == 1:
        assert refresh["names"] == ["_partial_sq_kernel", "_ascent_scalars_kernel",
                                    "_perturb_kernel", "_partial_dots_kernel",
                                    "_update_scalars_kernel", f"_{algo}_kernel"]
        assert reuse["names"] == ["_partial_dots_kernel", "_reuse_scalars_kernel",
                                  f"_{algo}_kernel"]


def test_interval_steps_read_nothing_back_to_the_host():
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 300, 1)]
    opt = gr_fused.GRAdamW(params, lr=1e-2, gamma=0.05, max_grad_norm=1.0, interval=2,
                           backend="triton")
    for fused in (True, False):  # the fused steps, and the general path's phases
        opt._fuse_scalars = fused
        opt.step(closure_for(opt, params))
        opt.step(closure_for(opt, params))
        with forbid_host_reads():
            opt.step(closure_for(opt, params))
            opt.step(closure_for(opt, params))


# ----------------------------------------------------------------------- arithmetic helpers
@triton.jit
def _fma_kernel(x_ptr, y_ptr, z_ptr, vec_ptr, fp64_ptr, native_ptr, scalar_ptr, alpha,
                BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x, y, z = tl.load(x_ptr + offs), tl.load(y_ptr + offs), tl.load(z_ptr + offs)
    tl.store(vec_ptr + offs, triton_common.fma(x, y, z))
    tl.store(fp64_ptr + offs, triton_common.fma_rn_fp64(x, y, z))
    tl.store(native_ptr + offs, triton_common.fma_native(x, y, z))
    tl.store(scalar_ptr + offs, triton_common.fma(x, alpha, z))


def _double_rounding_cases():
    """x·y + z whose fp64 sum lands exactly on an fp32 tie while the exact value is not on
    it: rounding the fp64 sum to fp32 (two roundings) misses the correctly rounded result.
    z = 1 + 2⁻²³ (odd last bit), x·y = 2⁻²⁴ − 2⁻⁷⁰: the exact sum is just below the tie
    1 + 2⁻²³ + 2⁻²⁴ and rounds down; fp64 rounds it onto the tie, which goes to even (up).
    Scaled by powers of two and with both signs."""
    xs, ys, zs = [], [], []
    for k in range(-20, 21, 4):
        for sign in (1.0, -1.0):
            xs.append(sign * (1 + 2 ** -23) * 2.0 ** (-12 + k))
            ys.append((1 - 2 ** -23) * 2.0 ** -12)
            zs.append(sign * (1 + 2 ** -23) * 2.0 ** k)
    return xs, ys, zs


def test_fma_rounds_once_like_torch_addcmul_and_add_alpha():
    """``fma`` against torch's FMAs, bit for bit: torch.addcmul(z, x, y) and
    torch.add(z, x, alpha=a) on random fp32 inputs and on inputs where double rounding
    differs (checked: the fp64 sum rounded to fp32 misses there)."""
    xs, ys, zs = _double_rounding_cases()
    block, crafted = 4096, len(xs)
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-8, 8, block)[torch.randperm(block, generator=gen)]
    x = torch.randn(block, generator=gen) * scale
    y = torch.randn(block, generator=gen)
    z = torch.randn(block, generator=gen) * scale * 1e-3
    x[:crafted], y[:crafted], z[:crafted] = torch.tensor(xs), torch.tensor(ys), torch.tensor(zs)
    alpha = ys[0]  # an fp32 number
    x, y, z = x.to(DEVICE), y.to(DEVICE), z.to(DEVICE)
    outs = [torch.empty_like(x) for _ in range(4)]
    _fma_kernel[(1,)](x, y, z, *outs, triton_common.f32(alpha), BLOCK=block,
                      enable_fp_fusion=False)
    vec, fp64, native, scalar = (o.cpu() for o in outs)
    xc, yc, zc = x.cpu(), y.cpu(), z.cpu()
    want_vec = torch.addcmul(zc, xc, yc)
    want_scalar = torch.add(zc, xc, alpha=alpha)
    twice = (xc.double() * yc.double() + zc.double()).float()
    assert not torch.equal(twice[:crafted], want_vec[:crafted]), "cases do not double-round"
    assert torch.equal(vec, want_vec)
    assert torch.equal(fp64, want_vec)
    assert torch.equal(scalar, want_scalar)
    if not INTERPRETED:  # compiled: tl.fma is fma.rn.f32
        assert torch.equal(native, want_vec)


@pytest.mark.skipif(not INTERPRETED, reason="about the Triton interpreter")
def test_the_interpreters_tl_fma_rounds_twice():
    """Why ``fma`` is the fp64 version under the interpreter: its tl.fma computes x·y and
    then the sum in fp32, two roundings."""
    xs, ys, zs = _double_rounding_cases()
    block = 64
    pad = block - len(xs)
    x, y, z = (torch.tensor(v + [1.0] * pad) for v in (xs, ys, zs))
    outs = [torch.empty_like(x) for _ in range(4)]
    _fma_kernel[(1,)](x, y, z, *outs, 1.0, BLOCK=block)
    if torch.equal(outs[2], torch.addcmul(z, x, y)):
        pytest.skip("this interpreter's tl.fma rounds once: triton_common.fma could use it")
    assert torch.equal(outs[1], torch.addcmul(z, x, y))


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, triton_common.to_storage(x, out_ptr.dtype.element_ty), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_storage_rounds_like_torch_bit_for_bit(dtype):
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.39e38, -3.39e38, 1e-40,
                            -1e-40, float("nan"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    bits = special.view(torch.int32)
    x = torch.cat([special, bits.new_tensor([0x7F800001, -1, 0x3F808000]).view(torch.float32),
                   torch.randn(3000) * torch.logspace(-30, 30, 3000)]).to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    ref = x.to(dtype)
    same = (out.view(torch.int16) == ref.view(torch.int16)) | (out.isnan() & ref.isnan())
    assert same.all(), f"differs at {(~same).nonzero().flatten()[:5].tolist()}"


@triton.jit
def _powi_kernel(exponent_ptr, out_ptr, base_bits):
    pid = tl.program_id(0)
    base = triton_common.from_f64_bits(base_bits)
    tl.store(out_ptr + pid, triton_common.powi(base, tl.load(exponent_ptr + pid)))


POWI_STEPS = [float(k) for k in list(range(0, 100)) + [4095, 65537, 2 ** 24]]


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.0])
def test_powi_is_the_float64_power_within_its_error_bound(beta):
    """β^step for integer steps in float64 from the float64 β (square-and-multiply): within
    step·2⁻⁵³ relative of the exact power (to 50 digits)."""
    import decimal
    steps = torch.tensor(POWI_STEPS)
    out = torch.empty(steps.shape, dtype=torch.float64, device=DEVICE)
    _powi_kernel[(steps.numel(),)](steps.to(DEVICE), out, triton_common.f64_bits(beta))
    with decimal.localcontext() as context:
        context.prec = 50
        for k, got in zip(POWI_STEPS, out.cpu().tolist()):
            exact = decimal.Decimal(beta) ** int(k) if k else decimal.Decimal(1)
            bound = exact * decimal.Decimal(max(k, 1) * 2.0 ** -53) + decimal.Decimal(1e-300)
            assert abs(decimal.Decimal(got) - exact) <= bound, (beta, k, got, exact)
    assert out[0] == 1.0 and out[1] == beta


@triton.jit
def _bias_corrections_kernel(step_ptr, out_ptr, lr_bits, beta1_bits, beta2_bits):
    pid = tl.program_id(0)
    step_size, bc2_sqrt = triton_common.adamw_bias_corrections(
        triton_common.from_f64_bits(lr_bits), triton_common.from_f64_bits(beta1_bits),
        triton_common.from_f64_bits(beta2_bits), tl.load(step_ptr + pid))
    tl.store(out_ptr + 2 * pid, step_size)
    tl.store(out_ptr + 2 * pid + 1, bc2_sqrt)


@pytest.mark.parametrize("lr,beta1,beta2", [(1e-2, 0.9, 0.999), (3e-4, 0.95, 0.98),
                                            (0.1, 0.0, 0.5)])
def test_adamw_bias_corrections_are_torchs_float64_values(lr, beta1, beta2):
    """lr/(1 − β1^step) and √(1 − β2^step) as torch.optim.AdamW computes them (float64
    from the step count, rounded once to fp32; tests/reference_phases.py): bit for bit,
    from the float64 hyperparameters, not their fp32 roundings (at step 1 with β2 = 0.999
    those differ by 1.3e-5 relative)."""
    steps = torch.tensor([float(k) for k in range(1, 41)] + [99.0, 1000.0, 4095.0, 65537.0])
    out = torch.empty(2 * steps.numel(), device=DEVICE)
    _bias_corrections_kernel[(steps.numel(),)](
        steps.to(DEVICE), out, triton_common.f64_bits(lr), triton_common.f64_bits(beta1),
        triton_common.f64_bits(beta2))
    step = steps.double()
    want_step_size = (lr / (1 - torch.pow(beta1, step))).float()
    want_bc2 = torch.sqrt(1 - torch.pow(beta2, step)).float()
    got = out.cpu().view(-1, 2)
    assert torch.equal(got[:, 0], want_step_size)
    assert torch.equal(got[:, 1], want_bc2)
    if beta2 == 0.999:  # what fp32 powers gave: not torch's values
        fp32 = torch.sqrt(1 - torch.pow(torch.tensor(beta2), steps[:1]))
        assert not torch.equal(fp32, want_bc2[:1])


@triton.jit(do_not_specialize=["bits"])
def _f64_kernel(out_ptr, bits):
    tl.store(out_ptr, triton_common.from_f64_bits(bits))


def test_float64_arguments_keep_every_bit():
    """``f64_bits``/``from_f64_bits``: zeros (an i32 argument), signs, the extremes."""
    values = [0.0, -0.0, 1e-2, 0.999, -3.5, 1e300, 5e-324, -2.2250738585072014e-308]
    out = torch.empty(len(values), dtype=torch.float64, device=DEVICE)
    for i, x in enumerate(values):
        _f64_kernel[(1,)](out[i:], triton_common.f64_bits(x))
    want = torch.tensor(values, dtype=torch.float64)
    assert torch.equal(out.cpu().view(torch.int64), want.view(torch.int64))


@triton.jit
def _chunk_kernel(layout_ptr, out_ptr, C, T, BLOCK: tl.constexpr):
    t, start, n, offset = triton_common.chunk_of(layout_ptr, C, T, BLOCK)
    tl.store(out_ptr + tl.arange(0, BLOCK), start + tl.arange(0, BLOCK))
    tl.store(out_ptr + BLOCK, t)
    tl.store(out_ptr + BLOCK + 1, n)
    tl.store(out_ptr + BLOCK + 2, offset)


def test_chunk_offsets_are_int64_past_two_to_the_31():
    """A chunk 2^20 chunks into its tensor starts at element 2^32 (with 4096-element chunks):
    its offsets must be exact (int32 arithmetic would wrap). The table says chunk 0 belongs
    to tensor 0, whose first chunk is −2^20."""
    block = 4096
    layout = torch.tensor([0, -(2 ** 20), 2 ** 33, 64], dtype=torch.int64, device=DEVICE)
    out = torch.empty(block + 3, dtype=torch.int64, device=DEVICE)
    _chunk_kernel[(1,)](layout, out, 1, 1, BLOCK=block)
    start = 2 ** 20 * block
    assert torch.equal(out[:block], start + torch.arange(block, device=DEVICE))
    assert out[block:].tolist() == [0, 2 ** 33, 64]


# ----------------------------------------------------------------------- launches per step
def _optimizer(algo, params, groups=1, **options):
    param_groups = [{"params": params[g::groups], "weight_decay": 0.01 * g} for g in range(groups)]
    if algo == "sgd":
        return gr_fused.GRSGD(param_groups, lr=0.1, momentum=0.9, gamma=0.05, backend="triton",
                              **options)
    return gr_fused.GRAdamW(param_groups, lr=1e-2, gamma=0.05, backend="triton", **options)


def _launches(opt, params, central=False):
    """The device kernels of one steady-state step's optimizer side (no backward passes:
    the grads stay set; the driver is told each backward wrote them)."""
    grads = [p.grad for p in params]

    def step():
        opt.first_step()
        bench_kernels.second_backward(grads)
        if central:
            opt.reflect_step()
            bench_kernels.second_backward(grads)
        opt.second_step(zero_grad=False)

    step()  # the first step builds the tables and the state
    return bench_kernels.step_launches(step)


@pytest.mark.parametrize("algo,options,groups,expected", [
    ("sgd", {}, 1, 6), ("adamw", {}, 1, 6),
    ("sgd", dict(max_grad_norm=1.0, adaptive=True), 1, 6),
    ("adamw", dict(difference="central"), 1, 7),
    ("sgd", dict(max_grad_norm=1.0), 2, 4 * 2 + 2 + 1),
    ("adamw", {}, 3, 4 * 3 + 3 + 1 + 3)],
    ids=["sgd", "adamw", "sgd-clip-asam", "adamw-central", "sgd-2-groups", "adamw-3-groups"])
def test_launches_per_step_whatever_the_number_of_tensors(algo, options, groups, expected):
    """Every kernel on the optimizer side of a step: 6 with one group (the step scalars come
    out of the norms' finalize kernels, so there is no torch op at all), +1 for the central
    difference's reflection; with G groups in K tables 4K + G + 1 (AdamW: + K step
    advances). On CUDA counted from the profiler's kernel events, on CPU as issued."""
    counts = {}
    for n_tensors in (3, 40) if groups == 1 and not options else (6,):
        params = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = _optimizer(algo, params, groups, **options)
        counts[n_tensors] = _launches(opt, params, central="difference" in options)
    for work in counts.values():
        assert work["kernels"] == work["triton"] == expected, work["names"]
        assert set(work["names"]) <= bench_kernels.KERNEL_NAMES
    names = [w["names"] for w in counts.values()]
    assert all(n == names[0] for n in names)
    if groups == 1 and not options:
        assert names[0] == ["_partial_sq_kernel", "_ascent_scalars_kernel", "_perturb_kernel",
                            "_partial_sq_kernel", "_update_scalars_kernel",
                            f"_{algo}_kernel"]


def test_an_amp_step_adds_no_kernel_to_the_optimizer_side():
    """With gr_fused.amp.GradScaler the kernels read the scale S themselves; the one extra
    op is the scaler zeroing its own found_inf flag."""
    params = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(4)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    scaler = GradScaler(DEVICE, init_scale=2.0 ** 10)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        scaler.scale(loss).backward()
        return loss
    scaler.step(opt, closure)
    scaler.update()
    with bench_kernels.DeviceWork() as work:
        scaler.step(opt, work.excluding(closure))
    triton_names = [n for n in work.names if not n.startswith("aten.")]
    assert triton_names == ["_partial_sq_kernel", "_ascent_scalars_kernel", "_perturb_kernel",
                            "_partial_sq_kernel", "_update_scalars_kernel", "_sgd_kernel"]
    others = [n for n in work.names if n.startswith("aten.")]
    assert len(others) <= 1 and set(others) <= {"aten.zeros", "aten.fill_", "aten.zero_"}, others


def test_launch_count_assertion_ignores_host_launch_records():
    """bench_kernels reports the host-side launch calls beside the kernels on CUDA; the
    count above reads ``kernels`` and ``triton`` only."""
    counts = bench_kernels.count_launches("triton", 3)
    assert counts["kernels"] == counts["triton"] == 6, counts
    assert set(counts) <= {"kernels", "triton", "copies", "launch_calls"}


# ----------------------------------------------------------------------- no host sync
def test_gr_step_reads_nothing_back_to_the_host():
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 300, 1)]
    for make in (lambda p: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05,
                                          max_grad_norm=1.0, difference="central",
                                          backend="triton"),
                 lambda p: gr_fused.GRAdamW(p, lr=1e-2, gamma=0.05, backend="triton")):
        opt = make(params)
        opt.step(closure_for(opt, params))
        with forbid_host_reads():
            opt.step(closure_for(opt, params))
        with forbid_host_reads():  # the general path too (the driver's torch-op scalars)
            opt._fuse_scalars = False
            opt.step(closure_for(opt, params))


# ----------------------------------------------------------------------- device guard
class _FakeCudaDevice:
    """Stands in for torch.cuda: a current device, and ``torch.cuda.device(i)`` making i
    current for a ``with`` block."""
    current = 0

    def __init__(self, index):
        self.index, self.prev = index, None

    def __enter__(self):
        self.prev, _FakeCudaDevice.current = _FakeCudaDevice.current, self.index
        return self

    def __exit__(self, *exc):
        _FakeCudaDevice.current = self.prev
        return False


@contextlib.contextmanager
def _launch_devices(monkeypatch):
    """Pretend the tensors live on cuda:1 while cuda:0 is current, and record the current
    device at every Triton launch."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    seen = []
    _FakeCudaDevice.current = 0
    monkeypatch.setattr(triton_backend, "guard_index", lambda device: 1)
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: _FakeCudaDevice.current)
    for cls in (JITFunction, InterpretedFunction):
        def run(kernel, *args, _original=cls.__dict__["run"], **kw):
            seen.append((kernel.fn.__name__, torch.cuda.current_device()))
            return _original(kernel, *args, **kw)
        monkeypatch.setattr(cls, "run", run)
    yield seen


def _every_kind_of_launch():
    """A fused SGD step with central difference and clipping, a fused AdamW step over two
    groups, the general path, an aborted step (restore), the GR wrapper (update 'none'),
    interval=2 refresh and reuse steps, fused and on the general path."""
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 300, 1)]
    opts = [gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, max_grad_norm=1.0,
                           difference="central", backend="triton"),
            gr_fused.GRAdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.1}],
                             lr=1e-2, gamma=0.05, backend="triton"),
            gr_fused.GR(params, torch.optim.Adam, gamma=0.05, lr=0.1, backend="triton")]
    general = gr_fused.GRSGD(params, lr=0.1, gamma=0.05, backend="triton")
    general._fuse_scalars = False
    for opt in opts + [general]:
        opt.step(closure_for(opt, params))
    # interval=2: a refresh and a reuse step, fused and on the general path
    interval = [gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, interval=2,
                               backend="triton") for _ in range(2)]
    interval[1]._fuse_scalars = False
    for opt in interval:
        for _ in range(2):
            opt.step(closure_for(opt, params))
    opts[0].zero_grad()
    closure_for(opts[0], params)()
    opts[0].first_step()
    opts[0].abort_step()


GUARD_STAND_IN = pytest.mark.skipif(
    not INTERPRETED, reason="the stand-in for torch.cuda cannot be used where Triton launches "
    "on a real GPU (test_params_on_the_second_gpu_while_the_first_is_current covers it there)")


@GUARD_STAND_IN
def test_every_launch_runs_under_a_guard_for_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device; with parameters on cuda:1 and cuda:0
    current, a launch outside the backend's guard runs on the wrong GPU. Simulated on any
    machine: the backend is told its tensors live on device 1, torch.cuda.device and
    current_device are stand-ins, and every launch records the device current at that
    moment."""
    with _launch_devices(monkeypatch) as seen:
        _every_kind_of_launch()
    kinds = {name for name, _ in seen}
    assert {"_reflect_kernel", "_restore_kernel", "_adamw_kernel", "_restore_combine_kernel",
            "_finalize_sq_kernel", "_sgd_kernel", "_partial_dots_kernel",
            "_reuse_scalars_kernel"} <= kinds, kinds
    wrong = [(name, d) for name, d in seen if d != 1]
    assert not wrong, f"launched without the device guard: {wrong[:5]}"
    assert _FakeCudaDevice.current == 0  # and the guard restores the caller's device


@GUARD_STAND_IN
def test_the_guard_test_catches_a_missing_guard(monkeypatch):
    """The check above fails when a phase launches without the guard."""
    monkeypatch.setattr(triton_backend, "device_guard", lambda device: contextlib.nullcontext())
    with _launch_devices(monkeypatch) as seen:
        _every_kind_of_launch()
    assert seen and all(d == 0 for _, d in seen)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (the guard "
                    "is tested above with a stand-in for torch.cuda)")
def test_params_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    params = [torch.randn(s, device="cuda:1", requires_grad=True) for s in (7, 4099, 1)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    ref_opt = gr_fused.GRSGD(ref, lr=0.1, momentum=0.9, gamma=0.05, backend="torch")
    for _ in range(3):
        opt.step(closure_for(opt, params))
        ref_opt.step(closure_for(ref_opt, ref))
    torch.cuda.synchronize(1)
    for a, b in zip(params, ref):
        assert_close(a, b, 1e-6, "cuda:1 triton vs torch backend")
    assert torch.cuda.current_device() == 0


# ----------------------------------------------------------------------- scratch
def test_partial_sums_scratch_is_kept_per_bucket_and_per_stream(monkeypatch):
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (7, 4099, 1)]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="triton")
    opt.step(closure_for(opt, params))
    (extra,) = opt._bucket_extra.values()
    scratch = extra["triton_scratch"]

    def partials():
        return {key: t.data_ptr() for key, t in scratch.items() if key[0] == "partials"}
    first = partials()
    assert len(first) == 1
    opt.step(closure_for(opt, params))
    assert partials() == first, "reallocated"
    # another stream: its own buffer, the first one kept for its stream
    monkeypatch.setattr(triton_backend, "_stream_key", lambda device: 12345)
    opt.step(closure_for(opt, params))
    now = partials()
    assert len(now) == 2 and now[("partials", 12345)] not in first.values()
    assert all(now[key] == ptr for key, ptr in first.items())


# ----------------------------------------------------------------------- availability and auto
def test_auto_prefers_triton_on_cuda_and_reasons_are_given(monkeypatch):
    assert backends.AUTO_ORDER["cuda"][0] == "triton"
    assert "triton" not in backends.AUTO_ORDER["cpu"]  # the interpreter is for tests only
    # as compiled on a GPU machine: cuda runs, cpu says why not
    monkeypatch.setattr(triton_backend, "_defined_interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "_interpret_requested", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.unavailable_reason("triton", "cuda") == "no CUDA device is available"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.unavailable_reason("triton", "cuda") is None
    assert "CUDA" in TritonBackend.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(backends, "_instances", {})
    assert isinstance(backends.get_backend("auto", torch.device("cuda")), TritonBackend)
    with pytest.raises(backends.BackendUnavailable, match="CUDA tensors"):
        backends.get_backend("triton", torch.device("cpu"))
    # as under the interpreter (on this machine): cpu runs, cuda says why not (auto moves on)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton_backend, "_defined_interpreted", lambda: True)
    assert TritonBackend.unavailable_reason(torch.device("cpu")) is None
    assert "interpreter" in TritonBackend.unavailable_reason(torch.device("cuda"))
    assert backends.get_backend("auto", torch.device("cuda")).name != "triton"
    # interpreter asked for after compiled kernels were defined
    monkeypatch.setattr(triton_backend, "_defined_interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "_interpret_requested", lambda: True)
    assert "before the first import" in TritonBackend.unavailable_reason(torch.device("cpu"))
    # no triton at all
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", ImportError("No module named 'triton'"))
    assert "not importable" in backends.unavailable_reason("triton", "cuda")


def test_other_devices_get_a_reason():
    assert "mps" in TritonBackend.unavailable_reason(torch.device("mps"))


def test_chunk_must_be_a_power_of_two():
    assert TritonBackend().chunk == triton_common.BLOCK == 4096
    with pytest.raises(ValueError, match="power of two"):
        TritonBackend(chunk=1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the same kernels "
                    "are tested above under the Triton interpreter)")
def test_auto_picks_triton_for_cuda_tensors_and_matches_torch_without_syncs():
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7, 4099, 1)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, backend="auto")
    ref_opt = gr_fused.GRSGD(ref, lr=0.1, momentum=0.9, gamma=0.05, backend="torch")
    assert opt.backends == {"cuda:0": "triton"}
    for _ in range(3):
        opt.step(closure_for(opt, params))
        ref_opt.step(closure_for(ref_opt, ref))
    for a, b in zip(params, ref):
        assert_close(a, b, 1e-6, "cuda: triton vs torch backend")
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(closure_for(opt, params))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------- compiled for the GPU
def _nvidia_backend_missing():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton wheel
        return f"triton's NVIDIA backend is not importable ({exc!r})"
    return None


@pytest.mark.skipif(_nvidia_backend_missing() is not None,
                    reason=str(_nvidia_backend_missing()))
def test_every_kernel_compiles_for_sm80_and_sm90_with_vector_accesses_and_exact_math(tmp_path):
    """tests/triton_aot.py compiles every kernel variant the backend can launch for sm_80
    and sm_90 with Triton's own compiler and ptxas (no GPU needed), then reads the PTX:
    every streaming kernel's ALIGNED variant loads and stores 128 bits per instruction over
    tables of odd-sized tensors, the kernels that call fma get fma.rn.f32, and no kernel
    divides, takes a reciprocal or a square root approximately."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_aot.py"),
                          str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.read_text())
    for arch in (80, 90):
        assert {r["kernel"] for r in records if r["arch"] == arch} == bench_kernels.KERNEL_NAMES
        streaming = [r for r in records if r["arch"] == arch and r["streaming"]]
        assert {(r["kernel"], r["aligned"]) for r in streaming} == {
            (k.fn.__name__, a) for k in kernels.STREAMING_KERNELS for a in (False, True)}
    for r in records:
        assert not r["approx"], r
        if r["streaming"] and r["aligned"]:
            assert r["ld_v4"], r
            assert r["st_v4"] or r["kernel"] in ("_partial_sq_kernel", "_partial_dots_kernel"), r
        if r["kernel"] in ("_sgd_kernel", "_adamw_kernel"):
            assert r["fma"], r


# ----------------------------------------------------------------------- the benchmark script
def test_bench_script_runs_and_accounts_bytes(tmp_path):
    """bench/bench_kernels.py on tiny sizes (interpreter numbers are not speed figures):
    every phase and method is timed, the results are written after each part, and the
    launch count is the one asserted above."""
    out = tmp_path / "r.json"
    parts = []
    bench_kernels.main(["--sizes", "4K", "4099", "--dtypes", "fp32", "--tensors", "3",
                        "--launch-counts", "2", "--reps", "1", "--json", str(out)],
                       on_part=lambda r: parts.append(len(r["phases"])))
    results = json.loads(out.read_text())
    assert {r["phase"] for r in results["phases"]} == set(bench_kernels.PHASE_BYTES)
    assert {r["n"] for r in results["phases"]} == {4096, 4099}
    assert all(r["ms"] > 0 for r in results["phases"])
    assert len(results["steps"]) == 2 and all(
        step[m] > 0 for step in results["steps"] for m in bench_kernels.METHODS)
    launches = results["launches"][0]["triton"]
    assert launches["kernels"] == launches["triton"] == 6
    assert parts[:3] == [0, len(bench_kernels.PHASE_BYTES), 2 * len(bench_kernels.PHASE_BYTES)]
    assert sum(bench_kernels.PHASE_BYTES["gr-step"]) * 4 == 48  # bytes per fp32 parameter
