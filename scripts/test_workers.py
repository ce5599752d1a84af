"""Prints how many pytest-xdist workers ./run_tests.sh starts by default.

The CPUs this process may run on (its affinity, else the machine's count),
no more than a cgroup v2 CPU quota allows (a container's `--cpus`: each worker
loads TensorFlow, so workers beyond the quota only compete for it), at most
MOST.
"""

import math
import os
import sys

MOST = 4
CPU_MAX = "/sys/fs/cgroup/cpu.max"


def quota_cpus(path=CPU_MAX):
  """CPUs the cgroup's "QUOTA PERIOD" line allows (rounded up), or None
  where there is no quota ("max") or no readable file."""
  try:
    with open(path, encoding="ascii") as f:
      quota, period = f.read().split()[:2]
    if quota == "max":
      return None
    return max(1, math.ceil(int(quota) / int(period)))
  except (OSError, ValueError, ZeroDivisionError):
    return None


def default_workers(path=CPU_MAX):
  usable = getattr(os, "sched_getaffinity", None)
  count = len(usable(0)) if usable else os.cpu_count() or 1
  quota = quota_cpus(path)
  if quota is not None:
    count = min(count, quota)
  return min(count, MOST)


if __name__ == "__main__":
  print(default_workers(*sys.argv[1:]))
