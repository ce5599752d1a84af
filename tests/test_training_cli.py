"""`python -m training train|evaluate` end to end through `cli.main(argv)`."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

import schemas
from training import calibration, cli, evaluate, recipe, split, testing
from busi_core import artifact
from training import saving
from training import config as config_lib, model as model_lib, train

SIZE = 32


@pytest.fixture(name="data_glob", scope="module")
def fixture_data_glob(tmp_path_factory):
  """Two shards of labelled images, one unlabelled example, one duplicate."""
  root = tmp_path_factory.mktemp("tfrecords")
  records = testing.synthetic_records(per_class=10, image_size=SIZE, seed=0)
  unlabelled = testing.make_record(records[0].pixels[::-1], "")
  duplicate = records[3]._replace(source="other.zip!/benign/copy.png")
  testing.write_tfrecords(str(root / "part-00000-of-00002.tfrecord.gz"),
                          records[:15] + [unlabelled])
  testing.write_tfrecords(str(root / "part-00001-of-00002.tfrecord.gz"),
                          records[15:] + [duplicate])
  return str(root / "*.tfrecord.gz")


def _load_json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


@pytest.mark.slow
def test_train_without_augmentation(tmp_path, data_glob, capsys):
  output = str(tmp_path / "model")
  status = cli.main(["train", "--data", data_glob, "--output", output,
                     "--backbone_weights", "none", "--no_augment",
                     "--epochs", "2", "--fine_tune_epochs", "1",
                     # block4_conv3 and block5 train in the fine-tune stage
                     "--fine_tune_from", "block4_conv3",
                     "--batch_size", "8", "--seed", "1", "--name", "e2e",
                     # A fixed threshold and a test split, asked for (the
                     # defaults choose one for 0.95 and keep no test split).
                     "--threshold", "0.9", "--test_fraction", "0.15",
                     # VGG16 runs at 40: the model enlarges the 32² input.
                     "--network_size", "40", "--malignant_weight", "3"])
  assert status == 0
  assert "Skipped 1 unlabelled" in capsys.readouterr().out
  for name in (schemas.MODEL_FILE, schemas.LABELS_FILE, schemas.METADATA_FILE,
               schemas.MODEL_CARD_FILE, train.CONFUSION_MATRIX_FILE,
               train.TRAINING_CURVES_FILE, train.SPLIT_FILE,
               train.RELIABILITY_DIAGRAM_FILE):
    assert os.path.getsize(os.path.join(output, name)) > 0, name

  metadata = _load_json(output, schemas.METADATA_FILE)
  for field in schemas.METADATA_REQUIRED_FIELDS:
    assert field in metadata, field
  assert metadata["image_size"] == SIZE  # from the TFRecords
  assert metadata["network_size"] == 40  # the model resizes to it
  assert metadata["backbone"] == "vgg16"
  assert metadata["weights_source"] == "none"
  assert metadata["threshold"] == schemas.DEFAULT_THRESHOLD
  assert metadata["threshold_source"] == "fixed"
  assert metadata["target_accuracy"] is None
  assert metadata["model_version"].startswith("e2e-")
  cal = metadata["calibration"]
  assert cal["fitted"] and cal["fit_split"] == "val" and cal["split"] == "test"
  assert cal["bins"] == 15
  assert metadata["temperature"] == cal["temperature"] > 0
  assert cal["fit_count"] == sum(metadata["class_counts"]["val"].values())
  assert cal["nll_after"] <= cal["nll_before"]
  assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1
  flagging = metadata["flagging"]
  assert flagging["threshold"] == metadata["threshold"]
  assert flagging["fixed"]["test"] == flagging["test"]  # same threshold
  assert flagging["test"]["count"] == metadata["test_metrics"]["count"]
  settings = metadata["training"]
  assert settings["epochs"] == 2 and settings["fine_tune_epochs"] == 1
  assert settings["fine_tune_from"] == "block4_conv3"
  assert settings["fine_tune_schedule"] == "constant"
  assert settings["ema_momentum"] == 0.0
  assert settings["fine_tune_ema_momentum"] == 0.0  # auto: as the head's
  assert settings["augment"] is False and settings["seed"] == 1
  assert settings["degraded_views"] == []  # no random views to degrade
  assert settings["annotated_views"] == []
  assert settings["annotate_probability"] is None  # none drawn
  assert settings["unlabelled_skipped"] == 1
  assert settings["duplicates_skipped"] == 1
  assert len(settings["history"]["loss"]) == 3
  # Balanced weights from the training split, the malignant one tripled.
  train_counts = metadata["class_counts"]["train"]
  total = sum(train_counts.values())
  assert settings["malignant_weight"] == 3
  assert settings["class_weight"] == {
      name: pytest.approx(total / (3 * count) * (3 if name == "malignant"
                                                  else 1), rel=1e-5)
      for name, count in train_counts.items()}
  counts = metadata["class_counts"]
  assert sum(sum(c.values()) for c in counts.values()) == 30
  assert metadata["test_metrics"]["count"] == sum(counts["test"].values())
  # The OOD detector: fitted on the training split, thresholded on
  # validation, its file beside the model and described in the metadata.
  block = metadata["ood"]
  assert block["fit_split"] == "train"
  assert block["threshold_split"] == "val+train_out_of_fold"
  assert block["train_out_of_fold"]["count"] == block["fit_images"] == sum(
      metadata["class_counts"]["train"].values())
  assert block["val"]["count"] == metadata["class_counts"]["val"][
      "benign"] + metadata["class_counts"]["val"]["malignant"] + metadata[
          "class_counts"]["val"]["normal"]
  assert os.path.exists(os.path.join(output, schemas.OOD_FILE))
  assert set(metadata["data_fingerprint"]) == {"train", "val", "test",
                                               "overall"}

  splits = _load_json(output, train.SPLIT_FILE)
  ids = [i for name in ("train", "val", "test") for i in splits[name]]
  assert len(ids) == len(set(ids)) == 30
  for name in ("train", "val", "test"):
    assert len(splits[schemas.SPLIT_DHASH_KEY][name]) == len(splits[name])

  # evaluate names training images in its data: a copy, and a near-duplicate
  # (one pixel changed: another image_id, the same dHash).
  records = {r.image_id: r for r in testing.synthetic_records(
      per_class=10, image_size=SIZE, seed=0)}
  copy = records[splits["train"][0]]
  changed = copy.pixels.copy()
  changed[0, 0] ^= 1
  near = testing.make_record(changed, copy.label)
  unseen = records[splits["test"][0]]
  eval_data = testing.write_tfrecords(
      str(tmp_path / "eval" / "part.tfrecord.gz"), [copy, near, unseen])
  assert cli.main(["evaluate", "--model", output, "--data", eval_data,
                   "--output", str(tmp_path / "eval_report")]) == 0
  out = capsys.readouterr().out
  assert "Optimistic: 1 of these images" in out
  evaluated = _load_json(str(tmp_path / "eval_report"), evaluate.REPORT_FILE)
  assert evaluated["count"] == 3
  assert evaluated["seen_in_training"] == 1
  assert evaluated["near_duplicates_of_training"] == 1
  # The figures over the one image it was not fitted on.
  rest = evaluated["not_fitted_on"]
  assert (rest["count"], rest["excluded"], rest["status_unknown"]) == (
      1, 2, False)
  assert rest["per_class"][unseen.label]["support"] == 1
  assert "Not fitted on: 1 of the 3 images" in out
  # ... and which: each image's row says.
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from schemas import evaluation as evaluation_schema  # pylint: disable=import-outside-toplevel
  rows = pq.read_table(os.path.join(
      str(tmp_path / "eval_report"), evaluation_schema.PREDICTIONS_FILE)
                      ).to_pylist()
  assert sorted((r["image_id"], r[schemas.COLUMN_SEEN_IN_TRAINING],
                 r[schemas.COLUMN_NEAR_DUPLICATE_OF_TRAINING]) for r in rows
               ) == sorted([(copy.image_id, True, False),
                            (near.image_id, False, True),
                            (unseen.image_id, False, False)])

  loaded = artifact.load_artifact(output)
  assert loaded.labels == list(schemas.LABELS)
  # The fitted temperature is in the saved model, not only in the metadata.
  assert loaded.model.get_layer("temperature").value == metadata["temperature"]
  pixels = testing.class_images(2, 4, SIZE, np.random.default_rng(9))
  probabilities = loaded.model.predict(pixels, verbose=0)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  logits = model_lib.sub_model(loaded.model, None, "logits").predict(
      pixels, verbose=0)
  np.testing.assert_allclose(
      probabilities, calibration.softmax(logits, metadata["temperature"]),
      atol=1e-5)

  card = open(os.path.join(output, schemas.MODEL_CARD_FILE)).read()
  report = metadata["test_metrics"]
  for text in (metadata["model_version"], metadata["created_at"],
               f"{cal['temperature']:.3f}", f"{cal['ece_before']:.3f}",
               f"{cal['ece_after']:.3f}", f"{metadata['threshold']:.4f}",
               f"Accuracy **{report['accuracy']:.3f}**",
               metadata["data_fingerprint"]["overall"],
               metadata["package_version"], "Decision support",
               "Burned-in annotations", "random",
               "| malignant class weight (x balanced) | 3.0 |",
               "| fine-tuned base layers | block4_conv3 and every base layer"
               " after it |"):
    assert text in card, text
  row = report["per_class"]["benign"]
  assert (f"| benign | {row['precision']:.3f} | {row['recall']:.3f} |"
          f" {row['f1']:.3f} | {row['support']} |") in card
  matrix_row = " | ".join(str(v) for v in report["confusion_matrix"][2])
  assert f"| malignant | {matrix_row} |" in card
  val_counts = metadata["class_counts"]["val"]
  assert (f"| val | {val_counts['normal']} | {val_counts['benign']} |"
          f" {val_counts['malignant']} |") in card
  assert "UNTRAINED" not in card and "SYNTHETIC" not in card


@pytest.mark.slow
def test_train_with_augmentation(tmp_path, data_glob):
  output = str(tmp_path / "model")
  status = cli.main(["train", "--data", data_glob, "--output", output,
                     "--backbone_weights", "none", "--augment", "--epochs",
                     "1", "--batch_size", "8"])
  assert status == 0
  metadata = artifact.read_artifact_info(output).metadata
  assert metadata.training.augment is True
  # The default doubles the malignant class's balanced weight.
  assert metadata.training.malignant_weight == 2.0
  counts = metadata.class_counts["train"]
  total = sum(counts.values())
  assert metadata.training.class_weight[schemas.MALIGNANT] == pytest.approx(
      2 * total / (3 * counts[schemas.MALIGNANT]), rel=1e-5)
  assert len(metadata.training.epoch_seconds["head"]) == 1
  # By default VGG16 runs at the TFRecords' size: no resize layer.
  assert metadata.network_size == SIZE
  loaded = artifact.load_artifact(output)
  assert schemas.RESIZE_LAYER not in [l.name for l in loaded.model.layers]


def _tiny_train(output, data_glob, *flags):
  return cli.main(["train", "--data", data_glob, "--output", output,
                   "--backbone", "tiny", "--backbone_weights", "none",
                   "--no_augment", "--epochs", "3", "--learning_rate", "3e-3",
                   "--val_fraction", "0.3", *flags])


def test_a_class_missing_from_training_is_an_artifact_warning(tmp_path):
  # Logged once was all: now the model card, every run's manifest and
  # summary carry it, as they carry the other training warnings.
  # Benign and malignant only.
  records = testing.synthetic_records(8, SIZE, 1, schemas.LABELS[1:])
  data = testing.write_tfrecords(
      str(tmp_path / "data" / "part-00000-of-00001.tfrecord.gz"), records)
  output = str(tmp_path / "model")
  assert _tiny_train(output, data, "--cv_folds", "0", "--epochs", "1") == 0
  metadata = artifact.read_artifact_info(output).metadata
  trained = sum(metadata.class_counts["train"].values())
  assert metadata.warnings[0] == (
      f"The {trained} training images hold no normal image: the model never"
      " learned normal, and its p_normal means nothing; train on images of"
      " every class.")
  with open(os.path.join(output, schemas.MODEL_CARD_FILE)) as f:
    assert metadata.warnings[0] in f.read()


def test_split_warnings():
  """One class predicted for a whole split, else each class it holds at
  least five of and never predicts; the artifact's advice follows."""
  from training.steps import measure  # pylint: disable=import-outside-toplevel
  def scored(predicted, truth):
    logits = np.eye(3, dtype=np.float32)[predicted]
    return measure.Scored(np.arange(len(truth)), logits, np.array(truth))
  warning, = measure.split_warnings("validation", scored([2, 2, 2],
                                                         [0, 1, 2]))
  assert warning.startswith("the model predicts malignant for all 3"
                            " validation images, which hold 3 classes")
  assert warning.endswith("Do not use this artifact: train longer (--epochs,"
                          " --patience) or from pretrained"
                          " --backbone_weights.")
  warning, = measure.split_warnings("test", scored([0, 0], [0, 1]))
  assert "which hold 2 classes" in warning
  # Benign and malignant predicted, never normal, of which there are 5.
  truth = [0] * 5 + [1] * 3 + [2] * 3
  never, = measure.split_warnings("test", scored([1, 2] * 5 + [1], truth))
  assert never == ("the model never predicts normal for the 11 test"
                   " images, though 5 of them are normal: it has not learned"
                   " to recognise that class. Do not use this artifact: train"
                   " longer (--epochs, --patience), from pretrained"
                   " --backbone_weights, or with more images of that class.")
  for predicted, truth in (([2, 1, 2], [0, 1, 2]),  # two classes predicted
                           ([1, 1], [1, 1]),  # one class to predict
                           ([], []),  # no test split
                           # normal never predicted, but only 4 of them
                           ([1, 2] * 5 + [1], [0] * 4 + [1] * 4 + [2] * 3)):
    assert measure.split_warnings("test", scored(predicted, truth)) == []


