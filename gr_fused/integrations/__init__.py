"""Integrations with the training loops people already use (optional dependencies).

* :mod:`gr_fused.integrations.transformers`: ``GRTrainer``, a Hugging Face
  ``transformers.Trainer`` whose optimizer steps are GR steps.

Lightning and accelerate need no integration module: see docs/training.md.
"""
