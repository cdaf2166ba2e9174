"""Where models are found: bundled, per-user and site folders of model cards.

A model is a card (``<name>.json``: method, grid, modalities, training data, ...) next to
its weights. This module only discovers cards and reports where it looked; loading and
loading (:func:`load_model`) checks the weights' sha256, reads them with safetensors
(never pickle) and builds the card's architecture, which must match key for key.

Search order (first match of a name wins):

1. folders in the ``LONGDIFF_MODELS`` environment variable (``os.pathsep``-separated),
2. the user's folder, ``~/.longdiff/models``,
3. the models bundled with the extension, ``Resources/Models`` beside the library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, ModelNotFound

log = logging.getLogger(__name__)

ENV_VAR = "LONGDIFF_MODELS"
USER_DIR = Path("~/.longdiff/models")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"


@dataclass(frozen=True)
class ModelCard:
    """A model's card as found on disk."""

    name: str
    path: Path
    card: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.card.get("method", "?"))

    @property
    def simulated(self) -> bool:
        return bool((self.card.get("trained_on") or {}).get("simulated", False))

    @property
    def trained(self) -> bool:
        """Whether the card says what its weights learnt from (a non-empty ``trained_on``).

        A card with random weights (``trained_on`` null) is untrained; so is one without
        ``trained_on`` or with an empty one: weights of unknown origin are not presented as
        trained (the console lists them as UNTRAINED, the worker as ``"trained": false``).
        """
        trained_on = self.card.get("trained_on")
        return isinstance(trained_on, dict) and bool(trained_on)

    @property
    def what(self) -> str:
        """What the model makes, in a few words: ``FLAIR from T1w,T1ce,T2w`` (cWDM),
        ``T1w 0.15-24 mo`` (missing ages), ``frames`` (DDM)."""
        config = self.card.get("config") or {}
        if self.method == "cwdm":
            if config.get("any_missing"):
                return f"any of {','.join(config.get('modalities') or [])} from the others"
            return f"{config.get('target', '?')} from {','.join(config.get('conditions') or [])}"
        if self.method == "ddm":
            return "frames between two scans"
        mods = ",".join(self.card.get("modalities") or [])
        if self.method == "tissue-seg":
            mods = f"tissue labels of {mods}"
        ages = self.card.get("age_range_months")
        span = f" {ages[0]:g}-{ages[1]:g} mo" if isinstance(ages, list) and len(ages) == 2 else ""
        return f"{mods}{span}".strip()


@dataclass(frozen=True)
class BrokenCard:
    """A card that cannot be used, and why (``longdiff models`` lists it as broken)."""

    name: str
    path: Path
    reason: str


_WARNED: set[tuple[str, str]] = set()


def search_paths() -> list[Path]:
    """The folders searched for model cards, in priority order."""
    paths = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    return paths + [USER_DIR.expanduser(), BUNDLED_DIR]


def scan_models() -> tuple[list[ModelCard], list[BrokenCard]]:
    """Every usable card (first occurrence of each name) and every broken one.

    A card that cannot be read (invalid JSON, not an object, no ``method``) affects only
    itself: it is skipped with a warning naming the file, and the other models stay usable.
    """
    found: dict[str, ModelCard] = {}
    broken: list[BrokenCard] = []
    for folder in search_paths():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                card = _read_card(path)
            except InputError as exc:
                broken.append(BrokenCard(path.stem, path, exc.problem))
                if (str(path), exc.problem) not in _WARNED:
                    _WARNED.add((str(path), exc.problem))
                    log.warning("%s: %s; this model is skipped, the others are not affected", path, exc.problem)
                continue
            found.setdefault(path.stem, ModelCard(path.stem, path, card))
    return list(found.values()), broken


def list_models() -> list[ModelCard]:
    """Every usable card found, first occurrence of each name only (broken cards are
    skipped with a warning: :func:`scan_models`)."""
    return scan_models()[0]


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"model card is not valid JSON ({exc})") from exc
    if not isinstance(card, dict) or not isinstance(card.get("method"), str):
        raise InputError(path, "model card has no 'method' field")
    return card


def find_model(name: str) -> ModelCard:
    """The card called ``name``; a clear error listing what exists when there is none."""
    models, broken = scan_models()
    for m in models:
        if m.name == name:
            return m
    for b in broken:
        if b.name == name:
            raise InputError(b.path, f"model '{name}' is broken: {b.reason}")
    raise ModelNotFound(name, [m.name for m in models], [str(p) for p in search_paths()])


