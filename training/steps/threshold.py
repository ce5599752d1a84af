"""Step: the review threshold, fixed or chosen on validation for
--target_accuracy, and what it flags."""

import logging

from schemas import metadata as metadata_schema
from training import calibration, recipe
from training.config import TrainConfig
from training.steps.measure import Scored

_LOG = logging.getLogger(__name__)


def choose(config: TrainConfig, val: Scored, test: Scored,
           temperature: float, calibrated: bool) -> metadata_schema.Flagging:
  """The "flagging" block (`recipe.choose_flagging`) at the calibrated
  `temperature` (`calibrated`: whether it was fitted), with a warning when
  the target accuracy cannot be reached.
  """
  flagging = metadata_schema.Flagging.from_json(recipe.choose_flagging(
      config, val.confidence(temperature), test.confidence(temperature),
      calibrated))
  if flagging.target_reached is False:
    _LOG.warning(
        "no threshold reaches accuracy %g (%s) on the validation images it"
        " does not flag (%s). Falling back to the highest validation"
        " confidence, %.4f, which flags nearly everything; the model card"
        " says so.", config.target_accuracy, flagging.rule,
        calibration.unreached_reason(flagging.rule, "validation"),
        flagging.threshold)
  return flagging
