"""Fitting the out-of-distribution detector of an artifact (`busi_core.ood`)
from a trained recipe's cached features, in `train` and in each `cv` fold.

The detector is fitted on the "features" layer of every cached view of the
training images (the originals, their mirror images and the fixed augmented
views: all of them breast ultrasound as scoring may see it), and its
threshold is chosen on the validation images as stored, so that
`ood_pass_rate` of them pass. `cv` measures the share of its held-out fold
that the fold's detector flags: the in-distribution false-alarm rate to
expect on new images of the same kind.
"""

import logging
from typing import NamedTuple, Optional

import numpy as np

import schemas
from busi_core import ood
from schemas import metadata as metadata_schema
from training import recipe
from training.config import TrainConfig

_LOG = logging.getLogger(__name__)


class Detector(NamedTuple):
  """A fitted detector and its metadata block."""
  model: ood.OodModel
  block: metadata_schema.OodDetector


def count(flags: np.ndarray) -> Optional[metadata_schema.OodCount]:
  """How many of a set are flagged (None for an empty set)."""
  flags = np.asarray(flags, dtype=bool)
  if not len(flags):
    return None
  return metadata_schema.OodCount(
      count=int(len(flags)), flagged=int(flags.sum()),
      flagged_share=float(flags.mean()))


def fit(config: TrainConfig, runner: recipe.Recipe, train: np.ndarray,
        val: np.ndarray, test: np.ndarray = np.zeros(0, np.int64)
       ) -> Optional[Detector]:
  """Fits the detector on `train`'s features, thresholded on `val`.

  Args:
    config: the flags (ood_transform, ood_pass_rate, augment_views).
    runner: the fitted recipe (its model and conv cache).
    train, val, test: image indices of the splits (test only reported).

  Returns:
    The detector, or None when `--ood_pass_rate 0` turns it off or there
    are no validation images to choose its threshold on.
  """
  if not config.ood_pass_rate:
    return None
  if not len(val):
    _LOG.warning("No validation images: no out-of-distribution detector"
                 " (its threshold is chosen on validation)")
    return None
  features = np.concatenate([runner.features(train, view)
                             for view in recipe.views(config)])
  detector, shrinkage = ood.fit(features, config.ood_transform)
  val_scores = ood.scores(detector, runner.features(val))
  detector = detector._replace(
      threshold=ood.choose_threshold(val_scores, config.ood_pass_rate))
  test_scores = ood.scores(detector, runner.features(test))
  block = metadata_schema.OodDetector(
      method=schemas.OOD_METHOD_MAHALANOBIS,
      transform=config.ood_transform,
      feature_layer=schemas.FEATURES_LAYER,
      dims=detector.dims,
      file=schemas.OOD_FILE,
      sha256=ood.sha256_bytes(ood.to_bytes(detector)),
      fit_split="train",
      fit_count=int(len(features)),
      fit_images=int(len(train)),
      shrinkage=round(shrinkage, 6),
      threshold=detector.threshold,
      threshold_split="val",
      target_pass_rate=config.ood_pass_rate,
      val=count(ood.flagged(detector, val_scores)),
      test=count(ood.flagged(detector, test_scores)))
  _LOG.info("OOD detector: Mahalanobis (%s features, Ledoit-Wolf shrinkage"
            " %.3f) on %d feature vectors of %d training images; threshold"
            " %.3f flags %d of %d validation images", config.ood_transform,
            shrinkage, len(features), len(train), detector.threshold,
            block.val.flagged, block.val.count)
  return Detector(detector, block)


def held_out_flags(detector: Optional[Detector], runner: recipe.Recipe,
                   indices: np.ndarray) -> Optional[np.ndarray]:
  """Which of the images `indices` the detector flags (None: no detector)."""
  if detector is None:
    return None
  return ood.flagged(detector.model,
                     ood.scores(detector.model, runner.features(indices)))
