"""Step: the logits the calibration, threshold and report are made from, and
the test split's metrics."""

import logging
from typing import Dict, List, NamedTuple, Optional

import keras
import numpy as np

import schemas
from training import data as data_lib, metrics, model as model_lib, recipe
from training.steps.split import Splits

_LOG = logging.getLogger(__name__)


class Scored(NamedTuple):
  """One split's images scored: logits before the temperature."""
  indices: np.ndarray  # into the data
  logits: np.ndarray  # [n, classes]
  labels: np.ndarray  # true class indices

  def confidence(self, temperature: float):
    """(confidence, correct) of the predictions at `temperature`."""
    return recipe.confidence(self.logits, self.labels, temperature)


def score_test(model: keras.Model, data: data_lib.LabelledData,
               splits: Splits, batch_size: int) -> Scored:
  """The test split through the assembled full model on raw pixels: what
  scoring runs."""
  logits = model_lib.predict_logits(model, data.images[splits.test],
                                    batch_size)
  return Scored(splits.test, logits, data.labels[splits.test])


def score_val(runner: recipe.Recipe, data: data_lib.LabelledData,
              splits: Splits) -> Scored:
  """The validation split, from the recipe's cached conv outputs."""
  return Scored(splits.val, runner.logits(splits.val),
                data.labels[splits.val])


def classification(scored: Scored) -> Dict:
  """`metrics.classification_report` of the predictions (the temperature
  changes no argmax)."""
  return metrics.classification_report(
      scored.labels, scored.logits.argmax(axis=1), list(schemas.LABELS))


def one_class_warning(name: str, scored: Scored) -> Optional[str]:
  """`metrics.one_class` of a split, worded for the artifact train writes;
  None when the predictions hold more than one class."""
  found = metrics.one_class(name, scored.logits.argmax(axis=1),
                            scored.labels, schemas.LABELS)
  return found and (f"{found} Do not use this artifact: train longer"
                    " (--epochs, --patience) or from pretrained"
                    " --backbone_weights.")


def warn_one_class(val: Scored, test: Scored) -> List[str]:
  """Logs `one_class_warning` for the validation and test splits; returns
  what it logged, for the artifact's metadata."""
  found = []
  for name, scored in (("validation", val), ("test", test)):
    warning = one_class_warning(name, scored)
    if warning:
      _LOG.warning(warning)
      found.append(warning)
  return found
