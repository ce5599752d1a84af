"""`python -m training cv`: folds, per-fold figures, the report."""

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from schemas import metadata as metadata_schema
from training import calibration, cli, cv, metrics, recipe, split, testing

SIZE = 32


def test_roc_auc_by_hand():
  # Positives 0.9, 0.4; negatives 0.8, 0.4, 0.1. Pairs (pos > neg):
  # 0.9 beats all three (3), 0.4 beats 0.1 (1) and ties 0.4 (0.5): 4.5 / 6.
  scores = [0.9, 0.8, 0.4, 0.4, 0.1]
  positive = [True, False, True, False, False]
  assert metrics.roc_auc(scores, positive) == pytest.approx(4.5 / 6)
  assert metrics.roc_auc([0.1, 0.9], [False, True]) == 1.0
  assert metrics.roc_auc([0.1, 0.9], [True, False]) == 0.0
  assert metrics.roc_auc([0.5, 0.6], [True, True]) is None


def test_fold_metrics_match_a_hand_computation():
  names = list(schemas.LABELS)  # normal, benign, malignant
  labels = np.array([0, 1, 1, 2, 2, 2])
  probabilities = np.array([
      [0.8, 0.1, 0.1],   # normal, right, confident
      [0.2, 0.7, 0.1],   # benign, right
      [0.1, 0.3, 0.6],   # benign → malignant, wrong
      [0.0, 0.05, 0.95],  # malignant, right, confident
      [0.1, 0.5, 0.4],   # malignant → benign, wrong
      [0.3, 0.1, 0.6],   # malignant, right
  ])
  result = cv.fold_metrics(labels, probabilities, 0.75, names)
  # Per class: normal P=1 R=1; benign P=1/2 R=1/2; malignant P=2/3 R=2/3.
  f1 = [1.0, 0.5, 2 / 3]
  assert result["macro_f1"] == pytest.approx(np.mean(f1))
  assert result["recall_normal"] == 1.0
  assert result["recall_benign"] == 0.5
  assert result["recall_malignant"] == pytest.approx(2 / 3)
  assert result["accuracy"] == pytest.approx(4 / 6)
  # Malignant vs rest on p_malignant: positives 0.95, 0.4, 0.6; negatives
  # 0.1, 0.1, 0.6 → (3 + 2 + 2.5) / 9.
  assert result["auc_malignant"] == pytest.approx(7.5 / 9)
  # Confidence ≥ 0.75: rows 0 and 3, both right.
  assert result["flagged"] == 4
  assert result["flagged_share"] == pytest.approx(4 / 6)
  assert result["accuracy_unflagged"] == 1.0
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == labels
  assert result["ece"] == pytest.approx(
      calibration.reliability(confidence, correct)["ece"])
  # Per-image thresholds (pooled folds) give the same as the scalar.
  pooled = cv.fold_metrics(labels, probabilities, np.full(6, 0.75), names)
  assert pooled["flagged"] == 4 and pooled["threshold"] is None
  # Undefined figures are None, not 0.
  only_normal = cv.fold_metrics(np.array([0, 0]), probabilities[:2], 0.5,
                                names)
  assert only_normal["recall_malignant"] is None
  assert only_normal["auc_malignant"] is None


def test_summarise_is_mean_and_sample_sd_skipping_undefined():
  folds = [{name: 0.5 for name in cv.SCALARS} for _ in range(3)]
  folds[0]["macro_f1"], folds[1]["macro_f1"], folds[2]["macro_f1"] = (
      0.6, 0.7, 0.8)
  folds[2]["auc_malignant"] = None
  summary = cv.summarise(folds)
  assert summary["macro_f1"]["mean"] == pytest.approx(0.7)
  assert summary["macro_f1"]["sd"] == pytest.approx(0.1)
  assert summary["auc_malignant"] == {"mean": 0.5, "sd": 0.0, "n": 2}


def test_folds_keep_groups_together_and_are_stratified():
  rng = np.random.default_rng(0)
  labels = ["benign"] * 50 + ["malignant"] * 25 + ["normal"] * 15
  ids = [f"{i:04d}" for i in range(len(labels))]
  group_of = list(range(len(labels)))
  for a, b in [(0, 1), (1, 2), (10, 60), (70, 71)]:  # near-duplicate chains
    group_of[b] = group_of[a]
  fold_of = cv.assign_folds(ids, labels, group_of, 5, seed=3)
  for g in set(group_of):
    members = [i for i in range(len(ids)) if group_of[i] == g]
    assert len({fold_of[i] for i in members}) == 1
  for label, total in (("benign", 50), ("malignant", 25), ("normal", 15)):
    counts = np.bincount([fold_of[i] for i in range(len(ids))
                          if labels[i] == label], minlength=5)
    assert counts.max() - counts.min() <= 3, (label, counts)
  # Deterministic, and independent of the input order.
  order = rng.permutation(len(ids))
  again = cv.assign_folds([ids[i] for i in order], [labels[i] for i in order],
                          [group_of[i] for i in order], 5, seed=3)
  assert all(again[j] == fold_of[i] for j, i in enumerate(order))
  with pytest.raises(ValueError, match="at least 2"):
    cv.assign_folds(ids, labels, group_of, 1, 0)
  with pytest.raises(ValueError, match="distinct"):
    cv.assign_folds(ids[:3], labels[:3], [0, 0, 1], 3, 0)


@pytest.fixture(name="cv_data", scope="module")
def fixture_cv_data(tmp_path_factory):
  """12 images a class, plus near-duplicate copies of three of them."""
  root = tmp_path_factory.mktemp("cv_tfrecords")
  records = testing.synthetic_records(per_class=12, image_size=SIZE, seed=4)
  copies = []
  for record in records[::13]:
    pixels = record.pixels.copy()
    pixels[0, 0] ^= 1  # one pixel off: the same picture, other bytes
    copies.append(testing.make_record(pixels, record.label))
  testing.write_tfrecords(str(root / "part-00000-of-00001.tfrecord.gz"),
                          records + copies)
  return str(root / "*.tfrecord.gz"), records, copies


