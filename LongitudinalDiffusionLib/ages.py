"""Ages and their units: every age is stored in months (float); :func:`parse_age` converts
from days, weeks, months or years and refuses impossible values."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["AGE_UNITS", "MAX_AGE_MONTHS", "canonical_unit", "format_age", "parse_age", "parse_age_unit"]

_DAYS_PER_MONTH = 30.4375  # 365.25 / 12

#: Months per unit. Keys are matched case-insensitively; see :func:`parse_age_unit`.
AGE_UNITS: dict[str, float] = {
    "days": 1 / _DAYS_PER_MONTH,
    "weeks": 7 / _DAYS_PER_MONTH,
    "months": 1.0,
    "years": 12.0,
}
_UNIT_SPELLINGS = {
    "days": ("day", "d"),
    "weeks": ("week", "w", "wk", "wks"),
    "months": ("month", "m", "mo", "mos"),
    "years": ("year", "y", "yr", "yrs"),
}
_CANONICAL_UNIT: dict[str, str] = {}
for _canonical, _spellings in _UNIT_SPELLINGS.items():
    _CANONICAL_UNIT[_canonical] = _canonical
    for _spelling in _spellings:
        AGE_UNITS[_spelling] = AGE_UNITS[_canonical]
        _CANONICAL_UNIT[_spelling] = _canonical
del _canonical, _spellings, _spelling

#: Oldest age accepted (130 years), in months.
MAX_AGE_MONTHS = 130 * 12.0


def canonical_unit(unit: str) -> str | None:
    """The canonical name of an age unit spelt in lower case (``"mo"`` -> ``"months"``), or
    None when it is not one."""
    return _CANONICAL_UNIT.get(unit)


def parse_age_unit(unit: str, source: str | os.PathLike | None = None) -> str:
    """The canonical name (``days``, ``weeks``, ``months``, ``years``) of an age unit.

    Raises:
        InputError: unknown unit.
    """
    key = "" if unit is None else str(unit).strip().lower()
    if key not in _CANONICAL_UNIT:
        raise InputError(source, f"unknown age unit '{unit}'; expected days, weeks, months or years")
    return _CANONICAL_UNIT[key]


def parse_age(value: Any, unit: str = "months", source: str | os.PathLike | None = None) -> float:
    """Read an age and return it in months.

    Args:
        value: a number, or text holding one (``"18"``, ``"1.5"``); a unit inside the text
            (``"18 mo"``) is refused: units come from ``unit``.
        unit: ``days``, ``weeks``, ``months`` or ``years`` (or ``d``, ``w``, ``m``/``mo``,
            ``y``, singular forms; any case).
        source: the file, row or item the age comes from, for the error message.

    Raises:
        InputError: missing, non-numeric, NaN, negative or older than 130 years; unknown unit.
    """
    unit = parse_age_unit(unit, source)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "n/a", "na")):
        raise InputError(source, "missing age")
    if isinstance(value, (bool, np.bool_)):
        raise InputError(source, f"age {value!r} is not a number")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        text = f"{number:g}"
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            hint = ""
            if re.fullmatch(r"[-+]?\d+,\d+", text):
                hint = " (use a point as the decimal separator)"
            elif re.fullmatch(r"[-+]?[\d.]+\s*[A-Za-z]+", text):
                hint = " (give the unit in the unit column or the column name, not in the cell)"
            # float()'s own message only repeats the text: the cause is noise
            raise InputError(source, f"age '{text}' is not a number{hint}") from None
    if math.isnan(number):
        raise InputError(source, "age is NaN (not a number)")
    if number < 0:
        raise InputError(source, f"impossible age {text} {unit}: ages count from birth")
    months = number * AGE_UNITS[unit]
    if not math.isfinite(months) or months > MAX_AGE_MONTHS:
        raise InputError(source, f"impossible age {text} {unit}: more than 130 years")
    return months + 0.0  # turns -0.0 into 0.0


def format_age(months: float) -> str:
    """An age for display: ``"6.0 mo"``."""
    return f"{months:.1f} mo"
