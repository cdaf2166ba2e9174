"""The full demo (``longdiff demo``'s second half) on a small cohort with tiny untrained models:
every task runs, every result and figure is written, and the figures are pictures."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from LongitudinalDiffusionLib.catalog import create_untrained
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.demo.showcase import DEMO_MODELS, run_showcase

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("showcase")
    cohort = root / "cohort"
    write_cohort(cohort, CohortSpec(n_subjects=2, seed=1, shape=(24, 30, 24), spacing=(6.0, 6.0, 6.0)), jobs=1)
    folder = root / "models"
    models = {
        "complete-ages": create_untrained("cas-diffcom", folder, scale="tiny"),
        "synthesize-modality": create_untrained("cwdm", folder, scale="tiny"),
        "interpolate": create_untrained("ddm", folder, scale="tiny"),
        "segment-brain": create_untrained("tissue-seg", folder, scale="tiny"),
    }
    return cohort, root / "out", models


def test_the_demo_runs_every_task_and_draws_it(setup):
    cohort, out, models = setup
    assert set(models) == set(DEMO_MODELS)
    events = []
    show = run_showcase(cohort, out, models=models, progress=events.append)
    assert set(show.results) == {"missing-age", "missing-modality", "frames"}
    for folder in show.results.values():
        summary = json.loads((folder / "result.json").read_text())
        assert summary["images"] and summary["provenance"]["model"].endswith("untrained")
    assert set(show.figures) == {"missing-age", "missing-modality", "frames", "tissue-volumes"}
    for png in show.figures.values():
        picture = matplotlib.image.imread(png)
        assert picture.shape[0] > 200 and picture[..., :3].std() > 0.05, png
    stages = {e.stage for e in events}
    assert "segment" in stages and any("generate" in s for s in stages) and "interpolate" in stages
    assert len(show.lines) == 4
