"""MODEL_CARD.md is rendered from the metadata: the numbers must be in it."""

from schemas.metadata import ArtifactMetadata
from training import model_card


def _render(metadata):
  return model_card.render(ArtifactMetadata.from_json(metadata))


def sparse_metadata(**fields):
  """Metadata with the required fields only, most of them empty."""
  return ArtifactMetadata.from_json({
      "model_version": "x", "created_at": "", "image_size": 1,
      "threshold": 0.9, "temperature": 1.0, "labels": [], "backbone": "",
      "weights_source": "", "data_fingerprint": {}, "class_counts": {},
      "test_metrics": {}, "format_version": "1", "package_version": "",
      **fields})


def _metadata(**changes):
  metadata = {
      "model_version": "busi-vgg16-20250101T000000Z-abcdef12",
      "created_at": "2025-01-01T00:00:00+00:00",
      "image_size": 224, "threshold": 0.8765, "temperature": 1.7321,
      "threshold_source": "target_accuracy", "target_accuracy": 0.95,
      "labels": ["normal", "benign", "malignant"], "backbone": "vgg16",
      "weights_source": "vgg16_notop.h5@sha256:" + "ab" * 32,
      "data_fingerprint": {"train": "t" * 64, "val": "v" * 64,
                           "test": "e" * 64, "overall": "o" * 64},
      "class_counts": {"train": {"normal": 90, "benign": 300,
                                 "malignant": 150},
                       "val": {"normal": 20, "benign": 65, "malignant": 30},
                       "test": {"normal": 20, "benign": 65,
                                "malignant": 30}},
      "test_metrics": {
          "count": 115, "accuracy": 0.8348,
          "per_class": {
              "normal": {"precision": 0.9, "recall": 0.85, "f1": 0.8743,
                         "support": 20},
              "benign": {"precision": 0.84, "recall": 0.88, "f1": 0.8595,
                         "support": 65},
              "malignant": {"precision": 0.77, "recall": 0.7333,
                            "f1": 0.7512, "support": 30}},
          "macro": {"precision": 0.8367, "recall": 0.8211, "f1": 0.8283},
          "labels": ["normal", "benign", "malignant"],
          "confusion_matrix": [[17, 2, 1], [2, 57, 6], [1, 7, 22]]},
      "calibration": {"temperature": 1.7321, "fitted": True,
                      "fit_split": "val", "fit_count": 115,
                      "nll_before": 0.61, "nll_after": 0.42,
                      "at_bound": False, "split": "test", "bins": 15,
                      "count": 115, "ece_before": 0.1234,
                      "ece_after": 0.0456},
      "flagging": {
          "threshold": 0.8765, "source": "target_accuracy",
          "target_accuracy": 0.95, "target_reached": True,
          "val": {"threshold": 0.8765, "count": 115, "flagged": 40,
                  "flagged_share": 40 / 115, "accuracy_confident": 0.96,
                  "accuracy_flagged": 0.6, "accuracy": 0.83},
          "test": {"threshold": 0.8765, "count": 115, "flagged": 38,
                   "flagged_share": 38 / 115, "accuracy_confident": 0.9351,
                   "accuracy_flagged": 0.6316, "accuracy": 0.8348},
          "fixed": {"threshold": 0.9, "val": None,
                    "test": {"threshold": 0.9, "count": 115, "flagged": 45,
                             "flagged_share": 45 / 115,
                             "accuracy_confident": 0.9429,
                             "accuracy_flagged": 0.6667,
                             "accuracy": 0.8348}}},
      "format_version": "1", "package_version": "9.9.9",
      "training": {"epochs": 30, "seed": 0, "duplicates_skipped": 3,
                   "conflicting_labels_skipped": 2,
                   "near_duplicates_grouped": 14},
  }
  metadata.update(changes)
  return metadata


