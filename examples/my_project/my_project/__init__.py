"""A user's own package: a LightningDataModule and two composites of its own, trained through Hydra.

Nothing here is part of composites: it shows what a project of yours looks like next to it.
"""

from .data import SensorsDataModule
from .experts import FeatureGate
from .fusion import GatedFusion

__all__ = ["SensorsDataModule", "GatedFusion", "FeatureGate"]
