"""Step: the output directory, the companion files, the metadata and the
artifact itself (`training.saving`), and the copy to gs://."""

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

import schemas
from schemas import artifact as artifact_schema
from schemas import metadata as metadata_schema
from schemas.metadata import ArtifactMetadata
from training import cv, model as model_lib, ood_detector, plots, saving
from training import augment, recipe, split
from training.config import TrainConfig
from training.steps.data import Read
from training.steps.fit import Fitted
from training.steps.split import Splits
from busi_core import output_dirs


def check_output(config: TrainConfig) -> None:
  """Refuses a local --output that is a file, and to replace an artifact
  unless --overwrite says so.

  Raises:
    ValueError: --output is a file, or holds an artifact and --overwrite is
      not given.
  """
  output_dirs.check_artifact_dir(config.output, config.overwrite)


def remove_stale(config: TrainConfig) -> None:
  """With --overwrite, the old artifact stops being one before anything is
  written (metadata.json goes first), its cv_predictions.parquet and
  recalibration_split.json too, and its cv.json when this run writes
  none."""
  writes_cv = config.cv_folds or config.cv_report
  # The predictions go whatever this run writes: a --cv_report from
  # before them brings none. A recalibrated artifact's sample split would
  # describe a calibration the new model does not have.
  names = [schemas.METADATA_FILE, schemas.CV_PREDICTIONS_FILE,
           schemas.RECALIBRATION_SPLIT_FILE] + (
      [] if writes_cv else [schemas.CV_REPORT_FILE])
  stale = [FileSystems.join(config.output.rstrip("/"), name) for name in names]
  stale = [uri for uri in stale if FileSystems.exists(uri)]
  if stale:
    FileSystems.delete(stale)


def work_dir(output: str) -> str:
  """The local directory the artifact is written in: `output` itself, or a
  temporary one that `publish` copies to a remote `output`."""
  work = output if "://" not in output else tempfile.mkdtemp(
      prefix="busi-train-")
  os.makedirs(work, exist_ok=True)
  return work


def write_companions(work: str, config: TrainConfig, read: Read,
                     splits: Splits, test_report: Dict, fitted: Fitted,
                     cal: metadata_schema.Calibration) -> None:
  """The plots, split.json and (with --cv_folds or --cv_report) cv.json
  beside the model."""
  labels = list(schemas.LABELS)
  plots.plot_confusion_matrix(
      test_report["confusion_matrix"], labels,
      os.path.join(work, artifact_schema.CONFUSION_MATRIX_FILE),
      f"{config.name}: test split ({test_report['count']} images)")
  plots.plot_training_curves(
      fitted.result.history,
      os.path.join(work, artifact_schema.TRAINING_CURVES_FILE),
      fitted.result.fine_tune_start)
  panels = [("test split, T = 1 (before)", cal.reliability_before)]
  if cal.fitted:
    panels.append((f"test split, T = {cal.temperature:.3f} (after)",
                   cal.reliability_after))
  plots.plot_reliability(
      panels, os.path.join(work, artifact_schema.RELIABILITY_DIAGRAM_FILE))
  with open(os.path.join(work, artifact_schema.SPLIT_FILE), "w",
            encoding="utf-8") as f:
    # The dHashes let `evaluate` spot near-duplicates of training images in
    # other data (BUSI repeats frames), not only exact copies.
    json.dump({**splits.image_ids(read.data),
               artifact_schema.SPLIT_DHASH_KEY: {
                   name: [split.hash_hex(splits.hashes[i]) for i in idx]
                   for name, idx in splits.indices.items()}}, f)
  if fitted.cv_report:
    cv.write_report(fitted.cv_report, work)


