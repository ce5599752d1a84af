"""Reduced-precision inference and backend-neutral artifacts."""

import os
import subprocess
import sys

import numpy as np
import pytest

from busi_core.inference import compiled_call
from busi_core.precision import with_precision
from busi_core import artifact
from training import testing as training_testing


def test_bfloat16_close_to_float32(tmp_path):
  training_testing.make_test_artifact(str(tmp_path), image_size=32,
                                      backbone="vgg16")
  model = artifact.load_artifact(str(tmp_path)).model
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  full = compiled_call(model)(images).numpy()
  half_model = with_precision(model, "bfloat16")
  half = compiled_call(half_model)(images).numpy()
  assert half.dtype == np.float32  # softmax kept in float32
  np.testing.assert_allclose(half.sum(axis=1), 1.0, atol=1e-5)
  assert np.abs(half - full).max() < 0.05
  assert with_precision(model, "float32") is model
  dense = [layer for layer in half_model.layers
           if layer.__class__.__name__ == "Conv2D"]
  assert dense and all(layer.compute_dtype == "bfloat16" for layer in dense)


@pytest.mark.slow
def test_artifact_loads_on_another_keras_backend(tmp_path):
  """model.keras has no TensorFlow-only layer: Keras' JAX backend loads it
  and computes the same probabilities."""
  training_testing.make_test_artifact(str(tmp_path), image_size=32)
  model = artifact.load_artifact(str(tmp_path)).model
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  expected = np.asarray(model(images))
  script = (
      "import sys, numpy as np, keras, busi_core.layers\n"
      "assert keras.backend.backend() == 'jax'\n"
      "m = keras.saving.load_model(sys.argv[1], safe_mode=True, compile=False)\n"
      "x = np.load(sys.argv[2])\n"
      "np.save(sys.argv[3], np.asarray(m.predict(x, verbose=0)))\n")
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-c", script, str(tmp_path / "model.keras"),
       str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
      env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected,
                             atol=1e-4)
