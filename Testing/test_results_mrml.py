"""Task results in a real MRML scene (PyPI slicer-core): LongitudinalDiffusionSlicer.results.

A demo model (2 sampler steps) completes a hidden age of a simulated subject loaded into
a bootstrapped scene; the result is placed under the subject and checked node by node:
volumes on the input's geometry, the uncertainty map, the timeline as a sequence with a
browser whose selected item drives the proxy, the segmentation sequence synchronised with
it, segmentations with reference geometry, the tissue volume tables and chart, and a
``.mrb`` that reloads with all of it. Failures and removal leave the scene as it was.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness
import slicer
import torch
from LongitudinalDiffusionSlicer import mrml, results

from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.subject import load_subject
from LongitudinalDiffusionLib.tasks import complete_ages, interpolate_frames

torch.set_num_threads(1)
AGE = 7.5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results") / "cohort"
    return write_cohort(root, CohortSpec(n_subjects=1, heart=True, shape=(20, 24, 20), spacing=(8, 8, 8)))


@pytest.fixture(scope="module")
def segmenter():
    return results.TissueSegmenter("tissue-seg-brain-demo")


@pytest.fixture(scope="module")
def completed(cohort):
    """complete-ages at 7.5 months, 2 samples, 2 sampler steps (about 2 s)."""
    subject = load_subject(cohort / "sub-001")
    return subject, complete_ages(subject, [AGE], "cas-diffcom-demo", steps=2, n_samples=2, device="cpu")


@pytest.fixture
def headless():
    app = mrml_harness.bootstrapScene()
    yield app
    app.close()


def _geometry(node) -> np.ndarray:
    return mrml.imageFromVolumeNode(node).affine


def test_a_result_lands_under_the_subject_with_every_piece(headless, completed, segmenter, tmp_path):
    scene = headless.scene
    subject, result = completed
    loaded = mrml.loadSubjectIntoScene(subject, scene)
    sceneSubject = mrml.subjectFromVolumes(loaded.volumeNodes, subject.subject_id, scene)
    placed = results.placeResult(result, scene, subject=sceneSubject, segmenter=segmenter)

    # generated mean volume: the nearest real scan's exact geometry, the result's voxels
    (mean,) = placed.volumeNodes
    reference = subject.get(8.91 if abs(8.91 - AGE) < abs(6.03 - AGE) else 6.03, "T1w")
    expected = result.image("mean", AGE)
    assert np.allclose(_geometry(mean), expected.affine, atol=1e-12)
    assert np.allclose(_geometry(mean), reference.image.affine, atol=1e-9)
    assert np.allclose(mrml.imageFromVolumeNode(mean).array, expected.array)
    assert mean.GetAttribute(results.GENERATED_ATTRIBUTE) == "1"
    assert float(mean.GetAttribute(mrml.AGE_ATTRIBUTE)) == AGE

    # uncertainty map with a colour table
    (std,) = placed.uncertaintyNodes
    assert std.GetDisplayNode().GetColorNodeID() == results.UNCERTAINTY_COLOR_NODE_ID
    assert mrml.imageFromVolumeNode(std).array.max() > 0

    # segmentation of the generated volume, reference geometry from it
    segmentation = placed.segmentationNodes[mean.GetID()]
    role = segmentation.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role) is mean
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["CSF", "grey matter", "white matter"]

    # everything under the subject's item, in one folder
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(placed.folderItemId) == loaded.subjectItemId
    for node in [mean, std, segmentation, placed.chartNode, *placed.tableNodes.values()]:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == placed.folderItemId

    # the timeline: sequence + browser; selecting an item updates the proxy
    timeline = next(s for s in placed.sequences if s.name.endswith("timeline"))
    assert timeline.volumeSequence.GetNumberOfDataNodes() == 8
    assert timeline.segmentationSequence.GetNumberOfDataNodes() == 8
    assert timeline.volumeSequence.GetIndexUnit() == "months"
    assert timeline.browser.IsSynchronizedSequenceNode(timeline.segmentationSequence, True)
    proxy = timeline.proxyVolume()
    generatedIndex = timeline.generated.index(True)
    results.selectFrame(timeline.browser, generatedIndex)
    assert np.allclose(mrml.imageFromVolumeNode(proxy).array, expected.array)
    results.selectFrame(timeline.browser, 0)
    first = subject.get(subject.ages()[0], "T1w").image
    assert np.allclose(mrml.imageFromVolumeNode(timeline.proxyVolume()).array, first.array)
    proxySegmentation = timeline.proxySegmentation()
    assert proxySegmentation.GetSegmentation().GetNumberOfSegments() >= 2
    assert proxySegmentation.GetSegmentation().GetSegment("white matter") is not None  # same IDs every frame

    # visibility and opacity of every overlay
    assert results.setSegmentationDisplay(placed, visible=False, opacity=0.3) == 2
    assert not proxySegmentation.GetDisplayNode().GetVisibility()
    assert proxySegmentation.GetDisplayNode().GetOpacity2DOutline() == pytest.approx(0.3)

    # tissue volumes: real and generated tables, a chart with both kinds per tissue
    real, generated = placed.tableNodes["real"], placed.tableNodes["generated"]
    assert list(slicer.util.arrayFromTableColumn(real, "Age (months)")) == pytest.approx(subject.ages())
    assert list(slicer.util.arrayFromTableColumn(generated, "Age (months)")) == [AGE]
    assert slicer.util.arrayFromTableColumn(generated, "white matter (ml)")[0] > 0
    chart = placed.chartNode
    assert chart.GetNumberOfPlotSeriesNodes() == 6
    kinds = {chart.GetNthPlotSeriesNode(i).GetAttribute(results.GENERATED_ATTRIBUTE) for i in range(6)}
    assert kinds == {"0", "1"}

    # the scene as .mrb reloads with volumes, sequences, browser, segmentations, tables and chart
    bundle = mrml.sceneToMrb(scene, tmp_path / "result.mrb")
    other = mrml_harness.bootstrapScene()
    try:
        mrml.mrbToScene(bundle, other.scene)

        def named(name):
            return other.scene.GetFirstNodeByName(name)

        again = named(mean.GetName())
        assert np.allclose(mrml.imageFromVolumeNode(again).array, expected.array, atol=1e-5)
        assert np.allclose(_geometry(again), expected.affine, atol=1e-9)
        browser = named(timeline.browser.GetName())
        assert browser.GetNumberOfItems() == 8
        sequence = named(timeline.volumeSequence.GetName())
        segmentations = named(timeline.segmentationSequence.GetName())
        assert browser.IsSynchronizedSequenceNode(segmentations, True)
        browser.SetSelectedItemNumber(generatedIndex)
        assert np.allclose(mrml.imageFromVolumeNode(browser.GetProxyNode(sequence)).array, expected.array, atol=1e-5)
        assert browser.GetProxyNode(segmentations).GetSegmentation().GetNumberOfSegments() >= 2
        assert named(segmentation.GetName()).GetSegmentation().GetNumberOfSegments() == 3
        assert named(chart.GetName()).GetNumberOfPlotSeriesNodes() == 6
        assert slicer.util.arrayFromTableColumn(named(real.GetName()), "Age (months)").size == 7
    finally:
        other.close()
        slicer.mrmlScene = scene


def test_a_failing_placement_leaves_nothing(headless, completed, segmenter):
    scene = headless.scene
    subject, result = completed
    mrml.loadSubjectIntoScene(subject, scene)
    nodes, items = scene.GetNumberOfNodes(), mrml_harness.shItemCount(scene)
    calls = []

    def failing(image):
        calls.append(image)
        if len(calls) > 3:
            raise RuntimeError("segmenter broke")
        return segmenter(image)

    placed = results.placeResult(result, scene, subject=subject, segmenter=segmenter)
    assert placed.chartNode is not None and len(results.resultNodeIds(scene)) > 10
    placed.remove(scene)  # removing a result leaves the subject as it was loaded
    assert results.resultNodeIds(scene) == []
    assert scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(scene) == items

    failing.classes = segmenter.classes
    with pytest.raises(RuntimeError, match="segmenter broke"):
        results.placeResult(result, scene, subject=subject, segmenter=failing)
    assert scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(scene) == items

    def cancel():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        results.placeResult(result, scene, subject=subject, checkCancel=cancel)
    assert scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(scene) == items


def test_frames_with_their_own_labels_and_the_scene_export(cohort, tmp_path):
    """DDM frames of the heart phantom carry the source's labels; exportScene writes a .mrb."""
    from LongitudinalDiffusionLib.demo.heart import HEART_LABELS

    cine = cohort / "cardiac" / "sub-heart01" / "cine"
    rows = [line.split("\t") for line in (cine / "manifest.tsv").read_text().splitlines()[1:]]
    result = interpolate_frames(
        cine / rows[0][0], cine / rows[-1][0], 3, "ddm-demo", source_labels=cine / rows[0][3], steps=2, device="cpu"
    )
    bundle = results.exportScene(tmp_path / "frames.mrb", [result], labelNames=HEART_LABELS)
    app = mrml_harness.bootstrapScene()
    try:
        mrml.mrbToScene(bundle, app.scene)
        browser = app.scene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
        assert browser.GetNumberOfItems() == 3
        segmentations = next(
            n
            for n in (app.scene.GetNthNode(i) for i in range(app.scene.GetNumberOfNodes()))
            if n.IsA("vtkMRMLSequenceNode") and n.GetName().endswith("segmentations")
        )
        assert browser.IsSynchronizedSequenceNode(segmentations, True)
        browser.SetSelectedItemNumber(2)
        names = browser.GetProxyNode(segmentations).GetSegmentation()
        assert {names.GetNthSegment(i).GetName() for i in range(names.GetNumberOfSegments())} <= set(
            HEART_LABELS.values()
        )
        assert app.scene.GetFirstNodeByClass("vtkMRMLPlotChartNode") is None  # nothing to measure by age
    finally:
        app.close()


