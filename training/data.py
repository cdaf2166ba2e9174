"""Training data for every method: a cohort on disk -> PyTorch datasets on the model grid.

A cohort is a BIDS dataset the library reads (``sub-*/ses-*/anat``, ages in
``sessions.tsv``, optional ``derivatives/*`` label maps) plus, for the frame methods,
cine folders under ``cardiac/sub-*/cine`` (``manifest.tsv``: file, time_ms, phase,
labels; the first frame end-diastole, the last end-systole) - the layout
``longdiff demo-data`` writes, and one a user can give their own data.

Each item is a dict of tensors in the batch format of the method's ``loss`` (without the
batch axis), already on the model grid: every image is resampled once with the card's
:class:`~LongitudinalDiffusionLib.grid.ModelGrid` and cached in memory. Augmentation
(Cas-DiffCom's 0-5 degree rotations of the guidance image, sec. 3.1) uses MONAI's
``RandRotate``; every random choice of an item is seeded by (seed, index, epoch), so a
run resumed at an epoch sees the same data as the run it continues (call ``set_epoch``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.grid import ModelGrid
from LongitudinalDiffusionLib.imaging import load_image
from LongitudinalDiffusionLib.models import default_grid
from LongitudinalDiffusionLib.subject import Modality, Subject, Timepoint, load_bids_subject, parse_modality

# ----------------------------------------------------------------------------- the cohort


@dataclass
class HeartFrame:
    image: Path
    labels: Path | None
    time_ms: float


@dataclass
class Cohort:
    """A dataset folder: BIDS subjects (``sub-001`` ...) and cine hearts (``sub-heart01`` ...)."""

    root: Path
    subjects: list[str]
    hearts: list[str]
    _subjects: dict[str, Subject] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)

    def subject(self, sid: str) -> Subject:
        if sid not in self._subjects:
            if sid not in self.subjects:
                raise InputError(self.root, f"no subject '{sid}' (subjects: {', '.join(self.subjects) or 'none'})")
            self._subjects[sid] = load_bids_subject(self.root, subject=sid.removeprefix("sub-"))
        return self._subjects[sid]

    def heart_frames(self, hid: str) -> list[HeartFrame]:
        """The frames of one cine in time order (end-diastole first)."""
        folder = self.root / "cardiac" / hid / "cine"
        manifest = folder / "manifest.tsv"
        if not manifest.is_file():
            raise InputError(manifest, "cine manifest not found")
        with open(manifest, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if len(rows) < 2 or "file" not in rows[0] or "time_ms" not in rows[0]:
            raise InputError(manifest, "needs columns file and time_ms and at least two frames")
        frames = [
            HeartFrame(folder / r["file"], folder / r["labels"] if r.get("labels") else None, float(r["time_ms"]))
            for r in rows
        ]
        return sorted(frames, key=lambda f: f.time_ms)

    def on_grid(self, path: Path, grid: ModelGrid, *, labels: bool = False, reference: Any = None) -> np.ndarray:
        """``path`` resampled onto ``grid`` (cached; ``reference`` places it like another image)."""
        key = (str(path), repr(grid), labels, None if reference is None else str(reference))
        if key not in self._cache:
            ref = None if reference is None else grid.forward(load_image(reference)).record
            image = load_image(path, dtype=np.int16) if labels else load_image(path)
            self._cache[key] = grid.forward(image, labels=labels, reference=ref).array.astype(
                np.int64 if labels else np.float32
            )
        return self._cache[key]


def open_cohort(root: str | Path) -> Cohort:
    """The subjects and hearts of a dataset folder; a clear error if it holds neither."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    subjects = sorted(p.name for p in root.glob("sub-*") if p.is_dir())
    hearts = sorted(p.name for p in (root / "cardiac").glob("sub-*") if (p / "cine" / "manifest.tsv").is_file())
    if not subjects and not hearts:
        raise InputError(root, "no BIDS subjects (sub-*) and no cine hearts (cardiac/sub-*/cine) found")
    return Cohort(root, subjects, hearts)


