"""Broken and hostile inputs, crashes and reruns: nothing lost, nothing unsafe."""

import glob
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from beam_pipeline import pipeline
from busi_core import archives, imaging
from beam_pipeline.preprocess import DecodeMember
from tests import archive_factory as af
from tests import torture
from tests.pipeline_helpers import read_errors, read_records, sql
from training import testing as training_testing
from busi_core.errors import MemberError

SIZE = 16


@pytest.fixture(scope="module")
def torture_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("torture")
  (d / "hostile.zip").write_bytes(torture.hostile_zip())
  (d / "links.tar").write_bytes(torture.links_tar())
  for archive in torture.broken_archives():
    (d / archive.name).write_bytes(archive.data)
  return d


def _check_fates(d, examples_sources, errors, manifest):
  """Every torture member ends where the issue says it must."""
  by_source = {e["source"]: e for e in errors}
  zip_uri = str(d / "hostile.zip")
  for entry in torture.image_entries():
    source = archives.member_source(zip_uri, entry.path)
    if entry.fate == "image":
      assert source in examples_sources, entry.path
    elif entry.fate == "error":
      assert by_source[source]["error_type"] == entry.error_type, entry.path
  for path, kind in torture.HOSTILE_ZIP_ERRORS.items():
    assert by_source[archives.member_source(zip_uri, path)][
        "error_type"] == kind
  tar_uri = str(d / "links.tar")
  assert archives.member_source(tar_uri, "normal/real.png") in examples_sources
  for name in ("link.png", "hard.png", "dev.png"):
    assert by_source[archives.member_source(tar_uri, f"normal/{name}")][
        "error_type"] == "NotARegularFile"
  for archive in torture.broken_archives():
    for name, kind in archive.archive_errors:
      assert by_source[str(d / name)]["error_type"] == kind, name
  counts = manifest["counts"]
  assert manifest["invariant"]["holds"], counts
  assert counts["errors"] == len(errors)
  # Nothing from a member name became a path we wrote to.
  assert not os.path.exists("/etc/escape.png")


def test_torture_set_through_preprocess(tmp_path, torture_dir):
  out = str(tmp_path / "out")
  manifest = pipeline.run(["preprocess", "--input", str(torture_dir / "*"),
                           "--output", out, "--image_size", str(SIZE)])
  records = read_records(out)
  errors = read_errors(out)
  _check_fates(torture_dir, {r.source for r in records}, errors, manifest)
  assert manifest["counts"]["images_written"] == len(records)
  by_path = {r.source.rsplit("!/", 1)[-1]: r for r in records}
  # Duplicates: one row per member, the same image_id.
  assert by_path["normal/dup (1).png"].image_id == by_path[
      "benign/dup copy.png"].image_id
  # EXIF orientation is not applied: pixels as stored.
  exif = [e for e in torture.image_entries()
          if e.path.endswith("exif_rotated.jpg")][0]
  np.testing.assert_array_equal(by_path[exif.path].pixels,
                                af.expected_pixels(exif.data, SIZE))
  assert by_path["malignant/ünïcødé scan (1).png"].label == "malignant"
  assert sorted(os.listdir(out)) == ["errors", "manifest.json", "tfrecords"]


@pytest.mark.slow
def test_torture_set_through_run(tmp_path, torture_dir, model_dir,
                                 fake_model):
  out = str(tmp_path / "out")
  manifest = pipeline.run(["run", "--input", str(torture_dir / "*"),
                           "--model", model_dir, "--output", out])
  sources = {row[0] for row in sql(
      f"SELECT source FROM read_parquet('{out}/predictions/*.parquet')")}
  _check_fates(torture_dir, sources, read_errors(out), manifest)
  assert manifest["counts"]["predictions"] == len(sources)
  # The duplicated bytes: two rows (two sources), one image_id.
  assert sql(f"SELECT count(*) FROM read_parquet('{out}/predictions/*.parquet')"
             " GROUP BY image_id HAVING count(*) > 1") == [(2,)]


