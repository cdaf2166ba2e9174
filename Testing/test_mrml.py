"""Tests of LongitudinalDiffusionSlicer.mrml against real MRML (PyPI slicer-core), no mocks.

Each test gets a fresh scene bootstrapped like the Slicer application's (see
``mrml_harness.py``). The simulated subject is a real BIDS cohort written once per module;
its volumes and label maps are compared with the files on disk and with what Slicer's own
readers and the Segmentations logic make of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness
import slicer
import vtk
from LongitudinalDiffusionSlicer import mrml

from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.subject import Subject, Timepoint, load_subject

ANATOMICAL = Path(os.path.dirname(nib.__file__)) / "tests" / "data" / "anatomical.nii"
WHITE_MATTER = 3  # value of "white matter" in the simulated dseg files


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def scene():
    """A fresh bootstrapped scene, made current (``slicer.mrmlScene``)."""
    headless = mrml_harness.bootstrapScene()
    yield headless.scene
    headless.close()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mrml") / "cohort"
    spec = CohortSpec(n_subjects=1, heart=False, shape=(20, 24, 20), spacing=(8, 8, 8), lesion_probability=1.0)
    return write_cohort(root, spec)


@pytest.fixture
def subject(cohort) -> Subject:
    return load_subject(cohort / "sub-001")


# ------------------------------------------------------------------------------- helpers


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def same_geometry(a, b) -> bool:
    """Affines equal to 1e-12 mm (the last bit of an oblique matrix may differ in a node)."""
    return np.allclose(a, b, rtol=0.0, atol=1e-12)


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "oblique": _affine(_rotation([0.3, -0.5, 0.8], 23.0) @ np.diag([0.9, 1.1, 1.3]), [-31.7, 12.25, 40.1]),
    "anisotropic": _affine(np.diag([0.4, 0.7, 3.3]), [-50.0, -60.0, -20.5]),
    "lps": _affine(np.diag([-1.2, -1.2, 2.5]), [90.0, 110.0, -70.0]),
}


def _ijkToRAS(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _nodes(scene, className: str) -> list:
    collection = scene.GetNodesByClass(className)
    collection.UnRegister(scene)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def _children(shNode, itemId: int) -> list[int]:
    ids = vtk.vtkIdList()
    shNode.GetItemChildren(itemId, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _segmentArray(scene, segmentation, segmentName: str, referenceVolume) -> np.ndarray:
    """A segment exported by the Segmentations logic on the reference volume's grid, (i, j, k)."""
    segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
    assert segmentId, f"no segment named {segmentName!r}"
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    try:
        logic = mrml.moduleLogic("segmentations", scene)
        assert logic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, referenceVolume)
        assert same_geometry(_ijkToRAS(labelmap), _ijkToRAS(referenceVolume))
        return np.array(slicer.util.arrayFromVolume(labelmap)).transpose(2, 1, 0)
    finally:
        scene.RemoveNode(labelmap)


