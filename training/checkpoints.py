"""The trainer's checkpoints: listing, reading and the random states saved in them.

A checkpoint (``checkpoints/step-NNNNNNNN.pt``) holds only tensors and plain Python values, so
it is read with ``weights_only=True``. Its keys: ``format``, ``version``, ``method``,
``config``, ``step``, ``stage``, ``model``, ``ema``, ``ema_updates``, ``optimizer``,
``scaler``, ``rng`` (one entry per process), ``world_size``, ``fingerprints``, ``time_s``,
``metrics``.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from LongitudinalDiffusionLib.errors import InputError

CHECKPOINT_FORMAT = "longdiff-training-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state(loss_generator: torch.Generator) -> dict[str, Any]:
    """This process's random states, as tensors and plain types (loadable with weights_only)."""
    # legacy=True (the default) always gives the 5-tuple; the stubs also allow the dict form
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = legacy
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's GPU
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
        "loss": loss_generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], loss_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    loss_generator.set_state(state["loss"])


def fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict, in order: equal weights, equal fingerprints."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step-*.pt"))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of this trainer. Everything in it is a tensor or a plain Python value, so
    it is read with ``weights_only=True``: no pickled code runs even for a planted file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files; the cause is chained
        raise InputError(path, f"not a readable training checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "not a checkpoint written by training.train")
    return ckpt
