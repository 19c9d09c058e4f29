"""GR with PyTorch Lightning, automatic or manual optimization.

Automatic optimization needs nothing special: ``configure_optimizers`` returns a gr_fused
optimizer, and Lightning passes its closure (training_step + backward) to
``optimizer.step``, which calls it once per gradient. Manual optimization
(``--manual``) writes the same closure with ``manual_backward``.

Do not set ``Trainer(gradient_clip_val=...)``: Lightning clips inside the closure, i.e.
each of the GR gradients separately; use the optimizer's ``max_grad_norm`` instead, which
clips the combined gradient. ``precision="16-mixed"`` is not supported with automatic
optimization (Lightning runs the closure outside ``step`` when it uses a GradScaler); use
``"bf16-mixed"``, or manual optimization with ``gr_fused.amp.GradScaler``.

    pip install lightning
    python examples/train_lightning.py [--manual] [--precision bf16-mixed]
"""
from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F

import gr_fused


class GRClassifier(L.LightningModule):
    def __init__(self, lr=0.05, gamma=0.05, rho=0.05, max_grad_norm=1.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = gr_fused.GRSGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=5e-4,
                             gamma=hp.gamma, rho=hp.rho, max_grad_norm=hp.max_grad_norm)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ManualGRClassifier(GRClassifier):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        loss = opt.step(closure=closure)  # two forward/backward passes
        self.lr_schedulers().step()
        self.log("loss", loss, prog_bar=True)
        return loss


def make_loader(n=2048, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 10, generator=g)).argmax(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch,
                                       shuffle=True, generator=g)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manual", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args(argv)
    L.seed_everything(0)
    module = ManualGRClassifier() if args.manual else GRClassifier()
    trainer = L.Trainer(max_steps=args.steps, accelerator="auto", devices=1,
                        precision=args.precision, logger=False, enable_checkpointing=False)
    trainer.fit(module, make_loader())
    print("final loss", float(trainer.callback_metrics["loss"]))
    return trainer


if __name__ == "__main__":
    main()