def _training_settings(config: TrainConfig, read: Read, splits: Splits,
                       fitted: Fitted, seconds: Dict[str, float]
                      ) -> metadata_schema.TrainingSettings:
  labels = list(schemas.LABELS)
  stats, result = read.stats, fitted.result
  annotated = tuple(v for v in recipe.views(config)
                    if config.annotate and recipe.annotated_view(v))
  deepened = tuple(v for v in recipe.views(config)
                   if config.depth and recipe.deepened_view(v))
  return metadata_schema.TrainingSettings(
      epochs=config.epochs,
      fine_tune_epochs=config.fine_tune_epochs,
      fine_tune_from=(result.fine_tuned[0] if result.fine_tuned else None),
      patience=config.patience,
      label_smoothing=config.label_smoothing,
      ema_momentum=config.ema_momentum,
      fine_tune_ema_momentum=(config.fine_tune_ema if result.fine_tuned
                              else None),
      malignant_weight=config.malignant_weight,
      cv_folds=config.cv_folds,
      epochs_run=result.epochs_run,
      best_epoch=result.best_epoch,
      seed=config.seed,
      val_fraction=config.val_fraction,
      test_fraction=config.test_fraction,
      augment=config.augment,
      augment_views=config.augment_views,
      degraded_views=tuple(v for v in recipe.views(config)
                           if config.degrade and recipe.degraded_view(v)),
      annotated_views=annotated,
      annotate_probability=augment.ANNOTATE.probability if annotated else None,
      deepened_views=deepened,
      depth_probability=augment.DEPTH.probability if deepened else None,
      depth_scale=tuple(augment.DEPTH.scale) if deepened else None,
      calibrate=config.calibrate,
      synthetic_data=config.synthetic_data,
      batch_size=config.batch_size,
      learning_rate=config.learning_rate,
      fine_tune_learning_rate=config.fine_tune_rate,
      # None where no fine-tune stage ran (--fine_tune_epochs 0 or auto 0).
      fine_tune_schedule=(config.fine_tune_schedule if result.fine_tuned
                          else None),
      precision=config.precision,
      class_weight={labels[c]: round(w, 6)
                    for c, w in result.class_weight.items()},
      data=tuple(config.data),
      examples_read=stats.examples,
      unlabelled_skipped=stats.unlabelled,
      duplicates_skipped=stats.duplicates,
      conflicting_labels_skipped=stats.conflicting,
      near_duplicates_grouped=splits.grouped,
      history=result.history,
      seconds={k: round(v, 2) for k, v in seconds.items()},
      epoch_seconds=result.epoch_seconds)


def save(work: str, config: TrainConfig, read: Read, splits: Splits,
         fitted: Fitted, test_report: Dict, cal: metadata_schema.Calibration,
         flagging: metadata_schema.Flagging,
         detector: Optional[ood_detector.Detector],
         seconds: Dict[str, float],
         warnings: Sequence[str]) -> ArtifactMetadata:
  """Writes the artifact (model, labels, OOD detector, card, metadata) into
  `work`; `warnings` are what the run found wrong with the model
  (`measure.warn_collapsed`), kept in its metadata.

  Returns:
    The metadata written.
  """
  ood_path = os.path.join(work, schemas.OOD_FILE)
  if detector is not None:
    with open(ood_path, "wb") as f:
      f.write(detector.data)
  elif os.path.exists(ood_path):  # an --overwrite'n artifact's
    os.remove(ood_path)
  return saving.save_artifact(
      fitted.model, work, list(schemas.LABELS),
      name=config.name,
      image_size=int(read.data.images.shape[1]),
      threshold=flagging.threshold,
      threshold_source=flagging.source,
      target_accuracy=config.target_accuracy,
      backbone=config.backbone,
      weights_source=model_lib.weights_source(config.backbone_weights),
      data_fingerprint=split.data_fingerprint(splits.image_ids(read.data)),
      class_counts=splits.class_counts,
      test_metrics=metadata_schema.ClassificationReport.from_json(
          test_report),
      temperature=cal.temperature,
      calibration=cal,
      flagging=flagging,
      training=_training_settings(config, read, splits, fitted, seconds),
      cross_validation=(None if fitted.cv_report is None else
                        metadata_schema.CrossValidationSummary.from_json(
                            {**cv.card_summary(fitted.cv_report),
                             "source": fitted.cv_source})),
      ood=None if detector is None else detector.block,
      warnings=tuple(warnings))


def publish(work: str, output: str) -> None:
  """Copies the artifact to a remote `output` (metadata.json last) and
  removes the local copy; nothing to do when `work` is `output`."""
  if work != output:
    saving.copy_artifact(work, output)
    shutil.rmtree(work, ignore_errors=True)
