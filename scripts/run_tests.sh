#!/usr/bin/env bash
# Set up the test environment and run the whole test suite.
#   usage: scripts/run_tests.sh [pytest options]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup_env.sh" test
bash "$here/scripts/setup_tools.sh"
venv="${LONGDIFF_VENV:-$here/.venv}"
cd "$here"
export MPLBACKEND=Agg
export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}"  # the panel tests need no display
# Style first (fast): the same rules for every contributor (pyproject.toml [tool.ruff]).
"$venv/bin/ruff" check --quiet . && "$venv/bin/ruff" format --check --quiet . || {
  echo "run_tests: style check failed; 'ruff check --fix . && ruff format .' fixes most of it" >&2
  exit 1
}
# Types (pyproject.toml [tool.mypy]): the library at the level each room passes.
"$venv/bin/python" -m mypy || { echo "run_tests: type check failed (python -m mypy)" >&2; exit 1; }
set +e
"$venv/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
# The torch-free tests again under Slicer's other Pythons (3.9 for Slicer 5.8, 3.12): on a
# full run (no pytest options), or when LONGDIFF_COMPAT=1; LONGDIFF_COMPAT=0 leaves them out.
if [ "${LONGDIFF_COMPAT:-$([ "$#" -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  bash "$here/scripts/run_compat.sh" || status=1
fi
exit "$status"
