"""Single-level 3D Haar wavelet transform as a fixed stride-2 convolution (cWDM, WDM).

cWDM (Friedrich et al. 2024, arXiv 2411.17203, section 2) runs the diffusion on
``x = DWT(y)``, the eight level-1 Haar subbands of a volume ``y``, each at half the
resolution. Upstream (pfriedri/cwdm ``DWT_IDWT/DWT_IDWT_layer.py``)
builds the transform from matrix products; here it is one ``conv3d`` with eight fixed
2x2x2 kernels and stride 2 (the Haar atoms do not overlap, so the transposed convolution
with the same kernels is the exact inverse). No new dependency: PyWavelets is only the
reference in the tests.

Subband order (upstream's, checked against ``pywt.dwtn(x, "haar")``): LLL, LLH, LHL, LHH,
HLL, HLH, HHL, HHH, the first letter on axis D of (N, C, D, H, W), i.e. pywt keys aaa, aad,
ada, add, daa, dad, dda, ddd. Channel layout: subband-major per input channel, so channel
``8 * c + k`` is subband ``k`` of input channel ``c`` (the upstream concatenates, image by
image, ``[LLL / 3, LLH, ..., HHH]``).

The transform itself is orthonormal. cWDM additionally divides the LLL subband by
:data:`LLL_SCALE` (= 3) before the diffusion, and multiplies it back before the inverse;
:func:`to_wavelet` / :func:`from_wavelet` apply that convention, :func:`dwt3` /
:func:`idwt3` are the pure transform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError

SUBBANDS = ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")
PYWT_KEYS = ("aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd")
LLL_SCALE = 3.0
"""cWDM divides the LLL (approximation) subband by 3 so that it has about the range of
the detail subbands (upstream ``LLL / 3.`` everywhere a DWT is taken, ``* 3.`` before IDWT)."""


def _haar_kernels(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(8, 1, 2, 2, 2) analysis kernels in :data:`SUBBANDS` order.

    pywt's Haar gives approximation (x0 + x1) / sqrt(2) and detail (x0 - x1) / sqrt(2);
    conv3d is a cross-correlation, so the kernels are these taps as written.
    """
    r = 1.0 / math.sqrt(2.0)
    taps = {"L": torch.tensor([r, r], dtype=torch.float64), "H": torch.tensor([r, -r], dtype=torch.float64)}
    kernels = [torch.einsum("i,j,k->ijk", taps[b[0]], taps[b[1]], taps[b[2]]) for b in SUBBANDS]
    return torch.stack(kernels).unsqueeze(1).to(dtype=dtype, device=device)


def _check(x: torch.Tensor, what: str) -> None:
    if x.dim() != 5:
        raise InputError(what, f"expected a (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(what, f"expected a floating-point tensor, got {x.dtype}")


def dwt3(x: torch.Tensor) -> torch.Tensor:
    """Level-1 3D Haar DWT.

    Args:
        x: (N, C, D, H, W) with even D, H and W.

    Returns:
        (N, 8 * C, D/2, H/2, W/2), subband-major per input channel (see module docstring).
    """
    _check(x, "dwt3 input")
    n, c, *size = x.shape
    if any(s % 2 for s in size):
        raise InputError("dwt3 input", f"spatial size {tuple(size)} has an odd side; the Haar DWT needs even sizes")
    out = F.conv3d(x.reshape(n * c, 1, *size), _haar_kernels(x.dtype, x.device), stride=2)
    return out.reshape(n, 8 * c, *out.shape[2:])


def idwt3(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dwt3`: (N, 8 * C, d, h, w) -> (N, C, 2d, 2h, 2w)."""
    _check(coeffs, "idwt3 input")
    n, c8, *size = coeffs.shape
    if c8 % 8:
        raise InputError("idwt3 input", f"channel count {c8} is not a multiple of the 8 subbands")
    out = F.conv_transpose3d(
        coeffs.reshape(n * c8 // 8, 8, *size), _haar_kernels(coeffs.dtype, coeffs.device), stride=2
    )
    return out.reshape(n, c8 // 8, *out.shape[2:])


def _lll_weights(channels: int, like: torch.Tensor, power: int) -> torch.Tensor:
    w = torch.ones(channels, dtype=like.dtype, device=like.device)
    w[::8] = LLL_SCALE**power
    return w.reshape(1, channels, 1, 1, 1)


def to_wavelet(x: torch.Tensor) -> torch.Tensor:
    """Image -> cWDM wavelet channels: :func:`dwt3` then LLL divided by :data:`LLL_SCALE`."""
    c = dwt3(x)
    return c * _lll_weights(c.shape[1], c, -1)


def from_wavelet(c: torch.Tensor) -> torch.Tensor:
    """cWDM wavelet channels -> image: LLL multiplied by :data:`LLL_SCALE`, then :func:`idwt3`."""
    _check(c, "idwt3 input")
    if c.shape[1] % 8:
        raise InputError("idwt3 input", f"channel count {c.shape[1]} is not a multiple of the 8 subbands")
    return idwt3(c * _lll_weights(c.shape[1], c, 1))
