from .adamw import GRAdamW
from .base import GROptimizer
from .sgd import GRSGD
from .wrapper import GNP, GR, SAM

__all__ = ["GROptimizer", "GRSGD", "GRAdamW", "GR", "SAM", "GNP"]
