"""composites' Lightning classes for the unified ``lightning`` package (``import lightning as L``; ``L.Trainer``).

A program that trains with ``lightning`` imports from here
(``from composites.training.lightning import CompositeModule``); each class is its base class (the
behaviour, written once) and the ``lightning`` class it is. :mod:`composites.training.pytorch_lightning`
declares the same names for ``pytorch_lightning``.

>>> import lightning as L
>>> issubclass(CompositeModule, L.LightningModule), issubclass(GradNormPlot, L.Callback)
(True, True)
"""

import lightning.pytorch as L

from ..presets.data import DigitsDataModuleBase
from .callbacks.checkpoints import StepCheckpointBase
from .callbacks.freeze import FreezeSubmodelsBase
from .callbacks.grad_norm_plot import GradNormPlotBase
from .callbacks.gradient_guard import GradientGuardCallbackBase
from .callbacks.progress import TerminalProgressBase
from .callbacks.resume_state import ResumeStateBase
from .callbacks.signal_checkpoint import SignalCheckpointBase
from .module import CompositeModuleBase
from .packages import LIGHTNING_CLASSES
from .strategies.expert_parallel import ExpertParallelStrategyBase
from .strategies.fsdp2 import FSDP2StrategyBase
from .strategies.pipeline import PipelineStrategyBase

__all__ = list(LIGHTNING_CLASSES)  # each declared below


class CompositeModule(CompositeModuleBase, L.LightningModule):
    """:class:`~composites.training.module.CompositeModuleBase` as a ``lightning.pytorch.LightningModule``."""


class GradientGuardCallback(GradientGuardCallbackBase, L.Callback):
    """:class:`~composites.training.callbacks.gradient_guard.GradientGuardCallbackBase` as a ``lightning.pytorch.Callback``."""


class GradNormPlot(GradNormPlotBase, L.Callback):
    """:class:`~composites.training.callbacks.grad_norm_plot.GradNormPlotBase` as a ``lightning.pytorch.Callback``."""


class DigitsDataModule(DigitsDataModuleBase, L.LightningDataModule):
    """:class:`~composites.presets.data.DigitsDataModuleBase` as a ``lightning.pytorch.LightningDataModule``."""


class TerminalProgress(TerminalProgressBase, L.Callback):
    """:class:`~composites.training.callbacks.progress.TerminalProgressBase` as a ``lightning.pytorch.Callback``."""


class StepCheckpoint(StepCheckpointBase, L.Callback):
    """:class:`~composites.training.callbacks.checkpoints.StepCheckpointBase` as a ``lightning.pytorch.Callback``."""


class SignalCheckpoint(SignalCheckpointBase, L.Callback):
    """:class:`~composites.training.callbacks.signal_checkpoint.SignalCheckpointBase` as a ``lightning.pytorch.Callback``."""


class ResumeState(ResumeStateBase, L.Callback):
    """:class:`~composites.training.callbacks.resume_state.ResumeStateBase` as a ``lightning.pytorch.Callback``."""


class FreezeSubmodels(FreezeSubmodelsBase, L.Callback):
    """:class:`~composites.training.callbacks.freeze.FreezeSubmodelsBase` as a ``lightning.pytorch.Callback``."""


class FSDP2Strategy(FSDP2StrategyBase, L.strategies.ModelParallelStrategy):
    """:class:`~composites.training.strategies.fsdp2.FSDP2StrategyBase` as a ``lightning.pytorch`` ``ModelParallelStrategy``."""


class ExpertParallelStrategy(ExpertParallelStrategyBase, L.strategies.DDPStrategy):
    """:class:`~composites.training.strategies.expert_parallel.ExpertParallelStrategyBase` as a ``lightning`` ``DDPStrategy``."""


class PipelineStrategy(PipelineStrategyBase, L.strategies.DDPStrategy):
    """:class:`~composites.training.strategies.pipeline.PipelineStrategyBase` as a ``lightning.pytorch`` ``DDPStrategy``."""
