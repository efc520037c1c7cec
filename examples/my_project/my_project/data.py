"""Generated two-sensor data (scikit-learn's make_classification) as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class _Samples(Dataset):
    """``(input, target)`` pairs: the input is the flat feature vector, or a dict of views."""

    def __init__(self, features: Tensor, targets: Tensor, views: Mapping[str, int] | None):
        self.features, self.targets, self.views = features, targets, views

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.features[i]
        if self.views is None:
            return x, self.targets[i]
        parts, start = {}, 0
        for name, width in self.views.items():  # keys = the Parallel's branch names
            parts[name] = x[start : start + width]
            start += width
        return parts, self.targets[i]


class SensorsDataModule(pl.LightningDataModule):
    """Samples read by two sensors (``views``: name -> number of features), ``num_classes`` classes.

    Batches are ``(input, target)``: the input is a ``(batch, features)`` tensor, or with
    ``as_views=True`` a dict ``{view name: (batch, width)}`` whose keys are the branch names
    of a ``Parallel``. Features are standardised with the training split's statistics.

    Example:
        >>> dm = SensorsDataModule(num_classes=3, samples=100, as_views=True, batch_size=4)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> {name: tuple(v.shape) for name, v in x.items()}, y.shape
        ({'audio': (4, 12), 'vibration': (4, 8)}, torch.Size([4]))
    """

    def __init__(
        self,
        num_classes: int = 3,
        samples: int = 900,
        views: Mapping[str, int] | None = None,
        as_views: bool = False,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
    ):
        super().__init__()
        self.num_classes, self.samples, self.as_views, self.batch_size = num_classes, samples, as_views, batch_size
        self.views = dict(views) if views is not None else {"audio": 12, "vibration": 8}
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.train_set: _Samples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import make_classification

        width = sum(self.views.values())
        x, y = make_classification(
            n_samples=self.samples,
            n_features=width,
            n_informative=width // 2,
            n_classes=self.num_classes,
            n_clusters_per_class=1,
            class_sep=1.5,
            random_state=self.seed,
        )
        features, targets = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
        n_val, n_test = int(self.samples * self.val_fraction), int(self.samples * self.test_fraction)
        n_train = self.samples - n_val - n_test
        mean, std = features[:n_train].mean(0), features[:n_train].std(0)
        features = (features - mean) / std
        views = self.views if self.as_views else None
        bounds = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, self.samples)]
        self.train_set, self.val_set, self.test_set = (_Samples(features[a:b], targets[a:b], views) for a, b in bounds)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)
