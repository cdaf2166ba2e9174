"""How much of a test set survives a model's grid: the evaluation's bound, without running a model.

``python -m training.grid_ceiling --data testsets/4mm --model sadm=sadm-demo ...`` takes, for
every case the evaluation scores (hidden ages, hidden contrasts, interior cine frames, scans
with labels), the hidden truth onto the grid the model's output is made on and back onto the
scan's voxels (labels by nearest neighbour), and prints the mean PSNR (and Dice) per model: what
a perfect model of that grid would score. It reads no model weights and runs no network, so it
may be run on a test set without spending it; ``training.evaluate`` reports the same bound
(``model grid ceiling``) beside every model it scores.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from LongitudinalDiffusionLib.catalog import resolve_card
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.models import method_task
from LongitudinalDiffusionLib.subject import Modality, load_bids_subject, parse_modality

from . import baselines as bl
from . import evaluate as ev
from .data import open_cohort


def _grid(card: dict[str, Any]) -> dict[str, Any]:
    return card.get("sr_grid") or card["grid"]


def _modality(card: dict[str, Any]) -> Modality:
    return parse_modality((card.get("modalities") or ["T1w"])[0])


def ceiling_cases(root: Path, method: str, card: dict[str, Any], ids: list[str]) -> list[ev.Case]:
    """The bound on every case ``training.evaluate`` would score for ``method`` on ``ids``."""
    cohort = open_cohort(root)
    task, grid, cases = method_task(method), _grid(card), []
    if task == "interpolate":
        for hid in (i for i in ids if i in cohort.hearts):
            frames = cohort.heart_frames(hid)
            for k, frame in enumerate(frames[1:-1], start=1):
                case = ev.Case(hid, f"frame {k}")
                labels = None if frame.labels is None else load_image(frame.labels, dtype=np.int16)
                case.add_ceiling(grid, load_image(frame.image), labels)
                cases.append(case)
        return cases
    for sid in (i for i in ids if i in cohort.subjects):
        subject = load_bids_subject(root / sid)
        if task == "complete-ages":
            hidden = ev.age_cases(subject, _modality(card))
        elif task == "synthesize-modality":
            hidden = [tp for tp, _ in ev.modality_cases(subject, card.get("config") or {})]
        else:  # segmentation: the labels through the grid, placed by their image (the model's contrast)
            contrast = Modality((card.get("config") or {}).get("modality") or "T1w")
            hidden = [tp for tp in subject.timepoints if tp.modality == contrast and tp.labels is not None]
        for tp in hidden:
            case = ev.Case(sid, f"{tp.modality.value} at {tp.age:.2f} mo")
            if task == "segment":
                from LongitudinalDiffusionLib.segmentation import map_labels

                truth = load_image(tp.labels, dtype=np.int16)
                mapped = map_labels(truth.array, (card.get("config") or {}).get("anatomy", "brain"))
                case.add_ceiling(grid, bl.image_of(tp), Image(mapped.astype(np.int16), truth.affine))
                case.scores[ev.GRID_CEILING] = {"dice": case.scores[ev.GRID_CEILING]["dice"]}
            else:
                case.add_ceiling(grid, bl.image_of(tp))
            cases.append(case)
    return cases


def summary(cases: list[ev.Case]) -> dict[str, float]:
    """Mean of each metric of the bound over the cases (PSNR infinite when every case is exact)."""
    out = {}
    for metric in ev.METRICS:
        values = [c.scores[ev.GRID_CEILING][metric] for c in cases if metric in c.scores.get(ev.GRID_CEILING, {})]
        if values:
            out[metric] = float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.inf
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.grid_ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, nargs="+", help="cohort folder(s), e.g. testsets/4mm")
    parser.add_argument("--model", action="append", type=ev._model_arg, required=True, metavar="METHOD=NAME")
    parser.add_argument("--held-out", nargs="*", default=None, help="ids (default: the cards' test split)")
    args = parser.parse_args(argv)
    print("| set | method | model | cases | ceiling PSNR (dB) | ceiling Dice |")
    print("|---|---|---|---:|---:|---:|")
    for data in args.data:
        root = Path(data)
        for method, name in args.model:
            card = resolve_card(name).card
            ids = args.held_out or (card.get("splits") or {}).get("test") or []
            cases = ceiling_cases(root, method, card, ids)
            means = summary(cases)
            psnr = means.get("psnr")
            cells = ["exact" if psnr == math.inf else "-" if psnr is None else f"{psnr:.2f}"]
            cells.append(f"{means['dice']:.3f}" if "dice" in means else "-")
            print(f"| {root.name} | {method} | `{name}` | {len(cases)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
