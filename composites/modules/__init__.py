"""The composites and their routing: plain ``nn.Module``s, torch only."""

from .children import StageError
from .conditional import Conditional
from .parallel import COMBINES, Parallel
from .routing import load_balancing_loss
from .sequential import Sequential

__all__ = ["Sequential", "Parallel", "Conditional", "StageError", "COMBINES", "load_balancing_loss"]