@pytest.mark.slow
def test_train_warns_of_a_one_class_model(tmp_path, data_glob, monkeypatch,
                                          caplog, capsys):
  """The wiring: train logs the warning when its validation predictions
  are one class (faked here: a real head that stalls so is not
  deterministic across CPUs)."""
  from training.steps import measure  # pylint: disable=import-outside-toplevel
  real = measure.score_val
  def one_class(runner, data, splits):
    scored = real(runner, data, splits)
    logits = np.tile(np.float32([0, 0, 1]), (len(scored.labels), 1))
    return measure.Scored(scored.indices, logits, scored.labels)
  monkeypatch.setattr(measure, "score_val", one_class)
  # A test split: train checks the saved model on it (the real logits).
  output = str(tmp_path / "m")
  assert _tiny_train(output, data_glob, "--test_fraction", "0.2") == 0
  assert "the model predicts malignant for all" in caplog.text
  assert "validation images" in caplog.text
  # Kept with the artifact: its metadata, its card, train's last lines.
  # (The test split's real predictions may be one class too.)
  warnings = artifact.read_artifact_info(output).metadata.warnings
  assert warnings[0].startswith("the model predicts malignant for all")
  assert "validation images" in warnings[0] and len(warnings) <= 2
  with open(os.path.join(output, schemas.MODEL_CARD_FILE),
            encoding="utf-8") as f:
    card = f.read()
  out = capsys.readouterr().out.rstrip()
  for warning in warnings:
    assert warning in caplog.text
    assert f"**WARNING (from training):** {warning}" in card
  assert out.endswith("\n".join(f"WARNING: {w}" for w in warnings))


