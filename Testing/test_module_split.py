"""The rooms split out of subject.py and tasks.py: every name other code imports from the old
module is still there and is the very object of the module that now holds it, so old imports
and ``isinstance`` checks across them keep working."""

from __future__ import annotations

import importlib

import pytest

from LongitudinalDiffusionLib import subject

#: public name -> the module that holds it now
SUBJECT_NAMES = {
    "AGE_UNITS": "ages",
    "MAX_AGE_MONTHS": "ages",
    "parse_age": "ages",
    "parse_age_unit": "ages",
    "Modality": "modality",
    "parse_modality": "modality",
    "Subject": "timepoints",
    "Timepoint": "timepoints",
    "MANIFEST_NAME": "manifest",
    "load_manifest": "manifest",
    "bids_modality": "bids",
    "bids_suffix": "bids",
    "parse_bids_name": "bids",
    "load_bids_subject": "bids",
    "Provenance": "provenance",
    "save_result": "provenance",
    "load_provenance": "provenance",
}


@pytest.mark.parametrize("name", sorted(SUBJECT_NAMES))
def test_subject_re_exports_each_public_name_from_its_module(name):
    home = importlib.import_module(f"LongitudinalDiffusionLib.{SUBJECT_NAMES[name]}")
    assert getattr(subject, name) is getattr(home, name)


def test_subject_all_lists_only_names_it_has():
    assert set(subject.__all__) <= set(SUBJECT_NAMES) | {"load_subject"}
    assert all(hasattr(subject, name) for name in subject.__all__)


def test_tasks_re_exports_the_result_classes():
    pytest.importorskip("torch")
    from LongitudinalDiffusionLib import result, tasks

    for name in ("Result", "ResultImage", "FrameSeries", "SAME_AGE"):
        assert getattr(tasks, name) is getattr(result, name)
    assert set(tasks.__all__) >= {"Result", "RunOptions", "complete_ages", "synthesize_modality", "interpolate_frames"}
