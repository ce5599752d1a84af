"""flex/metadata.json and the template's launcher agree with the pipeline's
flags."""

import argparse
import json
import os
import re

import pytest

from beam_pipeline import flex_template, options as opts_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METADATA = os.path.join(ROOT, "flex", "metadata.json")
REGENERATE = ("regenerate it: python -m beam_pipeline.flex_template >"
              " flex/metadata.json")


@pytest.fixture(scope="module")
def committed():
  with open(METADATA, encoding="utf-8") as f:
    return json.load(f)


def _busi_flags():
  parser = argparse.ArgumentParser(add_help=False)
  opts_lib.BusiOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return {a.dest for a in parser._actions}  # pylint: disable=protected-access


def test_every_run_flag_is_a_parameter_and_nothing_else(committed):
  names = [p["name"] for p in committed["parameters"]]
  assert len(names) == len(set(names)), "a parameter is listed twice"
  missing = set(opts_lib.COMMAND_FLAGS[opts_lib.RUN]) - set(names)
  assert not missing, f"flags missing from flex/metadata.json: {missing}; " + (
      REGENERATE)
  unknown = set(names) - (_busi_flags() &
                          set(opts_lib.COMMAND_FLAGS[opts_lib.RUN]))
  assert not unknown, (f"flex/metadata.json names flags `run` does not take:"
                       f" {unknown}; " + REGENERATE)


def test_metadata_is_what_the_options_generate(committed):
  assert committed == flex_template.metadata(), REGENERATE


def test_metadata_has_dataflows_fields(committed):
  assert committed["name"] and committed["description"]
  for parameter in committed["parameters"]:
    assert set(parameter) <= {"name", "label", "helpText", "isOptional",
                              "regexes"}, parameter
    assert parameter["label"] and parameter["helpText"], parameter
    for regex in parameter.get("regexes", []):
      re.compile(regex)
  required = {p["name"] for p in committed["parameters"]
              if not p["isOptional"]}
  assert required == {"input", "output", "model"}


def _accepts(committed, name, value):
  parameter = next(p for p in committed["parameters"] if p["name"] == name)
  return all(re.fullmatch(r, value) for r in parameter.get("regexes", []))


def test_patterns_take_the_values_the_flags_take(committed):
  assert _accepts(committed, "batch_size", "64")
  assert not _accepts(committed, "batch_size", "64.5")
  assert _accepts(committed, "threshold", "0.85")
  assert _accepts(committed, "gradcam", "flagged")
  assert not _accepts(committed, "gradcam", "some")
  assert _accepts(committed, "overwrite", "true")
  assert _accepts(committed, "input", "gs://b/archives/*.zip")
  assert not _accepts(committed, "output", "/local/dir")
  assert _accepts(committed, "inference_accelerator", opts_lib.GPU_RECIPE)
  assert _accepts(committed, "skip_scored", "gs://b/runs/2026-*")
  assert not _accepts(committed, "skip_scored", "runs/2026-*")


def test_help_texts_describe_a_template_run(committed):
  """One value a parameter, gs:// paths, no launcher environment: the
  command line's help says otherwise in places."""
  helps = {p["name"]: p["helpText"] for p in committed["parameters"]}
  for name in ("input", "output", "model", "skip_scored"):
    assert "gs://" in helps[name] and "local" not in helps[name].lower(), (
        name)
  assert "repeatable" not in " ".join(helps.values())
  assert "launcher environment" in helps["study_hmac_key"]
  assert not any(text.startswith(("preprocess/", "score/"))
                 for text in helps.values())


def test_launcher_argv_is_a_run_command():
  argv = flex_template.launcher_argv(
      ["--input=gs://b/a.zip", "--overwrite=true", "--runner=DataflowRunner",
       "--batch_size=64"], environ={flex_template.WORKER_IMAGE_ENV: "img:1"})
  assert argv == ["run", "--input=gs://b/a.zip", "--overwrite",
                  "--runner=DataflowRunner", "--batch_size=64",
                  "--sdk_container_image=img:1"]
  # A switch set to false is left out; an image the run names is kept.
  assert flex_template.launcher_argv(
      ["--overwrite=false", "--sdk_container_image=other:2"],
      environ={flex_template.WORKER_IMAGE_ENV: "img:1"}) == [
          "run", "--sdk_container_image=other:2"]
  assert flex_template.launcher_argv(["--input=x"], environ={}) == [
      "run", "--input=x"]
  with pytest.raises(ValueError, match="true or false"):
    flex_template.launcher_argv(["--overwrite=yes"], environ={})


def test_launcher_dockerfile_runs_the_template_entry_point_from_the_worker_image():
  with open(os.path.join(ROOT, "flex", "Dockerfile"), encoding="utf-8") as f:
    dockerfile = f.read()
  froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
  assert froms == ["${LAUNCHER_BASE}", "${WORKER_IMAGE}"]
  assert re.search(r"^ARG LAUNCHER_BASE=gcr\.io/dataflow-templates-base/"
                   r"python311-template-launcher-base:", dockerfile, re.M)
  env = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", dockerfile).group(1)
  copied = re.search(r"^COPY (\S+) " + re.escape(env) + "$", dockerfile,
                     re.M).group(1)
  assert os.path.isfile(os.path.join(ROOT, copied))
  assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE=" not in dockerfile
  assert f"{flex_template.WORKER_IMAGE_ENV}=${{WORKER_IMAGE}}" in dockerfile
  # The template's Python version is the worker image's (../Dockerfile).
  with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
    python = re.search(r"^ARG PYTHON_VERSION=3\.(\d+)", f.read(),
                       re.M).group(1)
  assert f"python3{python}-template-launcher-base" in dockerfile


@pytest.mark.slow
def test_template_entry_point_runs_the_run_command():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop(flex_template.WORKER_IMAGE_ENV, None)
  done = subprocess.run([sys.executable, os.path.join(ROOT, "flex", "main.py"),
                         "--help"], capture_output=True, text=True, env=env,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert "python -m beam_pipeline run" in done.stdout
  assert "--model_copies" in done.stdout
  done = subprocess.run([sys.executable, os.path.join(ROOT, "flex", "main.py"),
                         "--overwrite=maybe"], capture_output=True, text=True,
                        env=env, timeout=120, check=False)
  assert done.returncode == 2
  assert done.stderr.strip() == ("error: --overwrite takes true or false, not"
                                 " 'maybe'")
