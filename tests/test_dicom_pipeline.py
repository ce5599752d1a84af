"""DICOM archives through preprocess, run and score: every member accounted
for, frames as rows, keyed study pseudonyms, and no PHI in any output.

The DICOMs are written here with pydicom (`bench.dicom_writer`) carrying
made-up PHI in every patient, study and free-text tag; pydicom's own bundled
test corpus (inside its wheel, never downloaded) is run as found.
"""

import glob
import hashlib
import hmac
import io
import json
import os
import zipfile

import numpy as np
import pydicom
import pytest

import schemas
from beam_pipeline import pipeline
from bench import dicom_writer as dw
from busi_core import imaging, pseudonyms
from tests import archive_factory as af
from tests.pipeline_helpers import read_errors, read_records, sql

SIZE = 16  # the session model_dir's input size
KEY = "test-study-key-0123456789"
STUDY = "1.2.826.0.1.3680043.8.498.4242.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.4242.2"
SERIES = (STUDY + ".1", STUDY + ".2", OTHER_STUDY + ".1")
# Error types a DICOM member may end as (besides a prediction).
DICOM_ERRORS = {"NoPixelData", "CorruptImage", "UnsupportedTransferSyntax",
                "TooManyPixels", "UnsupportedPixelType"}


def _phi_values():
  """Every made-up PHI value the writer puts in headers, and the UIDs."""
  values = set(dw.PHI.values()) | set(dw.NESTED_PHI.values())
  values |= {STUDY, OTHER_STUDY, *SERIES}
  # A person's name as DICOM writes it and as its parts.
  for name in (v for v in list(values) if "^" in v):
    values |= {part for part in name.split("^") if len(part) > 4}
  return sorted(values)


def _scan(paths, text: str = ""):
  """(file, value) for every PHI value found in the files' bytes, their
  names, or `text`."""
  found = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    for value in _phi_values():
      for encoded in {value.encode(), value.encode("utf-16-le")}:
        if encoded in data or value in path:
          found.append((path, value))
  found += [("<log>", v) for v in _phi_values() if v in text]
  return found


def _files(*dirs):
  return [p for d in dirs for p in glob.glob(os.path.join(d, "**"),
                                            recursive=True)
          if os.path.isfile(p)]


def _grey(seed, shape=(60, 80)):
  return af.phantom(seed, size=max(shape))[:shape[0], :shape[1]]


