"""Writes constraints.txt: the exact versions the project's venv resolved.

Run with the venv's Python after a fresh `scripts/ensure_env.sh` (with
constraints.txt emptied, or after widening a range in setup.py):

  .venv/bin/python scripts/freeze_constraints.py > constraints.txt

It keeps the lines of `pip freeze --all --exclude-editable` that the project
and its test extras need (the requirement closure of busi-scoring[test], markers
evaluated here), so a package installed by hand does not become a pin. With
--cuda (needs the package index) it adds the CUDA wheels that the Dockerfile's
`tensorflow[and-cuda]` resolves to beside these pins, marked linux-only.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "busi-scoring"
ROOT_EXTRAS = ("test",)
# Pins that are not what the venv happens to hold. setuptools comes with the
# venv (ensurepip's copy: 65.5.0 in CPython 3.11.7), not from resolution,
# and it matters at run time: Beam's TF model handler imports tensorflow_hub,
# which imports pkg_resources. 65.5.0's pkg_resources fails on Python 3.12+
# (pkgutil.ImpImporter is gone), 80.9+ warns on import with a UserWarning and
# 82+ has no pkg_resources at all; 80.8.0 imports on 3.11 to 3.13, warns
# only with a DeprecationWarning, and has the fixes for CVE-2024-6345 and
# CVE-2025-47273.
OVERRIDES = {"setuptools": "80.8.0"}
# Pins that differ by Python: what the frozen version is marked with, and the
# lines for the other Pythons, each resolved there with these pins (pip
# install --dry-run --report -c constraints.txt on that interpreter). Beam
# 2.77 asks for google-apitools<0.5.32 below 3.13 and >=0.5.35 from 3.13.
PER_PYTHON = {"google-apitools": ('python_version < "3.13"', [
    'google-apitools==0.5.35 ; python_version >= "3.13"'])}


def closure(project: str, extras) -> set:
  """Canonical names of project and everything it needs with those extras."""
  seen, todo, names = set(), [(project, frozenset(extras))], set()
  while todo:
    name, wanted = todo.pop()
    if (canonicalize_name(name), wanted) in seen:
      continue
    seen.add((canonicalize_name(name), wanted))
    try:
      dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
      continue  # a marker-excluded or optional requirement not installed
    names.add(canonicalize_name(dist.metadata["Name"]))
    for line in dist.requires or []:
      req = Requirement(line)
      if req.marker and not any(req.marker.evaluate({"extra": e})
                                for e in (wanted or {""})):
        continue
      todo.append((req.name, frozenset(req.extras)))
  names.discard(canonicalize_name(project))
  return names


def frozen() -> list:
  out = subprocess.run(
      [sys.executable, "-m", "pip", "freeze", "--all",
       "--exclude-editable"],
      check=True, capture_output=True, text=True).stdout
  pins = []
  for line in out.splitlines():
    if "==" in line:
      name = line.split("==")[0]
      version = OVERRIDES.get(canonicalize_name(name))
      pins.append(f"{name}=={version}" if version else line)
  return pins


def cuda_pins(pins: list) -> list:
  """The nvidia-* wheels tensorflow[and-cuda] resolves to with these pins."""
  tf = next(l for l in pins if canonicalize_name(l.split("==")[0]) ==
            "tensorflow")
  with tempfile.TemporaryDirectory() as tmp:
    constraints = Path(tmp, "c.txt")
    constraints.write_text("\n".join(pins) + "\n")
    report = Path(tmp, "report.json")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
         "--ignore-installed", "--report", str(report), "-c", str(constraints),
         tf.replace("tensorflow==", "tensorflow[and-cuda]==")], check=True)
    installs = json.loads(report.read_text())["install"]
  return sorted(f'{i["metadata"]["name"]}=={i["metadata"]["version"]}'
                f' ; sys_platform == "linux"' for i in installs
                if i["metadata"]["name"].startswith("nvidia-"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cuda", action="store_true",
                      help="also pin the Dockerfile's CUDA wheels (network)")
  args = parser.parse_args()
  needed = closure(PROJECT, ROOT_EXTRAS)
  pins = sorted((l for l in frozen()
                 if canonicalize_name(l.split("==")[0]) in needed),
                key=lambda l: canonicalize_name(l.split("==")[0]))
  missing = needed - {canonicalize_name(l.split("==")[0]) for l in pins}
  if missing:
    sys.exit(f"not installed, cannot pin: {sorted(missing)}")
  py = ".".join(platform.python_version_tuple()[:2])
  print(f"""\
# The exact versions of everything busi-scoring[test] needs: the one place
# they live (setup.py keeps ranges, for Dataflow workers). Frozen on
# CPython {py} ({sys.platform} {platform.machine()}) by
#   .venv/bin/python scripts/freeze_constraints.py --cuda > constraints.txt
# and checked to resolve on every Python setup.py's python_requires admits.
# Used with `pip install -c constraints.txt` by scripts/ensure_env.sh and the
# Dockerfile; tests/test_pins.py checks setup.py and the Dockerfile agree.
# Python: {py}""")
  for line in pins:
    name = canonicalize_name(line.split("==")[0])
    if name in PER_PYTHON:
      marker, others = PER_PYTHON[name]
      print(f"{line} ; {marker}")
      print("\n".join(others))
    else:
      print(line)
  if args.cuda:
    print("# CUDA wheels of the Dockerfile's tensorflow[and-cuda] (GPU image)")
    print("\n".join(cuda_pins(pins)))


if __name__ == "__main__":
  main()