def test_card_holds_the_key_numbers():
  card = _render(_metadata())
  for text in (
      "# Model card: busi-vgg16-20250101T000000Z-abcdef12",
      "2025-01-01T00:00:00+00:00", "9.9.9", "| artifact format_version | 1 |",
      "sha256 `" + "ab" * 32 + "`", "o" * 64,
      "| train | 90 | 300 | 150 | 540 |",
      "| **all** | 130 | 430 | 210 | 770 |",
      "Accuracy **0.835** (95 % Wilson interval 0.756–0.892 for 115 images)",
      "| malignant | 0.770 | 0.733 | 0.751 | 30 |",
      "| benign | 2 | 57 | 6 |", "T = 1.732",
      "| ECE on test, T = 1 (before) | 0.123 |", "(after) | 0.046 |",
      "| review threshold | 0.8765 (target_accuracy) |",
      "below **0.8765**", "--target_accuracy 0.950",
      "| 0.8765 (chosen) | test | 115 | 33.0 % | 0.935 | 0.632 | 0.835 |",
      "| 0.9000 (fixed) | test | 115 | 39.1 % | 0.943 | 0.667 | 0.835 |",
      "3 repeats skipped", "(2 here)", "14 images", "not for screening",
      "Burned-in annotations", "One centre", "Class imbalance"):
    assert text.lower() in card.lower(), text
  assert "not reached" not in card and "SYNTHETIC" not in card


def test_card_says_how_the_threshold_was_chosen():
  # Older artifacts (no "rule") chose on observed accuracy.
  for rule in (None, "observed"):
    metadata = _metadata()
    if rule:
      metadata["flagging"]["rule"] = rule
    card = _render(metadata)
    assert ("the validation accuracy on the images not flagged reaches"
            " 95.0 %") in card
    assert "expects" not in card
  metadata = _metadata()
  metadata["flagging"]["rule"] = "expected"
  card = _render(metadata)
  assert ("the accuracy the calibrated model expects of the validation"
          " images not flagged (their mean confidence; `--threshold_rule"
          " expected`) reaches 95.0 %") in card


def test_card_warnings():
  metadata = _metadata(weights_source="none",
                       training={"synthetic_data": True})
  metadata["flagging"]["target_reached"] = False
  metadata["calibration"]["at_bound"] = True
  card = _render(metadata)
  assert "TRAINED ON SYNTHETIC PHANTOMS" in card
  assert "was not reached" in card
  assert "end of its search range" in card
  assert "randomly initialised" in card


def test_card_repeats_the_warnings_of_training():
  warning = "the model predicts malignant for all 27 validation images"
  card = _render(_metadata(warnings=[warning]))
  assert f"> **WARNING (from training):** {warning}" in card
  # Before the first table: a reader sees it first.
  assert card.index(warning) < card.index("| model_version |")
  for metadata in (_metadata(warnings=[]), _metadata()):
    assert "WARNING (from training)" not in _render(metadata)


def test_card_repeats_the_warnings_of_cross_validation():
  """The cv block's warnings sit above the cross-validated figures they
  are about; none with [] or a block written before them."""
  warning = ("Fold 2: the model predicts malignant for all 25 fold 2"
             " held-out images, which hold 3 classes")
  block = {"folds": 5, "images": 623, "groups": 600,
           "summary": {"macro_f1": {"mean": 0.5, "sd": 0.1, "n": 5}}}
  card = _render(_metadata(cross_validation=dict(block, warnings=[warning])))
  assert f"> **WARNING (from cross-validation):** {warning}" in card
  section = card.index("## Cross-validated figures")
  assert section < card.index(warning) < card.index("| macro F1 |")
  for cross_validation in (dict(block, warnings=[]), block):
    assert "WARNING (from cross-validation)" not in _render(
        _metadata(cross_validation=cross_validation))


def test_card_names_the_malignant_weight_of_older_artifacts():
  # Trained before --malignant_weight existed: plain balanced weights.
  older = {"epochs": 30, "class_weight": {"normal": 2.0, "benign": 0.5,
                                          "malignant": 1.2}}
  assert ("| malignant class weight (x balanced) | 1 (plain balanced"
          " weights) |") in _render(_metadata(training=older))
  newer = dict(older, malignant_weight=2.0)
  assert "| malignant class weight (x balanced) | 2.0 |" in _render(
      _metadata(training=newer))


def test_card_says_how_the_fine_tune_rate_moved():
  settings = {"learning_rate": 0.001, "fine_tune_learning_rate": 3e-05}
  # Held, or trained before the field existed: the rates alone.
  for training in (settings, dict(settings, fine_tune_schedule="constant")):
    assert "| learning rates | 0.001 / 3e-05 |" in _render(
        _metadata(training=training))
  assert ("| learning rates | 0.001 / 3e-05 (cosine decay towards 0 over the"
          " fine-tune's epochs) |") in _render(_metadata(
              training=dict(settings, fine_tune_schedule="cosine")))


