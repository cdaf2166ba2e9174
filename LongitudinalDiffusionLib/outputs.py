"""Where results go, and the one rule every writer follows: never delete or replace a file
the tool did not write.

Every folder the tool writes as a whole (a task's result, a simulated cohort, the demo's
output) carries a marker file, :data:`MARKER` (``.longdiff-result.json``), with the tool's
version and the list of files it wrote. A folder may then be replaced (``--overwrite``,
``overwrite=True``) only when every file in it is listed in a marker: its own, or the
marker of a sub-folder the tool wrote. Anything else is refused, naming the foreign files.

:func:`check_output` is called before any compute (the command line calls it before it
loads a model): it refuses an output location that is an existing file, that is an input
folder or holds (is a parent of) an input file, that is not empty without overwrite, or
that cannot be written (a probe file is created and removed in the nearest existing
folder). :func:`install` moves a finished temporary folder into place: an earlier result
of the tool is moved aside, the new one renamed in, and only the files the old marker
lists are deleted.

A single file (a ``.mrb`` scene) cannot hold a marker file beside it; such writers check
their own format (see ``LongitudinalDiffusionSlicer.mrml.sceneToMrb``), and
:func:`check_file_target` does the location checks for them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError

log = logging.getLogger(__name__)

MARKER = ".longdiff-result.json"
#: at most this many foreign files are named in an error
SHOW = 5


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of ``folder`` as a dict, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "longdiff" or not isinstance(data.get("files"), list):
        return None
    return data


def _walk(folder: Path) -> list[Path]:
    """Every file (and symlink) under ``folder``, not following links."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for d in list(dirs):
            if (base / d).is_symlink():  # a link to a folder is an entry of its own
                found.append(base / d)
                dirs.remove(d)
        found += [base / f for f in files]
    return found


def foreign_files(folder: str | os.PathLike) -> list[Path]:
    """The files under ``folder`` the tool did not write.

    A file is the tool's when a marker of a folder between the file's own folder and
    ``folder`` (both included) lists it; marker files themselves are the tool's. Anything
    else is foreign.
    """
    folder = Path(folder)
    markers: dict[Path, set[str] | None] = {}

    def listed(d: Path) -> set[str] | None:
        if d not in markers:
            data = read_marker(d)
            markers[d] = None if data is None else {str(f) for f in data["files"]}
        return markers[d]

    foreign = []
    for f in _walk(folder):
        if f.name == MARKER and read_marker(f.parent) is not None:
            continue
        d, owned = f.parent, False
        while True:
            names = listed(d)
            if names is not None and f.relative_to(d).as_posix() in names:
                owned = True
                break
            if d == folder or folder not in d.parents:
                break
            d = d.parent
        if not owned:
            foreign.append(f)
    return sorted(foreign)


def _names(paths: list[Path], base: Path) -> str:
    shown = []
    for p in paths[:SHOW]:
        try:
            shown.append(p.relative_to(base).as_posix())
        except ValueError:
            shown.append(str(p))
    more = f" and {len(paths) - SHOW} more" if len(paths) > SHOW else ""
    return ", ".join(shown) + more


def check_writable(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create and remove a probe file in the nearest existing folder of ``path`` (``path``
    itself when it is a folder). Raises InputError naming that folder when it cannot be
    written. Returns the folder probed."""
    path = _resolved(path)
    probe_in = path
    while not probe_in.is_dir():
        if probe_in.exists():  # a file where a folder is needed on the way
            raise InputError(probe_in, f"is a file, so the {what} {path} cannot be created under it")
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".longdiff-probe-", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            probe_in, f"cannot write here ({exc.strerror or exc}), so the {what} {path} cannot be written"
        ) from exc
    return probe_in


def _check_inputs(out: Path, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    real_out = Path(os.path.realpath(out))
    for item in inputs:
        if item is None:
            continue
        p = _resolved(item)
        real = Path(os.path.realpath(p))  # the same places reached through symbolic links count too
        if p == out or real == real_out:
            kind = "an input folder" if p.is_dir() else "an input file"
            raise InputError(out, f"is {kind} of this run; choose a new {what} (nothing was written)")
        if out in p.parents or real_out in real.parents:
            raise InputError(
                out,
                f"holds an input of this run ({p}); choose another {what}, one that holds no input "
                "(nothing was written)",
            )


def check_output(
    folder: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    what: str = "output folder",
) -> Path:
    """Refuse, before any compute, an output folder the run could not write without losing
    a file. Returns the folder.

    Refused: an existing file; an input folder of the run, or a folder holding any input;
    a non-empty folder without ``overwrite``; with ``overwrite``, a folder holding any file
    the tool did not write (they are named); a location that cannot be written.
    """
    out = _resolved(folder)
    if out.exists() and not out.is_dir():
        raise InputError(out, f"is an existing file, not a folder; choose a new {what} (the file was left alone)")
    _check_inputs(out, inputs, what)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(
                out, f"{what} is not empty (--overwrite / overwrite=True replaces a previous result of longdiff)"
            )
        foreign = foreign_files(out)
        if foreign:
            raise InputError(
                out,
                f"{what} holds {len(foreign)} file(s) longdiff did not write ({_names(foreign, out)}); "
                "--overwrite replaces only a previous result of longdiff: choose another folder",
            )
    check_writable(out, what)
    if out.is_dir():  # the new folder is made beside it and renamed over it
        check_writable(out.parent, what)
    return out


def archive_written_by_tool(path: str | os.PathLike) -> bool:
    """True when ``path`` is a zip archive (e.g. a ``.mrb`` scene) holding the tool's marker."""
    import zipfile

    path = Path(path)
    if path.is_symlink() or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read(MARKER).decode("utf-8"))
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return False
    return isinstance(data, dict) and data.get("tool") == "longdiff"


