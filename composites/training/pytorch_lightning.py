"""The same classes as :mod:`composites.training.lightning`, made for ``pytorch_lightning`` (``pl.Trainer``)."""

from .flavours import WRITTEN_ONCE, materialise

globals().update(materialise("pytorch_lightning", __name__))
__all__ = list(WRITTEN_ONCE)
