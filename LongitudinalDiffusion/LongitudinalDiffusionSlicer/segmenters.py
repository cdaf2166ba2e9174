"""Tissue labels for the results: the catalog's segmentation model as a segmenter, and the
labels of a run's images computed ahead, off the GUI thread (:func:`prepareSegmentations`),
so that placing the results in the scene only looks them up. Touches no MRML."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.imaging import Image, load_image

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
        self.keep(image, labels)
        return labels

    def keep(self, image: Image, labels: Image) -> None:
        """Keep ``labels`` as ``image``'s (segmented elsewhere, e.g. in a batch)."""
        self._labels[id(image)] = (image, labels)

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

    A segmenter that labels several images in one call (``segment_many(images)``, e.g. the
    job process's ``ChildSegmenter``) gets them :data:`SEGMENT_BATCH` at a time, the real
    scans too: one round trip per batch instead of one per image.

    Args:
        results: ``tasks.Result`` objects, as they will be placed.
        subject: the library ``Subject`` they were made for (as given to :func:`placeResult`).
        segmenter: e.g. :class:`TissueSegmenter`.
        progress: receives a ``ProgressEvent`` per image, or per batch (stage "segmenting the
            results").
        cancel: a ``CancelToken``, checked between images (between batches).

    Raises:
        Cancelled: ``cancel`` was set.
    """
    from LongitudinalDiffusionLib.progress import Stage

    prepared = PreparedSegmentations(segmenter)
    images, scans = _toSegment(results, subject)
    stage = Stage("segmenting the results", len(images) + len(scans), progress, cancel).start()
    for image, labels in _segmentAll(segmenter, images, stage):
        prepared.keep(image, labels)
    realScans = _ScanLabels(segmenter, stage)
    if callable(getattr(segmenter, "segment_many", None)):  # the scans in batches too, before the rows ask
        scanImages = (tp.image if tp.image is not None else load_image(tp.source) for tp in scans)
        for image, labels in _segmentAll(segmenter, scanImages, stage):
            realScans.keep(image, labels)
    for result in results:
        labelsOf = {id(r): _generatedLabels(result, r, prepared, None)[0] for r in _generatedImages(result)}
        rows = tissueVolumeRows(subject, result, realScans, segmentations=labelsOf)
        prepared.keepTissueRows(result, rows)
    return prepared


#: Images per call of a segmenter's ``segment_many`` in :func:`prepareSegmentations`: each
#: call is one job of the job process (a round trip, the arrays written to files), and the
#: progress bar moves and a cancel is honoured between two calls.
SEGMENT_BATCH = 4


def _toSegment(results: Sequence[Any], subject: Any) -> tuple[list[Image], list[Any]]:
    """The images :func:`prepareSegmentations` segments (each once) and the subject's real
    scans the tissue rows need (the results' modality)."""
    images: list[Image] = []
    scans: dict[int, Any] = {}
    for result in results:
        generated = _generatedImages(result)
        images += [r.image for r in generated if _generatedLabels(result, r, None, None)[0] is None]
        images += [f for s in result.series if s.unit != "step" and s.labels is None for f in s.frames]
        modality = next((r.modality for r in generated if r.modality), None)
        for tp in getattr(subject, "timepoints", None) or []:
            if modality in (None, tp.modality.value):
                scans.setdefault(id(tp), tp)
    images = list({id(image): image for image in images}.values())  # a generated volume is a frame too
    return images, list(scans.values())


def _segmentAll(segmenter: Segmenter, images: Iterable[Image], stage: Any) -> Iterator[tuple[Image, Image]]:
    """``(image, labels)`` of every image: by ``segment_many`` in batches of
    :data:`SEGMENT_BATCH` when the segmenter has it, else one call per image; ``stage``
    advances after each call (and checks for a cancel before the next)."""
    many = getattr(segmenter, "segment_many", None)
    size = SEGMENT_BATCH if callable(many) else 1
    pending = iter(images)
    while True:
        batch = list(itertools.islice(pending, size))
        if not batch:
            return
        labels = many(batch) if callable(many) else [segmenter(batch[0])]
        if len(labels) != len(batch):
            raise RuntimeError(f"the segmenter returned {len(labels)} label maps for {len(batch)} images")
        yield from zip(batch, labels)
        stage.advance(len(batch))


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

    @staticmethod
    def _key(image: Image) -> tuple[Any, bool]:
        """The file a scan was read from (read again for each result), else the scan's own image."""
        source = (image.meta or {}).get("source")
        return (source, True) if source is not None else (id(image), False)

    def __call__(self, image: Image) -> Image:
        key, fromFile = self._key(image)
        done = self._done.get(key)
        if done is not None and (fromFile or done[0] is image):
            return done[1]
        self.stage.check()
        labels = self.segmenter(image)
        self.stage.advance()
        self._done[key] = (image, labels)
        return labels

    def keep(self, image: Image, labels: Image) -> None:
        """Keep ``labels`` as the scan ``image``'s (segmented in a batch; the stage already counted it)."""
        self._done[self._key(image)[0]] = (image, labels)
