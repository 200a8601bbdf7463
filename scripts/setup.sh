#!/usr/bin/env bash
# Make this checkout runnable: Debian packages, then node modules when missing
# or older than the lock file. Cheap when everything is already in place, so
# `npm test` and `npm run demo` call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
