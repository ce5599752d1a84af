"""Grad-CAM: peaks where the model's evidence is, and overlays in scoring."""

import os

import keras
import numpy as np
import pytest

import schemas
from beam_pipeline import pipeline
from tests import archive_factory as af
from tests.pipeline_helpers import read_errors, sql
from busi_core import gradcam
from training import model as model_lib
from training import testing as training_testing

SIZE = 32


def _lesion_images(rng, count, lesion):
  """Grey speckle; with `lesion`, a bright square in the top-left quadrant."""
  images = rng.integers(60, 90, (count, SIZE, SIZE, 3)).astype(np.uint8)
  if lesion:
    images[:, 4:12, 4:12, :] = 250
  return images


@pytest.mark.slow
def test_gradcam_peaks_on_the_learned_lesion():
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  model = model_lib.build_model(SIZE, "none", 3, "tiny")
  for layer in model.layers:
    layer.trainable = True
  model.compile(keras.optimizers.Adam(3e-3), "categorical_crossentropy")
  x = np.concatenate([_lesion_images(rng, 64, True),
                      _lesion_images(rng, 64, False)])
  y = keras.utils.to_categorical([2] * 64 + [0] * 64, 3)
  model.fit(x, y, epochs=25, batch_size=32, verbose=0)
  test = _lesion_images(rng, 4, True)
  maps = gradcam.heatmaps(model, test, [2] * 4)
  assert maps.shape == (4, SIZE, SIZE)
  assert 0.0 <= maps.min() and maps.max() <= 1.0 + 1e-6
  for heat in maps:
    inside = heat[2:14, 2:14].mean()
    outside = heat[18:, 18:].mean()
    assert inside > 2 * outside, (inside, outside)
  png = gradcam.overlay_png(test[0], maps[0])
  assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_gradcam_uri_exactly_for_chosen_images(tmp_path):
  model_dir = str(tmp_path / "model")
  training_testing.make_test_artifact(model_dir, image_size=SIZE)
  rng = np.random.default_rng(1)
  entries = [af.Entry(f"{cls}/{cls} ({i}).png", af.png(af.speckle(
      rng, 40, 40)), "image", cls) for cls in schemas.LABELS for i in range(3)]
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, entries)
  argv = ["run", "--input", archive, "--model", model_dir, "--batch_size", "4"]
  pipeline.run(argv + ["--output", str(tmp_path / "plain")])
  confidences = sorted(r[0] for r in sql(
      f"SELECT confidence FROM read_parquet('{tmp_path}/plain/predictions/"
      "*.parquet')"))
  # A threshold between the confidences, so some images are flagged and some
  # are not.
  threshold = (confidences[3] + confidences[4]) / 2
  out = str(tmp_path / "out")
  manifest = pipeline.run(argv + ["--output", out, "--gradcam", "flagged",
                                  "--threshold", repr(threshold)])
  assert manifest["counts"]["predictions"] == 9
  assert read_errors(out) == []
  rows = sql(f"SELECT low_confidence, gradcam_uri FROM"
             f" read_parquet('{out}/predictions/*.parquet')")
  assert len(rows) == 9 and 0 < sum(low for low, _ in rows) < 9
  for low, uri in rows:
    assert (uri is not None) == low
    if uri:
      assert uri.startswith(os.path.join(out, schemas.GRADCAM_DIR))
      assert open(uri, "rb").read(4) == b"\x89PNG"
  written = os.listdir(os.path.join(out, schemas.GRADCAM_DIR))
  assert len(written) == sum(low for low, _ in rows)


def test_wants_gradcam_modes():
  from beam_pipeline.scoring import wants_gradcam
  flagged_benign = {"low_confidence": True, "predicted_class": "benign"}
  sure_malignant = {"low_confidence": False, "predicted_class": "malignant"}
  assert [wants_gradcam(r, "flagged") for r in (flagged_benign,
                                                sure_malignant)] == [True,
                                                                     False]
  assert [wants_gradcam(r, "malignant") for r in (flagged_benign,
                                                  sure_malignant)] == [False,
                                                                       True]
  assert wants_gradcam(flagged_benign, "all")
  assert not wants_gradcam(sure_malignant, "none")
