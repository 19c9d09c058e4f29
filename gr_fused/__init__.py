"""gr_fused: fast gradient regularization (finite-difference GR, SAM, GNP) for PyTorch."""
from . import amp, backends, distributed, functional
from .backends import BackendUnavailable
from .db import db_gr_backward
from .optim import GNP, GR, SAM, GRAdamW, GROptimizer, GRSGD

__version__ = "0.1.0"

__all__ = ["GRSGD", "GRAdamW", "GR", "SAM", "GNP", "GROptimizer", "db_gr_backward",
           "functional", "backends", "amp", "distributed", "BackendUnavailable", "__version__"]
