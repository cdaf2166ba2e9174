"""The MRI contrasts the models know (:class:`Modality`) and how their names are read
(:func:`parse_modality`: case-insensitive, with the usual aliases)."""

from __future__ import annotations

import os
import re
from enum import Enum

from .errors import InputError

__all__ = ["MODALITY_ORDER", "Modality", "parse_modality"]


class Modality(str, Enum):
    """The MRI contrasts the models know. The value is the display / BIDS-like name."""

    T1W = "T1w"
    T2W = "T2w"
    FLAIR = "FLAIR"
    T1CE = "T1ce"  # contrast-enhanced (e.g. gadolinium) T1-weighted

    def __str__(self) -> str:
        return self.value


#: The display order of the modalities: T1w, T2w, FLAIR, T1ce.
MODALITY_ORDER = {m: i for i, m in enumerate(Modality)}
_EXPECTED_MODALITIES = ", ".join(m.value for m in Modality)

# Aliases after lower-casing and removing spaces, "_", "-", "." and "+".
_MODALITY_ALIASES: dict[str, Modality] = {
    **dict.fromkeys(("t1", "t1w", "t1wi", "t1weighted"), Modality.T1W),
    **dict.fromkeys(("t2", "t2w", "t2wi", "t2weighted"), Modality.T2W),
    **dict.fromkeys(("flair", "t2flair", "t2wflair", "flairt2", "flairw"), Modality.FLAIR),
    **dict.fromkeys(
        (
            "t1ce",
            "t1c",
            "t1gd",
            "t1gad",
            "t1wce",
            "t1wgd",
            "t1post",
            "t1wpost",
            "t1contrast",
            "t1enhanced",
            "cet1",
            "cet1w",
            "gdt1",
            "gdt1w",
        ),
        Modality.T1CE,
    ),
}
# "ce-gadolinium_t1w", "T1w_ce-Gd", ...: a BIDS ``ce`` entity on a T1 name.
_T1CE_PATTERNS = (re.compile(r"^ce[a-z0-9]*t1w?$"), re.compile(r"^t1w?ce[a-z0-9]*$"))


def parse_modality(text: str | Modality, source: str | os.PathLike | None = None) -> Modality:
    """Read a modality name, case-insensitively and with common aliases.

    Accepted (among others): ``t1``, ``T1w``; ``t2``, ``T2w``; ``FLAIR``, ``t2flair``,
    ``T2-FLAIR``; ``t1ce``, ``t1c``, ``T1Gd``, ``ceT1w``, ``T1+C``, ``ce-gadolinium_T1w``.

    Args:
        text: the name to read (a :class:`Modality` is returned as is).
        source: the file or item the name comes from, for the error message.

    Raises:
        InputError: empty or unknown name.
    """
    if isinstance(text, Modality):
        return text
    raw = "" if text is None else str(text).strip()
    if not raw:
        raise InputError(source, f"missing modality; expected one of {_EXPECTED_MODALITIES}")
    compact = re.sub(r"[\s_\-.+]", "", raw.lower())
    found = _MODALITY_ALIASES.get(compact)
    if found is None and any(p.match(compact) for p in _T1CE_PATTERNS):
        found = Modality.T1CE
    if found is None:
        raise InputError(source, f"unknown modality '{raw}'; expected one of {_EXPECTED_MODALITIES}")
    return found
