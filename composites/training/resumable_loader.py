"""A DataLoader that Lightning resumes mid-epoch: the same batches, in the same order, from where it stopped."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler


class EpochShuffle(RandomSampler):
    """A shuffle that depends only on ``(seed, epoch)``: epoch ``e`` gets the same order in every run.

    ``RandomSampler`` draws each epoch's order from the global random state, which a resumed
    run does not share with the run it continues. Lightning calls ``set_epoch`` before each
    epoch (as it does for a ``DistributedSampler``, which replaces this one under DDP and is
    seeded the same way).

    Example:
        >>> shuffle = EpochShuffle(range(5), seed=0)
        >>> first = list(shuffle); shuffle.set_epoch(1); second = list(shuffle)
        >>> shuffle.set_epoch(0); list(shuffle) == first != second
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableBatchSampler(BatchSampler):
    """Batches of any sampler, with a ``state_dict``: the epoch and how many batches were consumed.

    Lightning fetches no batch ahead from a loader with a length (it knows which batch is the
    last), so the batches handed out are the batches trained: a checkpoint saved at the end of a
    training batch resumes at the next one.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.epoch = 0
        self._skip = 0
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]))
        consumed = int(state["consumed"])
        self._skip = consumed if consumed < len(self) else 0  # a finished epoch: the next one starts afresh


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position Lightning saves in checkpoints and restores on resume.

    With ``shuffle=True`` the order of epoch ``e`` depends only on ``(seed, e)``
    (:class:`EpochShuffle`), and ``state_dict()`` / ``load_state_dict()`` carry the epoch and the
    number of batches consumed, so a run resumed from a mid-epoch checkpoint
    (``StepCheckpoint``, ``SignalCheckpoint``) trains on exactly the batches the uninterrupted
    run would have, in the same order. Worker seeds come from the loader's own generator, not
    the global random state.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        shuffle: shuffle each epoch (by ``(seed, epoch)``).
        seed: seed of the shuffle; ``None``: ``torch.initial_seed()`` (what ``seed_everything`` set).
        drop_last: drop the last incomplete batch.
        **kwargs: any other ``DataLoader`` argument (``num_workers``, ``collate_fn``, ...).

    Example:
        >>> loader = ResumableLoader(list(range(10)), batch_size=2, shuffle=True, seed=0)
        >>> it = iter(loader); first = [next(it).tolist() for _ in range(3)]
        >>> state = loader.state_dict(); state
        {'epoch': 0, 'consumed': 3}
        >>> again = ResumableLoader(list(range(10)), batch_size=2, shuffle=True, seed=0)
        >>> again.load_state_dict(state)
        >>> next(iter(again)).tolist() == [next(it).tolist() for _ in range(1)][0]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        sampler: Sampler | None = None,
        batch_sampler: Sampler | None = None,
        **kwargs: Any,
    ):
        seed = torch.initial_seed() % 2**62 if seed is None else seed
        if batch_sampler is None:  # Lightning passes its own (a DistributedSampler inside) under DDP
            if sampler is None:
                sampler = EpochShuffle(dataset, seed) if shuffle else SequentialSampler(dataset)
            batch_sampler = ResumableBatchSampler(sampler, batch_size, drop_last)
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.shuffle = shuffle
        self.seed = seed

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict() if hasattr(self.batch_sampler, "state_dict") else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and hasattr(self.batch_sampler, "load_state_dict"):
            self.batch_sampler.load_state_dict(state)
