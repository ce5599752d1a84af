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
def test_a_cgroup_v2_quota_is_read_as_whole_cpus(tmp_path, cpu_max, quota):
  (tmp_path / "cpu.max").write_text(cpu_max)
  assert test_workers.quota_cpus(str(tmp_path)) == quota


@pytest.mark.parametrize("quota_us, period_us, quota", [
    ("-1\n", "100000\n", None),
    ("250000\n", "100000\n", 3),
    ("100000\n", None, None),
    ("x\n", "100000\n", None),
])
def test_a_cgroup_v1_quota_is_read_as_whole_cpus(tmp_path, quota_us, period_us,
                                                 quota):
  (tmp_path / "cpu.cfs_quota_us").write_text(quota_us)
  if period_us is not None:
    (tmp_path / "cpu.cfs_period_us").write_text(period_us)
  assert test_workers.quota_cpus(str(tmp_path)) == quota


GiB = 2**30


@pytest.mark.parametrize("files, left", [
    ({"memory.max": "max\n", "memory.current": "5\n"}, None),
    ({"memory.max": f"{8 * GiB}\n", "memory.current": f"{GiB}\n"}, 7 * GiB),
    ({"memory.max": f"{GiB}\n", "memory.current": f"{2 * GiB}\n"}, 0),
    ({"memory.max": "garbage\n"}, None),
    ({"memory.limit_in_bytes": "9223372036854771712\n",
      "memory.usage_in_bytes": "5\n"}, None),
    ({"memory.limit_in_bytes": f"{4 * GiB}\n",
      "memory.usage_in_bytes": f"{GiB}\n"}, 3 * GiB),
    # Inactive file cache is reclaimable: it counts as free.
    ({"memory.max": f"{8 * GiB}\n", "memory.current": f"{7 * GiB}\n",
      "memory.stat": f"anon {GiB}\ninactive_file {5 * GiB}\n"
                     f"active_file {GiB}\n"}, 6 * GiB),
    ({"memory.limit_in_bytes": f"{8 * GiB}\n",
      "memory.usage_in_bytes": f"{8 * GiB}\n",
      "memory.stat": f"inactive_file {GiB}\ntotal_inactive_file"
                     f" {6 * GiB}\n"}, 6 * GiB),
    ({}, None),
])
def test_a_cgroup_memory_limit_leaves_its_limit_less_its_usage(tmp_path, files,
                                                               left):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  assert test_workers.memory_left(str(tmp_path)) == left


def _cgroups(tmp_path, proc_cgroup, files, meminfo_gib=64):
  """A fake /sys/fs/cgroup under tmp_path, /proc/self/cgroup and
  /proc/meminfo; returns default_workers' three paths."""
  root = tmp_path / "cgroup"
  root.mkdir(parents=True)
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
  (tmp_path / "proc_cgroup").write_text(proc_cgroup)
  (tmp_path / "meminfo").write_text(
      f"MemTotal: {2 * meminfo_gib * 2**20} kB\n"
      f"MemAvailable: {meminfo_gib * 2**20} kB\n")
  return (str(root), str(tmp_path / "proc_cgroup"), str(tmp_path / "meminfo"))


def test_the_default_count_is_the_usable_cpus_within_limits_at_most_4(
    tmp_path, monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)))
  nothing = _cgroups(tmp_path / "none", "0::/\n", {})
  assert test_workers.default_workers(*nothing) == 3
  assert test_workers.default_workers(
      str(tmp_path / "absent"), str(tmp_path / "absent"),
      str(tmp_path / "absent")) == 3
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
  assert test_workers.default_workers(*nothing) == test_workers.MOST == 4
  # cgroup v2 in a container: a quota on the parent of the process's group
  # binds, as does the memory the group has left (9 GiB: 3 workers).
  v2 = _cgroups(tmp_path / "v2", "0::/job/tests\n", {
      "cgroup.controllers": "cpu memory\n",
      "job/cpu.max": "200000 100000\n",
      "job/tests/cpu.max": "max 100000\n",
  })
  assert test_workers.default_workers(*v2) == 2
  v2 = _cgroups(tmp_path / "v2m", "0::/job\n", {
      "cgroup.controllers": "cpu memory\n",
      "job/memory.max": f"{10 * GiB}\n",
      "job/memory.current": f"{GiB}\n",
  })
  assert test_workers.default_workers(*v2) == 3
  # cgroup v1 (v2 mounted beside it under unified/): the cpu and memory
  # controllers' own paths.
  v1 = _cgroups(tmp_path / "v1", (
      "4:memory:/api/abc\n1:cpu,cpuacct:/\n0::/\n"), {
          "unified/cgroup.procs": "",
          "cpu/cpu.cfs_quota_us": "-1\n",
          "cpu/cpu.cfs_period_us": "100000\n",
          "memory/api/abc/memory.limit_in_bytes": f"{8 * GiB}\n",
          "memory/api/abc/memory.usage_in_bytes": f"{2 * GiB}\n",
          "memory/memory.limit_in_bytes": "9223372036854771712\n",
      })
  assert test_workers.default_workers(*v1) == 2
  # MemAvailable binds where no cgroup does; never fewer than one worker.
  assert test_workers.default_workers(
      *_cgroups(tmp_path / "m", "0::/\n", {}, meminfo_gib=7)) == 2
  assert test_workers.default_workers(
      *_cgroups(tmp_path / "m1", "0::/\n", {}, meminfo_gib=1)) == 1
  monkeypatch.delattr(os, "sched_getaffinity")
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  assert test_workers.default_workers(*nothing) == 2
  monkeypatch.setattr(os, "cpu_count", lambda: None)
  assert test_workers.default_workers(*nothing) == 1


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
