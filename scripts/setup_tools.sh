#!/usr/bin/env bash
# Install the external checkers the tests use when they are available: the official BIDS
# validator (npm package bids-validator, pinned) into .tools/. Without npm nothing is
# installed and the tests that need it are skipped (CI sets LONGDIFF_REQUIRE_TOOLS=1, which
# turns that skip into a failure).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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
