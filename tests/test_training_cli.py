"""`python -m training train|evaluate` end to end through `cli.main(argv)`."""

import json
import os

import keras
import numpy as np
import pytest

import schemas
from training import artifact, cli, evaluate, testing, train

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
                     "--batch_size", "8", "--seed", "1", "--name", "e2e"])
  assert status == 0
  assert "Skipped 1 unlabelled" in capsys.readouterr().out
  for name in (schemas.MODEL_FILE, schemas.LABELS_FILE, schemas.METADATA_FILE,
               train.CONFUSION_MATRIX_FILE, train.TRAINING_CURVES_FILE,
               train.SPLIT_FILE):
    assert os.path.getsize(os.path.join(output, name)) > 0, name

  metadata = _load_json(output, schemas.METADATA_FILE)
  for field in schemas.METADATA_REQUIRED_FIELDS:
    assert field in metadata, field
  assert metadata["image_size"] == SIZE  # from the TFRecords
  assert metadata["backbone"] == "vgg16"
  assert metadata["weights_source"] == "none"
  assert metadata["threshold"] == schemas.DEFAULT_THRESHOLD
  assert metadata["temperature"] == 1.0
  assert metadata["model_version"].startswith("e2e-")
  settings = metadata["training"]
  assert settings["epochs"] == 2 and settings["fine_tune_epochs"] == 1
  assert settings["augment"] is False and settings["seed"] == 1
  assert settings["unlabelled_skipped"] == 1
  assert settings["duplicates_skipped"] == 1
  assert len(settings["history"]["loss"]) == 3
  counts = metadata["class_counts"]
  assert sum(sum(c.values()) for c in counts.values()) == 30
  assert metadata["test_metrics"]["count"] == sum(counts["test"].values())
  assert set(metadata["data_fingerprint"]) == {"train", "val", "test",
                                               "overall"}

  splits = _load_json(output, train.SPLIT_FILE)
  ids = [i for name in ("train", "val", "test") for i in splits[name]]
  assert len(ids) == len(set(ids)) == 30

  loaded = artifact.load_artifact(output)
  assert loaded.labels == list(schemas.LABELS)
  pixels = testing.class_images(2, 4, SIZE, np.random.default_rng(9))
  probabilities = loaded.model.predict(pixels, verbose=0)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_train_with_augmentation(tmp_path, data_glob):
  output = str(tmp_path / "model")
  status = cli.main(["train", "--data", data_glob, "--output", output,
                     "--backbone_weights", "none", "--augment", "--epochs",
                     "1", "--batch_size", "8"])
  assert status == 0
  metadata = artifact.read_artifact_info(output).metadata
  assert metadata["training"]["augment"] is True
  assert len(metadata["training"]["epoch_seconds"]["head"]) == 1
  artifact.load_artifact(output)


def test_same_seed_same_split(tmp_path, data_glob):
  fingerprints = []
  for run in ("a", "b"):
    output = str(tmp_path / run)
    assert cli.main(["train", "--data", data_glob, "--output", output,
                     "--backbone", "tiny", "--backbone_weights", "none",
                     "--no_augment", "--epochs", "1", "--seed", "5"]) == 0
    fingerprints.append(
        artifact.read_artifact_info(output).metadata["data_fingerprint"])
  assert fingerprints[0] == fingerprints[1]


@pytest.mark.parametrize("flags,message", [
    (["--data", "/nonexistent/*.tfrecord.gz"], "matches no file"),
    (["--image_size", "64"], "--image_size 64"),
    (["--val_fraction", "0.6", "--test_fraction", "0.5"], "below 1"),
    (["--epochs", "0"], "--epochs"),
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


def test_existing_artifact_needs_overwrite(tmp_path, data_glob, capsys):
  output = str(tmp_path / "m")
  testing.make_test_artifact(output)
  argv = ["train", "--data", data_glob, "--output", output, "--backbone",
          "tiny", "--backbone_weights", "none", "--no_augment", "--epochs", "1"]
  assert cli.main(argv) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert cli.main(argv + ["--overwrite"]) == 0


def _colour_model(size):
  """A real artifact model whose prediction is the image's dominant colour.

  VGGPreprocess gives BGR minus the means; averaged and passed through an
  identity Dense, a pure blue image scores class 0, green 1, red 2.
  """
  from training import layers  # pylint: disable=import-outside-toplevel
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
  artifact.save_artifact(_colour_model(size), model_dir, schemas.LABELS, {
      "backbone": "colour", "weights_source": "none", "data_fingerprint": {},
      "class_counts": {}, "test_metrics": {}, "threshold": 0.9})
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
  assert "accuracy 0.700 on 10 images" in capsys.readouterr().out

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
  assert report["model_version"] == artifact.read_artifact_info(
      model_dir).metadata["model_version"]
