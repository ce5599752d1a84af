"""Incremental scoring (`--skip_scored`) through the real in-process runner,
with the numpy fake model: only images without a prediction by the same
model version are scored, the rest counted as already_scored."""

import json
import os
import re

import pytest

import schemas
from beam_pipeline import cli, pipeline, skip_scored
from busi_core import imaging
from tests import archive_factory as af
from tests.pipeline_helpers import assert_manifest_spelled_in_schemas, sql
from training import testing as training_testing

SHAPE = (20, 24)


def _archive(path, n_per_class, seed):
  entries = af.busi_entries(n_per_class, seed, shape=SHAPE, second_mask=False)
  af.write_zip(path, entries)
  return {imaging.image_id(e.data) for e in entries if e.fate == "image"}


def _scored_ids(out):
  return {row[0] for row in sql(
      f"SELECT image_id FROM read_parquet('{out}/predictions/*.parquet')")}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
  """As conftest's model_dir but other weights: another model_version."""
  path = str(tmp_path_factory.mktemp("other-model"))
  training_testing.make_test_artifact(path, image_size=16, seed=1)
  return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model_dir):
  """A run over an archive of 6 images (6 masks), scored by the fake."""
  from beam_pipeline import model_handler  # pylint: disable=import-outside-toplevel
  from tests import fakes  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("first")
  archive = str(root / "a.zip")
  ids = _archive(archive, 2, seed=0)
  out = str(root / "out")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(model_handler, "keyed_handler", fakes.keyed_handler)
    manifest = pipeline.run(["run", "--input", archive, "--model", model_dir,
                             "--output", out])
  assert manifest["counts"]["predictions"] == len(ids) == 6
  assert "already_scored" not in manifest["counts"]
  assert manifest["invariant"]["rule"] == (
      "members_seen = predictions + masks_skipped + errors")
  return archive, ids, out


def test_rerun_over_grown_archive_scores_only_new_images(
    tmp_path, model_dir, first_run, fake_model):
  old_archive, old_ids, first = first_run
  new_archive = str(tmp_path / "b.zip")
  new_ids = _archive(new_archive, 1, seed=7)
  assert not new_ids & old_ids
  out = str(tmp_path / "second")
  manifest = pipeline.run([
      "run", "--input", old_archive, "--input", new_archive, "--model",
      model_dir, "--output", out, "--skip_scored", first])

  assert _scored_ids(out) == new_ids
  counts = manifest["counts"]
  assert counts["predictions"] == 3
  assert counts["already_scored"] == 6
  assert counts["masks_skipped"] == 9 and counts["errors"] == 0
  assert counts["members_seen"] == 18
  assert counts["images_written"] == 9  # the TFRecords keep every image
  assert manifest["invariant"] == {
      "rule": "members_seen = predictions + already_scored + masks_skipped"
              " + errors", "holds": True}
  assert manifest["complete"]
  (run,) = manifest["skip_scored"]["runs"]
  assert run["run_dir"] == first
  assert run["model_version"] == manifest["model_version"]
  assert manifest["skip_scored"]["globs"] == [first]
  assert_manifest_spelled_in_schemas(out)


@pytest.mark.slow
def test_score_skips_by_model_version(tmp_path, model_dir, other_model_dir,
                                      first_run, fake_model):
  """`score` over the first run's own TFRecords: the same model version
  scores nothing (an empty predictions table), another scores all."""
  _, old_ids, first = first_run
  shards = os.path.join(first, schemas.TFRECORD_DIR, "*.tfrecord.gz")
  # A glob of runs, as a scheduled job passes it.
  runs_glob = os.path.join(os.path.dirname(first), "o*")
  same = pipeline.run(["score", "--input", shards, "--model", model_dir,
                       "--output", str(tmp_path / "same"),
                       "--skip_scored", runs_glob])
  assert same["counts"]["predictions"] == 0
  assert same["counts"]["already_scored"] == 6
  assert same["invariant"]["holds"] and same["complete"]
  assert _scored_ids(str(tmp_path / "same")) == set()

  other = pipeline.run(["score", "--input", shards, "--model",
                        other_model_dir, "--output", str(tmp_path / "other"),
                        "--skip_scored", first])
  assert other["model_version"] != same["model_version"]
  assert other["counts"]["predictions"] == 6
  assert other["counts"]["already_scored"] == 0
  assert other["invariant"]["holds"]
  assert _scored_ids(str(tmp_path / "other")) == old_ids


