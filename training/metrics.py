"""Classification metrics as pure numpy functions (no Keras, no sklearn).

Conventions: rows of the confusion matrix are true classes, columns predicted
ones; a precision, recall or F1 whose denominator is zero is 0.0 (as sklearn's
`zero_division=0`), except that a class with no image in the set shows no
recall (None), nor precision or F1 when it is never predicted either; the
macro average is the unweighted mean over the classes the set holds or the
model predicts (sklearn's default label set, undefined scores as 0): a
benign/malignant sample is not marked down for the normal class it does not
hold, while a class predicted wrongly still counts, with F1 0.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import schemas


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int],
                     num_classes: int) -> np.ndarray:
  """Counts [true class, predicted class].

  Args:
    y_true: true class indices.
    y_pred: predicted class indices, same length.
    num_classes: size of the square matrix.

  Returns:
    int64 array [num_classes, num_classes].

  Raises:
    ValueError: lengths differ or an index is outside [0, num_classes).
  """
  y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
  y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
  if y_true.shape != y_pred.shape:
    raise ValueError(f"{y_true.size} true labels but {y_pred.size} predictions")
  for name, values in (("y_true", y_true), ("y_pred", y_pred)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{name} has a class index outside [0, {num_classes})")
  matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
  np.add.at(matrix, (y_true, y_pred), 1)
  return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  numerator = numerator.astype(np.float64)
  out = np.zeros_like(numerator)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def per_class_scores(matrix: np.ndarray) -> Dict[str, np.ndarray]:
  """Precision, recall, F1 and support of each class from a confusion matrix."""
  matrix = np.asarray(matrix, dtype=np.int64)
  true_positive = np.diag(matrix)
  predicted = matrix.sum(axis=0)
  support = matrix.sum(axis=1)
  precision = _safe_divide(true_positive, predicted)
  recall = _safe_divide(true_positive, support)
  f1 = _safe_divide(2 * precision * recall, precision + recall)
  return {"precision": precision, "recall": recall, "f1": f1,
          "support": support}


def classification_report(y_true: Sequence[int], y_pred: Sequence[int],
                          labels: Sequence[str]) -> Dict:
  """Accuracy, per-class and macro precision/recall/F1, confusion matrix.

  Args:
    y_true: true class indices into `labels`.
    y_pred: predicted class indices into `labels`.
    labels: class names in index order.

  Returns:
    A JSON-ready dict: "count", "accuracy", "per_class" {label: {"precision",
    "recall", "f1", "support"}} (None where undefined; see the module's
    conventions), "macro" {"precision", "recall", "f1"} over the classes
    the set holds or the model predicts, "labels" and "confusion_matrix"
    (rows true, columns predicted).
  """
  labels = list(labels)
  matrix = confusion_matrix(y_true, y_pred, len(labels))
  scores = per_class_scores(matrix)
  count = int(matrix.sum())
  accuracy = float(np.trace(matrix) / count) if count else 0.0
  support = scores["support"]
  present = (support > 0) | (matrix.sum(axis=0) > 0)  # held or predicted
  per_class = {
      label: {
          "precision": (float(scores["precision"][i]) if present[i]
                        else None),
          "recall": float(scores["recall"][i]) if support[i] else None,
          "f1": float(scores["f1"][i]) if present[i] else None,
          "support": int(support[i]),
      } for i, label in enumerate(labels)
  }
  # As sklearn's default: the mean over the classes held or predicted, an
  # undefined score counting as 0 (zero_division=0).
  macro = {name: float(np.mean(scores[name][present])) if present.any()
           else 0.0 for name in ("precision", "recall", "f1")}
  return {
      "count": count,
      "accuracy": accuracy,
      "per_class": per_class,
      "macro": macro,
      "labels": labels,
      "confusion_matrix": matrix.tolist(),
  }


# What `one_class` and `never_predicted` say such a finding means, unless
# told otherwise: on a model's own splits it has not learned.
ONE_CLASS_MEANING = "it has not learned to tell them apart"
NEVER_PREDICTED_MEANING = "it has not learned to recognise that class"


def one_class(name: str, y_pred: Sequence[int], y_true: Sequence[int],
              labels: Sequence[str],
              meaning: str = ONE_CLASS_MEANING) -> Optional[str]:
  """When every image of a set is predicted as one class though the set
  holds several, a sentence that says so (on its training's own splits the
  model has not learned to tell them apart: a head stopped on its first
  plateau does this, and its figures alone do not say why); None otherwise
  (an empty set too).

  Args:
    name: what the set is, e.g. "validation".
    y_pred, y_true: predicted and true class indices into `labels`.
    meaning: what it means for this set, after the colon.
  """
  predicted = np.unique(np.asarray(y_pred))
  classes = np.unique(np.asarray(y_true))
  if len(predicted) != 1 or len(classes) < 2:
    return None
  return (f"the model predicts {labels[int(predicted[0])]} for all"
          f" {len(y_true)} {name} images, which hold {len(classes)} classes:"
          f" {meaning}.")


# A class with at least this many images in a set, which the model never
# predicts there (so its recall is 0), is a finding (`never_predicted`): a
# model that finds even half of a class's images misses all five 3 % of the
# time.
NEVER_PREDICTED_MIN_SUPPORT = 5


def never_predicted(name: str, y_pred: Sequence[int], y_true: Sequence[int],
                    labels: Sequence[str],
                    meaning: str = NEVER_PREDICTED_MEANING) -> List[str]:
  """A sentence for each class that the set holds at least
  NEVER_PREDICTED_MIN_SUPPORT images of and the model never predicts there
  (its recall is 0: the figures show that, not why). [] for an empty set,
  and when the model predicts one class for a set that holds several:
  `one_class` says that.

  Args:
    name: what the set is, e.g. "validation".
    y_pred, y_true: predicted and true class indices into `labels`.
    meaning: what it means for this set, after the colon.
  """
  y_pred, y_true = np.asarray(y_pred), np.asarray(y_true)
  predicted = set(np.unique(y_pred).tolist())
  if not y_pred.size or (len(predicted) == 1
                         and len(np.unique(y_true)) > 1):
    return []
  found = []
  for index, label in enumerate(labels):
    support = int(np.sum(y_true == index))
    if support >= NEVER_PREDICTED_MIN_SUPPORT and index not in predicted:
      share = (f"all {support} are" if support == len(y_true) else
               f"{support} of them are")
      found.append(f"the model never predicts {label} for the"
                   f" {len(y_true)} {name} images, though {share} {label}:"
                   f" {meaning}.")
  return found


def untrained_classes(name: str, y_train: Sequence[int],
                      labels: Sequence[str],
                      among: Optional[Sequence[int]] = None) -> List[str]:
  """A clause for each class a training set holds no image of: the model
  never learns it, and its probability of that class means nothing.

  Args:
    name: what the set is, e.g. "training".
    y_train: its class indices into `labels`.
    among: the class indices to check; None: all of `labels`.
  """
  y_train = np.asarray(y_train)
  held = set(np.unique(y_train).tolist())
  checked = range(len(labels)) if among is None else among
  return [f"the {y_train.size} {name} images hold no {labels[index]} image:"
          f" the model never learned {labels[index]}, and its"
          f" {schemas.probability_column(labels[index])} means nothing"
          for index in checked if index not in held]


def prediction_findings(name: str, y_pred: Sequence[int],
                        y_true: Sequence[int], labels: Sequence[str],
                        one_class_meaning: str = ONE_CLASS_MEANING,
                        never_meaning: str = NEVER_PREDICTED_MEANING
                        ) -> Tuple[bool, List[str]]:
  """What is wrong with a set's predictions, for a warning: `one_class`'s
  sentence when the model predicts one class for a set that holds several,
  else `never_predicted`'s (one per class it never predicts), each ending
  with its meaning. Returns (whether it was one class, the sentences); each
  caller adds its own advice."""
  sentence = one_class(name, y_pred, y_true, labels, one_class_meaning)
  if sentence:
    return True, [sentence]
  return False, never_predicted(name, y_pred, y_true, labels, never_meaning)


def _cell(value: Optional[float], width: int) -> str:
  return f"{'n/a' if value is None else f'{value:.3f}':>{width}}"


def format_report(report: Dict) -> str:
  """The report as a small table a person reads in a terminal."""
  lines = [f"{'class':<12}{'precision':>10}{'recall':>8}{'f1':>8}"
           f"{'support':>9}"]
  for label, row in report["per_class"].items():
    lines.append(f"{label:<12}{_cell(row['precision'], 10)}"
                 f"{_cell(row['recall'], 8)}{_cell(row['f1'], 8)}"
                 f"{row['support']:>9d}")
  macro = report["macro"]
  lines.append(f"{'macro':<12}{macro['precision']:>10.3f}"
               f"{macro['recall']:>8.3f}{macro['f1']:>8.3f}"
               f"{report['count']:>9d}")
  lines.append(f"accuracy {report['accuracy']:.3f} on {report['count']} images")
  labels = report["labels"]
  width = max([len(label) for label in labels] + [6]) + 1
  lines.append("confusion matrix (rows true, columns predicted):")
  lines.append(" " * width + "".join(f"{label:>{width}}" for label in labels))
  for label, row in zip(labels, report["confusion_matrix"]):
    lines.append(f"{label:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
  return "\n".join(lines)


def roc_auc(scores: Sequence[float], positive: Sequence[bool]
           ) -> Optional[float]:
  """Area under the ROC curve of `scores` for telling `positive` apart.

  The Mann-Whitney statistic: the chance that a random positive scores
  above a random negative, ties counting one half (as sklearn's
  `roc_auc_score`). None when either group is empty.
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  positive = np.asarray(positive, dtype=bool).reshape(-1)
  if scores.shape != positive.shape:
    raise ValueError(f"{scores.size} scores but {positive.size} labels")
  n_pos = int(positive.sum())
  n_neg = int(scores.size - n_pos)
  if not n_pos or not n_neg:
    return None
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(scores.size, dtype=np.float64)
  sorted_scores = scores[order]
  # Average ranks (1-based) over runs of equal scores.
  starts = np.r_[0, np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]) + 1]
  ends = np.r_[starts[1:], scores.size]
  for start, end in zip(starts, ends):
    ranks[order[start:end]] = (start + end + 1) / 2.0
  rank_sum = ranks[positive].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
