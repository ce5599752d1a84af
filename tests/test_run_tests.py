"""./run_tests.sh: how many worker processes it runs the tests in."""

import importlib.util
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_TEST = "tests/test_pins.py::test_each_package_is_pinned_once_per_python"


def _test_workers():
  spec = importlib.util.spec_from_file_location(
      "test_workers", os.path.join(REPO, "scripts", "test_workers.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


test_workers = _test_workers()


@pytest.mark.parametrize("cpu_max, quota", [
    ("max 100000\n", None),
    ("200000 100000\n", 2),
    ("150000 100000\n", 2),  # 1.5 CPUs: a second worker still gets half
    ("50000 100000\n", 1),
    ("", None),
    ("garbage\n", None),
    ("100000 0\n", None),
])
def test_a_cgroup_quota_is_read_as_whole_cpus(tmp_path, cpu_max, quota):
  path = tmp_path / "cpu.max"
  path.write_text(cpu_max)
  assert test_workers.quota_cpus(str(path)) == quota


def test_the_default_count_is_the_usable_cpus_within_the_quota_at_most_4(
    tmp_path, monkeypatch):
  path = tmp_path / "cpu.max"
  path.write_text("max 100000\n")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)))
  assert test_workers.default_workers(str(path)) == 3
  assert test_workers.default_workers(str(tmp_path / "none")) == 3
  path.write_text("200000 100000\n")
  assert test_workers.default_workers(str(path)) == 2
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
  path.write_text("max 100000\n")
  assert test_workers.default_workers(str(path)) == test_workers.MOST == 4
  monkeypatch.delattr(os, "sched_getaffinity")
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  assert test_workers.default_workers(str(path)) == 2
  monkeypatch.setattr(os, "cpu_count", lambda: None)
  assert test_workers.default_workers(str(path)) == 1


def _run(*args, workers=None):
  """run_tests.sh on one test (its venv installed: `installed_venv`); slow,
  as it starts pytest again."""
  env = dict(os.environ)
  for name in ("BUSI_TEST_WORKERS", "PYTEST_ADDOPTS"):
    env.pop(name, None)
  if workers is not None:
    env["BUSI_TEST_WORKERS"] = workers
  return subprocess.run(
      ["bash", "run_tests.sh", *args], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.usefixtures("installed_venv")
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


@pytest.mark.slow
@pytest.mark.usefixtures("installed_venv")
@pytest.mark.parametrize("workers", ["two", "-1", "2.5", "1000"])
def test_a_worker_count_that_is_not_a_whole_number_is_refused(workers):
  result = _run(ONE_TEST, workers=workers)
  assert result.returncode == 2
  assert "BUSI_TEST_WORKERS must be a whole number up to 999" in result.stderr
  assert "passed" not in result.stdout
