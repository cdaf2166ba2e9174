"""The exponential moving average of the trained network: torch's ``AveragedModel``.

:class:`torch.optim.swa_utils.AveragedModel` keeps the averaged copy, counts the updates and
keeps the buffers in step with the trained network; this module gives it the trainer's average:
decay ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (a warm-up, so that short runs
are not dominated by the random initial weights), applied to the parameters being trained only.
A frozen part (the finished stage of Cas-DiffCom) keeps its average as it was.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA:
    """Exponential moving average of ``model``'s weights; ``.model`` is the averaged network.

    The averaged copy starts equal to ``model`` (``AveragedModel``'s deep copy, which counts as
    its first average, so ``n_averaged`` is ``updates + 1``). Pass the network itself, not a
    DistributedDataParallel wrapper: every replica holds the same weights, so every process
    holds the same average.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self._trained: set[int] = set()  # storage addresses of the averaged tensors to update
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=False)
        self.averaged.n_averaged.fill_(1)
        self.model: nn.Module = self.averaged.module
        self.model.eval().requires_grad_(False)

    @property
    def updates(self) -> int:
        """The updates averaged in so far (saved in checkpoints as ``ema_updates``)."""
        return int(self.averaged.n_averaged) - 1

    @updates.setter
    def updates(self, value: int) -> None:
        self.averaged.n_averaged.fill_(int(value) + 1)

    def decay_at(self, updates: int) -> float:
        """The decay of the ``updates``-th update (counting from 1)."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s trainable parameters (frozen ones are left alone) and copy its buffers."""
        live = dict(model.named_parameters())
        self._trained = {e.data_ptr() for name, e in self.model.named_parameters() if live[name].requires_grad}
        self.averaged.update_parameters(model)

    def _average(
        self,
        averaged: tuple[torch.Tensor, ...] | list[torch.Tensor],
        current: tuple[torch.Tensor, ...] | list[torch.Tensor],
        n: torch.Tensor | int,
    ) -> None:
        # AveragedModel passes detached views (same storage) grouped by device and dtype, and
        # n = updates before this one + 1, i.e. the number of this update
        weight = 1.0 - self.decay_at(int(n))
        for e, p in zip(averaged, current):
            if e.data_ptr() in self._trained:
                e.lerp_(p, weight)
