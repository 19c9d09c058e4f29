"""A user model for the profiler tests: ``--model tests.profile_user_model:factory``.

It follows the factory contract of gr_fused.profile.models: factory(batch_size, device,
**size options) -> (model, batch, loss_fn), with loss_fn(model, batch) -> scalar loss.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def factory(batch_size, device, width=8):
    model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 1)).to(device)
    batch = {"inputs": torch.randn(batch_size, 6), "targets": torch.randn(batch_size, 1)}
    return model, batch, regression_loss


def regression_loss(model, batch):
    return F.mse_loss(model(batch["inputs"]), batch["targets"])