def split(ids: list[str], n_val: int) -> tuple[list[str], list[str]]:
    """Training and held-out ids: the last ``n_val`` in sorted order are held out.

    A fixed rule rather than a random draw, so that training, evaluation and the docs name
    the same held-out subjects without passing lists around.
    """
    ids = sorted(ids)
    if not 0 < n_val < len(ids):
        raise LongitudinalDiffusionError(
            f"cannot hold out {n_val} of {len(ids)} subjects: at least one must remain for training"
        )
    return ids[:-n_val], ids[-n_val:]


# ----------------------------------------------------------------------------- the three-way split
#
# train      : what the weights learnt from (``split``'s first part);
# validation : ``split``'s held-out part - training validates on it and every design choice
#              (steps, training pairs, sampler) was made on it, so it is no test;
# test       : subjects never used for either, scored once per released model. For the
#              simulated cohort they are new subjects of the same simulator seed (subject k is
#              drawn from ``default_rng([seed, k])``), written by ``python -m training.test_sets``.
# A model card records its split under ``"splits"`` (train, validation, test ids and the
# simulator seed); evaluation refuses a test id that is in the card's train or validation split.


def simulation_seed(root: str | Path) -> int | None:
    """The simulator seed a simulated cohort declares (``dataset_description.json``,
    ``SimulationParameters.seed``); None for any other dataset."""
    import json

    path = Path(root) / "dataset_description.json"
    try:
        seed = json.loads(path.read_text(encoding="utf-8")).get("SimulationParameters", {}).get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    return int(seed) if isinstance(seed, int) else None


SPLIT_RULE = (
    "train: the subjects the weights learnt from; validation: the last ones in sorted order "
    "(training.data.split), used for validation during training and for every design choice; test: "
    "subjects that neither training nor validation used, scored once (docs/evaluation)"
)


def card_splits(
    cohort: Cohort, train: list[str], validation: list[str], test: list[str] | None, *, dataset: str
) -> dict[str, Any]:
    """The ``"splits"`` entry of a trained model's card. Test ids may not repeat a train or
    validation id; for a simulated cohort they are new subjects of the same seed."""
    test = sorted(test or [])
    clash = sorted(set(test) & (set(train) | set(validation)))
    if clash:
        raise InputError(cohort.root, f"data.test names subjects the model trains or validates on: {', '.join(clash)}")
    return {
        "dataset": dataset,
        "simulator_seed": simulation_seed(cohort.root),
        "rule": SPLIT_RULE,
        "train": list(train),
        "validation": list(validation),
        "test": test,
    }


def split_conflicts(
    ids: list[str], splits: dict[str, Any], cohort_seed: int | None, *, evaluated_as: str = "test"
) -> dict[str, list[str]]:
    """The ``ids`` that the card's ``splits`` put in a split they may not be evaluated from,
    by split name: for a test, ``train`` and ``validation``; for a validation, ``train``.

    Ids name the same subjects only in the same population: a simulated cohort with another
    seed than the card's holds other subjects under the same ids, so nothing conflicts.
    Any other dataset (no declared seed) is taken to be the card's.
    """
    if evaluated_as not in ("test", "validation"):
        raise LongitudinalDiffusionError(f"evaluate as 'test' or 'validation', not '{evaluated_as}'")
    card_seed = splits.get("simulator_seed")
    if cohort_seed is not None and card_seed is not None and int(card_seed) != int(cohort_seed):
        return {}
    forbidden = ("train", "validation") if evaluated_as == "test" else ("train",)
    out = {}
    for name in forbidden:
        hit = sorted(set(ids) & set(splits.get(name) or []))
        if hit:
            out[name] = hit
    return out


# ----------------------------------------------------------------------------- datasets


