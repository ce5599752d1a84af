"""Step: build the model, cross-validate the recipe (unless --cv_folds 0),
then run its stages on the train/val split; all on one conv cache."""

import logging
from typing import Dict, NamedTuple, Optional

import keras
import numpy as np

from training import cv, data as data_lib, recipe
from training.config import TrainConfig
from training.steps.split import Splits

_LOG = logging.getLogger(__name__)


class Fitted(NamedTuple):
  """The trained model and what training it measured."""
  model: keras.Model
  runner: recipe.Recipe  # its cache serves the validation logits
  result: recipe.FitResult
  cv_report: Optional[Dict]  # training.cv's report; None with --cv_folds 0

  def seconds(self) -> Dict[str, float]:
    """Wall seconds of the conv cache, the folds and each stage."""
    seconds = {"conv_cache": self.runner.cache.seconds}
    if self.cv_report:
      seconds["cross_validation"] = self.cv_report["seconds"]["folds"]
    seconds.update(self.result.seconds)
    return seconds


def fit(config: TrainConfig, data: data_lib.LabelledData,
        splits: Splits) -> Fitted:
  """Trains the model of `config` on `splits.train`, stopping on `val`.

  Raises:
    model.BackboneWeightsError: the backbone weights cannot be had.
  """
  model = recipe.build_model(config, int(data.images.shape[1]))
  report = None
  if config.cv_folds:
    # The folds need every view of every image; the final fit reuses them.
    cache = cv.all_views_cache(config, model, data)
    folds = recipe.Recipe(model, cache, data.labels, config, progress=0)
    _LOG.info("Cross-validating the recipe on %d images (%d grouped"
              " folds)...", len(data.labels), config.cv_folds)
    report = cv.run_folds(config, config.cv_folds, folds, data,
                          splits.hashes)
  else:
    needed = {view: splits.train for view in recipe.views(config)}
    # Validation and test images are seen as stored (view 0 only), as
    # scoring sees them; the OOD detector reports on the test split's.
    needed[recipe.ORIGINAL] = np.concatenate([splits.train, splits.val,
                                              splits.test])
    cache = recipe.ConvCache(model, data.images, needed, config.batch_size,
                             config.seed, recipe.cache_layers(config, model),
                             config.degrade,
                             keys=recipe.draw_keys(data.image_ids),
                             annotate=config.annotate,
                             precision=config.precision)
  runner = recipe.Recipe(model, cache, data.labels, config)
  return Fitted(model, runner,
                runner.fit(splits.train, splits.val, config.seed), report)