def _split_images(output, name):
  """The pixels and labels of one split of the data_glob fixture."""
  ids = _load_json(output, train.SPLIT_FILE)[name]
  by_id = {r.image_id: r for r in testing.synthetic_records(10, SIZE, 0)}
  return (np.stack([by_id[i].pixels for i in ids]),
          np.array([schemas.LABELS.index(by_id[i].label) for i in ids]))


@pytest.mark.slow
def test_target_accuracy_threshold_from_validation(tmp_path, data_glob,
                                                   capsys):
  output = str(tmp_path / "m")
  assert _tiny_train(output, data_glob, "--target_accuracy", "0.8",
                     "--synthetic_data", "--test_fraction", "0.2") == 0
  out = capsys.readouterr().out
  assert "Review threshold" in out and "Test ECE" in out
  assert ("(target accuracy 0.8, expected by the calibrated model (mean"
          " confidence)") in out
  metadata = artifact.read_artifact_info(output).metadata
  assert metadata.threshold_source == "target_accuracy"
  assert metadata.target_accuracy == 0.8
  assert metadata.training.learning_rate == 3e-3
  flagging = metadata.flagging
  assert flagging.fixed.threshold == schemas.DEFAULT_THRESHOLD
  # Recompute the choice from the saved (calibrated) model on the val split.
  images, labels = _split_images(output, split.VAL)
  probabilities = artifact.load_artifact(output).model.predict(images,
                                                               verbose=0)
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == labels
  choice = calibration.choose_threshold(confidence, correct, 0.8)
  assert metadata.threshold == pytest.approx(choice.threshold, abs=1e-5)
  assert flagging.target_reached == choice.reached
  assert flagging.rule == schemas.THRESHOLD_RULE_EXPECTED
  assert flagging.val.flagged == int(
      (confidence < metadata.threshold - 1e-5).sum())
  if choice.reached:
    # The calibrated model expects 0.8 of the images it keeps.
    assert confidence[confidence >= metadata.threshold - 1e-5].mean() >= 0.8
  card = open(os.path.join(output, schemas.MODEL_CARD_FILE)).read()
  assert "SYNTHETIC PHANTOMS" in card and "--target_accuracy 0.800" in card


@pytest.mark.slow
def test_no_calibrate_keeps_temperature_one(tmp_path, data_glob):
  output = str(tmp_path / "m")
  # (With no fine-tune stage, a schedule is asked for and not recorded.)
  assert _tiny_train(output, data_glob, "--no_calibrate",
                     "--fine_tune_epochs", "0",
                     "--fine_tune_schedule", "cosine") == 0
  metadata = artifact.read_artifact_info(output).metadata
  assert metadata.training.fine_tune_schedule is None
  cal = metadata.calibration
  assert metadata.temperature == 1.0 and not cal.fitted
  assert cal.reason == "--no_calibrate"
  assert cal.ece_before == cal.ece_after
  assert artifact.load_artifact(output).model.get_layer(
      "temperature").value == 1.0


@pytest.mark.slow
def test_flag_warnings_printed_not_logged(tmp_path, data_glob, capsys,
                                          caplog):
  output = str(tmp_path / "m")
  assert _tiny_train(output, data_glob, "--cv_folds", "0", "--epochs",
                     "1") == 0
  out = capsys.readouterr().out
  assert out.startswith("WARNING: --cv_folds 0 and no test split")
  assert "nothing held out" not in caplog.text
  assert "Review threshold" in out and f"written to {output}" in out
  assert "No held-out figures measured this model" in out


@pytest.mark.slow
def test_no_cv_with_a_test_split(tmp_path, data_glob, capsys):
  """./run_local.sh's demo: no cross-validation, a test split, the OOD
  detector reporting on it (the test images' features must be cached)."""
  output = str(tmp_path / "m")
  assert _tiny_train(output, data_glob, "--cv_folds", "0", "--test_fraction",
                     "0.2", "--epochs", "1") == 0
  out = capsys.readouterr().out
  assert "Test ECE" in out and "No held-out figures" not in out
  metadata = artifact.read_artifact_info(output).metadata
  assert metadata.test_metrics.count > 0
  assert metadata.ood is not None


@pytest.mark.slow
def test_same_seed_same_split(tmp_path, data_glob):
  fingerprints = []
  for run in ("a", "b"):
    output = str(tmp_path / run)
    assert cli.main(["train", "--data", data_glob, "--output", output,
                     "--backbone", "tiny", "--backbone_weights", "none",
                     "--no_augment", "--epochs", "1", "--seed", "5"]) == 0
    fingerprints.append(
        artifact.read_artifact_info(output).metadata.data_fingerprint)
  assert fingerprints[0] == fingerprints[1]


@pytest.mark.parametrize("value,expected", [("auto", None), ("AUTO", None),
                                            ("0", 0.0), ("0.9", 0.9)])
def test_fine_tune_ema_momentum_is_a_number_or_auto(value, expected):
  args = cli._parser().parse_args(["cv", "--data", "x", "--ema_momentum",  # pylint: disable=protected-access
                                   "0.99", "--fine_tune_ema_momentum", value])
  config = cli._recipe_config(args, output="x")  # pylint: disable=protected-access
  assert config.fine_tune_ema_momentum == expected
  assert config.fine_tune_ema == (0.99 if expected is None else expected)


