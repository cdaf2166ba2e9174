"""The run config of ``python -m training.train``: defaults, checks and the method config.

:data:`TRAIN_DEFAULTS`, :data:`DATA_DEFAULTS` and :data:`EXPORT_DEFAULTS` list every key; an
unknown key is an error (a typo must not silently fall back to a default). See the module
docstring of ``training/train.py`` for the format.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib import models
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: every key of a config's "train" section, with its default
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,  # optimiser steps (per stage unless the stage says otherwise)
    "batch_size": 1,  # items per step and process
    "lr": None,  # None: the method config's optimizer.lr, else 1e-4
    "weight_decay": 0.0,  # AdamW; 0 is Adam
    "betas": [0.9, 0.999],
    "ema_decay": 0.999,
    "grad_clip": 1.0,  # max global gradient L2 norm; None: no clipping
    "amp": True,  # float16 autocast + gradient scaling, on CUDA only
    "deterministic": False,  # deterministic GPU kernels (slower)
    "val_every": 500,  # steps; 0 or None: only at the end
    "val_cases": 4,
    "val_sampler_steps": 10,
    "ckpt_every": 500,
    "keep_checkpoints": 2,
    "log_every": 50,
    "seed": 0,
    "time_budget_s": None,
    "stages": None,  # None: the method's STAGES with "steps" each; or ["generator", {"name": ..., "steps": ...}]
    # a catalog model (name or card path) of the same method and architecture whose weights
    # start the run (fine-tuning); None: random initial weights
    "init_from": None,
}
DATA_DEFAULTS: dict[str, Any] = {
    "root": None,  # the dataset folder (relative paths: from the working directory)
    "n_val": None,  # held-out subjects (hearts for DDM); None: 2 subjects / 1 heart
    "workers": 0,  # DataLoader worker processes
    # the untouched test subjects (and hearts) recorded in the card's "splits", e.g. those
    # `python -m training.test_sets` writes; evaluation scores a model on them only
    "test": None,
}
EXPORT_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "name": None,  # None: "<method>-<scale>"
    "folder": None,  # None: "<run folder>/model"
    "description": "",
    "version": "1",
    "trained_on": {},  # merged over {"dataset", "subjects", "simulated"} read from the data
}
STAGE_KEYS = ("name", "steps", "batch_size", "lr")
TOP_KEYS = ("method", "scale", "model", "data", "train", "export", "notes")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for nested dicts."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_config(method: str, scale: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method config at ``scale`` with ``overrides`` merged in.

    Overrides naming an argument of the method's ``default_config`` (cWDM's ``target`` and
    ``any_missing``, the tissue model's ``anatomy``) are passed to it, so everything derived
    from them (the condition list, the input channels, the classes, the grid) follows.
    """
    overrides = dict(overrides or {})
    module = models.method_module(method)
    if scale not in models.SCALES:
        raise LongitudinalDiffusionError(f"unknown scale '{scale}' (expected one of {', '.join(models.SCALES)})")
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p.name for p in inspect.signature(module.default_config).parameters.values() if p.kind in named][1:]
    kwargs = {k: overrides.pop(k) for k in params if k in overrides}
    return _merge(module.default_config(scale, **kwargs), overrides)


def _check_keys(section: dict[str, Any], known: Any, where: str, source: Any) -> None:
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise InputError(source, f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(known)})")


