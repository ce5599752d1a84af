"""Confusion-matrix, training-curve and reliability PNGs (matplotlib, Agg)."""

import io
from typing import Dict, List, Optional, Sequence, Tuple

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


def plot_reliability(panels: Sequence[Tuple[str, Dict]], uri: str) -> None:
  """Writes reliability diagrams side by side (e.g. before / after calibration).

  Each panel: accuracy per confidence bin as bars against the diagonal of
  perfect calibration, each bin's mean confidence as a black line with the
  gap to it hatched, and the number of images per bin below.

  Args:
    panels: (title, `calibration.reliability(...)` result) per panel.
    uri: the PNG to write (local or gs://).
  """
  fig, axes = plt.subplots(
      2, len(panels), figsize=(4.6 * len(panels), 5.6), squeeze=False,
      gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
  for column, (title, rel) in enumerate(panels):
    ax, counts_ax = axes[0, column], axes[1, column]
    edges = np.asarray(rel["edges"])
    width = edges[1] - edges[0]
    lefts = edges[:-1]
    accuracy = np.array([a if a is not None else 0.0
                         for a in rel["accuracy"]])
    confidence = np.array([c if c is not None else 0.0
                           for c in rel["confidence"]])
    filled = np.array([c > 0 for c in rel["count"]])
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.bar(lefts[filled], accuracy[filled], width=width, align="edge",
           color="#4c72b0", alpha=0.75, edgecolor="white", label="accuracy")
    # The gap is hatched, not filled, so that it reads the same whether it
    # lies above the accuracy (over-confident) or over it (under-confident).
    ax.bar(lefts[filled], (confidence - accuracy)[filled], width=width,
           bottom=accuracy[filled], align="edge", fill=False, hatch="///",
           edgecolor="#c44e52", linewidth=0.0, label="gap to confidence")
    ax.hlines(confidence[filled], lefts[filled], lefts[filled] + width,
              color="black", linewidth=1.5, label="mean confidence")
    ece = rel.get("ece")
    ax.set_title(f"{title}\nECE {ece:.3f} ({rel['bins']} bins, n={rel['n']})"
                 if ece is not None else f"{title}\n(no images)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    counts_ax.bar(lefts, rel["count"], width=width, align="edge",
                  color="grey", edgecolor="white")
    counts_ax.set_xlabel("confidence (top probability)")
    counts_ax.set_ylabel("images")
    counts_ax.grid(alpha=0.3)
  _save(fig, uri)
