"""`cv`: grouped, stratified k-fold cross-validation of the whole recipe.

Each fold in turn is the test set; the other folds are split into train and
validation exactly as `train` splits its data (duplicate-aware, stratified),
and the recipe runs on them unchanged: fit, temperature and review threshold
on validation. The fold's images are scored only at the end. Folds are made
of whole near-duplicate groups (`split.duplicate_groups`), so an image and
its near-copies never sit on both sides of a fold.

The conv base's outputs do not depend on the fold (the base is frozen, or,
when it is fine-tuned from a layer, everything before that layer is), so
they are computed once for every image and view and shared by the folds: k
folds cost one pass of VGG16 plus k head fits (and k fine-tunes).
"""

import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import keras

import schemas
from schemas import evaluation as evaluation_schema
from schemas import metadata as metadata_schema
from training import ood_detector
from training import calibration, data as data_lib, lesion_masks, lesions
from training import metrics
from training import model as model_lib, recipe, split
from training.config import FINE_TUNABLE_LAYERS, TrainConfig

_LOG = logging.getLogger(__name__)

# Scalar figures of each fold, in the order the table prints them.
SCALARS = ("macro_f1", "recall_malignant", "recall_benign", "recall_normal",
           "accuracy", "ece", "auc_malignant", "flagged_share",
           "accuracy_unflagged", "accuracy_flagged", "fixed_flagged_share",
           "fixed_accuracy_unflagged", "ood_flagged_share")


def assign_folds(image_ids: Sequence[str], labels: Sequence[str],
                 group_of: Sequence[int], folds: int, seed: int) -> np.ndarray:
  """Fold number (0 … folds-1) of each image; groups never straddle folds.

  Stratified by label: each label's groups are dealt to the folds as
  `split.deal_groups` deals them to train/val/test.

  Raises:
    ValueError: fewer than 2 folds, or more folds than groups.
  """
  if folds < 2:
    raise ValueError(f"--folds {folds}: need at least 2")
  groups = len(set(group_of))
  if folds > groups:
    raise ValueError(f"--folds {folds} but the data hold only {groups}"
                     " distinct (near-duplicate-grouped) images")
  parts = split.deal_groups(image_ids, labels, group_of,
                            {k: 1.0 / folds for k in range(folds)}, seed)
  fold_of = np.full(len(image_ids), -1, dtype=np.int64)
  for k, indices in parts.items():
    if not indices:
      raise ValueError(f"--folds {folds}: fold {k} would be empty (too few"
                       " images of each class); use fewer folds")
    fold_of[indices] = k
  return fold_of


def fold_metrics(labels: np.ndarray, probabilities: np.ndarray,
                 threshold, label_names: Sequence[str],
                 fixed_threshold: Optional[float] = None) -> Dict:
  """The figures of one set of scored images.

  Args:
    labels: true class indices [n].
    probabilities: the model's (calibrated) probabilities [n, classes].
    threshold: the review threshold (confidence below it is flagged), or
      one per image (pooled folds, each with its own threshold).
    label_names: class names in index order (must include schemas.MALIGNANT).
    fixed_threshold: also report what this threshold would flag
      ("fixed_*" fields), e.g. the 0.9 the chosen one replaces.

  Returns:
    JSON-ready: every name of SCALARS (None where undefined, e.g. no
    malignant image for the AUC), "count", "threshold", "flagged" and the
    confusion matrix.
  """
  labels = np.asarray(labels, dtype=np.int64).reshape(-1)
  probabilities = np.asarray(probabilities, dtype=np.float64)
  names = list(label_names)
  predicted = probabilities.argmax(axis=1)
  report = metrics.classification_report(labels, predicted, names)
  confidence = probabilities.max(axis=1)
  correct = predicted == labels
  thresholds = np.broadcast_to(np.asarray(threshold, np.float64),
                               confidence.shape)
  # confidence ≥ threshold exactly when confidence − threshold ≥ 0 (IEEE
  # subtraction keeps the sign), so one call serves per-image thresholds.
  flagging = calibration.flag_stats(confidence - thresholds, correct, 0.0)
  malignant = names.index(schemas.MALIGNANT)
  result = {
      "count": int(len(labels)),
      "macro_f1": report["macro"]["f1"],
      "accuracy": report["accuracy"],
      "ece": calibration.reliability(confidence, correct)["ece"],
      "auc_malignant": metrics.roc_auc(probabilities[:, malignant],
                                       labels == malignant),
      "threshold": (float(threshold) if np.ndim(threshold) == 0 else None),
      "flagged": flagging["flagged"],
      "flagged_share": flagging["flagged_share"],
      "accuracy_unflagged": flagging["accuracy_confident"],
      "accuracy_flagged": flagging["accuracy_flagged"],
      "confusion_matrix": report["confusion_matrix"],
  }
  if fixed_threshold is not None:
    fixed = calibration.flag_stats(confidence, correct, fixed_threshold)
    result.update(fixed_threshold=float(fixed_threshold),
                  fixed_flagged_share=fixed["flagged_share"],
                  fixed_accuracy_unflagged=fixed["accuracy_confident"])
  for name in names:
    support = report["per_class"][name]["support"]
    result[f"recall_{name}"] = (report["per_class"][name]["recall"]
                                if support else None)
  return result


