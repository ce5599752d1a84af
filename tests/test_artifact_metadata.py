"""metadata.json as typed records (schemas.metadata): exact round trips of
what training writes, older metadata, and wrong types refused on load."""

import dataclasses
import json
import os
import re
import shutil

import pytest

import schemas
from busi_core import artifact
from schemas import metadata as metadata_schema
from schemas.metadata import ArtifactMetadata
from training import cli, model_card, testing

SIZE = 32


def _read(model_dir):
  with open(os.path.join(model_dir, schemas.METADATA_FILE)) as f:
    return json.load(f)


def _write(model_dir, metadata):
  with open(os.path.join(model_dir, schemas.METADATA_FILE), "w") as f:
    json.dump(metadata, f)


def _assert_round_trip(raw):
  """Same keys in the same order, same values, same JSON text."""
  again = ArtifactMetadata.from_json(raw).to_json()
  assert again == raw
  assert json.dumps(again, indent=2) == json.dumps(raw, indent=2)


@pytest.fixture(name="test_artifact", scope="module")
def fixture_test_artifact(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("meta") / "model")
  testing.make_test_artifact(path, image_size=SIZE, seed=1)
  return path


@pytest.fixture(name="trained", scope="module")
def fixture_trained(tmp_path_factory):
  """A real `train` run on tiny data, with every block: cross-validation,
  a test split, a fitted temperature and a chosen threshold."""
  root = tmp_path_factory.mktemp("trained")
  records = testing.synthetic_records(per_class=10, image_size=SIZE, seed=0)
  testing.write_tfrecords(str(root / "d" / "part-00000-of-00001.tfrecord.gz"),
                          records)
  output = str(root / "model")
  assert cli.main(["train", "--data", str(root / "d" / "*.tfrecord.gz"),
                   "--output", output, "--backbone", "tiny",
                   "--backbone_weights", "none", "--no_augment", "--epochs",
                   "2", "--fine_tune_epochs", "1", "--cv_folds", "2",
                   "--val_fraction", "0.3", "--test_fraction", "0.2",
                   "--target_accuracy", "0.8"]) == 0
  return output


def test_test_artifact_round_trips(test_artifact):
  raw = _read(test_artifact)
  _assert_round_trip(raw)
  assert artifact.read_artifact_info(test_artifact).metadata.to_json() == raw


def test_trained_artifact_round_trips(trained):
  raw = _read(trained)
  _assert_round_trip(raw)
  metadata = artifact.read_artifact_info(trained).metadata
  assert metadata.to_json() == raw
  # Every block is typed, down to the flag figures.
  assert isinstance(metadata.calibration, metadata_schema.Calibration)
  assert isinstance(metadata.flagging.fixed.test, metadata_schema.FlagStats)
  assert isinstance(metadata.test_metrics.per_class["benign"],
                    metadata_schema.Scores)
  assert metadata.cross_validation.folds == 2
  assert isinstance(metadata.cross_validation.per_fold[0],
                    metadata_schema.FoldSummary)
  assert metadata.threshold_source == schemas.THRESHOLD_TARGET_ACCURACY
  assert metadata.flagging.threshold == metadata.threshold
  assert metadata.training.data and not metadata.extra


def test_old_metadata_loads(tmp_path, test_artifact):
  """Written before model_sha256, threshold_source, calibration and the
  newer training fields existed, with a key this release no longer writes."""
  old = str(tmp_path / "old")
  shutil.copytree(test_artifact, old)
  raw = _read(old)
  for key in ("model_sha256", "name", "threshold_source", "target_accuracy",
              "calibration"):
    del raw[key]
  raw["training"] = {"epochs": 10, "seed": 0, "augment": True,
                     "duplicate_groups": 3}
  _write(old, raw)
  metadata = artifact.load_artifact(old).metadata  # legacy digest check too
  assert metadata.model_sha256 is None and metadata.calibration is None
  assert metadata.threshold_source is None and metadata.flagging is None
  assert metadata.training.epochs == 10
  assert metadata.training.patience is None
  assert metadata.training.extra == {"duplicate_groups": 3}
  assert metadata.to_json() == raw  # nothing added, nothing lost
  card = model_card.render(metadata)
  assert "Not calibrated" in card and "(fixed)" in card


