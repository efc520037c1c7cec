"""composites' Lightning classes for ``pytorch_lightning`` (``import pytorch_lightning as pl``; ``pl.Trainer``).

For a program that imports both Lightning packages: ``from composites.training.pytorch_lightning import CompositeModule``
(also ``GradientGuardCallback``, ``GradNormPlot``, ``DigitsDataModule``, ...: every name in
``WRITTEN_ONCE`` in :mod:`composites.training.flavours`). Each is the class written once in composites, made a
subclass of this package's ``LightningModule`` / ``Callback`` / ``LightningDataModule``.
"""

from .flavours import WRITTEN_ONCE, materialise

globals().update(materialise("pytorch_lightning", __name__))
__all__ = list(WRITTEN_ONCE)