def test_card_says_whether_the_weights_were_averaged():
  # Off, or trained before the field existed.
  for training in ({}, {"ema_momentum": 0.0}):
    assert "| weight averaging (EMA momentum) | off |" in _render(
        _metadata(training=training))
  # The same in both stages, or trained before the fine-tune had its own.
  for both in ({"fine_tune_ema_momentum": 0.99}, {}):
    assert ("| weight averaging (EMA momentum) | 0.99 (every stage keeps its"
            " averaged weights) |") in _render(_metadata(
                training={"ema_momentum": 0.99, **both}))
  assert ("| weight averaging (EMA momentum) | head stage 0.99, fine-tune"
          " stage off |") in _render(_metadata(training={
              "ema_momentum": 0.99, "fine_tune_ema_momentum": 0.0}))
  assert ("| weight averaging (EMA momentum) | head stage off, fine-tune"
          " stage 0.9 |") in _render(_metadata(training={
              "ema_momentum": 0.0, "fine_tune_ema_momentum": 0.9}))


def test_card_names_the_fine_tuned_layers():
  def row(**training):
    card = _render(_metadata(training=dict({"epochs": 30}, **training)))
    return card.split("| fine-tuned base layers | ")[1].split(" |")[0]
  assert row(fine_tune_epochs=0) == "none (base frozen)"
  # Fine-tuned before --fine_tune_from existed: block5, as it always was.
  assert row(fine_tune_epochs=5) == "block5"
  assert row(fine_tune_epochs=5, fine_tune_from="block1_conv1") == (
      "block1_conv1 and every base layer after it")


def test_card_names_the_degraded_views():
  def row(**training):
    card = _render(_metadata(training=dict({"epochs": 30}, **training)))
    return card.split("| scanner degradations (blur, resolution, speckle,"
                      " JPEG) | ")[1].split(" |")[0]
  assert row(degraded_views=[3, 5, 7]) == "on views 3, 5, 7"
  assert row(degraded_views=[]) == "none"
  assert row() == "none"  # trained before the option existed


def test_card_says_what_trained_in_bfloat16():
  def row(**training):
    card = _render(_metadata(training=dict({"epochs": 30}, **training)))
    return card.split("| training arithmetic | ")[1].split(" |")[0]
  assert row() == "float32"  # trained before the option existed
  assert row(precision="float32", fine_tune_epochs=5) == "float32"
  assert row(precision="bfloat16", fine_tune_epochs=5) == (
      "bfloat16 for the augmented views' frozen-base pass and the fine-tune"
      " stage (float32 weights; the original view, the head stage and this"
      " artifact in float32)")
  # bfloat16 without a fine-tune stage (--fine_tune_epochs 0).
  assert "fine-tune" not in row(precision="bfloat16", fine_tune_epochs=0)


def test_card_names_the_annotated_views():
  def row(**training):
    card = _render(_metadata(training=dict({"epochs": 30}, **training)))
    return card.split("| synthetic burned-in annotations (calipers, lines,"
                      " text) | ")[1].split(" |")[0]
  assert row(annotated_views=[2, 3, 4], annotate_probability=0.5) == (
      "on views 2, 3, 4, each image's with probability 0.5")
  # Recorded before the probability was: the default of then.
  assert row(annotated_views=[2, 3]) == "on views 2, 3, about half the images'"
  assert row(annotated_views=[]) == "none"
  assert row() == "none"  # trained before the option existed
  # The burned-in annotation caveat says what the training did about them.
  said = "This model was trained with synthetic calipers"
  assert said in _render(_metadata(training={"annotated_views": [2, 3]}))
  assert said not in _render(_metadata(training={"annotated_views": []}))


def test_card_survives_sparse_metadata():
  card = model_card.render(sparse_metadata(model_version="x", threshold=0.9))
  assert "# Model card: x" in card and "No test images" in card
  assert "Not calibrated" in card


def test_card_shows_the_cross_validated_figures():
  summary = {name: {"mean": 0.5, "sd": 0.01, "n": 5}
             for name in ("macro_f1", "recall_malignant", "recall_benign",
                          "recall_normal", "accuracy", "ece",
                          "auc_malignant", "accuracy_unflagged",
                          "accuracy_flagged", "fixed_accuracy_unflagged")}
  summary["macro_f1"] = {"mean": 0.7123, "sd": 0.0456, "n": 5}
  summary["flagged_share"] = {"mean": 0.3, "sd": 0.05, "n": 5}
  summary["fixed_flagged_share"] = {"mean": 0.8, "sd": 0.1, "n": 5}
  metadata = _metadata(cross_validation={
      "folds": 5, "images": 623, "groups": 600, "data_fingerprint": "f",
      "summary": summary,
      "pooled": {"count": 623, "macro_f1": 0.7011, "fixed_threshold": 0.9,
                 "flagged_share": 0.31},
      "per_fold": [{"fold": k, "threshold": 0.61 + k / 100}
                   for k in range(5)]})
  card = _render(metadata)
  assert "## Cross-validated figures" in card
  assert "| macro F1 | 0.712 ± 0.046 | 0.701 |" in card
  assert "| flagged at the chosen threshold | 30.0 % ± 5.0 % | 31.0 % |" in card
  assert "flagged at the fixed 0.900" in card
  assert "623 images" in card and "0.650" in card  # fold 4's threshold
  without = _render(_metadata())
  assert "Not measured for this artifact" in without
  assert "single split of BUSI optimistic" in without