# ----------------------------------------------------------------------------- weights

CARD_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_card(
    name: str,
    method: str,
    config: dict[str, Any],
    *,
    grid: dict[str, Any] | None = None,
    modalities: list[str] | None = None,
    age_range: tuple[float, float] | None = None,
    trained_on: dict[str, Any] | None = None,
    description: str = "",
    version: str = "0",
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model card in the catalog format (weights and checksum are added by :func:`save_model`).

    ``trained_on`` says what the weights learnt from: ``{"dataset": ..., "subjects": n,
    "simulated": bool}``, or ``None`` for untrained (random) weights.
    """
    from .models import method_task, paper_name

    return {
        "card_version": CARD_VERSION,
        "name": name,
        "method": method,
        "paper": paper_name(method),
        "task": method_task(method),
        "version": version,
        "description": description,
        "config": config,
        "grid": grid or {},
        "modalities": list(modalities or []),
        "age_range_months": list(age_range) if age_range else None,
        "trained_on": trained_on,
        "metrics": metrics or {},
    }


def save_model(model: Any, card: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (with the weights' sha256) atomically.

    Returns the card's path. Nothing is left behind if either write fails. An existing
    entry of that name is replaced only when longdiff wrote it (:func:`check_model_target`).
    """
    from safetensors.torch import save_file

    from .imaging import atomic_write, write_json

    folder = Path(folder)
    name = card["name"]
    check_model_target(folder, name)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}{WEIGHTS_SUFFIX}"
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes a metadata dict in no fixed order, and the sha256
    # of identical weights must not change from one save to the next.
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"method": card["method"]}))
    card = {**card, "weights": {"file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size}}
    card_path = folder / f"{name}.json"
    try:
        write_json(card_path, card)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
    return card_path


def check_model_target(folder: str | os.PathLike, name: str) -> None:
    """Refuse, before any work, to write model ``name`` into ``folder`` where that would
    replace a card or weights longdiff did not write.

    An existing ``<name>.json`` may be replaced only when it is a catalog card (it has
    ``card_version`` and names ``<name>.safetensors``) whose weights, if present, still
    have the card's sha256; ``<name>.safetensors`` without such a card is never replaced.
    The folder must be writable (a probe file is created and removed).
    """
    from .outputs import check_writable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "is a file; a model is exported into a folder")
    card_path, weights = folder / f"{name}.json", folder / f"{name}{WEIGHTS_SUFFIX}"
    left_alone = "; it was left alone (choose another --name or folder)"
    if card_path.exists() or card_path.is_symlink():
        try:
            old = _read_card(card_path)
        except InputError as exc:
            raise InputError(card_path, "exists and is not a model card longdiff wrote" + left_alone) from exc
        entry = old.get("weights") or {}
        if "card_version" not in old or entry.get("file") != weights.name:
            raise InputError(card_path, "exists and is not a model card longdiff wrote" + left_alone)
        if weights.is_file() and sha256_file(weights) != entry.get("sha256"):
            raise InputError(weights, "differs from what its card says longdiff wrote" + left_alone)
    elif weights.exists() or weights.is_symlink():
        raise InputError(weights, "exists without a card, so longdiff did not write it" + left_alone)
    check_writable(folder, "model folder")


@dataclass
class LoadedModel:
    """A checked, ready network and the card that describes it."""

    card: ModelCard
    network: Any
    config: dict[str, Any]

    @property
    def method(self) -> str:
        return self.card.method


def resolve_card(name_or_path: str | os.PathLike) -> ModelCard:
    """A card by catalog name, or by the path of a ``.json`` card (or its weights)."""
    path = Path(name_or_path)
    if path.suffix in (".json", WEIGHTS_SUFFIX) and (path.exists() or path.with_suffix(".json").exists()):
        path = path.with_suffix(".json")
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(path, f"model card is not valid JSON ({exc})") from exc
        if not isinstance(card, dict) or "method" not in card:
            raise InputError(path, "model card has no 'method' field")
        return ModelCard(path.stem, path, card)
    return find_model(str(name_or_path))


def load_model(name_or_path: str | os.PathLike | ModelCard, device: Any = "cpu") -> LoadedModel:
    """Find, checksum and load a model; clear errors for every way it can be broken.

    Weights are read with safetensors (no pickled code runs). The network is built from
    the card's method and config, then must match the weights key for key and shape for
    shape. The network is returned ready for sampling on ``device`` (eval mode, no
    gradients; on CUDA its Conv3d kernels channels-last-3d: ``diffusion.prepare_network``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .diffusion import prepare_network
    from .models import build

    mc = name_or_path if isinstance(name_or_path, ModelCard) else resolve_card(name_or_path)
    card = mc.card
    entry = card.get("weights") or {}
    if not entry.get("file"):
        raise InputError(mc.path, "model card names no weights file ('weights': {'file': ...})")
    weights = (mc.path.parent / entry["file"]).resolve()
    if weights.parent != mc.path.parent.resolve():
        raise InputError(mc.path, f"weights file '{entry['file']}' must sit next to the card")
    if not weights.is_file() and (card.get("weights_url") or entry.get("url")):
        from .weights import ensure_weights  # a release without bundled weights: fetch once, into the cache

        weights = ensure_weights(mc)
    if not weights.is_file():
        raise InputError(weights, f"weights of model '{mc.name}' are missing")
    expected = entry.get("sha256")
    if not expected:
        raise InputError(mc.path, "model card has no sha256 of its weights")
    actual = sha256_file(weights)
    if actual != expected:
        raise InputError(
            weights, f"checksum mismatch (sha256 {actual[:12]}..., card says {expected[:12]}...): corrupt or altered"
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(weights, f"not a readable safetensors file ({exc})") from exc
    config = card.get("config") or {}
    try:
        network = build(mc.method, config)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(mc.path, f"cannot build a '{mc.method}' network from the card's config ({exc})") from exc
    check_state_dict(network, state, weights)
    network.load_state_dict(state, strict=True)
    network.requires_grad_(False)
    return LoadedModel(mc, prepare_network(network, device), config)


def check_state_dict(network: Any, state: dict[str, Any], source: str | os.PathLike | None) -> None:
    """Raise a readable InputError unless ``state`` fits ``network`` key for key and shape for shape."""
    from .models import check_weights

    check_weights(network.state_dict(), state, source, "weights do not match the card's architecture")


def create_untrained(
    method: str,
    folder: str | os.PathLike,
    *,
    scale: str = "tiny",
    name: str | None = None,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> Path:
    """A model of ``method`` with random weights, as a catalog entry (card + weights).

    For trying a pipeline end to end before weights exist: its card says it is untrained
    (``trained_on`` is null) and every result made with it carries that in its provenance.
    """
    import torch

    from .models import METHODS, build, default_config, default_grid

    config = config or default_config(method, scale)
    torch.manual_seed(seed)
    network = build(method, config)
    grids = {"grid": default_grid(method, config)}
    if "sr_image_size" in config:
        grids["sr_grid"] = default_grid(method, config, "sr_image_size")
    modalities = config.get("modalities") or ([config["target"]] if "target" in config else ["T1w"])
    name = name or f"{method}-{scale}-untrained"
    card = new_card(
        name,
        method,
        config,
        grid=grids["grid"],
        modalities=list(modalities),
        trained_on=None,
        description=f"{METHODS[method][2]} at {scale} scale with RANDOM weights (untrained): for testing only.",
    )
    card.update(grids)
    return save_model(network, card, folder)


def import_checkpoint(
    method: str,
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    name: str,
    config: dict[str, Any] | None = None,
    card_fields: dict[str, Any] | None = None,
) -> Path:
    """Convert a checkpoint written by a method's upstream research code into a catalog
    entry (safetensors + card). The checkpoint is read with ``weights_only=True``: a file
    that needs pickled code to load is refused."""
    from .models import default_grid, method_module

    module = method_module(method)
    importer = getattr(module, "import_upstream_checkpoint", None)
    if importer is None:
        raise InputError(checkpoint, f"no importer for {method} checkpoints (upstream published none)")
    network, report = importer(checkpoint, config)
    report = dict(report)
    config = report.pop("config", None) or config or module.default_config("paper")
    card = new_card(
        name,
        method,
        config,
        grid=default_grid(method, config),
        modalities=config.get("modalities") or ([config["target"]] if "target" in config else []),
        trained_on={"dataset": "unknown (imported upstream checkpoint)", "simulated": False},
        description=f"imported from {Path(checkpoint).name}",
    )
    card["import_report"] = report
    card.update(card_fields or {})
    return save_model(network, card, folder)