@pytest.mark.slow
def test_cv_command_reports_every_fold(tmp_path, cv_data, capsys):
  data_glob, records, copies = cv_data
  output = str(tmp_path / "cv")
  status = cli.main(["cv", "--data", data_glob, "--folds", "3",
                     "--backbone", "tiny", "--backbone_weights", "none",
                     "--epochs", "15", "--learning_rate", "3e-3",
                     "--augment_views", "1", "--val_fraction", "0.25",
                     "--target_accuracy", "0.8", "--malignant_weight", "1.5",
                     "--no_degrade", "--output", output])
  assert status == 0
  printed = capsys.readouterr().out
  assert "macro_f1" in printed and "mean ± sd" in printed
  with open(os.path.join(output, schemas.CV_REPORT_FILE)) as f:
    report = json.load(f)

  assert report["folds_count"] == 3 and len(report["folds"]) == 3
  assert report["images"] == len(records) + len(copies)
  # Every image is scored exactly once, by a model that never saw it.
  test_ids = [i for fold in report["folds"] for i in fold["test_image_ids"]]
  assert sorted(test_ids) == sorted(r.image_id for r in records + copies)
  # A near-duplicate pair never straddles two folds.
  fold_of = {i: fold["fold"] for fold in report["folds"]
             for i in fold["test_image_ids"]}
  by_hash = {}
  for record in records + copies:
    by_hash.setdefault(split.dhash(record.pixels), []).append(record.image_id)
  pairs = [ids for ids in by_hash.values() if len(ids) > 1]
  assert len(pairs) >= len(copies) - 1
  for ids in pairs:
    assert len({fold_of[i] for i in ids}) == 1
  for fold in report["folds"]:
    counts = fold["counts"]
    assert counts["test"] == len(fold["test_image_ids"])
    assert counts["train"] + counts["val"] + counts["test"] == report["images"]
    assert fold["temperature"] > 0 and 0 <= fold["threshold"] <= 1
    assert fold["val"]["count"] == counts["val"]
    for name in cv.SCALARS + ("count", "confusion_matrix",
                              "ece_uncalibrated"):
      assert name in fold["test"], name
    assert fold["epochs_run"]["head"] <= 15
  for name in cv.SCALARS:
    assert set(report["summary"][name]) == {"mean", "sd", "n"}
    assert name in report["pooled"]
  assert report["pooled"]["count"] == report["images"]
  # The pooled figure is the mean over images of the folds' ones.
  weights = [f["counts"]["test"] for f in report["folds"]]
  assert report["pooled"]["accuracy"] == pytest.approx(np.average(
      [f["test"]["accuracy"] for f in report["folds"]], weights=weights))
  # Each fold's own OOD detector on its held-out fold, pooled the same way.
  assert report["pooled"]["ood_flagged_share"] == pytest.approx(np.average(
      [f["test"]["ood_flagged_share"] for f in report["folds"]],
      weights=weights))
  assert report["settings"]["augment_views"] == 1
  assert report["settings"]["degrade"] is False
  assert report["settings"]["target_accuracy"] == 0.8
  assert report["settings"]["malignant_weight"] == 1.5
  assert report["summary"]["accuracy"]["mean"] > 0.5  # it learnt something
  # Each fold's one-class checks ran; the report's list is all of theirs.
  assert report[schemas.CV_WARNINGS] == [
      w for fold in report["folds"] for w in fold[schemas.CV_WARNINGS]]
  assert ("WARNING:" in printed) == bool(report[schemas.CV_WARNINGS])
  _check_predictions(output, report)


def _check_predictions(output, report):
  """cv_predictions.parquet holds every image once, as its fold scored it:
  the pooled figures follow from its rows (read with SQL, as users will)."""
  import duckdb  # pylint: disable=import-outside-toplevel
  path = os.path.join(output, schemas.CV_PREDICTIONS_FILE)
  table = pq.read_table(path)
  assert table.schema.equals(schemas.cv_predictions_schema(schemas.LABELS))
  rows = table.to_pylist()
  assert len(rows) == report["images"]
  folds = {f["fold"]: f for f in report["folds"]}
  for row in rows:
    fold = folds[row["fold"]]
    assert row["image_id"] in fold["test_image_ids"]
    assert row["temperature"] == fold["temperature"]
    assert row["threshold"] == fold["threshold"]
    probabilities = [row[schemas.probability_column(n)]
                     for n in schemas.LABELS]
    assert sum(probabilities) == pytest.approx(1.0)
    assert row["confidence"] == max(probabilities)
    assert row["predicted_class"] == schemas.LABELS[
        int(np.argmax(probabilities))]
    assert row["low_confidence"] == (row["confidence"] < row["threshold"])
    assert row["out_of_distribution"] is not None
  # The threshold train would choose on them, and each fold at the one
  # the other folds chose.
  flagging = report[schemas.CV_OUT_OF_FOLD_FLAGGING]
  confidence = table.column("confidence").to_numpy()
  correct = np.asarray([r["label"] == r["predicted_class"] for r in rows])
  fold_of = table.column("fold").to_numpy()
  assert flagging["count"] == len(rows)
  assert flagging["threshold"] == calibration.choose_threshold(
      confidence, correct, flagging["target_accuracy"],
      flagging["rule"]).threshold
  for fold in flagging["folds"]:
    held = fold_of == fold["fold"]
    assert fold["threshold"] == calibration.choose_threshold(
        confidence[~held], correct[~held], flagging["target_accuracy"],
        flagging["rule"]).threshold
    assert fold["count"] == held.sum()
  assert flagging["pooled"]["flagged"] == sum(f["flagged"]
                                              for f in flagging["folds"])
  pooled = report["pooled"]
  accuracy, flagged, unflagged = duckdb.sql(
      f"SELECT avg((label = predicted_class)::INT), avg(low_confidence::INT),"
      f" avg((label = predicted_class)::INT) FILTER (WHERE NOT low_confidence)"
      f" FROM read_parquet('{path}')").fetchall()[0]
  assert accuracy == pytest.approx(pooled["accuracy"])
  assert flagged == pytest.approx(pooled["flagged_share"])
  if pooled["accuracy_unflagged"] is not None:
    assert unflagged == pytest.approx(pooled["accuracy_unflagged"])


