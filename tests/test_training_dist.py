"""Data-parallel training on 2 CPU ranks (gloo): DDP with global and rank-local ascent,
BatchNorm under DDP, and FSDP2 (fully_shard) with the sharded global norm.

One spawn runs every scenario (a spawn and a process group cost seconds on CI); each test
then checks its scenario's results against a single-process computation made here."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import gr_fused
from equality import assert_close, gr_step
from gr_fused.distributed import local_ascent_step

WORLD = 2
STEPS = 3
RHO, GAMMA, LR, MOM = 0.1, 0.05, 0.1, 0.9


def make_mlp(state=None):
    """The test MLP, with the weights of ``state`` (a state_dict) when given."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    if state is not None:
        model.load_state_dict(state)
    return model


def make_bn_mlp():
    return torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))


def loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# (name, optimizer factory, DDP gradient_as_bucket_view)
GLOBAL_CASES = [
    ("global_grsgd", lambda ps, backend="auto": gr_fused.GRSGD(
        ps, lr=LR, momentum=MOM, weight_decay=1e-3, gamma=GAMMA, rho=RHO, backend=backend),
     False),
    ("global_sam_bucket_view", lambda ps, backend="torch": gr_fused.SAM(
        ps, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, backend=backend), True),
    ("global_sam_cpu_bucket_view", lambda ps, backend="cpu": gr_fused.SAM(
        ps, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, backend=backend), True),
    ("global_gradamw", lambda ps, backend="auto": gr_fused.GRAdamW(
        ps, lr=0.01, gamma=GAMMA, rho=RHO, backend=backend), False),
    # GR (fold ≠ 0) in DDP's bucket views, across DDP's bucket rebuild after the first
    # backward (it copies each grad, fold·g1, into a new bucket view)
    ("global_grsgd_bucket_view", lambda ps, backend="auto": gr_fused.GRSGD(
        ps, lr=LR, momentum=MOM, gamma=GAMMA, rho=RHO, backend=backend), True),
    ("global_grsgd_torch_bucket_view", lambda ps, backend="torch": gr_fused.GRSGD(
        ps, lr=LR, momentum=MOM, gamma=GAMMA, rho=RHO, backend=backend), True),
]


FSDP_CASES = [
    ("fsdp_grsgd", lambda ps: gr_fused.GRSGD(ps, lr=LR, momentum=MOM, weight_decay=1e-3,
                                             gamma=GAMMA, rho=RHO, max_grad_norm=0.5)),
    ("fsdp_gradamw", lambda ps: gr_fused.GRAdamW(ps, lr=0.01, gamma=GAMMA, rho=RHO)),
    # GR off: the plain path clips over the shards too (clip_grad_norm_ semantics)
    ("fsdp_plain_clip", lambda ps: gr_fused.GRSGD(ps, lr=LR, momentum=MOM, gamma=0.0,
                                                  max_grad_norm=0.05)),
]


# ---------------------------------------------------------------------------- the ranks
def _train(model, opt, batches, step=None):
    """STEPS GR steps on this rank's batches; ``step(opt, closure)`` defaults to opt.step
    (for SAM after a first backward, as its step takes the gradients already computed)."""
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss
        (step or gr_step)(opt, closure)


def _ddp(module, **kw):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, **kw)


