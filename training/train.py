"""Training: TFRecords → split → cached views → two-stage fit → calibration
→ threshold → artifact.

The recipe itself (views, cached conv outputs, the stages with early
stopping, temperature and threshold) lives in `training.recipe`, shared with
`cv`, which measures it. Stage one trains the head on the frozen base's
cached "features" of every view of the training images; the optional
fine-tune stage unfreezes the base from --fine_tune_from on (the whole base
where bfloat16 is fast, else block5) and trains on that layer's cached
input. The head and the base's layers are the full model's own layer objects
(`model.sub_model`), so the full model is assembled by construction.

The temperature of the model's TemperatureScaling layer is fitted on the
validation split's logits, so model.keras itself outputs calibrated
probabilities; the review threshold is then chosen on validation for
`--target_accuracy` (default 0.95) or fixed (`--threshold`). The out-of-distribution detector is fitted on
the training images' features and thresholded on validation
(`training.ood_detector`). The test split
(empty by default: `cv` measures the recipe, and the final model learns from
the rest) is used only to report.

`train` runs the steps of `training.steps` in order and only logs; the CLI
prints `flag_warnings` before it and `format_summary` after.
"""

import contextlib
import time
from typing import Dict, Iterator, List, NamedTuple, Optional

import keras

import schemas
from schemas import artifact as artifact_schema
from schemas import metadata as metadata_schema
from schemas.metadata import ArtifactMetadata
from training import calibration, cv, data as data_lib, metrics, ood_detector
from training import recipe, split as split_lib
from training.config import TrainConfig
from training.steps import calibrate, data, fit, measure, save, split
from training.steps import threshold, verify

CONFUSION_MATRIX_FILE = artifact_schema.CONFUSION_MATRIX_FILE
TRAINING_CURVES_FILE = artifact_schema.TRAINING_CURVES_FILE
SPLIT_FILE = artifact_schema.SPLIT_FILE
RELIABILITY_DIAGRAM_FILE = artifact_schema.RELIABILITY_DIAGRAM_FILE


class TrainResult(NamedTuple):
  """What a training run wrote, and what the CLI reports of it."""
  metadata: ArtifactMetadata  # as written to metadata.json
  read: data_lib.ReadStats
  cv_report: Optional[Dict]  # training.cv's report (or --cv_report's)
  output: str
  cv_report_path: Optional[str] = None  # --cv_report