def _members():
  """name → (bytes, expected fate): "image", "frames:N" or an error type."""
  rng = np.random.default_rng(7)
  grey = _grey(1)
  rgb = np.stack([_grey(2), _grey(3), _grey(4)], axis=-1)
  # A B-mode picture inside a canvas with a bright side panel: the region
  # sequence says where the tissue is.
  canvas = np.full((70, 100), 250, np.uint8)
  canvas[5:65, 10:90] = _grey(5)
  cine = np.stack([_grey(10 + i) for i in range(3)])
  sr = dw.no_pixel_dicom()
  full = dw.ultrasound_dicom(_grey(6), study_uid=OTHER_STUDY,
                             series_uid=SERIES[2])
  return {
      "benign/plain.png": (af.png(grey), "image"),
      "benign/plain_wrapped.dcm": (dw.wrap_png(af.png(grey),
                                               study_uid=STUDY,
                                               series_uid=SERIES[0]), "image"),
      "benign/rgb_wrapped.dcm": (dw.wrap_png(af.png(rgb[..., ::-1].copy()),
                                             study_uid=STUDY,
                                             series_uid=SERIES[0]), "image"),
      "malignant/regions.dcm": (dw.ultrasound_dicom(
          canvas, regions=[(0, 0, 99, 69, 1, 0),  # bigger, not tissue
                           (10, 5, 89, 64, 1, 1)],
          study_uid=STUDY, series_uid=SERIES[0]), "image"),
      "normal/cine.dcm": (dw.ultrasound_dicom(
          cine, frames=3, study_uid=STUDY, series_uid=SERIES[1]), "frames:3"),
      "benign/mono1.dcm": (dw.ultrasound_dicom(
          grey, photometric="MONOCHROME1", study_uid=OTHER_STUDY,
          series_uid=SERIES[2]), "image"),
      "benign/ybr422.dcm": (dw.ultrasound_dicom(
          rgb, photometric="YBR_FULL_422", study_uid=OTHER_STUDY,
          series_uid=SERIES[2]), "image"),
      "benign/palette.dcm": (dw.ultrasound_dicom(
          (grey // 64).astype(np.uint8), photometric="PALETTE COLOR",
          palette=rng.integers(0, 255, (4, 3), dtype=np.uint8),
          study_uid=OTHER_STUDY, series_uid=SERIES[2]), "image"),
      "benign/burned.dcm": (dw.ultrasound_dicom(
          grey, burned_in="YES", study_uid=OTHER_STUDY,
          series_uid=SERIES[2]), "image"),
      # No extension and no preamble: found by its content.
      "benign/bare_dataset": (dw.ultrasound_dicom(
          grey, preamble=False, study_uid=OTHER_STUDY,
          series_uid=SERIES[2]), "image"),
      "report.dcm": (sr, "NoPixelData"),
      "truncated.dcm": (full[:len(full) - 2000], "CorruptImage"),
      "video.dcm": (dw.video_dicom(), "UnsupportedTransferSyntax"),
  }


def _write_zip(path, members):
  with zipfile.ZipFile(path, "w") as z:
    for name, (data, _) in members.items():
      z.writestr(name, data)


@pytest.fixture
def dicom_zip(tmp_path):
  members = _members()
  path = str(tmp_path / "dicom.zip")
  _write_zip(path, members)
  return path, members


def _predictions(out):
  return sql(f"SELECT source, frame, study_key, series_key, region_cropped,"
             f" quality_flags, needs_review, image_id, label FROM"
             f" read_parquet('{out}/predictions/*.parquet') ORDER BY source")


def _key(uid):
  return hmac.new(KEY.encode(), uid.encode(), hashlib.sha256).hexdigest()


def test_dicom_archive_through_run(tmp_path, dicom_zip, model_dir, fake_model,
                                   monkeypatch, capfd, caplog):
  archive, members = dicom_zip
  monkeypatch.setenv(pseudonyms.KEY_ENV, KEY)
  out = str(tmp_path / "run")
  manifest = pipeline.run(["run", "--input", archive, "--model", model_dir,
                           "--output", out])

  counts = manifest["counts"]
  assert manifest["invariant"]["holds"] and manifest["complete"]
  assert counts["members_seen"] == len(members)
  assert counts["extra_frames"] == 2 and counts["frames_skipped"] == 0
  images = sum(1 for _, fate in members.values() if fate == "image") + 3
  assert counts["predictions"] == images
  errors = {e["source"].split("!/")[1]: e for e in read_errors(out)}
  assert {name: e["error_type"] for name, e in errors.items()} == {
      name: fate for name, (_, fate) in members.items()
      if fate not in ("image", "frames:3")}
  assert "MPEG-4" in errors["video.dcm"]["message"]

  rows = {r[0].split("!/")[1]: r for r in _predictions(out)}
  assert set(rows) == ({n for n, (_, f) in members.items() if f == "image"} |
                       {f"normal/cine.dcm#frame={i}" for i in (1, 2, 3)})
  # Frames: 1-based, in `frame` and in `source`; one image_id each.
  assert [rows[f"normal/cine.dcm#frame={i}"][1] for i in (1, 2, 3)] == [1, 2,
                                                                       3]
  assert len({rows[f"normal/cine.dcm#frame={i}"][7] for i in (1, 2, 3)}) == 3
  assert rows["benign/mono1.dcm"][1] is None
  assert rows["benign/plain.png"][1:5] == (None, None, None, None)
  # Keyed pseudonyms: HMAC-SHA256 of the UIDs under the key.
  assert rows["normal/cine.dcm#frame=2"][2:4] == (_key(STUDY),
                                                  _key(SERIES[1]))
  assert rows["malignant/regions.dcm"][2] == _key(STUDY)
  assert rows["benign/burned.dcm"][2:4] == (_key(OTHER_STUDY),
                                            _key(SERIES[2]))
  # Cropped to the tissue region, and only there.
  assert rows["malignant/regions.dcm"][4] is True
  assert {r[4] for n, r in rows.items() if n.endswith(".dcm")
          and n != "malignant/regions.dcm"} == {False}
  assert "burned_in_annotation" in rows["benign/burned.dcm"][5].split(",")
  assert rows["benign/burned.dcm"][6] is True
  assert rows["normal/cine.dcm#frame=1"][8] == "normal"
  assert manifest["quality_flags"].get("burned_in_annotation") == 1

  # The wrapped PNG's pixels are the PNG's.
  records = {r.source.split("!/")[1]: r for r in read_records(out)}
  assert np.array_equal(records["benign/plain_wrapped.dcm"].pixels,
                        records["benign/plain.png"].pixels)
  assert np.array_equal(
      records["benign/plain_wrapped.dcm"].pixels,
      imaging.decode_and_resize(members["benign/plain.png"][0], SIZE).pixels)

  # summary and report over the run, then the PHI scan of everything.
  from reporting import report, summary  # pylint: disable=import-outside-toplevel
  text = summary.summary(out)
  assert "studies" in text.lower()
  report_dir = str(tmp_path / "report")
  assert report.main(["--predictions", out, "--output", report_dir]) == 0
  logs = capfd.readouterr()
  assert _scan(_files(out, report_dir),
               text + logs.out + logs.err + caplog.text) == []


def test_without_a_key_the_study_columns_are_null(tmp_path, dicom_zip,
                                                  model_dir, fake_model,
                                                  monkeypatch):
  archive, _ = dicom_zip
  monkeypatch.delenv(pseudonyms.KEY_ENV, raising=False)
  out = str(tmp_path / "run")
  pipeline.run(["run", "--input", archive, "--model", model_dir, "--output",
                out])
  assert sql(f"SELECT count(study_key), count(series_key), count(frame) FROM"
             f" read_parquet('{out}/predictions/*.parquet')") == [(0, 0, 3)]


def test_key_flag_short_key_and_frame_limit(tmp_path, dicom_zip, monkeypatch):
  archive, members = dicom_zip
  monkeypatch.delenv(pseudonyms.KEY_ENV, raising=False)
  with pytest.raises(ValueError) as refused:
    pipeline.run(["preprocess", "--input", archive, "--output",
                  str(tmp_path / "short"), "--study_hmac_key", "tooshort"])
  assert "tooshort" not in str(refused.value)
  with pytest.raises(ValueError, match="max_frames_per_file"):
    pipeline.run(["preprocess", "--input", archive, "--output",
                  str(tmp_path / "zero"), "--max_frames_per_file", "0"])

  out = str(tmp_path / "pre")
  manifest = pipeline.run([
      "preprocess", "--input", archive, "--output", out, "--image_size",
      str(SIZE), "--study_hmac_key", KEY, "--max_frames_per_file", "2"])
  counts = manifest["counts"]
  assert manifest["invariant"]["holds"]
  assert (counts["extra_frames"], counts["frames_skipped"]) == (1, 1)
  frames = sorted(r.frame for r in read_records(out) if r.frame)
  assert frames == [1, 2]
  assert {r.study_key for r in read_records(out) if r.frame} == {_key(STUDY)}
  # The key given as a flag is not kept in the manifest.
  with open(os.path.join(out, schemas.MANIFEST_FILE), "rb") as f:
    assert KEY.encode() not in f.read()


@pytest.mark.slow
def test_score_carries_the_dicom_fields(tmp_path, dicom_zip, model_dir,
                                        fake_model, monkeypatch):
  archive, _ = dicom_zip
  monkeypatch.setenv(pseudonyms.KEY_ENV, KEY)
  pre = str(tmp_path / "pre")
  pipeline.run(["preprocess", "--input", archive, "--output", pre,
                "--image_size", str(SIZE)])
  out = str(tmp_path / "scored")
  manifest = pipeline.run([
      "score", "--input", os.path.join(pre, schemas.TFRECORD_DIR, "*.gz"),
      "--model", model_dir, "--output", out])
  assert manifest["invariant"]["holds"]
  rows = {r[0].split("!/")[1]: r for r in _predictions(out)}
  assert rows["normal/cine.dcm#frame=3"][1:5] == (3, _key(STUDY),
                                                  _key(SERIES[1]), False)
  assert rows["malignant/regions.dcm"][4] is True


def _corpus_files():
  folder = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
  return sorted(glob.glob(os.path.join(folder, "*.dcm")))


@pytest.mark.slow
def test_pydicom_corpus_each_file_a_prediction_or_a_named_error(
    tmp_path, model_dir, fake_model):
  files = _corpus_files()
  assert len(files) > 50, "pydicom's bundled test files are missing"
  archive = str(tmp_path / "corpus.zip")
  with zipfile.ZipFile(archive, "w") as z:
    for path in files:
      z.write(path, "pydicom/" + os.path.basename(path))
  out = str(tmp_path / "run")
  manifest = pipeline.run(["run", "--input", archive, "--model", model_dir,
                           "--output", out])
  assert manifest["invariant"]["holds"]
  fates = {}
  for (source,) in sql(f"SELECT source FROM read_parquet('{out}/predictions/"
                       "*.parquet')"):
    fates[source.split("!/pydicom/")[1].split("#")[0]] = "prediction"
  for error in read_errors(out):
    name = error["source"].split("!/pydicom/")[1].split("#")[0]
    # no_meta.dcm starts with a stray byte before its first element: pydicom
    # itself parses nothing but garbage from it, and it is no DICOM by its
    # bytes either.
    expected = DICOM_ERRORS | ({"NotAnImage"} if name == "no_meta.dcm"
                               else set())
    assert error["error_type"] in expected, error
    if error["error_type"] == "UnsupportedTransferSyntax":
      # Names the syntax and what would read it.
      assert "(1.2.840.10008." in error["message"], error
      assert "needs" in error["message"] or "no " in error["message"], error
    fates.setdefault(name, error["error_type"])
  assert sorted(fates) == sorted(os.path.basename(p) for p in files)
  # Files the corpus documents as what they are.
  assert fates["MR_small.dcm"] == "prediction"
  assert fates["JPEG2000.dcm"] == "prediction"
  assert fates["SC_rgb_jpeg_gdcm.dcm"] == "prediction"
  assert fates["MR_small_jpeg_ls_lossless.dcm"] == "prediction"
  assert fates["rtplan.dcm"] == "NoPixelData"
  assert fates["test-SR.dcm"] == "NoPixelData"
  assert fates["MR_truncated.dcm"] == "CorruptImage"
  assert fates["no_meta.dcm"] == "NotAnImage"
  print(json.dumps(fates, indent=1, sort_keys=True))


@pytest.mark.slow
def test_real_model_gradcam_and_report_carry_no_phi(tmp_path, monkeypatch,
                                                    capfd, caplog):
  """The real (tiny) Keras model with an OOD detector, Grad-CAM for every
  image and a tar.gz: every file written, and the logs, free of PHI."""
  from reporting import report, summary  # pylint: disable=import-outside-toplevel
  from training import testing as training_testing  # pylint: disable=import-outside-toplevel
  model = str(tmp_path / "model")
  rng = np.random.default_rng(0)
  training_testing.make_test_artifact(
      model, image_size=SIZE,
      ood_images=rng.integers(0, 255, (20, SIZE, SIZE, 3), dtype=np.uint8))
  members = _members()
  archive = str(tmp_path / "dicom.tar.gz")
  entries = [af.Entry(name, data, "image") for name, (data, _) in
             members.items()]
  af.write_tar(archive, entries, gz=True)
  monkeypatch.setenv(pseudonyms.KEY_ENV, KEY)
  out = str(tmp_path / "run")
  manifest = pipeline.run(["run", "--input", archive, "--model", model,
                           "--output", out, "--gradcam", "all"])
  assert manifest["invariant"]["holds"]
  assert manifest["counts"]["extra_frames"] == 2
  images = sum(1 for _, fate in members.values() if fate == "image") + 3
  assert manifest["counts"]["predictions"] == images
  (cams,) = sql(f"SELECT count(gradcam_uri) FROM read_parquet('{out}/"
                "predictions/*.parquet')")[0]
  assert cams == images
  text = summary.summary(out)
  report_dir = str(tmp_path / "report")
  assert report.main(["--predictions", out, "--output", report_dir]) == 0
  logs = capfd.readouterr()
  assert _scan(_files(out, report_dir),
               text + logs.out + logs.err + caplog.text) == []
