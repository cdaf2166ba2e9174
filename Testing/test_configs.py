"""Typed method configurations: the JSON of every bundled model card and training config reads
into its method's frozen dataclass and writes back key for key; bad keys are named; and the
grids and parameter counts each method's docstring states are what the code builds."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from LongitudinalDiffusionLib import models
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.models.config import Prediction

ROOT = Path(__file__).resolve().parent.parent
CARDS = sorted((ROOT / "Resources" / "Models").glob("*.json"))
TRAINING = sorted((ROOT / "training" / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.name)
def test_every_bundled_card_round_trips_through_its_config_class(path):
    card = json.loads(path.read_text(encoding="utf-8"))
    cls = models.config_class(card["method"])
    typed = cls.from_dict(card["config"])
    assert dataclasses.is_dataclass(typed) and typed.to_dict() == card["config"]
    assert cls.from_dict(typed.to_dict()) == typed
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.network = None


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_every_training_config_round_trips_and_builds_from_the_dataclass(path):
    from training.train import model_config

    spec = json.loads(path.read_text(encoding="utf-8"))
    config = model_config(spec["method"], spec["scale"], spec["model"])
    typed = models.config_class(spec["method"]).from_dict(config)
    assert typed.to_dict() == config


@pytest.mark.parametrize("method", list(models.METHODS))
def test_default_configs_round_trip_and_build_takes_the_dataclass(method):
    for scale in models.SCALES:
        config = models.default_config(method, scale)
        typed = models.config_class(method).from_dict(config)
        assert typed.to_dict() == config
    tiny = models.config_class(method).from_dict(models.default_config(method, "tiny"))
    a, b = models.build(method, tiny), models.build(method, tiny.to_dict())
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]


def test_unknown_and_missing_keys_and_bad_options_are_named():
    cls = models.config_class("interval")
    config = models.default_config("interval", "tiny")
    with pytest.raises(InputError, match="unknown key.*chanels"):
        cls.from_dict({**config, "network": {**config["network"], "chanels": [8, 16]}})
    with pytest.raises(InputError, match="prediction.*'x0'|'x0'.*Prediction"):
        cls.from_dict({**config, "prediction": "x0"})
    cas = models.default_config("cas-diffcom", "tiny")
    with pytest.raises(InputError, match="missing key 'channels'"):
        models.build("cas-diffcom", {**cas, "network": {**cas["network"], "generator": {"groups": 4}}})
    with pytest.raises(InputError, match="twice image_size"):
        models.config_class("cas-diffcom").from_dict({**cas, "sr_image_size": [8, 8, 8]})
    assert models.config_class("ddm").from_dict(models.default_config("ddm", "tiny")).prediction is Prediction.EPSILON


# -- the figures the docstrings state -----------------------------------------------------------
_LINE = re.compile(r"^\s*- (paper|demo|tiny): (.*M parameters)\s*$", re.M)


def _docstring(method: str) -> str:
    module = models.method_module(method)
    return (module.__doc__ or "") + (module.default_config.__doc__ or "")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _same(stated: str, actual: int) -> bool:
    """``stated`` millions (as written, e.g. "0.57") equal ``actual`` rounded to as many decimals."""
    decimals = len(stated.split(".")[1]) if "." in stated else 0
    return f"{actual / 1e6:.{decimals}f}" == stated


@pytest.mark.parametrize("method", list(models.METHODS))
def test_the_docstring_figures_are_what_the_code_builds(method):
    lines = dict(_LINE.findall(_docstring(method)))
    assert set(lines) == set(models.SCALES), f"{method}: one '- scale: ... M parameters' line per scale"
    for scale, text in lines.items():
        config = models.default_config(method, scale)
        grids = [[int(v) for v in g.split("x")] for g in re.findall(r"\b(\d+x\d+x\d+)\b", text)]
        assert grids == [config["image_size"]] + ([config["sr_image_size"]] if "sr_image_size" in config else [])
        mm = [float(v) for v in re.findall(r"\b([\d.]+) mm\b", text)]
        spacings = [config.get("spacing_mm"), config.get("sr_spacing_mm")]
        assert mm == [s[0] for s in spacings if s][: len(mm)], f"{method} {scale}: {text}"
        frames = re.search(r"(\d+) frames", text)
        assert frames is None or int(frames.group(1)) == config["max_frames"]
        with torch.device("meta"):
            net = models.build(method, config) if method != "ddm" or scale == "tiny" else None
        if net is None:  # DDM's orthogonal init needs real tensors (the network is small)
            net = models.build(method, config)
        counts = re.findall(r"([\d.]+) M", text)
        if method == "cas-diffcom":
            assert _same(counts[0], _count(net.generator)) and _same(counts[1], _count(net.refiner)), text
        else:
            assert len(counts) == 1 and _same(counts[0], _count(net)), f"{method} {scale}: {text}: {_count(net)}"


def test_python39_field_types_are_never_evaluated():
    """Dataclass annotations stay strings (``from __future__ import annotations``): 3.9 runs them."""
    for method in models.METHODS:
        module = models.method_module(method)
        assert "annotations" in vars(module) or importlib.import_module(module.__name__).__dict__.get("annotations")
        for field in dataclasses.fields(module.CONFIG):
            assert isinstance(field.type, str)


def test_a_training_config_with_a_misspelt_model_key_is_refused_before_any_data_is_read():
    from training.train import resolve_config

    with pytest.raises(InputError, match=r"run\.json \(model\).*unknown key\(s\) residul"):
        resolve_config({"method": "interval", "scale": "tiny", "model": {"residul": True}}, "run.json")