class GridDataset(Dataset):
    """Base: a list of item recipes, the cohort's cached grid arrays, seeded randomness."""

    def __init__(self, cohort: Cohort, grid: dict | ModelGrid, *, train: bool, seed: int = 0) -> None:
        self.cohort = cohort
        self.grid = grid if isinstance(grid, ModelGrid) else ModelGrid.from_dict(grid)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.recipes: list[Any] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The random source of one item: training items change with the epoch, held-out ones never."""
        return np.random.default_rng([self.seed, index, self.epoch if self.train else 0])

    def __len__(self) -> int:
        return len(self.recipes)

    def array(self, path: Path, **kwargs: Any) -> torch.Tensor:
        return torch.from_numpy(self.cohort.on_grid(path, self.grid, **kwargs))[None]


def _timepoints(cohort: Cohort, ids: list[str], modality: Modality) -> dict[str, list[Timepoint]]:
    out = {}
    for sid in ids:
        tps = sorted((tp for tp in cohort.subject(sid).timepoints if tp.modality == modality), key=lambda t: t.age)
        if tps:
            out[sid] = tps
    if not out:
        raise InputError(cohort.root, f"no {modality.value} scans in subjects {', '.join(ids)}")
    return out


class PairDataset(GridDataset):
    """Ordered pairs (source, target) of one subject's scans of one modality, at different ages:
    the time-interval model and Cas-DiffCom's generator."""

    def __init__(
        self,
        cohort,
        grid,
        ids,
        *,
        method: str,
        modality: Modality,
        train: bool,
        seed: int = 0,
        rotate=0.0,
        max_visit_gap: int | None = None,
    ):
        super().__init__(cohort, grid, train=train, seed=seed)
        self.method = method
        self.rotate = float(rotate)
        # max_visit_gap k: only pairs at most k visits apart (1 = neighbouring visits), the
        # pairs a two-sided completion asks of the model; None: every ordered pair.
        for tps in _timepoints(cohort, ids, modality).values():
            self.recipes += [
                (a, b)
                for i, a in enumerate(tps)
                for j, b in enumerate(tps)
                if i != j and (max_visit_gap is None or abs(i - j) <= max_visit_gap)
            ]
        self._rotator = None
        if self.rotate and train:
            from monai.transforms import RandRotate

            r = math.radians(self.rotate)
            self._rotator = RandRotate(range_x=r, range_y=r, range_z=r, prob=1.0, keep_size=True, padding_mode="border")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        a, b = self.recipes[index]
        source, target = self.array(a.source), self.array(b.source)
        unrotated = source
        if self._rotator is not None:  # the guidance image only (Cas-DiffCom sec. 3.1)
            self._rotator.set_random_state(seed=int(self.rng(index).integers(2**31)))
            source = torch.as_tensor(np.asarray(self._rotator(source)), dtype=torch.float32)
        if self.method == "interval":
            return {"source": source, "target": target, "interval": torch.tensor(b.age - a.age, dtype=torch.float32)}
        return {
            "guidance_lr": source,
            "guidance_reference": unrotated,
            "target_lr": target,
            "guidance_age": torch.tensor(a.age, dtype=torch.float32),
            "target_age": torch.tensor(b.age, dtype=torch.float32),
        }


class RefinerDataset(GridDataset):
    """Cas-DiffCom's super-resolution stage: each scan on the low- and the high-resolution grid,
    optionally as aligned random crops (``crop`` in low-resolution voxels) to train at a
    fraction of the cost; the network is convolutional with attention at its deepest level."""

    def __init__(self, cohort, grid, sr_grid, ids, *, modality: Modality, train: bool, seed=0, crop=None):
        super().__init__(cohort, grid, train=train, seed=seed)
        self.sr_grid = sr_grid if isinstance(sr_grid, ModelGrid) else ModelGrid.from_dict(sr_grid)
        self.crop = None if crop is None else [int(c) for c in crop]
        self.recipes = [tp for tps in _timepoints(cohort, ids, modality).values() for tp in tps]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tp = self.recipes[index]
        low = self.array(tp.source)
        high = torch.from_numpy(self.cohort.on_grid(tp.source, self.sr_grid))[None]
        if self.crop is not None:
            rng = self.rng(index)
            starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(low.shape[1:], self.crop)]
            low = low[(slice(None), *(slice(s, s + c) for s, c in zip(starts, self.crop)))]
            high = high[(slice(None), *(slice(2 * s, 2 * (s + c)) for s, c in zip(starts, self.crop)))]
        return {"low_res": low.contiguous(), "target_hr": high.contiguous()}


