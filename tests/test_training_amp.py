"""Mixed precision: gr_fused.amp.GradScaler driving GR steps (both backward passes scaled,
unscaled once inside the step), the inf/NaN skip with the scaler's backoff, fp16 and bf16
autocast, and checkpoints that carry the scaler's state."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import gr_fused
from equality import assert_close, gr_step
from gr_fused.amp import GradScaler

OPTIMIZERS = {
    "grsgd": lambda ps: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, gamma=0.05,
                                       rho=0.05),
    "grsgd_central": lambda ps: gr_fused.GRSGD(ps, lr=0.1, momentum=0.9, gamma=0.05, rho=0.05,
                                               difference="central"),
    "gradamw": lambda ps: gr_fused.GRAdamW(ps, lr=0.01, gamma=0.05, rho=0.05),
    "gr_adam": lambda ps: gr_fused.GR(ps, torch.optim.Adam, lr=0.01, gamma=0.05, rho=0.05),
    "sam": lambda ps: gr_fused.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "gnp": lambda ps: gr_fused.GNP(ps, torch.optim.SGD, rho=0.05, lam=0.02, lr=0.1),
}


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches(n):
    return [(torch.randn(12, 6), torch.randn(12, 3)) for _ in range(n)]


def train(model, opt, data, scaler=None, autocast=None):
    """The documented loop: the closure scales the loss (when a scaler is given) for every
    backward; scaler.step(opt, closure); scaler.update()."""
    losses = []
    for x, y in data:
        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = F.mse_loss(model(x), y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss
        losses.append(gr_step(opt, closure, scaler))
        if scaler is not None:
            scaler.update()
    return losses


def clone_setup(name):
    model = make_model()
    twin = copy.deepcopy(model)
    return model, OPTIMIZERS[name](model.parameters()), twin, OPTIMIZERS[name](twin.parameters())


def states(opt):
    """Every tensor of the optimizer state (the base optimizer's for the GR wrapper)."""
    return [v.clone() for st in opt.state_dict()["state"].values() for v in st.values()
            if torch.is_tensor(v)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_scaled_step_equals_unscaled_fp32_step(name):
    """A power-of-2 scale is exact: scaled GR steps equal unscaled ones bit for bit, which
    needs both gradients scaled and each unscaled exactly once."""
    model, opt, twin, twin_opt = clone_setup(name)
    data = batches(3)
    scaler = GradScaler("cpu", init_scale=2.0 ** 12)
    train(model, opt, data, scaler)
    train(twin, twin_opt, data)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(states(opt), states(twin_opt)):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0 ** 12  # no skip, no growth within the interval
    assert not bool(opt.last_step_skipped)


@pytest.mark.parametrize("name", ["grsgd", "gradamw", "sam", "grsgd_central"])
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_inf_in_either_gradient_skips_restores_and_backs_off(name, bad_pass):
    model, opt, _, _ = clone_setup(name)
    scaler = GradScaler("cpu", init_scale=2.0 ** 10, backoff_factor=0.5)
    (x, y), (x2, y2) = batches(2)
    train(model, opt, [(x, y)], scaler)  # one finite step: momentum / moments exist
    before = [p.detach().clone() for p in model.parameters()]
    state_before = states(opt)
    assert state_before, "the first step should have created optimizer state"
    calls = []
    weight = model[0].weight
    hook = weight.register_hook(
        lambda g: g * float("inf") if len(calls) == bad_pass else g)

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x2), y2)
        scaler.scale(loss).backward()
        return loss

    gr_step(opt, closure, scaler)
    hook.remove()
    assert len(calls) >= 2
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b), "a skipped step must leave θ exactly as it was"
    for a, b in zip(states(opt), state_before):
        assert torch.equal(a, b), "a skipped step must leave the optimizer state unchanged"
    assert bool(opt.last_step_skipped)
    assert int(opt.skipped_steps) == 1
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 9, "update() must back the scale off after a skip"
    train(model, opt, [(x2, y2)], scaler)  # the next finite step is taken
    assert not bool(opt.last_step_skipped)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hand_written_loop_with_scaler_first_and_second_step():
    model, opt, twin, twin_opt = clone_setup("grsgd")
    data = batches(3)
    scaler, twin_scaler = GradScaler("cpu"), GradScaler("cpu")
    for x, y in data:
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.first_step(opt)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.second_step(opt)
        scaler.update()
    train(twin, twin_opt, data, twin_scaler)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_torch_gradscaler_is_refused_for_a_gr_step_with_weights_intact():
    """torch's GradScaler checks for inf before step() computes the gradients, so it cannot
    see an overflow in a GR step: refused with an error that names the fix."""
    model, opt, _, _ = clone_setup("grsgd")
    scaler = torch.amp.GradScaler("cpu")
    (x, y), = batches(1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        return loss

    scaler.scale(torch.ones(()))  # the scale exists, as it would after a first iteration
    with pytest.raises(RuntimeError, match="gr_fused.amp.GradScaler"):
        scaler.step(opt, closure)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y).backward())  # the optimizer is usable again
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, GradScaler])
def test_gamma_zero_with_either_scaler_equals_torch_sgd(scaler_cls):
    """GR off is the base optimizer: the usual non-closure AMP loop, including
    scaler.unscale_ + clip_grad_norm_, matches torch.optim.SGD with torch's scaler."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt = gr_fused.GRSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.0)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scaler, ref_scaler = scaler_cls("cpu"), torch.amp.GradScaler("cpu")
    for i, (x, y) in enumerate(batches(4)):
        for m, o, s in [(model, opt, scaler), (twin, ref, ref_scaler)]:
            o.zero_grad()
            loss = F.mse_loss(m(x), y)
            if i == 2:
                loss = loss * float("inf")  # an overflowing iteration: both skip
            s.scale(loss).backward()
            if i == 3:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            s.step(o)
            s.update()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b), f"iteration {i}"
        assert scaler.get_scale() == ref_scaler.get_scale()
    assert int(opt.skipped_steps) == 1


def test_fp16_autocast_training_with_scaler():
    """fp16 autocast on CPU with the scaler: the GR steps track fp32 training and the loss
    goes down; no step is skipped at the default scale."""
    torch.manual_seed(0)
    model, opt, twin, twin_opt = clone_setup("grsgd")
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    scaler = GradScaler("cpu")
    losses = train(model, opt, [(x, y)] * 8, scaler, autocast=torch.float16)
    train(twin, twin_opt, [(x, y)] * 8)
    assert float(losses[-1].detach()) < float(losses[0].detach())
    assert int(opt.skipped_steps) == 0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, 1e-2, "fp16 autocast vs fp32")


def test_bf16_autocast_without_scaler_is_fd_gr_of_the_autocast_loss():
    """bf16 autocast needs no scaler. One GRSGD step equals FD-GR written by hand from
    gradients of the same autocast forward."""
    model, opt, twin, _ = clone_setup("grsgd")
    (x, y), = batches(1)
    train(model, opt, [(x, y)], autocast=torch.bfloat16)

    def grad_at(params):
        with torch.no_grad():
            for p, v in zip(twin.parameters(), params):
                p.copy_(v)
        twin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(twin(x), y)
        loss.backward()
        return [p.grad.clone() for p in twin.parameters()]

    theta = [p.detach().clone() for p in twin.parameters()]
    g1 = grad_at(theta)
    eps = 0.05 / (torch.sqrt(sum((g * g).sum() for g in g1)) + 1e-12)
    g2 = grad_at([t + eps * g for t, g in zip(theta, g1)])
    alpha = 0.05 / eps
    for p, t, a, b in zip(model.parameters(), theta, g1, g2):
        g = (1 - alpha) * a + alpha * b + 1e-3 * t
        assert_close(p, t - 0.1 * g, 1e-6, "bf16 autocast GR step")


@pytest.mark.parametrize("name", ["grsgd", "gradamw", "sam"])
def test_checkpoint_with_scaler_resumes_bit_for_bit(name):
    """Save model + optimizer + scaler state between steps (after a skipped step, so the
    scale and the growth tracker are not at their defaults), load into fresh objects,
    continue, and match the uninterrupted run exactly."""
    data = batches(6)
    model, opt, _, _ = clone_setup(name)
    start = copy.deepcopy(model.state_dict())
    scaler = GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)

    def run(model, opt, scaler, part):
        for i, (x, y) in enumerate(part):
            scale_loss = float("inf") if (x is data[1][0]) else 1.0

            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                scaler.scale(loss * scale_loss).backward()
                return loss
            gr_step(opt, closure, scaler)
            scaler.update()

    run(model, opt, scaler, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "scaler": scaler.state_dict()}, buf)
    run(model, opt, scaler, data[3:])

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = make_model()
    fresh.load_state_dict(start)  # different weights until the checkpoint is loaded
    fresh_opt = OPTIMIZERS[name](fresh.parameters())
    fresh_scaler = GradScaler("cpu")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    fresh_scaler.load_state_dict(ckpt["scaler"])
    assert fresh_scaler.get_scale() != 2.0 ** 8  # the skip and growth are in the checkpoint
    run(fresh, fresh_opt, fresh_scaler, data[3:])
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(states(fresh_opt), states(opt)):
        assert torch.equal(a, b)
    assert fresh_scaler.get_scale() == scaler.get_scale()