def check_file_target(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output file") -> Path:
    """The location checks for a single output archive (a ``.mrb`` scene): not a folder,
    not existing unless ``overwrite``, then only an archive holding the tool's marker
    (:func:`archive_written_by_tool`), and writable."""
    path = _resolved(path)
    if path.is_dir():
        raise InputError(path, f"is a folder; the {what} must be a file name")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise InputError(path, f"{what} exists (--overwrite / overwrite=True replaces one longdiff wrote)")
        if not archive_written_by_tool(path):
            raise InputError(path, f"exists and was not written by longdiff; it is left alone (choose another {what})")
    check_writable(path.parent, what)
    return path


def write_marker(folder: str | os.PathLike, kind: str = "result", **extra: Any) -> Path:
    """Write the marker of ``folder``: the tool, its version, what the folder is and every
    file in it that no marker of a sub-folder lists (call it when the folder is complete
    and holds only what the tool wrote)."""
    folder = Path(folder)
    files = []
    for f in _walk(folder):
        if f.name == MARKER:
            continue
        rel = f.relative_to(folder)
        subs = [folder / Path(*rel.parts[:i]) for i in range(1, len(rel.parts))]
        if any(f.relative_to(d).as_posix() in (read_marker(d) or {}).get("files", ()) for d in subs):
            continue  # a nested result speaks for its own files
        files.append(rel.as_posix())
    payload = {
        "tool": "longdiff",
        "version": __version__,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(files),
        **extra,
    }
    from .imaging import write_json

    return write_json(folder / MARKER, payload)


def claim(folder: str | os.PathLike, paths: Iterable[str | os.PathLike], kind: str = "result") -> Path:
    """Add ``paths`` (files the tool just wrote inside ``folder``) to its marker."""
    folder = Path(folder)
    data = read_marker(folder) or {"tool": "longdiff", "version": __version__, "kind": kind, "files": []}
    names = set(data["files"])
    for p in paths:
        names.add(_resolved(p).relative_to(_resolved(folder)).as_posix())
    data["files"] = sorted(names)
    from .imaging import write_json

    return write_json(folder / MARKER, data)


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse to replace an existing file the tool did not write (a marker of a folder above
    it must list it). A missing file is fine."""
    path = _resolved(path)
    if not path.exists() and not path.is_symlink():
        return
    d = path.parent
    while True:
        data = read_marker(d)
        if data is not None and path.relative_to(d).as_posix() in data["files"]:
            return
        if d.parent == d:
            break
        d = d.parent
    raise InputError(path, "exists and was not written by longdiff; it is left alone (choose another folder)")


def install(tmp: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``folder``.

    An existing ``folder`` must hold only files the tool wrote (checked again here: the
    files may have changed during the run). It is moved aside, ``tmp`` renamed into its
    place, and then only the files its markers list are deleted; anything else found is
    kept in the moved-aside folder and a warning names it.
    """
    tmp, folder = Path(tmp), Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "is an existing file, not a folder (the file was left alone)")
    if not folder.exists():
        os.replace(tmp, folder)
        return folder
    if any(folder.iterdir()):
        foreign = foreign_files(folder)
        if foreign:
            raise InputError(
                folder,
                f"holds {len(foreign)} file(s) longdiff did not write ({_names(foreign, folder)}); "
                "nothing was replaced",
            )
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    aside.rmdir()
    os.replace(folder, aside)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(aside, folder)
        raise
    _remove_owned(aside)
    return folder


def _remove_owned(folder: Path) -> None:
    """Delete the files of ``folder`` its markers list, then its empty folders; keep the rest."""
    foreign = set(foreign_files(folder))
    for f in _walk(folder):
        if f not in foreign:
            f.unlink()
    for root, _dirs, _files in sorted(os.walk(folder), key=lambda x: -len(x[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass
    if folder.exists():
        log.warning("%s: files appeared in the replaced result during the run; they were kept here", folder)