class _Clock:
  """Wall seconds of the steps (the "seconds" of the training block)."""

  def __init__(self):
    self.started = time.perf_counter()
    self.seconds: Dict[str, float] = {}

  @contextlib.contextmanager
  def step(self, name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    self.seconds[name] = time.perf_counter() - started

  def add(self, seconds: Dict[str, float]) -> None:
    """Seconds a step measured itself."""
    self.seconds.update(seconds)

  def stop(self) -> Dict[str, float]:
    self.seconds["total"] = time.perf_counter() - self.started
    return self.seconds


def train(config: TrainConfig) -> TrainResult:
  """Trains a model from the TFRecords and writes the artifact.

  Args:
    config: the flags.

  Returns:
    The metadata written, with what the CLI reports.

  Raises:
    ValueError: bad flags or data (message says what to pass).
    model.BackboneWeightsError: the backbone weights cannot be had.
  """
  config.validate()
  config = recipe.train_resolved(config)
  save.check_output(config)
  clock = _Clock()
  keras.utils.set_random_seed(config.seed)
  with clock.step("read"):
    read = data.read(config)
    splits = split.split(config, read.data)
    # Checked before anything is built or written.
    measured = (cv.matching_report(config.cv_report, config, read.data)
                if config.cv_report else None)
    if measured:
      # --threshold_on cv needs its predictions: checked before any fit.
      threshold.out_of_fold(config, measured)
    if config.overwrite:
      save.remove_stale(config)
  work = save.work_dir(config.output)
  fitted = fit.fit(config, read.data, splits, measured)
  clock.add(fitted.seconds())
  with clock.step("test"):
    test = measure.score_test(fitted.model, read.data, splits,
                              config.batch_size)
    test_report = measure.classification(test)
  with clock.step("calibration"):
    val = measure.score_val(fitted.runner, read.data, splits)
    warnings = list(splits.warnings) + measure.warn_collapsed(val, test)
    cal = calibrate.calibrate(fitted.model, config, val, test)
    flagging = threshold.choose(
        config, val, test, cal.temperature, bool(cal.fitted),
        threshold.out_of_fold(
            config, fitted.cv_report,
            [read.data.image_ids[i] for i in splits.test], bool(cal.fitted)))
  with clock.step("ood"):
    detector = ood_detector.fit(
        config, fitted.runner, splits.train, splits.val, splits.test,
        split_lib.duplicate_groups(read.data.image_ids, splits.hashes))
  save.write_companions(work, config, read, splits, test_report, fitted, cal)
  metadata = save.save(work, config, read, splits, fitted, test_report, cal,
                       flagging, detector, clock.stop(), warnings)
  # Checked on validation images when there is no test split.
  verify.verify(work, fitted.model, read.data,
                test if len(test.indices) else val, cal.temperature,
                config.batch_size, detector)
  save.publish(work, config.output)
  return TrainResult(metadata, read.stats, fitted.cv_report, config.output,
                     config.cv_report)


def flag_warnings(config: TrainConfig) -> List[str]:
  """What the flags alone say about the run, for the CLI to print before it
  starts (train itself does not log these)."""
  lines = []
  if config.cv_folds == 0 and not config.test_fraction:
    lines.append("WARNING: --cv_folds 0 and no test split: nothing held out"
                 " will measure this model. Run `python -m training cv` with"
                 " the same flags, or keep --cv_folds.")
  if config.patience and not config.val_fraction:
    lines.append("Note: no validation split, so no early stopping: every"
                 " stage runs all its epochs (--epochs"
                 f" {config.epochs}).")
  return lines


def _num(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def _format_flagging(name: str,
                     stats: Optional[metadata_schema.FlagStats]) -> str:
  if not stats:
    return f"{name}: no images"
  return (f"{name}: {stats.flagged}/{stats.count} flagged"
          f" ({100 * stats.flagged_share:.0f} %), accuracy"
          f" {_num(stats.accuracy_confident)} on the rest,"
          f" {_num(stats.accuracy_flagged)} on the flagged")


def _calibration_lines(metadata: ArtifactMetadata) -> Iterator[str]:
  cal, flagging = metadata.calibration, metadata.flagging
  if cal.fitted:
    yield (f"Calibration: temperature {cal.temperature:.4f} fitted on"
           f" {cal.fit_count} validation images (NLL {cal.nll_before:.4f} →"
           f" {cal.nll_after:.4f})")
  else:
    yield f"Calibration: none ({cal.reason}); temperature 1.0"
  if cal.count:
    yield (f"Test ECE ({cal.bins} bins, {cal.count} images):"
           f" {_num(cal.ece_before)} before, {_num(cal.ece_after)} after")
  source = "fixed"
  on_cv = flagging.chosen_on == schemas.THRESHOLD_ON_CV
  if flagging.source == schemas.THRESHOLD_TARGET_ACCURACY:
    where = (f"the {flagging.chosen_count} out-of-fold predictions" if on_cv
             else "validation")
    source = (f"target accuracy {flagging.target_accuracy:g}, "
              + calibration.rule_words(flagging.rule, where)
              + (f", chosen on {where}" if on_cv and flagging.rule ==
                 schemas.THRESHOLD_RULE_EXPECTED else "")
              + ("" if flagging.target_reached else ", NOT reached"))
  yield f"Review threshold {flagging.threshold:.4f} ({source})"
  if on_cv and flagging.out_of_fold and flagging.out_of_fold.pooled:
    yield ("  each fold at the threshold its other folds chose: "
           + _format_flagging("out-of-fold", flagging.out_of_fold.pooled))
  for name, stats in (("validation", flagging.val), ("test", flagging.test)):
    if stats:
      yield "  " + _format_flagging(name, stats)
  if flagging.source != schemas.THRESHOLD_FIXED:
    fixed = flagging.fixed
    yield f"At the fixed threshold {fixed.threshold:g}:"
    for name, stats in (("validation", fixed.val), ("test", fixed.test)):
      if stats:
        yield "  " + _format_flagging(name, stats)


def format_summary(result: TrainResult) -> str:
  """What training did, for a person at a terminal."""
  metadata = result.metadata
  lines = []
  if result.read.unlabelled:
    lines.append(f"Skipped {result.read.unlabelled} unlabelled examples"
                 " (label \"\").")
  if result.cv_report:
    if result.cv_report_path:
      lines.append(f"Cross-validated figures of {result.cv_report_path}"
                   " (same recipe and data; not rerun):")
    lines.append(cv.format_table(result.cv_report))
  if metadata.test_metrics.count:
    lines.append(f"Test metrics ({metadata.test_metrics.count} images):")
    lines.append(metrics.format_report(metadata.test_metrics.to_json()))
  if not result.cv_report and not metadata.test_metrics.count:
    lines.append("No held-out figures measured this model (no"
                 " cross-validation, no test split): run `python -m training"
                 " cv` with the same flags and pass its cv.json to train with"
                 " --cv_report, or evaluate it on labelled images it has not"
                 " seen.")
  lines += _calibration_lines(metadata)
  lines.append(f"Model {metadata.model_version} written to {result.output}"
               f" in {metadata.training.seconds['total']:.1f} s")
  lines += [f"WARNING: {w}" for w in metadata.warnings or ()]
  return "\n".join(lines)
