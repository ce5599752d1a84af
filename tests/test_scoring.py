"""The scoring stage and the whole job: TFRecords/archives → Parquet."""

import datetime
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from beam_pipeline import pipeline, scoring
from busi_core import imaging
from busi_core.inference import ModelOutput
from schemas import records
from tests import archive_factory as af
from tests.pipeline_helpers import (assert_manifest_spelled_in_schemas,
                                    read_errors, read_records, sql)
from training import testing as training_testing

SIZE = 32
LABELS = tuple(schemas.LABELS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("model"))
  training_testing.make_test_artifact(path, image_size=SIZE, threshold=0.5)
  return path


def _busi_zip(path, n_per_class=4, seed=0):
  entries = af.busi_entries(n_per_class, seed, shape=(40, 48),
                            second_mask=False)
  entries.append(af.Entry("Dataset_BUSI_with_GT/notes.txt", b"n/a", "error",
                          error_type="NotAnImage"))
  af.write_zip(path, entries)
  return entries


def _predictions(output_dir):
  pattern = os.path.join(output_dir, schemas.PREDICTIONS_DIR, "*.parquet")
  return pattern, pq.ParquetDataset(
      [os.path.join(os.path.dirname(pattern), f)
       for f in os.listdir(os.path.dirname(pattern))]).read()


def test_prediction_row_follows_schema():
  config = scoring.ScoringConfig(LABELS, 0.9, "m-1", "run-1", SIZE)
  key = scoring.RowKey("abc", "x.zip!/benign/a.png", "")
  row = scoring.prediction_row(
      key, ModelOutput(np.array([0.05, 0.15, 0.8], np.float32), None), config)
  assert list(row) == schemas.prediction_columns(LABELS)
  assert row["predicted_class"] == "malignant"
  assert row["label"] is None
  assert row["confidence"] == pytest.approx(0.8)
  assert row["low_confidence"] is True and row["threshold"] == 0.9
  assert isinstance(row["p_normal"], float)
  assert row["scored_at"].tzinfo is datetime.timezone.utc
  # No detector and a record from before the quality checks: nulls.
  assert (row["ood_score"], row["out_of_distribution"],
          row["quality_flags"]) == (None, None, None)
  assert row["needs_review"] is True  # low confidence alone


@pytest.mark.parametrize("confident, score, flags, ood, review", [
    (True, 1.0, "", False, False),
    (True, 5.0 + 1e-9, "", True, True),
    (True, 5.0, "", False, False),
    (True, 1.0, "colour", False, True),
    (False, 1.0, "", False, True),
    (True, None, "", None, False),
    (True, 1.0, None, False, False),
])
def test_needs_review_is_any_of_the_three_flags(confident, score, flags, ood,
                                                review):
  config = scoring.ScoringConfig(LABELS, 0.9, "m-1", "run-1", SIZE,
                                 ood_threshold=5.0)
  key = scoring.RowKey("abc", "x.zip!/a.png", "", flags)
  probabilities = [0.02, 0.03, 0.95] if confident else [0.2, 0.3, 0.5]
  row = scoring.prediction_row(
      key, ModelOutput(np.array(probabilities), score), config)
  assert row["out_of_distribution"] is ood
  assert row["quality_flags"] == flags
  assert row["needs_review"] is review
  assert row["ood_score"] == score


def test_keyed_input_refuses_wrong_shapes():
  record = records.ImageRecord("i", "s", "benign",
                               np.zeros((16, 16, 3), np.uint8), 16, 16)
  with pytest.raises(ValueError, match="--image_size 32"):
    scoring.keyed_input(record, SIZE)
  key, pixels = scoring.keyed_input(
      record._replace(pixels=np.zeros((SIZE, SIZE, 3), np.uint8)), SIZE)
  assert key == scoring.RowKey("i", "s", "benign", None)
  assert pixels.shape[0] == SIZE


