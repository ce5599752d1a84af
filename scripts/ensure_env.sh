#!/usr/bin/env bash
# Creates ./.venv with the project and its test extras, once per setup.py.
# Sourced by run_local.sh and run_tests.sh; needs only Python 3.11 and the
# package index.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BUSI_VENV:-$ROOT/.venv}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$candidate"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
STAMP="$VENV/.busi-installed-$(sha256sum "$ROOT/setup.py" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "Setting up $VENV (first run: a few minutes, ~3 GB)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" >&2
  rm -f "$VENV"/.busi-installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# No Google credential lookups and no metadata-server probes from local runs.
export NO_GCE_CHECK=true GCE_METADATA_HOST=127.0.0.1 GCE_METADATA_IP=127.0.0.1
export TF_ENABLE_ONEDNN_OPTS="${TF_ENABLE_ONEDNN_OPTS:-1}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
