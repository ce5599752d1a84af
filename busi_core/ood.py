"""The out-of-distribution score: how far an image's pooled VGG16 features
lie from the training images', as a Mahalanobis distance.

Training fits the detector (`fit`) on the "features" layer of its training
images and chooses the threshold on validation images (`choose_threshold`);
scoring computes the score from the features of the same forward pass as the
probabilities (`scores`). With a few hundred training images and 512
feature dimensions the sample covariance is singular, so it is shrunk toward
a scaled identity by the Ledoit-Wolf rule (`ledoit_wolf`), which chooses the
amount from the data alone.

The detector is saved as `schemas.OOD_FILE`: plain float64 arrays in a numpy
.npz, read back with `allow_pickle=False`; metadata.json's "ood" block names
the transform and the threshold and records the file's sha256.
"""

import hashlib
import io
from typing import NamedTuple, Tuple

import numpy as np

import schemas


class OodError(ValueError):
  """The detector's file is missing, malformed or not the one described."""


class OodModel(NamedTuple):
  """A fitted detector: score = Mahalanobis distance of transform(features)
  from `mean` under `precision`; above `threshold` is out of distribution."""
  mean: np.ndarray  # float64 [D]
  precision: np.ndarray  # float64 [D, D], symmetric positive definite
  transform: str  # one of schemas.OOD_TRANSFORMS
  threshold: float

  @property
  def dims(self) -> int:
    return int(self.mean.shape[0])


