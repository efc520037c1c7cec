"""The pipeline strategy as a real strategy class of each Lightning package.

(After issue 18 lands these two move into ``composites/training/pytorch_lightning.py`` and
``composites/training/lightning.py``.)
"""

from __future__ import annotations

import lightning.pytorch as L
import pytorch_lightning as pl

from .pipeline import PipelineStrategyBase


class PipelineStrategy(PipelineStrategyBase, pl.strategies.DDPStrategy):
    """``trainer=pipeline`` for ``pytorch_lightning``: a ``Sequential``'s stages over ranks (see :class:`PipelineStrategyBase`).

    Example:
        >>> strategy = PipelineStrategy(split=[["encoder"], ["head"]], n_microbatches=4, schedule="gpipe")
        >>> strategy.split, strategy.schedule
        ([['encoder'], ['head']], 'gpipe')
    """


class LightningPipelineStrategy(PipelineStrategyBase, L.strategies.DDPStrategy):
    """The same strategy for the unified ``lightning`` package (``lightning.pytorch.Trainer``).

    Example:
        >>> LightningPipelineStrategy(n_microbatches=8).n_microbatches
        8
    """
