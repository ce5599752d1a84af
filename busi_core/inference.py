"""The model's forward pass, compiled once per loaded model.

Scoring's RunInference handler and Grad-CAM call the same traced function;
scoring's network also outputs the "features" layer, from which the
out-of-distribution score is computed (`predict`).
"""

import dataclasses
import threading
import weakref
from typing import TYPE_CHECKING, List, NamedTuple, Optional

import numpy as np

import schemas
from busi_core import ood as ood_lib

if TYPE_CHECKING:
  import keras

# One compiled call per loaded model; weak so a reloaded model frees the old.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COMPILE_LOCK = threading.Lock()


def compiled_call(model):
  """The model's forward pass as a traced `tf.function` over batches.

  Measured on a 2-core AVX2 machine for VGG16 at 224², batch 32: eager
  `model(x)` (Beam's default inference function) ≈ 4.8 images/s,
  `model.predict` ≈ 3.1 with multi-second stalls, this ≈ 6.0 (see
  `python -m bench`). The batch dimension is left open so a short last batch
  does not retrace. The input dtype is the model's own (uint8 for an
  artifact; float32 for a sub-model that starts after a conv layer).
  """
  with _COMPILE_LOCK:
    fn = _COMPILED.get(model)
    if fn is None:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      shape = [None] + list(model.inputs[0].shape[1:])
      fn = tf.function(
          lambda x: model(x, training=False),
          input_signature=[tf.TensorSpec(shape, model.inputs[0].dtype)],
          reduce_retracing=True, autograph=False)
      _COMPILED[model] = fn
    return fn


class ModelOutput(NamedTuple):
  """What scoring gets for one image from one forward pass."""
  probabilities: np.ndarray  # float32 [classes]
  ood_score: Optional[float]  # None: the artifact has no OOD detector


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringModel:
  """The artifact's model as scoring calls it: one network with two outputs
  (probabilities and the "features" layer that the OOD score reads), and the
  detector (None: the artifact has none, and only probabilities come out).

  A dataclass, not a NamedTuple: Beam's model sharing (`shared.Shared`)
  keeps a weak reference to what `load_model` returns."""
  network: "keras.Model"
  ood: Optional[ood_lib.OodModel]


def scoring_model(model: "keras.Model",
                  detector: Optional[ood_lib.OodModel]) -> ScoringModel:
  """Wraps an artifact model so one call gives probabilities and features.

  The two-output model shares the layers (and weights) of `model`: the
  features are the GlobalAveragePooling2D output the classifier computes
  anyway, so asking for them costs no second pass.
  """
  if detector is None:
    return ScoringModel(model, None)
  import keras  # pylint: disable=import-outside-toplevel,redefined-outer-name
  features = model.get_layer(schemas.FEATURES_LAYER).output
  network = keras.Model(model.inputs, [model.outputs[0], features],
                        name=f"{model.name}_with_features")
  return ScoringModel(network, detector)


def predict(model: ScoringModel, images: np.ndarray) -> List[ModelOutput]:
  """One compiled forward pass over uint8 [B, H, W, 3] images."""
  out = compiled_call(model.network)(images)
  if model.ood is None:
    return [ModelOutput(p, None) for p in np.asarray(out)]
  probabilities, features = (np.asarray(o) for o in out)
  # float64 on the host: a 512-d quadratic form per image (see README for
  # its measured cost), in float64 whatever precision the network ran in.
  distances = ood_lib.scores(model.ood, features)
  return [ModelOutput(p, float(d)) for p, d in zip(probabilities, distances)]