def test_the_command_line_writes_a_scene(cohort, tmp_path, capsys):
    """`longdiff_scene.py complete-ages ... --scene out.mrb` (longdiff with the module's scene export):
    the bundle reloads with the subject and the result; plain `longdiff --scene` says where it went."""
    from longdiff_scene import main

    from LongitudinalDiffusionLib import cli

    bundle = tmp_path / "scene.mrb"
    argv = ["-q", "complete-ages", str(cohort / "sub-001"), "--ages", "7.5", "--model", "cas-diffcom-demo"]
    assert main([*argv, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "gen"), "--scene", str(bundle)]) == 0
    app = mrml_harness.bootstrapScene()
    try:
        mrml.mrbToScene(bundle, app.scene)
        assert len(mrml.subjectVolumes(app.scene)) == 28 + 1  # the subject's scans and the generated volume
        assert app.scene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode").GetNumberOfItems() == 8
        assert app.scene.GetFirstNodeByClass("vtkMRMLPlotChartNode").GetNumberOfPlotSeriesNodes() == 6
    finally:
        app.close()
    assert main([*argv, "--out", str(tmp_path / "gen2"), "--scene", str(tmp_path / "scene.zip")]) == 2
    assert not (tmp_path / "gen2").exists()
    assert cli.main([*argv, "--out", str(tmp_path / "gen3"), "--scene", str(tmp_path / "other.mrb")]) == 2
    assert not (tmp_path / "gen3").exists() and not (tmp_path / "other.mrb").exists()
    assert "longdiff_scene.py" in capsys.readouterr().err


