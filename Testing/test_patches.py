"""Patch-wise denoising (diffusion/patches.py): the windows and the conditions are cut alike
and blended back to the whole volume; a window that covers the volume changes nothing."""

from __future__ import annotations

import pytest
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule, sample
from LongitudinalDiffusionLib.diffusion.patches import patch_denoiser


def _pointwise(x, t, cond):
    """A voxel-wise 'network': every output voxel depends on that voxel only, so windows
    must give exactly the whole-volume output, conditions included."""
    return torch.tanh(x * cond["scale"].view(-1, 1, 1, 1, 1) + cond["source"]) + 1e-3 * t.view(-1, 1, 1, 1, 1)


def _case(batch=1, shape=(12, 14, 10)):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *shape, generator=gen)
    t = torch.full((batch,), 7)
    cond = {"source": torch.randn(batch, 1, *shape, generator=gen), "scale": torch.rand(batch, generator=gen)}
    return x, t, cond


@pytest.mark.parametrize("batch", [1, 2])
def test_windows_and_conditions_are_cut_alike(batch):
    x, t, cond = _case(batch)
    whole = _pointwise(x, t, cond)
    calls = []

    def counted(xs, ts, c):
        calls.append(tuple(xs.shape))
        return _pointwise(xs, ts, c)

    patched = patch_denoiser(counted, (8, 8, 8), overlap=0.25)
    out = patched(x, t, cond)
    assert out.shape == whole.shape
    assert torch.allclose(out, whole, atol=1e-6)
    assert len(calls) > batch and all(s[2:] == (8, 8, 8) and s[0] == 1 for s in calls)  # windows, one element each


def test_a_window_covering_the_volume_is_the_denoiser_itself():
    x, t, cond = _case()
    seen = []
    patched = patch_denoiser(lambda xs, ts, c: seen.append(xs) or _pointwise(xs, ts, c), (16, 16, 16))
    assert torch.equal(patched(x, t, cond), _pointwise(x, t, cond))
    assert len(seen) == 1 and seen[0] is x


def test_a_convolutional_network_differs_by_a_seam_error_that_shrinks_with_the_window():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(8, 1, 3, padding=1)
    ).eval()
    denoise = lambda x, t, c: net(torch.cat([x, c], 1))  # noqa: E731
    settings = SamplerSettings("ddim", 3, seed=0)
    schedule = Schedule.linear(1e-4, 0.02, 1000)
    cond = torch.rand(1, 1, 16, 16, 16)
    errors = []
    with torch.inference_mode():
        whole = sample(denoise, (1, 1, 16, 16, 16), schedule, "sample", settings, cond=cond).sample
        for roi in (10, 12, 16):
            patched = patch_denoiser(denoise, (roi,) * 3, 0.5)
            out = sample(patched, (1, 1, 16, 16, 16), schedule, "sample", settings, cond=cond).sample
            assert out.shape == whole.shape and torch.isfinite(out).all()
            errors.append(float((out - whole).abs().mean()))
    # convolutions near a window's border see zeros instead of the neighbours: the blend
    # weighs those voxels down, and the larger the window the less of it there is
    assert errors[0] > errors[1] > errors[2] == 0.0
    assert errors[0] < 0.5 * float(whole.abs().mean())


@pytest.mark.parametrize("roi, overlap, match", [((0, 8, 8), 0.25, "positive"), ((8, 8, 8), 1.0, "overlap")])
def test_bad_windows_are_refused(roi, overlap, match):
    with pytest.raises(ValueError, match=match):
        patch_denoiser(_pointwise, roi, overlap)
