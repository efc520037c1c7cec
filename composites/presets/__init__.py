"""The example models and data the shipped configs train: small, offline, deterministic.

``DigitsDataModule`` is the ``pytorch_lightning`` data module (imported on first use, with Lightning);
``composites.training.lightning.DigitsDataModule`` is the one for the unified ``lightning`` package.
"""

from .models import MLP, ConvEncoder

__all__ = ["MLP", "ConvEncoder", "DigitsDataModule"]


def __getattr__(name: str):
    if name == "DigitsDataModule":  # Lightning is slow to import: only when asked for
        from ..training.pytorch_lightning import DigitsDataModule

        return DigitsDataModule
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
