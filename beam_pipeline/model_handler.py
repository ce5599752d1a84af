"""Beam model handler for the VGG16 artifact: stock TF handler, faster call.

Loading goes through `busi_core.artifact.load_artifact` (Keras safe mode, the
artifact validated, gs:// artifacts staged locally), with GPU memory growth
on. Batching, model sharing (one model per worker process shared by its
threads, or `model_copies` per VM shared by all its processes: one per GPU)
and the inference metrics all come from Beam's TFModelHandlerNumpy /
KeyedModelHandler / RunInference.
"""

from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

from beam_pipeline import devices
from busi_core import artifact, inference
from busi_core.precision import with_precision


class Scorer:
  """What `load_model` returns: the scoring model behind one method.

  With `model_copies`, Beam serves the model from one process per copy and
  hands the others a proxy that forwards method calls (not attribute reads),
  so scoring goes through `predict` whether the model is shared or local.
  """

  def __init__(self, model: inference.ScoringModel):
    self._model = model

  def predict(self, images: np.ndarray) -> List[inference.ModelOutput]:
    """Probabilities (and OOD scores) of uint8 [B, H, W, 3] images."""
    return inference.predict(self._model, images)


def compiled_inference_fn(model: Scorer,
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
          for example, output in zip(batch, model.predict(images))]


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
    model_copies: models per worker VM, shared by all its SDK processes
      (one per GPU); None: one per process, shared by its threads (VGG16 is
      60 MB of weights, which a CPU worker holds once per vCPU easily).
  """

  def __init__(self, model_dir: str, *, batch_size: int = 32,
               precision: str = "float32",
               model_sha256: Optional[str] = None,
               model_copies: Optional[int] = None):
    super().__init__(
        model_uri=model_dir,
        inference_fn=compiled_inference_fn,
        min_batch_size=batch_size,
        max_batch_size=batch_size,
        model_copies=model_copies)
    self._model_dir = model_dir
    self._precision = precision
    self._model_sha256 = model_sha256

  def load_model(self) -> Scorer:
    devices.enable_memory_growth()
    loaded = artifact.load_artifact(self._model_dir, self._model_sha256)
    return Scorer(inference.scoring_model(
        with_precision(loaded.model, self._precision), loaded.ood))

  def get_metrics_namespace(self) -> str:
    return "BusiRunInference"


def keyed_handler(model_dir: str, *, batch_size: int,
                  precision: str = "float32",
                  model_sha256: Optional[str] = None,
                  model_copies: Optional[int] = None) -> KeyedModelHandler:
  """KeyedModelHandler over ArtifactModelHandler; keys pass through.

  A GPU hint goes on the RunInference transform itself (ScoreImages), which
  covers its batching and inference steps alike; `model_copies` (see
  ArtifactModelHandler) keeps one model per GPU.
  """
  return KeyedModelHandler(ArtifactModelHandler(
      model_dir, batch_size=batch_size, precision=precision,
      model_sha256=model_sha256, model_copies=model_copies))
