"""Step: reload the saved artifact as scoring will and check its predictions.
"""

import os

import keras
import numpy as np

import schemas
from busi_core import artifact
from training import calibration, data as data_lib
from training.steps.measure import Scored

_CHECKED = 8  # images predicted again from the saved model


def _predict(model: keras.Model, images: np.ndarray,
             batch_size: int) -> np.ndarray:
  if not len(images):
    return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
  return model.predict(images, batch_size=batch_size, verbose=0)


def verify(model_dir: str, model: keras.Model, data: data_lib.LabelledData,
           scored: Scored, temperature: float, batch_size: int) -> None:
  """Checks the saved model predicts as the trained one does, and gives the
  calibrated probabilities the report was made from, on a few of the
  `scored` images.

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