def test_out_of_fold_flagging_by_hand():
  """Fold 0's threshold is chosen on folds 1 and 2 alone, and so on."""
  confidence = np.array([0.9, 0.8, 0.6, 0.95, 0.7, 0.5, 0.85, 0.75, 0.55])
  correct = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0], bool)
  fold_of = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  block = cv.out_of_fold_flagging(confidence, correct, fold_of, 1.0,
                                  schemas.THRESHOLD_RULE_OBSERVED)
  # All rows: every prediction at 0.75 or above is right, 0.7 is wrong.
  assert block["threshold"] == 0.75 and block["target_reached"]
  # Without fold 0: 0.75 still; without fold 1: 0.75; without fold 2
  # (0.85, 0.75 gone): 0.8.
  assert [f["threshold"] for f in block["folds"]] == [0.75, 0.75, 0.8]
  assert [f["flagged"] for f in block["folds"]] == [1, 2, 2]
  assert block["pooled"]["flagged"] == 5 and block["pooled"]["count"] == 9
  assert block["pooled"]["accuracy_confident"] == 1.0
  assert block["summary"]["flagged_share"]["mean"] == pytest.approx(5 / 9)
  assert block["summary"]["flagged_share"]["n"] == 3


def test_cv_refuses_bad_flags(cv_data, capsys):
  data_glob = cv_data[0]
  base = ["cv", "--data", data_glob, "--backbone", "tiny",
          "--backbone_weights", "none"]
  assert cli.main(base + ["--folds", "1"]) == 2
  assert "--folds" in capsys.readouterr().err
  assert cli.main(base + ["--test_fraction", "0.2"]) == 2
  assert "--test_fraction" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(base + ["--bogus", "3"])


@pytest.fixture(name="masked_data", scope="module")
def fixture_masked_data(tmp_path_factory):
  """Phantom frames in BUSI's layout, preprocessed, and their masks in an
  archive of their own that lacks one benign image's mask."""
  import zipfile  # pylint: disable=import-outside-toplevel
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  from tests import archive_factory as af  # pylint: disable=import-outside-toplevel
  from training import phantoms  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("cv_masks")
  busi = str(root / "busi.zip")
  phantoms.write_phantom_archive(
      busi, {label: 6 for label in schemas.LABELS}, size=96, seed=2)
  missing = f"{phantoms.ROOT}/benign/benign (1)_mask.png"
  with zipfile.ZipFile(busi) as zf:
    masks = [af.Entry(name, zf.read(name), "mask") for name in zf.namelist()
             if "_mask" in name and name != missing]
  masks_zip = str(root / "masks.zip")
  af.write_zip(masks_zip, masks)
  out = str(root / "pre")
  pipeline.run(["preprocess", "--input", busi, "--output", out,
                "--image_size", str(SIZE)])
  return (os.path.join(out, schemas.TFRECORD_DIR,
                       "*" + schemas.TFRECORD_SUFFIX), masks_zip)


