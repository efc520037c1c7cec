"""Small building blocks for the shipped presets: an MLP and a conv encoder for 8x8 images.

They are ordinary ``nn.Module``s; the presets in ``configs/composite/`` compose them with
:class:`~composites.Sequential`, :class:`~composites.Parallel` and
:class:`~composites.Conditional`. Any other module works in their place.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them; the input is flattened from dimension 1 first.

    Flattening first lets the same block take a flat vector or an image, so one preset can
    swap its input view without an adapter. There is no activation after the last layer.

    Args:
        in_features: width of the (flattened) input.
        out_features: width of the output.
        hidden: widths of the hidden layers; empty gives a single ``nn.Linear``.
        dropout: dropout probability after each hidden activation.

    Example:
        >>> import torch
        >>> mlp = MLP(64, 10, hidden=[32])
        >>> mlp(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
        >>> [name for name, _ in mlp.named_parameters()]
        ['net.0.weight', 'net.0.bias', 'net.3.weight', 'net.3.bias']
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class ConvEncoder(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a linear projection to a feature vector.

    Sized for small images such as the 1x8x8 digits; ``image_size`` only fixes the width of
    the projection.

    Args:
        out_features: width of the feature vector.
        in_channels: channels of the input image.
        channels: output channels of the two convolutions.
        image_size: height (= width) of the input image.

    Example:
        >>> import torch
        >>> encoder = ConvEncoder(out_features=32)
        >>> encoder(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 32])
    """

    def __init__(
        self, out_features: int = 64, in_channels: int = 1, channels: Sequence[int] = (16, 32), image_size: int = 8
    ):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.project = nn.Sequential(nn.Linear(c2 * (image_size // 2) ** 2, out_features), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x).flatten(1))  # (batch, c2 * (size/2)^2) -> (batch, out)
