#!/usr/bin/env bash
# Create .venv and install gfservice with one extra: `scripts/setup.sh` (or `scripts/setup.sh test`) installs
# everything the tests need; `scripts/setup.sh demo` only the core and Ray (what scripts/demo.sh runs on).
# Idempotent and quick when nothing changed. torch==2.13.0 (CPU) is installed first: a plain torch requirement would otherwise
# pull a multi-GB CUDA build.
#
# pip's own output goes to .venv/setup.log and is shown only when a step fails: a successful run prints
# one line per step, not pip's chatter (e.g. a machine-wide pip configuration naming file:// indexes that
# do not exist on this machine makes pip print a "Location ... is ignored" warning per package, and
# setuptools warns about editable installs).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-test}
case "$EXTRA" in test|demo) ;; *) echo "setup: unknown extra '$EXTRA' (test or demo)" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi

shopt -s nullglob
plugins=()
[ "$EXTRA" = test ] && plugins=(examples/*/pyproject.toml)   # example third-party detector plugins, for their tests
shopt -u nullglob
stamp=.venv/.gfservice-installed-$EXTRA
want=$(cat pyproject.toml scripts/setup.sh ${plugins[@]+"${plugins[@]}"} | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

log=.venv/setup.log
: > "$log"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
steps=$((1 + ${#plugins[@]}))
[ "$EXTRA" = test ] && steps=$((steps + 1))
n=0
step() {  # step DESCRIPTION PIP-INSTALL-ARGS...
  local what=$1 t0=$SECONDS
  shift
  n=$((n + 1))
  printf 'setup: [%d/%d] %s ... ' "$n" "$steps" "$what"
  local from=$(($(wc -l < "$log") + 1))
  echo "=== pip install $*" >> "$log"
  if .venv/bin/python -m pip install "$@" >> "$log" 2>&1; then
    echo "ok ($((SECONDS - t0)) s)"
  else
    echo "FAILED"
    echo "setup: 'pip install $*' failed. Its output, less pip's 'Location ... is ignored' lines (all in $log):" >&2
    tail -n "+$from" "$log" | grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" >&2
    exit 1
  fi
}

echo "setup: installing torch 2.13.0 (CPU) and gfservice[$EXTRA] into .venv (the first run takes a while)"
# The demo skips pip's own upgrade (the venv's pip installs this project as it is): seconds off its first run.
[ "$EXTRA" = test ] && step "pip" --upgrade pip
# One pip run for torch and gfservice (one resolution); the pin keeps the CPU build.
step "torch 2.13.0 (CPU) and gfservice[$EXTRA] (editable)" "torch==2.13.0" -e ".[$EXTRA]"
for p in ${plugins[@]+"${plugins[@]}"}; do
  step "example plugin $(dirname "$p")" -e "$(dirname "$p")"
done
echo "$want" > "$stamp"
echo "setup: done (pip's log: $log)"