@pytest.mark.slow
def test_cv_masks_checks_each_fold_by_its_own_model(tmp_path, masked_data,
                                                    monkeypatch, capsys):
  from schemas import evaluation as evaluation_schema  # pylint: disable=import-outside-toplevel
  from training import lesion_masks, lesions  # pylint: disable=import-outside-toplevel
  from training import model as model_lib  # pylint: disable=import-outside-toplevel
  data_glob, masks_zip = masked_data
  # Each fold's block, recomputed here while the fold's model is in hand:
  # on the images the report says the fold held out.
  expected, per_image = {}, {}
  run_folds = cv.run_folds
  read = lesion_masks.read_mask_archives([masks_zip])

  def spy(config, folds, runner, data, hashes, after_fold=None):
    def hook(k, result):
      ids = set(result["test_image_ids"])
      held = np.asarray([i for i, image_id in enumerate(data.image_ids)
                         if image_id in ids])
      probabilities = calibration.softmax(
          runner.logits(held), result["temperature"])
      # A model of its own with the fold's weights: no traced function of
      # the one cv reuses can stand in for them.
      fold_model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
      fold_model.set_weights(runner.model.get_weights())
      expected[k], each = lesions.localise_each(
          fold_model, data.images[held], [data.sources[i] for i in held],
          data.labels[held], probabilities.argmax(axis=1),
          list(schemas.LABELS), read, config.batch_size)
      for row, hit, overlap in zip(each.rows, each.hits, each.ious):
        per_image[data.image_ids[held[row]]] = (hit, overlap)
      after_fold(k, result)
    return run_folds(config, folds, runner, data, hashes, after_fold=hook)

  monkeypatch.setattr(cv, "run_folds", spy)
  output = str(tmp_path / "cv")
  flags = ["--data", data_glob, "--backbone", "tiny", "--backbone_weights",
           "none", "--epochs", "8", "--augment_views", "1", "--no_degrade",
           "--val_fraction", "0.25"]
  assert cli.main(["cv", "--folds", "3", "--masks", masks_zip,
                   "--output", output] + flags) == 0
  printed = capsys.readouterr().out
  assert "Out of fold (each fold's images by its own model)" in printed
  assert "Pointing game per fold:" in printed
  with open(os.path.join(output, schemas.CV_REPORT_FILE)) as f:
    report = json.load(f)
  key = evaluation_schema.LESION_LOCALISATION
  blocks = [evaluation_schema.LesionLocalisation.from_json(fold[key])
            for fold in report["folds"]]
  assert len(expected) == 3
  for fold, block in zip(report["folds"], blocks):
    assert block == expected[fold["fold"]]
    assert 0 < block.overall.images < 12  # its own lesion images only
  pooled = evaluation_schema.LesionLocalisation.from_json(report[key])
  assert pooled == lesions.pool(blocks)
  # 12 lesion images in all; benign (1) lost its mask, so 11 are scored.
  assert (pooled.overall.images, pooled.overall.paired,
          pooled.overall.unpaired) == (12, 11, 1)
  assert pooled.per_class["benign"].unpaired == 1
  assert pooled.mask_archives == [masks_zip] and pooled.masks_read == 17
  assert report["seconds"]["lesion_localisation"] > 0
  # Each image's hit and IoU in the predictions: SQL over them gives the
  # pooled and per-fold figures; normal and unpaired images are null.
  import duckdb  # pylint: disable=import-outside-toplevel
  path = os.path.join(output, schemas.CV_PREDICTIONS_FILE)
  assert pq.read_table(path).schema.equals(
      schemas.cv_predictions_schema(schemas.LABELS, localised=True))
  rows = duckdb.sql(
      f"SELECT fold, count(lesion_pointing_hit), avg(lesion_pointing_hit::INT),"
      f" avg(lesion_iou), count(*) FILTER (WHERE label = 'normal' AND"
      f" lesion_iou IS NOT NULL) FROM read_parquet('{path}')"
      f" GROUP BY fold ORDER BY fold").fetchall()
  for (fold, paired, hit_rate, mean_iou, normal), block in zip(rows, blocks):
    assert paired == block.overall.paired and normal == 0
    assert hit_rate == pytest.approx(block.overall.pointing_hit_rate)
    assert mean_iou == pytest.approx(block.overall.mean_iou)
  assert duckdb.sql(
      f"SELECT count(*) FROM read_parquet('{path}') WHERE label = 'benign'"
      f" AND lesion_iou IS NULL").fetchall() == [(1,)]  # its mask left out
  # Each image's own, as its fold's model gave them.
  stored = {r["image_id"]: (r["lesion_pointing_hit"], r["lesion_iou"])
            for r in pq.read_table(path).to_pylist()
            if r["lesion_iou"] is not None}
  assert sorted(stored) == sorted(per_image) and len(stored) == 11
  for image_id, (hit, overlap) in per_image.items():
    assert stored[image_id][0] == hit
    assert stored[image_id][1] == pytest.approx(overlap)
  # A masked report from before the columns still serves train
  # --cv_report; columns without the block (or a stray one) do not.
  older = str(tmp_path / "older")
  os.makedirs(older)
  with open(os.path.join(older, schemas.CV_REPORT_FILE), "w") as f:
    json.dump(report, f)
  pq.write_table(pq.read_table(path).drop_columns(
      [schemas.COLUMN_LESION_POINTING_HIT, schemas.COLUMN_LESION_IOU]),
                 os.path.join(older, schemas.CV_PREDICTIONS_FILE))
  assert cv._read_report(os.path.join(older, schemas.CV_REPORT_FILE))[  # pylint: disable=protected-access
      cv.PREDICTIONS].num_rows == 18
  stray = {k: v for k, v in report.items() if k != key}
  with open(os.path.join(older, schemas.CV_REPORT_FILE), "w") as f:
    json.dump(stray, f)
  pq.write_table(pq.read_table(path),
                 os.path.join(older, schemas.CV_PREDICTIONS_FILE))
  with pytest.raises(ValueError, match="has the columns"):
    cv._read_report(os.path.join(older, schemas.CV_REPORT_FILE))  # pylint: disable=protected-access
  # The figures of the folds are the ones cv gives without --masks.
  without = str(tmp_path / "plain")
  monkeypatch.setattr(cv, "run_folds", run_folds)
  assert cli.main(["cv", "--folds", "3", "--output", without] + flags) == 0
  with open(os.path.join(without, schemas.CV_REPORT_FILE)) as f:
    plain = json.load(f)
  assert key not in plain and all(key not in f for f in plain["folds"])
  assert plain["pooled"] == report["pooled"]
  _check_predictions(without, plain)  # no lesion columns
  # train --cv_report puts the pooled block on the metadata and the card.
  model = str(tmp_path / "model")
  assert cli.main(["train", "--output", model, "--cv_report",
                   os.path.join(output, schemas.CV_REPORT_FILE)] + flags) == 0
  with open(os.path.join(model, schemas.METADATA_FILE)) as f:
    assert json.load(f)["cross_validation"][key] == report[key]
  with open(os.path.join(model, schemas.MODEL_CARD_FILE)) as f:
    card = " ".join(f.read().split())
  overall = pooled.overall
  assert (f"Where the fold models looked (`cv --masks`): Grad-CAM"
          f" ({schemas.GRADCAM_LAYER}) of each held-out benign and malignant"
          f" image's true class against its lesion masks, 11 of 12 images"
          f" paired: pointing game {overall.pointing_hit_rate:.3f}, IoU"
          f" {overall.mean_iou:.3f}; benign") in card
  # Without --masks, the card says nothing of where the folds looked.
  plain_model = str(tmp_path / "plain_model")
  assert cli.main(["train", "--output", plain_model, "--cv_report",
                   os.path.join(without, schemas.CV_REPORT_FILE)] + flags) == 0
  with open(os.path.join(plain_model, schemas.MODEL_CARD_FILE)) as f:
    assert "cv --masks" not in f.read()


def test_cv_refuses_unreadable_masks_before_training(cv_data, tmp_path,
                                                     monkeypatch, capsys):
  def no_reading(*args, **kwargs):
    raise AssertionError("the images were read before the masks")

  monkeypatch.setattr(cv.data_lib, "load_labelled", no_reading)
  assert cli.main(["cv", "--data", cv_data[0], "--backbone", "tiny",
                   "--backbone_weights", "none", "--masks",
                   str(tmp_path / "nowhere" / "*.zip")]) == 2
  err = capsys.readouterr().err
  assert "nowhere" in err


@pytest.mark.slow
def test_run_folds_leaves_the_model_as_it_found_it(cv_data):
  from training import data as data_lib, model as model_lib, recipe  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  data, _ = data_lib.load_labelled([cv_data[0]])
  config = TrainConfig(data=(cv_data[0],), output="", backbone="tiny",
                       backbone_weights="none", epochs=3, augment_views=1,
                       val_fraction=0.25, fine_tune_epochs=1)
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  before = [w.copy() for w in model.get_weights()]
  runner = recipe.Recipe(model, cv.all_views_cache(config, model, data),
                         data.labels, config, progress=0)
  report = cv.run_folds(config, 2, runner, data,
                        [split.dhash(image) for image in data.images])
  assert all(f["epochs_run"]["fine_tune"] == 1 for f in report["folds"])
  for old, new in zip(before, model.get_weights()):
    np.testing.assert_array_equal(old, new)
  # block5 is frozen again: the next fit starts as a fresh one would.
  assert model_lib.frozen_prefix_end(model) == model_lib.FEATURES_LAYER