def _segmentNames(segmentation) -> list[str]:
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def _readWithSlicer(scene, path: Path):
    """Read a file with Slicer's own volume storage node (what File > Add Data does)."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    assert storage.ReadData(node)
    return node


# ---------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_image_node_image_round_trip(scene, kind):
    rng = np.random.default_rng(7)
    array = rng.normal(100.0, 30.0, size=(7, 9, 11)).astype(np.float32)
    image = Image(array, AFFINES[kind])
    node = mrml.volumeNodeFromImage(image, f"vol {kind}", scene)

    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetDisplayNode() is not None
    assert same_geometry(_ijkToRAS(node), image.affine)  # the node itself holds the matrix
    # Slicer's numpy view is (k, j, i): voxel (i, j, k) = (1, 2, 3) sits at [3, 2, 1].
    assert slicer.util.arrayFromVolume(node)[3, 2, 1] == array[1, 2, 3]
    back = mrml.imageFromVolumeNode(node)
    assert back.array.dtype == array.dtype
    assert np.array_equal(back.array, array)
    assert same_geometry(back.affine, image.affine)
    assert back.meta["node_name"] == f"vol {kind}" and back.meta["node_id"] == node.GetID()


def test_many_oblique_affines_round_trip(scene):
    """Random rotations and spacings: geometry back to 1e-12 mm (a node stores spacing and
    unit directions, so the last bit of an oblique matrix may differ)."""
    rng = np.random.default_rng(0)
    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    for n in range(60):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        affine = _affine(q @ np.diag(rng.uniform(0.2, 4.0, 3)), rng.normal(size=3) * 80)
        node = mrml.volumeNodeFromImage(Image(array, affine), f"v{n}", scene)
        assert same_geometry(mrml.imageFromVolumeNode(node).affine, affine), n


def test_real_file_round_trip_and_matches_slicers_reader(scene):
    image = load_image(ANATOMICAL)
    node = mrml.volumeNodeFromImage(image, "anatomical", scene)
    back = mrml.imageFromVolumeNode(node)
    assert np.array_equal(back.array, image.array)
    assert same_geometry(back.affine, image.affine)
    assert image.orientation == "LAS"
    # Slicer reading the same file puts the same values at the same RAS positions. (Its ITK
    # reader stores this file with k reversed, qfac = -1, so compare in world space.)
    reference = _readWithSlicer(scene, ANATOMICAL)
    ijk = np.indices(image.shape).reshape(3, -1)
    ras = image.affine[:3, :3] @ ijk + image.affine[:3, 3:]
    to_reference = np.linalg.inv(_ijkToRAS(reference))
    ref_ijk = np.rint(to_reference[:3, :3] @ ras + to_reference[:3, 3:]).astype(int)
    ref_voxels = slicer.util.arrayFromVolume(reference).transpose(2, 1, 0)
    assert np.array_equal(ref_voxels[tuple(ref_ijk)], image.array[tuple(ijk)])


def test_labelmap_volume(scene):
    labels = np.zeros((5, 6, 7), dtype=np.float32)
    labels[1:3, 2:5, 3:6] = 3
    node = mrml.volumeNodeFromImage(Image(labels, AFFINES["oblique"]), "labels", scene, labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = mrml.imageFromVolumeNode(node)
    assert np.issubdtype(back.array.dtype, np.integer)
    assert np.array_equal(back.array, labels)
    with pytest.raises(InputError, match="whole numbers"):
        mrml.volumeNodeFromImage(Image(labels + 0.5, AFFINES["lps"]), "bad", scene, labelmap=True)


def test_image_of_a_transformed_volume_is_in_world_coordinates(scene):
    image = Image(np.ones((3, 4, 5), dtype=np.float32), AFFINES["lps"])
    node = mrml.volumeNodeFromImage(image, "moved", scene)
    shift = _affine(_rotation([0, 0, 1], 90.0), [5.0, -3.0, 12.0])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, shift[r, c])
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(mrml.imageFromVolumeNode(node).affine, shift @ image.affine, rtol=0, atol=1e-12)


def test_bad_images_add_nothing(scene):
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="not finite"):
        mrml.volumeNodeFromImage(Image(np.full((3, 3, 3), np.nan), np.eye(4)), "nan", scene)
    with pytest.raises(InputError, match="singular"):
        mrml.volumeNodeFromImage(Image(np.zeros((3, 3, 3)), np.diag([1.0, 0.0, 1.0, 1.0])), "flat", scene)
    with pytest.raises(InputError, match="2D image"):
        mrml.volumeNodeFromImage(Image(np.zeros((3, 3)), np.eye(4)), "2d", scene)
    assert scene.GetNumberOfNodes() == before


# ---------------------------------------------------------------------------- subject


def test_load_subject_into_scene(scene, subject):
    loaded = mrml.loadSubjectIntoScene(subject, scene)

    volumes = [n for n in _nodes(scene, "vtkMRMLScalarVolumeNode") if not n.IsA("vtkMRMLLabelMapVolumeNode")]
    assert len(volumes) == 28 == len(loaded.volumeNodes)
    assert _nodes(scene, "vtkMRMLLabelMapVolumeNode") == []  # the import's temporary label maps are gone
    segmentations = _nodes(scene, "vtkMRMLSegmentationNode")
    assert len(segmentations) == 7 == len(loaded.segmentationNodes)

    # Hierarchy: subject > 7 studies (ascending age) > 4 volumes + 1 segmentation each.
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    top = _children(shNode, shNode.GetSceneItemID())
    assert top == [loaded.subjectItemId]
    assert shNode.GetItemName(loaded.subjectItemId) == "sub-001"
    assert shNode.GetItemLevel(loaded.subjectItemId) == "Patient"
    studies = _children(shNode, loaded.subjectItemId)
    assert studies == list(loaded.studyItemIds.values())
    assert len(studies) == 7
    for tp_age, study in zip(subject.ages(), studies):
        tps = [tp for tp in subject.timepoints if tp.age == tp_age]
        assert shNode.GetItemLevel(study) == "Study"
        assert shNode.GetItemName(study) == f"{tps[0].session} · {tps[0].age_label}"
        children = [shNode.GetItemDataNode(item) for item in _children(shNode, study)]
        assert sorted(n.GetClassName() for n in children) == ["vtkMRMLScalarVolumeNode"] * 4 + [
            "vtkMRMLSegmentationNode"
        ]
        assert loaded.segmentationNodes[tp_age] in children

    # Each volume: name, attributes, and voxels and geometry exactly its file's.
    for tp in subject.timepoints:
        node = loaded.volumeNode(tp.age, tp.modality)
        assert node.GetName() == f"sub-001 {tp.modality.value} {tp.age_label}"
        assert float(node.GetAttribute("LongitudinalDiffusion.AgeMonths")) == tp.age
        assert node.GetAttribute("LongitudinalDiffusion.Modality") == tp.modality.value
        assert node.GetAttribute("LongitudinalDiffusion.Session") == tp.session
        assert node.GetAttribute("LongitudinalDiffusion.Source") == str(tp.source)
        on_disk = nib.load(tp.source)
        assert same_geometry(_ijkToRAS(node), on_disk.affine)
        assert np.array_equal(slicer.util.arrayFromVolume(node).transpose(2, 1, 0), on_disk.get_fdata())

    # Segmentations: named from dseg.tsv, reference geometry the age's first volume, and the
    # segment's voxels exactly the dseg file's.
    reference_role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    lesion_seen = False
    for age, segmentation in loaded.segmentationNodes.items():
        first = loaded.volumeNode(age, "T1w")
        assert segmentation.GetNodeReference(reference_role) is first
        names = _segmentNames(segmentation)
        assert "white matter" in names and "background" not in names
        labels_file = subject.get(age, "T1w").labels
        dseg = np.asarray(nib.load(labels_file).dataobj)
        assert np.array_equal(_segmentArray(scene, segmentation, "white matter", first) > 0, dseg == WHITE_MATTER)
        if "lesion: enhancing rim" in names:
            lesion_seen = True
            assert np.array_equal(_segmentArray(scene, segmentation, "lesion: enhancing rim", first) > 0, dseg == 5)
        assert segmentation.GetAttribute("LongitudinalDiffusion.Source") == str(labels_file)
        assert segmentation.GetAttribute("LongitudinalDiffusion.LabelNames").endswith("dseg.tsv")
    assert lesion_seen  # lesion_probability=1: the lesion shows up at the later ages


def test_labels_without_table_use_brain_labels_and_a_table_beside_the_file_wins(scene, tmp_path):
    affine = AFFINES["oblique"]
    labels = np.zeros((6, 7, 8), dtype=np.uint8)
    labels[1:4, 1:5, 2:6] = 3
    labels[4:6, 2:4, 1:3] = 1
    label_file = tmp_path / "x_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), label_file)
    image = Image(np.random.default_rng(1).normal(size=labels.shape).astype(np.float32), affine)
    subject = Subject("sub-x", [Timepoint(6.0, "T2w", image, None, None, label_file)])

    loaded = mrml.loadSubjectIntoScene(subject, scene)
    segmentation = loaded.segmentationNodes[6.0]
    assert _segmentNames(segmentation) == ["CSF", "white matter"]  # BRAIN_LABELS
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert shNode.GetItemName(loaded.studyItemIds[6.0]) == "6.0 mo"  # no session
    assert loaded.volumeNodes[0].GetAttribute("LongitudinalDiffusion.Session") is None

    (tmp_path / "x_dseg.tsv").write_text("index\tname\tcolor\n1\tventricles\t#00ff00\n3\ttissue\tn/a\n")
    segmentation = mrml.loadSubjectIntoScene(subject, scene).segmentationNodes[6.0]
    assert _segmentNames(segmentation) == ["ventricles", "tissue"]
    ventricles = segmentation.GetSegmentation().GetNthSegment(0)
    assert np.allclose(ventricles.GetColor(), (0.0, 1.0, 0.0))
    assert np.array_equal(_segmentArray(scene, segmentation, "tissue", loaded.volumeNodes[0]) > 0, labels == 3)


def test_subject_volumes_and_back_to_a_subject(scene, subject):
    mrml.loadSubjectIntoScene(subject, scene)
    other = mrml.volumeNodeFromImage(subject.timepoints[0].image, "not ours", scene)  # no attributes

    nodes = mrml.subjectVolumes(scene)
    assert other not in nodes
    assert len(nodes) == 28
    assert nodes == mrml.subjectVolumes(scene, subjectId="sub-001")
    assert mrml.subjectVolumes(scene, subjectId="sub-999") == []

    rebuilt = mrml.subjectFromVolumes(nodes, "sub-001", scene)
    assert rebuilt.subject_id == "sub-001"
    assert rebuilt.ages() == subject.ages()
    assert rebuilt.modalities() == subject.modalities()
    assert rebuilt.summary() == subject.summary()
    for a, b in zip(subject.timepoints, rebuilt.timepoints):
        assert (a.age, a.modality, a.session) == (b.age, b.modality, b.session)
        assert b.source == a.source and b.labels == a.labels
        assert b.image.array.dtype == a.image.array.dtype
        assert np.array_equal(b.image.array, a.image.array)
        assert same_geometry(b.image.affine, a.image.affine)

    # The panel's rows: explicit age and modality win over (or stand in for) attributes.
    rows = [(nodes[0], None, None), (other.GetID(), "30.5", "t2")]
    mixed = mrml.subjectFromVolumes(rows, "sub-001", scene)
    assert [(tp.age, tp.modality.value) for tp in mixed.timepoints] == [(subject.ages()[0], "T1w"), (30.5, "T2w")]


def test_volume_without_age_is_refused_naming_the_node(scene, subject):
    node = mrml.volumeNodeFromImage(subject.timepoints[0].image, "scan without age", scene)
    node.SetAttribute("LongitudinalDiffusion.Modality", "T1w")
    with pytest.raises(InputError, match="scan without age") as info:
        mrml.subjectFromVolumes([node], "sub-001", scene)
    assert node.GetID() in str(info.value) and "no age" in str(info.value)
    # A blank cell in the table falls back to the attribute; without one it is an error.
    assert mrml.subjectFromVolumes([(node, 3.0, "")], "sub-001", scene).timepoints[0].modality.value == "T1w"
    node.RemoveAttribute("LongitudinalDiffusion.Modality")
    with pytest.raises(InputError, match="scan without age.*no modality"):
        mrml.subjectFromVolumes([(node, 3.0, "")], "sub-001", scene)
    with pytest.raises(InputError, match="impossible age"):
        mrml.subjectFromVolumes([(node, -2, "T1w")], "sub-001", scene)
    with pytest.raises(InputError, match="no volumes"):
        mrml.subjectFromVolumes([], "sub-001", scene)


def test_missing_label_file_leaves_the_scene_as_it_was(scene, subject, tmp_path):
    mrml.loadSubjectIntoScene(subject, scene)  # something already there must survive
    nodes_before = scene.GetNumberOfNodes()
    items_before = mrml_harness.shItemCount(scene)
    ids_before = {scene.GetNthNode(i).GetID() for i in range(nodes_before)}

    missing = tmp_path / "gone" / "sub-001_ses-07_dseg.nii.gz"
    for tp in subject.timepoints:  # the last age: volumes of every age are made before it fails
        if tp.age == subject.ages()[-1]:
            tp.labels = missing
    added = []
    tag = scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, lambda *args: added.append(1))
    try:
        with pytest.raises(InputError, match="file not found") as info:
            mrml.loadSubjectIntoScene(subject, scene)
    finally:
        scene.RemoveObserver(tag)
    assert str(missing) in str(info.value)
    assert len(added) > 50  # it did get far before failing ...
    assert scene.GetNumberOfNodes() == nodes_before  # ... and took all of it back
    assert {scene.GetNthNode(i).GetID() for i in range(nodes_before)} == ids_before
    assert mrml_harness.shItemCount(scene) == items_before


# ---------------------------------------------------------------------------- bundles


def test_scene_to_mrb_and_back(scene, subject, tmp_path):
    loaded = mrml.loadSubjectIntoScene(subject, scene)
    mrml.volumeNodeFromImage(
        Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), AFFINES["oblique"]), "oblique", scene
    )
    path = mrml.sceneToMrb(scene, tmp_path / "bundle" / "session.mrb")
    assert sorted(p.name for p in path.parent.iterdir()) == ["session.mrb"]  # no temporary left

    fresh = mrml_harness.bootstrapScene()
    try:
        assert mrml.mrbToScene(path, fresh.scene) is fresh.scene
        read = fresh.scene
        volumes = mrml.subjectVolumes(read)
        assert [n.GetName() for n in volumes] == [n.GetName() for n in loaded.volumeNodes]
        for original, node in zip(loaded.volumeNodes, volumes):
            for attribute in ("AgeMonths", "Modality", "Session", "Source", "SubjectID", "Labels"):
                key = f"LongitudinalDiffusion.{attribute}"
                assert node.GetAttribute(key) == original.GetAttribute(key)
            assert np.array_equal(slicer.util.arrayFromVolume(node), slicer.util.arrayFromVolume(original))
            assert np.allclose(_ijkToRAS(node), _ijkToRAS(original), rtol=0, atol=1e-9)
        # NRRD stores the oblique matrix in decimal: equal to ~1e-15 mm, not bit for bit.
        oblique_read = read.GetFirstNodeByName("oblique")
        assert np.allclose(_ijkToRAS(oblique_read), AFFINES["oblique"], rtol=0, atol=1e-9)

        segmentations = _nodes(read, "vtkMRMLSegmentationNode")
        assert len(segmentations) == 7
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(read)
        subjects = [i for i in _children(shNode, shNode.GetSceneItemID()) if shNode.GetItemLevel(i) == "Patient"]
        assert [shNode.GetItemName(i) for i in subjects] == ["sub-001"]
        studies = _children(shNode, subjects[0])
        assert [shNode.GetItemName(i) for i in studies] == [
            f"{tp.session} · {tp.age_label}" for tp in subject.timepoints if tp.modality.value == "T1w"
        ]
        last = studies[-1]
        children = {shNode.GetItemDataNode(i).GetName() for i in _children(shNode, last)}
        age_label = subject.timepoints[-1].age_label
        assert children == {f"sub-001 {m} {age_label}" for m in ("T1w", "T2w", "FLAIR", "T1ce")} | {
            f"sub-001 segmentation {age_label}"
        }
        segmentation = shNode.GetItemDataNode(
            next(i for i in _children(shNode, last) if shNode.GetItemDataNode(i).IsA("vtkMRMLSegmentationNode"))
        )
        reference = read.GetFirstNodeByName(f"sub-001 T1w {age_label}")
        dseg = np.asarray(nib.load(subject.timepoints[-1].labels).dataobj)
        assert "white matter" in _segmentNames(segmentation)
        assert np.array_equal(_segmentArray(read, segmentation, "white matter", reference) > 0, dseg == WHITE_MATTER)
        # And the library can work from the reloaded scene.
        rebuilt = mrml.subjectFromVolumes(volumes, "sub-001", read)
        assert rebuilt.summary() == subject.summary()
    finally:
        fresh.close()


def test_bundle_errors(scene, tmp_path):
    with pytest.raises(InputError, match=r"\.mrb"):
        mrml.sceneToMrb(scene, tmp_path / "scene.zip")
    with pytest.raises(InputError, match="file not found"):
        mrml.mrbToScene(tmp_path / "none.mrb", scene)
    (tmp_path / "fake.mrb").write_text("not a zip")
    with pytest.raises(InputError, match="zip"):
        mrml.mrbToScene(tmp_path / "fake.mrb", scene)


def test_module_logic_lookup(scene):
    assert mrml.moduleLogic("Segmentations", scene).IsA("vtkSlicerSegmentationsModuleLogic")
    assert mrml.moduleLogic("segmentations").GetMRMLScene() is scene  # default: slicer.mrmlScene
    with pytest.raises(RuntimeError, match="no 'markups' module logic"):
        mrml.moduleLogic("markups", scene)
