"""Calibration and the review threshold, as pure numpy functions.

Temperature scaling (Guo et al., 2017): one scalar T divides the logits
before the softmax; it is fitted by minimising the negative log-likelihood of
the validation labels, and leaves every argmax (so accuracy and the confusion
matrix) unchanged. The NLL of softmax(z / T) is convex in 1/T, hence unimodal
in log T, so a bounded golden-section search on log T finds the minimum
deterministically, with no learning rate or initialisation to choose.

Expected calibration error (ECE) uses equal-width confidence bins
(i/B, (i+1)/B], confidence = the top probability, and
ECE = Σ_b |b|/n · |accuracy(b) − mean confidence(b)|.

`choose_threshold` picks the review threshold from data: the lowest
validation confidence at which the accuracy on the images that would NOT be
flagged (confidence ≥ threshold, as scoring flags confidence < threshold)
reaches a target. Two rules estimate that accuracy
(schemas.THRESHOLD_RULES):
- "expected" (the default): the mean calibrated confidence of the images
  kept, i.e. the accuracy the temperature-scaled model expects of them. It
  is a smooth function of the threshold, so a small validation split gives
  a stable threshold, and out of fold on real BUSI it came closer to the
  accuracy it promises than the observed rule (training/README.md, "Which
  rule chooses the threshold"). It needs calibrated confidences: with no
  fitted temperature `recipe.choose_flagging` uses "observed".
- "observed": the validation images' own accuracy. The first threshold at
  which a noisy step function crosses the target is chosen where the noise
  happens to favour it, so on ~100 validation images the accuracy it
  promises is optimistic by several points out of fold.
"""

import math
from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np

import schemas