@pytest.mark.parametrize("flags,message", [
    (["--data", "/nonexistent/*.tfrecord.gz"], "matches no file"),
    (["--image_size", "64"], "--image_size 64"),
    (["--val_fraction", "0.6", "--test_fraction", "0.5"], "below 1"),
    (["--epochs", "0"], "--epochs"),
    (["--target_accuracy", "1.5"], "--target_accuracy"),
    (["--target_accuracy", "0.9", "--val_fraction", "0"], "--val_fraction"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--network_size", "16"], "--network_size 16 is outside 32..4096"),
    (["--malignant_weight", "0"], "--malignant_weight 0.0 must be in"),
    (["--malignant_weight", "-1"], "--malignant_weight -1.0 must be in"),
    (["--malignant_weight", "nan"], "--malignant_weight nan must be in"),
    (["--ema_momentum", "1"],
     "--ema_momentum 1.0 must be in [0, 1) (0: no weight averaging)"),
    (["--ema_momentum", "nan"], "--ema_momentum nan must be in [0, 1)"),
    (["--fine_tune_ema_momentum", "1"],
     "--fine_tune_ema_momentum 1.0 must be in [0, 1) (0: none in the"
     " fine-tune)"),
    (["--fine_tune_from", "block1_conv1"], "needs --fine_tune_epochs above 0"),
    (["--fine_tune_epochs", "1", "--fine_tune_from", "block4_conv1"],
     "--fine_tune_from 'block4_conv1' is not a layer with weights of the"),
    (["--no_augment", "--degrade"],
     "--degrade needs --augment_views 3 or more (views 3, 5, ... are the"
     " degraded ones); got 0"),
    (["--augment_views", "2", "--degrade"], "needs --augment_views 3"),
    (["--augment_views", "1", "--annotate"],
     "--annotate needs --augment_views 2 or more (the random views 2, 3,"
     " ... carry the marks); got 1"),
    (["--no_augment", "--depth"],
     "--depth needs --augment_views 2 or more (the random views 2, 3, ..."
     " are the ones deepened); got 0"),
])
def test_bad_flags_exit_2(tmp_path, data_glob, capsys, flags, message):
  argv = ["train", "--data", data_glob, "--output", str(tmp_path / "m"),
          "--backbone", "tiny", "--backbone_weights", "none"]
  if flags[0] == "--data":
    argv[2] = flags[1]
    flags = []
  assert cli.main(argv + flags) == 2
  assert message in capsys.readouterr().err


def test_offline_imagenet_exits_with_advice(tmp_path, data_glob, capsys,
                                            monkeypatch):
  def offline(**kwargs):
    raise Exception("URL fetch failure: Name or service not known")

  monkeypatch.setattr(keras.applications, "VGG16", offline)
  assert cli.main(["train", "--data", data_glob, "--output",
                   str(tmp_path / "m"), "--no_augment"]) == 2
  err = capsys.readouterr().err
  assert "--backbone_weights PATH" in err and "none" in err


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path,
                                                             capsys):
  """train, cv, evaluate and recalibrate: one line and status 2 before the
  data are read (the glob here matches nothing, which would be the error
  otherwise) or a fold is trained."""
  afile = tmp_path / "p.zip"
  afile.write_bytes(b"PK")
  nothing = str(tmp_path / "none" / "*.tfrecord.gz")
  model = str(tmp_path / "model")
  tiny = ["--backbone", "tiny", "--backbone_weights", "none"]
  for output, what in ((str(afile), "is a file"),
                       (str(afile / "sub"), f"lies under the file {afile}")):
    for argv in (["train", "--data", nothing, *tiny],
                 ["cv", "--data", nothing, *tiny],
                 ["evaluate", "--model", model, "--data", nothing],
                 ["recalibrate", "--model", model, "--data", nothing]):
      assert cli.main(argv + ["--output", output]) == 2, argv
      err = capsys.readouterr().err
      assert err == (f"error: --output {output} {what}, not a directory;"
                     " pass a directory (it is created if missing)\n"), argv


def test_evaluate_and_cv_reports_keep_out_of_artifacts_and_old_reports(
    tmp_path, capsys):
  """A report directory: not a model artifact (evaluate's
  confusion_matrix.png, cv's cv.json would replace the artifact's own), and
  an earlier report is replaced only with --overwrite; all checked before
  any work (the data glob matches nothing)."""
  model = str(tmp_path / "model")
  testing.make_test_artifact(model, image_size=SIZE)
  nothing = str(tmp_path / "none" / "*.tfrecord.gz")
  evaluate = ["evaluate", "--model", model, "--data", nothing]
  cross = ["cv", "--data", nothing, "--backbone", "tiny",
           "--backbone_weights", "none"]
  for argv in (evaluate, cross):
    assert cli.main(argv + ["--output", model]) == 2
    assert "holds a model artifact" in capsys.readouterr().err
  reports = tmp_path / "reports"
  reports.mkdir()
  (reports / "metrics.json").write_text("{}")
  (reports / schemas.CV_REPORT_FILE).write_text("{}")
  for argv, name in ((evaluate, "evaluate"), (cross, "cv")):
    assert cli.main(argv + ["--output", str(reports)]) == 2
    assert capsys.readouterr().err == (
        f"error: {reports} already holds a {name} report"
        f" ({'metrics.json' if name == 'evaluate' else 'cv.json'}). Choose a"
        " new --output, or pass --overwrite to replace it.\n")
    # With --overwrite the checks pass: the empty glob is the error now.
    assert cli.main(argv + ["--output", str(reports), "--overwrite"]) == 2
    assert "matches no file" in capsys.readouterr().err


@pytest.mark.slow
def test_existing_artifact_needs_overwrite(tmp_path, data_glob, capsys):
  output = str(tmp_path / "m")
  testing.make_test_artifact(output)
  argv = ["train", "--data", data_glob, "--output", output, "--backbone",
          "tiny", "--backbone_weights", "none", "--no_augment", "--epochs", "1"]
  # As if it had been recalibrated: its sample split describes a calibration
  # the new model will not have.
  stale = os.path.join(output, schemas.RECALIBRATION_SPLIT_FILE)
  with open(stale, "w") as f:
    json.dump({"fit": ["a"]}, f)
  assert cli.main(argv) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert os.path.exists(stale)
  assert cli.main(argv + ["--overwrite"]) == 0
  assert not os.path.exists(stale)


@pytest.mark.parametrize("cv_folds", [0, 5])
def test_overwrite_removes_what_would_describe_another_model(tmp_path,
                                                            cv_folds):
  """`train --overwrite`'s first step: the old artifact's files that the new
  run may not rewrite go (without training anything)."""
  from training.steps import save  # pylint: disable=import-outside-toplevel
  output = tmp_path / "m"
  output.mkdir()
  stale = (schemas.METADATA_FILE, schemas.CV_PREDICTIONS_FILE,
           schemas.RECALIBRATION_SPLIT_FILE, schemas.CV_REPORT_FILE)
  kept = (schemas.MODEL_FILE, schemas.SPLIT_FILE)
  for name in stale + kept:
    (output / name).write_text("old")
  save.remove_stale(config_lib.TrainConfig(
      data=("x",), output=str(output), overwrite=True, cv_folds=cv_folds))
  # cv.json stays only for a run that writes its own.
  gone = stale if not cv_folds else stale[:-1]
  assert sorted(os.listdir(output)) == sorted(
      set(stale + kept) - set(gone))


