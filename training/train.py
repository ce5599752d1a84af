"""Training: TFRecords → split → cached views → two-stage fit → calibration
→ threshold → artifact.

The recipe itself (views, cached conv outputs, the stages with early
stopping, temperature and threshold) lives in `training.recipe`, shared with
`cv`, which measures it. Stage one trains the head on the frozen base's
cached "features" of every view of the training images; the optional
fine-tune stage unfreezes block5 and trains on cached block4_pool outputs.
The head and block5 are the full model's own layer objects
(`model.sub_model`), so the full model is assembled by construction.

The temperature of the model's TemperatureScaling layer is fitted on the
validation split's logits, so model.keras itself outputs calibrated
probabilities; the review threshold is then chosen on validation for
`--target_accuracy` (default 0.95) or fixed (`--threshold`). The test split
(empty by default: `cv` measures the recipe, and the final model learns from
the rest) is used only to report.
"""

import collections
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, NamedTuple

import keras
import numpy as np

import schemas
from schemas import artifact as artifact_schema
from training import calibration, data as data_lib
from busi_core import artifact
from training import saving
from training import cv, metrics, model as model_lib, plots, recipe, split
from training.config import TrainConfig

_LOG = logging.getLogger(__name__)

CONFUSION_MATRIX_FILE = artifact_schema.CONFUSION_MATRIX_FILE
TRAINING_CURVES_FILE = artifact_schema.TRAINING_CURVES_FILE
SPLIT_FILE = artifact_schema.SPLIT_FILE
RELIABILITY_DIAGRAM_FILE = artifact_schema.RELIABILITY_DIAGRAM_FILE


def _reliability(logits: np.ndarray, labels: np.ndarray,
                 temperature: float) -> Dict:
  return calibration.reliability(*recipe.confidence(logits, labels,
                                                    temperature))


def _calibrate(model, config: TrainConfig, val_logits: np.ndarray,
               val_labels: np.ndarray, test_logits: np.ndarray,
               test_labels: np.ndarray) -> Dict:
  """Fits and sets the model's temperature; ECE on test before and after.

  Returns:
    The "calibration" metadata block.
  """
  fit = recipe.fit_calibration(config, val_logits, val_labels)
  block = dict(fit.block)
  if block.get("rejected_temperature") is not None:
    message = (
        f"WARNING: the temperature {block['rejected_temperature']:.4g} sits"
        " at the end of its search range"
        f" [{calibration.MIN_TEMPERATURE:g}, {calibration.MAX_TEMPERATURE:g}]:"
        " the validation split is perfectly separated, or the model's logits"
        " are extreme. It is not applied (the temperature stays 1.0); use a"
        " larger --val_fraction or train differently.")
    _LOG.warning(message)
    print(message)
  if block["fitted"]:
    model_lib.set_temperature(model, fit.temperature)
    block["temperature"] = model_lib.temperature_of(model)
  temperature = block["temperature"]
  before = _reliability(test_logits, test_labels, 1.0)
  after = _reliability(test_logits, test_labels, temperature)
  block.update(split=split.TEST, bins=calibration.DEFAULT_BINS,
               count=int(len(test_labels)), ece_before=before["ece"],
               ece_after=after["ece"], reliability_before=before,
               reliability_after=after)
  return block


def _threshold(config: TrainConfig, val, test) -> Dict:
  """The "flagging" block (see `recipe.choose_flagging`), with a warning
  when the target accuracy cannot be reached."""
  block = recipe.choose_flagging(config, val, test)
  if block["target_reached"] is False:
    message = (
        f"WARNING: no threshold reaches validation accuracy"
        f" {config.target_accuracy:g} on the images it does not flag (the"
        " most confident validation predictions are wrong). Falling back"
        f" to the highest validation confidence, {block['threshold']:.4f},"
        " which flags nearly everything; the model card says so.")
    _LOG.warning(message)
    print(message)
  return block


def _format_flagging(name: str, stats) -> str:
  if not stats:
    return f"{name}: no images"
  def num(x):
    return "n/a" if x is None else f"{x:.3f}"
  return (f"{name}: {stats['flagged']}/{stats['count']} flagged"
          f" ({100 * stats['flagged_share']:.0f} %), accuracy"
          f" {num(stats['accuracy_confident'])} on the rest,"
          f" {num(stats['accuracy_flagged'])} on the flagged")