@pytest.mark.slow
def test_train_overwrite_without_cv_drops_the_old_report(tmp_path, cv_data,
                                                        capsys):
  output = str(tmp_path / "model")
  base = ["train", "--data", cv_data[0], "--output", output, "--backbone",
          "tiny", "--backbone_weights", "none", "--epochs", "2",
          "--augment_views", "3", "--val_fraction", "0.25"]
  assert cli.main(base + ["--cv_folds", "2", "--threshold_on", "cv"]) == 0
  assert os.path.exists(os.path.join(output, schemas.CV_REPORT_FILE))
  assert os.path.exists(os.path.join(output, schemas.CV_PREDICTIONS_FILE))
  with open(os.path.join(output, schemas.METADATA_FILE)) as f:
    with_cv = json.load(f)
  assert with_cv["cross_validation"]["folds"] == 2
  # The threshold is chosen on the folds' out-of-fold predictions.
  with open(os.path.join(output, schemas.CV_REPORT_FILE)) as f:
    chosen = json.load(f)[schemas.CV_OUT_OF_FOLD_FLAGGING]
  flagging = with_cv["flagging"]
  assert flagging["chosen_on"] == schemas.THRESHOLD_ON_CV
  assert flagging["chosen_count"] == with_cv["cross_validation"]["images"]
  assert flagging["threshold"] == chosen["threshold"] == with_cv["threshold"]
  assert flagging["out_of_fold"] == chosen
  with open(os.path.join(output, schemas.MODEL_CARD_FILE)) as f:
    assert "out-of-fold predictions of the cross-validation above" \
        " (`--threshold_on cv`)" in f.read()
  assert "chosen on the " in capsys.readouterr().out
  assert cli.main(base + ["--cv_folds", "0", "--threshold_on", "cv",
                          "--overwrite"]) == 2
  assert "--threshold_on cv needs out-of-fold predictions" in \
      capsys.readouterr().err
  assert cli.main(base + ["--threshold_on", "cv", "--no_calibrate"]) == 2
  assert "--no_calibrate leaves" in capsys.readouterr().err
  assert cli.main(base + ["--threshold_on", "cv", "--threshold", "0.9"]) == 2
  assert "this one is fixed" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(base + ["--threshold_on", "auto"])
  capsys.readouterr()
  assert cli.main(base + ["--cv_folds", "0", "--overwrite"]) == 0
  assert "nothing held out" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(output, schemas.CV_REPORT_FILE))
  assert not os.path.exists(os.path.join(output, schemas.CV_PREDICTIONS_FILE))
  with open(os.path.join(output, schemas.METADATA_FILE)) as f:
    without_cv = json.load(f)
  assert without_cv["cross_validation"] is None
  # The final model is the same with or without the folds before it: each
  # fit draws from its own seed (dropout included), and each image's views
  # from its own position (cv computes them for every image, train without
  # it for the training images only). Only the threshold differs: with
  # folds it was chosen on their predictions, without on validation.
  assert without_cv["temperature"] == with_cv["temperature"]
  assert without_cv["flagging"]["chosen_on"] == \
      schemas.THRESHOLD_ON_VALIDATION
  assert (without_cv["training"]["history"]
          == with_cv["training"]["history"])
  # Views 2 and 3 were drawn; 3 had the scanner degradations, both could
  # carry synthetic annotations (the defaults).
  assert without_cv["training"]["degraded_views"] == [3]
  assert without_cv["training"]["annotated_views"] == [2, 3]
  card = open(os.path.join(output, schemas.MODEL_CARD_FILE)).read()
  assert ("| scanner degradations (blur, resolution, speckle, JPEG) | on"
          " views 3 |") in card
  assert without_cv["training"]["annotate_probability"] == 0.5
  assert ("| synthetic burned-in annotations (calipers, lines, text) | on"
          " views 2, 3, each image's with probability 0.5 |") in card
  assert cli.main(base + ["--no_augment", "--overwrite"]) == 2
  assert "--no_augment contradicts" in capsys.readouterr().err


