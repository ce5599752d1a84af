"""./run_tests.sh: how many worker processes it runs the tests in."""

import glob
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_TEST = "tests/test_pins.py::test_each_package_is_pinned_once_per_python"

pytestmark = pytest.mark.slow  # each case starts pytest again


def _run(*args, workers=None):
  venv = os.environ.get("BUSI_VENV", os.path.join(REPO, ".venv"))
  if not glob.glob(os.path.join(venv, ".busi-installed-*")):
    pytest.skip("run_tests.sh would install its venv first")
  env = dict(os.environ)
  for name in ("BUSI_TEST_WORKERS", "PYTEST_ADDOPTS"):
    env.pop(name, None)
  if workers is not None:
    env["BUSI_TEST_WORKERS"] = workers
  return subprocess.run(
      ["bash", "run_tests.sh", *args], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300, check=False)


@pytest.mark.parametrize("workers, args, expected", [
    ("2", (), 2),
    ("0", (), 0),
    ("1", (), 0),
    ("2", ("-n", "0"), 0),
    ("0", ("-n", "2"), 2),
    ("0", ("-nauto",), "auto"),
    ("2", ("-p", "no:xdist"), 0),
    ("2", ("--pdb",), 0),  # the test passes: no debugger opens
    ("2", ("-s",), 0),
    ("2", ("-vs",), 0),
    ("2", ("-rs",), 2),  # report skips: not -s
])
def test_worker_count(workers, args, expected):
  """pytest-xdist says how many workers it created (-v cancels the script's
  -q); in one process there are none to name."""
  result = _run("-v", *args, ONE_TEST, workers=workers)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "1 passed" in result.stdout
  if expected == "auto":
    assert "created: " in result.stdout, result.stdout[-3000:]
  elif expected:
    assert f"created: {expected}/{expected} workers" in result.stdout, (
        result.stdout[-3000:])
  else:
    assert "created: " not in result.stdout, result.stdout[-3000:]
    assert "bringing up nodes" not in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("workers", ["two", "-1", "2.5", "1000"])
def test_a_worker_count_that_is_not_a_whole_number_is_refused(workers):
  result = _run(ONE_TEST, workers=workers)
  assert result.returncode == 2
  assert "BUSI_TEST_WORKERS must be a whole number up to 999" in result.stderr
  assert "passed" not in result.stdout
