"""Broken sub-models that configs can name by ``_target_`` (tests put this folder on PYTHONPATH)."""

from torch import Tensor

from composites.presets.models import ConvEncoder


class DetachedConvEncoder(ConvEncoder):
    """The preset's encoder, but its output is detached: none of its parameters can learn."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).detach()