def _report_for(config, data):
  """A minimal report of `config`'s recipe on `data`, as cv writes one."""
  return {"settings": cv.recipe_settings(config),
          "data_fingerprint": split.fingerprint(data.image_ids),
          "class_counts": {name: int((data.labels == i).sum())
                           for i, name in enumerate(schemas.LABELS)},
          "image_size": SIZE, "images": len(data.image_ids), "groups": 30,
          "folds_count": 2, "folds": [],
          "pooled": {"confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]},
          "summary": {}}


def test_cv_report_must_match_the_recipe_and_the_images(tmp_path, cv_data):
  from training import data as data_lib, recipe  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  data, _ = data_lib.load_labelled([cv_data[0]])
  path = str(tmp_path / "cv.json")
  config = recipe.resolved(TrainConfig(
      data=(cv_data[0],), output="m", backbone="tiny",
      backbone_weights="none", cv_report=path))
  report = _report_for(config, data)
  # The same images under other globs are the same data.
  report["settings"]["data"] = ["elsewhere/*.tfrecord.gz"]

  def check(written, config=config):
    with open(path, "w", encoding="utf-8") as f:
      f.write(written if isinstance(written, str) else json.dumps(written))
    return cv.matching_report(path, config, data)

  assert check(report) == report
  heavier = recipe.resolved(TrainConfig(
      data=(cv_data[0],), output="m", backbone="tiny",
      backbone_weights="none", cv_report=path, malignant_weight=3.0,
      augment_views=2))
  with pytest.raises(ValueError) as raised:
    check(report, heavier)
  # Every difference is named, with both values.
  assert "augment_views: 7 in the report, 2 here" in str(raised.value)
  assert "malignant_weight: 2.0 in the report, 3.0 here" in str(raised.value)
  with pytest.raises(ValueError, match=r"data: 39 images \(fingerprint"):
    check({**report, "data_fingerprint": "0" * 64})
  with pytest.raises(ValueError, match="class counts: "):
    check({**report, "class_counts": {"normal": 1}})
  with pytest.raises(ValueError, match=f"image size: 64 in the report, {SIZE}"
                     " here"):
    check({**report, "image_size": 64})
  # What does not change the recipe's figures is not compared: train's test
  # share (the folds hold none out), and a fine-tune's layer and rate
  # without a fine-tune; no layer and block5's first are the same.
  block5 = dataclasses.replace(config, fine_tune_epochs=2,
                               fine_tune_from="block5_conv3")
  for in_report, here in (
      ({"test_fraction": 0.0}, dataclasses.replace(config, test_fraction=0.2)),
      ({"fine_tune_learning_rate": 0.5}, config),  # no fine-tune here
      ({"fine_tune_schedule": "cosine"}, config),
      ({"fine_tune_epochs": 2, "fine_tune_from": None}, block5),
      ({"fine_tune_epochs": 2, "fine_tune_from": "block5_conv3"}, block5)):
    changed = {**report, "settings": {**report["settings"], **in_report}}
    assert check(changed, here) == changed
  with pytest.raises(ValueError, match="fine_tune_from: 'block1_conv1' in"
                     " the report, 'block5_conv3' here"):
    check({**report, "settings": {**report["settings"], "fine_tune_epochs": 2,
                                  "fine_tune_from": "block1_conv1"}},
          dataclasses.replace(config, fine_tune_epochs=2))
  # A report that lacks what the artifact keeps is refused before training.
  with pytest.raises(ValueError, match="is not a complete `python -m"
                     " training cv` report"):
    check({**report, "folds": [{"fold": 0}]})
  with pytest.raises(ValueError, match="is not a complete `python -m"
                     " training cv` report"):
    check({**report, "lesion_localisation": {"overall": {"images": 3}}})
  for malformed in ("one sentence", [1]):
    with pytest.raises(ValueError, match="is not a complete `python -m"
                       " training cv` report.*warnings"):
      check({**report, schemas.CV_WARNINGS: malformed})
  # A report written before the warnings (or with none) is taken.
  for warnings in (None, [], ["Fold 0: ..."]):
    assert check({**report, schemas.CV_WARNINGS: warnings})
  # A report from before a setting existed does not match it either.
  older = {**report, "settings": dict(report["settings"])}
  del older["settings"]["annotate"]
  with pytest.raises(ValueError, match=r"annotate: '\(not set\)' in the"
                     " report, True here"):
    check(older)
  # Except --depth: reports from before it trained without it.
  older = {**report, "settings": dict(report["settings"])}
  del older["settings"]["depth"]
  assert check(older, dataclasses.replace(config, depth=False)) == older
  with pytest.raises(ValueError, match=r"depth: False in the report, True"
                     " here"):
    check(older)
  # And the fine-tune's schedule: before it, the rate was held.
  tuned = dataclasses.replace(config, fine_tune_epochs=2)
  older = {**report, "settings": {**report["settings"], "fine_tune_epochs": 2}}
  del older["settings"]["fine_tune_schedule"]
  assert check(older, tuned) == older
  with pytest.raises(ValueError, match="fine_tune_schedule: 'constant' in the"
                     " report, 'cosine' here"):
    check(older, dataclasses.replace(tuned, fine_tune_schedule="cosine"))
  # And weight averaging: before it, none.
  older = {**report, "settings": dict(report["settings"])}
  del older["settings"]["ema_momentum"]
  assert check(older) == older
  with pytest.raises(ValueError, match="ema_momentum: 0.0 in the report, 0.99"
                     " here"):
    check(older, dataclasses.replace(config, ema_momentum=0.99))
  # The fine-tune's own averaging: before it, the head stage's, and without
  # a fine-tune it means nothing.
  averaged = dataclasses.replace(tuned, ema_momentum=0.99,
                                 fine_tune_ema_momentum=0.99)
  older = {**report, "settings": {**report["settings"], "fine_tune_epochs": 2,
                                  "ema_momentum": 0.99}}
  del older["settings"]["fine_tune_ema_momentum"]
  assert check(older, averaged) == older
  with pytest.raises(ValueError, match="fine_tune_ema_momentum: 0.99 in the"
                     " report, 0.0 here"):
    check(older, dataclasses.replace(averaged, fine_tune_ema_momentum=0.0))
  unused = {**report, "settings": {**report["settings"],
                                   "fine_tune_ema_momentum": 0.5}}
  assert check(unused) == unused  # no fine-tune in either
  with pytest.raises(ValueError, match="is not a `python -m training cv`"
                     " report \\(no settings, data_fingerprint"):
    check({"macro_f1": 0.9})
  with pytest.raises(ValueError, match="is not a `python -m training cv`"):
    check("[1, 2]")
  with pytest.raises(ValueError, match="cannot read it"):
    check("{not json")
  with pytest.raises(ValueError, match="cannot read it"):
    cv.matching_report(str(tmp_path / "missing.json"), config, data)


def test_cv_report_and_cv_folds_together_are_refused(cv_data, capsys):
  assert cli.main(["train", "--data", cv_data[0], "--output", "m",
                   "--backbone", "tiny", "--backbone_weights", "none",
                   "--cv_report", "cv.json", "--cv_folds", "2"]) == 2
  assert "leave out --cv_folds 2" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["train", "--data", cv_data[0], "--output", "m",
              "--cv_folds", "two"])
  assert "'two': a number of folds, or auto" in capsys.readouterr().err


