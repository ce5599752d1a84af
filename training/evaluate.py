"""`evaluate`: a saved artifact's metrics on any labelled TFRecords."""

import datetime
import json
import logging
import os
from typing import Dict, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

import schemas
from schemas import artifact as artifact_schema
from training import artifact, calibration, data as data_lib, metrics
from training import plots, split

_LOG = logging.getLogger(__name__)

REPORT_FILE = "metrics.json"
CONFUSION_MATRIX_FILE = artifact_schema.CONFUSION_MATRIX_FILE
SPLIT_FILE = artifact_schema.SPLIT_FILE  # written by train; flags seen images


def _join(directory: str, name: str) -> str:
  return FileSystems.join(directory.rstrip("/"), name)


def _training_ids(model_dir: str) -> Optional[set]:
  uri = _join(model_dir, SPLIT_FILE)
  if not FileSystems.exists(uri):
    return None
  with FileSystems.open(uri) as f:
    splits = json.loads(f.read().decode("utf-8"))
  return set(splits.get(split.TRAIN, [])) | set(splits.get(split.VAL, []))


def evaluate(model_dir: str, patterns: Sequence[str], output: str,
             batch_size: int = 32) -> Dict:
  """Scores labelled TFRecords with an artifact; writes metrics and a plot.

  Args:
    model_dir: the artifact (local or gs://).
    patterns: globs of gzip TFRecords; unlabelled examples are skipped.
    output: report directory (local or gs://); gets metrics.json and
      confusion_matrix.png.
    batch_size: images per model call.

  Returns:
    The report written to metrics.json: the `metrics.classification_report`
    fields, the ECE (15 bins) and what the artifact's threshold flags
    (`calibration.flag_stats`), plus provenance (model_version, data fingerprint, skip counts, and
    how many images the model was trained or validated on, when known).

  Raises:
    artifact.ArtifactError: the artifact is invalid.
    ValueError: no file matches or no labelled image is found.
  """
  loaded = artifact.load_artifact(model_dir)
  labels = loaded.labels
  size = loaded.metadata["image_size"]
  data, stats = data_lib.load_labelled(patterns, labels, size)
  _LOG.info("Evaluating %s on %d labelled images (%d unlabelled skipped)",
            loaded.metadata["model_version"], stats.used, stats.unlabelled)
  probabilities = loaded.model.predict(data.images, batch_size=batch_size,
                                       verbose=0)
  predicted = probabilities.argmax(axis=1)
  report = metrics.classification_report(data.labels, predicted, labels)
  threshold = float(loaded.metadata["threshold"])
  confidence = probabilities.max(axis=1)
  correct = predicted == data.labels
  reliability = calibration.reliability(confidence, correct)
  seen = _training_ids(model_dir)
  report.update({
      "model_dir": model_dir,
      "model_version": loaded.metadata["model_version"],
      "threshold": threshold,
      "low_confidence": int((confidence < threshold).sum()),
      # With the artifact's (calibrated) probabilities, as scoring sees them.
      "temperature": float(loaded.metadata["temperature"]),
      "ece": reliability["ece"],
      "reliability": reliability,
      "flagging": calibration.flag_stats(confidence, correct, threshold),
      "data": list(patterns),
      "data_fingerprint": split.fingerprint(data.image_ids),
      "examples_read": stats.examples,
      "unlabelled_skipped": stats.unlabelled,
      "unknown_label_skipped": stats.unknown_label,
      "duplicates_skipped": stats.duplicates,
      "conflicting_labels_skipped": stats.conflicting,
      "seen_in_training": (None if seen is None else
                           int(sum(i in seen for i in data.image_ids))),
      "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "package_version": schemas.PACKAGE_VERSION,
  })
  if report["seen_in_training"]:
    _LOG.warning("%d of the %d images were in the model's training or"
                 " validation split: these metrics are optimistic",
                 report["seen_in_training"], report["count"])
  if "://" not in output:
    os.makedirs(output, exist_ok=True)
  with FileSystems.create(_join(output, REPORT_FILE)) as f:
    f.write(json.dumps(report, indent=2).encode("utf-8"))
  plots.plot_confusion_matrix(
      report["confusion_matrix"], labels, _join(output, CONFUSION_MATRIX_FILE),
      f"{report['model_version']} ({report['count']} images)")
  return report
