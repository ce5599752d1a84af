"""Confusion-matrix and training-curve PNGs (matplotlib, Agg backend)."""

import io
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from apache_beam.io.filesystems import FileSystems  # pylint: disable=wrong-import-position


def _save(fig, uri: str) -> None:
  # Through FileSystems so that a gs:// report directory works too.
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  with FileSystems.create(uri) as f:
    f.write(buffer.getvalue())


def plot_confusion_matrix(matrix: Sequence[Sequence[int]],
                          labels: Sequence[str], uri: str,
                          title: str = "Confusion matrix") -> None:
  """Writes the matrix (rows true, columns predicted) with counts and row %.

  Args:
    matrix: counts [true, predicted].
    labels: class names in index order.
    uri: the PNG to write (local or gs://).
    title: figure title.
  """
  matrix = np.asarray(matrix, dtype=np.int64)
  totals = matrix.sum(axis=1, keepdims=True)
  # Colour by row fraction so that a small class is as readable as a big one.
  fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape),
                        where=totals > 0)
  fig, ax = plt.subplots(
      figsize=(1.6 * len(labels) + 2, 1.4 * len(labels) + 1.5))
  image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="row fraction")
  ax.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
  ax.set_yticks(range(len(labels)), labels=labels)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      ax.text(j, i, f"{matrix[i, j]}\n{fractions[i, j]:.0%}", ha="center",
              va="center", color="white" if fractions[i, j] > 0.5 else "black")
  _save(fig, uri)


def plot_training_curves(history: Dict[str, List[float]], uri: str,
                         fine_tune_start: Optional[int] = None) -> None:
  """Writes loss and accuracy per epoch, training and validation.

  Args:
    history: Keras-style history, e.g. {"loss": [...], "val_loss": [...],
      "accuracy": [...], "val_accuracy": [...]}; missing keys are skipped.
    uri: the PNG to write (local or gs://).
    fine_tune_start: index of the first fine-tuning epoch, marked by a line.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for key, style in ((metric, "-"), (f"val_{metric}", "--")):
      values = history.get(key) or []
      if values:
        ax.plot(range(1, len(values) + 1), values, style, marker=".",
                label=key)
    if fine_tune_start is not None:
      ax.axvline(fine_tune_start + 0.5, color="grey", linestyle=":",
                 label="fine-tuning starts")
    ax.set_xlabel("epoch")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  _save(fig, uri)