@pytest.mark.slow
def test_train_takes_the_figures_of_a_matching_cv_report(tmp_path, cv_data,
                                                         capsys):
  recipe_flags = ["--data", cv_data[0], "--backbone", "tiny",
                  "--backbone_weights", "none", "--epochs", "2",
                  "--augment_views", "1", "--val_fraction", "0.25"]
  measured = str(tmp_path / "cv")
  assert cli.main(["cv", "--folds", "2", "--output", measured]
                  + recipe_flags) == 0
  with open(os.path.join(measured, schemas.CV_REPORT_FILE)) as f:
    report = json.load(f)
  output = str(tmp_path / "model")
  capsys.readouterr()
  assert cli.main(["train", "--output", output, "--cv_report",
                   os.path.join(measured, schemas.CV_REPORT_FILE)]
                  + recipe_flags) == 0
  printed = capsys.readouterr().out
  assert "nothing held out" not in printed
  assert "Cross-validated figures of " in printed
  with open(os.path.join(output, schemas.METADATA_FILE)) as f:
    metadata = json.load(f)
  block = metadata["cross_validation"]
  assert block == {**json.loads(json.dumps(cv.card_summary(report))),
                   "source": schemas.CV_SOURCE_REPORT}
  # train ran no folds of its own.
  assert metadata["training"]["cv_folds"] == 0
  assert "cross_validation" not in metadata["training"]["seconds"]
  with open(os.path.join(output, schemas.CV_REPORT_FILE)) as f:
    assert json.load(f) == report
  # By default the threshold is chosen on validation; --threshold_on cv
  # takes the one the report's out-of-fold predictions give.
  assert metadata["flagging"]["chosen_on"] == schemas.THRESHOLD_ON_VALIDATION
  on_cv = str(tmp_path / "on_cv")
  assert cli.main(["train", "--output", on_cv, "--cv_report",
                   os.path.join(measured, schemas.CV_REPORT_FILE),
                   "--threshold_on", "cv"] + recipe_flags) == 0
  with open(os.path.join(on_cv, schemas.METADATA_FILE)) as f:
    flagging = json.load(f)["flagging"]
  assert flagging["chosen_on"] == schemas.THRESHOLD_ON_CV
  assert flagging["out_of_fold"] == report[schemas.CV_OUT_OF_FOLD_FLAGGING]
  # Its out-of-fold predictions travel with it into the artifact.
  predictions = pq.read_table(os.path.join(measured,
                                           schemas.CV_PREDICTIONS_FILE))
  assert pq.read_table(os.path.join(
      output, schemas.CV_PREDICTIONS_FILE)).equals(predictions)
  with open(os.path.join(output, schemas.MODEL_CARD_FILE)) as f:
    card = f.read()
  assert "passed to `train` with `--cv_report`" in card
  # Predictions that are not the report's are refused, not carried along.
  for stale, message in ((predictions.slice(1),
                          "does not hold the report's images"),
                         (predictions.drop_columns(["temperature"]),
                          "has the columns"),
                         # Same folds, another recipe's fits.
                         (predictions.set_column(
                             predictions.schema.get_field_index(
                                 schemas.COLUMN_TEMPERATURE),
                             predictions.schema.field(
                                 schemas.COLUMN_TEMPERATURE),
                             pa.array(predictions.column(
                                 schemas.COLUMN_TEMPERATURE).to_numpy() * 2)),
                          "at that fold's temperature")):
    pq.write_table(stale, os.path.join(measured, schemas.CV_PREDICTIONS_FILE))
    assert cli.main(["train", "--output", str(tmp_path / "stale"),
                     "--cv_report", os.path.join(measured,
                                                 schemas.CV_REPORT_FILE)]
                    + recipe_flags) == 2
    assert message in capsys.readouterr().err
  # Without predictions (a report from before them), --threshold_on cv
  # is refused before any fit; the default still trains.
  os.remove(os.path.join(measured, schemas.CV_PREDICTIONS_FILE))
  assert cli.main(["train", "--output", str(tmp_path / "old"),
                   "--cv_report", os.path.join(measured,
                                               schemas.CV_REPORT_FILE),
                   "--threshold_on", "cv"] + recipe_flags) == 2
  assert "this run has none" in capsys.readouterr().err
  assert not os.path.exists(str(tmp_path / "old"))
  assert cli.main(["train", "--output", str(tmp_path / "old"),
                   "--cv_report", os.path.join(measured,
                                               schemas.CV_REPORT_FILE)]
                  + recipe_flags) == 0
  with open(os.path.join(str(tmp_path / "old"), schemas.METADATA_FILE)) as f:
    assert json.load(f)["flagging"]["chosen_on"] == \
        schemas.THRESHOLD_ON_VALIDATION
  pq.write_table(predictions,
                 os.path.join(measured, schemas.CV_PREDICTIONS_FILE))
  assert "| cross-validation folds run first | 0 (the figures above: an" \
         " earlier `cv` run of 2 folds, `--cv_report`) |" in card
  # Another recipe's report is refused before anything is trained.
  assert cli.main(["train", "--output", str(tmp_path / "other"),
                   "--cv_report", os.path.join(measured,
                                               schemas.CV_REPORT_FILE),
                   "--malignant_weight", "3"] + recipe_flags) == 2
  assert ("malignant_weight: 2.0 in the report, 3.0 here"
          in capsys.readouterr().err)
  assert not os.path.exists(str(tmp_path / "other"))


@pytest.mark.slow
def test_the_test_split_never_helps_choose_the_threshold(tmp_path, cv_data):
  """train's folds score every image, the test split's too; those rows are
  left out when the threshold is chosen on the out-of-fold predictions."""
  output = str(tmp_path / "model")
  assert cli.main(["train", "--data", cv_data[0], "--output", output,
                   "--backbone", "tiny", "--backbone_weights", "none",
                   "--epochs", "2", "--augment_views", "1",
                   "--val_fraction", "0.25", "--test_fraction", "0.25",
                   "--cv_folds", "2", "--threshold_rule", "observed",
                   "--threshold_on", "cv"]) == 0
  with open(os.path.join(output, schemas.METADATA_FILE)) as f:
    metadata = json.load(f)
  with open(os.path.join(output, schemas.SPLIT_FILE)) as f:
    test_ids = set(json.load(f)["test"])
  assert test_ids
  table = pq.read_table(os.path.join(output, schemas.CV_PREDICTIONS_FILE))
  assert table.num_rows == metadata["cross_validation"]["images"]
  flagging = metadata["flagging"]
  assert flagging["chosen_on"] == schemas.THRESHOLD_ON_CV
  assert flagging["chosen_count"] == table.num_rows - len(test_ids)
  kept = [r for r in table.to_pylist() if r["image_id"] not in test_ids]
  assert flagging["threshold"] == calibration.choose_threshold(
      [r["confidence"] for r in kept],
      [r["label"] == r["predicted_class"] for r in kept],
      flagging["target_accuracy"], schemas.THRESHOLD_RULE_OBSERVED).threshold


