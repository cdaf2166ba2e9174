"""This process's place in a run: the process group under ``torchrun``, the device, seeds.

Gradients are averaged by torch's DistributedDataParallel (in the trainer); :class:`Processes`
wraps the few ``torch.distributed`` collectives the trainer needs beside it (agreeing on a
checkpoint, summing logged values, gathering random states).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from LongitudinalDiffusionLib.diffusion import resolve_device


@dataclass
class Processes:
    """This process's place in a (possibly distributed) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (one collective call)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj``, in every process."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def start_processes(device: str = "auto") -> Processes:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on
    CUDA, gloo on the CPU; each process takes the GPU of its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Processes(rank=rank, world=world, local_rank=local, device=dev)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for each combination)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)