def _colour_model(size):
  """A real artifact model whose prediction is the image's dominant colour.

  VGGPreprocess gives BGR minus the means; averaged and passed through an
  identity Dense, a pure blue image scores class 0, green 1, red 2.
  """
  from busi_core import layers  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((size, size, 3), dtype="uint8")
  x = layers.VGGPreprocess()(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(3, kernel_initializer="identity",
                         bias_initializer="zeros")(x)
  x = layers.TemperatureScaling()(x)
  return keras.Model(inputs, keras.layers.Softmax()(x))


def test_evaluate_matches_hand_computation(tmp_path, capsys):
  size = 8
  model_dir = str(tmp_path / "model")
  saving.save_artifact(_colour_model(size), model_dir, schemas.LABELS,
                       backbone="colour", weights_source="none",
                       data_fingerprint={}, class_counts={}, test_metrics={},
                       threshold=0.9)
  rng = np.random.default_rng(0)
  colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
  # (true label, colour = predicted class) — the fixed prediction set.
  cases = ([("normal", "blue")] * 3 + [("normal", "green")] +
           [("benign", "green")] * 2 + [("benign", "red")] +
           [("malignant", "red")] * 2 + [("malignant", "blue")])
  records = []
  for label, colour in cases:
    pixels = np.zeros((size, size, 3), np.uint8) + np.asarray(colours[colour],
                                                              np.uint8)
    pixels[0, 0] = rng.integers(0, 40, 3)  # distinct image_ids
    records.append(testing.make_record(pixels, label))
  records.append(testing.make_record(np.zeros((size, size, 3), np.uint8), ""))
  data = testing.write_tfrecords(str(tmp_path / "d" / "p.tfrecord.gz"),
                                 records)
  report_dir = str(tmp_path / "report")
  assert cli.main(["evaluate", "--model", model_dir, "--data", data,
                   "--output", report_dir]) == 0
  out = capsys.readouterr().out
  assert "accuracy 0.700 on 10 images" in out

  report = _load_json(report_dir, evaluate.REPORT_FILE)
  assert os.path.getsize(os.path.join(report_dir,
                                      evaluate.CONFUSION_MATRIX_FILE)) > 0
  # By hand: rows true (normal, benign, malignant), columns predicted.
  assert report["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
  assert report["count"] == 10 and report["unlabelled_skipped"] == 1
  assert report["accuracy"] == pytest.approx(7 / 10)
  # Precision: columns 3/4, 2/3, 2/3; recall: rows 3/4, 2/3, 2/3.
  expected = {"normal": 3 / 4, "benign": 2 / 3, "malignant": 2 / 3}
  for label, value in expected.items():
    row = report["per_class"][label]
    assert row["precision"] == pytest.approx(value)
    assert row["recall"] == pytest.approx(value)
    assert row["f1"] == pytest.approx(value)
  assert report["macro"]["f1"] == pytest.approx((3 / 4 + 4 / 3) / 3)
  assert report["low_confidence"] == 0
  assert report["seen_in_training"] is None
  assert report["not_fitted_on"] is None  # nothing known to exclude
  reliability = report["reliability"]
  assert sum(reliability["count"]) == reliability["n"] == 10
  assert report["model_version"] == artifact.read_artifact_info(
      model_dir).metadata.model_version

  # Beside it, every image as the artifact scored it, for SQL.
  import duckdb  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from schemas import evaluation as evaluation_schema  # pylint: disable=import-outside-toplevel
  path = os.path.join(report_dir, evaluation_schema.PREDICTIONS_FILE)
  table = pq.read_table(path)
  assert table.schema == schemas.evaluation_predictions_schema(schemas.LABELS)
  names = {"blue": "normal", "green": "benign", "red": "malignant"}
  rows = table.to_pylist()
  by_id = {r["image_id"]: r for r in rows}
  assert len(by_id) == 10  # the unlabelled image is not evaluated
  for record, (label, colour) in zip(records, cases):
    row = by_id[record.image_id]
    assert (row["source"], row["label"], row["predicted_class"]) == (
        record.source, label, names[colour])
  for row in rows:
    probabilities = [row[schemas.probability_column(l)]
                     for l in schemas.LABELS]
    assert row["confidence"] == max(probabilities)
    assert row["predicted_class"] == schemas.LABELS[
        int(np.argmax(probabilities))]
    assert row[schemas.COLUMN_LOW_CONFIDENCE] == (row["confidence"] < 0.9)
    assert row["threshold"] == 0.9
    assert row["model_version"] == report["model_version"]
    # No detector, no split.json: the artifact cannot say.
    for column in (schemas.COLUMN_OOD_SCORE,
                   schemas.COLUMN_OUT_OF_DISTRIBUTION,
                   schemas.COLUMN_SEEN_IN_TRAINING,
                   schemas.COLUMN_NEAR_DUPLICATE_OF_TRAINING):
      assert row[column] is None
    # Never recalibrated: no image was in a recalibration sample.
    assert row[schemas.COLUMN_IN_RECALIBRATION_FIT] is False
  assert report[schemas.COLUMN_IN_RECALIBRATION_FIT] == 0
  # The AUCs of p_malignant, by counting pairs.
  assert_aucs_of_rows(report, rows)
  assert report["auc_malignant"] != report["auc_malignant_vs_benign"]
  assert (f"AUC of p_malignant: {report['auc_malignant']:.3f} against the"
          f" rest, {report['auc_malignant_vs_benign']:.3f} against benign"
          " images alone") in out
  # The report's confusion matrix, from the table in DuckDB.
  counts = dict(((t, p), n) for t, p, n in duckdb.sql(
      f"SELECT label, predicted_class, count(*) FROM read_parquet('{path}')"
      " GROUP BY ALL").fetchall())
  assert [[counts.get((t, p), 0) for p in schemas.LABELS]
          for t in schemas.LABELS] == report["confusion_matrix"]


def test_evaluate_warns_of_a_collapsed_model(tmp_path, capsys, caplog):
  """evaluate repeats the artifact's training warnings, and warns when it
  predicts one class for every evaluated image though they hold several
  (the colour model calls every red image malignant), else of each class
  it never predicts though they hold five or more of it."""
  size = 8
  rng = np.random.default_rng(0)
  def data(name, labels, colours=None):
    records = []
    for label, colour in zip(labels, colours or [(255, 0, 0)] * len(labels)):
      pixels = np.zeros((size, size, 3), np.uint8) + np.uint8(colour)
      pixels[0, 0] = rng.integers(0, 40, 3)  # distinct image_ids
      records.append(testing.make_record(pixels, label))
    return testing.write_tfrecords(str(tmp_path / name / "p.tfrecord.gz"),
                                   records)
  trained = "the model predicts malignant for all 9 validation images"
  # Train's checks found nothing, found this, never ran (no field).
  for name, warnings in (("plain", {"warnings": ()}),
                         ("warned", {"warnings": (trained,)}),
                         ("older", {})):
    saving.save_artifact(_colour_model(size), str(tmp_path / name),
                         schemas.LABELS, backbone="colour",
                         weights_source="none", data_fingerprint={},
                         class_counts={}, test_metrics={}, threshold=0.9,
                         **warnings)
  mixed = data("mixed", ["normal", "benign", "malignant"])
  malignant = data("malignant", ["malignant"] * 3)
  from schemas import evaluation as evaluation_schema  # pylint: disable=import-outside-toplevel
  runs = iter(range(20))
  def run(model, data_glob):
    report_dir = str(tmp_path / f"report{next(runs)}")
    assert cli.main(["evaluate", "--model", str(tmp_path / model), "--data",
                     data_glob, "--output", report_dir]) == 0
    return (_load_json(report_dir, evaluate.REPORT_FILE)[
        evaluation_schema.WARNINGS], capsys.readouterr().out)
  # One class to predict, predicted: nothing to say.
  found, out = run("plain", malignant)
  assert found == [] and "WARNING" not in out
  found, out = run("plain", mixed)
  assert len(found) == 1 and found[0].startswith(
      "The model predicts malignant for all 3 evaluated images, which hold 3"
      " classes: on these images it tells nothing apart")
  assert "`recalibrate` cannot fix that" in found[0]
  # Its own validation images were told apart (train's checks said so).
  assert ("It told its training's validation (or test) images apart"
          in found[0])
  assert f"WARNING: {found[0]}\nReport written to" in out
  assert found[0] in caplog.text
  found, _ = run("older", mixed)  # unknown: not claimed
  assert len(found) == 1 and "It told" not in found[0]
  found, out = run("warned", malignant)
  version = artifact.read_artifact_info(
      str(tmp_path / "warned")).metadata.model_version
  carries = (f"The model {version} carries a warning from the training of"
             f" its weights: {trained}")
  assert found == [carries]
  assert f"WARNING: {found[0]}\n" in out
  # Both: the training's first; its validation was one class, so no claim.
  found, _ = run("warned", mixed)
  assert found[0] == carries and len(found) == 2
  assert found[1].startswith("The model predicts malignant for all 3")
  assert "It told" not in found[1]
  # Two classes predicted (green is benign), never normal, of which there
  # are five: a class it does not recognise on these images.
  red, green = (255, 0, 0), (0, 255, 0)
  no_normal = data("no_normal", ["normal"] * 5 + ["benign"] * 2
                   + ["malignant"] * 2, [red] * 5 + [green] * 2 + [red] * 2)
  found, out = run("plain", no_normal)
  assert found == [
      "The model never predicts normal for the 9 evaluated images, though 5"
      " of them are normal: on these images it does not recognise that"
      " class. Its training's checks found no class it never predicted on"
      " its validation (or test) images, so these probably differ from them"
      " (scanner, preset, preprocessing). `recalibrate` cannot fix that: it"
      " refits only the temperature and the threshold, which change no"
      " predicted class; retrain, or fine-tune on images like these."]
  assert f"WARNING: {found[0]}\nReport written to" in out
  found, _ = run("older", no_normal)  # unknown: not claimed
  assert len(found) == 1 and "training's checks" not in found[0]
  # A sample of one class, all called another: no one_class finding (one
  # class to tell apart), but that class is never recognised.
  found, _ = run("plain", data("all_normal", ["normal"] * 5))
  assert len(found) == 1 and found[0].startswith(
      "The model never predicts normal for the 5 evaluated images, though"
      " all 5 are normal: on these images it does not recognise that class.")


def assert_aucs_of_rows(figures, rows):
  """`figures`' two AUCs of p_malignant are those of evaluation `rows`
  (dicts), counted pair by pair (ties one half): a check independent of
  `metrics.roc_auc`."""
  def pairs_auc(positive, negative):
    wins = [1.0 if p > n else 0.5 if p == n else 0.0
            for p in positive for n in negative]
    return sum(wins) / len(wins)
  p_mal = {l: [r["p_malignant"] for r in rows if r["label"] == l]
           for l in schemas.LABELS}
  assert figures["auc_malignant"] == pytest.approx(pairs_auc(
      p_mal["malignant"], p_mal["normal"] + p_mal["benign"]))
  assert figures["auc_malignant_vs_benign"] == pytest.approx(pairs_auc(
      p_mal["malignant"], p_mal["benign"]))


def test_evaluation_rows_mean_what_scoring_rows_mean():
  """Each column evaluate's table shares with the scoring table holds what
  scoring writes for the same model output, at the threshold's edge too."""
  from beam_pipeline import scoring  # pylint: disable=import-outside-toplevel
  from busi_core import inference  # pylint: disable=import-outside-toplevel
  from training import data as data_lib  # pylint: disable=import-outside-toplevel
  labels = list(schemas.LABELS)
  # float32(0.9) is just under 0.9: scoring, comparing Python floats, calls
  # it low-confidence; a float32 comparison would not.
  probabilities = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7],
                            [0.02, 0.96, 0.02], [0.3, 0.3, 0.4]], np.float32)
  ood_scores = np.array([1.0, 60.0, 47.0, 3.5])
  ids = [c * 64 for c in "abcd"]
  truth = np.array([0, 2, 1, 0])
  data = data_lib.LabelledData(
      np.zeros((4, 4, 4, 3), np.uint8), truth, ids,
      [f"x.zip!/{labels[t]}/{i[:6]}.png" for t, i in zip(truth, ids)])
  config = scoring.ScoringConfig(tuple(labels), 0.9, "v1", "run", 4,
                                 ood_threshold=47.0)
  table = evaluate._predictions_table(  # pylint: disable=protected-access
      data, labels, probabilities, config.threshold, ood_scores,
      ood_scores > config.ood_threshold, config.model_version, None, None,
      None)
  scored = schemas.prediction_columns(labels)
  shared = [name for name in table.column_names if name in scored]
  assert len(shared) == 13  # all but the three "fitted on it" columns
  for i, row in enumerate(table.to_pylist()):
    expected = scoring.prediction_row(
        scoring.RowKey(ids[i], data.sources[i], labels[truth[i]]),
        inference.ModelOutput(probabilities[i], float(ood_scores[i])), config)
    assert {name: row[name] for name in shared} == {
        name: expected[name] for name in shared}
  assert table.column(schemas.COLUMN_LOW_CONFIDENCE).to_pylist() == [
      True, True, False, True]
  # The report's figures flag the same images.
  figures = evaluate._figures(  # pylint: disable=protected-access
      truth, probabilities, config.threshold, labels)
  assert figures["flagging"]["flagged"] == 3