def test_fold_warnings_say_what_a_one_class_fold_model_spoilt(tmp_path):
  """What each sentence says follows from what the fold set on its
  validation images; the report's list reaches the table, the artifact's
  cross_validation block (a field of that name) and `--cv_report`'s
  checks."""
  mixed, constant = np.int64([0, 1, 2, 2]), np.tile(
      np.float32([0, 0, 1]), (4, 1))
  varied = np.float32(np.eye(3)[[0, 1, 2, 2]])
  assert cv.fold_warnings(0, mixed, varied, mixed, varied, True, True) == []
  # One class predicted, but only one class there: nothing to tell apart.
  assert cv.fold_warnings(0, np.int64([2, 2]), constant[:2], mixed, varied,
                          True, True) == []
  advice = (" Give the recipe more --epochs or --patience, or pretrained"
            " --backbone_weights.")
  val, = cv.fold_warnings(3, mixed, constant, mixed, varied, True, True)
  assert val == ("Fold 3: the model predicts malignant for all 4 validation"
                 " images, which hold 3 classes: it has not learned to tell"
                 " them apart. Its temperature and review threshold were"
                 " therefore set on a constant answer." + advice)
  both = val
  val, = cv.fold_warnings(3, mixed, constant, mixed, varied, False, True)
  assert "Its review threshold was therefore set on a constant answer." in val
  val, = cv.fold_warnings(3, mixed, constant, mixed, varied, True, False)
  assert "Its temperature was therefore set on a constant answer." in val
  val, = cv.fold_warnings(3, mixed, constant, mixed, varied, False, False)
  assert "Its validation figures therefore describe a constant answer." in val
  # Benign never predicted, though 5 of the held-out images are benign.
  truth = np.int64([0, 2] + [1] * 5)
  never, = cv.fold_warnings(4, mixed, varied, truth,
                            np.float32(np.eye(3)[[0, 2, 0, 2, 0, 2, 0]]),
                            True, True)
  assert never == ("Fold 4: the model never predicts benign for the 7"
                   " held-out images, though 5 of them are benign: it has"
                   " not learned to recognise that class."
                   + advice.replace(".", ", or add images of that class."))
  held_out, = cv.fold_warnings(1, mixed, varied, mixed, constant, True, True)
  assert held_out == (
      "Fold 1: the model predicts malignant for all 4 held-out images, which"
      " hold 3 classes: it has not learned to tell them apart. Its held-out"
      " figures therefore measure a constant answer, as do the pooled"
      " figures over its images, and a threshold chosen on the out-of-fold"
      " predictions (`train --threshold_on cv`) is partly set on them."
      + advice)
  assert cv.fold_warnings(2, mixed, constant, mixed, constant, True,
                          True) == [
      both.replace("Fold 3", "Fold 2"), held_out.replace("Fold 1", "Fold 2")]

  # A report: the table prints them, the card's block keeps them.
  report = {"folds": [], "pooled": {"count": 4, "confusion_matrix": []},
            "folds_count": 0,
            "summary": {name: {"mean": None, "sd": None, "n": 0}
                        for name in cv.SCALARS},
            "images": 0, "groups": 0, "data_fingerprint": "f",
            schemas.CV_WARNINGS: [val, held_out]}
  table = cv.format_table(report)
  assert table.endswith(f"\nWARNING: {val}\nWARNING: {held_out}")
  block = metadata_schema.CrossValidationSummary.from_json(
      cv.card_summary(report))
  assert block.warnings == (val, held_out)
  for absent in ({}, {schemas.CV_WARNINGS: None}):
    older = dict(report, **absent)
    if not absent:
      del older[schemas.CV_WARNINGS]
    assert "WARNING" not in cv.format_table(older)
    assert metadata_schema.CrossValidationSummary.from_json(
        cv.card_summary(older)).warnings is None


def test_a_fold_whose_training_images_lack_a_class_says_so():
  assert cv.untrained_warnings(0, np.int64([0, 1, 2])) == []
  assert cv.untrained_warnings(2, np.int64([1, 1, 2])) == [
      "Fold 2: the 3 training images hold no normal image: the model never"
      " learned normal, and its p_normal means nothing; use fewer --folds,"
      " or add images of that class."]
  # A class the whole data lacks: said once, not per fold, and fewer folds
  # would not help.
  assert cv.untrained_warnings(2, np.int64([1, 1, 2]), [1, 2]) == []
  assert cv.untrained_warnings(None, np.int64([1, 2, 2, 1])) == [
      "The 4 cross-validated images hold no normal image: the model never"
      " learned normal, and its p_normal means nothing; add images of that"
      " class."]


def test_cv_of_data_without_a_class_says_so_once(tmp_path):
  # Benign and malignant only.
  records = testing.synthetic_records(12, SIZE, 5, schemas.LABELS[1:])
  data = testing.write_tfrecords(
      str(tmp_path / "data" / "part-00000-of-00001.tfrecord.gz"), records)
  assert cli.main(["cv", "--data", data, "--folds", "2", "--backbone",
                   "tiny", "--backbone_weights", "none", "--epochs", "1",
                   "--no_augment", "--output", str(tmp_path / "cv")]) == 0
  with open(tmp_path / "cv" / schemas.CV_REPORT_FILE) as f:
    warnings = json.load(f)[schemas.CV_WARNINGS]
  assert warnings[0] == (
      f"The {len(records)} cross-validated images hold no normal image: the"
      " model never learned normal, and its p_normal means nothing; add"
      " images of that class.")
  assert not any("hold no" in w for w in warnings[1:]), warnings


@pytest.mark.slow
def test_cv_warns_of_a_fold_that_predicts_one_class(tmp_path, cv_data,
                                                    monkeypatch, caplog,
                                                    capsys):
  """The wiring: each fold's validation and held-out predictions are
  checked (faked to one class here: a head that stalls so is not
  deterministic across CPUs)."""
  def one_class(self, indices):  # pylint: disable=unused-argument
    return np.tile(np.float32([0, 0, 1]), (len(indices), 1))
  monkeypatch.setattr(recipe.Recipe, "logits", one_class)
  data_glob, _, _ = cv_data
  assert cli.main(["cv", "--data", data_glob, "--folds", "2", "--backbone",
                   "tiny", "--backbone_weights", "none", "--epochs", "2",
                   "--augment_views", "1", "--no_degrade",
                   "--output", str(tmp_path / "cv")]) == 0
  printed = capsys.readouterr().out
  with open(tmp_path / "cv" / schemas.CV_REPORT_FILE) as f:
    report = json.load(f)
  for fold in (0, 1):
    warnings = report["folds"][fold][schemas.CV_WARNINGS]
    assert len(warnings) == 2
    # The faked logits make no temperature worth fitting (it is kept at
    # 1.0); the threshold is chosen for the default --target_accuracy.
    assert not report["folds"][fold]["calibration_fitted"]
    for part, warning, consequence in zip(
        ("validation", "held-out"), warnings,
        ("Its review threshold was therefore set on a constant answer.",
         "Its held-out figures therefore measure a constant answer")):
      assert warning.startswith(
          f"Fold {fold}: the model predicts malignant for all"), warning
      assert f" {part} images, which hold 3 classes" in warning
      assert consequence in warning
      assert warning in caplog.text
      assert f"WARNING: {warning}" in printed
  assert report[schemas.CV_WARNINGS] == (report["folds"][0][schemas.CV_WARNINGS]
                                         + report["folds"][1][
                                             schemas.CV_WARNINGS])
  # The card's block keeps them; a report written before them has none.
  assert cv.card_summary(report)[schemas.CV_WARNINGS] == report[
      schemas.CV_WARNINGS]
  older = {k: v for k, v in report.items() if k != schemas.CV_WARNINGS}
  assert schemas.CV_WARNINGS not in cv.card_summary(older)
  assert "WARNING" not in cv.format_table(older)
