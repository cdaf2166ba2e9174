"""The model card of a training run (catalog format): what was trained, on what, and how well."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from LongitudinalDiffusionLib import catalog, models
from LongitudinalDiffusionLib.subject import parse_modality

from . import data as tdata
from .validation import PREDICTORS

if TYPE_CHECKING:
    from .train import Trainer


def model_card(trainer: Trainer, stopped: str = "completed") -> dict[str, Any]:
    """The card of ``trainer``'s EMA network: modalities and ages of its training subjects, the
    dataset, the latest validation scores, the splits and how the run went (``stopped``)."""
    method, cfg, exp = trainer.method, trainer.mcfg, trainer.config["export"]
    if method == "cwdm":
        modalities = list(cfg["modalities"])
    elif trainer.hearts:
        modalities = []
    else:
        modalities = [parse_modality(cfg.get("modality") or (cfg.get("modalities") or ["T1w"])[0]).value]
    ages = None
    if not trainer.hearts:
        found = [
            tp.age
            for sid in trainer.train_ids
            for tp in trainer.cohort.subject(sid).timepoints
            if tp.modality.value in modalities
        ]
        ages = (min(found), max(found)) if found else None
    description_file = trainer.cohort.root / "dataset_description.json"
    described = json.loads(description_file.read_text(encoding="utf-8")) if description_file.is_file() else {}
    trained_on = {
        "dataset": described.get("Name") or trainer.cohort.root.name,
        "subjects": len(trainer.train_ids),
        "simulated": bool(described.get("Simulated", False)),
        **exp["trained_on"],
    }
    metrics = dict(trainer.metrics)
    if len(trainer.stages) == 1:
        metrics = metrics.get(trainer.stages[0].label, {})
    kind = ("heart" if trainer.hearts else "subject") + ("s" if len(trainer.val_ids) > 1 else "")
    sampled = cfg.get("sampler") is not None and trainer.method in PREDICTORS
    sampler = f", sampled with DDIM {trainer.tcfg['val_sampler_steps']} steps" if sampled else ""
    metrics = {**metrics, "validation": f"EMA weights on {len(trainer.val_ids)} held-out {kind}{sampler}"}
    description = exp["description"] or (
        f"{models.paper_name(method)} trained at {trainer.config['scale']} scale on {trained_on['dataset']}"
    )
    card = catalog.new_card(exp["name"], method, cfg, grid=trainer.grid, modalities=modalities, age_range=ages,
                            trained_on=trained_on, description=description, version=str(exp["version"]),
                            metrics=metrics)  # fmt: skip
    if "sr_image_size" in cfg:
        card["sr_grid"] = models.default_grid(method, cfg, "sr_image_size")
    card["splits"] = tdata.card_splits(
        trainer.cohort,
        trainer.train_ids,
        trainer.val_ids,
        trainer.config["data"]["test"],
        dataset=trained_on["dataset"],
    )
    card["training"] = {
        "steps": trainer.step,
        "stages": [{"name": s.label, "steps": s.steps, "batch_size": s.batch_size, "lr": s.lr} for s in trainer.stages],
        "processes": trainer.procs.world,
        "time_s": round(trainer.elapsed(), 1),
        "stopped": stopped,
        "ema_decay": trainer.tcfg["ema_decay"],
        "config": trainer.config_file.name if trainer.config_file else None,
    }
    return card