@pytest.mark.slow
def test_broken_tfrecord_files_through_score(tmp_path, model_dir,
                                             fake_model):
  rng = np.random.default_rng(0)
  records = [training_testing.make_record(af.speckle(rng, SIZE, SIZE, 3),
                                          "benign") for _ in range(5)]
  good = training_testing.write_tfrecords(
      str(tmp_path / "in" / "good.tfrecord.gz"), records)
  data = open(good, "rb").read()
  (tmp_path / "in" / "truncated.tfrecord.gz").write_bytes(
      data[:len(data) // 2])
  (tmp_path / "in" / "garbage.tfrecord.gz").write_bytes(b"not gzip at all")
  out = str(tmp_path / "out")
  manifest = pipeline.run(["score", "--input", str(tmp_path / "in" / "*"),
                           "--model", model_dir, "--output", out])
  errors = read_errors(out)
  assert {(os.path.basename(e["source"]).split("#")[0], e["error_type"])
          for e in errors} == {("truncated.tfrecord.gz", "BadTFRecordFile"),
                               ("garbage.tfrecord.gz", "BadTFRecordFile")}
  assert manifest["invariant"]["holds"]
  assert manifest["counts"]["predictions"] >= 5
  # Both broken files lost records nobody can count: the run says so.
  assert manifest["counts"][schemas.COUNT_SHARDS_UNREAD] == 2
  assert not manifest["complete"]


@pytest.mark.slow
def test_size_and_count_limits_are_flags(tmp_path):
  rng = np.random.default_rng(1)
  entries = [af.Entry(f"benign/{i}.png", af.png(af.speckle(rng, 60, 60)),
                      "image", "benign") for i in range(3)]
  af.write_zip(str(tmp_path / "a.zip"), entries)
  out = str(tmp_path / "o1")
  manifest = pipeline.run(["preprocess", "--input", str(tmp_path / "a.zip"),
                           "--output", out, "--max_member_bytes", "1000"])
  assert {e["error_type"] for e in read_errors(out)} == {"MemberTooLarge"}
  assert manifest["counts"]["errors"] == 3
  out = str(tmp_path / "o2")
  pipeline.run(["preprocess", "--input", str(tmp_path / "a.zip"), "--output",
                out, "--max_members_per_archive", "2"])
  assert [e["error_type"] for e in read_errors(out)] == ["TooManyMembers"]
  out = str(tmp_path / "o3")
  pipeline.run(["preprocess", "--input", str(tmp_path / "a.zip"), "--output",
                out, "--max_pixels", "100"])
  assert {e["error_type"] for e in read_errors(out)} == {"TooManyPixels"}


# --- property-based: random and mutated bytes never escape as exceptions ---

_SEEDS = [af.png(np.random.default_rng(0).integers(0, 255, (12, 10),
                                                    dtype=np.uint8)),
          af.jpeg(np.random.default_rng(1).integers(0, 255, (12, 10, 3),
                                                     dtype=np.uint8))]


def _mutate(data: bytes, positions, values, cut) -> bytes:
  buf = bytearray(data)
  for pos, val in zip(positions, values):
    buf[pos % len(buf)] = val
  return bytes(buf[:max(0, len(buf) - cut)])


mutations = st.builds(
    _mutate, st.sampled_from(_SEEDS),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.lists(st.integers(0, 255), max_size=8), st.integers(0, 200))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), mutations))
def test_decoder_only_raises_decode_errors(data):
  try:
    decoded = imaging.decode_and_resize(data, 8)
  except MemberError:
    return
  assert decoded.pixels.shape == (8, 8, 3)
  assert decoded.pixels.dtype == np.uint8


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), mutations))
def test_decode_step_gives_exactly_one_outcome(data):
  dofn = DecodeMember(8, imaging.DEFAULT_MAX_PIXELS, "run-h")
  member = archives.Member("x.zip!/benign/a.png", "benign/a.png", "file",
                           data=data)
  assert len(list(dofn.process(member))) == 1


def _zip_of_seeds() -> bytes:
  return torture._zip_bytes([af.Entry(f"benign/{i}.png", d, "image")
                             for i, d in enumerate(_SEEDS * 2)])


archive_bytes = st.one_of(
    st.binary(max_size=2000),
    st.builds(_mutate, st.just(_zip_of_seeds()),
              st.lists(st.integers(0, 100_000), max_size=12),
              st.lists(st.integers(0, 255), max_size=12),
              st.integers(0, 400)),
    st.builds(_mutate, st.just(torture._targz_bytes(
        [af.Entry("a.png", _SEEDS[0], "image")])),
              st.lists(st.integers(0, 100_000), max_size=12),
              st.lists(st.integers(0, 255), max_size=12),
              st.integers(0, 100)))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(archive_bytes)
def test_archive_readers_never_raise(tmp_path, data):
  limits = archives.Limits()
  zip_path = tmp_path / "fuzz.zip"
  zip_path.write_bytes(data)
  try:
    count = archives.count_zip_members(str(zip_path))
  except MemberError:
    count = 0
  if count:
    members = list(archives.read_zip_range(
        archives.ZipRange(str(zip_path), 0, count), limits))
    assert len(members) == count
  tar_path = tmp_path / "fuzz.tar.gz"
  tar_path.write_bytes(data)
  for member in archives.read_tar(str(tar_path), limits):
    assert member.kind in ("file", "dir", "mask", "error")


# --- faults and reruns ---

