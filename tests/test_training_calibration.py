"""Calibration and threshold choice: pure numpy, against hand computations."""

import math

import numpy as np
import pytest

from training import calibration


def _probabilities(top):
  """3-class rows whose maximum (class 0) is `top`."""
  rest = (1.0 - np.asarray(top)) / 2
  return np.stack([np.asarray(top), rest, rest], axis=1)


def test_ece_equals_hand_computation():
  # Top probabilities and whether the argmax (class 0) is right.
  probabilities = _probabilities([0.95, 0.95, 0.55, 0.35])
  labels = [0, 1, 0, 2]
  # 15 bins of width 1/15: 0.95 in (14/15, 1], 0.55 in (8/15, 9/15],
  # 0.35 in (5/15, 6/15].
  # ECE = 2/4·|1/2 − 0.95| + 1/4·|1 − 0.55| + 1/4·|0 − 0.35|
  #     = 0.225 + 0.1125 + 0.0875 = 0.425
  assert calibration.expected_calibration_error(
      probabilities, labels) == pytest.approx(0.425)
  rel = calibration.reliability([0.95, 0.95, 0.55, 0.35],
                                [True, False, True, False])
  assert rel["ece"] == pytest.approx(0.425)
  assert rel["bins"] == 15 and rel["n"] == 4 and sum(rel["count"]) == 4
  assert rel["count"][14] == 2 and rel["count"][8] == 1 and rel["count"][5] == 1
  assert rel["accuracy"][14] == 0.5 and rel["confidence"][14] == 0.95
  assert rel["accuracy"][0] is None  # empty bins
  # Bins are (lower, upper]: 1/3 sits on an edge and belongs to bin 4.
  edge = calibration.reliability([1 / 3, 1.0, 0.0], [True, True, False])
  assert edge["count"][4] == 1 and edge["count"][14] == 1
  assert edge["count"][0] == 1
  assert calibration.expected_calibration_error(np.zeros((0, 3)), []) is None


def _calibrated_logits(rng, n):
  """Logits and labels drawn from softmax(logits): calibrated by design."""
  logits = rng.normal(0.0, 1.5, size=(n, 3))
  probabilities = calibration.softmax(logits)
  labels = np.array([rng.choice(3, p=p) for p in probabilities])
  return logits, labels


def test_temperature_fixes_an_over_confident_model():
  rng = np.random.default_rng(0)
  val_logits, val_labels = _calibrated_logits(rng, 3000)
  test_logits, test_labels = _calibrated_logits(rng, 3000)
  # The same model, over-confident: logits ×5.
  fit = calibration.fit_temperature(5 * val_logits, val_labels)
  assert fit.temperature > 1
  assert fit.temperature == pytest.approx(5.0, rel=0.1)
  assert fit.nll_after < fit.nll_before and not fit.at_bound
  before = calibration.expected_calibration_error(
      calibration.softmax(5 * test_logits), test_labels)
  after = calibration.expected_calibration_error(
      calibration.softmax(5 * test_logits, fit.temperature), test_labels)
  assert after < before / 3, (before, after)
  # An under-confident one (÷4) gets T < 1; a calibrated one T ≈ 1.
  assert calibration.fit_temperature(val_logits / 4, val_labels
                                    ).temperature == pytest.approx(0.25,
                                                                   rel=0.1)
  assert calibration.fit_temperature(val_logits, val_labels
                                    ).temperature == pytest.approx(1.0,
                                                                   abs=0.1)


def test_temperature_fit_is_deterministic_and_bounded():
  rng = np.random.default_rng(1)
  logits, labels = _calibrated_logits(rng, 200)
  assert calibration.fit_temperature(logits, labels) == (
      calibration.fit_temperature(logits, labels))
  # Every prediction right: sharper is always better, so T stops at the bound.
  separated = np.eye(3)[labels] * 2.0
  fit = calibration.fit_temperature(separated, labels)
  assert fit.at_bound
  assert fit.temperature == pytest.approx(calibration.MIN_TEMPERATURE)
  with pytest.raises(ValueError, match="no examples"):
    calibration.fit_temperature(np.zeros((0, 3)), [])


def test_nll_and_softmax_by_hand():
  logits = np.array([[math.log(3.0), 0.0]])
  # softmax = (3/4, 1/4); at T = 2: (√3, 1)/(√3 + 1).
  np.testing.assert_allclose(calibration.softmax(logits), [[0.75, 0.25]])
  assert calibration.nll(logits, [1]) == pytest.approx(math.log(4.0))
  assert calibration.softmax(logits, 2.0)[0, 0] == pytest.approx(
      math.sqrt(3) / (math.sqrt(3) + 1))