def test_the_scripting_example_in_docs_slicer_md_runs(cohort, headless):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "slicer.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace = {"folder": cohort / "sub-001"}
    exec(compile(block, "docs/slicer.md", "exec"), namespace)  # our own documentation
    placed, frame = namespace["placed"], namespace["frame"]
    assert placed.sequences[0].browser.GetSelectedItemNumber() == 3
    assert frame is placed.sequences[0].proxyVolume() and placed.uncertaintyNodes
    namespace["logic"].close()


def test_the_preprocessing_transforms_come_back_with_the_result_and_become_transform_nodes(
    headless, completed, tmp_path
):
    """A result saved with its preprocessing transforms (ITK files, LPS) reads back with them,
    and each becomes a linear transform node that maps the input's points onto the model's
    space: the inverse of the saved model-to-input matrix, in RAS."""
    import dataclasses

    from LongitudinalDiffusionLib.preprocess import SavedTransform
    from LongitudinalDiffusionLib.tasks import Result

    _subject, result = completed
    angle = np.deg2rad(10.0)
    model_to_input_lps = np.eye(4)
    model_to_input_lps[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    model_to_input_lps[:3, 3] = [15.0, -4.0, 2.5]
    saved = dataclasses.replace(result, transforms=[SavedTransform("sub-001_ses-03_T1w", model_to_input_lps)])
    folder = tmp_path / "with-transforms"
    saved.save(folder)
    assert (folder / "transforms" / "sub-001_ses-03_T1w.tfm").is_file()
    loaded = Result.load(folder)
    assert [t.name for t in loaded.transforms] == ["sub-001_ses-03_T1w"]
    assert np.allclose(loaded.transforms[0].matrix_lps, model_to_input_lps, atol=1e-9)

    placed = results.placeResult(loaded, headless.scene)
    (node,) = placed.transformNodes
    assert node.GetName() == "sub-001_ses-03_T1w (preprocessing)"
    to_parent = vtk_matrix_to_numpy(node)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    input_point_ras = np.array([10.0, 20.0, 30.0, 1.0])
    # the input point, moved to the model's space, comes back through the saved matrix
    model_point_ras = to_parent @ input_point_ras
    assert np.allclose(flip @ model_to_input_lps @ flip @ model_point_ras, input_point_ras, atol=1e-6)
    placed.remove(headless.scene)
    assert headless.scene.GetNodeByID(node.GetID()) is None


def vtk_matrix_to_numpy(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
