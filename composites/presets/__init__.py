"""The example models and data the shipped configs train: small, offline, deterministic."""

from .models import MLP, ConvEncoder

__all__ = ["MLP", "ConvEncoder"]
