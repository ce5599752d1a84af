"""Prints how many pytest-xdist workers ./run_tests.sh starts by default.

The CPUs this process may run on (its affinity, else the machine's count),
no more than its cgroup's CPU quota allows (a container's `--cpus`: each
worker loads TensorFlow, so workers beyond the quota only compete for it),
no more than the memory it may still use holds at WORKER_BYTES a worker
(the least of /proc/meminfo's MemAvailable and, at each level of its cgroup,
the limit less the usage net of inactive file cache: a container's
`--memory`), at most MOST, at least one.

cgroup v2 (`cpu.max`, `memory.max`, `memory.current`) and v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`, `memory.limit_in_bytes`,
`memory.usage_in_bytes`) are read along the process's own cgroup path
(/proc/self/cgroup) up to the hierarchy's root: a limit on a parent binds
too. Anything unreadable counts as no limit.
"""

import math
import os
import sys

MOST = 4
# The largest test process measured: 2.9 GB peak RSS (`/usr/bin/time -v
# ./run_tests.sh --all`, 2 workers, 2026-12-07), rounded up.
WORKER_BYTES = 3 * 2**30
ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
MEMINFO = "/proc/meminfo"
# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages).
V1_UNLIMITED = 2**60


def _read(path):
  try:
    with open(path, encoding="ascii") as f:
      return f.read()
  except (OSError, UnicodeDecodeError):
    return None


def _number(path):
  text = _read(path)
  try:
    return int(text.split()[0]) if text else None
  except ValueError:
    return None


def cgroup_dirs(root=ROOT, proc_cgroup=PROC_CGROUP):
  """{controller: [directories]} of this process's cgroups, innermost first,
  up to each hierarchy's root: "" for v2's unified hierarchy, else the v1
  controller ("cpu", "memory")."""
  text = _read(proc_cgroup) or ""
  found = {}
  for line in text.splitlines():
    parts = line.split(":", 2)
    if len(parts) != 3:
      continue
    _, controllers, path = parts
    names = [""] if controllers == "" else controllers.split(",")
    for name in names:
      if name not in ("", "cpu", "memory"):
        continue
      base = root if name == "" else os.path.join(root, name)
      if name == "" and not os.path.exists(
          os.path.join(root, "cgroup.controllers")):
        base = os.path.join(root, "unified")  # v2 mounted beside v1
      dirs = []
      rel = path.strip("/")
      while True:
        dirs.append(os.path.join(base, rel) if rel else base)
        if not rel:
          break
        rel = os.path.dirname(rel)
      found[name] = dirs
  return found


def quota_cpus(directory):
  """CPUs a cgroup directory's quota allows (rounded up), or None where it
  has no quota or none can be read: v2 `cpu.max` ("QUOTA PERIOD" or "max
  PERIOD"), else v1 `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`."""
  text = _read(os.path.join(directory, "cpu.max"))
  try:
    if text is not None:
      quota, period = text.split()[:2]
      if quota == "max":
        return None
      quota, period = int(quota), int(period)
    else:
      quota = _number(os.path.join(directory, "cpu.cfs_quota_us"))
      period = _number(os.path.join(directory, "cpu.cfs_period_us"))
      if quota is None or period is None or quota < 0:
        return None
    return max(1, math.ceil(quota / period))
  except (ValueError, ZeroDivisionError):
    return None


def _stat(directory, key):
  """A `memory.stat` field in bytes, or 0."""
  text = _read(os.path.join(directory, "memory.stat")) or ""
  for line in text.splitlines():
    name, _, value = line.partition(" ")
    if name == key:
      try:
        return int(value)
      except ValueError:
        return 0
  return 0


def memory_left(directory):
  """Bytes a cgroup directory's limit leaves (limit less usage), or None
  where it has no limit or none can be read (v2 `memory.max`, v1
  `memory.limit_in_bytes`). Usage counts page cache, which a long-lived
  container fills up to its limit; the inactive file cache (memory.stat's
  `inactive_file`, v1 `total_inactive_file`) is reclaimed when needed, so
  it counts as free, as `docker stats` and the kubelet count it."""
  text = _read(os.path.join(directory, "memory.max"))
  if text is not None:
    if text.strip() == "max":
      return None
    limit = _number(os.path.join(directory, "memory.max"))
    used = _number(os.path.join(directory, "memory.current"))
    cache = _stat(directory, "inactive_file")
  else:
    limit = _number(os.path.join(directory, "memory.limit_in_bytes"))
    used = _number(os.path.join(directory, "memory.usage_in_bytes"))
    cache = _stat(directory, "total_inactive_file")
    if limit is not None and limit >= V1_UNLIMITED:
      return None
  if limit is None:
    return None
  return max(0, limit - max(0, (used or 0) - cache))


def mem_available(meminfo=MEMINFO):
  """/proc/meminfo's MemAvailable in bytes, or None."""
  for line in (_read(meminfo) or "").splitlines():
    if line.startswith("MemAvailable:"):
      try:
        return int(line.split()[1]) * 1024
      except (IndexError, ValueError):
        return None
  return None


def _least(values):
  values = [v for v in values if v is not None]
  return min(values) if values else None


def default_workers(root=ROOT, proc_cgroup=PROC_CGROUP, meminfo=MEMINFO):
  usable = getattr(os, "sched_getaffinity", None)
  count = len(usable(0)) if usable else os.cpu_count() or 1
  dirs = cgroup_dirs(root, proc_cgroup)
  cpu_dirs = dirs.get("", []) + dirs.get("cpu", [])
  memory_dirs = dirs.get("", []) + dirs.get("memory", [])
  quota = _least(quota_cpus(d) for d in cpu_dirs)
  if quota is not None:
    count = min(count, quota)
  memory = _least([mem_available(meminfo)] +
                  [memory_left(d) for d in memory_dirs])
  if memory is not None:
    count = min(count, memory // WORKER_BYTES)
  return max(1, min(count, MOST))


if __name__ == "__main__":
  print(default_workers(*sys.argv[1:]))
