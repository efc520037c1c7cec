"""composites' Lightning classes for the unified ``lightning`` package (``import lightning as L``; ``L.Trainer``).

For a program that imports both packages: ``from composites.training.lightning import CompositeModule``
(every name in ``WRITTEN_ONCE``, see :mod:`composites.training.flavours`).
"""

from .flavours import WRITTEN_ONCE, materialise

globals().update(materialise("lightning", __name__))
__all__ = list(WRITTEN_ONCE)
