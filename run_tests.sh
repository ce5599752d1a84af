#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the tests.
#   ./run_tests.sh         the fast set (not marked slow): the dev loop
#   ./run_tests.sh --all   everything (what .ci/run calls)
# Other arguments go to pytest: ./run_tests.sh -k preprocess,
# ./run_tests.sh tests/test_scoring.py, ./run_tests.sh -m slow (the slow set).
# The tests run in one pytest-xdist worker process per CPU this process may
# use, within its cgroup's CPU quota and memory (3 GiB a worker), at most 4
# (scripts/test_workers.py).
# BUSI_TEST_WORKERS=N sets the count (0 or 1: all in one process); -n given
# here sets it instead, and -p, --pdb, --trace, -s or
# --capture given here without -n run them in one process (xdist refuses
# --pdb and -p no:xdist, and a worker's print() never reaches the terminal).
set -euo pipefail
cd "$(dirname "$0")"
marker=(-m "not slow")
args=()
own_workers=1
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then marker=(); continue; fi
  # -s also inside a cluster of flags without values (-vs, -sx).
  if [[ "$arg" =~ ^(-n.*|--numprocesses(=.*)?|-p.*|--pdb|--trace|--capture.*)$ ||
        "$arg" =~ ^-[vqxl]*s[vqxls]*$ ]]; then
    own_workers=0
  fi
  args+=("$arg")
done
source scripts/ensure_env.sh
workers=()
if [ "$own_workers" = 1 ]; then
  count="${BUSI_TEST_WORKERS:-$(python scripts/test_workers.py)}"
  if ! [[ "$count" =~ ^[0-9]{1,3}$ ]]; then
    echo "run_tests.sh: BUSI_TEST_WORKERS must be a whole number up to 999," \
      "not '$count'" >&2
    exit 2
  fi
  # One CPU gains nothing from a second process.
  if [ "$count" -ge 2 ]; then workers=(-n "$count"); fi
fi
exec python -m pytest -q "${marker[@]}" "${workers[@]}" "${args[@]}"
