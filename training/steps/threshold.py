"""Step: the review threshold, fixed or chosen for --target_accuracy (on
validation, or on cv's out-of-fold predictions), and what it flags."""

import logging
from typing import Dict, Optional, Sequence

import schemas
from schemas import metadata as metadata_schema
from training import calibration, cv, recipe
from training.config import TrainConfig
from training.steps.measure import Scored

_LOG = logging.getLogger(__name__)


def out_of_fold(config: TrainConfig, report: Optional[Dict],
                test_ids: Sequence[str] = (),
                calibrated: bool = True) -> Optional[Dict]:
  """The threshold chosen on `report`'s out-of-fold predictions
  (`cv.out_of_fold_flagging`) when --threshold_on cv asks for it; None to
  choose on validation.

  Args:
    config: the flags.
    report: the run's cv report (its own, or --cv_report's).
    test_ids: the test split's image_ids: their rows do not choose.
    calibrated: whether the final model's temperature was fitted. The
      out-of-fold confidences are calibrated by their folds, so they say
      nothing of an uncalibrated model's: validation chooses then.

  Raises:
    ValueError: --threshold_on cv and no out-of-fold predictions.
  """
  if (config.target_accuracy is None
      or config.threshold_on == schemas.THRESHOLD_ON_VALIDATION):
    return None
  chosen = cv.report_flagging(report, config, test_ids)
  if chosen is None:
    raise ValueError(
        "--threshold_on cv chooses the threshold on cross-validation's"
        f" out-of-fold predictions ({schemas.CV_PREDICTIONS_FILE} beside"
        " cv.json), and this run has none: run cv again with this version,"
        " or pass --threshold_on validation")
  if not calibrated:
    _LOG.warning("The final model's temperature was not fitted (its fit"
                 " hit the search bound), so the folds' calibrated"
                 " out-of-fold confidences do not describe its own: the"
                 " threshold is chosen on validation instead, and the model"
                 " card says so")
    return None
  return chosen


def choose(config: TrainConfig, val: Scored, test: Scored,
           temperature: float, calibrated: bool,
           chosen: Optional[Dict] = None) -> metadata_schema.Flagging:
  """The "flagging" block (`recipe.choose_flagging`) at the calibrated
  `temperature` (`calibrated`: whether it was fitted), with a warning when
  the target accuracy cannot be reached. `chosen`: `out_of_fold`'s choice,
  which replaces the one on validation.
  """
  flagging = metadata_schema.Flagging.from_json(recipe.choose_flagging(
      config, val.confidence(temperature), test.confidence(temperature),
      calibrated, chosen))
  if flagging.target_reached is False:
    images = ("out-of-fold" if chosen else "validation")
    _LOG.warning(
        "no threshold reaches accuracy %g (%s) on the %s images it"
        " does not flag (%s). Falling back to the highest %s"
        " confidence, %.4f, which flags nearly everything; the model card"
        " says so.", config.target_accuracy, flagging.rule, images,
        calibration.unreached_reason(flagging.rule, images), images,
        flagging.threshold)
  return flagging