@pytest.fixture(name="test_artifact", scope="module")
def fixture_test_artifact(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gradcam") / "model")
  testing.make_test_artifact(path, image_size=SIZE, seed=2)
  return path


def test_gradcam_command_writes_the_overlay(tmp_path, test_artifact, capsys):
  import cv2  # pylint: disable=import-outside-toplevel
  from busi_core import imaging  # pylint: disable=import-outside-toplevel
  from busi_core import gradcam  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  frame = rng.integers(0, 256, (70, 90), np.uint8)  # grey, not square
  image = str(tmp_path / "scan.png")
  cv2.imwrite(image, frame)
  output = str(tmp_path / "cam.png")
  assert cli.main(["gradcam", "--model", test_artifact, "--image", image,
                   "--output", output]) == 0
  out = capsys.readouterr().out
  # The same preprocessing and model as scoring.
  with open(image, "rb") as f:
    pixels = imaging.decode_and_resize(f.read(), SIZE).pixels[None]
  model = artifact.load_artifact(test_artifact).model
  probabilities = model.predict(pixels, verbose=0)[0]
  predicted = schemas.LABELS[int(probabilities.argmax())]
  assert f"predicted class: {predicted}" in out
  for label, p in zip(schemas.LABELS, probabilities):
    assert f"{label:<9}  {p:.4f}" in out
  assert f"Grad-CAM for class {predicted} written to {output}" in out
  overlay = cv2.imread(output)
  assert overlay.shape == (SIZE, SIZE, 3)

  other = next(l for l in schemas.LABELS if l != predicted)
  assert cli.main(["gradcam", "--model", test_artifact, "--image", image,
                   "--output", output, "--class", other, "--overwrite"]) == 0
  assert f"Grad-CAM for class {other}" in capsys.readouterr().out
  expected = gradcam.overlay_png(
      pixels[0], gradcam.heatmaps(model, pixels,
                                  [schemas.LABELS.index(other)])[0])
  with open(output, "rb") as f:
    assert f.read() == expected

  assert cli.main(["gradcam", "--model", test_artifact, "--image", image,
                   "--output", output, "--class", "cyst", "--overwrite"]) == 2
  assert "--class 'cyst'" in capsys.readouterr().err
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  assert cli.main(["gradcam", "--model", test_artifact, "--image", str(bad),
                   "--output", output, "--overwrite"]) == 2


def test_gradcam_explains_a_dicom_as_preprocess_decodes_it(tmp_path,
                                                           test_artifact,
                                                           capsys):
  """pydicom's own test files: a single-frame CT and a two-frame RLE colour
  file (its first frame), through the frame decoder `preprocess` uses; an
  object without pixels gets one line."""
  from pydicom.data import get_testdata_file  # pylint: disable=import-outside-toplevel
  from busi_core import dicom, imaging  # pylint: disable=import-outside-toplevel
  model = artifact.load_artifact(test_artifact).model
  output = str(tmp_path / "cam.png")
  for name, frames in (("CT_small.dcm", None), ("SC_rgb_rle_2frame.dcm", 2)):
    path = get_testdata_file(name)
    assert cli.main(["gradcam", "--model", test_artifact, "--image", path,
                     "--output", output, "--overwrite"]) == 0, name
    out = capsys.readouterr().out
    with open(path, "rb") as f:
      data = f.read()
    frame = next(dicom.iter_frames(data, dicom.read_header(data, 10**8)))
    pixels = imaging.resize_pixels(frame.pixels, SIZE).pixels[None]
    probabilities = model.predict(pixels, verbose=0)[0]
    for label, p in zip(schemas.LABELS, probabilities):
      assert f"{label:<9}  {p:.4f}" in out, name
    assert (f"frame 1 of {frames} (a multi-frame DICOM" in out) == bool(
        frames), name
    assert os.path.getsize(output) > 0
  assert cli.main(["gradcam", "--model", test_artifact, "--image",
                   get_testdata_file("rtplan.dcm"), "--output", output,
                   "--overwrite"]) == 2
  assert capsys.readouterr().err == (
      "error: DICOM object without pixel data (a RT Plan Storage)\n")


def test_gradcam_refuses_directories_and_archives_in_one_line(
    tmp_path, test_artifact, capsys):
  image = str(tmp_path / "scan.png")
  import cv2  # pylint: disable=import-outside-toplevel
  cv2.imwrite(image, np.zeros((40, 40), np.uint8))
  folder = str(tmp_path / "folder")
  os.mkdir(folder)
  output = str(tmp_path / "cam.png")
  archive = str(tmp_path / "scans.zip")
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(archive, "w") as z:
    z.write(image, "benign/scan.png")
  for image_arg, output_arg, message in (
      (folder, output,
       f"error: --image {folder} is a directory; pass the image file to"
       " explain\n"),
      (image, folder,
       f"error: --output {folder} is a directory; pass the PNG file to"
       " write\n"),
      (archive, output,
       f"error: --image {archive} is a zip archive, not an image: gradcam"
       " explains one image file. Extract one, or score the archive with"
       " `python -m beam_pipeline run --gradcam all`\n")):
    assert cli.main(["gradcam", "--model", test_artifact, "--image",
                     image_arg, "--output", output_arg]) == 2
    assert capsys.readouterr().err == message
  assert not os.path.exists(output)


def test_gradcam_never_replaces_the_scan_the_artifact_or_a_file_unasked(
    tmp_path, test_artifact, capsys):
  import cv2  # pylint: disable=import-outside-toplevel
  image = str(tmp_path / "scan.png")
  cv2.imwrite(image, np.full((40, 40), 90, np.uint8))
  with open(image, "rb") as f:
    scan = f.read()
  artifact_files = {name: os.path.getsize(os.path.join(test_artifact, name))
                    for name in os.listdir(test_artifact)}
  earlier = tmp_path / "earlier.png"
  earlier.write_bytes(b"an earlier overlay")
  inside = os.path.join(test_artifact, "model.keras")
  for output, overwrite, message in (
      (image, True,
       f"error: --output {image} is the --image itself: the overlay would"
       " replace the scan; choose another file\n"),
      # The same file by another name.
      (str(tmp_path / "." / "scan.png"), True,
       f"error: --output {tmp_path / '.' / 'scan.png'} is the --image"
       " itself: the overlay would replace the scan; choose another file\n"),
      (inside.replace("model.keras", "cam.png"), True,
       f"error: --output {os.path.join(test_artifact, 'cam.png')} lies"
       f" inside the model artifact {test_artifact}; write the overlay"
       " outside it\n"),
      (str(earlier), False,
       f"error: --output {earlier} already exists; choose a new file, or"
       " pass --overwrite to replace it\n"),
      (inside, True,
       f"error: --output {inside}: the overlay is a PNG; name the file to"
       " write *.png\n"),
      (str(tmp_path / "cam.jpg"), False,
       f"error: --output {tmp_path / 'cam.jpg'}: the overlay is a PNG; name"
       " the file to write *.png\n")):
    argv = ["gradcam", "--model", test_artifact, "--image", image,
            "--output", output] + (["--overwrite"] if overwrite else [])
    assert cli.main(argv) == 2, output
    assert capsys.readouterr().err == message
  with open(image, "rb") as f:
    assert f.read() == scan
  assert {name: os.path.getsize(os.path.join(test_artifact, name))
          for name in os.listdir(test_artifact)} == artifact_files
  assert earlier.read_bytes() == b"an earlier overlay"
  assert not (tmp_path / "cam.jpg").exists()
  # --overwrite replaces an earlier overlay.
  assert cli.main(["gradcam", "--model", test_artifact, "--image", image,
                   "--output", str(earlier), "--overwrite"]) == 0
  assert earlier.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_empty_validation_split_trains_without_calibration(tmp_path,
                                                          data_glob, capsys):
  # LabelledData is a NamedTuple: emptiness must be judged on its images,
  # not len() of the tuple (always 4).
  output = str(tmp_path / "m")
  # The default threshold is chosen on validation: without one, say so.
  assert _tiny_train(output, data_glob, "--val_fraction", "0") == 2
  assert "--val_fraction" in capsys.readouterr().err
  assert _tiny_train(output, data_glob, "--val_fraction", "0",
                     "--threshold", "0.9") == 0
  metadata = artifact.read_artifact_info(output).metadata
  assert metadata.class_counts["val"] == {
      label: 0 for label in metadata.labels}
  assert not metadata.calibration.fitted
  assert metadata.temperature == 1.0


def test_abbreviated_flags_are_refused(tmp_path, data_glob, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["cv", "--data", data_glob, "--fold", "3", "--backbone", "tiny"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.endswith(
      "python -m training cv: error: unknown flag --fold (did you mean"
      " --folds?)\n")


@pytest.mark.parametrize("argv, message", [
    # Before the missing --output argparse would report instead.
    (["evaluate", "--model", "m", "--data", "d", "--ouptut", "o"],
     "python -m training evaluate: error: unknown flag --ouptut (did you"
     " mean --output?)"),
    # The command's own usage, not the top level's.
    (["train", "--data", "d", "--output", "o", "--cv_fold=0"],
     "python -m training train: error: unknown flag --cv_fold (did you mean"
     " --cv_folds?)"),
    (["recalibrate", "--model", "m", "--data", "d", "--output", "o",
      "--bogus"], "python -m training recalibrate: error: unknown flag"
     " --bogus"),
])
def test_a_misspelt_flag_names_the_closest_the_command_takes(capsys, argv,
                                                              message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.endswith(message + "\n"), err
  assert err.startswith(f"usage: python -m training {argv[0]}")


def test_an_unknown_fine_tune_schedule_is_refused(data_glob, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["cv", "--data", data_glob, "--fine_tune_schedule", "linear"])
  assert exit_info.value.code == 2
  assert ("argument --fine_tune_schedule: invalid choice: 'linear'"
          in capsys.readouterr().err)
  with pytest.raises(ValueError, match="--fine_tune_schedule 'linear': one"
                     " of constant, cosine"):
    config_lib.TrainConfig(data=("x",), output="x",
                           fine_tune_schedule="linear").validate()


def test_degrade_and_no_degrade_are_refused_together(data_glob, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["cv", "--data", data_glob, "--degrade", "--no_degrade"])
  assert exit_info.value.code == 2
  assert "not allowed with argument --degrade" in capsys.readouterr().err


def test_annotate_and_no_annotate_are_refused_together(data_glob, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["cv", "--data", data_glob, "--annotate", "--no_annotate"])
  assert exit_info.value.code == 2
  assert "not allowed with argument --annotate" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--threshold", "0.8"],
                                   ["--target_accuracy", "none"]])
def test_threshold_rule_with_a_fixed_threshold_is_refused(data_glob, capsys,
                                                         flags):
  assert cli.main(["cv", "--data", data_glob, "--backbone", "tiny",
                   "--threshold_rule", "observed", *flags]) == 2
  assert "--threshold_rule observed needs a threshold chosen" in (
      capsys.readouterr().err)


def test_the_tiny_backbone_with_pretrained_weights_is_refused_first(
    tmp_path, data_glob, capsys):
  # Before any data is read, and worded as the flags the user passes.
  assert cli.main(["train", "--data", data_glob, "--output",
                   str(tmp_path / "out"), "--backbone", "tiny"]) == 2
  assert capsys.readouterr().err.endswith(
      "error: --backbone tiny has no pretrained weights (--backbone_weights"
      " imagenet); pass --backbone_weights none\n")
  assert not (tmp_path / "out").exists()


def test_expected_rule_needs_a_calibration(data_glob, capsys):
  assert cli.main(["cv", "--data", data_glob, "--backbone", "tiny",
                   "--no_calibrate", "--threshold_rule", "expected"]) == 2
  assert "--no_calibrate leaves them uncalibrated" in (
      capsys.readouterr().err)
  # Left to its default, the rule falls back to observed accuracy where no
  # temperature was fitted, and says so.
  config = config_lib.TrainConfig(data=("x",), output="x", calibrate=False,
                                  target_accuracy=0.9)
  confidence = np.array([0.99, 0.98, 0.97, 0.6])
  correct = np.array([True, False, True, True])
  val = (confidence, correct)
  uncalibrated = recipe.choose_flagging(config, val, val, calibrated=False)
  assert uncalibrated["rule"] == schemas.THRESHOLD_RULE_OBSERVED
  assert uncalibrated["threshold"] == 0.99  # the only one all right
  calibrated = recipe.choose_flagging(config, val, val)
  assert calibrated["rule"] == schemas.THRESHOLD_RULE_EXPECTED
  assert calibrated["threshold"] == 0.97  # mean confidence 0.98


def test_threshold_rule_is_checked():
  config = config_lib.TrainConfig(data=("x",), output="x")
  assert config.threshold_rule == schemas.THRESHOLD_RULE_EXPECTED
  with pytest.raises(ValueError, match="--threshold_rule 'seen'"):
    dataclasses.replace(config, threshold_rule="seen").validate()


def test_network_size_defaults_to_the_records_size():
  vgg = config_lib.TrainConfig(data=("x",), output="x")
  tiny = dataclasses.replace(vgg, backbone="tiny")
  for config in (vgg, tiny):
    assert config.network_size_for(224) == 224
    assert dataclasses.replace(config, network_size=320).network_size_for(
        224) == 320


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert schemas.PACKAGE_VERSION in capsys.readouterr().out


def test_depth_is_on_by_default_and_off_with_no_depth():
  parser = cli._parser()  # pylint: disable=protected-access
  base = ["cv", "--data", "x", "--backbone", "tiny"]

  def config(*flags):
    return cli._recipe_config(parser.parse_args(base + list(flags)),  # pylint: disable=protected-access
                              output="x")

  assert config().depth is True
  assert config("--depth").depth is True
  assert config("--no_depth").depth is False
  # Nothing to deepen without random views; not an error unless asked for.
  assert config("--augment_views", "1").augment_views == 1


@pytest.mark.parametrize("command", ["train", "cv", "evaluate",
                                     "recalibrate"])
def test_a_batch_size_under_one_is_refused_first(tmp_path, capsys, command):
  # Before any file is read (evaluate leaked Python's own errors, such as
  # "range() arg 3 must not be zero").
  argv = [command, "--data", str(tmp_path / "none-*.tfrecord.gz")]
  if command in ("evaluate", "recalibrate"):
    argv += ["--model", str(tmp_path / "no-model")]
  if command != "cv":
    argv += ["--output", str(tmp_path / "out")]
  for size in ("0", "-3"):
    assert cli.main(argv + ["--batch_size", size]) == 2
    assert capsys.readouterr().err == (
        "error: --batch_size must be at least 1\n")
  assert not (tmp_path / "out").exists()
