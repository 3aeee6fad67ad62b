#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv with the core and Ray only (the demo extra; the test extra is
# for scripts/test.sh), then `gfservice demo` on a local embedded Ray.
# Extra arguments go to `gfservice demo` (see `gfservice demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec .venv/bin/gfservice demo "$@"
