"""Step: read the labelled examples of the TFRecords."""

import logging
from typing import NamedTuple

import schemas
from training import data as data_lib
from training.config import TrainConfig

_LOG = logging.getLogger(__name__)


class Read(NamedTuple):
  """The examples a run learns from, and what reading skipped."""
  data: data_lib.LabelledData
  stats: data_lib.ReadStats


def read(config: TrainConfig) -> Read:
  """Reads the labelled images of `config.data` at `config.image_size`.

  Raises:
    ValueError: no file matches, or no labelled image (message says which).
  """
  data, stats = data_lib.load_labelled(config.data, list(schemas.LABELS),
                                       config.image_size)
  _LOG.info(
      "Read %d examples: %d labelled images used, %d unlabelled skipped,"
      " %d exact duplicates and %d with conflicting labels skipped",
      stats.examples, stats.used, stats.unlabelled, stats.duplicates,
      stats.conflicting)
  return Read(data, stats)