@pytest.mark.parametrize("key,value,field", [
    ("threshold", True, "threshold"),
    ("labels", "normal", "labels"),
    ("class_counts", {"train": {"normal": 1.5}}, "class_counts.train.normal"),
    ("test_metrics", [], "test_metrics"),
    ("calibration", {"temperature": "high"}, "calibration.temperature"),
    ("flagging", {"val": {"count": "9"}}, "flagging.val.count"),
    ("training", {"augment": "yes"}, "training.augment"),
    ("cross_validation", {"per_fold": [{"fold": None}, {"fold": 1.0}]},
     "cross_validation.per_fold[1].fold"),
])
def test_wrong_type_refused_on_load(tmp_path, test_artifact, key, value,
                                    field):
  broken = str(tmp_path / "broken")
  shutil.copytree(test_artifact, broken)
  _write(broken, {**_read(test_artifact), key: value})
  with pytest.raises(artifact.ArtifactError,
                     match=f"metadata.json in .*: field {re.escape(field)} "):
    artifact.read_artifact_info(broken)


def test_absent_null_and_extra_keys():
  block = metadata_schema.Calibration(temperature=1, ece_before=None)
  assert block.to_json() == {"temperature": 1, "ece_before": None}
  assert block.fitted is None  # absent reads as None, and stays absent
  assert block.replace(fitted=None).to_json() == {
      "temperature": 1, "fitted": None, "ece_before": None}
  # dataclasses.replace keeps an absent field absent when set to None.
  assert dataclasses.replace(block, fitted=None).to_json() == block.to_json()
  raw = {"temperature": 2, "new_key": [1, 2]}
  read = metadata_schema.Calibration.from_json(raw)
  assert read.temperature == 2 and isinstance(read.temperature, int)
  assert read.extra == {"new_key": [1, 2]} and read.to_json() == raw
  assert metadata_schema.Calibration(**read.as_kwargs()).to_json() == raw
  with pytest.raises(dataclasses.FrozenInstanceError):
    read.temperature = 3  # pylint: disable=assigning-non-slot


def test_schema_names_match_the_records():
  names = {f.name for f in dataclasses.fields(ArtifactMetadata)}
  assert metadata_schema.required_fields() == schemas.METADATA_REQUIRED_FIELDS
  assert set(metadata_schema.STAMPED_FIELDS) <= names
  for constant in (schemas.METADATA_MODEL_SHA256,
                   schemas.METADATA_PARENT_MODEL_VERSION,
                   schemas.METADATA_PARENT_MODEL_SHA256,
                   schemas.METADATA_RECALIBRATION,
                   schemas.artifact.METADATA_CROSS_VALIDATION):
    assert constant in names, constant
  with pytest.raises(metadata_schema.MetadataError, match="lacks created_at"):
    ArtifactMetadata.from_json({"model_version": "x"})


def test_training_warning_lines():
  from busi_core import artifact  # pylint: disable=import-outside-toplevel
  said = "carries a warning from the training of its weights: one class"
  assert artifact.training_warning_lines("m-1", ["one class"]) == [
      f"The model m-1 {said}"]
  # A hand-edited manifest: no version, items that are not sentences.
  assert artifact.training_warning_lines(None, ("one class", 7, None)) == [
      f"The model {said}"]
  for warnings in (None, [], "one class", {"a": "b"}):
    assert artifact.training_warning_lines("m-1", warnings) == []
  # A run manifest: the training's, then the recalibration's; a run from
  # before the recalibration field, or of a model never recalibrated, has
  # only the former.
  manifest = {schemas.MANIFEST_MODEL_VERSION: "m-1",
              schemas.MANIFEST_MODEL_WARNINGS: ["one class"]}
  assert artifact.run_warning_lines(manifest) == [f"The model m-1 {said}"]
  manifest[schemas.MANIFEST_MODEL_RECALIBRATION_WARNINGS] = ["No normal."]
  assert artifact.run_warning_lines(manifest) == [
      f"The model m-1 {said}", "The model m-1 carries a warning from its"
      " recalibration, on the site sample: No normal."]
  assert artifact.run_warning_lines(None) == []
