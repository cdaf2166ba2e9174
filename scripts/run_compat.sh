#!/usr/bin/env bash
# The torch-free tests (Testing/torchfree.txt) under every Python that Slicer ships and the
# module supports: 3.9 (Slicer 5.8) and 3.12 (Slicer 5.10 and newer). The main suite runs on
# the project's 3.11 venv, where the torch CPU wheel is.
#   usage: scripts/run_compat.sh [pytest options]
# Each interpreter gets a small venv in .tools/compat-pyXY with requirements/compat-pyXY.txt
# (re-used while those pins do not change). Interpreters come from $LONGDIFF_PYTHON39 /
# $LONGDIFF_PYTHON312, else pyenv. A missing one is skipped with a message, or fails when
# LONGDIFF_REQUIRE_TOOLS=1 (CI).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mapfile -t files < <(grep -v '^#' Testing/torchfree.txt | sed '/^\s*$/d; s|^|Testing/|')

findPython() {  # findPython 3.9 -> path of a python3.9, or nothing
  local version="$1" var="LONGDIFF_PYTHON${1/./}" candidate
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if command -v pyenv >/dev/null 2>&1; then
    candidate="$(pyenv prefix "$(pyenv versions --bare 2>/dev/null | grep -E "^${version//./\\.}\.[0-9]+$" | sort -V | tail -1)" 2>/dev/null || true)"
    [ -n "$candidate" ] && [ -x "$candidate/bin/python$version" ] && { echo "$candidate/bin/python$version"; return; }
  fi
  for candidate in $(ls -d "$root"/versions/"$version".* 2>/dev/null | sort -V -r); do
    [ -x "$candidate/bin/python$version" ] && { echo "$candidate/bin/python$version"; return; }
  done
  command -v "python$version" 2>/dev/null || true
}

status=0
for version in 3.9 3.12; do
  tag="py${version/./}"
  python="$(findPython "$version")"
  if [ -z "$python" ]; then
    message="run_compat: no Python $version found (pyenv or \$LONGDIFF_PYTHON${version/./})"
    if [ "${LONGDIFF_REQUIRE_TOOLS:-0}" = 1 ]; then echo "$message: required (LONGDIFF_REQUIRE_TOOLS=1)" >&2; status=1; continue; fi
    echo "$message: its tests are skipped" >&2
    continue
  fi
  venv="$here/.tools/compat-$tag"
  req="$here/requirements/compat-$tag.txt"
  want="$(cat "$req" | sha256sum | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
  if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$want" ]; then
    echo "run_compat: setting up $venv ($("$python" --version 2>&1))" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
    "$venv/bin/python" -c 'import numpy, scipy, nibabel, PySide6, pytest' || { echo "run_compat: installing $req failed" >&2; status=1; continue; }
    echo "$want" > "$venv/.stamp"
  fi
  echo "run_compat: Python $version: ${#files[@]} torch-free test files" >&2
  # As inside Slicer: the repository root (the library) and the module's folder on the path.
  if ! PYTHONPATH="$here:$here/LongitudinalDiffusion${PYTHONPATH:+:$PYTHONPATH}" \
      "$venv/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}" "$@"; then
    echo "run_compat: torch-free tests failed on Python $version" >&2
    status=1
  fi
done
exit "$status"
