#!/usr/bin/env bash
# Install the external tools the tests use when they are available: redis-server (the
# remote worker's scale-out test, from the system's package manager) and the official BIDS
# validator (npm package bids-validator, pinned) into .tools/. What cannot be installed is
# skipped by the tests that need it (CI sets LONGDIFF_REQUIRE_TOOLS=1, which turns that skip
# into a failure).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "setup_tools: installing redis-server (Debian/Ubuntu package)" >&2
    { $sudo apt-get install -y -q redis-server >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q redis-server >/dev/null 2>&1; }; } \
      || echo "setup_tools: could not install redis-server; the Celery test will be skipped" >&2
  elif command -v brew >/dev/null 2>&1; then
    brew install redis >/dev/null || echo "setup_tools: could not install redis; the Celery test will be skipped" >&2
  else
    echo "setup_tools: redis-server not found and no package manager to install it; the Celery test will be skipped" >&2
  fi
fi
# Real scans the project never trained on (Testing/realdata.py): Colin27 and ITK's head T1.
if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ] || [ ! -d /usr/share/doc/insighttoolkit5-examples/examples/Data ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "setup_tools: installing the real test scans (Debian mricron-data, insighttoolkit5-examples)" >&2
    { $sudo apt-get install -y -q mricron-data insighttoolkit5-examples >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q mricron-data insighttoolkit5-examples >/dev/null 2>&1; }; } \
      || echo "setup_tools: could not install the real test scans; their tests will be skipped" >&2
  else
    echo "setup_tools: no package manager for the real test scans; their tests will be skipped" >&2
  fi
fi
tools="$here/.tools"
version="1.15.0"
if ! command -v npm >/dev/null 2>&1; then
  echo "setup_tools: npm not found; the BIDS validator test will be skipped" >&2
  exit 0
fi
if [ -x "$tools/node_modules/.bin/bids-validator" ] && [ "$(cat "$tools/.bids-validator" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
echo "setup_tools: installing bids-validator $version into $tools" >&2
mkdir -p "$tools"
for attempt in 1 2 3; do
  if npm install --prefix "$tools" --no-audit --no-fund --loglevel=error "bids-validator@$version" >/dev/null; then
    echo "$version" > "$tools/.bids-validator"
    exit 0
  fi
  echo "setup_tools: npm install failed (attempt $attempt)" >&2
  sleep 5
done
exit 1
