"""Tissue labels for the results: the catalog's segmentation model as a segmenter, and the
labels of a run's images computed ahead, off the GUI thread (:func:`prepareSegmentations`),
so that placing the results in the scene only looks them up. Touches no MRML."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.imaging import Image

from . import mrml
from .tissueplot import tissueVolumeRows


class TissueSegmenter:
    """Tissue labels of any scan with a catalog segmentation model (loaded on first use).

    Args:
        model: a model name of the catalog (default the bundled ``tissue-seg-brain-demo``),
            a card path or a ``LoadedModel``.
        device: where to run it (``"cpu"``, ``"cuda"``, ``"auto"``).

    Calling it with an :class:`Image` returns an int16 label :class:`Image` on the image's
    own geometry; :attr:`classes` names the values.
    """

    def __init__(self, model: Any = "tissue-seg-brain-demo", device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self._loaded: Any = None

    def _load(self) -> Any:
        if self._loaded is None:
            from LongitudinalDiffusionLib.catalog import LoadedModel, load_model
            from LongitudinalDiffusionLib.diffusion import resolve_device

            model = self.model
            self._loaded = model if isinstance(model, LoadedModel) else load_model(model, resolve_device(self.device))
        return self._loaded

    @property
    def name(self) -> str:
        return self._load().card.name

    @property
    def classes(self) -> dict[int, str]:
        return dict(enumerate(self._load().config["classes"]))

    def __call__(self, image: Image) -> Image:
        import torch

        from LongitudinalDiffusionLib.segmentation import segment

        loaded = self._load()
        with torch.inference_mode():
            return segment(loaded.network, image, config=loaded.config, grid=loaded.card.card.get("grid"))


Segmenter = Callable[[Image], Image]


def labelNamesFor(labelsPath: str | os.PathLike | None) -> dict[int, str]:
    """Names of a label file's values: its BIDS ``dseg.tsv`` (see :func:`.mrml.findLabelTable`)
    or, without one, the demo brain labels."""
    if labelsPath is None:
        return {}
    table, _source = mrml._labelTableFor(Path(labelsPath))
    return {value: name for value, (name, _colour) in table.items()}


def _generatedLabels(
    result: Any, r: Any, segmenter: Segmenter | None, labelNames: Mapping[int, str] | None
) -> tuple[Image | None, dict[int, str]]:
    """The labels of a generated image ``r`` of ``result`` and their names: those the task
    made for its age (e.g. carried along a deformation), else ``segmenter``'s, else None."""
    labels = None
    for other in result.images:
        if other.kind == "labels" and other.age == r.age:
            labels = other.image
    classes = dict(labelNames or {})
    if labels is None and segmenter is not None:
        labels = segmenter(r.image)
        classes = {**getattr(segmenter, "classes", {}), **classes}
    return labels, classes


class PreparedSegmentations:
    """A segmenter whose answers for the images of some results were computed ahead.

    :func:`prepareSegmentations` fills it away from the GUI thread (it touches no MRML);
    :func:`placeResult` / :func:`placeResultSteps` then use it as their ``segmenter``: the
    prepared images' labels and each prepared result's tissue volume rows are looked up,
    any other image is segmented on the spot by the wrapped segmenter.
    """

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self._labels: dict[int, tuple[Image, Image]] = {}  # id(image) -> (image, labels)
        self._rows: dict[int, tuple[Any, list[dict[str, Any]]]] = {}  # id(result) -> (result, rows)

    @property
    def classes(self) -> dict[int, str]:
        return dict(getattr(self.segmenter, "classes", {}) or {})

    def __call__(self, image: Image) -> Image:
        entry = self._labels.get(id(image))
        if entry is not None and entry[0] is image:
            return entry[1]
        return self.segmenter(image)

    def prepare(self, image: Image) -> Image:
        """Segment ``image`` now and keep its labels (the image is kept too, so its id stays its own)."""
        labels = self(image)
        self._labels[id(image)] = (image, labels)
        return labels

    def keepTissueRows(self, result: Any, rows: list[dict[str, Any]]) -> None:
        """Keep the tissue volume rows of ``result`` (see :func:`tissueVolumeRows`)."""
        self._rows[id(result)] = (result, rows)

    def tissueRows(self, result: Any) -> list[dict[str, Any]] | None:
        """The tissue volume rows prepared for ``result`` (None if it was not prepared)."""
        entry = self._rows.get(id(result))
        return entry[1] if entry is not None and entry[0] is result else None


def prepareSegmentations(
    results: Sequence[Any],
    subject: Any,
    segmenter: Segmenter,
    *,
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
) -> PreparedSegmentations:
    """Everything :func:`placeResult` would ask ``segmenter`` for, computed now: the labels of
    the generated volumes and of the frames without labels of their own, and the tissue
    volume rows (the real scans of ``subject`` included, each segmented once). Touches no
    MRML, so it can run on a background thread while the GUI stays responsive.

    Args:
        results: ``tasks.Result`` objects, as they will be placed.
        subject: the library ``Subject`` they were made for (as given to :func:`placeResult`).
        segmenter: e.g. :class:`TissueSegmenter`.
        progress: receives a ``ProgressEvent`` per image (stage "segmenting the results").
        cancel: a ``CancelToken``, checked between images.

    Raises:
        Cancelled: ``cancel`` was set.
    """
    from LongitudinalDiffusionLib.progress import Stage

    prepared = PreparedSegmentations(segmenter)
    images, scans = [], set()
    for result in results:
        generated = _generatedImages(result)
        images += [r.image for r in generated if _generatedLabels(result, r, None, None)[0] is None]
        images += [f for s in result.series if s.unit != "step" and s.labels is None for f in s.frames]
        modality = next((r.modality for r in generated if r.modality), None)
        scans |= {id(tp) for tp in getattr(subject, "timepoints", None) or [] if modality in (None, tp.modality.value)}
    images = list({id(image): image for image in images}.values())  # a generated volume is a frame too
    stage = Stage("segmenting the results", len(images) + len(scans), progress, cancel).start()
    for image in images:
        prepared.prepare(image)
        stage.advance()
    realScans = _ScanLabels(segmenter, stage)
    for result in results:
        labelsOf = {id(r): _generatedLabels(result, r, prepared, None)[0] for r in _generatedImages(result)}
        rows = tissueVolumeRows(subject, result, realScans, segmentations=labelsOf)
        prepared.keepTissueRows(result, rows)
    return prepared


def _generatedImages(result: Any) -> list[Any]:
    """The result's images that :func:`placeResult` segments (not labels, not spread maps)."""
    return [r for r in result.images if r.kind not in ("labels", "std")]


class _ScanLabels:
    """The segmenter for the subject's real scans: each file once (every result's tissue
    rows read the same scans), one step of ``stage`` each."""

    def __init__(self, segmenter: Segmenter, stage: Any) -> None:
        self.segmenter, self.stage = segmenter, stage
        self._done: dict[Any, tuple[Image, Image]] = {}  # file (or image id) -> (image, labels)

    @property
    def classes(self) -> dict[int, str]:
        return dict(getattr(self.segmenter, "classes", {}) or {})

    def __call__(self, image: Image) -> Image:
        source = (image.meta or {}).get("source")  # a scan read from its file for each result
        key = source if source is not None else id(image)  # else the scan's own image, kept
        done = self._done.get(key)
        if done is not None and (source is not None or done[0] is image):
            return done[1]
        self.stage.check()
        labels = self.segmenter(image)
        self.stage.advance()
        self._done[key] = (image, labels)
        return labels
