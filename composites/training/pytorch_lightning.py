"""composites' Lightning classes for ``pytorch_lightning`` (``pl.Trainer``): ``composites.training.<Name>`` are these.

Each is its base class (the behaviour, written once) and the ``pytorch_lightning`` class it is;
:mod:`composites.training.lightning` declares the same names for the unified ``lightning`` package.

>>> import pytorch_lightning as pl
>>> issubclass(CompositeModule, pl.LightningModule), issubclass(GradNormPlot, pl.Callback)
(True, True)
"""

import pytorch_lightning as pl

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


class CompositeModule(CompositeModuleBase, pl.LightningModule):
    """:class:`~composites.training.module.CompositeModuleBase` as a ``pytorch_lightning.LightningModule``."""


class GradientGuardCallback(GradientGuardCallbackBase, pl.Callback):
    """:class:`~composites.training.callbacks.gradient_guard.GradientGuardCallbackBase` as a ``pytorch_lightning.Callback``."""


class GradNormPlot(GradNormPlotBase, pl.Callback):
    """:class:`~composites.training.callbacks.grad_norm_plot.GradNormPlotBase` as a ``pytorch_lightning.Callback``."""


class DigitsDataModule(DigitsDataModuleBase, pl.LightningDataModule):
    """:class:`~composites.presets.data.DigitsDataModuleBase` as a ``pytorch_lightning.LightningDataModule``."""


class TerminalProgress(TerminalProgressBase, pl.Callback):
    """:class:`~composites.training.callbacks.progress.TerminalProgressBase` as a ``pytorch_lightning.Callback``."""


class StepCheckpoint(StepCheckpointBase, pl.Callback):
    """:class:`~composites.training.callbacks.checkpoints.StepCheckpointBase` as a ``pytorch_lightning.Callback``."""


class SignalCheckpoint(SignalCheckpointBase, pl.Callback):
    """:class:`~composites.training.callbacks.signal_checkpoint.SignalCheckpointBase` as a ``pytorch_lightning.Callback``."""


class ResumeState(ResumeStateBase, pl.Callback):
    """:class:`~composites.training.callbacks.resume_state.ResumeStateBase` as a ``pytorch_lightning.Callback``."""


class FreezeSubmodels(FreezeSubmodelsBase, pl.Callback):
    """:class:`~composites.training.callbacks.freeze.FreezeSubmodelsBase` as a ``pytorch_lightning.Callback``."""


class FSDP2Strategy(FSDP2StrategyBase, pl.strategies.ModelParallelStrategy):
    """:class:`~composites.training.strategies.fsdp2.FSDP2StrategyBase` as a ``pytorch_lightning`` ``ModelParallelStrategy``."""


class ExpertParallelStrategy(ExpertParallelStrategyBase, pl.strategies.DDPStrategy):
    """:class:`~composites.training.strategies.expert_parallel.ExpertParallelStrategyBase` as a ``pytorch_lightning`` ``DDPStrategy``."""


class PipelineStrategy(PipelineStrategyBase, pl.strategies.DDPStrategy):
    """:class:`~composites.training.strategies.pipeline.PipelineStrategyBase` as a ``pytorch_lightning`` ``DDPStrategy``."""
