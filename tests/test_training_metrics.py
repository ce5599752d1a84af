"""Metrics against a hand computation on a fixed prediction set."""

import numpy as np
import pytest

from training import metrics

LABELS = ["normal", "benign", "malignant"]
# true: 4 normal, 3 benign, 3 malignant.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
# By hand: rows true, columns predicted.
CONFUSION = [[2, 1, 1],
             [1, 2, 0],
             [0, 1, 2]]
# Column sums 3, 4, 3; row sums 4, 3, 3.
PRECISION = [2 / 3, 2 / 4, 2 / 3]
RECALL = [2 / 4, 2 / 3, 2 / 3]
F1 = [4 / 7, 4 / 7, 2 / 3]  # 2pr/(p+r): (2·2/3·1/2)/(7/6) = 4/7


def test_confusion_matrix_by_hand():
  np.testing.assert_array_equal(metrics.confusion_matrix(Y_TRUE, Y_PRED, 3),
                                CONFUSION)


def test_report_by_hand():
  report = metrics.classification_report(Y_TRUE, Y_PRED, LABELS)
  assert report["count"] == 10
  assert report["accuracy"] == pytest.approx(6 / 10)
  assert report["confusion_matrix"] == CONFUSION
  assert report["labels"] == LABELS
  for i, label in enumerate(LABELS):
    row = report["per_class"][label]
    assert row["precision"] == pytest.approx(PRECISION[i])
    assert row["recall"] == pytest.approx(RECALL[i])
    assert row["f1"] == pytest.approx(F1[i])
  assert report["per_class"]["normal"]["support"] == 4
  assert report["macro"]["precision"] == pytest.approx(11 / 18)
  assert report["macro"]["recall"] == pytest.approx(11 / 18)
  assert report["macro"]["f1"] == pytest.approx(38 / 63)


def test_zero_denominators_give_zero():
  # Class 1 is never predicted, class 2 never occurs.
  report = metrics.classification_report([0, 1], [0, 0], LABELS)
  assert report["per_class"]["normal"]["precision"] == pytest.approx(0.5)
  assert report["per_class"]["benign"] == {
      "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
  # Neither held nor predicted: nothing to score, and out of the macro
  # mean, as sklearn's default label set leaves it out.
  assert report["per_class"]["malignant"] == {
      "precision": None, "recall": None, "f1": None, "support": 0}
  assert report["macro"]["recall"] == pytest.approx(1 / 2)
  assert report["macro"]["precision"] == pytest.approx(1 / 4)
  assert report["macro"]["f1"] == pytest.approx((2 / 3) / 2)


def test_a_class_the_set_lacks_counts_in_the_macro_only_if_predicted():
  # A benign/malignant sample, all right: no mark-down for "normal".
  perfect = metrics.classification_report([1, 1, 2], [1, 1, 2], LABELS)
  assert perfect["macro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
  assert "normal             n/a     n/a     n/a        0" in (
      metrics.format_report(perfect))
  # "normal" predicted once: in the mean with F1 0, recall undefined (0).
  wrong = metrics.classification_report([1, 1, 2], [0, 1, 2], LABELS)
  assert wrong["per_class"]["normal"] == {
      "precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
  assert wrong["macro"]["recall"] == pytest.approx((0 + 1 / 2 + 1) / 3)
  assert wrong["macro"]["f1"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_empty_input():
  report = metrics.classification_report([], [], LABELS)
  assert report["count"] == 0 and report["accuracy"] == 0.0


def test_bad_input_refused():
  with pytest.raises(ValueError, match="outside"):
    metrics.confusion_matrix([0, 3], [0, 0], 3)
  with pytest.raises(ValueError, match="predictions"):
    metrics.confusion_matrix([0, 1], [0], 3)


def test_format_report_mentions_every_class():
  text = metrics.format_report(
      metrics.classification_report(Y_TRUE, Y_PRED, LABELS))
  for label in LABELS:
    assert label in text
  assert "accuracy 0.600" in text


def test_never_predicted_names_each_class_it_never_predicts():
  labels = ["a", "b", "c", "d"]
  truth = [0] * 5 + [1] * 5 + [2] * 6 + [3] * 2
  # Only a and d predicted: b (5) and c (6) never; d never needed.
  predicted = [0, 3] * 9
  assert metrics.never_predicted("held-out", predicted, truth, labels) == [
      "the model never predicts b for the 18 held-out images, though 5 of"
      " them are b: it has not learned to recognise that class.",
      "the model never predicts c for the 18 held-out images, though 6 of"
      " them are c: it has not learned to recognise that class."]
  # Fewer than NEVER_PREDICTED_MIN_SUPPORT of a class: no finding.
  assert metrics.NEVER_PREDICTED_MIN_SUPPORT == 5
  assert metrics.never_predicted("x", [0, 3] * 4, [0, 0, 1, 1, 1, 1, 3, 3],
                                 labels) == []
  # One class for everything is one_class's finding, not this one's.
  assert metrics.never_predicted("x", [0] * 10, [0] * 5 + [1] * 5,
                                 labels) == []
  assert metrics.never_predicted("x", [], [], labels) == []
  # A set of one class, all called another: one_class has nothing to say
  # (nothing to tell apart), so this says it.
  assert metrics.never_predicted("x", [1] * 10, [2] * 10, labels) == [
      "the model never predicts c for the 10 x images, though all 10 are c:"
      " it has not learned to recognise that class."]
  assert metrics.never_predicted("x", [2] * 10, [2] * 10, labels) == []


def test_prediction_findings_is_one_class_else_never_predicted():
  labels = ["a", "b", "c"]
  truth = [0] * 5 + [1] * 5
  assert metrics.prediction_findings("x", [0] * 10, truth, labels,
                                     "ONE", "NEVER") == (
                                         True, [metrics.one_class(
                                             "x", [0] * 10, truth, labels,
                                             "ONE")])
  assert metrics.prediction_findings("x", [0] * 10, truth, labels,
                                     "ONE")[1][0].endswith(": ONE.")
  found = metrics.prediction_findings("x", [0, 2] * 5, truth, labels,
                                      "ONE", "NEVER")
  assert found == (False, metrics.never_predicted("x", [0, 2] * 5, truth,
                                                  labels, "NEVER"))
  assert found[1] and found[1][0].endswith(": NEVER.")
  assert metrics.prediction_findings("x", truth, truth, labels) == (False, [])
