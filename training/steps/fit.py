"""Step: build the model, cross-validate the recipe (unless --cv_folds 0;
or take the figures of a matching --cv_report), then run its stages on the
train/val split; all on one conv cache."""

import logging
from typing import Dict, NamedTuple, Optional

import keras
import numpy as np

import schemas
from training import cv, data as data_lib, recipe
from training.config import TrainConfig
from training.steps.split import Splits

_LOG = logging.getLogger(__name__)


class Fitted(NamedTuple):
  """The trained model and what training it measured."""
  model: keras.Model
  runner: recipe.Recipe  # its cache serves the validation logits
  result: recipe.FitResult
  # training.cv's report: this run's, or --cv_report's; None without
  cv_report: Optional[Dict]
  cv_source: Optional[str] = None  # schemas.CV_SOURCE_*

  def seconds(self) -> Dict[str, float]:
    """Wall seconds of the conv cache, this run's folds and each stage."""
    seconds = {"conv_cache": self.runner.cache.seconds}
    if self.cv_source == schemas.CV_SOURCE_TRAIN:
      seconds["cross_validation"] = self.cv_report["seconds"]["folds"]
    seconds.update(self.result.seconds)
    return seconds


def fit(config: TrainConfig, data: data_lib.LabelledData,
        splits: Splits, cv_report: Optional[Dict] = None) -> Fitted:
  """Trains the model of `config` on `splits.train`, stopping on `val`.

  `cv_report`: --cv_report's report (`cv.matching_report`), which stands in
  for this run's own folds.

  Raises:
    model.BackboneWeightsError: the backbone weights cannot be had.
  """
  report = cv_report
  source = None if cv_report is None else schemas.CV_SOURCE_REPORT
  model = recipe.build_model(config, int(data.images.shape[1]))
  if config.cv_folds:
    # The folds need every view of every image; the final fit reuses them.
    cache = cv.all_views_cache(config, model, data)
    folds = recipe.Recipe(model, cache, data.labels, config, progress=0)
    _LOG.info("Cross-validating the recipe on %d images (%d grouped"
              " folds)...", len(data.labels), config.cv_folds)
    report = cv.run_folds(config, config.cv_folds, folds, data,
                          splits.hashes)
    source = schemas.CV_SOURCE_TRAIN
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
                             annotate=config.annotate, depth=config.depth,
                             precision=config.precision)
  runner = recipe.Recipe(model, cache, data.labels, config)
  return Fitted(model, runner,
                runner.fit(splits.train, splits.val, config.seed), report,
                source)