def test_card_without_test_split_or_cv_claims_no_held_out_figures():
  # `train --cv_folds 0` with the default (no) test split: nothing held out.
  no_test = {"count": 0}
  calibration = {"temperature": 1.1, "fitted": True, "fit_split": "val",
                 "fit_count": 94, "count": 0}
  card = _render(_metadata(test_metrics=no_test, calibration=calibration))
  assert "No test images. This artifact has no held-out figures" in card
  assert "no cross-validation: no held-out ECE" in card
  assert "when they were measured (not for this artifact)" in card
  assert '"Cross-validated figures" above' not in card
  assert "cross-validated ECE above" not in card
  assert "`cv.json`" not in card
  # With cross-validation, the card points to it and lists cv.json.
  cross_validation = {"folds": 5, "images": 30, "groups": 30,
                      "summary": {"macro_f1": {"mean": 0.7, "sd": 0.1,
                                               "n": 5}}}
  card = _render(_metadata(test_metrics=no_test, calibration=calibration,
                           cross_validation=cross_validation))
  assert '"Cross-validated figures" above' in card
  assert "cross-validated ECE above" in card
  assert "`cv.json`" in card
  assert "no held-out figures" not in card


def test_card_names_the_deepened_views():
  def row(**training):
    card = _render(_metadata(training=dict({"epochs": 30}, **training)))
    return card.split("| deeper depth settings (smaller, from the top, on"
                      " black) | ")[1].split(" |")[0]
  assert row(deepened_views=[2, 3], depth_probability=0.3,
             depth_scale=[0.7, 0.95]) == (
      "on views 2, 3, each image's with probability 0.3, scaled by 0.7–0.95")
  assert row(deepened_views=[]) == "none"
  assert row() == "none"  # trained before the option existed
  deepened = _render(_metadata(training={"deepened_views": [2, 3]}))
  plain = _render(_metadata(training={"deepened_views": []}))
  said = "trained with some views framed as a deeper depth setting"
  assert said in deepened
  assert said not in plain
  # What a framing unlike BUSI's cost the default recipe on the development
  # set (measured with --depth only); every card asks for the local check.
  larger = "A shallower setting or a tighter crop, which shows the tissue"
  assert larger in deepened and larger not in plain
  # The sentences below may wrap anywhere: compare word by word.
  deepened_words, plain_words = (" ".join(card.split())
                                 for card in (deepened, plain))
  # Magnified views were tried against it and did not answer it.
  tried = "training on views magnified 1.1–1.4× raised zoomed-in malignant" \
      " recall by only 0.016"
  assert tried in deepened_words and tried not in plain_words
  # Where those misses went, measured with the same recipe.
  benign = "most malignant images missed under either zoom were called benign"
  assert benign in deepened_words and benign not in plain_words
  for words in (deepened_words, plain_words):
    assert "depth, probe and preset need a check on local data, malignant" \
        " recall first" in words


def test_card_says_what_marks_cost_block5():
  """Block5 alone fine-tuned lost more normal recall under synthetic marks
  than the whole base: its cards say so, no other card does."""
  said = "With block5 alone fine-tuned, as here, synthetic marks"

  def card(**training):
    return _render(_metadata(training=dict(
        {"epochs": 30, "annotated_views": [2, 3]}, **training)))
  assert said in card(fine_tune_epochs=5, fine_tune_from="block5_conv1")
  assert said in card(fine_tune_epochs=5)  # before --fine_tune_from
  assert said not in card(fine_tune_epochs=3, fine_tune_from="block1_conv1")
  # Part of block5 is not what was measured.
  assert said not in card(fine_tune_epochs=5, fine_tune_from="block5_conv3")
  assert said not in card(fine_tune_epochs=0)
  assert said not in card(fine_tune_epochs=5, annotated_views=[])