DEFAULT_BINS = 15
# T is searched in [1/100, 100]. Wide enough for an under-trained head whose
# logits are tiny (a pretrained VGG16 head after 30 epochs at 1e-4 on 210
# phantoms wanted T = 0.042); a perfectly separated validation set, whose
# NLL falls forever as T → 0, stops at the bound instead of diverging, and
# `fit_temperature` reports that.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _as_logits(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [n, classes], got shape {logits.shape}")
  return logits


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """softmax(logits / temperature) along the last axis, float64."""
  z = _as_logits(logits) / float(temperature)
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: Sequence[int],
        temperature: float = 1.0) -> float:
  """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
  z = _as_logits(logits) / float(temperature)
  labels = np.asarray(labels, dtype=np.int64).reshape(-1)
  if len(labels) != len(z):
    raise ValueError(f"{len(z)} logit rows but {len(labels)} labels")
  if not len(labels):
    return 0.0
  peak = z.max(axis=1, keepdims=True)
  log_norm = peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1))
  return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


class TemperatureFit(NamedTuple):
  temperature: float
  nll_before: float  # at T = 1
  nll_after: float
  at_bound: bool  # the minimum lies at (or beyond) a search bound


def fit_temperature(logits: np.ndarray, labels: Sequence[int],
                    bounds=(MIN_TEMPERATURE, MAX_TEMPERATURE),
                    tolerance: float = 1e-6) -> TemperatureFit:
  """The temperature minimising the NLL of `labels` under softmax(logits/T).

  Golden-section search on log T within `bounds`; deterministic.

  Args:
    logits: [n, classes], the model's pre-temperature outputs.
    labels: true class indices, length n (n ≥ 1).
    bounds: (lowest, highest) temperature considered, both > 0.
    tolerance: width in log T at which the search stops.

  Returns:
    The fitted temperature, the NLL at T=1 and at the fit, and whether the
    fit sits at a bound (e.g. every validation image right: sharpening
    forever lowers the NLL).

  Raises:
    ValueError: no examples, or bad bounds.
  """
  logits = _as_logits(logits)
  labels = np.asarray(labels, dtype=np.int64).reshape(-1)
  if not len(labels):
    raise ValueError("no examples to fit a temperature on")
  low, high = (float(b) for b in bounds)
  if not 0 < low < high:
    raise ValueError(f"bounds {bounds} must satisfy 0 < low < high")

  def loss(log_t: float) -> float:
    return nll(logits, labels, math.exp(log_t))

  a, b = math.log(low), math.log(high)
  c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
  fc, fd = loss(c), loss(d)
  while b - a > tolerance:
    if fc <= fd:
      b, d, fd = d, c, fc
      c = b - _GOLDEN * (b - a)
      fc = loss(c)
    else:
      a, c, fc = c, d, fd
      d = a + _GOLDEN * (b - a)
      fd = loss(d)
  log_t = (a + b) / 2.0
  # The ends themselves are candidates too (the search never evaluates them).
  candidates = [(loss(log_t), log_t), (loss(math.log(low)), math.log(low)),
                (loss(math.log(high)), math.log(high))]
  best, log_t = min(candidates)
  at_bound = (abs(log_t - math.log(low)) < 10 * tolerance or
              abs(log_t - math.log(high)) < 10 * tolerance)
  return TemperatureFit(math.exp(log_t), nll(logits, labels, 1.0), best,
                        at_bound)


def reliability(confidences: Sequence[float], correct: Sequence[bool],
                bins: int = DEFAULT_BINS) -> Dict:
  """Per-bin counts, accuracy and mean confidence, and the ECE.

  Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly
  0 goes to the first bin.

  Args:
    confidences: top probability of each prediction, in [0, 1].
    correct: whether each prediction was right.
    bins: number of equal-width bins.

  Returns:
    JSON-ready: "bins", "edges" (bins + 1), "count", "accuracy" and
    "confidence" per bin (None where a bin is empty), "n" and "ece" (None
    when n is 0).
  """
  confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
  correct = np.asarray(correct, dtype=bool).reshape(-1)
  if confidences.shape != correct.shape:
    raise ValueError(f"{confidences.size} confidences but {correct.size}"
                     " correctness values")
  if bins < 1:
    raise ValueError("bins must be at least 1")
  edges = np.linspace(0.0, 1.0, bins + 1)
  index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0,
                  bins - 1)
  count = np.bincount(index, minlength=bins)
  hits = np.bincount(index, weights=correct.astype(np.float64),
                     minlength=bins)
  total_conf = np.bincount(index, weights=confidences, minlength=bins)
  n = int(confidences.size)
  accuracy = [float(hits[i] / count[i]) if count[i] else None
              for i in range(bins)]
  mean_conf = [float(total_conf[i] / count[i]) if count[i] else None
               for i in range(bins)]
  ece = (float(np.abs(hits - total_conf).sum() / n) if n else None)
  return {"bins": bins, "edges": [float(e) for e in edges],
          "count": [int(c) for c in count], "accuracy": accuracy,
          "confidence": mean_conf, "n": n, "ece": ece}


def expected_calibration_error(probabilities: np.ndarray,
                               labels: Sequence[int],
                               bins: int = DEFAULT_BINS) -> Optional[float]:
  """ECE of class probabilities [n, classes] against true labels (None if
  n is 0)."""
  probabilities = np.asarray(probabilities, dtype=np.float64)
  labels = np.asarray(labels, dtype=np.int64).reshape(-1)
  if not len(labels):
    return None
  return reliability(probabilities.max(axis=1),
                     probabilities.argmax(axis=1) == labels, bins)["ece"]


def flag_stats(confidences: Sequence[float], correct: Sequence[bool],
               threshold: float) -> Dict:
  """What a threshold does to a labelled set (flagged: confidence < it).

  Returns:
    JSON-ready: "threshold", "count", "flagged", "flagged_share",
    "accuracy_confident" (on images not flagged) and "accuracy_flagged"
    (None where the group is empty), "accuracy" (all images).
  """
  confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
  correct = np.asarray(correct, dtype=bool).reshape(-1)
  confident = confidences >= threshold
  n = int(confidences.size)

  def mean(values):
    return float(values.mean()) if values.size else None

  return {
      "threshold": float(threshold),
      "count": n,
      "flagged": int((~confident).sum()),
      "flagged_share": float((~confident).sum() / n) if n else None,
      "accuracy_confident": mean(correct[confident]),
      "accuracy_flagged": mean(correct[~confident]),
      "accuracy": mean(correct),
  }


class ThresholdChoice(NamedTuple):
  threshold: float
  reached: bool  # False: no candidate reached the target (fallback used)
  # The non-flagged images' accuracy as the rule estimates it: observed, or
  # expected (their mean confidence).
  accuracy_confident: float


def rule_words(rule: Optional[str], where: str) -> str:
  """How a chosen threshold's `rule` estimated the accuracy it holds, for a
  summary line (None: artifacts from before the rule was recorded, which
  used the observed one); `where`: the images it was chosen on."""
  if rule == schemas.THRESHOLD_RULE_EXPECTED:
    return "expected by the calibrated model (mean confidence)"
  return f"observed on {where}"


def unreached_reason(rule: Optional[str], images: str) -> str:
  """Why no threshold reached the target under `rule`, for a warning;
  `images`: the images it was chosen on, as an adjective."""
  if rule == schemas.THRESHOLD_RULE_EXPECTED:
    return f"no {images} confidence is that high"
  return f"the most confident {images} predictions are wrong"


def choose_threshold(confidences: Sequence[float], correct: Sequence[bool],
                     target: float,
                     rule: str = schemas.DEFAULT_THRESHOLD_RULE
                    ) -> ThresholdChoice:
  """The lowest threshold whose non-flagged images reach `target` accuracy.

  Candidates are the distinct confidences, in increasing order; at candidate
  t the non-flagged images are those with confidence ≥ t, and their
  accuracy is estimated by `rule` (see the module docstring): the mean of
  their confidences ("expected"; `correct` is then only checked for its
  shape) or the share of them that is right ("observed"). Observed accuracy
  is not monotone in t, so this is the first candidate that reaches the
  target, not a bisection.

  If no candidate reaches it (the most confident predictions are wrong, or,
  for "expected", no confidence is that high), the
  fallback is the highest candidate, the most conservative of them: it flags
  every image but the most confident ones. `reached` is then False and the
  caller must say so.

  Args:
    confidences: top probability of each validation prediction.
    correct: whether each prediction was right.
    target: accuracy in (0, 1] required on the non-flagged images.
    rule: one of schemas.THRESHOLD_RULES.

  Raises:
    ValueError: no examples, target outside (0, 1], or an unknown rule.
  """
  if rule not in schemas.THRESHOLD_RULES:
    raise ValueError(f"threshold rule {rule!r} is not one of"
                     f" {schemas.THRESHOLD_RULES}")
  confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
  correct = np.asarray(correct, dtype=bool).reshape(-1)
  if confidences.shape != correct.shape:
    raise ValueError(f"{confidences.size} confidences but {correct.size}"
                     " correctness values")
  if not confidences.size:
    raise ValueError("no validation predictions to choose a threshold from")
  if not 0.0 < target <= 1.0:
    raise ValueError(f"target accuracy {target} is outside (0, 1]")
  order = np.argsort(-confidences, kind="stable")
  conf_desc, right_desc = confidences[order], correct[order]
  # For each distinct value v (descending): right (or expected right) /
  # total among conf ≥ v.
  expected = rule == schemas.THRESHOLD_RULE_EXPECTED
  right_cum = np.cumsum(conf_desc if expected else right_desc)
  last_of_value = np.r_[conf_desc[1:] != conf_desc[:-1], True]
  values = conf_desc[last_of_value]
  kept = np.flatnonzero(last_of_value) + 1
  accuracy = right_cum[last_of_value] / kept
  # Ascending thresholds = reversed order; small slack for 4/5 vs 0.8.
  for value, acc in zip(values[::-1], accuracy[::-1]):
    if acc >= target - 1e-12:
      return ThresholdChoice(float(value), True, float(acc))
  return ThresholdChoice(float(values[0]), False, float(accuracy[0]))
