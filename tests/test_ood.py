"""The out-of-distribution detector: fitting, the artifact file, scoring's
one forward pass, and what it flags with a tiny model."""

import io
import json
import os
import shutil

import cv2
import numpy as np
import pytest

import schemas
from busi_core import artifact, imaging, inference, ood
from training import phantoms, testing

SIZE = 64


def _reference_shrinkage(x: np.ndarray) -> float:
  """Ledoit and Wolf's (2004) shrinkage intensity, written out from the
  paper's definitions (Lemma 3.2, 3.3), not from busi_core's algebra."""
  n, p = x.shape
  x = x - x.mean(axis=0)
  s = x.T @ x / n
  mu = np.trace(s) / p
  d2 = np.sum((s - mu * np.eye(p)) ** 2) / p
  b2 = sum(np.sum((np.outer(row, row) - s) ** 2) / p for row in x) / n ** 2
  return min(b2, d2) / d2


@pytest.mark.parametrize("n, p", [(40, 10), (25, 60), (500, 8)])
def test_ledoit_wolf_matches_the_papers_formula(n, p):
  rng = np.random.default_rng(n + p)
  x = rng.normal(size=(n, p)) * np.linspace(0.5, 3.0, p)
  covariance, shrinkage = ood.ledoit_wolf(x)
  assert shrinkage == pytest.approx(_reference_shrinkage(x), rel=1e-9)
  assert 0.0 <= shrinkage <= 1.0
  np.testing.assert_allclose(covariance, covariance.T)
  # Positive definite even with fewer rows than dimensions.
  assert np.linalg.eigvalsh(covariance).min() > 0


def test_mahalanobis_of_gaussian_data():
  rng = np.random.default_rng(0)
  p = 6
  mixing = rng.normal(size=(p, p))
  x = rng.normal(size=(20000, p)) @ mixing
  model, shrinkage = ood.fit(x, schemas.OOD_TRANSFORM_NONE)
  assert shrinkage < 0.01  # plenty of data: hardly any shrinkage
  fresh = rng.normal(size=(4000, p)) @ mixing
  squared = ood.scores(model, fresh) ** 2
  # Squared Mahalanobis distances of Gaussian data are chi-squared(p).
  assert squared.mean() == pytest.approx(p, rel=0.05)
  far = ood.scores(model, fresh[:10] + 20 * mixing[0])
  assert far.min() > np.quantile(np.sqrt(squared), 0.999)


def test_threshold_lets_the_pass_rate_through():
  scores = np.arange(1, 201, dtype=np.float64)
  threshold = ood.choose_threshold(scores, 0.99)
  assert np.mean(scores <= threshold) >= 0.99
  assert threshold in scores
  assert ood.choose_threshold(scores, 1.0) == 200
  with pytest.raises(ValueError, match="no validation"):
    ood.choose_threshold([], 0.99)
  with pytest.raises(ValueError, match="outside"):
    ood.choose_threshold(scores, 0.0)


@pytest.mark.parametrize("transform", schemas.OOD_TRANSFORMS)
def test_file_round_trip(transform):
  rng = np.random.default_rng(1)
  model, _ = ood.fit(rng.random((30, 5)), transform)
  model = model._replace(threshold=3.5)
  data = ood.to_bytes(model)
  back = ood.from_bytes(data, transform=transform, threshold=3.5, dims=5,
                        sha256=ood.sha256_bytes(data))
  np.testing.assert_array_equal(back.mean, model.mean)
  np.testing.assert_array_equal(back.precision, model.precision)
  assert (back.transform, back.threshold) == (transform, 3.5)
  features = rng.random((4, 5))
  np.testing.assert_array_equal(ood.scores(back, features),
                                ood.scores(model, features))


def _npz(**arrays) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


@pytest.mark.parametrize("data, match", [
    (_npz(mean=np.zeros(3), precision=np.eye(3)), "shapes"),
    (_npz(mean=np.zeros(4)), "not a detector file"),
    (_npz(mean=np.array([0, 0, 0, None]), precision=np.eye(4)),
     "not a detector file"),  # an object array needs pickle: refused
    (_npz(mean=np.array([0, 0, 0, np.nan]), precision=np.eye(4)),
     "non-finite"),
    (b"PK\x03\x04 not really", "not a detector file"),
])
def test_malformed_files_refused(data, match):
  with pytest.raises(ood.OodError, match=match):
    ood.from_bytes(data, transform=schemas.OOD_TRANSFORM_NONE, threshold=1.0,
                   dims=4, sha256=ood.sha256_bytes(data))


