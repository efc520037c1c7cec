"""The digits data set (bundled with scikit-learn, no download) as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..training.packages import check_same_package
from ..training.resumable_loader import ResumableLoader

KINDS = ("image", "flat")
INPUTS = (*KINDS, "views")


class _Digits(Dataset):
    """Samples ``(input, target)``; the input is a tensor, or a dict of views for a ``Parallel``."""

    def __init__(self, images: Tensor, targets: Tensor, inputs: str, views: Mapping[str, str]):
        self.images = images
        self.targets = targets
        self.inputs = inputs
        self.views = dict(views)

    def __len__(self) -> int:
        return len(self.targets)

    def _view(self, kind: str, i: int) -> Tensor:
        return self.images[i] if kind == "image" else self.images[i].flatten()

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        if self.inputs == "views":
            return {name: self._view(kind, i) for name, kind in self.views.items()}, self.targets[i]
        return self._view(self.inputs, i), self.targets[i]


class DigitsDataModuleBase:
    """scikit-learn's 1,797 handwritten 8x8 digits, split, standardised and batched.

    The split is stratified and fixed by ``seed``; pixels are standardised with the mean and
    standard deviation of the training split only (no leak from val/test). Targets are class
    indices ``0 .. num_classes - 1``.

    Args:
        inputs: what a sample's input is: ``"image"`` (float ``1x8x8``), ``"flat"`` (a
            64-vector), or ``"views"``: a dict with one entry per name in ``views``, made for a
            ``Parallel`` whose branch names are those keys.
        views: with ``inputs="views"``, mapping entry name -> ``"image"`` or ``"flat"``.
        batch_size: samples per batch (all splits).
        num_workers: DataLoader worker processes; the data is in memory, so 0 is fastest.
        val_fraction: share of all samples held out for validation.
        test_fraction: share of all samples held out for testing.
        seed: seed of the split (independent of the training seed).
        num_classes: keep the digits ``0 .. num_classes - 1`` (2 to 10); the configs size the
            model's head and the metrics from it (``${data.num_classes}``).

    The ``LightningDataModule`` is ``composites.presets.DigitsDataModule`` (``pytorch_lightning``) or
    ``composites.training.lightning.DigitsDataModule``.

    Example:
        >>> from composites.presets import DigitsDataModule
        >>> dm = DigitsDataModule(inputs="views", batch_size=4)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> {name: tuple(v.shape) for name, v in x.items()}, y.shape
        ({'image': (4, 1, 8, 8), 'flat': (4, 64)}, torch.Size([4]))
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (1257, 270, 270)
    """

    def __init__(
        self,
        inputs: str = "image",
        views: Mapping[str, str] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_classes: int = 10,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= 10:
            raise ValueError(
                f"num_classes={num_classes!r} must be an int from 2 to 10 (data.num_classes): the digits kept"
            )
        views = dict(views) if views is not None else {"image": "image", "flat": "flat"}
        if inputs not in INPUTS:
            raise ValueError(f"inputs='{inputs}' is not one of {', '.join(INPUTS)}")
        bad = {name: kind for name, kind in views.items() if kind not in KINDS}
        if bad:
            raise ValueError(f"views {bad}: each view must be one of {', '.join(KINDS)}")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be above 0 and sum "
                "below 1 (data.val_fraction / data.test_fraction): both splits need samples, and so does training"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int (data.batch_size)")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"num_workers={num_workers!r} must be an int >= 0 (data.num_workers; 0: load in this process)"
            )
        self.save_hyperparameters()
        self.inputs = inputs
        self.views = views
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_classes = num_classes
        self.train_set: _Digits | None = None

    @property
    def trainer(self) -> Any:
        """The Trainer this data module is attached to (``None`` before ``fit``/``test``)."""
        return self.__dict__.get("_attached_trainer")

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        # The Trainer sets this before it first uses the data module: a Trainer of the other Lightning
        # package is named here, before Lightning's own check fails with "Expected a parent"
        check_same_package(self, trainer)
        self.__dict__["_attached_trainer"] = trainer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # every stage uses the same split; build it once
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits(n_class=self.num_classes)
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
        targets = torch.tensor(data.target, dtype=torch.long)
        index = list(range(len(targets)))
        held = self.val_fraction + self.test_fraction
        try:
            train, rest = train_test_split(index, test_size=held, stratify=data.target, random_state=self.seed)
            val, test = train_test_split(
                rest, test_size=self.test_fraction / held, stratify=data.target[rest], random_state=self.seed
            )
        except ValueError as error:  # a split too small to hold every class
            least = round(2 * self.num_classes / len(index), 3)
            raise ValueError(
                f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction} of {len(index)} samples leave "
                f"a split with fewer samples than the {self.num_classes} classes (stratified splits need one of each): "
                f"raise data.val_fraction / data.test_fraction to at least {least}"
            ) from error
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.train_set = _Digits(images[train], targets[train], self.inputs, self.views)
        self.val_set = _Digits(images[val], targets[val], self.inputs, self.views)
        self.test_set = _Digits(images[test], targets[test], self.inputs, self.views)

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        # resumable: a mid-epoch checkpoint resumes on the same batches, in the same order
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
