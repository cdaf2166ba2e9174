"""Tissue segmentation of real and generated scans, and the classical baseline it is judged against.

Two segmenters label a scan with the same classes, so generated images can be overlaid,
measured and put on growth trajectories (:mod:`.trajectory`):

* **the tissue model** (``METHOD = "tissue-seg"``, ``TASK = "segment"``): MONAI's
  :class:`~monai.networks.nets.SegResNet` trained on the cohort's ground-truth labels with
  MONAI's Dice + cross-entropy loss (:func:`loss`). It has the contract of a method module
  (``default_config(scale)``, ``build(config)``, ``loss(model, batch, config)``), so the
  trainer trains it like any other model, on the model grid of its config (``image_size``,
  ``spacing_mm``, intensities in ``value_range`` [0, 1]). :func:`segment` takes any scan onto
  that grid, labels it and brings the labels back onto the scan's own voxels.
* **the classical baseline** (:func:`gmm_segment`): a Gaussian mixture on intensities inside
  a brain mask, classes ordered by mean intensity and named by the contrast and age.

Label sets (:data:`BRAIN_CLASSES`, :data:`HEART_CLASSES`) and the way the cohort's
ground-truth labels map onto them (:data:`BRAIN_LABEL_MAP`, :data:`HEART_LABEL_MAP`,
:func:`map_labels`) are data, written down here:

* brain: 0 background, 1 CSF, 2 grey matter, 3 white matter. Choice: the cohort's lesion
  labels (4 necrotic core, 5 enhancing rim, 6 oedema) become **white matter**. The simulated
  lesions are centred in deep white matter, so this is the tissue they replace, and the three
  tissues still add up to the whole brain when volumes are tracked over age. A lesion-aware
  model would need its own classes; the tissue model does not pretend to be one.
* heart: 0 background, 1 blood pool (LV and RV blood, phantom labels 1 and 3), 2 myocardium
  (phantom label 2).

Choice (network): SegResNet rather than a plain U-Net: residual blocks with group norm train
stably from small batches on a CPU, and ``init_filters`` scales it from a test-sized model to
a full one without changing the code.

Choice (baseline mixture): a small numpy EM on the 1D intensities instead of scikit-learn's
``GaussianMixture``. In one dimension EM is a dozen lines; it is deterministic without a
random seed (quantile initialisation, no restarts), and the library, which also runs inside
Slicer's Python, gains no dependency for a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet
from scipy import ndimage

from .diffusion import prepare_network
from .errors import InputError, LongitudinalDiffusionError
from .grid import ModelGrid
from .imaging import Image, check_array
from .models.config import MethodConfig, nested, optional

METHOD = "tissue-seg"
TASK = "segment"

#: Classes of the brain tissue model (model output index -> name).
BRAIN_CLASSES: dict[int, str] = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
#: Classes of the heart model.
HEART_CLASSES: dict[int, str] = {0: "background", 1: "blood pool", 2: "myocardium"}
#: Cohort ground truth (0 background, 1 CSF, 2 GM, 3 WM, 4-6 lesion parts) -> brain class.
BRAIN_LABEL_MAP: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 3, 6: 3}
#: Heart phantom ground truth (1 LV blood, 2 LV myocardium, 3 RV blood) -> heart class.
HEART_LABEL_MAP: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 1}

ANATOMIES: dict[str, tuple[dict[int, str], dict[int, int]]] = {
    "brain": (BRAIN_CLASSES, BRAIN_LABEL_MAP),
    "heart": (HEART_CLASSES, HEART_LABEL_MAP),
}

#: Field of view (mm, R/A/S) each anatomy's grid covers, as the other models' grids do.
_FOV_MM = {"brain": (160.0, 192.0, 160.0), "heart": (128.0, 128.0, 120.0)}
#: scale -> (SegResNet init_filters, blocks_down, blocks_up, grid by anatomy)
_SCALES: dict[str, tuple[int, list[int], list[int], dict[str, list[int]]]] = {
    # "paper": the cohort's native grids (2 mm brain; the heart phantom's 2 x 2 x 2.5 mm).
    "paper": (16, [1, 2, 2, 4], [1, 1, 1], {"brain": [80, 96, 80], "heart": [64, 64, 48]}),
    # "demo": 4 mm, trains on 2 CPU cores in minutes.
    "demo": (8, [1, 2, 2, 4], [1, 1, 1], {"brain": [40, 48, 40], "heart": [32, 32, 32]}),
    # "tiny": tests.
    "tiny": (4, [1, 1], [1], {"brain": [16, 16, 16], "heart": [16, 16, 16]}),
}

#: Contrast -> (age in months below which the infant order holds, infant order, mature order):
#: tissue classes from darkest to brightest. T1w: white matter is darker than grey matter
#: before myelination (~6 months), brighter after. T2w: white matter is brighter than grey
#: matter until the (later) T2 inversion (~9 months), darker after. Around the switch
#: (the isointense phase, ~6-9 months) no intensity order is right and the baseline is poor.
CONTRAST_ORDER: dict[str, tuple[float, tuple[int, int, int], tuple[int, int, int]]] = {
    "T1w": (6.0, (1, 3, 2), (1, 2, 3)),
    "T1ce": (6.0, (1, 3, 2), (1, 2, 3)),
    "T2w": (9.0, (2, 3, 1), (3, 2, 1)),
}


def _anatomy(anatomy: str) -> tuple[dict[int, str], dict[int, int]]:
    if anatomy not in ANATOMIES:
        raise LongitudinalDiffusionError(f"unknown anatomy '{anatomy}' (expected one of {', '.join(ANATOMIES)})")
    return ANATOMIES[anatomy]


# --------------------------------------------------------------------------- the model


def default_config(scale: str = "paper", anatomy: str = "brain") -> dict[str, Any]:
    """The tissue model's configuration at a scale ("paper", "demo", "tiny") for an anatomy.

    There is no paper behind this model: "paper" means full size on the cohort's native
    grids, "demo" a 4 mm model a CPU trains in minutes, "tiny" a test model. The grid spans
    the anatomy's field of view (brain 160 x 192 x 160 mm, heart 128 x 128 x 120 mm) and
    ``spacing_mm`` is always given, so the grid does not depend on the method name.
    What each scale builds for the brain (Testing/test_configs.py checks these lines):

    - paper: 80x96x80; 4.7 M parameters
    - demo: 4 mm 40x48x40; 1.18 M parameters
    - tiny: 16x16x16; 0.0063 M parameters
    """
    if scale not in _SCALES:
        raise LongitudinalDiffusionError(f"unknown scale '{scale}' (expected one of {', '.join(_SCALES)})")
    classes, label_map = _anatomy(anatomy)
    filters, down, up, sizes = _SCALES[scale]
    size = sizes[anatomy]
    spacing = [round(f / s, 4) for f, s in zip(_FOV_MM[anatomy], size)]  # paper: 2 mm; heart 2 x 2 x 2.5 mm
    return {
        "method": METHOD,
        "scale": scale,
        "anatomy": anatomy,
        # The contrast the brain model reads; the heart model reads the cine frames (None).
        "modality": "T1w" if anatomy == "brain" else None,
        "classes": [classes[k] for k in sorted(classes)],
        # A record for the model card; map_labels uses the module's maps.
        "label_map": {str(k): v for k, v in label_map.items()},
        "network": {
            "name": "SegResNet",
            "init_filters": filters,
            "blocks_down": list(down),
            "blocks_up": list(up),
            "num_groups": min(8, filters),
            "dropout_prob": None,
        },
        "image_size": list(size),
        "spacing_mm": spacing,
        "value_range": [0.0, 1.0],
        "loss": {"name": "DiceCE", "lambda_dice": 1.0, "lambda_ce": 1.0},
        "optimizer": {"name": "adam", "lr": 1e-3 if scale != "tiny" else 1e-2, "batch_size": 2},
    }


def n_classes(config: Mapping[str, Any]) -> int:
    return len(config["classes"])


class Anatomy(str, Enum):
    """What a tissue model segments."""

    BRAIN = "brain"
    HEART = "heart"


@dataclass(frozen=True)
class SegResNetConfig(MethodConfig):
    """MONAI ``SegResNet`` options (one input channel, one output per class).

    Attributes:
        name: the network ("SegResNet", the only one supported).
        init_filters: channels of the first level (doubled per level).
        blocks_down, blocks_up: residual blocks per level of the encoder and the decoder.
        num_groups: GroupNorm groups.
        dropout_prob: dropout after the first convolution (None: none).
    """

    name: str = "SegResNet"
    init_filters: int = 8
    blocks_down: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    blocks_up: list[int] = field(default_factory=lambda: [1, 1, 1])
    num_groups: int = 8
    dropout_prob: float | None = None


@dataclass(frozen=True)
class TissueSegConfig(MethodConfig):
    """The tissue model's configuration, as the model card stores it under ``config``.

    Attributes:
        method, scale: the model's method name and the scale it was made at (records).
        anatomy: what it segments.
        modality: the contrast it reads (None: the heart's cine frames).
        classes: class names by output index.
        label_map: cohort ground-truth label -> class index (a record for the card).
        network: the SegResNet.
        image_size, spacing_mm: the model grid and its voxel size.
        value_range: the intensities the model reads.
        loss: training loss (name, weights).
        optimizer: training optimizer (name, lr, batch_size).
    """

    network: SegResNetConfig = nested(SegResNetConfig)
    anatomy: Anatomy = Anatomy.BRAIN
    modality: str | None = None
    classes: list[str] = field(default_factory=list)
    label_map: dict[str, int] = field(default_factory=dict)
    image_size: list[int] = field(default_factory=list)
    spacing_mm: list[float] = field(default_factory=list)
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    loss: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    method: str | None = optional()
    scale: str | None = optional()

    def __post_init__(self) -> None:
        object.__setattr__(self, "anatomy", Anatomy(self.anatomy))


CONFIG = TissueSegConfig


def build(config: TissueSegConfig | Mapping[str, Any]) -> SegResNet:
    """A freshly initialised SegResNet for ``config`` (one input channel, one output per class)."""
    config = TissueSegConfig.from_dict(config).to_dict()
    net = dict(config["network"])
    name = net.pop("name", "SegResNet")
    if name != "SegResNet":
        raise InputError("tissue-seg config", f"network '{name}' is not supported (expected SegResNet)")
    factor = 2 ** (len(net["blocks_down"]) - 1)
    if any(int(s) % factor for s in config["image_size"]):
        raise InputError(
            "tissue-seg config",
            f"image_size {list(config['image_size'])} must be divisible by {factor} "
            f"({len(net['blocks_down'])} resolution levels)",
        )
    groups = net.pop("num_groups", 8)
    return SegResNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=n_classes(config),
        norm=("GROUP", {"num_groups": groups}),
        blocks_down=tuple(net.pop("blocks_down")),
        blocks_up=tuple(net.pop("blocks_up")),
        **net,
    )


def model_grid(config: Mapping[str, Any]) -> ModelGrid:
    """The model grid of ``config``: the same one ``models.default_grid`` builds for it."""
    from .models import default_grid

    return ModelGrid.from_dict(default_grid(METHOD, dict(config)))


def _criterion(config: Mapping[str, Any]) -> DiceCELoss:
    opts = config.get("loss", {})
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        lambda_dice=float(opts.get("lambda_dice", 1.0)),
        lambda_ce=float(opts.get("lambda_ce", 1.0)),
    )


def loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    config: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dice + cross-entropy (MONAI ``DiceCELoss``, softmax, one-hot labels) of one batch.

    Args:
        batch: ``{"image": (N, 1, *image_size) float, "labels": (N, 1, *image_size) long}``,
            labels already in the model's classes (:func:`map_labels`).
        generator: unused (the loss draws nothing at random); accepted for the common contract.
    """
    image, labels = batch.get("image"), batch.get("labels")
    if not isinstance(image, torch.Tensor) or image.dim() != 5 or image.shape[1] != 1:
        raise InputError("segmentation batch", "'image' must be a (N, 1, D, H, W) tensor")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(image.shape):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(
            "segmentation batch", f"'labels' must match the image's shape {tuple(image.shape)}, got {shape}"
        )
    if labels.is_floating_point():
        raise InputError("segmentation batch", "'labels' must be an integer (long) tensor of class indices")
    k = n_classes(config)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise InputError(
            "segmentation batch",
            f"labels must lie in 0..{k - 1} (the model's classes); got {int(labels.min())}..{int(labels.max())}",
        )
    device = next(model.parameters()).device
    logits = model(image.to(device))
    return _criterion(config)(logits, labels.to(device))


@torch.no_grad()
def segment_tensor(
    model: torch.nn.Module, x: torch.Tensor, *, device: str | torch.device | None = None
) -> torch.Tensor:
    """Class labels (N, 1, *spatial) long of grid images ``x`` (N, 1, *spatial), on ``x``'s device.

    The model runs in eval mode on ``device`` (default: where its weights are); its training
    flag is restored afterwards.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1:
        raise InputError("segmentation input", "expected a (N, 1, D, H, W) tensor")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    prepare_network(model, device)
    try:
        logits = model(x.to(device, torch.float32))
    finally:
        model.train(was_training)
    return logits.argmax(1, keepdim=True).to(x.device)


def segment(
    model: torch.nn.Module,
    image: Image,
    *,
    config: Mapping[str, Any],
    grid: Mapping[str, Any] | ModelGrid | None = None,
    device: str | torch.device | None = None,
) -> Image:
    """Tissue labels of ``image`` on its own voxels.

    The scan goes onto the model grid (``grid``, default the config's), the model labels it,
    and the labels come back with nearest neighbour onto the scan's exact shape and affine.
    Voxels outside the grid's field of view are background.

    Returns:
        An int16 :class:`Image` with the input's geometry; ``meta["classes"]`` names the values.
    """
    if grid is None:
        grid = model_grid(config)
    elif not isinstance(grid, ModelGrid):
        grid = ModelGrid.from_dict(grid)
    sample = grid.forward(image)
    x = torch.from_numpy(sample.array)[None, None]
    labels = segment_tensor(model, x, device=device)[0, 0].numpy()
    out = grid.inverse(labels, sample.record, labels=True)
    meta = {"classes": list(config["classes"]), "anatomy": config.get("anatomy", "brain")}
    if "source" in image.meta:
        meta["source"] = image.meta["source"]
    return Image(out.array.astype(np.int16), out.affine, meta)


def map_labels(array: Any, anatomy: str = "brain") -> np.ndarray:
    """The cohort's ground-truth labels mapped to the model's classes (int64, same shape).

    Accepts integer arrays or float arrays holding whole numbers (a label map resampled onto a
    grid). Raises InputError for values the anatomy's ground truth does not have.
    """
    _, label_map = _anatomy(anatomy)
    arr = np.asarray(array)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
            raise InputError("label map", "label values must be whole numbers")
    values = np.rint(arr).astype(np.int64)
    present = np.unique(values)
    unknown = [int(v) for v in present if int(v) not in label_map]
    if unknown:
        raise InputError(
            "label map", f"values {unknown} are not {anatomy} ground-truth labels (known: {sorted(label_map)})"
        )
    lut = np.zeros(max(label_map) + 1, dtype=np.int64)
    for src, dst in label_map.items():
        lut[src] = dst
    return lut[values]


# --------------------------------------------------------------------------- the classical baseline


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres, dtype=np.float64)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, lab, range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def brain_mask(image: Image, *, opening_voxels: int = 2, upper_mads: float = 2.0) -> np.ndarray:
    """A rough brain mask of a T1-weighted head scan, by thresholds and morphology only.

    1. Smooth lightly (Gaussian, sigma 0.5 voxel) and keep voxels above Otsu's threshold
       (tissue, not air).
    2. Drop voxels brighter than median + ``upper_mads`` x MAD of the tissue: the scalp fat,
       far brighter than brain in T1w.
    3. Open by ``opening_voxels`` (erode, keep the largest connected component, dilate back
       inside the step-2 voxels), which cuts the thin bridges to scalp and neck.
    4. Fill holes (the ventricles, dark in T1w, come back).

    Limits: at coarse voxels (4 mm and above) the skull is about one voxel thick and some scalp
    and neck stay in the mask; outer CSF darker than the Otsu threshold is lost. Pass a mask
    to :func:`gmm_segment` when a better one exists (a ground-truth brain mask when scoring).
    """
    array = check_array(image.array, image.meta.get("source", "image")).astype(np.float64)
    smooth = ndimage.gaussian_filter(array, 0.5)
    tissue = smooth > _otsu(smooth.ravel())
    if not tissue.any():
        raise InputError(image.meta.get("source", "image"), "no voxels above the background threshold")
    values = smooth[tissue]
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    band = tissue & (smooth < median + upper_mads * mad) if mad > 0 else tissue
    core = band
    if opening_voxels > 0:
        eroded = ndimage.binary_erosion(band, iterations=opening_voxels)
        core = eroded if eroded.any() else band
    core = _largest_component(core)
    if opening_voxels > 0:
        core = ndimage.binary_dilation(core, iterations=opening_voxels) & band
    return ndimage.binary_fill_holes(core)


def fit_gaussian_mixture(
    values: np.ndarray, n_components: int, *, max_iter: int = 200, tol: float = 1e-7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM for a 1D Gaussian mixture: (weights, means, variances), means ascending.

    Initialised at the quantiles (k + 0.5) / K of the values with equal weights and the
    overall variance / K; stops when the mean log-likelihood gains less than ``tol``
    (relative). Variances are floored at 1e-6 of the overall variance.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2 * n_components:
        raise InputError("mixture", f"{x.size} values cannot fit {n_components} Gaussian components")
    total_var = float(x.var())
    if total_var <= 0:
        raise InputError("mixture", "all values are equal: nothing to separate")
    means = np.quantile(x, (np.arange(n_components) + 0.5) / n_components)
    variances = np.full(n_components, total_var / n_components)
    weights = np.full(n_components, 1.0 / n_components)
    floor = 1e-6 * total_var
    previous = -np.inf
    for _ in range(max_iter):
        log_p = _component_log_densities(x, weights, means, variances)
        top = log_p.max(1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(log_p - top).sum(1))
        resp = np.exp(log_p - log_norm[:, None])
        nk = resp.sum(0) + 1e-12
        weights = nk / x.size
        means = (resp * x[:, None]).sum(0) / nk
        variances = np.maximum((resp * (x[:, None] - means) ** 2).sum(0) / nk, floor)
        current = float(log_norm.mean())
        if abs(current - previous) <= tol * abs(current):
            break
        previous = current
    order = np.argsort(means)
    return weights[order], means[order], variances[order]


def _component_log_densities(
    x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray
) -> np.ndarray:
    return (
        np.log(weights)[None]
        - 0.5 * np.log(2 * math.pi * variances)[None]
        - 0.5 * (x[:, None] - means[None]) ** 2 / variances[None]
    )


# long by its signature and docstring: 49 lines of code
def gmm_segment(
    image: Image,
    n_classes: int = 3,
    mask: np.ndarray | Image | None = None,
    *,
    age_months: float | None = None,
    contrast: str = "T1w",
    bias_iterations: int = 4,
    bias_sigma_mm: float = 20.0,
) -> Image:
    """The classical baseline: a Gaussian mixture on intensities inside a brain mask.

    The mixture (:func:`fit_gaussian_mixture`) is fitted to the masked voxels, alternating
    with a multiplicative bias field estimate, as classical EM segmenters (FSL FAST, SPM) do:
    the log ratio of each voxel to its expected class mean is smoothed inside the mask
    (normalised Gaussian convolution, sigma ``bias_sigma_mm``), divided out, and the mixture
    refitted, ``bias_iterations`` times. Each voxel then takes its most probable component.

    With ``n_classes == 3`` the components, darkest to brightest, are named CSF / grey matter
    / white matter by :data:`CONTRAST_ORDER`: in T1w CSF < GM < WM once white matter is
    myelinated, but before ~6 months infant white matter is darker than grey matter
    (CSF < WM < GM). ``age_months`` picks the order (None: the myelinated one). Near the
    switch (the isointense phase, ~6-9 months) no order fits and the baseline is poor; that
    is the baseline's honest limit.

    Args:
        image: a head scan.
        n_classes: mixture components. 3 gives :data:`BRAIN_CLASSES` labels; any other number
            gives labels 1..n by ascending mean intensity, unnamed.
        mask: boolean brain mask (array or Image) on the image's voxels; default
            :func:`brain_mask`.
        age_months: the subject's age, to choose the contrast order.
        contrast: "T1w", "T1ce" or "T2w" (for the order of the three tissues).
        bias_iterations: bias field updates (0: fit the raw intensities).
        bias_sigma_mm: smoothness of the bias field.

    Returns:
        An int16 label :class:`Image` on the input's geometry; 0 outside the mask.
        ``meta["means"]`` holds the fitted class means (bias-corrected units).
    """
    source = image.meta.get("source", "image")
    array = check_array(image.array, source).astype(np.float64)
    if n_classes < 1:
        raise InputError(source, f"n_classes must be at least 1, got {n_classes}")
    if n_classes == 3 and contrast not in CONTRAST_ORDER:
        raise InputError(
            source, f"no tissue order for contrast '{contrast}' (known: {', '.join(CONTRAST_ORDER)}); pass n_classes!=3"
        )
    if mask is None:
        mask = brain_mask(image)
    else:
        mask = np.asarray(mask.array if isinstance(mask, Image) else mask)
        if mask.shape != array.shape:
            raise InputError(source, f"mask shape {mask.shape} differs from the image's {array.shape}")
        mask = mask.astype(bool)
    if not mask.any():
        raise InputError(source, "the brain mask is empty")
    raw = array[mask]
    if raw.min() <= 0 and bias_iterations > 0:
        raw = raw - raw.min() + 1e-3 * max(float(np.ptp(raw)), 1e-6)  # the bias model is multiplicative
    sigma = bias_sigma_mm / np.asarray(image.spacing)
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma) if bias_iterations > 0 else None
    values = raw
    for step in range(bias_iterations + 1):
        weights, means, variances = fit_gaussian_mixture(values, n_classes)
        log_p = _component_log_densities(values, weights, means, variances)
        if step == bias_iterations:
            break
        post = np.exp(log_p - log_p.max(1, keepdims=True))
        expected = (post * means).sum(1) / post.sum(1)
        ratio = np.zeros(array.shape)
        ratio[mask] = np.log(raw / np.maximum(expected, 1e-6 * float(np.abs(means).max())))
        assert weight is not None  # bias_iterations > 0 here
        log_bias = ndimage.gaussian_filter(ratio, sigma)[mask] / np.maximum(weight[mask], 1e-6)
        values = raw / np.exp(log_bias - log_bias.mean())
    component = log_p.argmax(1)
    if n_classes == 3:
        switch, infant, mature = CONTRAST_ORDER[contrast]
        order = infant if age_months is not None and age_months < switch else mature
        names = np.asarray(order, dtype=np.int16)
    else:
        names = np.arange(1, n_classes + 1, dtype=np.int16)
    out = np.zeros(array.shape, dtype=np.int16)
    out[mask] = names[component]
    meta = {
        "classes": list(BRAIN_CLASSES.values()) if n_classes == 3 else ["background"] + [str(i) for i in names],
        "means": [float(m) for m in means],
    }
    return Image(out, image.affine.copy(), meta)


# --------------------------------------------------------------------------- scoring


def dice_per_class(
    pred: Image | np.ndarray,
    truth: Image | np.ndarray,
    classes: Mapping[int, str] | Sequence[int],
    *,
    include_background: bool = False,
) -> dict[str, float]:
    """Dice of each class: ``2|P & T| / (|P| + |T|)``; NaN when the class is in neither.

    Args:
        pred, truth: label maps (arrays or Images) of one shape, in the same classes.
        classes: {value: name} (e.g. :data:`BRAIN_CLASSES`) or a sequence of values (named
            by their value).
        include_background: also score value 0.
    """
    p = np.asarray(pred.array if isinstance(pred, Image) else pred)
    t = np.asarray(truth.array if isinstance(truth, Image) else truth)
    if p.shape != t.shape:
        raise InputError("dice", f"prediction shape {p.shape} differs from the truth's {t.shape}")
    named = dict(classes) if isinstance(classes, Mapping) else {int(v): str(v) for v in classes}
    out = {}
    for value, name in named.items():
        if value == 0 and not include_background:
            continue
        pv, tv = p == value, t == value
        denom = int(pv.sum()) + int(tv.sum())
        out[name] = 2.0 * int((pv & tv).sum()) / denom if denom else float("nan")
    return out