def _fake_run(path, manifest=None, predictions=True):
  os.makedirs(os.path.join(path, schemas.PREDICTIONS_DIR), exist_ok=True)
  if manifest is not None:
    with open(os.path.join(path, schemas.MANIFEST_FILE), "w",
              encoding="utf-8") as f:
      json.dump(manifest, f)
  if predictions:
    with open(os.path.join(path, schemas.PREDICTIONS_DIR, "part-0.parquet"),
              "wb") as f:
      f.write(b"PAR1")


def test_find_runs_refuses_what_is_no_finished_scored_run(tmp_path):
  runs = tmp_path / "runs"
  _fake_run(str(runs / "good"), {"command": "run", "run_id": "r1",
                                 "model_version": "m1"})
  _fake_run(str(runs / "crashed"))
  _fake_run(str(runs / "pre"), {"command": "preprocess"}, predictions=False)
  os.makedirs(runs / "empty")
  out = str(tmp_path / "out")

  found = skip_scored.find_runs([str(runs / "go*")], out, "m1")
  assert [r.run_dir for r in found.runs] == [str(runs / "good")]
  assert found.files == (str(runs / "good" / "predictions" /
                             "part-0.parquet"),)
  for pattern, message in (
      ("nothing-*", "matches no run directory"),
      ("crashed", "is not a finished run"),
      ("pre", "holds no predictions (a preprocess run)"),
      ("empty", "holds no run"),
      ("*", "is not a finished run")):
    with pytest.raises(skip_scored.NoScoredRuns, match=re.escape(message)):
      skip_scored.find_runs([str(runs / pattern)], out)
  # This run's own output is never one of them.
  with pytest.raises(skip_scored.NoScoredRuns, match="matches no run"):
    skip_scored.find_runs([str(runs / "good")], str(runs / "good"))


def test_bad_skip_scored_is_one_line_and_exit_2(tmp_path, model_dir, capsys):
  archive = str(tmp_path / "a.zip")
  _archive(archive, 1, seed=0)
  out = tmp_path / "out"
  status = cli.main(["run", "--input", archive, "--model", model_dir,
                     "--output", str(out), "--skip_scored",
                     str(tmp_path / "no-such-run*")])
  assert status == cli.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "matches no run directory" in err
  assert not out.exists()  # refused before the output was touched
  assert cli.main(["preprocess", "--input", archive, "--output", str(out),
                   "--skip_scored", "x"]) == cli.EXIT_USAGE
  assert "does not apply to preprocess" in capsys.readouterr().err


@pytest.mark.slow
def test_skip_scored_and_compare_read_runs_on_gs(tmp_path, model_dir,
                                                first_run, fake_model,
                                                gcs_client):
  """gs:// through Beam's FileSystems, on the storage emulator: the glob
  and the predictions read of --skip_scored, and compare's copy."""
  from reporting import compare  # pylint: disable=import-outside-toplevel
  from tests.conftest import BUCKET  # pylint: disable=import-outside-toplevel
  _, _, first = first_run
  bucket = gcs_client.bucket(BUCKET)
  for sub in (schemas.PREDICTIONS_DIR, schemas.ERRORS_DIR):
    for name in os.listdir(os.path.join(first, sub)):
      bucket.blob(f"runs/first/{sub}/{name}").upload_from_filename(
          os.path.join(first, sub, name))
  bucket.blob(f"runs/first/{schemas.MANIFEST_FILE}").upload_from_filename(
      os.path.join(first, schemas.MANIFEST_FILE))
  shards = os.path.join(first, schemas.TFRECORD_DIR, "*.tfrecord.gz")
  manifest = pipeline.run([
      "score", "--input", shards, "--model", model_dir, "--output",
      str(tmp_path / "again"), "--skip_scored", f"gs://{BUCKET}/runs/f*",
      "--input", _one_new_shard(tmp_path)])  # one new image to score
  assert manifest["counts"]["already_scored"] == 6
  assert manifest["counts"]["predictions"] == 1
  assert manifest["invariant"]["holds"]
  with pytest.raises(skip_scored.NoScoredRuns, match="matches no run"):
    skip_scored.find_runs([f"gs://{BUCKET}/runs/nothing*"], str(tmp_path))

  c = compare.compare(f"gs://{BUCKET}/runs/first", first)
  assert c.overlap == compare.Overlap(both=6, only_old=0, only_new=0)
  assert c.changed == 0


def _one_new_shard(tmp_path):
  """A preprocessed TFRecord shard of one image not in the first run."""
  archive = str(tmp_path / "new.zip")
  af.write_zip(archive, af.busi_entries(1, 99, shape=SHAPE,
                                        second_mask=False)[:1])
  pipeline.run(["preprocess", "--input", archive, "--output",
                str(tmp_path / "pre"), "--image_size", "16"])
  return os.path.join(str(tmp_path / "pre"), schemas.TFRECORD_DIR,
                      "*.tfrecord.gz")
