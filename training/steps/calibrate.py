"""Step: fit the model's temperature on validation; ECE on test before and
after."""

import logging

import keras

from schemas import metadata as metadata_schema
from training import calibration, model as model_lib, recipe, split
from training.config import TrainConfig
from training.steps.measure import Scored

_LOG = logging.getLogger(__name__)


def calibrate(model: keras.Model, config: TrainConfig, val: Scored,
              test: Scored) -> metadata_schema.Calibration:
  """Fits the temperature (`recipe.fit_calibration`) and sets it in `model`.

  A temperature at the end of its search range is not applied (1.0 stays),
  with a warning.

  Returns:
    The "calibration" metadata block.
  """
  fit = recipe.fit_calibration(config, val.logits, val.labels)
  block = metadata_schema.Calibration(**fit.block)
  if block.rejected_temperature is not None:
    _LOG.warning(
        "the temperature %.4g sits at the end of its search range [%g, %g]:"
        " the validation split is perfectly separated, or the model's logits"
        " are extreme. It is not applied (the temperature stays 1.0); use a"
        " larger --val_fraction or train differently.",
        block.rejected_temperature, calibration.MIN_TEMPERATURE,
        calibration.MAX_TEMPERATURE)
  if block.fitted:
    model_lib.set_temperature(model, fit.temperature)
    block = block.replace(temperature=model_lib.temperature_of(model))
  before = calibration.reliability(*test.confidence(1.0))
  after = calibration.reliability(*test.confidence(block.temperature))
  return block.replace(
      split=split.TEST, bins=calibration.DEFAULT_BINS,
      count=int(len(test.labels)), ece_before=before["ece"],
      ece_after=after["ece"], reliability_before=before,
      reliability_after=after)
