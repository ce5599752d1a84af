"""constraints.txt, setup.py, the Dockerfile and ensure_env.sh agree.

constraints.txt is the one place exact versions live (README, "Pinned
versions"); setup.py keeps ranges for the Dataflow workers. Reads files only:
no network, no install.
"""

import ast
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _setup_values():
  """REQUIRED, EXTRAS and python_requires, read from setup.py's syntax."""
  tree = ast.parse((ROOT / "setup.py").read_text())
  values = {}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Assign) and len(node.targets) == 1 and
        isinstance(node.targets[0], ast.Name)):
      values[node.targets[0].id] = node.value
    elif isinstance(node, ast.keyword) and node.arg == "python_requires":
      values["python_requires"] = node.value
  return (ast.literal_eval(values["REQUIRED"]),
          ast.literal_eval(values["EXTRAS"]),
          ast.literal_eval(values["python_requires"]))


REQUIRED, EXTRAS, PYTHON_REQUIRES = _setup_values()


def _pins():
  """(canonical name, version, marker or None) for every constraints line."""
  pins = []
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    req = Requirement(line)
    (spec,) = req.specifier
    assert spec.operator == "==" and "*" not in spec.version, line
    assert not req.extras, line
    pins.append((canonicalize_name(req.name), spec.version, req.marker))
  return pins


PINS = _pins()


def _header(key):
  text = (ROOT / "constraints.txt").read_text()
  return re.search(rf"^# {key}: (\S+)$", text, re.M).group(1)


def _dockerfile():
  return (ROOT / "Dockerfile").read_text()


def _docker_arg(name):
  return re.search(rf"^ARG {name}=(\S+)$", _dockerfile(), re.M).group(1)


def _applies(marker, python):
  env = {"python_version": python, "python_full_version": f"{python}.99",
         "sys_platform": "linux", "platform_system": "Linux",
         "implementation_name": "cpython", "extra": ""}
  return marker is None or marker.evaluate(env)


def test_each_package_is_pinned_once_per_python():
  for python in ("3.11", "3.12", "3.13"):
    names = [n for n, _, m in PINS if _applies(m, python)]
    assert len(names) == len(set(names)), python


@pytest.mark.parametrize("line", REQUIRED + [r for extra in EXTRAS.values()
                                            for r in extra])
def test_setup_ranges_admit_the_pins(line):
  req = Requirement(line)
  versions = [v for n, v, _ in PINS if n == canonicalize_name(req.name)]
  assert versions, f"{req.name} has no pin in constraints.txt"
  for version in versions:
    assert req.specifier.contains(version, prereleases=True), (
        f"setup.py's {line!r} refuses the pin {req.name}=={version}")


def test_python_requires_admits_the_pinned_python_and_refuses_unfixed_ones():
  spec = SpecifierSet(PYTHON_REQUIRES)
  python = _header("Python")
  assert spec.contains(f"{python}.99")  # the newest patch of that minor
  # Beam 2.77 and TensorFlow 2.21 both have wheels for 3.10 to 3.13.
  for version in ("3.11.8", "3.12.2", "3.13.0", "3.13.9"):
    assert spec.contains(version), version
  # Without zipfile's CVE-2024-0450 fix, or without TensorFlow wheels.
  for version in ("3.10.14", "3.11.7", "3.12.0", "3.12.1", "3.14.0"):
    assert not spec.contains(version), version


def test_dockerfile_versions_are_the_pins():
  pins = {n: v for n, v, m in PINS if _applies(m, _header("Python"))}
  assert _docker_arg("BEAM_VERSION") == pins["apache-beam"]
  assert _docker_arg("PYTHON_VERSION") == _header("Python")
  # Any version spelled in the file is a pin; no range, no second copy.
  for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([\w.]+)",
                                  _dockerfile()):
    assert pins.get(canonicalize_name(name)) == version, (name, version)


