"""A numpy stand-in for the Keras model, for tests of the pipeline's wiring.

As Beam's own `ml/inference/base_test.py` (FakeModel, FakeModelHandler): the
scoring pipeline runs through the real RunInference, KeyedModelHandler and
batching, but the model is a few lines of numpy, so wiring tests (manifests,
errors, outputs, SQL) need no TensorFlow model load or trace. Tests about the
model itself keep the real artifact handler.

Use the `fake_model` fixture (tests/conftest.py); it swaps
`beam_pipeline.model_handler.keyed_handler` for `keyed_handler` below.
"""

import threading
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler,
                                           PredictionResult)

import schemas
from busi_core import inference

MODEL_ID = "fake-numpy-model"


class FakeModel:
  """Softmax over classes of how close an image's mean intensity is to each
  class's intensity band: deterministic, finite, sums to one."""

  def __init__(self, num_classes: int):
    # Class k is "mean intensity near (k + 0.5) / num_classes".
    self._centres = (np.arange(num_classes) + 0.5) / num_classes

  def predict(self, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:  # as the artifact's model refuses them
      raise TypeError(f"model input must be uint8 pixels, got {images.dtype}")
    means = images.reshape(len(images), -1).mean(axis=1) / 255.0
    logits = -8.0 * np.abs(means[:, None] - self._centres[None, :])
    logits -= logits.max(axis=1, keepdims=True)
    odds = np.exp(logits)
    return (odds / odds.sum(axis=1, keepdims=True)).astype(np.float32)


class Calls:
  """What the fake handlers in this process did, to check a test used them
  (the in-process runner runs them in this interpreter)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.loads = 0
    self.images = 0

  def record(self, loads: int = 0, images: int = 0) -> None:
    with self._lock:
      self.loads += loads
      self.images += images


CALLS = Calls()


def predict(images: np.ndarray,
            num_classes: int = len(schemas.LABELS)) -> np.ndarray:
  """The fake model's probabilities for uint8 [N, H, W, 3] images."""
  return FakeModel(num_classes).predict(np.asarray(images))


class FakeModelHandler(ModelHandler[np.ndarray, PredictionResult, FakeModel]):
  """uint8 images → PredictionResult(image, ModelOutput), batched as the
  artifact handler batches (min = max = batch_size)."""

  def __init__(self, *, batch_size: int = 32,
               num_classes: int = len(schemas.LABELS)):
    super().__init__()
    self._batch_size = batch_size
    self._num_classes = num_classes

  def load_model(self) -> FakeModel:
    CALLS.record(loads=1)
    return FakeModel(self._num_classes)

  def run_inference(self, batch: Sequence[np.ndarray], model: FakeModel,
                    inference_args: Optional[Dict[str, Any]] = None
                   ) -> Iterable[PredictionResult]:
    probabilities = model.predict(np.stack(batch))
    CALLS.record(images=len(batch))
    # As the artifact handler gives them; no OOD detector, as the tiny
    # test artifacts of the wiring tests have none.
    return [PredictionResult(example, inference.ModelOutput(p, None),
                             MODEL_ID)
            for example, p in zip(batch, probabilities)]

  def batch_elements_kwargs(self) -> Dict[str, int]:
    return {"min_batch_size": self._batch_size,
            "max_batch_size": self._batch_size}

  def get_metrics_namespace(self) -> str:
    return "BusiRunInference"


def keyed_handler(model_dir: str, *, batch_size: int,
                  precision: str = "float32",
                  model_sha256: Optional[str] = None,
                  model_copies: Optional[int] = None) -> KeyedModelHandler:
  """Drop-in for `beam_pipeline.model_handler.keyed_handler` (same
  arguments; the artifact itself is not read)."""
  del model_dir, precision, model_sha256, model_copies
  return KeyedModelHandler(FakeModelHandler(batch_size=batch_size))
