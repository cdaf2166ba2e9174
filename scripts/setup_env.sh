#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with pinned versions.
#   usage: scripts/setup_env.sh runtime|test
# The environment lives in .venv beside this repository (override with LONGDIFF_VENV).
# Re-running is cheap: nothing is reinstalled unless the pinned requirements changed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind="${1:-runtime}"
req="$here/requirements/$kind.txt"
[ -f "$req" ] || { echo "setup_env: no requirements file $req" >&2; exit 2; }
venv="${LONGDIFF_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 12)))'; then
  echo "setup_env: $("$python" --version 2>&1) found; LongitudinalDiffusion needs Python 3.9 to 3.12 (set PYTHON=...)" >&2
  exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  # The exact pins (requirements/*.txt) were resolved on 3.11, where the torch CPU wheel is;
  # 3.9 (Slicer 5.8) and 3.12 are tested torch-free by scripts/run_compat.sh.
  echo "setup_env: note: the pinned versions are resolved for Python 3.11; on $("$python" --version 2>&1) some may have no wheel" >&2
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup_env: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.longdiff-$kind.sha256"
want="$(cat "$here/requirements/"*.txt "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_env: installing pinned $kind requirements (torch is the CPU build)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  # deepbet (brain extraction): --no-deps, see the comment in that file.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$here/requirements/brain-extraction.txt"
  if [ "$kind" = test ]; then
    # trame-slicer (slice-view renders): --no-deps, see the comment in that file.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$here/requirements/slicer-render.txt"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$here"
  echo "$want" > "$stamp"
fi
