#!/usr/bin/env bash
# Create .venv and install gfservice with everything the demo and the tests need. Idempotent and quick
# when nothing changed. torch==2.13.0 (CPU) is installed first: a plain torch requirement would otherwise
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.gfservice-installed
want=$(cat pyproject.toml examples/gfservice-plugin-underflow/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing torch 2.13.0 (CPU) and gfservice[test] into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  if [ -d examples/gfservice-plugin-underflow ]; then
    .venv/bin/python -m pip install -q -e examples/gfservice-plugin-underflow
  fi
  echo "$want" > "$stamp"
fi
