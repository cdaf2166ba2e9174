"""The five published methods, one module each, behind one small registry.

Every method module exposes ``METHOD``, ``TASK``, ``CONFIG`` (its typed, frozen configuration
class, :mod:`.config`), ``default_config(scale)`` (the JSON form cards and training configs
hold), ``build(config)`` (one ``nn.Module`` with every learned part) and ``loss(...)``, plus
its inference function(s). Modules are imported on first use so that listing methods costs
nothing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from ..errors import InputError, LongitudinalDiffusionError

#: registry name -> (module, task, the paper's name)
METHODS: dict[str, tuple[str, str, str]] = {
    "cas-diffcom": ("cas_diffcom", "complete-ages", "Cas-DiffCom"),
    "sadm": ("sadm", "complete-ages", "SADM"),
    "interval": ("interval", "complete-ages", "Time-interval conditional DM (arXiv 2411.05860)"),
    "cwdm": ("cwdm", "synthesize-modality", "cWDM"),
    "ddm": ("ddm", "interpolate", "DDM"),
    # Not a diffusion method, but trained, carded and loaded the same way: it segments
    # real and generated images for overlays and tissue trajectories.
    "tissue-seg": ("..segmentation", "segment", "tissue segmentation (MONAI SegResNet)"),
}
SCALES = ("paper", "demo", "tiny")


def method_module(method: str) -> ModuleType:
    """The module implementing ``method`` (a registry name such as ``"cwdm"``)."""
    if method not in METHODS:
        raise LongitudinalDiffusionError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    name = METHODS[method][0]
    return importlib.import_module(name if name.startswith("..") else f".{name}", __name__)


def method_task(method: str) -> str:
    if method not in METHODS:
        raise LongitudinalDiffusionError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    return METHODS[method][1]


def paper_name(method: str) -> str:
    return METHODS.get(method, ("", "", method))[2]


def default_config(method: str, scale: str = "paper", **options: Any) -> dict[str, Any]:
    """The method's config at ``scale``; ``options`` are the method's own (e.g. cWDM's
    ``target``, the segmentation model's ``anatomy``)."""
    if scale not in SCALES:
        raise LongitudinalDiffusionError(f"unknown scale '{scale}' (expected one of {', '.join(SCALES)})")
    return method_module(method).default_config(scale, **options)


def config_class(method: str) -> type[Any]:
    """The typed configuration class of ``method`` (a frozen dataclass, ``models.config``)."""
    return method_module(method).CONFIG


def build(method: str, config: Mapping[str, Any]) -> Any:
    """A freshly initialised network of ``method`` for ``config`` (its config class, or the
    JSON of a card, which is read into it first)."""
    return method_module(method).build(config)


#: field of view (mm, along R, A, S) a default grid covers, by the kind of data a method is for
BRAIN_FOV = (160.0, 192.0, 160.0)
HEART_FOV = (128.0, 128.0, 120.0)


def default_grid(method: str, config: dict[str, Any], key: str = "image_size") -> dict[str, Any]:
    """A model grid (``ModelGrid`` fields) for a config: the config's ``image_size`` over the
    field of view of the method's data, intensities as the method expects them.

    cWDM at paper scale keeps the upstream 1 mm BraTS grid; everything else spreads its
    grid over the brain (or, for DDM, the heart) field of view.
    """
    shape = [int(v) for v in config[key]]
    fov = HEART_FOV if method == "ddm" or config.get("anatomy") == "heart" else BRAIN_FOV
    spacing = [round(f / s, 4) for f, s in zip(fov, shape)]
    if method == "cwdm" and shape == [224, 224, 160]:
        spacing = [1.0, 1.0, 1.0]
    given = config.get("spacing_mm" if key == "image_size" else "sr_spacing_mm")
    if given:
        spacing = [float(v) for v in given]
    value_range = (
        config.get("value_range") or config.get("intensity_range") or ([0.0, 1.0] if method == "cwdm" else [-1.0, 1.0])
    )
    percentiles = [0.1, 99.9] if method == "cwdm" else [0.5, 99.5]
    return {
        "shape": shape,
        "spacing": spacing,
        "orientation": "RAS",
        "percentiles": percentiles,
        "value_range": [float(v) for v in value_range],
        "interpolation": "linear",
        "center": "fov",
    }


def check_weights(
    expected: Mapping[str, Any],
    given: Mapping[str, Any],
    source: str | os.PathLike | None,
    what: str,
    *,
    show_expected: Callable[[str], str] = str,
    show_given: Callable[[str], str] = str,
    limit: int = 5,
) -> None:
    """Raise one readable InputError unless ``given`` has exactly the tensors of ``expected``
    (a network's state dict), name for name and shape for shape.

    ``what`` opens the message (e.g. "weights do not match the card's architecture");
    ``show_*`` turn key names into what the user knows them as (an importer shows upstream's).
    """
    missing = [show_expected(k) for k in expected if k not in given]
    unexpected = [show_given(k) for k in given if k not in expected]
    mis_shaped = [
        f"{show_given(k)} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label}: {', '.join(items[:limit])}" + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped (file vs model)", mis_shaped),
        )
        if items
    ]
    if problems:
        raise InputError(source, f"{what}: " + "; ".join(problems))