def test_failed_batch_rows_name_every_image():
  keys = [scoring.RowKey(f"id{i}", f"src{i}", "") for i in range(3)]
  batch = [(k, np.zeros((2, 2, 3), np.uint8)) for k in keys]
  # The shape of Beam's dead letter: (element, (type, repr, traceback)).
  failure = (batch, (RuntimeError, "RuntimeError('CUDA OOM')",
                     ["Traceback ..."]))
  rows = scoring.failed_batch_rows(failure, "run-9")
  assert [r["source"] for r in rows] == ["src0", "src1", "src2"]
  assert {r["stage"] for r in rows} == {"inference"}
  assert {r["error_type"] for r in rows} == {"RuntimeError"}
  assert all("CUDA OOM" in r["message"] and r["run_id"] == "run-9"
             for r in rows)


def test_score_tfrecords(tmp_path, model_dir, fake_model):
  archive = str(tmp_path / "busi.zip")
  entries = _busi_zip(archive)
  pre = str(tmp_path / "pre")
  pipeline.run(["preprocess", "--input", archive, "--output", pre,
                "--image_size", str(SIZE)])
  # One example of the wrong size among the good ones: it must land in
  # errors while the others still score.
  odd = records.ImageRecord("f" * 64, "odd.png", "benign",
                            np.zeros((16, 16, 3), np.uint8), 16, 16)
  training_testing.write_tfrecords(
      os.path.join(pre, schemas.TFRECORD_DIR, "odd.tfrecord.gz"), [odd])
  out = str(tmp_path / "scored")
  manifest = pipeline.run([
      "score", "--input", os.path.join(pre, schemas.TFRECORD_DIR, "*.gz"),
      "--model", model_dir, "--output", out, "--batch_size", "5"])

  pattern, table = _predictions(out)
  assert table.column_names == schemas.prediction_columns(LABELS)
  assert table.schema == schemas.predictions_schema(LABELS)
  assert table.num_rows == 12
  images = {imaging.image_id(e.data): e for e in entries if e.fate == "image"}
  assert set(table.column("image_id").to_pylist()) == set(images)
  total, bad_sum, bad_flag, versions, runs = sql(f"""
      SELECT count(*),
             count(*) FILTER (WHERE abs(p_normal + p_benign + p_malignant - 1)
                              > 1e-5),
             count(*) FILTER (WHERE low_confidence != (confidence < threshold)
                              OR confidence != greatest(p_normal, p_benign,
                                                        p_malignant)),
             count(DISTINCT model_version), count(DISTINCT run_id)
      FROM read_parquet('{pattern}')""")[0]
  assert (total, bad_sum, bad_flag, versions, runs) == (12, 0, 0, 1, 1)
  (labelled,) = sql(f"SELECT count(*) FROM read_parquet('{pattern}')"
                    " WHERE label = split_part(source, '/', -2)")[0]
  assert labelled == 12
  assert sql(f"SELECT DISTINCT threshold FROM read_parquet('{pattern}')") == [
      (0.5,)]

  errors = read_errors(out)
  assert [(e["source"], e["stage"], e["error_type"]) for e in errors] == [
      ("odd.png", "inference", "WrongImageShape")]
  assert manifest["counts"]["predictions"] == 12
  assert manifest["counts"]["members_seen"] == 13
  assert manifest["invariant"]["holds"]
  assert manifest["model_version"] == table.column("model_version")[0].as_py()
  # A test artifact was never through train's checks.
  assert manifest[schemas.MANIFEST_MODEL_WARNINGS] is None
  assert sum(manifest["predicted_classes"].values()) == 12
  assert_manifest_spelled_in_schemas(out)


@pytest.mark.slow
def test_run_end_to_end_and_rerun_is_stable(tmp_path, model_dir,
                                              fake_model):
  archive = str(tmp_path / "busi.zip")
  entries = _busi_zip(archive, n_per_class=3)
  outs = []
  for name in ("first", "second"):
    out = str(tmp_path / name)
    manifest = pipeline.run(["run", "--input", archive, "--model", model_dir,
                             "--output", out, "--threshold", "0.99"])
    outs.append(out)
    counts = manifest["counts"]
    assert counts["members_seen"] == len(entries)
    assert counts["predictions"] == 9 and counts["masks_skipped"] == 9
    assert counts["errors"] == 1 and manifest["invariant"]["holds"]
    assert counts["images_written"] == 9
  # The decoded images are kept for training or rescoring.
  assert len(read_records(outs[0])) == 9
  first, second = (
      sql(f"SELECT image_id, source, p_normal, p_benign, p_malignant, "
          f"predicted_class, threshold FROM read_parquet('{out}/predictions/"
          f"*.parquet') ORDER BY source") for out in outs)
  assert first == second
  assert {row[-1] for row in first} == {0.99}
  # Every non-mask member appears exactly once in predictions or errors.
  sources = [row[1] for row in first] + [e["source"] for e in read_errors(
      outs[0])]
  expected = sorted(f"{archive}!/{e.path}" for e in entries
                    if e.fate != "mask")
  assert sorted(sources) == expected