def test_another_file_than_described_refused():
  data = _npz(mean=np.zeros(4), precision=np.eye(4))
  with pytest.raises(ood.OodError, match="sha256"):
    ood.from_bytes(data, transform=schemas.OOD_TRANSFORM_NONE, threshold=1.0,
                   dims=4, sha256="0" * 64)


# The tiny model's world: grey B-mode phantoms, decoded as the pipeline does.
def _decoded(image: np.ndarray) -> np.ndarray:
  ok, png = cv2.imencode(".png", image)
  assert ok
  return imaging.decode_and_resize(png.tobytes(), SIZE).pixels


def _phantoms(count: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.stack([
      _decoded(phantoms.render_phantom(schemas.LABELS[i % 3], rng, 160)[0])
      for i in range(count)])


def _text_page(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  page = np.full((200, 160), 255, np.uint8)
  for row in range(12, 200, 16):
    words = "".join(rng.choice(list("abcdefghij klmnopqrstuvwxyz"), 14))
    cv2.putText(page, words, (6, row), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
  return page


def _colour_pattern(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  hue = (np.add.outer(np.arange(160), np.arange(160)) * rng.uniform(0.5, 2)
         % 180).astype(np.uint8)
  hsv = np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 230)], -1)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _not_ultrasound() -> dict:
  rng = np.random.default_rng(7)
  return {
      "noise": [_decoded(rng.integers(0, 256, (160, 160), dtype=np.uint8))
                for _ in range(3)],
      "flat": [_decoded(np.full((160, 160), v, np.uint8))
               for v in (0, 128, 255)],
      "colour": [_decoded(_colour_pattern(s)) for s in range(3)],
      "text": [_decoded(_text_page(s)) for s in range(3)],
  }


@pytest.fixture(name="ood_model_dir", scope="module")
def fixture_ood_model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ood_model"))
  testing.make_test_artifact(path, image_size=SIZE,
                             ood_images=_phantoms(120, seed=0))
  return path


def test_artifact_round_trips_the_detector(ood_model_dir):
  loaded = artifact.load_artifact(ood_model_dir)
  block = loaded.metadata.ood
  assert loaded.ood is not None and block.file == schemas.OOD_FILE
  assert loaded.ood.threshold == block.threshold > 0
  assert loaded.ood.dims == block.dims == int(
      loaded.model.get_layer(schemas.FEATURES_LAYER).output.shape[-1])
  with open(os.path.join(ood_model_dir, schemas.OOD_FILE), "rb") as f:
    assert ood.sha256_bytes(f.read()) == block.sha256
  with open(os.path.join(ood_model_dir, schemas.MODEL_CARD_FILE)) as f:
    card = f.read()
  assert "Out-of-distribution" in card and f"{block.threshold:.3f}" in card


def test_one_forward_pass_gives_probabilities_and_scores(ood_model_dir):
  loaded = artifact.load_artifact(ood_model_dir)
  images = _phantoms(5, seed=3)
  outputs = inference.predict(
      inference.scoring_model(loaded.model, loaded.ood), images)
  np.testing.assert_allclose([o.probabilities for o in outputs],
                             loaded.model.predict(images, verbose=0),
                             atol=1e-6)
  from training import model as model_lib  # pylint: disable=import-outside-toplevel
  features = model_lib.sub_model(loaded.model, None,
                                 schemas.FEATURES_LAYER)(images)
  np.testing.assert_allclose([o.ood_score for o in outputs],
                             ood.scores(loaded.ood, np.asarray(features)),
                             rtol=1e-5)


def test_artifact_without_detector_scores_none(model_dir):
  loaded = artifact.load_artifact(model_dir)
  assert loaded.ood is None and loaded.metadata.ood is None
  size = loaded.metadata.image_size
  outputs = inference.predict(inference.scoring_model(loaded.model, None),
                              np.zeros((2, size, size, 3), np.uint8))
  assert [o.ood_score for o in outputs] == [None, None]
  with open(os.path.join(model_dir, schemas.MODEL_CARD_FILE)) as f:
    assert "no out-of-distribution detector" in f.read().lower()


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_replaced_or_missing_detector_refused(tmp_path, ood_model_dir):
  replaced = _copy(ood_model_dir, tmp_path / "replaced")
  loaded = artifact.load_artifact(replaced)
  with open(os.path.join(replaced, schemas.OOD_FILE), "wb") as f:
    f.write(ood.to_bytes(loaded.ood._replace(mean=loaded.ood.mean + 1)))
  with pytest.raises(artifact.ArtifactError, match="replaced after training"):
    artifact.load_artifact(replaced)
  missing = _copy(ood_model_dir, tmp_path / "missing")
  os.remove(os.path.join(missing, schemas.OOD_FILE))
  with pytest.raises(artifact.ArtifactError, match="cannot read"):
    artifact.load_artifact(missing)
  # The block names what scoring needs; one without a threshold is refused
  # up front, without loading the model.
  broken = _copy(ood_model_dir, tmp_path / "broken")
  path = os.path.join(broken, schemas.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  del metadata["ood"]["threshold"]
  with open(path, "w") as f:
    json.dump(metadata, f)
  with pytest.raises(artifact.ArtifactError, match="lacks threshold"):
    artifact.read_artifact_info(broken)


def test_phantoms_pass_and_other_images_are_flagged(ood_model_dir):
  loaded = artifact.load_artifact(ood_model_dir)
  model = inference.scoring_model(loaded.model, loaded.ood)
  # New phantoms (other seeds than the fit's): the same distribution.
  fresh = [o.ood_score for o in inference.predict(model,
                                                  _phantoms(40, seed=11))]
  assert np.mean(np.array(fresh) > loaded.ood.threshold) <= 0.1
  for kind, images in _not_ultrasound().items():
    scores = [o.ood_score for o in inference.predict(model, np.stack(images))]
    assert min(scores) > loaded.ood.threshold, (kind, scores)


def test_evaluate_reports_flagged_and_caught(tmp_path, ood_model_dir, capsys):
  from training import cli, evaluate  # pylint: disable=import-outside-toplevel
  labelled = [testing.make_record(image, schemas.LABELS[i % 3])
              for i, image in enumerate(_phantoms(12, seed=21))]
  others = [testing.make_record(image, "")
            for images in _not_ultrasound().values() for image in images]
  data = testing.write_tfrecords(str(tmp_path / "busi" / "p.tfrecord.gz"),
                                 labelled)
  other = testing.write_tfrecords(str(tmp_path / "other" / "o.tfrecord.gz"),
                                  others)
  report_dir = str(tmp_path / "report")
  assert cli.main(["evaluate", "--model", ood_model_dir, "--data", data,
                   "--ood", other, "--output", report_dir]) == 0
  out = capsys.readouterr().out
  with open(os.path.join(report_dir, evaluate.REPORT_FILE)) as f:
    report = json.load(f)
  assert report["ood"]["count"] == 12 and report["ood"]["flagged"] <= 2
  # Each image's score and flag, as scoring gives them.
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from schemas import evaluation as evaluation_schema  # pylint: disable=import-outside-toplevel
  rows = pq.read_table(os.path.join(report_dir,
                                    evaluation_schema.PREDICTIONS_FILE)
                      ).to_pylist()
  loaded = artifact.load_artifact(ood_model_dir)
  expected = inference.predict(
      inference.scoring_model(loaded.model, loaded.ood),
      np.stack([r.pixels for r in labelled]))
  by_id = {r["image_id"]: r for r in rows}
  for record, output in zip(labelled, expected):
    row = by_id[record.image_id]
    assert row[schemas.COLUMN_OOD_SCORE] == pytest.approx(output.ood_score,
                                                          rel=1e-5)
    assert row[schemas.COLUMN_OUT_OF_DISTRIBUTION] == (
        row[schemas.COLUMN_OOD_SCORE] > loaded.ood.threshold)
  assert sum(r[schemas.COLUMN_OUT_OF_DISTRIBUTION] for r in rows) == report[
      "ood"]["flagged"]
  archive = report["ood_archive"]
  assert (archive["count"], archive["caught"]) == (len(others), len(others))
  assert archive["missed"] == []
  assert f"OOD archive: {len(others)} of {len(others)} images caught" in out
  # An artifact without a detector cannot answer --ood.
  plain = str(tmp_path / "plain")
  testing.make_test_artifact(plain, image_size=SIZE)
  assert cli.main(["evaluate", "--model", plain, "--data", data, "--ood",
                   other, "--output", str(tmp_path / "plain_report")]) == 2
  assert "has no out-of-distribution detector" in capsys.readouterr().err


def _png(image: np.ndarray) -> bytes:
  ok, png = cv2.imencode(".png", image)
  assert ok
  return png.tobytes()


def test_pipeline_writes_the_columns_and_counts(tmp_path, ood_model_dir):
  """`run` through the real artifact handler: OOD members flagged, phantoms
  not, needs_review and the manifest counts agree with the rows; an artifact
  without a detector scores the same images with null OOD columns."""
  import zipfile  # pylint: disable=import-outside-toplevel
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  from tests.pipeline_helpers import sql  # pylint: disable=import-outside-toplevel
  archive = str(tmp_path / "mixed.zip")
  rng = np.random.default_rng(5)
  with zipfile.ZipFile(archive, "w") as zf:
    for i in range(12):
      label = schemas.LABELS[i % 3]
      image = phantoms.render_phantom(label, rng, 160)[0]
      zf.writestr(f"Dataset_BUSI_with_GT/{label}/{label} ({i}).png",
                  _png(image))
    zf.writestr("other/noise.png", _png(
        rng.integers(0, 256, (160, 160), dtype=np.uint8)))
    zf.writestr("other/page.png", _png(_text_page(1)))
    zf.writestr("other/stripes.png", _png(_colour_pattern(2)))
  out = str(tmp_path / "out")
  manifest = pipeline.run(["run", "--input", archive, "--model",
                           ood_model_dir, "--output", out])
  pattern = f"{out}/{schemas.PREDICTIONS_DIR}/*.parquet"
  rows = dict(sql(
      "SELECT split_part(source, '!/', 2), out_of_distribution FROM"
      f" read_parquet('{pattern}')"))
  assert len(rows) == 15
  assert all(rows[f"other/{name}.png"] for name in ("noise", "page",
                                                    "stripes"))
  assert sum(bool(v) for k, v in rows.items()
             if not k.startswith("other/")) <= 1
  (bad_review, ood, review, nulls) = sql(
      "SELECT count(*) FILTER (WHERE needs_review IS DISTINCT FROM"
      " (low_confidence OR coalesce(out_of_distribution, false) OR"
      "  coalesce(quality_flags, '') <> '')),"
      " count(*) FILTER (WHERE out_of_distribution),"
      " count(*) FILTER (WHERE needs_review), count(*) FILTER (WHERE"
      f" ood_score IS NULL) FROM read_parquet('{pattern}')")[0]
  assert bad_review == 0 and nulls == 0
  counts = manifest["counts"]
  assert (counts["out_of_distribution"], counts["needs_review"]) == (
      ood, review)
  assert manifest["ood_threshold"] == artifact.load_artifact(
      ood_model_dir).ood.threshold
  # The quality flags preprocessing found travel into the same rows.
  flags = dict(sql("SELECT split_part(source, '!/', 2), quality_flags FROM"
                   f" read_parquet('{pattern}')"))
  assert "colour" in flags["other/stripes.png"].split(",")
  assert {v for k, v in flags.items() if not k.startswith("other/")} == {""}
  assert manifest["quality_flags"]["colour"] == sum(
      "colour" in v.split(",") for v in flags.values())
  # The same TFRecords scored by an artifact without a detector.
  plain = str(tmp_path / "plain")
  testing.make_test_artifact(plain, image_size=SIZE)
  rescored = str(tmp_path / "rescored")
  manifest = pipeline.run([
      "score", "--input", f"{out}/{schemas.TFRECORD_DIR}/*.tfrecord.gz",
      "--model", plain, "--output", rescored])
  assert manifest["ood_threshold"] is None
  assert manifest["counts"]["out_of_distribution"] == 0
  assert sql("SELECT count(*), count(ood_score), count(out_of_distribution)"
             f" FROM read_parquet('{rescored}/{schemas.PREDICTIONS_DIR}/"
             "*.parquet')") == [(15, 0, 0)]
  # --ood_threshold needs a detector.
  with pytest.raises(ValueError, match="no OOD detector"):
    pipeline.run(["score", "--input",
                  f"{out}/{schemas.TFRECORD_DIR}/*.tfrecord.gz", "--model",
                  plain, "--output", str(tmp_path / "x"),
                  "--ood_threshold", "3"])


def test_recalibrated_artifact_keeps_the_detector(tmp_path, ood_model_dir):
  """recalibrate keeps the parent's weights, so its features and detector:
  the new artifact carries the same ood.npz and block, and loads."""
  from training import cli  # pylint: disable=import-outside-toplevel
  records = [testing.make_record(image, schemas.LABELS[i % 3])
             for i, image in enumerate(_phantoms(30, seed=31))]
  data = testing.write_tfrecords(str(tmp_path / "site" / "p.tfrecord.gz"),
                                 records)
  output = str(tmp_path / "recal")
  assert cli.main(["recalibrate", "--model", ood_model_dir, "--data", data,
                   "--output", output, "--threshold", "0.5"]) == 0
  parent, new = (artifact.load_artifact(d) for d in (ood_model_dir, output))
  assert new.metadata.ood == parent.metadata.ood
  np.testing.assert_array_equal(new.ood.precision, parent.ood.precision)
  assert new.ood.threshold == parent.ood.threshold