def summarise(per_fold: Sequence[Dict]) -> Dict[str, Dict]:
  """Mean and sample standard deviation of each scalar over the folds.

  Folds where a figure is undefined (None) are left out of its mean; "n"
  says how many folds it is over.
  """
  return {name: _mean_sd([f[name] for f in per_fold
                          if f.get(name) is not None]) for name in SCALARS}


def _mean_sd(values: Sequence[float]) -> Dict:
  return {"mean": float(np.mean(values)) if values else None,
          "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
          "n": len(values)}


def out_of_fold_flagging(confidence: np.ndarray, correct: np.ndarray,
                         fold_of: np.ndarray, target: float,
                         rule: str) -> Dict:
  """The review threshold chosen on out-of-fold predictions, and whether
  such a threshold holds on images it was not chosen on.

  `train` can choose its threshold on every image's out-of-fold prediction
  (hundreds of images) instead of its validation split (tens): the
  "threshold" here. To measure that route without fooling itself, each fold
  also gets a threshold chosen on the other folds' rows alone and is scored
  at it ("folds", "pooled", "summary").

  Args:
    confidence: calibrated top probability of each out-of-fold prediction.
    correct: whether each was right.
    fold_of: the fold each row was held out in.
    target: --target_accuracy.
    rule: a schemas.THRESHOLD_RULES name.

  Returns:
    JSON-ready `schemas.metadata.OutOfFoldFlagging`: the threshold chosen
    on every row; per fold, the threshold the other folds chose and
    `calibration.flag_stats` of the fold at it; pooled, every row at its
    fold's; mean ± sd over folds of flagged_share and accuracy_confident.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, bool)
  fold_of = np.asarray(fold_of)
  chosen = calibration.choose_threshold(confidence, correct, target, rule)
  nested = np.empty_like(confidence)
  folds = []
  for k in sorted(set(fold_of.tolist())):
    held = fold_of == k
    choice = calibration.choose_threshold(confidence[~held], correct[~held],
                                          target, rule)
    nested[held] = choice.threshold
    folds.append(metadata_schema.OutOfFoldFold(
        fold=int(k), target_reached=choice.reached,
        **calibration.flag_stats(confidence[held], correct[held],
                                 choice.threshold)))
  pooled = metadata_schema.FlagStats(
      **{**calibration.flag_stats(confidence - nested, correct, 0.0),
         "threshold": None})
  summary = {name: metadata_schema.FigureSummary(**_mean_sd(
      [getattr(f, name) for f in folds if getattr(f, name) is not None]))
             for name in ("flagged_share", "accuracy_confident")}
  return metadata_schema.OutOfFoldFlagging(
      rule=rule, target_accuracy=float(target), count=int(confidence.size),
      threshold=chosen.threshold, target_reached=chosen.reached,
      folds=tuple(folds), pooled=pooled, summary=summary).to_json()


def predictions_flagging(table: pa.Table, config: TrainConfig,
                         calibrated: bool) -> Optional[Dict]:
  """`out_of_fold_flagging` of a cv_predictions table at `config`'s
  --target_accuracy and --threshold_rule (None without a target).

  `calibrated`: whether every fold fitted its temperature
  (`recipe.threshold_rule`, as on validation).
  """
  if config.target_accuracy is None:
    return None
  rule = recipe.threshold_rule(config, calibrated)
  labels = np.asarray(table.column(schemas.COLUMN_LABEL).to_pylist())
  predicted = np.asarray(
      table.column(schemas.COLUMN_PREDICTED_CLASS).to_pylist())
  return out_of_fold_flagging(
      table.column(schemas.COLUMN_CONFIDENCE).to_numpy(), labels == predicted,
      table.column(schemas.COLUMN_FOLD).to_numpy(), config.target_accuracy,
      rule)


def report_flagging(report: Optional[Dict], config: TrainConfig,
                    excluded: Sequence[str] = ()) -> Optional[Dict]:
  """`predictions_flagging` of a report's out-of-fold predictions, without
  the rows of the `excluded` image_ids (a test split, which must not help
  choose); None when it holds none (reports from before them) or there is
  no target."""
  if not report or report.get(PREDICTIONS) is None:
    return None
  table = report[PREDICTIONS]
  if len(excluded):
    table = table.filter(pc.invert(pc.is_in(
        table.column(schemas.COLUMN_IMAGE_ID),
        value_set=pa.array(list(excluded), pa.string()))))
  return predictions_flagging(
      table, config,
      all(f.get("calibration_fitted", True) for f in report["folds"]))


def _cell(value: Optional[float]) -> str:
  return "n/a" if value is None or (isinstance(value, float) and
                                    math.isnan(value)) else f"{value:.3f}"


def format_table(report: Dict) -> str:
  """Per fold, pooled and mean ± sd, one row a figure, for a terminal."""
  folds = report["folds"]
  width = 9
  header = (f"{'':<20}" + "".join(f"{'fold ' + str(f['fold']):>{width}}"
                                  for f in folds)
            + f"{'pooled':>{width}}{'mean ± sd':>16}")
  lines = [header]
  for name in ("count",) + SCALARS:
    row = f"{name:<20}"
    for fold in folds:
      value = fold["test"].get(name)
      row += f"{value:>{width}d}" if name == "count" else (
          f"{_cell(value):>{width}}")
    pooled = report["pooled"].get(name)
    row += (f"{pooled:>{width}d}" if name == "count" else
            f"{_cell(pooled):>{width}}")
    if name != "count":
      s = report["summary"][name]
      row += f"{_cell(s['mean']) + ' ± ' + _cell(s['sd']):>16}"
    lines.append(row)
  if report.get(schemas.CV_OUT_OF_FOLD_FLAGGING):
    flagging = metadata_schema.OutOfFoldFlagging.from_json(
        report[schemas.CV_OUT_OF_FOLD_FLAGGING])
    flagged = flagging.summary["flagged_share"]
    right = flagging.summary["accuracy_confident"]
    lines += [
        "",
        f"Threshold chosen on all {flagging.count} out-of-fold predictions"
        f" ({flagging.rule} rule, target {flagging.target_accuracy:g}):"
        f" {flagging.threshold:.4f}"
        + ("" if flagging.target_reached else " (target not reached)") + ".",
        "Chosen on the other folds and applied to each: flagged"
        f" {_cell(flagged.mean)} ± {_cell(flagged.sd)}, accuracy not flagged"
        f" {_cell(right.mean)} ± {_cell(right.sd)} (pooled"
        f" {_cell(flagging.pooled.flagged_share)} flagged,"
        f" {_cell(flagging.pooled.accuracy_confident)} right).",
    ]
  if report.get(evaluation_schema.LESION_LOCALISATION):
    key = evaluation_schema.LESION_LOCALISATION
    hits = [evaluation_schema.LesionLocalisation.from_json(f[key])
            .overall.pointing_hit_rate for f in folds]
    spread = _mean_sd([h for h in hits if h is not None])
    lines += [
        "",
        "Out of fold (each fold's images by its own model): "
        + lesions.format_localisation(
            evaluation_schema.LesionLocalisation.from_json(report[key])),
        "Pointing game per fold: " + " ".join(_cell(h) for h in hits)
        + f" (mean {_cell(spread['mean'])} ± {_cell(spread['sd'])}).",
    ]
  warnings = report.get(schemas.CV_WARNINGS) or ()
  if warnings:
    lines += [""] + [f"WARNING: {w}" for w in warnings]
  return "\n".join(lines)


# TrainConfig fields a report's "settings" leave out: where a run writes, and
# what `train` does around the recipe.
_NOT_RECIPE = ("output", "overwrite", "name", "cv_folds", "cv_report",
               "threshold_on")
# Recorded but not compared by `matching_report`: the globs (the data
# fingerprint, class counts and image size say whether the images are the
# same) and train's test share (the folds never hold out a test split).
_NOT_COMPARED = ("data", "test_fraction")
_REPORT_KEYS = ("settings", "data_fingerprint", "class_counts",
                "folds_count", "folds", "pooled", "summary")


def recipe_settings(config: TrainConfig) -> Dict:
  """The settings a report records: the resolved recipe and the globs."""
  settings = dataclasses.asdict(config)
  for name in _NOT_RECIPE:
    settings.pop(name, None)
  settings["data"] = list(config.data)
  return settings


def _compared(settings: Dict) -> Dict:
  """`settings` as `matching_report` compares them: without a fine-tune the
  stage's layer and rate mean nothing, and no layer means block5's first."""
  settings = {k: v for k, v in settings.items() if k not in _NOT_COMPARED}
  # Reports from before --depth trained without it.
  settings.setdefault("depth", False)
  # ... and with a constant fine-tune rate.
  settings.setdefault("fine_tune_schedule", schemas.FINE_TUNE_SCHEDULE_CONSTANT)
  # ... and without weight averaging.
  settings.setdefault("ema_momentum", 0.0)
  # ... and with the fine-tune averaging as the head stage did.
  if settings.get("fine_tune_ema_momentum") is None:
    settings["fine_tune_ema_momentum"] = settings["ema_momentum"]
  if not settings.get("fine_tune_epochs"):
    settings.pop("fine_tune_ema_momentum")
    settings.pop("fine_tune_from", None)
    settings.pop("fine_tune_learning_rate", None)
    settings.pop("fine_tune_schedule", None)
  elif settings.get("fine_tune_from") is None:
    layers = FINE_TUNABLE_LAYERS.get(settings.get("backbone"), ())
    settings["fine_tune_from"] = next(
        (name for name in layers
         if name.startswith(model_lib.TOP_BLOCK_PREFIX)), None)
  return settings


def _read_report(path: str) -> Dict:
  """The JSON at `path`, checked to be a whole `cv` report.

  Raises:
    ValueError: unreadable, or not a complete cv report.
  """
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  try:
    with FileSystems.open(path) as f:
      report = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError) as e:  # Beam's IOError, bad JSON or UTF-8
    raise ValueError(f"--cv_report {path}: cannot read it ({e})") from e
  missing = ([k for k in _REPORT_KEYS if k not in report]
             if isinstance(report, dict) else list(_REPORT_KEYS))
  if missing:
    raise ValueError(f"--cv_report {path} is not a `python -m training cv`"
                     f" report (no {', '.join(missing)})")
  try:
    # What the artifact will keep of it, typed now rather than at saving.
    metadata_schema.CrossValidationSummary.from_json(card_summary(report))
    # ... and the card's reading of the --masks block.
    if report.get(evaluation_schema.LESION_LOCALISATION):
      evaluation_schema.LesionLocalisation.from_json(
          report[evaluation_schema.LESION_LOCALISATION])
    if not (isinstance(report["settings"], dict)
            and isinstance(report["data_fingerprint"], str)
            and isinstance(report["class_counts"], dict)):
      raise TypeError("settings, data_fingerprint or class_counts")
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ValueError(f"--cv_report {path} is not a complete `python -m"
                     f" training cv` report ({type(e).__name__}: {e})"
                     ) from e
  predictions = _read_predictions(path, report)
  if predictions is not None:
    report[PREDICTIONS] = predictions
  return report


def _read_predictions(path: str, report: Dict) -> Optional[pa.Table]:
  """The out-of-fold predictions beside the report at `path`, checked to be
  the report's (every image once, in the fold that held it out); None when
  there are none (reports from before them).

  Raises:
    ValueError: unreadable, or not this report's.
  """
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  beside = FileSystems.join(FileSystems.split(path)[0] or ".",
                            schemas.CV_PREDICTIONS_FILE)
  if not FileSystems.exists(beside):
    return None
  try:
    with FileSystems.open(beside) as f:
      table = pq.read_table(pa.BufferReader(f.read()))
  except (OSError, pa.ArrowException) as e:
    raise ValueError(f"--cv_report {path}: cannot read {beside} ({e})") from e
  expected = schemas.cv_predictions_schema(schemas.LABELS)
  if report.get(evaluation_schema.LESION_LOCALISATION):
    # With --masks, each image's lesion scores follow; reports of the
    # release before them have the block without the columns.
    localised = schemas.cv_predictions_schema(schemas.LABELS, localised=True)
    if table.schema.equals(localised):
      expected = localised
  if not table.schema.equals(expected):
    raise ValueError(f"--cv_report {path}: {beside} has the columns"
                     f" {table.schema.names}, not {expected.names}")
  held_out = {(i, f["fold"]) for f in report["folds"]
              for i in f["test_image_ids"]}
  rows = set(zip(table.column(schemas.COLUMN_IMAGE_ID).to_pylist(),
                 table.column(schemas.COLUMN_FOLD).to_pylist()))
  # The same folds come of the same data and seed, so each fold's
  # temperature and threshold tell this run's rows from another recipe's.
  fitted = {(f["fold"], f["temperature"], f["threshold"])
            for f in report["folds"]}
  rows_fitted = set(zip(table.column(schemas.COLUMN_FOLD).to_pylist(),
                        table.column(schemas.COLUMN_TEMPERATURE).to_pylist(),
                        table.column(schemas.COLUMN_THRESHOLD).to_pylist()))
  if (len(rows) != table.num_rows or rows != held_out
      or not rows_fitted <= fitted):
    raise ValueError(f"--cv_report {path}: {beside} does not hold the"
                     " report's images, each once in the fold that held it"
                     " out at that fold's temperature and threshold; it"
                     " belongs to another run")
  return table


def matching_report(path: str, config: TrainConfig,
                    data: data_lib.LabelledData) -> Dict:
  """The `cv` report at `path` (local or gs://), checked to measure the run
  of `config` (resolved) on `data`: every recipe setting equal, and the same
  images (data fingerprint), labels (class counts) and image size; the globs
  may differ.

  Raises:
    ValueError: unreadable, not a cv report, or another recipe or data
      (the message lists every difference).
  """
  report = _read_report(path)
  ours, theirs = (_compared(recipe_settings(config)),
                  _compared(report["settings"]))
  absent = "(not set)"
  differences = [
      f"{name}: {theirs.get(name, absent)!r} in the report,"
      f" {ours.get(name, absent)!r} here"
      for name in sorted(set(ours) | set(theirs))
      if theirs.get(name, absent) != ours.get(name, absent)]
  fingerprint = split.fingerprint(data.image_ids)
  if report["data_fingerprint"] != fingerprint:
    differences.append(
        f"data: {report.get('images')} images (fingerprint"
        f" {report['data_fingerprint'][:12]}…) in the report,"
        f" {len(data.image_ids)} ({fingerprint[:12]}…) here")
  counts = _class_counts(data)
  if report["class_counts"] != counts:
    differences.append(f"class counts: {report['class_counts']} in the"
                       f" report, {counts} here")
  size = int(data.images.shape[1])
  # Reports from before the field have none; their size cannot be checked.
  if report.get("image_size", size) != size:
    differences.append(f"image size: {report['image_size']} in the report,"
                       f" {size} here")
  if differences:
    raise ValueError(
        f"--cv_report {path} measured another recipe or other data, so its"
        " figures would not describe this model: " + "; ".join(differences)
        + ". Run `python -m training cv` with this run's flags, or pass"
        " them here.")
  return report


def _class_counts(data: data_lib.LabelledData) -> Dict[str, int]:
  return {name: int((data.labels == i).sum())
          for i, name in enumerate(schemas.LABELS)}


# The report's in-memory key for its out-of-fold predictions (a pyarrow
# Table of schemas.cv_predictions_schema): written beside cv.json as Parquet,
# not into it.
PREDICTIONS = "_predictions"


def predictions_table(data: data_lib.LabelledData, order: np.ndarray,
                      fold_of: np.ndarray, probabilities: np.ndarray,
                      temperatures: np.ndarray, thresholds: np.ndarray,
                      ood_flags: Optional[np.ndarray]) -> pa.Table:
  """Every image as its fold's model scored it (rows in `order`).

  Args:
    data: the labelled images.
    order: image indices, one row each.
    fold_of: each image's fold.
    probabilities: calibrated probabilities [rows, classes].
    temperatures, thresholds: the scoring fold's, one per row.
    ood_flags: the fold's OOD detector's flags, or None without one.
  """
  names = list(schemas.LABELS)
  predicted = probabilities.argmax(axis=1)
  confidence = probabilities.max(axis=1)
  columns = {
      schemas.COLUMN_IMAGE_ID: [data.image_ids[i] for i in order],
      schemas.COLUMN_FOLD: fold_of[order].astype(np.int64),
      schemas.COLUMN_LABEL: [names[i] for i in data.labels[order]],
      schemas.COLUMN_PREDICTED_CLASS: [names[i] for i in predicted],
  }
  for i, name in enumerate(names):
    columns[schemas.probability_column(name)] = probabilities[:, i]
  columns.update({
      schemas.COLUMN_CONFIDENCE: confidence,
      schemas.COLUMN_TEMPERATURE: np.asarray(temperatures, np.float64),
      schemas.COLUMN_THRESHOLD: np.asarray(thresholds, np.float64),
      schemas.COLUMN_LOW_CONFIDENCE: confidence < thresholds,
      schemas.COLUMN_OUT_OF_DISTRIBUTION: (
          pa.nulls(len(order), pa.bool_()) if ood_flags is None else
          np.asarray(ood_flags, bool)),
  })
  return pa.table(columns, schema=schemas.cv_predictions_schema(names))


def write_report(report: Dict, output: str) -> str:
  """Writes the report as JSON to OUTPUT/cv.json (local or gs://), and its
  out-of-fold predictions, when it holds them, to cv_predictions.parquet
  beside it."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  if "://" not in output:
    os.makedirs(output, exist_ok=True)
  path = FileSystems.join(output.rstrip("/"), schemas.CV_REPORT_FILE)
  written = {k: v for k, v in report.items() if k != PREDICTIONS}
  with FileSystems.create(path) as f:
    f.write(json.dumps(written, indent=2).encode("utf-8"))
  predictions = FileSystems.join(output.rstrip("/"),
                                 schemas.CV_PREDICTIONS_FILE)
  if report.get(PREDICTIONS) is not None:
    with FileSystems.create(predictions) as f:
      pq.write_table(report[PREDICTIONS], f)
  elif FileSystems.exists(predictions):
    # Another run's predictions must not sit beside this report.
    FileSystems.delete([predictions])
  return path


def fold_split(k: int, config: TrainConfig, data: data_lib.LabelledData,
               hashes: Sequence[int], fold_of: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Training, validation and test indices of fold k: the test fold is k,
  and the other folds are split into training and validation as `train`
  splits its data (duplicate-aware, --val_fraction, --seed)."""
  names = list(schemas.LABELS)
  rest = np.flatnonzero(fold_of != k)
  test = np.flatnonzero(fold_of == k)
  inner = split.split_indices(
      [data.image_ids[i] for i in rest], [names[i] for i in data.labels[rest]],
      [hashes[i] for i in rest], config.val_fraction, 0.0, config.seed)
  return rest[inner.indices[split.TRAIN]], rest[inner.indices[split.VAL]], test


def fold_warnings(k: int, val_labels: np.ndarray, val_logits: np.ndarray,
                  test_labels: np.ndarray, test_logits: np.ndarray,
                  temperature_fitted: bool, threshold_chosen: bool
                 ) -> List[str]:
  """Fold k's model, when it predicts one class for every validation or
  every held-out image of its fold (`metrics.one_class`), else when it never
  predicts a class there that it should (`metrics.never_predicted`): a
  sentence for each, logged, for cv.json's CV_WARNINGS.

  Args:
    temperature_fitted, threshold_chosen: whether the fold fitted its
      temperature and chose its threshold on its validation images (what
      the validation sentence says was set on a constant answer).
  """
  fitted = [what for what, done in (("temperature", temperature_fitted),
                                    ("review threshold", threshold_chosen))
            if done]
  found = []
  for part, logits, truth, consequence in (
      ("validation", val_logits, val_labels,
       f"Its {' and '.join(fitted)} {'were' if len(fitted) > 1 else 'was'}"
       " therefore set on a constant answer." if fitted else
       "Its validation figures therefore describe a constant answer."),
      ("held-out", test_logits, test_labels,
       "Its held-out figures therefore measure a constant answer, as do"
       " the pooled figures over its images, and a threshold chosen on the"
       " out-of-fold predictions (`train --threshold_on cv`) is partly set"
       " on them.")):
    one_class, sentences = metrics.prediction_findings(
        part, logits.argmax(axis=1), truth, schemas.LABELS)
    if one_class:
      sentences = [f"{sentences[0]} {consequence}"]
    for sentence in sentences:
      found.append(f"Fold {k}: {sentence} Give the recipe more --epochs or"
                   " --patience, or pretrained --backbone_weights"
                   + ("." if one_class else ", or add images of that class."))
      _LOG.warning("%s", found[-1])
  return found


def untrained_warnings(k: Optional[int], train_labels: np.ndarray,
                       among: Optional[Sequence[int]] = None) -> List[str]:
  """Classes no model learns, a sentence for each, logged, for cv.json's
  CV_WARNINGS: k None, those the data lacks (`train_labels` is all of it:
  more images are the only cure); else those of `among` (the classes the
  data holds) that fold k's training images lack, too few for the folds."""
  if k is None:
    found = [f"{clause[0].upper()}{clause[1:]}; add images of that class."
             for clause in metrics.untrained_classes(
                 "cross-validated", train_labels, schemas.LABELS)]
  else:
    found = [f"Fold {k}: {clause}; use fewer --folds, or add images of that"
             " class." for clause in metrics.untrained_classes(
                 "training", train_labels, schemas.LABELS, among)]
  for warning in found:
    _LOG.warning("%s", warning)
  return found


def _fold(k: int, config: TrainConfig, runner: recipe.Recipe,
          data: data_lib.LabelledData, hashes: Sequence[int],
          fold_of: np.ndarray) -> Dict:
  """Trains on the other folds as `train` would, and scores fold k."""
  names = list(schemas.LABELS)
  train, val, test = fold_split(k, config, data, hashes, fold_of)
  if config.target_accuracy is not None and not len(val):
    raise ValueError("cv: a fold left no validation images to choose the"
                     " threshold on; raise --val_fraction")
  fitted = runner.fit(train, val, config.seed + k)
  val_logits, test_logits = runner.logits(val), runner.logits(test)
  labels = data.labels
  fit = recipe.fit_calibration(config, val_logits, labels[val])
  flagging = recipe.choose_flagging(
      config, recipe.confidence(val_logits, labels[val], fit.temperature),
      recipe.confidence(test_logits, labels[test], fit.temperature),
      fit.block["fitted"])
  warnings = untrained_warnings(
      k, labels[train], np.unique(labels).tolist()) + fold_warnings(
      k, labels[val], val_logits, labels[test], test_logits,
      fit.block["fitted"],
      flagging.get("chosen_on") == schemas.THRESHOLD_ON_VALIDATION)
  probabilities = calibration.softmax(test_logits, fit.temperature)
  scores = fold_metrics(labels[test], probabilities, flagging["threshold"],
                        names, config.threshold)
  scores["ece_uncalibrated"] = calibration.expected_calibration_error(
      calibration.softmax(test_logits), labels[test])
  # The fold's OOD detector on the held-out fold: in-distribution images it
  # flags (None when the recipe fits no detector).
  ood_flags = ood_detector.held_out_flags(
      ood_detector.fit(config, runner, train, val,
                       groups=split.duplicate_groups(data.image_ids, hashes)),
      runner, test)
  scores["ood_flagged_share"] = (None if ood_flags is None else
                                 float(np.mean(ood_flags)))
  return {
      "fold": k,
      "counts": {"train": int(len(train)), "val": int(len(val)),
                 "test": int(len(test))},
      "temperature": fit.temperature,
      "calibration_fitted": fit.block["fitted"],
      "threshold": flagging["threshold"],
      "target_reached": flagging["target_reached"],
      "threshold_rule": flagging.get("rule"),
      "epochs_run": fitted.epochs_run,
      "best_epoch": fitted.best_epoch,
      "seconds": {k: round(v, 2) for k, v in fitted.seconds.items()},
      "val": flagging["val"],
      "test": scores,
      "test_image_ids": [data.image_ids[i] for i in test],
      schemas.CV_WARNINGS: warnings,
      "_probabilities": probabilities,
      "_test": test,
      "_ood_flags": ood_flags,
  }


def run_folds(config: TrainConfig, folds: int, runner: recipe.Recipe,
              data: data_lib.LabelledData, hashes: Sequence[int],
              after_fold: Optional[Callable[[int, Dict], None]] = None
             ) -> Dict:
  """Cross-validates the recipe on `data` with a model and cache in hand.

  The model's weights are put back as they were afterwards, so `train`
  can go on to fit its final model on the same cache.

  Args:
    config: the recipe's flags.
    folds: number of folds.
    runner: a Recipe whose cache holds every view of every image.
    data: the labelled images the cache was built on.
    hashes: their dHashes.
    after_fold: called as after_fold(k, result) once fold k is scored,
      while `runner.model` still holds that fold's fitted weights (a
      benchmark scoring more images with each fold's model);
      result["temperature"] and ["threshold"] are the fold's,
      result["test_indices"] its held-out images' indices into `data` and
      result["probabilities"] their calibrated probabilities.

  Returns:
    The report; see `cross_validate`.
  """
  started = time.perf_counter()
  names = list(schemas.LABELS)
  model = runner.model
  group_of = split.duplicate_groups(data.image_ids, hashes)
  fold_of = assign_folds(data.image_ids, [names[i] for i in data.labels],
                         group_of, folds, config.seed)
  _LOG.info("cv: %d images in %d near-duplicate groups, %d folds",
            len(data.image_ids), len(set(group_of)), folds)
  absent = untrained_warnings(None, data.labels)
  initial = model.get_weights()
  results = []
  for k in range(folds):
    # Every fold starts from the same pretrained base and initial head.
    model.set_weights(initial)
    model_lib.freeze_backbone(model)
    results.append(_fold(k, config, runner, data, hashes, fold_of))
    if after_fold is not None:
      after_fold(k, dict(results[-1], test_indices=results[-1]["_test"],
                         probabilities=results[-1]["_probabilities"]))
    _LOG.info("cv fold %d: %s", k, {n: results[-1]["test"][n]
                                    for n in ("macro_f1", "accuracy")})
  model.set_weights(initial)
  model_lib.freeze_backbone(model)
  order = np.concatenate([r.pop("_test") for r in results])
  pooled_probabilities = np.concatenate([r.pop("_probabilities")
                                         for r in results])
  thresholds = np.concatenate([np.full(r["counts"]["test"], r["threshold"])
                               for r in results])
  pooled = fold_metrics(data.labels[order], pooled_probabilities, thresholds,
                        names, config.threshold)
  ood_flags = [r.pop("_ood_flags") for r in results]
  pooled_ood = (None if any(f is None for f in ood_flags) else
                np.concatenate(ood_flags))
  pooled["ood_flagged_share"] = (None if pooled_ood is None else
                                 float(np.mean(pooled_ood)))
  temperatures = np.concatenate([np.full(r["counts"]["test"],
                                         r["temperature"]) for r in results])
  settings = recipe_settings(config)
  predictions = predictions_table(data, order, fold_of, pooled_probabilities,
                                  temperatures, thresholds, pooled_ood)
  return {
      "folds_count": folds,
      "images": int(len(data.labels)),
      "groups": int(len(set(group_of))),
      "class_counts": _class_counts(data),
      "image_size": int(data.images.shape[1]),
      "data_fingerprint": split.fingerprint(data.image_ids),
      "settings": settings,
      "folds": results,
      "pooled": pooled,
      "summary": summarise([r["test"] for r in results]),
      schemas.CV_WARNINGS: absent + [w for r in results
                                     for w in r[schemas.CV_WARNINGS]],
      "seconds": {"folds": round(time.perf_counter() - started, 2)},
      "package_version": schemas.PACKAGE_VERSION,
      schemas.CV_OUT_OF_FOLD_FLAGGING: predictions_flagging(
          predictions, config, all(r["calibration_fitted"] for r in results)),
      PREDICTIONS: predictions,
  }


def all_views_cache(config: TrainConfig, model, data: data_lib.LabelledData,
                    layers: Optional[Sequence[str]] = None
                   ) -> recipe.ConvCache:
  """A cache of every view of every image: what the folds need.

  `layers`: what to cache; default: what `config`'s recipe needs.
  """
  everything = np.arange(len(data.labels))
  return recipe.ConvCache(model, data.images,
                          {v: everything for v in recipe.views(config)},
                          config.batch_size, config.seed,
                          layers or recipe.cache_layers(config, model),
                          config.degrade,
                          keys=recipe.draw_keys(data.image_ids),
                          annotate=config.annotate, depth=config.depth,
                          precision=config.precision)


def cross_validate(config: TrainConfig, folds: int,
                   masks: Sequence[str] = ()) -> Dict:
  """Runs the recipe on k grouped, stratified folds.

  Args:
    config: the recipe's flags, as `train` takes them (output unused).
    folds: number of folds.
    masks: globs of BUSI archives holding the lesion masks (`evaluate
      --masks`); when given, each fold's model is also checked against the
      masks of its held-out benign/malignant images (`lesions.localise_each`:
      Grad-CAM's pointing game and IoU), out of fold as every other figure.

  Returns:
    The report: per fold (counts, temperature, threshold, epochs, the test
    fold's figures and image_ids), "pooled" (every image scored by the model
    that did not see its fold, each with its fold's threshold), "summary"
    (mean ± sd over folds of each of SCALARS), and the settings. With
    `masks`, each fold and the report get a `lesion_localisation` block
    (the report's pools the folds': `lesions.pool`).

  Raises:
    ValueError: bad flags or data, or a --masks archive cannot be read.
  """
  config.validate(cross_validation=True)
  config = recipe.resolved(config)
  started = time.perf_counter()
  names = list(schemas.LABELS)
  # Before the conv pass, so that a bad --masks fails at once.
  mask_sets = lesion_masks.read_mask_archives(masks) if masks else None
  data, stats = data_lib.load_labelled(config.data, names, config.image_size)
  hashes = [split.dhash(image) for image in data.images]
  keras.utils.set_random_seed(config.seed)
  model = recipe.build_model(config, int(data.images.shape[1]))
  cache = all_views_cache(config, model, data)
  # Per-fold results are logged; hundreds of epoch lines would bury them.
  runner = recipe.Recipe(model, cache, data.labels, config, progress=0)
  localised = {}
  scored: Dict[str, Tuple[bool, float]] = {}  # image_id → hit, IoU
  localising = 0.0

  def localise(k: int, result: Dict) -> None:
    # runner.model holds fold k's weights here: its held-out images only.
    nonlocal localising
    begun = time.perf_counter()
    test = result["test_indices"]
    localised[k], each = lesions.localise_each(
        runner.model, data.images[test], [data.sources[i] for i in test],
        data.labels[test], result["probabilities"].argmax(axis=1), names,
        mask_sets, config.batch_size)
    scored.update(each.by_image([data.image_ids[i] for i in test]))
    _LOG.info("cv fold %d: %s", k, lesions.format_localisation(localised[k]))
    localising += time.perf_counter() - begun

  report = run_folds(config, folds, runner, data, hashes,
                     after_fold=None if mask_sets is None else localise)
  if localised:
    key = evaluation_schema.LESION_LOCALISATION
    for fold in report["folds"]:
      fold[key] = localised[fold["fold"]].to_json()
    report[key] = lesions.pool([localised[k] for k in sorted(localised)]
                               ).to_json()
    report[PREDICTIONS] = lesions.with_columns(
        report[PREDICTIONS], scored,
        schemas.cv_predictions_schema(schemas.LABELS, localised=True))
    # Part of "folds": the Grad-CAM passes.
    report["seconds"]["lesion_localisation"] = round(localising, 2)
  report.update(examples_read=stats.examples,
                unlabelled_skipped=stats.unlabelled,
                duplicates_skipped=stats.duplicates,
                conflicting_labels_skipped=stats.conflicting)
  report["seconds"].update(conv_cache=round(cache.seconds, 2),
                           total=round(time.perf_counter() - started, 2))
  return report


def card_summary(report: Optional[Dict]) -> Optional[Dict]:
  """The part of a cv report that metadata.json keeps (no image ids; the
  pooled lesion localisation with --masks, not the folds')."""
  if not report:
    return None
  summary = {
      "folds": report["folds_count"],
      "images": report["images"],
      "groups": report["groups"],
      "data_fingerprint": report["data_fingerprint"],
      "pooled": {k: v for k, v in report["pooled"].items()
                 if k != "confusion_matrix"},
      "pooled_confusion_matrix": report["pooled"]["confusion_matrix"],
      "summary": report["summary"],
      "per_fold": [{"fold": f["fold"], "counts": f["counts"],
                    "temperature": f["temperature"],
                    "threshold": f["threshold"],
                    "target_reached": f["target_reached"],
                    "test": {k: v for k, v in f["test"].items()
                             if k != "confusion_matrix"}}
                   for f in report["folds"]],
  }
  if report.get(evaluation_schema.LESION_LOCALISATION):
    summary[evaluation_schema.LESION_LOCALISATION] = report[
        evaluation_schema.LESION_LOCALISATION]
  if report.get(schemas.CV_WARNINGS) is not None:
    summary[schemas.CV_WARNINGS] = report[schemas.CV_WARNINGS]
  return summary