def _scenarios(rank, init, bn_init, data, bn_data):
    """Every scenario on this rank; returns {name: tensors} for the parent to check."""
    out = {}
    mine = [(x[rank], y[rank]) for x, y in data]  # this rank's half of each global batch

    # 1. global ascent: both gradients all-reduced by DDP. gradient_as_bucket_view=True makes
    #    DDP replace p.grad by its bucket views, which a kernel backend must follow.
    for name, make_opt, as_view in GLOBAL_CASES:
        model = make_mlp(init)
        ddp = _ddp(model, gradient_as_bucket_view=as_view)
        _train(ddp, make_opt(ddp.parameters()), mine)
        out[name] = params_of(model)

    # 1b. GR in bucket views with model.zero_grad() (set_to_none) in the closure: DDP writes
    #     the second gradient over fold·g1 in its bucket; refused, with the weights intact
    model = make_mlp(init)
    ddp = _ddp(model, gradient_as_bucket_view=True)
    opt = gr_fused.GRSGD(ddp.parameters(), lr=LR, gamma=GAMMA, rho=RHO)
    _train(ddp, opt, mine[:1])  # past DDP's bucket rebuild

    def sets_to_none():
        ddp.zero_grad()
        loss = loss_fn(ddp, *mine[1])
        loss.backward()
        return loss
    before = params_of(model)
    try:
        opt.step(sets_to_none)
        raised = ""
    except RuntimeError as exc:
        raised = str(exc)
    out["bucket_view_set_to_none"] = (raised, before, params_of(model))

    # 2. local ascent, SAM: only the first backward under no_sync (α = 1 on every rank)
    model = make_mlp(init)
    ddp = _ddp(model)
    opt = gr_fused.SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    for x, y in mine:
        with ddp.no_sync():
            loss_fn(ddp, x, y).backward()
        opt.first_step()
        loss_fn(ddp, x, y).backward()
        opt.second_step()
    out["local_sam_no_sync"] = params_of(model)

    # 3. local ascent, GR with gamma and normalize: gr_fused.distributed.local_ascent_step
    model = make_mlp(init)
    ddp = _ddp(model)
    opt = gr_fused.GRSGD(ddp.parameters(), lr=LR, momentum=MOM, gamma=GAMMA, rho=RHO)
    _train(ddp, opt, mine, step=lambda o, c: local_ascent_step(o, c, model=ddp))
    out["local_gr"] = params_of(model)

    # 3b. the same with only the first backward under no_sync: α_r differs between ranks
    model = make_mlp(init)
    ddp = _ddp(model)
    opt = gr_fused.GRSGD(ddp.parameters(), lr=LR, gamma=GAMMA, rho=RHO)
    x, y = mine[0]
    with ddp.no_sync():
        loss_fn(ddp, x, y).backward()
    opt.first_step()
    loss_fn(ddp, x, y).backward()
    opt.second_step()
    out["local_gr_no_sync_naive"] = params_of(model)

    # 4. BatchNorm under DDP: running stats after one GR step, frozen and not
    for name, freeze in [("bn_frozen", True), ("bn_unfrozen", False)]:
        model = make_bn_mlp()
        model.load_state_dict(bn_init)
        ddp = _ddp(model)
        opt = gr_fused.GRSGD(ddp.parameters(), lr=LR, gamma=GAMMA, rho=RHO,
                             freeze_bn_stats=freeze)
        xb, yb = bn_data
        _train(ddp, opt, [(xb[rank], yb[rank])])
        bn = model[0]
        out[name] = [bn.running_mean.clone(), bn.running_var.clone(),
                     bn.num_batches_tracked.clone()]

    # 5. FSDP2: parameters sharded over the 2 ranks, global ascent
    from torch.distributed.fsdp import fully_shard
    for name, make_opt in FSDP_CASES:
        model = make_mlp(init)
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        try:
            _train(model, make_opt(model.parameters()), mine)
            out[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
        except Exception as exc:  # reported by the test, so the other scenarios still run
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _worker(rank, init_file, out_dir, args):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))  # as torchrun does
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.save(_scenarios(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # saved, and the group is gone: leave without the interpreter's teardown, where a gloo
    # thread still winding down can abort the process (as examples/train_ddp.py does)
    os._exit(0)


@pytest.fixture(scope="module")
def runs():
    """Spawn the 2 ranks once; returns (inputs, [results of rank 0, results of rank 1])."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    init = make_mlp().state_dict()
    bn_init = make_bn_mlp().state_dict()
    # each global batch: 2 ranks × 6 samples; the BN batch is shifted so its stats matter
    data = [(torch.randn(WORLD, 6, 5), torch.randn(WORLD, 6, 3)) for _ in range(STEPS)]
    bn_data = (torch.randn(WORLD, 8, 5) * 2 + 1, torch.randn(WORLD, 8, 3))
    args = (init, bn_init, data, bn_data)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, args), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    return dict(init=init, bn_init=bn_init, data=data, bn_data=bn_data), results


# ---------------------------------------------------------------------------- references
def _global_reference(make_opt, inputs):
    """One process, the concatenated batch."""
    model = make_mlp(inputs["init"])
    opt = make_opt(model.parameters())
    _train(model, opt, [(x.reshape(-1, 5), y.reshape(-1, 3)) for x, y in inputs["data"]])
    return params_of(model)


def _grad_at(model, params, x, y):
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    model.zero_grad()
    loss_fn(model, x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _local_reference(inputs, combine_rank, steps):
    """Hand-written local ascent: per rank g1_r, ε_r = ρ/‖g1_r‖, g2_r at θ + ε_r·g1_r,
    g = mean_r combine_rank(g1_r, g2_r, ε_r), then torch.optim.SGD(momentum) with g."""
    model = make_mlp(inputs["init"])
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    sgd = torch.optim.SGD(theta, lr=LR, momentum=MOM)
    for x, y in inputs["data"][:steps]:
        per_rank = []
        for r in range(WORLD):
            g1 = _grad_at(model, theta, x[r], y[r])
            eps = RHO / (torch.sqrt(sum((g * g).sum() for g in g1)) + 1e-12)
            g2 = _grad_at(model, [t + eps * g for t, g in zip(theta, g1)], x[r], y[r])
            per_rank.append([combine_rank(a, b, eps) for a, b in zip(g1, g2)])
        for t, *gs in zip(theta, *per_rank):
            t.grad = sum(gs) / WORLD
        sgd.step()
    return [t.detach() for t in theta]


def _same_on_ranks(results, name):
    a, b = results[0][name], results[1][name]
    assert not isinstance(a, str), f"{name} failed on rank 0: {a}"
    assert not isinstance(b, str), f"{name} failed on rank 1: {b}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{name}: parameter {i} differs between the ranks"
    return a


# ---------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", [name for name, _, _ in GLOBAL_CASES])
def test_ddp_global_ascent_equals_one_process_on_the_global_batch(runs, name):
    inputs, results = runs
    got = _same_on_ranks(results, name)
    make_opt = next(make for case, make, _ in GLOBAL_CASES if case == name)
    want = _global_reference(lambda ps: make_opt(ps, backend="torch"), inputs)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"{name} param {i}")
    moved = sum((a - b).norm() for a, b in zip(got, params_of(_initial(inputs))))
    assert moved > 1e-3, "the parameters did not move"


def test_ddp_bucket_views_set_to_none_during_a_gr_step_are_refused(runs):
    """model.zero_grad() in the closure with gradient_as_bucket_view=True: DDP copies the
    second gradient into the bucket memory that held fold·g1. A clear error, θ intact."""
    _, results = runs
    for rank_out in results:
        raised, before, after = rank_out["bucket_view_set_to_none"]
        assert "gradient_as_bucket_view" in raised
        for a, b in zip(before, after):
            assert torch.equal(a, b)


def _initial(inputs):
    model = make_mlp(inputs["init"])
    return model


def test_ddp_local_ascent_sam_with_no_sync_first_pass(runs):
    """SAM (α = 1): the first backward under no_sync, the second all-reduced, gives
    g = mean_r ∇L_r(θ + ρ·g1_r/‖g1_r‖)."""
    inputs, results = runs
    got = _same_on_ranks(results, "local_sam_no_sync")
    want = _local_reference(inputs, lambda g1, g2, eps: g2, STEPS)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"local SAM param {i}")
    glob = _global_reference(lambda ps: gr_fused.SAM(ps, torch.optim.SGD, rho=RHO, lr=LR,
                                                     momentum=MOM), inputs)
    assert sum((a - b).norm() for a, b in zip(got, glob)) > 1e-5, \
        "local ascent should differ from global ascent"


def test_ddp_local_ascent_gr_step(runs):
    """γ-GR with rank-local ascent: g = mean_r[(1 − α_r)·g1_r + α_r·g2_r], α_r = γ/ε_r."""
    inputs, results = runs
    got = _same_on_ranks(results, "local_gr")
    want = _local_reference(
        inputs, lambda g1, g2, eps: (1 - GAMMA / eps) * g1 + (GAMMA / eps) * g2, STEPS)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"local GR param {i}")


def test_ddp_naive_no_sync_with_rank_dependent_alpha_diverges(runs):
    """The documented pitfall that local_ascent_step exists for: with gamma and normalize,
    only the first backward under no_sync leaves the replicas different after one step."""
    _, results = runs
    a, b = results[0]["local_gr_no_sync_naive"], results[1]["local_gr_no_sync_naive"]
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


def _bn_after(bn_init, *batches):
    model = make_bn_mlp()
    model.load_state_dict(bn_init)
    for x in batches:
        model(x)
    return model[0]


def test_ddp_batchnorm_running_stats_frozen_in_perturbed_pass(runs):
    """DDP broadcasts rank 0's buffers at each forward; with the perturbed pass frozen, the
    stats are those of one forward of rank 0's batch (num_batches_tracked = 1)."""
    inputs, results = runs
    xb = inputs["bn_data"][0]
    want = _bn_after(inputs["bn_init"], xb[0])
    for r in range(WORLD):
        mean, var, n = results[r]["bn_frozen"]
        assert int(n) == 1
        torch.testing.assert_close(mean, want.running_mean)
        torch.testing.assert_close(var, want.running_var)


def test_ddp_batchnorm_unfrozen_updates_in_perturbed_pass(runs):
    """freeze_bn_stats=False: the perturbed pass updates them too (on top of rank 0's
    broadcast stats, with this rank's batch)."""
    inputs, results = runs
    xb = inputs["bn_data"][0]
    for r in range(WORLD):
        mean, var, n = results[r]["bn_unfrozen"]
        want = _bn_after(inputs["bn_init"], xb[0], xb[r])
        assert int(n) == 2
        torch.testing.assert_close(mean, want.running_mean)
        torch.testing.assert_close(var, want.running_var)


@pytest.mark.parametrize("name,make_opt", FSDP_CASES)
def test_fsdp2_equals_one_process_on_the_global_batch(runs, name, make_opt):
    """fully_shard: each rank steps its shards; ε_t, the clip and the skip use the global
    norm (all-reduced over the shards), so the result is FD-GR on the global batch."""
    inputs, results = runs
    got = _same_on_ranks(results, name)
    want = _global_reference(make_opt, inputs)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"{name} param {i}")
