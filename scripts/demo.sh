#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then `gfservice demo` on a local embedded Ray.
# Extra arguments go to `gfservice demo` (see `gfservice demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/gfservice demo "$@"
