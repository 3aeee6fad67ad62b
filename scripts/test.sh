#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, check the Prometheus binaries, lint, run pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
missing=""
for bin in prometheus promtool prometheus-alertmanager; do
  command -v "$bin" >/dev/null || missing="$missing $bin"
done
if [ -n "$missing" ]; then
  echo "test: missing$missing; install them with: sudo apt-get update && sudo apt-get install -y prometheus prometheus-alertmanager" >&2
  exit 1
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