# The fixed validation set of the threshold tests, by decreasing confidence.
CONFIDENCES = [0.95, 0.9, 0.9, 0.8, 0.7, 0.6, 0.5]
CORRECT = [True, True, False, True, True, False, False]
# Accuracy of the images kept (confidence ≥ t), by hand:
#   t=0.5: 4/7  t=0.6: 4/6  t=0.7: 4/5=0.8  t=0.8: 3/4  t=0.9: 2/3  t=0.95: 1


@pytest.mark.parametrize("target,expected", [
    (0.5, 0.5),    # everything kept already reaches it
    (0.75, 0.7),   # 0.8 at t=0.7: the lowest, though t=0.8 drops back to 0.75
    (0.8, 0.7),    # exactly reached counts
    (0.81, 0.95),  # 0.75 at 0.8 and 2/3 at 0.9 fall short
    (1.0, 0.95),
])
def test_choose_threshold_by_hand(target, expected):
  choice = calibration.choose_threshold(CONFIDENCES, CORRECT, target,
                                        "observed")
  assert choice.threshold == expected
  assert choice.reached
  assert choice.accuracy_confident >= target


def test_choose_threshold_falls_back_to_the_highest_when_unreachable():
  correct = [False] + CORRECT[1:]  # the most confident prediction is wrong
  # Kept accuracy: t=0.95: 0, t=0.9: 1/3, t=0.8: 2/4, t=0.7: 3/5, t=0.6: 3/6
  choice = calibration.choose_threshold(CONFIDENCES, correct, 0.9,
                                        "observed")
  assert choice.threshold == 0.95 and not choice.reached
  assert choice.accuracy_confident == 0.0
  assert calibration.choose_threshold(CONFIDENCES, correct, 0.6, "observed"
                                     ).threshold == 0.7
  # Expected accuracy cannot reach more than the top confidence.
  choice = calibration.choose_threshold(CONFIDENCES, correct, 0.96)
  assert choice.threshold == 0.95 and not choice.reached
  with pytest.raises(ValueError):
    calibration.choose_threshold([], [], 0.9)
  with pytest.raises(ValueError):
    calibration.choose_threshold(CONFIDENCES, CORRECT, 0.0)
  with pytest.raises(ValueError, match="rule 'seen'"):
    calibration.choose_threshold(CONFIDENCES, CORRECT, 0.9, "seen")


# Mean confidence of the images kept (confidence ≥ t), by hand:
#   t=0.95: 0.95  t=0.9: 2.75/3=0.9167  t=0.8: 3.55/4=0.8875
#   t=0.7: 4.25/5=0.85  t=0.6: 4.85/6=0.8083  t=0.5: 5.35/7=0.7643
@pytest.mark.parametrize("target,expected", [
    (0.7, 0.5),
    (0.8, 0.6),
    (0.85, 0.7),    # exactly reached counts
    (0.9, 0.9),     # the tie at 0.9 is kept whole
    (0.95, 0.95),
])
def test_choose_threshold_expected_by_hand(target, expected):
  # The labels do not matter to the expected rule: all wrong, same choice.
  for correct in (CORRECT, [False] * len(CORRECT)):
    choice = calibration.choose_threshold(CONFIDENCES, correct, target,
                                          "expected")
    assert choice.threshold == expected and choice.reached
    kept = [c for c in CONFIDENCES if c >= expected]
    assert choice.accuracy_confident == pytest.approx(np.mean(kept))


def test_expected_rule_holds_its_target_where_the_observed_one_overreaches():
  # Confidences that are calibrated by construction (each prediction right
  # with probability = its confidence): on many small validation sets the
  # observed rule picks the threshold where the noise flatters it, and its
  # accuracy on fresh data falls short of the target; the expected rule
  # holds it on average.
  rng = np.random.default_rng(0)
  target = 0.9

  def draw(n):
    confidence = rng.uniform(0.4, 1.0, n)
    return confidence, rng.random(n) < confidence

  fresh_confidence, fresh_correct = draw(200_000)
  achieved = {"observed": [], "expected": []}
  for _ in range(200):
    confidence, correct = draw(100)
    for rule in achieved:
      threshold = calibration.choose_threshold(confidence, correct, target,
                                               rule).threshold
      achieved[rule].append(
          fresh_correct[fresh_confidence >= threshold].mean())
  assert np.mean(achieved["expected"]) == pytest.approx(target, abs=0.01)
  assert np.mean(achieved["observed"]) < target - 0.01
  assert np.std(achieved["expected"]) < np.std(achieved["observed"])


def test_flag_stats_by_hand():
  stats = calibration.flag_stats(CONFIDENCES, CORRECT, 0.7)
  assert stats == {
      "threshold": 0.7, "count": 7, "flagged": 2, "flagged_share": 2 / 7,
      "accuracy_confident": 0.8, "accuracy_flagged": 0.0,
      "accuracy": 4 / 7}
  none_flagged = calibration.flag_stats(CONFIDENCES, CORRECT, 0.0)
  assert none_flagged["flagged"] == 0
  assert none_flagged["accuracy_flagged"] is None
