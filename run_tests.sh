#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the tests.
#   ./run_tests.sh         the fast set (not marked slow): the dev loop
#   ./run_tests.sh --all   everything (what .ci/run calls)
# Other arguments go to pytest: ./run_tests.sh -k preprocess,
# ./run_tests.sh tests/test_scoring.py, ./run_tests.sh -m slow (the slow set).
set -euo pipefail
cd "$(dirname "$0")"
marker=(-m "not slow")
args=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then marker=(); else args+=("$arg"); fi
done
source scripts/ensure_env.sh
exec python -m pytest -q "${marker[@]}" "${args[@]}"
