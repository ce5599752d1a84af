"""`cv`: grouped, stratified k-fold cross-validation of the whole recipe.

Each fold in turn is the test set; the other folds are split into train and
validation exactly as `train` splits its data (duplicate-aware, stratified),
and the recipe runs on them unchanged: fit, temperature and review threshold
on validation. The fold's images are scored only at the end. Folds are made
of whole near-duplicate groups (`split.duplicate_groups`), so an image and
its near-copies never sit on both sides of a fold.

The conv base's outputs do not depend on the fold (the base is frozen, or,
when block5 is fine-tuned, everything before it is), so they are computed
once for every image and view and shared by the folds: k folds cost one
pass of VGG16 plus k head fits.
"""

import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

import schemas
from training import calibration, metrics, split

_LOG = logging.getLogger(__name__)

# Scalar figures of each fold, in the order the table prints them.
SCALARS = ("macro_f1", "recall_malignant", "recall_benign", "recall_normal",
           "accuracy", "ece", "auc_malignant", "flagged_share",
           "accuracy_unflagged")


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
    fold_of[indices] = k
  return fold_of


def fold_metrics(labels: np.ndarray, probabilities: np.ndarray,
                 threshold: float, label_names: Sequence[str]) -> Dict:
  """The figures of one set of scored images.

  Args:
    labels: true class indices [n].
    probabilities: the model's (calibrated) probabilities [n, classes].
    threshold: the review threshold; confidence below it is flagged.
    label_names: class names in index order (must include "malignant").

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
  flagging = calibration.flag_stats(confidence, correct, threshold)
  malignant = names.index("malignant")
  result = {
      "count": int(len(labels)),
      "macro_f1": report["macro"]["f1"],
      "accuracy": report["accuracy"],
      "ece": calibration.reliability(confidence, correct)["ece"],
      "auc_malignant": metrics.roc_auc(probabilities[:, malignant],
                                       labels == malignant),
      "threshold": float(threshold),
      "flagged": flagging["flagged"],
      "flagged_share": flagging["flagged_share"],
      "accuracy_unflagged": flagging["accuracy_confident"],
      "confusion_matrix": report["confusion_matrix"],
  }
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
  summary = {}
  for name in SCALARS:
    values = [f[name] for f in per_fold if f.get(name) is not None]
    mean = float(np.mean(values)) if values else None
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    summary[name] = {"mean": mean, "sd": sd, "n": len(values)}
  return summary


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
      value = fold["test"][name]
      row += f"{value:>{width}d}" if name == "count" else (
          f"{_cell(value):>{width}}")
    pooled = report["pooled"][name]
    row += (f"{pooled:>{width}d}" if name == "count" else
            f"{_cell(pooled):>{width}}")
    if name != "count":
      s = report["summary"][name]
      row += f"{_cell(s['mean']) + ' ± ' + _cell(s['sd']):>16}"
    lines.append(row)
  return "\n".join(lines)


def write_report(report: Dict, output: str) -> str:
  """Writes the report as JSON to OUTPUT/cv.json (local or gs://)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  if "://" not in output:
    os.makedirs(output, exist_ok=True)
  path = FileSystems.join(output.rstrip("/"), schemas.CV_REPORT_FILE)
  with FileSystems.create(path) as f:
    f.write(json.dumps(report, indent=2).encode("utf-8"))
  return path