class SequenceDataset(GridDataset):
    """SADM: a subject's timeline with a target frame and random drop-outs (paper sec. 3.2,
    Alg. 1; sec. 4.1 draws conditioning, missing and future indices at random): the first
    frame always present, each other frame present with probability ``keep``, the target (a
    real scan) drawn among frames 1..F-1. Timelines shorter than ``max_frames`` are padded
    after their end (padding slots are never read)."""

    def __init__(self, cohort, grid, ids, *, modality: Modality, max_frames: int, train: bool, seed=0, keep=0.7):
        super().__init__(cohort, grid, train=train, seed=seed)
        self.max_frames = int(max_frames)
        self.keep = float(keep)
        for tps in _timepoints(cohort, ids, modality).values():
            if len(tps) < 2:
                continue
            self.recipes.append(tps[: self.max_frames])
        if not self.recipes:
            raise InputError(cohort.root, "SADM needs subjects with at least two timepoints")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tps = self.recipes[index]
        rng = self.rng(index)
        f = len(tps)
        frames = torch.zeros((self.max_frames, 1, *self.grid.shape))
        ages = torch.full((self.max_frames,), float(tps[-1].age))
        for i, tp in enumerate(tps):
            frames[i] = self.array(tp.source)
            ages[i] = tp.age
        ages[f:] = ages[f - 1] + torch.arange(1, self.max_frames - f + 1, dtype=torch.float32)
        target = int(rng.integers(1, f))
        present = torch.zeros(self.max_frames, dtype=torch.bool)
        present[:f] = torch.from_numpy(rng.random(f) < self.keep)
        present[0] = present[target] = True  # the target is what the loss learns to produce
        return {"frames": frames, "ages": ages, "present": present, "target_index": torch.tensor(target)}


class ModalityDataset(GridDataset):
    """cWDM: one session's contrasts on one grid (placed by the first condition). A
    single-target model gets its target and conditions; an any-missing model gets all four
    contrasts as conditions (the loss hides one at random)."""

    def __init__(self, cohort, grid, ids, *, config: dict, train: bool, seed=0):
        super().__init__(cohort, grid, train=train, seed=seed)
        self.any_missing = bool(config.get("any_missing"))
        wanted = [parse_modality(m) for m in (config["modalities"] if self.any_missing else config["conditions"])]
        self.target = None if self.any_missing else parse_modality(config["target"])
        needed = wanted + ([self.target] if self.target else [])
        for sid in ids:
            sessions: dict[float, dict[Modality, Path]] = {}
            for tp in cohort.subject(sid).timepoints:
                sessions.setdefault(round(tp.age, 3), {})[tp.modality] = tp.source
            for paths in sessions.values():
                if all(m in paths for m in needed):
                    self.recipes.append(([paths[m] for m in wanted], paths.get(self.target) if self.target else None))
        if not self.recipes:
            raise InputError(cohort.root, f"no session has all of {', '.join(m.value for m in needed)}")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        conds, target = self.recipes[index]
        ref = conds[0]
        stack = [
            torch.from_numpy(self.cohort.on_grid(p, self.grid, reference=ref if p != ref else None)) for p in conds
        ]
        item = {"conditions": torch.stack(stack)}
        if target is not None:
            item["target"] = torch.from_numpy(self.cohort.on_grid(target, self.grid, reference=ref))[None]
        return item


