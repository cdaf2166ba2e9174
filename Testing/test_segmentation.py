"""The tissue segmentation model and the classical Gaussian-mixture baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from LongitudinalDiffusionLib import segmentation as seg
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.models import default_grid

torch.set_num_threads(1)


# --------------------------------------------------------------------------- config and labels


@pytest.mark.parametrize("anatomy", ["brain", "heart"])
@pytest.mark.parametrize("scale", ["paper", "demo", "tiny"])
def test_configs_build_a_network_with_one_output_per_class(scale, anatomy):
    config = seg.default_config(scale, anatomy)
    assert json.loads(json.dumps(config)) == config
    classes = seg.BRAIN_CLASSES if anatomy == "brain" else seg.HEART_CLASSES
    assert config["classes"] == list(classes.values())
    grid = seg.model_grid(config)
    assert grid.to_dict() == default_grid(seg.METHOD, config)
    assert grid.value_range == (0.0, 1.0)
    fov = np.array(grid.shape) * np.array(grid.spacing)
    expected = (160, 192, 160) if anatomy == "brain" else (128, 128, 120)
    assert np.allclose(fov, expected, atol=0.5)
    if scale == "tiny":
        model = seg.build(config)
        out = model(torch.zeros(1, 1, *config["image_size"]))
        assert out.shape == (1, len(classes), *config["image_size"])


def test_bad_config_and_anatomy_are_refused():
    with pytest.raises(LongitudinalDiffusionError, match="anatomy"):
        seg.default_config("tiny", "liver")
    config = seg.default_config("demo")
    config["image_size"] = [40, 44, 42]
    with pytest.raises(InputError, match="divisible by 8"):
        seg.build(config)


def test_map_labels_brain_lesions_become_white_matter_and_heart_ventricles_blood_pool():
    brain = np.array([[[0, 1, 2, 3, 4, 5, 6]]], dtype=np.uint8)
    assert seg.map_labels(brain, "brain").tolist() == [[[0, 1, 2, 3, 3, 3, 3]]]
    heart = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)  # a label map resampled onto a grid
    mapped = seg.map_labels(heart, "heart")
    assert mapped.dtype == np.int64 and mapped.tolist() == [0, 1, 2, 1]
    with pytest.raises(InputError, match=r"values \[7\]"):
        seg.map_labels(np.array([0, 7]), "brain")
    with pytest.raises(InputError, match="whole numbers"):
        seg.map_labels(np.array([0.5]), "brain")


def test_loss_refuses_labels_outside_the_classes_and_float_labels():
    config = seg.default_config("tiny", "heart")
    model = seg.build(config)
    image = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(InputError, match=r"0\.\.2"):
        seg.loss(model, {"image": image, "labels": torch.full((1, 1, 16, 16, 16), 3)}, config)
    with pytest.raises(InputError, match="integer"):
        seg.loss(model, {"image": image, "labels": torch.zeros(1, 1, 16, 16, 16)}, config)
    with pytest.raises(InputError, match="shape"):
        seg.loss(model, {"image": image, "labels": torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)}, config)


# --------------------------------------------------------------------------- training and inference


def _phantom(rng: np.random.Generator, n: int = 16, spacing: float = 8.0) -> tuple[Image, Image]:
    """A heart-like phantom: a bright blood pool inside a mid-grey wall, on a dark background."""
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    centre = rng.uniform(6, 10, 3)
    outer = rng.uniform(4.5, 6.5)
    inner = outer * rng.uniform(0.45, 0.65)
    d = np.linalg.norm(ijk - centre, axis=-1)
    labels = np.where(d < inner, 1, np.where(d < outer, 2, 0)).astype(np.int16)
    image = np.choose(labels, [100.0, 900.0, 500.0]) + rng.normal(0, 80, labels.shape)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (n - 1) / 2
    return Image(image.astype(np.float32), affine), Image(labels, affine.copy())


@pytest.fixture(scope="module")
def trained():
    """The tiny heart model trained on fresh phantoms through the model grid (~5 s)."""
    config = seg.default_config("tiny", "heart")
    grid = seg.model_grid(config)
    torch.manual_seed(0)
    model = seg.build(config)
    opt = torch.optim.Adam(model.parameters(), lr=config["optimizer"]["lr"])
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(300):
        images, labels = [], []
        for _ in range(2):
            image, lab = _phantom(rng)
            sample = grid.forward(image)
            images.append(sample.array)
            labels.append(grid.forward(lab, labels=True, reference=sample.record).array)
        batch = {
            "image": torch.from_numpy(np.stack(images))[:, None],
            "labels": torch.from_numpy(seg.map_labels(np.stack(labels), "heart"))[:, None],
        }
        loss = seg.loss(model, batch, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, config, losses


def test_training_lowers_the_loss_and_reaches_dice_above_0_8_on_unseen_phantoms(trained):
    model, config, losses = trained
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    rng = np.random.default_rng(123)
    scores = []
    for _ in range(4):
        image, truth = _phantom(rng)
        pred = seg.segment(model, image, config=config)
        scores.append(seg.dice_per_class(pred, seg.map_labels(truth.array, "heart"), seg.HEART_CLASSES))
    for name in ("blood pool", "myocardium"):
        assert np.mean([s[name] for s in scores]) > 0.8, scores


def test_segment_returns_labels_on_the_input_geometry(trained):
    model, config, _ = trained
    image, truth = _phantom(np.random.default_rng(7))
    ras = seg.segment(model, image, config=config)
    assert ras.array.dtype == np.int16 and ras.same_geometry(image)
    assert np.array_equal(ras.affine, image.affine)
    assert set(np.unique(ras.array)) <= {0, 1, 2}
    assert ras.meta["classes"] == ["background", "blood pool", "myocardium"]

    # The same scan stored left-posterior-superior with the voxel order flipped: the same labels,
    # flipped back, on the LPS file's own affine.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [15, 15]
    lps = Image(image.array[::-1, ::-1].copy(), image.affine @ flip)
    out = seg.segment(model, lps, config=config, grid=seg.model_grid(config).to_dict())
    assert np.array_equal(out.affine, lps.affine) and out.shape == lps.shape
    assert np.array_equal(out.array[::-1, ::-1], ras.array)

    # An oblique, anisotropic scan of another shape: labels on exactly its voxels.
    theta = np.deg2rad(12)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([5.0, 6.0, 9.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.array([23, 19, 13]) / 2)
    oblique = Image(np.random.default_rng(1).normal(500, 100, (24, 20, 14)).astype(np.float32), affine)
    out = seg.segment(model, oblique, config=config)
    assert out.shape == oblique.shape and np.array_equal(out.affine, oblique.affine)
    assert out.array.dtype == np.int16 and set(np.unique(out.array)) <= {0, 1, 2}


def test_segment_tensor_keeps_the_training_flag_and_the_batch(trained):
    model, config, _ = trained
    model.train()
    x = torch.rand(2, 1, 16, 16, 16)
    labels = seg.segment_tensor(model, x)
    assert model.training
    assert labels.shape == (2, 1, 16, 16, 16) and labels.dtype == torch.long
    with pytest.raises(InputError, match="N, 1"):
        seg.segment_tensor(model, torch.rand(16, 16, 16))


# --------------------------------------------------------------------------- the classical baseline


def test_em_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(100, 10, 3000), rng.normal(200, 15, 5000), rng.normal(320, 12, 2000)])
    weights, means, variances = seg.fit_gaussian_mixture(rng.permutation(values), 3)
    assert np.allclose(means, [100, 200, 320], rtol=0.02)
    assert np.allclose(np.sqrt(variances), [10, 15, 12], rtol=0.1)
    assert np.allclose(weights, [0.3, 0.5, 0.2], atol=0.02)
    with pytest.raises(InputError, match="equal"):
        seg.fit_gaussian_mixture(np.ones(100), 3)


def test_dice_per_class():
    pred = np.array([0, 1, 1, 2, 2, 2])
    truth = np.array([0, 1, 2, 2, 2, 0])
    scores = seg.dice_per_class(pred, truth, {0: "bg", 1: "a", 2: "b", 3: "c"})
    assert list(scores) == ["a", "b", "c"]
    assert scores["a"] == pytest.approx(2 / 3) and scores["b"] == pytest.approx(2 * 2 / 6)
    assert np.isnan(scores["c"])
    assert seg.dice_per_class(pred, truth, [0], include_background=True) == {"0": pytest.approx(2 / 3)}
    with pytest.raises(InputError, match="shape"):
        seg.dice_per_class(pred, truth[:3], [1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    out = tmp_path_factory.mktemp("seg") / "cohort"
    spec = CohortSpec(n_subjects=3, seed=0, heart=False, shape=(40, 48, 40), spacing=(4.0, 4.0, 4.0))
    return write_cohort(out, spec, jobs=1)


def _session(root, sub: str, index: int, modality: str = "T1w"):
    ages = [float(line.split("\t")[1]) for line in (root / sub / f"{sub}_sessions.tsv").read_text().splitlines()[1:]]
    ses = f"ses-{index + 1:02d}"
    suffix = "ce-gadolinium_T1w" if modality == "T1ce" else modality
    image = load_image(root / sub / ses / "anat" / f"{sub}_{ses}_{suffix}.nii.gz")
    truth = load_image(
        root / "derivatives" / "groundtruth" / sub / ses / "anat" / f"{sub}_{ses}_dseg.nii.gz", dtype=np.int16
    )
    return ages[index], image, seg.map_labels(truth.array, "brain")


def test_gmm_baseline_finds_white_matter_at_24_months(cohort):
    for sub in ("sub-001", "sub-002", "sub-003"):
        age, image, truth = _session(cohort, sub, 6)
        assert age > 23
        mask = seg.brain_mask(image)
        assert seg.dice_per_class(mask.astype(int), (truth > 0).astype(int), [1])["1"] > 0.9
        labels = seg.gmm_segment(image, age_months=age)
        assert labels.same_geometry(image) and labels.array.dtype == np.int16
        assert seg.dice_per_class(labels, truth, seg.BRAIN_CLASSES)["white matter"] > 0.6
    # Inside the true brain mask every tissue is found.
    given = seg.gmm_segment(image, mask=truth > 0, age_months=age)
    assert min(seg.dice_per_class(given, truth, seg.BRAIN_CLASSES).values()) > 0.6


def test_gmm_baseline_uses_the_age_for_the_infant_contrast(cohort):
    """Before myelination T1w white matter is darker than grey matter: the age picks the order."""
    age, image, truth = _session(cohort, "sub-002", 0)
    assert age < 6
    infant = seg.dice_per_class(seg.gmm_segment(image, mask=truth > 0, age_months=age), truth, seg.BRAIN_CLASSES)
    adult = seg.dice_per_class(seg.gmm_segment(image, mask=truth > 0), truth, seg.BRAIN_CLASSES)
    assert infant["white matter"] > 0.6 and infant["grey matter"] > 0.6
    assert adult["white matter"] < 0.3 and adult["grey matter"] < 0.3


def test_gmm_baseline_refuses_bad_masks_and_unknown_contrasts(cohort):
    _, image, truth = _session(cohort, "sub-001", 6)
    with pytest.raises(InputError, match="empty"):
        seg.gmm_segment(image, mask=np.zeros(image.shape, bool))
    with pytest.raises(InputError, match="mask shape"):
        seg.gmm_segment(image, mask=np.ones((4, 4, 4), bool))
    with pytest.raises(InputError, match="FLAIR"):
        seg.gmm_segment(image, contrast="FLAIR")
    four = seg.gmm_segment(image, n_classes=4, mask=truth > 0, bias_iterations=0)
    assert set(np.unique(four.array)) == {0, 1, 2, 3, 4}
    assert np.all(np.diff(four.meta["means"]) > 0)


def test_importing_segmentation_does_not_import_statsmodels():
    code = "import sys, LongitudinalDiffusionLib.segmentation; print([m for m in ('statsmodels',) if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
