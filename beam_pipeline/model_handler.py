"""Beam model handler for the VGG16 artifact: stock TF handler, faster call.

Loading goes through `busi_core.artifact.load_artifact` (Keras safe mode, the
artifact validated, gs:// artifacts staged locally). Batching, one model per
worker process shared by its threads, and the inference metrics all come from
Beam's TFModelHandlerNumpy / KeyedModelHandler / RunInference.
"""

from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

from busi_core import artifact, inference
from busi_core.precision import with_precision


def compiled_inference_fn(model: inference.ScoringModel,
                          batch: Sequence[np.ndarray],
                          inference_args: Optional[Dict[str, Any]] = None,
                          model_id: Optional[str] = None
                         ) -> Iterable[PredictionResult]:
  """Beam TensorInferenceFn: stacks uint8 images and calls the compiled
  model once; each PredictionResult's inference is an
  `inference.ModelOutput` (probabilities and OOD score)."""
  del inference_args  # the artifact's model takes none
  images = np.stack(batch)
  if images.dtype != np.uint8:
    raise TypeError(f"model input must be uint8 pixels, got {images.dtype}")
  return [PredictionResult(example, output, model_id)
          for example, output in zip(batch, inference.predict(model, images))]


class ArtifactModelHandler(TFModelHandlerNumpy):
  """TFModelHandlerNumpy that loads a model artifact directory.

  Args:
    model_dir: artifact directory (local or gs://) as written by
      `python -m training train`.
    batch_size: images per model call (min and max batch size).
    precision: "float32", or "bfloat16"/"float16" for GPUs (see
      with_precision).
    model_sha256: refuse a model.keras with another digest (the job's
      launch-time model; see busi_core.artifact.load_artifact).
  """

  def __init__(self, model_dir: str, *, batch_size: int = 32,
               precision: str = "float32",
               model_sha256: Optional[str] = None):
    super().__init__(
        model_uri=model_dir,
        inference_fn=compiled_inference_fn,
        min_batch_size=batch_size,
        max_batch_size=batch_size,
        # VGG16 is 60 MB of weights: one copy per process, shared by threads.
        large_model=False)
    self._model_dir = model_dir
    self._precision = precision
    self._model_sha256 = model_sha256

  def load_model(self) -> inference.ScoringModel:
    loaded = artifact.load_artifact(self._model_dir, self._model_sha256)
    return inference.scoring_model(
        with_precision(loaded.model, self._precision), loaded.ood)

  def get_metrics_namespace(self) -> str:
    return "BusiRunInference"


def keyed_handler(model_dir: str, *, batch_size: int,
                  precision: str = "float32",
                  model_sha256: Optional[str] = None) -> KeyedModelHandler:
  """KeyedModelHandler over ArtifactModelHandler; keys pass through.

  A GPU hint goes on the RunInference transform itself (ScoreImages), which
  covers its batching and inference steps alike.
  """
  return KeyedModelHandler(ArtifactModelHandler(
      model_dir, batch_size=batch_size, precision=precision,
      model_sha256=model_sha256))