def _print_calibration(cal: Dict, flagging: Dict) -> None:
  def num(x):
    return "n/a" if x is None else f"{x:.3f}"
  if cal["fitted"]:
    print(f"Calibration: temperature {cal['temperature']:.4f} fitted on"
          f" {cal['fit_count']} validation images (NLL"
          f" {cal['nll_before']:.4f} → {cal['nll_after']:.4f})")
  else:
    print(f"Calibration: none ({cal['reason']}); temperature 1.0")
  if cal["count"]:
    print(f"Test ECE ({cal['bins']} bins, {cal['count']} images):"
          f" {num(cal['ece_before'])} before, {num(cal['ece_after'])} after")
  source = "fixed"
  if flagging["source"] == schemas.THRESHOLD_TARGET_ACCURACY:
    source = f"target accuracy {flagging['target_accuracy']:g}" + (
        "" if flagging["target_reached"] else " NOT reached")
  print(f"Review threshold {flagging['threshold']:.4f} ({source})")
  for name, key in (("validation", "val"), ("test", "test")):
    if flagging[key]:
      print("  " + _format_flagging(name, flagging[key]))
  if flagging["source"] != schemas.THRESHOLD_FIXED:
    fixed = flagging["fixed"]
    print(f"At the fixed threshold {fixed['threshold']:g}:")
    for name, key in (("validation", "val"), ("test", "test")):
      if fixed[key]:
        print("  " + _format_flagging(name, fixed[key]))


def _predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
  if not len(images):
    return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
  return model.predict(images, batch_size=batch_size, verbose=0)


