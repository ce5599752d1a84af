"""The import contract (.importlinter): schemas ← busi_core ← reporting ←
{beam_pipeline, training}, and no import cycle inside a package."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("schemas", "busi_core", "reporting", "beam_pipeline", "training")


def _lint(cwd: str) -> subprocess.CompletedProcess:
  linter = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  env = dict(os.environ, PYTHONPATH=cwd)
  return subprocess.run([linter, "--no-cache"], cwd=cwd, env=env,
                        capture_output=True, text=True, check=False)


def _copy_tree(tmp_path) -> str:
  root = str(tmp_path / "tree")
  os.makedirs(root)
  shutil.copy(os.path.join(ROOT, ".importlinter"), root)
  for package in PACKAGES:
    shutil.copytree(os.path.join(ROOT, package), os.path.join(root, package),
                    ignore=shutil.ignore_patterns("__pycache__"))
  return root


def test_the_project_keeps_its_import_contract():
  result = _lint(ROOT)
  assert result.returncode == 0, result.stdout[-3000:]
  assert "2 kept, 0 broken" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module,line,broken", [
    # training reaching into the pipeline: the package cycle issue 14 removed.
    ("training/data.py", "from beam_pipeline import pipeline",
     "beam_pipeline | training"),
    # The shared layer importing what sits on it.
    ("busi_core/artifact.py", "from training import model",
     "busi_core"),
    # A module cycle inside one package, hidden in a function.
    ("beam_pipeline/scoring_pipeline.py",
     "def _late():\n  from beam_pipeline import pipeline",
     "No import cycles"),
])
def test_adding_a_cycle_back_breaks_the_contract(tmp_path, module, line,
                                                 broken):
  root = _copy_tree(tmp_path)
  with open(os.path.join(root, module), "a", encoding="utf-8") as f:
    f.write(f"\n\n{line}\n")
  result = _lint(root)
  assert result.returncode != 0
  assert "1 broken" in result.stdout
  assert broken in result.stdout.split("Broken contracts")[-1]
