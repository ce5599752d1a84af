"""Step: reload the saved artifact as scoring will and check its predictions.
"""

import os
from typing import Optional

import keras
import numpy as np

import schemas
from busi_core import artifact, inference, ood
from training import calibration, data as data_lib, model as model_lib
from training import ood_detector
from training.steps.measure import Scored

_CHECKED = 8  # images predicted again from the saved model


def _predict(model: keras.Model, images: np.ndarray,
             batch_size: int) -> np.ndarray:
  if not len(images):
    return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
  return model.predict(images, batch_size=batch_size, verbose=0)


def verify(model_dir: str, model: keras.Model, data: data_lib.LabelledData,
           scored: Scored, temperature: float, batch_size: int,
           detector: Optional[ood_detector.Detector] = None) -> None:
  """Checks the saved model predicts as the trained one does, and gives the
  calibrated probabilities the report was made from, on a few of the
  `scored` images; and that scoring's one forward pass over the saved
  artifact gives the OOD scores of the fitted detector.

  Raises:
    RuntimeError: it does not (metadata.json is then removed, so the
      directory no longer passes as an artifact).
  """
  loaded = artifact.load_artifact(model_dir)
  images = data.images[scored.indices[:_CHECKED]]
  if not len(images):
    return
  calibrated = calibration.softmax(scored.logits[:_CHECKED], temperature)
  expected = _predict(model, images, batch_size)
  actual = _predict(loaded.model, images, batch_size)
  if not (np.allclose(expected, actual, atol=1e-5) and
          np.allclose(calibrated, actual, atol=1e-4)):
    os.remove(os.path.join(model_dir, schemas.METADATA_FILE))
    raise RuntimeError("the saved model.keras does not reproduce the trained"
                       " model's predictions")
  if (detector is None) != (loaded.ood is None):
    os.remove(os.path.join(model_dir, schemas.METADATA_FILE))
    raise RuntimeError("the saved artifact's OOD detector is not the fitted"
                       " one")
  if detector is not None:
    features = model_lib.in_batches(
        model_lib.sub_model(model, None, schemas.FEATURES_LAYER), images,
        batch_size)
    expected_scores = ood.scores(detector.model, features)
    outputs = inference.predict(
        inference.scoring_model(loaded.model, loaded.ood), images)
    actual_scores = np.array([o.ood_score for o in outputs])
    if not np.allclose(expected_scores, actual_scores, rtol=1e-4,
                       atol=1e-4):
      os.remove(os.path.join(model_dir, schemas.METADATA_FILE))
      raise RuntimeError("scoring the saved artifact does not reproduce the"
                         " fitted detector's OOD scores")