def test_every_dockerfile_pip_install_uses_the_constraints():
  lines = [l for l in _dockerfile().splitlines()
           if "pip install" in l and not l.lstrip().startswith("#")]
  assert lines
  for line in lines:
    assert "-c constraints.txt" in line, line
  assert re.search(r"^COPY constraints\.txt ", _dockerfile(), re.M)


def test_ensure_env_installs_with_the_constraints_and_hashes_them():
  script = (ROOT / "scripts" / "ensure_env.sh").read_text()
  assert 'CONSTRAINTS="$ROOT/constraints.txt"' in script
  install = [l for l in script.splitlines() if "pip install" in l and
             "-e " not in l and "--upgrade pip" not in l]
  assert any('-c "$CONSTRAINTS"' in l for l in install), install
  stamp = next(l for l in script.splitlines() if l.startswith("STAMP="))
  assert '"$ROOT/setup.py"' in stamp and '"$CONSTRAINTS"' in stamp


def test_ensure_env_judges_this_python_as_setup_py_does():
  # The interpreter check in ensure_env.sh (no `packaging` there) must agree
  # with packaging's reading of python_requires for the Python running this.
  script = (ROOT / "scripts" / "ensure_env.sh").read_text()
  function = re.search(r"^_busi_python_status\(\) \{.*?^\}$", script,
                       re.M | re.S).group(0)
  status = subprocess.run(
      ["bash", "-c", f'ROOT="$1"\n{function}\n_busi_python_status "$2"',
       "bash", str(ROOT), sys.executable],
      check=True, capture_output=True, text=True).stdout.strip()
  admitted = SpecifierSet(PYTHON_REQUIRES).contains(platform.python_version())
  assert (status == "admitted") == admitted, status
  assert status in ("admitted", "patched", "unpatched")


def test_this_venv_holds_the_pinned_versions():
  # What the venv resolved for busi-scoring[test] is what constraints.txt
  # says (ensure_env.sh installs with -c): a requirement added to setup.py
  # without a pin, or a stale venv, shows here.
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "freeze_constraints", ROOT / "scripts" / "freeze_constraints.py")
  freeze = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(freeze)
  try:
    metadata.distribution(freeze.PROJECT)
  except metadata.PackageNotFoundError:
    pytest.skip("busi-scoring is not installed in this interpreter")
  needed = freeze.closure(freeze.PROJECT, freeze.ROOT_EXTRAS)
  assert "apache-beam" in needed and "tensorflow" in needed
  python = ".".join(platform.python_version_tuple()[:2])
  pins = {n: v for n, v, m in PINS if _applies(m, python)}
  unpinned = sorted(needed - set(pins))
  assert not unpinned, f"installed but not in constraints.txt: {unpinned}"
  wrong = {n: (metadata.version(n), pins[n]) for n in needed
           if metadata.version(n) != pins[n]}
  assert not wrong, f"installed vs pinned: {wrong}"


def test_cuda_pins_are_linux_only_and_match_tensorflows_extra():
  # The Dockerfile's tensorflow[and-cuda]: pinned, for linux only (the dev
  # venv installs none of them).
  cuda = {n: (v, m) for n, v, m in PINS if n.startswith("nvidia-")}
  assert cuda
  for name, (_, marker) in cuda.items():
    assert marker == Marker('sys_platform == "linux"'), name
  try:
    requires = metadata.requires("tensorflow") or []
  except metadata.PackageNotFoundError:
    pytest.skip("tensorflow is not installed in this interpreter")
  extra = [Requirement(r) for r in requires
           if Requirement(r).marker and
           Requirement(r).marker.evaluate({"extra": "and-cuda"}) and
           not Requirement(r).marker.evaluate({"extra": ""})]
  assert extra
  for req in extra:
    name = canonicalize_name(req.name)
    assert name in cuda, f"tensorflow[and-cuda] needs {name}: not pinned"
    assert req.specifier.contains(cuda[name][0], prereleases=True), req
