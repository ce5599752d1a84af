"""gs:// end to end against a real GCS JSON-API server on loopback.

The server is gcp-storage-emulator, started here on 127.0.0.1; Beam's GCS IO
and google-cloud-storage reach it through STORAGE_EMULATOR_HOST.
"""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from beam_pipeline import pipeline
from busi_core import imaging
from tests import archive_factory as af
from training import testing as training_testing

from tests.conftest import BUCKET
SIZE = 32
# Slow set: a storage server, and the real Keras model staged from gs://
# on the workers.
pytestmark = pytest.mark.slow


def _upload_dir(client, local_dir, prefix):
  bucket = client.bucket(BUCKET)
  for name in os.listdir(local_dir):
    path = os.path.join(local_dir, name)
    if os.path.isfile(path):
      bucket.blob(f"{prefix}/{name}").upload_from_filename(path)


def _entries(seed):
  rng = np.random.default_rng(seed)
  entries = []
  for cls in schemas.LABELS:
    for i in (1, 2):
      stem = f"Dataset_BUSI_with_GT/{cls}/{cls} ({i})"
      entries.append(af.Entry(stem + ".png", af.png(af.speckle(rng, 30, 40)),
                              "image", cls))
      entries.append(af.Entry(stem + "_mask.png",
                              af.png(af.speckle(rng, 30, 40)), "mask"))
  entries.append(af.Entry("Dataset_BUSI_with_GT/broken.png", b"\x89PNG\r\n",
                          "error", error_type="CorruptImage"))
  return entries


def test_zip_and_targz_in_a_bucket_end_to_end(tmp_path, gcs_client):
  bucket = gcs_client.bucket(BUCKET)
  zip_entries, tar_entries = _entries(0), _entries(1)
  af.write_zip(str(tmp_path / "a.zip"), zip_entries)
  af.write_tar(str(tmp_path / "b.tar.gz"), tar_entries, gz=True)
  bucket.blob("in/a.zip").upload_from_filename(str(tmp_path / "a.zip"))
  bucket.blob("in/b.tar.gz").upload_from_filename(str(tmp_path / "b.tar.gz"))
  model_dir = tmp_path / "model"
  training_testing.make_test_artifact(str(model_dir), image_size=SIZE)
  _upload_dir(gcs_client, str(model_dir), "models/m1")

  pre = pipeline.run([
      "preprocess", "--input", f"gs://{BUCKET}/in/*.zip", "--input",
      f"gs://{BUCKET}/in/*.tar.gz", "--output", f"gs://{BUCKET}/pre",
      "--image_size", str(SIZE)])
  assert pre["counts"] == {"members_seen": 26, "images_written": 12,
                           "masks_skipped": 12, "errors": 2,
                           "inputs_vanished": 0, "extra_frames": 0,
                           "frames_skipped": 0}

  scored = pipeline.run([
      "score", "--input", f"gs://{BUCKET}/pre/tfrecords/*.tfrecord.gz",
      "--model", f"gs://{BUCKET}/models/m1", "--output",
      f"gs://{BUCKET}/scored"])
  assert scored["counts"]["predictions"] == 12
  assert scored["invariant"]["holds"]

  names = {b.name for b in gcs_client.list_blobs(BUCKET)}
  assert "pre/manifest.json" in names and "scored/manifest.json" in names
  manifest = json.loads(bucket.blob("scored/manifest.json").download_as_bytes())
  assert manifest["run_id"] == scored["run_id"]
  predictions = [n for n in names if n.startswith("scored/predictions/")]
  assert predictions and all(n.endswith(".parquet") for n in predictions)
  table = pq.read_table(io.BytesIO(bucket.blob(predictions[0])
                                   .download_as_bytes()))
  assert table.column_names == schemas.prediction_columns(schemas.LABELS)
  expected_ids = {imaging.image_id(e.data) for e in zip_entries + tar_entries
                  if e.fate == "image"}
  assert set(table.column("image_id").to_pylist()) == expected_ids
  assert all(s.startswith(f"gs://{BUCKET}/in/")
             for s in table.column("source").to_pylist())

  errors = [n for n in names if n.startswith("pre/errors/")]
  error_rows = pq.read_table(io.BytesIO(bucket.blob(errors[0])
                                        .download_as_bytes())).to_pylist()
  assert sorted(r["source"] for r in error_rows) == [
      f"gs://{BUCKET}/in/a.zip!/Dataset_BUSI_with_GT/broken.png",
      f"gs://{BUCKET}/in/b.tar.gz!/Dataset_BUSI_with_GT/broken.png"]