def test_bad_model_dir_fails_before_reading(tmp_path):
  archive = str(tmp_path / "busi.zip")
  _busi_zip(archive, n_per_class=1)
  with pytest.raises(ValueError, match="labels.json|metadata.json|model"):
    pipeline.run(["run", "--input", archive, "--model", str(tmp_path),
                  "--output", str(tmp_path / "out")])
  assert not os.path.exists(tmp_path / "out" / schemas.MANIFEST_FILE)


@pytest.mark.slow
def test_a_run_repeats_the_warnings_its_model_was_trained_with(
    tmp_path, model_dir, fake_model, caplog):
  """A model train wrote with a warning (e.g. one class predicted for
  every validation image) says so at launch, in the manifest and in the
  end-of-run summary; a model without one, or from before the field, not."""
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from beam_pipeline import cli  # pylint: disable=import-outside-toplevel
  warned = str(tmp_path / "warned")
  shutil.copytree(model_dir, warned)
  path = os.path.join(warned, schemas.METADATA_FILE)
  with open(path, encoding="utf-8") as f:
    metadata = json.load(f)
  archive = str(tmp_path / "busi.zip")
  _busi_zip(archive, n_per_class=1)
  warning = "the model predicts malignant for all 9 validation images"
  sentence = (f"The model {metadata['model_version']} carries a warning"
              f" from the training of its weights: {warning}")
  # No "warnings" (written before the check), none found, one found.
  for n, warnings in enumerate((None, [], [warning])):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(metadata if warnings is None else
                {**metadata, "warnings": warnings}, f)
    caplog.clear()
    manifest = pipeline.run(["run", "--input", archive, "--model", warned,
                             "--output", str(tmp_path / f"out{n}")])
    # null: the model predates train's checks, so none were run.
    assert manifest[schemas.MANIFEST_MODEL_WARNINGS] == warnings
    assert (sentence in caplog.text) == bool(warnings)
    assert (f"  WARNING: {sentence}\n" in cli.format_summary(manifest)
           ) == bool(warnings)


def test_score_warns_at_launch_when_the_first_image_is_another_size(
    tmp_path, caplog):
  """The first record of the first input against the model's size: a
  warning before the run (not a refusal: inputs of several sizes score,
  the odd images as WrongImageShape rows); nothing when it matches or the
  file is no TFRecord (the run reports that itself)."""
  from beam_pipeline import scoring_pipeline  # pylint: disable=import-outside-toplevel
  small = str(tmp_path / "small.tfrecord.gz")
  training_testing.write_tfrecords(small, training_testing.synthetic_records(
      per_class=1, image_size=16, seed=0))
  right = str(tmp_path / "right.tfrecord.gz")
  training_testing.write_tfrecords(right, training_testing.synthetic_records(
      per_class=1, image_size=32, seed=0))
  with caplog.at_level("WARNING"):
    warning = scoring_pipeline.check_image_size([small, right], 32)
  assert warning == (
      f"--input {small} begins with a 16x16 image but the model takes 32x32:"
      " every image of another size will be a WrongImageShape error row;"
      " preprocess them again with --image_size 32, or score the archives"
      " with `run`, which preprocesses at the model's size")
  assert warning in caplog.text
  assert scoring_pipeline.check_image_size([right, small], 32) is None
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  assert scoring_pipeline.check_image_size([archive], 32) is None
  assert scoring_pipeline.check_image_size([], 32) is None
