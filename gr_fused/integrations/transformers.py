"""``GRTrainer``: a Hugging Face ``transformers.Trainer`` whose optimizer steps are GR steps.

The Trainer's loop computes one gradient per micro-batch and then calls
``optimizer.step()`` without a closure, which cannot give GR its second gradient.
``GRTrainer`` runs the second pass itself, at the end of each optimizer step::

    from gr_fused.integrations.transformers import GRTrainer

    trainer = GRTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        gr_kwargs=dict(gamma=0.05, rho=0.05))      # GRAdamW with the args' lr
    trainer.train()

or with any gr_fused optimizer: ``optimizers=(gr_fused.SAM(model.parameters(),
torch.optim.AdamW, rho=0.05, lr=1e-4), None)``, or ``optimizer_cls_and_kwargs=
(gr_fused.GRAdamW, {...})`` (the Trainer then builds its weight-decay groups).

What it computes. Each micro-batch runs twice. The first pass (the Trainer's own
``training_step``) accumulates g1 over the micro-batches of an optimizer step, exactly as the
Trainer accumulates any gradient. After the last micro-batch the optimizer moves to the
ascent point, every micro-batch of that step runs again there (forward and backward, under
``no_sync`` but the last, as the Trainer does), and the Trainer's ``optimizer.step()``
completes the GR step. So with gradient accumulation this is the GR step of the whole
accumulated batch: the same step as one batch of that size without accumulation.

Details:

* ``args.max_grad_norm`` (1.0 by default in the Trainer) clips the combined gradient, inside
  the optimizer (``max_grad_norm`` of its param groups), with clip_grad_norm_'s semantics; the
  Trainer's own clipping of g1 is turned off.
* ``bf16=True`` needs nothing more. ``fp16=True`` replaces the accelerator's GradScaler by
  ``gr_fused.amp.GradScaler`` (a subclass), so both passes are scaled and an inf/NaN in either
  gradient skips the step, restores θ and backs the scale off; the Trainer then also skips
  the LR scheduler for that step, as it does for a skipped fp16 step.
* ``save_model`` / ``save_pretrained`` (safetensors), checkpoints and
  ``resume_from_checkpoint`` work as with any optimizer: the parameters and the optimizer
  state are plain tensors.
* DeepSpeed is not supported (it owns the optimizer step).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Dict, List, Optional, Tuple

import torch
import transformers

from ..amp import GradScaler, _gr_optimizer
from ..optim import GRAdamW
from ..optim.base import GROptimizer

__all__ = ["GRTrainer"]


class _SkippedStepToTrainer(transformers.TrainerCallback):
    """After ``optimizer.step()``: tell the accelerator a GR step that found inf/NaN was
    skipped, so the Trainer leaves the LR scheduler alone for it (fp16 only; a host read,
    as the GradScaler's own skip check is)."""

    def __init__(self, trainer: "GRTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        opt = trainer._gr_optimizer()
        wrapper = trainer.optimizer
        if (opt is not None and trainer.accelerator.scaler is not None
                and opt.last_step_skipped is not None and hasattr(wrapper, "_is_overflow")):
            wrapper._is_overflow = bool(opt.last_step_skipped)
        return control


class GRTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer steps are GR steps (see the module
    docstring). ``gr_kwargs``: the GR arguments (gamma, rho, ...) of the default optimizer,
    ``gr_fused.GRAdamW`` with the Trainer's learning rate, betas, epsilon and weight-decay
    groups; ignored when an optimizer is given."""

    def __init__(self, *args, gr_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            a = self.args
            self.optimizer_cls_and_kwargs = (GRAdamW, dict(
                lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                **(gr_kwargs or {})))
        # the Trainer would clip g1 before the step: clip the combined gradient instead
        self._gr_max_grad_norm = self.args.max_grad_norm if self.args.max_grad_norm else None
        self.args = copy.copy(self.args)  # the caller's arguments stay as they are
        self.args.max_grad_norm = 0.0
        scaler = self.accelerator.scaler
        if scaler is not None and not isinstance(scaler, GradScaler):
            self.accelerator.scaler = GradScaler(
                scaler._device, init_scale=scaler._init_scale,
                growth_factor=scaler._growth_factor, backoff_factor=scaler._backoff_factor,
                growth_interval=scaler._growth_interval, enabled=scaler._enabled)
        self._gr_micro_batches: List[Tuple[Any, Any]] = []
        self.add_callback(_SkippedStepToTrainer(self))

    def _gr_optimizer(self) -> Optional[GROptimizer]:
        return None if self.optimizer is None else _gr_optimizer(self.optimizer)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        opt = _gr_optimizer(optimizer)
        if opt is None:
            raise TypeError(f"GRTrainer needs a gr_fused optimizer, got {type(optimizer).__name__}: "
                            "pass gr_kwargs=..., optimizers=(gr_fused.GRAdamW(...), None) or "
                            "optimizer_cls_and_kwargs=(gr_fused.GRAdamW, {...})")
        if self._gr_max_grad_norm is not None:
            names = opt._gr_names
            for group in opt.param_groups:
                if group[names["max_grad_norm"]] is None:
                    group[names["max_grad_norm"]] = self._gr_max_grad_norm
        return optimizer

    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step at θ (g1 accumulates); after the last micro-batch of an
        optimizer step, the ascent and the perturbed pass(es) over that step's micro-batches.
        The Trainer's ``optimizer.step()`` then completes the GR step."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        opt = self._gr_optimizer()
        if opt is None or not opt.gr_active() or not opt.refresh_due:
            return loss  # (interval=k between refreshes: optimizer.step() reuses the direction)
        self._gr_micro_batches.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss
        batches, self._gr_micro_batches = self._gr_micro_batches, []
        scaler = self.accelerator.scaler
        if isinstance(scaler, GradScaler):
            scaler.first_step(opt)
        else:
            opt.first_step()
        try:
            self._gr_replay(model, batches)
            if opt._pending is not None and opt._needs_reflect():
                opt.reflect_step()
                self._gr_replay(model, batches)
        except BaseException:
            opt.abort_step()
            if scaler is not None:
                GradScaler._detach(opt)
            raise
        return loss

    def _gr_replay(self, model, batches) -> None:
        """Forward and backward of every micro-batch at the current (perturbed) point, with
        the Trainer's loss scaling; gradients are synchronized on the last one only."""
        for i, (inputs, num_items) in enumerate(batches):
            last = i == len(batches) - 1
            sync = (contextlib.nullcontext if last
                    else functools.partial(self.accelerator.no_sync, model=model))
            with sync():
                super().training_step(model, inputs, num_items)
