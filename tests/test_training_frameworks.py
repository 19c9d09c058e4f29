"""Frameworks. PyTorch Lightning: a gr_fused optimizer under automatic optimization
(Lightning passes its closure to optimizer.step, which calls it once per gradient) and manual
optimization (the closure uses manual_backward). Hugging Face accelerate: the prepared
optimizer's step(closure) with accelerator.backward. Each must equal the plain PyTorch loop
bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F

import gr_fused
from gr_fused.amp import GradScaler


def make_opt(params):
    return gr_fused.GRSGD(params, lr=0.1, momentum=0.9, gamma=0.05, rho=0.05)


def plain_loop(net, x, y):
    ref = copy.deepcopy(net)
    opt = make_opt(ref.parameters())
    for xb, yb in zip(x.split(8), y.split(8)):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(ref(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
    return ref


def make_net():
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("scaled", [False, True])
def test_accelerate_prepared_optimizer_steps_with_a_closure(scaled):
    """With scaled=True, gr_fused.amp.GradScaler drives the prepared (wrapped) optimizer;
    a power-of-2 scale is exact, so the result is still bit for bit the plain loop's."""
    accelerate = pytest.importorskip(
        "accelerate", reason="accelerate is not installed (pip install accelerate)")
    x, y = torch.randn(24, 6), torch.randn(24, 3)
    net = make_net()
    ref = plain_loop(net, x, y)
    accelerator = accelerate.Accelerator(cpu=True)
    model = copy.deepcopy(net)
    model, opt, loader = accelerator.prepare(
        model, make_opt(model.parameters()),
        torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8))
    scaler = GradScaler("cpu", enabled=scaled)
    for xb, yb in loader:
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(xb), yb)
            accelerator.backward(scaler.scale(loss))
            return loss
        scaler.step(opt, closure)
        scaler.update()
    for a, b in zip(accelerator.unwrap_model(model).parameters(), ref.parameters()):
        assert torch.equal(a, b)


try:
    import lightning as L
except ImportError:  # the Lightning tests below are skipped, with this reason
    L = None
needs_lightning = pytest.mark.skipif(L is None, reason="lightning is not installed (pip install "
                                     "lightning; it keeps the installed torch)")
LightningModule = L.LightningModule if L is not None else torch.nn.Module


class AutoGR(LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return make_opt(self.parameters())


class ManualGR(AutoGR):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(self.net(x), y)
            self.manual_backward(loss)
            return loss
        return opt.step(closure=closure)


class ManualScaledGR(AutoGR):
    """Manual optimization with gr_fused.amp.GradScaler (what Lightning's "16-mixed" plugin
    cannot do for a GR optimizer): the scaler drives the LightningOptimizer wrapper."""

    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False
        self.scaler = GradScaler("cpu")

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(self.net(x), y)
            self.manual_backward(self.scaler.scale(loss))
            return loss
        loss = self.scaler.step(opt, closure)
        self.scaler.update()
        return loss


@needs_lightning
@pytest.mark.parametrize("module_cls", [AutoGR, ManualGR, ManualScaledGR])
def test_lightning_trains_like_the_plain_loop(module_cls):
    x, y = torch.randn(24, 6), torch.randn(24, 3)
    net = make_net()
    ref = plain_loop(net, x, y)
    module = module_cls(copy.deepcopy(net))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8))
    assert trainer.global_step == 3
    for a, b in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@needs_lightning
def test_lightning_gradient_accumulation_under_automatic_optimization_warns():
    """accumulate_grad_batches > 1 with automatic optimization: Lightning's closure runs
    the last micro-batch only, onto the gradients of the earlier ones, so GR's second
    gradient cannot match the first. The optimizer says so (a warning, as the loop is
    Lightning's); manual optimization, with every micro-batch in the closure, is the way."""
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.warns(UserWarning, match="accumulated onto gradients"):
        trainer.fit(AutoGR(make_net()), torch.utils.data.DataLoader(list(zip(x, y)),
                                                                    batch_size=8))