def transform_features(features: np.ndarray, transform: str) -> np.ndarray:
  """The features as the distance sees them (float64 [N, D])."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {x.shape}")
  if transform == schemas.OOD_TRANSFORM_NONE:
    return x
  if transform in (schemas.OOD_TRANSFORM_SQRT, schemas.OOD_TRANSFORM_SQRT_L2):
    # Pooled ReLU outputs are >= 0; a tiny negative from float16/bfloat16
    # rounding must not become NaN.
    x = np.sqrt(np.maximum(x, 0.0))
  if transform in (schemas.OOD_TRANSFORM_L2, schemas.OOD_TRANSFORM_SQRT_L2):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
  if transform in schemas.OOD_TRANSFORMS:
    return x
  raise ValueError(f"unknown OOD transform {transform!r}; expected one of"
                   f" {', '.join(schemas.OOD_TRANSFORMS)}")


def ledoit_wolf(x: np.ndarray) -> Tuple[np.ndarray, float]:
  """Ledoit-Wolf shrunk covariance of the rows of x.

  (1 − s)·S + s·μ·I, with S the sample covariance (divided by n), μ its mean
  eigenvalue and s chosen by Ledoit and Wolf's formula (J. Multivariate
  Analysis 88, 2004), as scikit-learn's `ledoit_wolf` computes it.

  Args:
    x: float64 [N, D] observations (not yet centred), N >= 2.

  Returns:
    (covariance [D, D], shrinkage s in [0, 1]).
  """
  n, p = x.shape
  if n < 2:
    raise ValueError(f"need at least 2 feature vectors to fit, got {n}")
  x = x - x.mean(axis=0)
  x2 = x ** 2
  emp_cov = x.T @ x / n
  emp_cov_trace = x2.sum(axis=0) / n
  mu = emp_cov_trace.sum() / p
  beta_ = float(np.sum(x2.T @ x2))
  delta_ = float(np.sum(emp_cov ** 2))
  beta = (beta_ / n - delta_) / (p * n)
  delta = (delta_ - 2.0 * mu * emp_cov_trace.sum() + p * mu ** 2) / p
  beta = min(beta, delta)
  shrinkage = 0.0 if beta <= 0 or delta <= 0 else float(beta / delta)
  covariance = (1.0 - shrinkage) * emp_cov
  covariance[np.diag_indices(p)] += shrinkage * mu
  return covariance, shrinkage


def fit(features: np.ndarray, transform: str) -> Tuple[OodModel, float]:
  """Fits the detector on in-distribution features (threshold still inf).

  Args:
    features: [N, D] "features" layer outputs of the training images.
    transform: one of schemas.OOD_TRANSFORMS.

  Returns:
    (the model with threshold = inf, the Ledoit-Wolf shrinkage).

  Raises:
    ValueError: fewer than two rows, or non-finite features.
  """
  x = transform_features(features, transform)
  if not np.all(np.isfinite(x)):
    raise ValueError("features to fit the OOD detector on are not finite")
  covariance, shrinkage = ledoit_wolf(x)
  # eigh, not inv: the covariance is symmetric, and a flat direction (all
  # images equal in one feature) gets a floor instead of an overflow.
  values, vectors = np.linalg.eigh(covariance)
  floor = max(float(values.max()), 1e-12) * 1e-9
  values = np.maximum(values, floor)
  precision = (vectors / values) @ vectors.T
  precision = (precision + precision.T) / 2.0
  return OodModel(x.mean(axis=0), precision, transform, float("inf")), shrinkage


def scores(model: OodModel, features: np.ndarray) -> np.ndarray:
  """Mahalanobis distances (float64 [N]) of feature rows from the fit."""
  x = transform_features(features, model.transform)
  if x.shape[1] != model.dims:
    raise ValueError(f"features have {x.shape[1]} dimensions, the OOD"
                     f" detector {model.dims}")
  d = x - model.mean
  squared = np.einsum("ij,jk,ik->i", d, model.precision, d, optimize=True)
  return np.sqrt(np.maximum(squared, 0.0))


def choose_threshold(val_scores: np.ndarray, pass_rate: float) -> float:
  """The score that `pass_rate` of the validation images stay at or under.

  Raises:
    ValueError: no validation scores, or pass_rate outside (0, 1].
  """
  val_scores = np.asarray(val_scores, dtype=np.float64)
  if not len(val_scores):
    raise ValueError("no validation images to choose the OOD threshold on")
  if not 0.0 < pass_rate <= 1.0:
    raise ValueError(f"OOD pass rate {pass_rate} is outside (0, 1]")
  # "higher": an actual validation score, so at least pass_rate pass.
  return float(np.quantile(val_scores, pass_rate, method="higher"))


def flagged(model: OodModel, score_values: np.ndarray) -> np.ndarray:
  """Which scores are out of distribution (above the threshold)."""
  return np.asarray(score_values) > model.threshold


def to_bytes(model: OodModel) -> bytes:
  """The .npz bytes of the detector's arrays (no pickle, no threshold: that
  and the transform live in metadata.json)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{schemas.OOD_MEAN: model.mean.astype(np.float64),
                      schemas.OOD_PRECISION:
                          model.precision.astype(np.float64)})
  return buffer.getvalue()


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def from_bytes(data: bytes, *, transform: str, threshold: float,
               dims: int, sha256: str) -> OodModel:
  """Reads and checks a detector saved by `to_bytes`.

  Args:
    data: the file's bytes.
    transform, threshold, dims, sha256: what metadata.json says of it.

  Raises:
    OodError: another file than described, pickled or missing arrays, wrong
      shapes, non-finite values, an unknown transform or a bad threshold.
  """
  if sha256_bytes(data) != sha256:
    raise OodError(f"{schemas.OOD_FILE} is not the file metadata.json"
                   " describes (sha256 differs): it was replaced after"
                   " training")
  if transform not in schemas.OOD_TRANSFORMS:
    raise OodError(f"unknown OOD transform {transform!r}")
  if not np.isfinite(threshold) or threshold < 0:
    raise OodError(f"OOD threshold {threshold!r} is not a finite score")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {name: np.asarray(npz[name]) for name in schemas.OOD_ARRAYS}
  except Exception as e:  # KeyError, ValueError, OSError, BadZipFile, ...
    raise OodError(f"{schemas.OOD_FILE} is not a detector file: {e}") from e
  mean, precision = arrays[schemas.OOD_MEAN], arrays[schemas.OOD_PRECISION]
  if mean.shape != (dims,) or precision.shape != (dims, dims):
    raise OodError(f"{schemas.OOD_FILE} holds arrays of shapes {mean.shape}"
                   f" and {precision.shape}, expected ({dims},) and"
                   f" ({dims}, {dims})")
  if mean.dtype.kind != "f" or precision.dtype.kind != "f" or not (
      np.all(np.isfinite(mean)) and np.all(np.isfinite(precision))):
    raise OodError(f"{schemas.OOD_FILE} holds non-finite or non-float values")
  return OodModel(mean.astype(np.float64), precision.astype(np.float64),
                  transform, float(threshold))