def _number(value: Any, name: str, source: Any, *, minimum: float, integer: bool = False, allow_none=False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise InputError(source, f"{name} must be {kind} >= {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def resolve_config(raw: dict[str, Any], source: Any = "config", *, method: str | None = None) -> dict[str, Any]:
    """A complete, checked run config: defaults filled in, the method config resolved.

    Args:
        raw: the config as read from its JSON file.
        source: where it came from (for error messages).
        method: the method asked for on the command line (must agree with the config's).
    """
    if not isinstance(raw, dict):
        raise InputError(source, "a training config must be a JSON object")
    _check_keys(raw, TOP_KEYS, "the config", source)
    name = raw.get("method") or method
    if method and raw.get("method") and raw["method"] != method:
        raise InputError(source, f"the config is for method '{raw['method']}', not '{method}'")
    if name not in models.METHODS:
        raise InputError(source, f"unknown or missing method {name!r} (known: {', '.join(models.METHODS)})")
    scale = raw.get("scale", "demo")
    if scale not in models.SCALES:
        raise InputError(source, f"unknown scale {scale!r} (expected one of {', '.join(models.SCALES)})")
    for key in ("model", "data", "train", "export"):
        if not isinstance(raw.get(key, {}), dict):
            raise InputError(source, f"'{key}' must be a JSON object")
    _check_keys(raw.get("data", {}), DATA_DEFAULTS, "data", source)
    _check_keys(raw.get("train", {}), TRAIN_DEFAULTS, "train", source)
    _check_keys(raw.get("export", {}), EXPORT_DEFAULTS, "export", source)
    try:
        mcfg = model_config(name, scale, raw.get("model"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(source, f"cannot make the {name} model config ({exc})") from exc
    # the method's typed config names a misspelt or missing key before any data is read
    models.config_class(name).from_dict(mcfg, f"{source} (model)")

    train = {**TRAIN_DEFAULTS, **raw.get("train", {})}
    train["steps"] = _number(train["steps"], "train.steps", source, minimum=1, integer=True)
    train["batch_size"] = _number(train["batch_size"], "train.batch_size", source, minimum=1, integer=True)
    if train["lr"] is None:
        train["lr"] = float((mcfg.get("optimizer") or {}).get("lr", 1e-4))
    train["lr"] = _number(train["lr"], "train.lr", source, minimum=0)
    train["weight_decay"] = _number(train["weight_decay"], "train.weight_decay", source, minimum=0)
    train["ema_decay"] = _number(train["ema_decay"], "train.ema_decay", source, minimum=0)
    if train["ema_decay"] >= 1:
        raise InputError(source, f"train.ema_decay must be below 1, got {train['ema_decay']}")
    train["grad_clip"] = _number(train["grad_clip"], "train.grad_clip", source, minimum=0, allow_none=True)
    for key in ("val_every", "ckpt_every", "log_every"):
        train[key] = _number(train[key] or 0, f"train.{key}", source, minimum=0, integer=True)
    for key in ("val_cases", "val_sampler_steps", "keep_checkpoints"):
        train[key] = _number(train[key], f"train.{key}", source, minimum=1, integer=True)
    train["seed"] = _number(train["seed"], "train.seed", source, minimum=0, integer=True)
    train["time_budget_s"] = _number(train["time_budget_s"], "train.time_budget_s", source, minimum=0, allow_none=True)
    train["stages"] = _stages(name, train, source)

    data = {**DATA_DEFAULTS, **raw.get("data", {})}
    if data["n_val"] is not None:
        data["n_val"] = _number(data["n_val"], "data.n_val", source, minimum=1, integer=True)
    data["workers"] = _number(data["workers"], "data.workers", source, minimum=0, integer=True)
    if data["test"] is not None and not (
        isinstance(data["test"], list) and all(isinstance(i, str) and i.startswith("sub-") for i in data["test"])
    ):
        raise InputError(source, f"data.test must be a list of subject ids ('sub-...'), got {data['test']!r}")
    export = _merge(EXPORT_DEFAULTS, raw.get("export", {}))
    export["name"] = export["name"] or f"{name}-{scale}"
    return {
        "method": name,
        "scale": scale,
        "model": mcfg,
        "data": data,
        "train": train,
        "export": export,
        "notes": raw.get("notes", ""),
    }


def _stages(method: str, train: dict[str, Any], source: Any) -> list[dict[str, Any]]:
    """The stages to train, in order: ``{"name", "steps", "batch_size", "lr"}`` each."""
    known = tuple(getattr(models.method_module(method), "STAGES", ()) or ())
    given = train["stages"] if train["stages"] is not None else (list(known) or [None])
    if not isinstance(given, list) or not given:
        raise InputError(source, "train.stages must be a non-empty list")
    out = []
    for entry in given:
        entry = {"name": entry} if entry is None or isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise InputError(source, f"a stage must be a name or an object, got {entry!r}")
        _check_keys(entry, STAGE_KEYS, "a stage", source)
        name = entry.get("name")
        if (name is None) != (not known) or (name is not None and name not in known):
            expected = ", ".join(known) if known else "none (this method trains in one stage)"
            raise InputError(source, f"unknown stage {name!r} for {method} (stages: {expected})")
        stage = {"name": name, "steps": train["steps"], "batch_size": train["batch_size"], "lr": train["lr"], **entry}
        stage["steps"] = _number(stage["steps"], f"steps of stage {name}", source, minimum=1, integer=True)
        stage["batch_size"] = _number(stage["batch_size"], f"batch_size of stage {name}", source, minimum=1,
                                      integer=True)  # fmt: skip
        stage["lr"] = _number(stage["lr"], f"lr of stage {name}", source, minimum=0)
        out.append(stage)
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise InputError(source, f"a stage is listed twice: {names}")
    return out


def load_config(spec: str | os.PathLike, method: str | None = None) -> tuple[dict[str, Any], Path]:
    """Read and resolve a config: a JSON file, or a name (``demo``, ``paper``) of a bundled one."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        if not method:
            raise InputError(spec, "a config name needs --method (or give the path of a JSON file)")
        path = CONFIG_DIR / f"{method}-{spec}.json"
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    return resolve_config(raw, path, method=method), path
