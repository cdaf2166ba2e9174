"""Typed method configurations: frozen dataclasses that read and write the JSON of model cards
and training configs, key for key.

A config class lists every key its JSON may hold as a field, with a docstring per class
naming what each means. ``from_dict`` refuses unknown keys and missing required ones with the
key's name; ``to_dict`` writes the same JSON back (an optional key the JSON did not hold
stays out: its field is None and marked ``optional()``). Nested sections are config classes
themselves (``nested(Cls)``). Options are enums, each defined once (:class:`Prediction` in
``diffusion.schedule``, the sampler names in ``diffusion.samplers``).

Python 3.9: no ``kw_only``/``slots``; the field types are strings (``from __future__ import
annotations``), never evaluated at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

from ..diffusion.schedule import Prediction as Prediction  # re-exported: the config classes use it
from ..errors import InputError

C = TypeVar("C", bound="MethodConfig")


def optional(default: Any = None) -> Any:
    """A key the JSON may leave out (then the field is ``default`` and ``to_dict`` omits it)."""
    return field(default=default, metadata={"optional": True})


def nested(cls: type, *, is_optional: bool = False) -> Any:
    """A section that is itself a config class (the JSON holds it as an object)."""
    meta = {"nested": cls, "optional": is_optional}
    return field(default=None, metadata=meta) if is_optional else field(metadata=meta)


def _plain(value: Any) -> Any:
    """JSON-ready copy: enums as their values, tuples as lists, dicts copied."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Base of every config class: ``from_dict`` / ``to_dict`` round-trip the JSON."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | MethodConfig, where: str = "") -> C:
        """The config of ``data`` (a JSON object; an instance of ``cls`` is returned as is)."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise InputError(where or cls.__name__, f"expected an object, got {type(data).__name__}")
        where = where or cls.__name__
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InputError(where, f"unknown key(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise InputError(where, f"missing key '{name}'")
                continue
            value = data[name]
            sub = f.metadata.get("nested")
            if sub is not None and value is not None:
                value = sub.from_dict(value, f"{where}.{name}")
            elif isinstance(value, list):
                value = [v if not isinstance(v, list) else list(v) for v in value]
            values[name] = value
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise InputError(where, str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = _plain(value)
        return out


@dataclass(frozen=True)
class UNetConfig(MethodConfig):
    """Options of MONAI's ``DiffusionModelUNet`` that the methods set (spatial_dims and the
    channel counts of its input and output are the method's own).

    Attributes:
        channels: feature channels per resolution level.
        attention_levels: self-attention at each level (the mid block always has it).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups.
        num_head_channels: channels per attention head.
        use_flash_attention: memory-efficient attention (omitted: MONAI's default, off).
    """

    channels: list[int] = field(default_factory=list)
    attention_levels: list[bool] = field(default_factory=list)
    num_res_blocks: int = 1
    norm_num_groups: int = 32
    num_head_channels: int = 8
    use_flash_attention: bool | None = optional()

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"channels {self.channels} and attention_levels {self.attention_levels} differ in length")
