"""Step: deal the images into train / val / test, near-duplicates together."""

import collections
import logging
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

import schemas
from training import data as data_lib, metrics
from training import split as split_lib
from training.config import TrainConfig

_LOG = logging.getLogger(__name__)


class Splits(NamedTuple):
  """The split of a run's data."""
  indices: Dict[str, np.ndarray]  # split name → indices into the data
  hashes: List[int]  # dHash of every image, in data order
  class_counts: Dict[str, Dict[str, int]]  # split → class → images
  grouped: int  # images sharing a near-duplicate group
  # For the artifact's metadata: each class the training split lacks.
  warnings: Tuple[str, ...] = ()

  @property
  def train(self) -> np.ndarray:
    return self.indices[split_lib.TRAIN]

  @property
  def val(self) -> np.ndarray:
    return self.indices[split_lib.VAL]

  @property
  def test(self) -> np.ndarray:
    return self.indices[split_lib.TEST]

  def image_ids(self, data: data_lib.LabelledData) -> Dict[str, List[str]]:
    """Split name → image_ids, in split order."""
    return {name: [data.image_ids[i] for i in idx]
            for name, idx in self.indices.items()}


def split(config: TrainConfig, data: data_lib.LabelledData) -> Splits:
  """Splits the data (`training.split.split_indices`) and checks the result.

  Raises:
    ValueError: nothing left to train on, or no validation image to choose
      the threshold on when --target_accuracy asks for one.
  """
  labels = list(schemas.LABELS)
  hashes = [split_lib.dhash(image) for image in data.images]
  result = split_lib.split_indices(
      data.image_ids, [labels[i] for i in data.labels], hashes,
      config.val_fraction, config.test_fraction, config.seed)
  indices = {name: np.asarray(idx, dtype=np.int64)
             for name, idx in result.indices.items()}
  class_counts = {name: {label: int((data.labels[idx] == i).sum())
                         for i, label in enumerate(labels)}
                  for name, idx in indices.items()}
  group_sizes = collections.Counter(result.group_of)
  grouped = sum(1 for g in result.group_of if group_sizes[g] > 1)
  _LOG.info("Split (seed %d): %s; %d of %d images share a near-duplicate"
            " group, kept in one split", config.seed, class_counts, grouped,
            len(data.image_ids))
  if not len(indices[split_lib.TRAIN]):
    raise ValueError("no image left for training")
  if config.target_accuracy is not None and not len(indices[split_lib.VAL]):
    raise ValueError("--target_accuracy chooses the threshold on the"
                     " validation split, and the split left it empty; raise"
                     " --val_fraction or pass --threshold")
  warnings = tuple(
      f"{clause[0].upper()}{clause[1:]}; train on images of every class."
      for clause in metrics.untrained_classes(
          "training", data.labels[indices[split_lib.TRAIN]], labels))
  for warning in warnings:
    _LOG.warning("%s", warning)
  return Splits(indices, hashes, class_counts, grouped, warnings)
