"""`python -m beam_pipeline doctor` on this (CPU) machine, the Dockerfile's
smoke step that runs it, and the model handler's shared model (the path GPU
workers take)."""

import io
import os
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that

import schemas
from beam_pipeline import devices, doctor, model_handler
from tests import test_gpu_recipe
from training import testing as training_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("doctor") / "model")
  training_testing.make_test_artifact(path, image_size=16)
  return path


def _doctor(*argv):
  out, err = io.StringIO(), io.StringIO()
  status = doctor.main(list(argv), out=out, err=err)
  return status, out.getvalue(), err.getvalue()


def test_doctor_prints_build_devices_and_throughput(tiny_model):
  status, out, err = _doctor("--model", tiny_model, "--batch_size", "4",
                             "--batches", "2")
  assert status == doctor.EXIT_OK, err
  info = devices.build_info()
  assert f"TensorFlow {info['tensorflow']} built for" in out
  if info["is_cuda_build"]:
    assert f"CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}" in out
  assert "/physical_device:CPU:0" in out
  assert "(16x16, float32) loaded in" in out
  assert "2 batches of 4:" in out and out.rstrip().endswith("images/s")
  assert "WARNING" not in out  # a test artifact has none


def test_doctor_repeats_the_warnings_of_training(tiny_model, tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  warned = str(tmp_path / "warned")
  shutil.copytree(tiny_model, warned)
  path = os.path.join(warned, schemas.METADATA_FILE)
  with open(path, encoding="utf-8") as f:
    metadata = json.load(f)
  warning = "the model predicts normal for all 5 validation images"
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**metadata, "warnings": [warning]}, f)
  status, out, err = _doctor("--model", warned, "--batch_size", "2",
                             "--batches", "1")
  assert status == doctor.EXIT_OK, err
  assert (f"\nWARNING: The model {metadata['model_version']} carries a"
          f" warning from the training of its weights: {warning}\n") in out


def test_doctor_fails_in_one_line_without_the_model_or_the_gpu(tmp_path):
  status, _, err = _doctor("--model", str(tmp_path / "none"))
  assert status == doctor.EXIT_FAILED
  assert err.count("\n") == 1 and err.startswith(
      f"error: the model in {tmp_path / 'none'} does not load or run:")
  if any(d.kind == "GPU" for d in devices.visible_devices()):
    pytest.skip("this machine has a GPU")
  status, out, err = _doctor("--require_gpu")
  assert status == doctor.EXIT_FAILED
  assert "No GPU" in out
  assert err.count("\n") == 1 and "TensorFlow sees no GPU" in err


@pytest.mark.slow
def test_dockerfile_smoke_step_runs(tmp_path):
  with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
    command = test_gpu_recipe.smoke_step(f.read())
  # As `docker build` runs it (/bin/sh -c), with this checkout's packages
  # standing in for the image's installed ones.
  env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=str(tmp_path),
             PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ["PATH"])
  done = subprocess.run(["/bin/sh", "-c", command], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "images/s" in done.stdout
  assert os.listdir(tmp_path) == [], "the smoke step cleans up"


# What the model handler's inference function was given (module-level: the
# pipeline pickles the handler, and a module function by reference).
MODELS_SEEN = []


def _recording_fn(model, batch, inference_args=None, model_id=None):
  MODELS_SEEN.append(type(model).__name__)
  return model_handler.compiled_inference_fn(model, batch, inference_args,
                                             model_id)


@pytest.mark.slow
def test_shared_model_copy_scores_through_runinference(tiny_model):
  """model_copies=1 (GPU workers' default): Beam serves the model from a
  process of its own and hands RunInference a proxy."""
  rng = np.random.default_rng(0)
  images = [(f"k{i}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            for i in range(5)]
  handler = model_handler.keyed_handler(tiny_model, batch_size=2,
                                        model_copies=1)
  assert handler.share_model_across_processes()
  assert handler.model_copies() == 1
  del MODELS_SEEN[:]
  handler._unkeyed._inference_fn = _recording_fn  # pylint: disable=protected-access

  def check(results):
    assert sorted(k for k, _ in results) == [k for k, _ in images]
    for _, result in results:
      probabilities = result.inference.probabilities
      assert probabilities.shape == (len(schemas.LABELS),)
      assert abs(float(np.sum(probabilities)) - 1.0) < 1e-4

  with test_pipeline.TestPipeline() as p:
    scored = (p | beam.Create(images)
              | RunInference(handler))
    assert_that(scored, check)
  # The model came through Beam's cross-process proxy, not this process.
  assert MODELS_SEEN and set(MODELS_SEEN) == {"_AutoProxyWrapper"}
