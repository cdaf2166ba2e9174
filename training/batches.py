"""The order of the training items: epochs of a fixed permutation, resumable mid-epoch.

Every epoch is a permutation of (seed, stage, epoch) split between the processes (torch's
``DistributedSampler``, the last incomplete batch dropped); the datasets' own random choices
follow the epoch of the item read, in whichever process or loader worker reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler


class EpochStream:
    """(epoch, index) keys without end, from epoch ``epoch``, skipping the first ``offset``
    batches of it: each epoch is the sampler's order, cut to whole batches."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, epoch: int, offset: int) -> None:
        self.sampler, self.batch_size, self.epoch, self.offset = sampler, batch_size, epoch, offset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.epoch, self.offset
        whole = len(self.sampler) // self.batch_size * self.batch_size
        while True:
            self.sampler.set_epoch(epoch)
            for index in list(self.sampler)[offset * self.batch_size : whole]:
                yield epoch, index
            epoch, offset = epoch + 1, 0


class EpochItems(torch.utils.data.Dataset):
    """A dataset read by (epoch, index): the item's random choices follow its epoch, in
    whichever process (or loader worker) reads it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]
