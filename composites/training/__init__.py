"""The Lightning side: the module, its callbacks, optimizer groups, epoch logging, strategy set-up."""

from .grad_norm_callback import GradNormPlot
from .module import CompositeModule

__all__ = ["CompositeModule", "GradNormPlot"]
