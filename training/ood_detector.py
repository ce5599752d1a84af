"""Fitting the out-of-distribution detector of an artifact (`busi_core.ood`)
from a trained recipe's cached features, in `train` and in each `cv` fold.

The detector is fitted on the "features" layer of the training images as
stored (the originals: what scoring sees; adding the augmented views
widened the fit and let more non-ultrasound images through). Its threshold
is the `ood_pass_rate` quantile of two kinds of in-distribution scores:
the validation images' under the detector, and every training image's
under a detector fitted without its near-duplicate group (grouped inner
folds). A quantile of ~80 validation scores alone moves with the split;
with the out-of-fold scores of the ~420 training images it is steadier, and
those scores are what a new image of the same kind gets. `cv` measures the
share of its held-out fold that the fold's detector flags: the false-alarm
rate to expect on new images of the same kind. The study behind these
choices: training/README.md, "Out-of-distribution detector".
"""

import logging
from typing import NamedTuple, Optional, Sequence

import numpy as np

import schemas
from busi_core import ood
from schemas import metadata as metadata_schema
from training import recipe
from training.config import TrainConfig

_LOG = logging.getLogger(__name__)


class Detector(NamedTuple):
  """A fitted detector, its file's bytes (what the block's sha256 is of) and
  its metadata block."""
  model: ood.OodModel
  data: bytes
  block: metadata_schema.OodDetector


def count(flags: np.ndarray) -> Optional[metadata_schema.OodCount]:
  """How many of a set are flagged (None for an empty set)."""
  flags = np.asarray(flags, dtype=bool)
  if not len(flags):
    return None
  return metadata_schema.OodCount(
      count=int(len(flags)), flagged=int(flags.sum()),
      flagged_share=float(flags.mean()))


INNER_FOLDS = 5  # for the out-of-fold scores of the training images


def _inner_folds(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """Fold number of each row; rows of one group share a fold."""
  unique = np.unique(groups)
  order = np.random.default_rng(seed).permutation(len(unique))
  fold_of_group = dict(zip(unique[order], np.arange(len(unique)) % folds))
  return np.array([fold_of_group[g] for g in groups], dtype=np.int64)


def out_of_fold_scores(features: np.ndarray, groups: np.ndarray,
                       transform: str, folds: int = INNER_FOLDS,
                       seed: int = 0) -> np.ndarray:
  """Each row's score under a detector fitted on the other folds' rows
  (rows of one near-duplicate group always in the same fold)."""
  folds = min(folds, len(np.unique(groups)))
  scores = np.empty(len(features), np.float64)
  if folds < 2:
    scores[:] = np.nan
    return scores
  fold_of = _inner_folds(groups, folds, seed)
  for k in range(folds):
    held = fold_of == k
    detector, _ = ood.fit(features[~held], transform)
    scores[held] = ood.scores(detector, features[held])
  return scores


def fit(config: TrainConfig, runner: recipe.Recipe, train: np.ndarray,
        val: np.ndarray, test: np.ndarray = np.zeros(0, np.int64),
        groups: Optional[Sequence[int]] = None) -> Optional[Detector]:
  """Fits the detector on `train`'s features, thresholded on `val` and the
  training images' out-of-fold scores.

  Args:
    config: the flags (ood_transform, ood_pass_rate, seed).
    runner: the fitted recipe (its model and conv cache).
    train, val, test: image indices of the splits (test only reported).
    groups: near-duplicate group of every image of the data (indexed like
      the splits); None: every image its own group.

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
  train_groups = (np.asarray(train) if groups is None else
                  np.asarray(groups)[np.asarray(train)])
  return build(runner.features(train), runner.features(val),
               runner.features(test), train_groups, config.ood_transform,
               config.ood_pass_rate, config.seed)


def build(features: np.ndarray, val_features: np.ndarray,
          test_features: np.ndarray, train_groups: np.ndarray,
          transform: str, pass_rate: float, seed: int = 0) -> Detector:
  """The detector of these features: fitted on the training images',
  thresholded on the validation images' and the training images'
  out-of-fold scores.

  Args:
    features, val_features, test_features: "features" layer outputs of the
      splits' images (test only reported; may be empty).
    train_groups: near-duplicate group of each training image.
    transform, pass_rate: as the flags --ood_transform, --ood_pass_rate.
    seed: draws the inner folds.
  """
  detector, shrinkage = ood.fit(features, transform)
  val_scores = ood.scores(detector, val_features)
  oof = out_of_fold_scores(features, train_groups, transform, seed=seed)
  oof = oof[np.isfinite(oof)]
  detector = detector._replace(threshold=ood.choose_threshold(
      np.concatenate([val_scores, oof]), pass_rate))
  data = ood.to_bytes(detector)
  block = metadata_schema.OodDetector(
      method=schemas.OOD_METHOD_MAHALANOBIS,
      transform=transform,
      feature_layer=schemas.FEATURES_LAYER,
      dims=detector.dims,
      file=schemas.OOD_FILE,
      sha256=ood.sha256_bytes(data),
      fit_split="train",
      fit_count=int(len(features)),
      fit_images=int(len(features)),
      shrinkage=round(shrinkage, 6),
      threshold=detector.threshold,
      threshold_split="val+train_out_of_fold",
      target_pass_rate=pass_rate,
      val=count(ood.flagged(detector, val_scores)),
      train_out_of_fold=count(ood.flagged(detector, oof)),
      test=count(ood.flagged(detector, ood.scores(detector, test_features))))
  _LOG.info("OOD detector: Mahalanobis (%s features, Ledoit-Wolf shrinkage"
            " %.3f) on %d training images; threshold %.3f flags %d of %d"
            " validation images", transform, shrinkage, len(features),
            detector.threshold, block.val.flagged, block.val.count)
  return Detector(detector, data, block)


def held_out_flags(detector: Optional[Detector], runner: recipe.Recipe,
                   indices: np.ndarray) -> Optional[np.ndarray]:
  """Which of the images `indices` the detector flags (None: no detector)."""
  if detector is None:
    return None
  return ood.flagged(detector.model,
                     ood.scores(detector.model, runner.features(indices)))