def _remove_stale(config: TrainConfig) -> None:
  """With --overwrite, the old artifact stops being one before anything is
  written (metadata.json goes first), and its cv.json goes too when this
  run writes none."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  names = [schemas.METADATA_FILE] + ([] if config.cv_folds else
                                     [schemas.CV_REPORT_FILE])
  stale = [FileSystems.join(config.output.rstrip("/"), name) for name in names]
  stale = [uri for uri in stale if FileSystems.exists(uri)]
  if stale:
    FileSystems.delete(stale)


def _warn_unmeasured(config: TrainConfig) -> None:
  """Says so when nothing held out will measure the model."""
  if not config.cv_folds and not config.test_fraction:
    message = ("WARNING: --cv_folds 0 and no test split: nothing held out"
               " will measure this model. Run `python -m training cv` with"
               " the same flags, or keep --cv_folds.")
    _LOG.warning(message)
    print(message)
  if config.patience and not config.val_fraction:
    print(f"Note: no validation split, so no early stopping: every stage"
          f" runs all its epochs (--epochs {config.epochs}).")


def _check_output(config: TrainConfig) -> None:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  existing = FileSystems.join(config.output.rstrip("/"), schemas.METADATA_FILE)
  if FileSystems.exists(existing) and not config.overwrite:
    raise ValueError(
        f"{config.output} already holds a model artifact. Choose a new"
        " --output, or pass --overwrite to replace it.")


class _Prepared(NamedTuple):
  """The data of a run, read, split and checked."""
  data: data_lib.LabelledData
  stats: data_lib.ReadStats
  hashes: list
  indices: Dict[str, np.ndarray]  # split name → indices into data
  class_counts: Dict[str, Dict[str, int]]
  grouped: int  # images sharing a near-duplicate group


def _read_and_split(config: TrainConfig) -> _Prepared:
  """Reads the labelled examples and splits them (duplicate-aware)."""
  labels = list(schemas.LABELS)
  data, stats = data_lib.load_labelled(config.data, labels, config.image_size)
  _LOG.info(
      "Read %d examples: %d labelled images used, %d unlabelled skipped,"
      " %d exact duplicates and %d with conflicting labels skipped",
      stats.examples, stats.used, stats.unlabelled, stats.duplicates,
      stats.conflicting)
  if stats.unlabelled:
    print(f"Skipped {stats.unlabelled} unlabelled examples (label \"\").")
  hashes = [split.dhash(image) for image in data.images]
  result = split.split_indices(
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
  if not len(indices[split.TRAIN]):
    raise ValueError("no image left for training")
  if config.target_accuracy is not None and not len(indices[split.VAL]):
    raise ValueError("--target_accuracy chooses the threshold on the"
                     " validation split, and the split left it empty; raise"
                     " --val_fraction or pass --threshold")
  for label, count in class_counts[split.TRAIN].items():
    if not count:
      _LOG.warning("no training image of class %r", label)
  return _Prepared(data, stats, hashes, indices, class_counts, grouped)


def _fit(config: TrainConfig, prepared: _Prepared):
  """Builds the model, cross-validates the recipe (unless --cv_folds 0),
  then runs its stages on the train/val split; all on one conv cache."""
  data, indices = prepared.data, prepared.indices
  model = model_lib.build_model(int(data.images.shape[1]),
                                config.backbone_weights, len(schemas.LABELS),
                                config.backbone)
  train_idx, val_idx = indices[split.TRAIN], indices[split.VAL]
  report = None
  if config.cv_folds:
    # The folds need every view of every image; the final fit reuses them.
    cache = cv.all_views_cache(config, model, data)
    folds = recipe.Recipe(model, cache, data.labels, config, progress=0)
    print(f"Cross-validating the recipe on {len(data.labels)} images"
          f" ({config.cv_folds} grouped folds)...")
    report = cv.run_folds(config, config.cv_folds, folds, data,
                          prepared.hashes)
    print(cv.format_table(report))
  else:
    needed = {view: train_idx for view in recipe.views(config)}
    # Validation images are seen as stored (view 0 only), as scoring sees
    # them.
    needed[recipe.ORIGINAL] = np.concatenate([train_idx, val_idx])
    cache = recipe.ConvCache(model, data.images, needed, config.batch_size,
                             config.seed, recipe.cache_layers(config, model))
  keras.utils.set_random_seed(config.seed)
  runner = recipe.Recipe(model, cache, data.labels, config)
  fitted = runner.fit(train_idx, val_idx)
  return model, runner, fitted, report


def _write_plots(work: str, config: TrainConfig, test_report: Dict,
                 fitted: recipe.FitResult, cal: Dict) -> None:
  labels = list(schemas.LABELS)
  plots.plot_confusion_matrix(
      test_report["confusion_matrix"], labels,
      os.path.join(work, CONFUSION_MATRIX_FILE),
      f"{config.name}: test split ({test_report['count']} images)")
  plots.plot_training_curves(fitted.history,
                             os.path.join(work, TRAINING_CURVES_FILE),
                             fitted.fine_tune_start)
  panels = [("test split, T = 1 (before)", cal["reliability_before"])]
  if cal["fitted"]:
    panels.append((f"test split, T = {cal['temperature']:.3f} (after)",
                   cal["reliability_after"]))
  plots.plot_reliability(panels, os.path.join(work, RELIABILITY_DIAGRAM_FILE))


def _write_split(work: str, prepared: _Prepared) -> None:
  with open(os.path.join(work, SPLIT_FILE), "w", encoding="utf-8") as f:
    # The dHashes let `evaluate` spot near-duplicates of training images in
    # other data (BUSI repeats frames), not only exact copies.
    json.dump({**{name: [prepared.data.image_ids[i] for i in idx]
                  for name, idx in prepared.indices.items()},
               artifact_schema.SPLIT_DHASH_KEY: {
                   name: [split.hash_hex(prepared.hashes[i]) for i in idx]
                   for name, idx in prepared.indices.items()}}, f)


def _training_block(config: TrainConfig, prepared: _Prepared,
                    fitted: recipe.FitResult, seconds: Dict) -> Dict:
  labels = list(schemas.LABELS)
  stats = prepared.stats
  return {
      "epochs": config.epochs,
      "fine_tune_epochs": config.fine_tune_epochs,
      "patience": config.patience,
      "label_smoothing": config.label_smoothing,
      "cv_folds": config.cv_folds,
      "epochs_run": fitted.epochs_run,
      "best_epoch": fitted.best_epoch,
      "seed": config.seed,
      "val_fraction": config.val_fraction,
      "test_fraction": config.test_fraction,
      "augment": config.augment,
      "augment_views": config.augment_views,
      "calibrate": config.calibrate,
      "synthetic_data": config.synthetic_data,
      "batch_size": config.batch_size,
      "learning_rate": config.learning_rate,
      "fine_tune_learning_rate": config.fine_tune_learning_rate,
      "class_weight": {labels[c]: round(w, 6)
                       for c, w in fitted.class_weight.items()},
      "data": list(config.data),
      "examples_read": stats.examples,
      "unlabelled_skipped": stats.unlabelled,
      "duplicates_skipped": stats.duplicates,
      "conflicting_labels_skipped": stats.conflicting,
      "near_duplicates_grouped": prepared.grouped,
      "history": fitted.history,
      "seconds": {k: round(v, 2) for k, v in seconds.items()},
      "epoch_seconds": fitted.epoch_seconds,
  }


def train(config: TrainConfig) -> Dict:
  """Trains a model from the TFRecords and writes the artifact.

  Args:
    config: the validated flags.

  Returns:
    The metadata written to metadata.json.

  Raises:
    ValueError: bad flags or data (message says what to pass).
    model.BackboneWeightsError: the backbone weights cannot be had.
  """
  config.validate()
  _check_output(config)
  _warn_unmeasured(config)
  started = time.perf_counter()
  keras.utils.set_random_seed(config.seed)
  labels = list(schemas.LABELS)

  prepared = _read_and_split(config)
  if config.overwrite:
    _remove_stale(config)
  seconds = {"read": time.perf_counter() - started}
  work = (config.output if "://" not in config.output else
          tempfile.mkdtemp(prefix="busi-train-"))
  os.makedirs(work, exist_ok=True)
  model, runner, fitted, cv_report = _fit(config, prepared)
  seconds["conv_cache"] = runner.cache.seconds
  if cv_report:
    seconds["cross_validation"] = cv_report["seconds"]["folds"]
  seconds.update(fitted.seconds)

  # Test logits from the assembled full model on raw pixels: what scoring
  # runs. The temperature changes no argmax, so the metrics come first.
  data = prepared.data
  val_idx, test_idx = prepared.indices[split.VAL], prepared.indices[split.TEST]
  test_started = time.perf_counter()
  test_logits = model_lib.predict_logits(model, data.images[test_idx],
                                         config.batch_size)
  test_report = metrics.classification_report(
      data.labels[test_idx], test_logits.argmax(axis=1), labels)
  seconds["test"] = time.perf_counter() - test_started
  if len(test_idx):
    print(f"Test metrics ({len(test_idx)} images):")
    print(metrics.format_report(test_report))

  calibration_started = time.perf_counter()
  val_logits = runner.logits(val_idx)
  cal = _calibrate(model, config, val_logits, data.labels[val_idx],
                   test_logits, data.labels[test_idx])
  temperature = cal["temperature"]
  flagging = _threshold(
      config, recipe.confidence(val_logits, data.labels[val_idx], temperature),
      recipe.confidence(test_logits, data.labels[test_idx], temperature))
  seconds["calibration"] = time.perf_counter() - calibration_started
  _print_calibration(cal, flagging)

  _write_plots(work, config, test_report, fitted, cal)
  _write_split(work, prepared)
  if cv_report:
    cv.write_report(cv_report, work)
  seconds["total"] = time.perf_counter() - started
  metadata = saving.save_artifact(model, work, labels, {
      "name": config.name,
      "image_size": int(data.images.shape[1]),
      "threshold": flagging["threshold"],
      "threshold_source": flagging["source"],
      "target_accuracy": config.target_accuracy,
      "backbone": config.backbone,
      "weights_source": model_lib.weights_source(config.backbone_weights),
      "data_fingerprint": split.data_fingerprint(
          {name: [data.image_ids[i] for i in idx]
           for name, idx in prepared.indices.items()}),
      "class_counts": prepared.class_counts,
      "test_metrics": test_report,
      "temperature": temperature,
      "calibration": cal,
      "flagging": flagging,
      "training": _training_block(config, prepared, fitted, seconds),
      artifact_schema.METADATA_CROSS_VALIDATION: cv.card_summary(cv_report),
  })
  # Checked on validation images when there is no test split.
  check = test_idx if len(test_idx) else val_idx
  check_logits = test_logits if len(test_idx) else val_logits
  _verify_saved(work, model, data.images[check[:8]], config.batch_size,
                calibration.softmax(check_logits[:8], temperature))
  if work != config.output:
    saving.copy_artifact(work, config.output)
    shutil.rmtree(work, ignore_errors=True)
  print(f"Model {metadata['model_version']} written to {config.output}"
        f" in {seconds['total']:.1f} s")
  return metadata


def _verify_saved(model_dir: str, model, images: np.ndarray,
                  batch_size: int, calibrated: np.ndarray) -> None:
  """Reloads the artifact as scoring will and checks it predicts the same,
  and the same as the calibrated probabilities the report was made from."""
  loaded = artifact.load_artifact(model_dir)
  if len(images):
    expected = _predict(model, images, batch_size)
    actual = _predict(loaded.model, images, batch_size)
    if not (np.allclose(expected, actual, atol=1e-5) and
            np.allclose(calibrated, actual, atol=1e-4)):
      # Without metadata.json the directory no longer passes as an artifact.
      os.remove(os.path.join(model_dir, schemas.METADATA_FILE))
      raise RuntimeError("the saved model.keras does not reproduce the trained"
                         " model's predictions")