def test_run_with_everything_in_the_bucket(tmp_path, gcs_client):
  bucket = gcs_client.bucket(BUCKET)
  entries = _entries(2)
  af.write_zip(str(tmp_path / "c.zip"), entries)
  bucket.blob("in2/c.zip").upload_from_filename(str(tmp_path / "c.zip"))
  model_dir = tmp_path / "model"
  training_testing.make_test_artifact(str(model_dir), image_size=SIZE)
  _upload_dir(gcs_client, str(model_dir), "models/m2")
  manifest = pipeline.run([
      "run", "--input", f"gs://{BUCKET}/in2/c.zip", "--model",
      f"gs://{BUCKET}/models/m2", "--output", f"gs://{BUCKET}/run2"])
  counts = manifest["counts"]
  assert (counts["predictions"], counts["masks_skipped"], counts["errors"]) == (
      6, 6, 1)
  names = {b.name for b in gcs_client.list_blobs(BUCKET, prefix="run2/")}
  assert any(n.startswith("run2/tfrecords/") for n in names)
  with pytest.raises(ValueError, match="--overwrite"):
    pipeline.run(["run", "--input", f"gs://{BUCKET}/in2/c.zip", "--model",
                  f"gs://{BUCKET}/models/m2", "--output",
                  f"gs://{BUCKET}/run2"])


def test_objects_deleted_after_launch_are_vanished_rows(tmp_path, gcs_client):
  bucket = gcs_client.bucket(BUCKET)
  af.write_zip(str(tmp_path / "d.zip"), _entries(3))
  bucket.blob("in3/d.zip").upload_from_filename(str(tmp_path / "d.zip"))
  bucket.blob("in3/e.zip").upload_from_filename(str(tmp_path / "d.zip"))
  bucket.blob("in3/f.png").upload_from_string(
      af.png(np.full((6, 6), 9, np.uint8)))
  job = pipeline.create(["preprocess", "--input", f"gs://{BUCKET}/in3/*",
                         "--output", f"gs://{BUCKET}/pre3",
                         "--image_size", str(SIZE)])
  bucket.blob("in3/e.zip").delete()
  bucket.blob("in3/f.png").delete()
  job.pipeline.run().wait_until_finish()
  manifest = json.loads(bucket.blob("pre3/manifest.json").download_as_bytes())
  assert manifest["counts"]["inputs_vanished"] == 2
  assert manifest["invariant"]["holds"] and not manifest["complete"]
  assert manifest["counts"]["images_written"] == 6


@pytest.mark.parametrize("command, flags", [
    ("preprocess", ["--input", "LOCAL", "--output", "gs://no-such-bucket/o"]),
    ("preprocess", ["--input", "gs://no-such-bucket/in/*.zip", "--output",
                    "OUT"]),
    ("summary", ["--output", "gs://no-such-bucket/run"])])
def test_a_missing_bucket_is_one_line_and_status_2(tmp_path, gcs_client,
                                                    capsys, command, flags):
  from beam_pipeline import cli  # pylint: disable=import-outside-toplevel
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, _entries(0))
  flags = [{"LOCAL": archive, "OUT": str(tmp_path / "out")}.get(f, f)
           for f in flags]
  assert cli.main([command, *flags]) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert err.endswith("error: Cloud Storage: bucket no-such-bucket: not found"
                      " (404); check the bucket's name and that it exists\n"
                      ), err
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "out")

