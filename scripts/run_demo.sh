#!/usr/bin/env bash
# The main job on the embedded default: set up, then run `longdiff demo` on simulated data.
#   usage: scripts/run_demo.sh [OUT] [extra longdiff demo options]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup_env.sh" runtime
venv="${LONGDIFF_VENV:-$here/.venv}"
out="${1:-demo-output}"
shift || true
exec "$venv/bin/longdiff" demo "$out" --overwrite "$@"