@pytest.mark.slow
def test_killed_run_leaves_nothing_readable_and_rerun_completes(
    tmp_path, model_dir):
  rng = np.random.default_rng(3)
  entries = [af.Entry(f"benign/{i}.png", af.png(af.speckle(rng, 200, 200)),
                      "image", "benign") for i in range(120)]
  archive = str(tmp_path / "big.zip")
  af.write_zip(archive, entries)
  out = str(tmp_path / "out")
  argv = [sys.executable, "-m", "beam_pipeline", "run", "--input", archive,
          "--model", model_dir, "--output", out]
  env = dict(os.environ)
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  # Kill while Beam is writing: its temporary folders are there.
  leftovers = os.path.join(out, "*", "beam-temp-*")
  deadline = time.time() + 240
  while not glob.glob(leftovers):
    assert proc.poll() is None, "the run ended before it began writing"
    assert time.time() < deadline, "the run never began writing"
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  # Killed mid-run, not after: no manifest (else nothing was tested).
  assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
  assert glob.glob(leftovers)
  # A SQL reader sees no partial predictions: none, or all of them.
  pattern = os.path.join(out, schemas.PREDICTIONS_DIR, "*.parquet")
  assert glob.glob(pattern) == [] or sql(
      f"SELECT count(*) FROM read_parquet('{pattern}')")[0][0] == 120
  # The same command again completes, and keeps nothing of the killed run.
  rerun = subprocess.run(argv, env=env, capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert glob.glob(os.path.join(out, "**", "beam-temp-*"),
                   recursive=True) == []
  manifest = json.load(open(os.path.join(out, schemas.MANIFEST_FILE)))
  assert manifest["counts"]["predictions"] == 120
  rows = sql(f"SELECT count(*), count(DISTINCT source), count(DISTINCT run_id)"
             f" FROM read_parquet('{out}/predictions/*.parquet')")
  assert rows == [(120, 120, 1)]


def test_unsafe_or_broken_artifacts_fail_before_reading(tmp_path, model_dir):
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, [af.Entry("benign/a.png", af.png(
      np.zeros((8, 8), np.uint8)), "image", "benign")])
  # A model with a Lambda layer, dressed as an artifact.
  inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
  x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(3, activation="softmax")(x)
  lam = tmp_path / "lambda_model"
  lam.mkdir()
  keras.Model(inputs, outputs).save(str(lam / schemas.MODEL_FILE))
  for name in (schemas.LABELS_FILE, schemas.METADATA_FILE):
    (lam / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
  with pytest.raises(ValueError, match="Lambda|safe mode"):
    pipeline.run(["run", "--input", archive, "--model", str(lam),
                  "--output", str(tmp_path / "o1")])
  # Corrupt model file.
  bad = tmp_path / "corrupt"
  bad.mkdir()
  for name in (schemas.LABELS_FILE, schemas.METADATA_FILE):
    (bad / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
  (bad / schemas.MODEL_FILE).write_bytes(b"not a keras file")
  with pytest.raises(ValueError, match="model.keras|Keras"):
    pipeline.run(["run", "--input", archive, "--model", str(bad),
                  "--output", str(tmp_path / "o2")])
  # Format version from the future.
  meta = json.load(open(os.path.join(model_dir, schemas.METADATA_FILE)))
  meta["format_version"] = "999"
  future = tmp_path / "future"
  future.mkdir()
  for name in (schemas.LABELS_FILE, schemas.MODEL_FILE):
    (future / name).write_bytes(open(os.path.join(model_dir, name),
                                     "rb").read())
  (future / schemas.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="format"):
    pipeline.run(["run", "--input", archive, "--model", str(future),
                  "--output", str(tmp_path / "o3")])
  for name in ("o1", "o2", "o3"):
    assert not os.path.exists(tmp_path / name)


def test_tar_names_that_are_not_utf8_or_huge(tmp_path):
  png = af.png(np.full((6, 6), 9, np.uint8))
  path = tmp_path / "odd.tar"
  with tarfile.open(path, "w", format=tarfile.GNU_FORMAT,
                    encoding="latin-1") as tf:
    info = tarfile.TarInfo("benign/caf\xe9.png")  # latin-1 bytes on disk
    info.size = len(png)
    tf.addfile(info, io.BytesIO(png))
  bomb = tmp_path / "longname.tar"
  with tarfile.open(bomb, "w", format=tarfile.GNU_FORMAT) as tf:
    info = tarfile.TarInfo("benign/" + "x" * 200_000 + ".png")
    info.size = len(png)
    tf.addfile(info, io.BytesIO(png))
  out = str(tmp_path / "out")
  manifest = pipeline.run(["preprocess", "--input", str(path), "--input",
                           str(bomb), "--output", out, "--image_size", "8"])
  assert manifest["invariant"]["holds"]
  (record,) = read_records(out)
  assert record.source.endswith("benign/caf\\xe9.png")
  assert record.label == "benign"
  (error,) = read_errors(out)
  assert error["source"] == str(bomb) and "extended tar header" in (
      error["message"])


def test_score_refuses_to_replace_its_own_input(tmp_path, model_dir):
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = str(tmp_path / "d")
  pipeline.run(["preprocess", "--input", archive, "--output", out,
                "--image_size", str(SIZE)])
  with pytest.raises(ValueError, match="lies in"):
    pipeline.run(["score", "--input", f"{out}/tfrecords/*.tfrecord.gz",
                  "--model", model_dir, "--output", out, "--overwrite"])
  assert len(read_records(out)) == 3


def test_non_finite_model_output_is_an_error_not_a_prediction():
  from apache_beam.ml.inference.base import PredictionResult
  from beam_pipeline import scoring
  from beam_pipeline.scoring_pipeline import _to_row
  from busi_core.inference import ModelOutput
  config = scoring.ScoringConfig(tuple(schemas.LABELS), 0.9, "m", "r", SIZE)
  key = scoring.RowKey("a" * 64, "x.zip!/a.png", "")
  def result(probabilities, ood_score=None):
    return PredictionResult(None, ModelOutput(np.array(probabilities),
                                              ood_score))

  (out,) = list(_to_row((key, result([np.nan, np.nan, np.nan])), config,
                        "none"))
  assert out.tag == "errors" and out.value["error_type"] == "NonFiniteOutput"
  (out,) = list(_to_row((key, result([0.1, 0.2, 0.7], np.inf)), config,
                        "none"))
  assert out.tag == "errors" and out.value["error_type"] == "NonFiniteOutput"
  (row,) = list(_to_row((key, result([0.1, 0.2, 0.7])), config, "none"))
  assert row["predicted_class"] == "malignant"


def test_output_guard_compares_locations_not_spellings(tmp_path, model_dir,
                                                       monkeypatch):
  from beam_pipeline import outputs  # pylint: disable=import-outside-toplevel
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  monkeypatch.chdir(tmp_path)
  pipeline.run(["preprocess", "--input", archive, "--output", "o",
                "--image_size", str(SIZE)])
  os.symlink(str(tmp_path / "o"), str(tmp_path / "link"))
  for spelling in ("./o", "o//", str(tmp_path / "o"), "link", "x/../o"):
    with pytest.raises(ValueError, match="lies in"):
      pipeline.run(["score", "--input", "o/tfrecords/*.tfrecord.gz",
                    "--model", model_dir, "--output", spelling,
                    "--overwrite"])
  assert len(read_records(str(tmp_path / "o"))) == 3
  assert outputs.location("gs://b//o/./tfrecords/") == "gs://b/o/tfrecords"
  assert outputs.location("gs://b/o/x/../tfrecords") == "gs://b/o/tfrecords"


def test_special_files_matched_by_a_glob_are_error_rows_not_hangs(tmp_path):
  folder = tmp_path / "in"
  folder.mkdir()
  af.write_zip(str(folder / "a.zip"), af.busi_entries(1))
  os.mkfifo(str(folder / "pipe.png"))  # opening it would block forever
  os.symlink(str(folder / "gone.png"), str(folder / "dangling.png"))

  def hung(signum, frame):
    raise TimeoutError("preprocess hung on a special file")

  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(120)
  try:
    out = str(tmp_path / "out")
    manifest = pipeline.run(["preprocess", "--input", str(folder / "*"),
                             "--output", out, "--image_size", "8"])
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  assert manifest["invariant"]["holds"]
  errors = {os.path.basename(e["source"]): e for e in read_errors(out)}
  assert errors["pipe.png"]["error_type"] == "NotARegularFile"
  assert "FIFO" in errors["pipe.png"]["message"]
  assert len(read_records(out)) == 3  # the zip's images still made it


def test_zip_member_with_an_empty_name_is_an_error_record(tmp_path):
  """A damaged central directory can name a member ""; zipfile's is_dir()
  then raises IndexError. The member becomes an error record instead
  (found by the fuzz test above)."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as zf:
    zf.writestr("a", b"x")
  data = bytearray(buffer.getvalue())
  central = data.index(b"PK\x01\x02")
  # Name length 0 and extra length 1: the name's byte is read as an extra.
  struct.pack_into("<HH", data, central + 28, 0, 1)
  path = tmp_path / "nameless.zip"
  path.write_bytes(bytes(data))
  assert archives.count_zip_members(str(path)) == 1
  members = list(archives.read_zip_range(
      archives.ZipRange(str(path), 0, 1), archives.Limits()))
  assert [(m.kind, m.error.kind) for m in members] == [("error",
                                                        "BadMember")]
  assert "empty name" in str(members[0].error)
