"""Step: the logits the calibration, threshold and report are made from, and
the test split's metrics."""

import logging
from typing import Dict, List, NamedTuple

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


def split_warnings(name: str, scored: Scored) -> List[str]:
  """What is wrong with the predictions of a split, worded for the artifact
  train writes: one class predicted for all of it (`metrics.one_class`),
  else each class it holds enough of and never predicts
  (`metrics.never_predicted`); [] when neither."""
  one_class, found = metrics.prediction_findings(
      name, scored.logits.argmax(axis=1), scored.labels, schemas.LABELS)
  advice = (" or from pretrained --backbone_weights." if one_class else
            ", from pretrained --backbone_weights, or with more images of"
            " that class.")
  return [f"{w} Do not use this artifact: train longer (--epochs,"
          f" --patience){advice}" for w in found]


def warn_collapsed(val: Scored, test: Scored) -> List[str]:
  """Logs `split_warnings` of the validation and test splits; returns what
  it logged, for the artifact's metadata."""
  found = []
  for name, scored in (("validation", val), ("test", test)):
    for warning in split_warnings(name, scored):
      _LOG.warning(warning)
      found.append(warning)
  return found
