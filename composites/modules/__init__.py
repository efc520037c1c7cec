"""The composites and their routing: plain ``nn.Module``s, torch only."""

from .children import StageError, enclosing, is_under, join_name
from .conditional import Conditional
from .parallel import COMBINES, Parallel
from .pretrained import PretrainedKeysError, load_pretrained, read_state_dict
from .routing import load_balancing_loss
from .sequential import Sequential

__all__ = [
    "Sequential",
    "Parallel",
    "Conditional",
    "StageError",
    "COMBINES",
    "load_balancing_loss",
    "is_under",
    "join_name",
    "enclosing",
    "load_pretrained",
    "read_state_dict",
    "PretrainedKeysError",
]
