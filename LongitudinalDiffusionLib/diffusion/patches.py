"""Full resolution within memory: the denoiser run on overlapping patches, blended.

A network's activations grow with the volume: one step of the Cas-DiffCom refiner at
160x192x160 needs about 9 GB on the CPU, most of it 32- to 96-channel feature maps at full
resolution (docs/performance.md). :func:`patch_denoiser` wraps a denoiser
``fn(x, t, cond) -> output`` so that each call runs the network on overlapping windows of
``roi`` voxels and blends the window outputs with Gaussian weights (MONAI's
``sliding_window_inference``), keeping the peak memory to that of one window plus the whole
volume's input and output. It is a drop-in denoiser for ``diffusion.sample``: the sampler and
its arithmetic are unchanged.

The conditions go with the windows: every tensor in ``cond`` (a tensor, or a dict / list /
tuple of them) whose spatial shape equals x's is cut into the same windows; anything else
(ages, intervals, per-sample embeddings) is passed whole.

**What it costs in fidelity.** A window sees only its part of the volume: convolutions near
its border see zero padding instead of the neighbours, GroupNorm normalises with the
window's statistics, and attention attends within the window. The output therefore differs
from whole-volume inference, most at the seams; the overlap and the Gaussian blend hide the
borders. ``bench/full_resolution.py`` measures the difference (the seam error) at a size
where both fit. Where the window covers the volume the wrapper calls the denoiser once, as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _spatial_leaves(cond: Any, spatial: tuple[int, ...], found: list[torch.Tensor]) -> Any:
    """``cond`` with its volume-shaped tensors replaced by their index in ``found``."""
    if isinstance(cond, torch.Tensor) and cond.dim() >= 3 and tuple(cond.shape[2:]) == spatial:
        found.append(cond)
        return _Slot(len(found) - 1)
    if isinstance(cond, dict):
        return {k: _spatial_leaves(v, spatial, found) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_spatial_leaves(v, spatial, found) for v in cond)
    return cond


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index


def _filled(template: Any, parts: list[torch.Tensor]) -> Any:
    if isinstance(template, _Slot):
        return parts[template.index]
    if isinstance(template, dict):
        return {k: _filled(v, parts) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(_filled(v, parts) for v in template)
    return template


def _row(obj: Any, b: int, n: int) -> Any:
    """Batch element ``b`` of every tensor in ``obj`` that has a batch of ``n``."""
    if isinstance(obj, torch.Tensor):
        return obj[b : b + 1] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _row(v, b, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_row(v, b, n) for v in obj)
    return obj


def patch_denoiser(
    denoiser: Denoiser,
    roi: Sequence[int],
    overlap: float = 0.25,
    mode: str = "gaussian",
) -> Denoiser:
    """``denoiser`` run window by window (``roi`` voxels, ``overlap`` of a window shared with
    its neighbour, ``mode`` "gaussian" or "constant" blending); see the module's text.

    Raises:
        ValueError: a window size that is not positive, or an overlap outside [0, 1).
    """
    roi = tuple(int(r) for r in roi)
    if any(r < 1 for r in roi):
        raise ValueError(f"patch size must be positive, got {roi}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")

    def patched(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        if len(roi) != len(spatial):
            raise ValueError(f"patch size {roi} does not match the volume's {len(spatial)} spatial dimensions")
        if all(r >= s for r, s in zip(roi, spatial)):
            return denoiser(x, t, cond)
        n = x.shape[0]
        if n > 1:  # one batch element at a time (the guidance pair): windows of a batch of 1
            return torch.cat([patched(x[b : b + 1], _row(t, b, n), _row(cond, b, n)) for b in range(n)])
        from monai.inferers import sliding_window_inference

        found: list[torch.Tensor] = []
        template = _spatial_leaves(cond, spatial, found)
        sizes = [x.shape[1]] + [c.shape[1] for c in found]
        joined = torch.cat([x] + [c.to(x.dtype).expand(x.shape[0], *c.shape[1:]) for c in found], dim=1)

        def window(part: torch.Tensor) -> torch.Tensor:
            pieces = list(torch.split(part, sizes, dim=1))
            xs = pieces[0]
            return denoiser(xs, t, _filled(template, pieces[1:]))

        out = sliding_window_inference(
            joined,
            roi_size=tuple(min(r, s) for r, s in zip(roi, spatial)),
            sw_batch_size=1,
            predictor=window,
            overlap=overlap,
            mode=mode,
            padding_mode="constant",
        )
        # MONAI returns a tuple or dict only for a predictor that does; ``window`` returns a tensor
        if not isinstance(out, torch.Tensor):  # pragma: no cover
            raise TypeError(f"sliding-window inference returned {type(out).__name__}, not a tensor")
        return out

    patched.roi = roi  # type: ignore[attr-defined]
    return patched