class CineDataset(GridDataset):
    """DDM: (end-diastole, frame k) pairs of each heart's cine, k = 1 .. last."""

    def __init__(self, cohort, grid, ids, *, train: bool, seed=0):
        super().__init__(cohort, grid, train=train, seed=seed)
        for hid in ids:
            frames = cohort.heart_frames(hid)
            self.recipes += [(frames[0], f) for f in frames[1:]]
        if not self.recipes:
            raise InputError(cohort.root, "no cine frames in the chosen hearts")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        src, tgt = self.recipes[index]
        return {
            "source": self.array(src.image),
            "target": torch.from_numpy(self.cohort.on_grid(tgt.image, self.grid, reference=src.image))[None],
        }


class LabelDataset(GridDataset):
    """The tissue segmentation model: images with their ground-truth labels mapped to its classes."""

    def __init__(self, cohort, grid, ids, *, config: dict, train: bool, seed=0):
        super().__init__(cohort, grid, train=train, seed=seed)
        self.anatomy = config.get("anatomy", "brain")
        if self.anatomy == "heart":
            for hid in ids:
                self.recipes += [(f.image, f.labels) for f in cohort.heart_frames(hid) if f.labels is not None]
        else:
            modality = parse_modality(config.get("modality", "T1w"))
            for tps in _timepoints(cohort, ids, modality).values():
                self.recipes += [(tp.source, tp.labels) for tp in tps if tp.labels is not None]
        if not self.recipes:
            raise InputError(cohort.root, "no images with label maps for the segmentation model")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from LongitudinalDiffusionLib.segmentation import map_labels

        image, labels = self.recipes[index]
        lab = self.cohort.on_grid(labels, self.grid, labels=True, reference=image)
        return {"image": self.array(image), "labels": torch.from_numpy(map_labels(lab, self.anatomy))[None]}


def make_dataset(
    method: str,
    config: dict,
    grid: dict | None,
    cohort: Cohort,
    ids: list[str],
    *,
    train: bool,
    seed: int = 0,
    stage: str | None = None,
) -> GridDataset:
    """The dataset of ``method`` over subjects (or hearts) ``ids``.

    ``grid`` defaults to the method's grid for ``config``; for Cas-DiffCom's refiner
    (``stage="refiner"``) the low-resolution grid, the high-resolution one following from
    ``config["sr_image_size"]``.
    """
    grid = grid or default_grid(method, config)
    modality = parse_modality(config.get("modality") or (config.get("modalities") or ["T1w"])[0])
    if method in ("interval", "cas-diffcom") and stage != "refiner":
        rotate = config.get("augment", {}).get("guidance_rotation_deg", 5.0) if method == "cas-diffcom" else 0.0
        gap = config.get("training_pairs", {}).get("max_visit_gap")
        return PairDataset(
            cohort,
            grid,
            ids,
            method=method,
            modality=modality,
            train=train,
            seed=seed,
            rotate=rotate,
            max_visit_gap=gap,
        )
    if method == "cas-diffcom":
        sr_grid = default_grid(method, config, "sr_image_size")
        crop = config.get("refiner_crop") if train else None
        return RefinerDataset(cohort, grid, sr_grid, ids, modality=modality, train=train, seed=seed, crop=crop)
    if method == "sadm":
        return SequenceDataset(
            cohort, grid, ids, modality=modality, max_frames=config["max_frames"], train=train, seed=seed
        )
    if method == "cwdm":
        return ModalityDataset(cohort, grid, ids, config=config, train=train, seed=seed)
    if method == "ddm":
        return CineDataset(cohort, grid, ids, train=train, seed=seed)
    if method == "tissue-seg":
        return LabelDataset(cohort, grid, ids, config=config, train=train, seed=seed)
    raise LongitudinalDiffusionError(f"no training data recipe for method '{method}'")


def ids_for(method: str, config: dict, cohort: Cohort) -> list[str]:
    """Which of the cohort's ids a method trains on: hearts for DDM (and a heart segmentation
    model), subjects otherwise."""
    heart = method == "ddm" or (method == "tissue-seg" and config.get("anatomy") == "heart")
    ids = cohort.hearts if heart else cohort.subjects
    if not ids:
        raise InputError(cohort.root, f"the cohort has no {'hearts' if heart else 'subjects'} for {method}")
    return ids
