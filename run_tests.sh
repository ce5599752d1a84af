#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the test suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh -k preprocess
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
exec python -m pytest -q "$@" tests
