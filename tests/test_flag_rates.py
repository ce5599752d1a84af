"""The run-level check of flagged shares against the artifact's held-out
ones (busi_core.flag_rates), by hand and through `run` with a real (tiny,
untrained) artifact."""

import json
import math
import os
import zipfile

import cv2
import numpy as np
import pytest

import schemas
from beam_pipeline import cli
from busi_core import artifact, flag_rates, imaging
from schemas import metadata as md
from tests.pipeline_helpers import assert_manifest_spelled_in_schemas
from training import phantoms, testing

SIZE = 32
LOW, OOD = schemas.COLUMN_LOW_CONFIDENCE, schemas.COLUMN_OUT_OF_DISTRIBUTION


def _exact_tail(k, n, p):
  return sum(math.comb(n, j) * p**j * (1 - p)**(n - j)
             for j in range(k, n + 1))


def _exact_beta_binomial_tail(k, n, p, m):
  a, b = p * m + 0.5, (1 - p) * m + 0.5
  def log_beta(x, y):
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)
  return sum(math.exp(math.log(math.comb(n, j)) + log_beta(j + a, n - j + b)
                      - log_beta(a, b)) for j in range(k, n + 1))


@pytest.mark.parametrize("k,n,p", [(0, 5, 0.3), (3, 10, 0.2), (5, 5, 0.5),
                                   (40, 50, 0.79), (1, 1, 0.01),
                                   (120, 400, 0.25), (900, 1000, 0.79)])
def test_binomial_tail_matches_the_sum(k, n, p):
  assert flag_rates.upper_tail(k, n, p) == pytest.approx(
      _exact_tail(k, n, p), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("k,n,p,m", [(3, 10, 0.2, 30), (195, 200, 0.79, 623),
                                     (90, 300, 0.2, 94), (5, 5, 0.0, 40),
                                     (900, 1000, 0.79, 27)])
def test_held_out_size_gives_the_beta_binomial_tail(k, n, p, m):
  assert flag_rates.upper_tail(k, n, p, m) == pytest.approx(
      _exact_beta_binomial_tail(k, n, p, m), rel=1e-9)


@pytest.mark.parametrize("k", [149_000, 150_500, 151_800, 300_000])
def test_long_tails_summed_in_chunks(k):
  """n spans several chunks: the same as one sum over every term."""
  n, p = 300_000, 0.5
  j = np.arange(k, n + 1, dtype=np.float64)
  logs = np.array([math.lgamma(n + 1) - math.lgamma(x + 1)
                   - math.lgamma(n - x + 1) for x in j]) + n * math.log(p)
  whole = float(np.exp(logs - logs.max()).sum() * math.exp(logs.max()))
  assert flag_rates.upper_tail(k, n, p) == pytest.approx(whole, rel=1e-9)


def test_tail_edges():
  assert flag_rates.upper_tail(1, 10, 0.0) == 0.0
  assert flag_rates.upper_tail(10, 10, 1.0) == 1.0
  assert flag_rates.upper_tail(0, 10, 0.3, 50) == 1.0
  with pytest.raises(ValueError):
    flag_rates.upper_tail(11, 10, 0.5)


@pytest.fixture(name="metadata", scope="module")
def fixture_metadata(tmp_path_factory):
  return testing.make_test_artifact(str(tmp_path_factory.mktemp("m")))


def _stats(count, share):
  return md.FlagStats(count=count, flagged=round(count * share),
                      flagged_share=share)


def test_expected_share_comes_from_the_best_held_out_source(metadata):
  """Recalibration sample, else pooled cross-validation, else test, else
  validation; nothing when none records a share."""
  none = flag_rates.expected(metadata, False, False, False)
  assert none[LOW]["share"] is None and "no held-out" in none[LOW]["why"]
  assert "no OOD detector" in none[OOD]["why"]
  flagging = md.Flagging(val=_stats(90, 0.6), test=_stats(100, 0.5))
  only_val = metadata.replace(flagging=md.Flagging(val=_stats(90, 0.6)))
  assert flag_rates.expected(only_val, False, False, False)[LOW] == {
      "share": 0.6, "images": 90, "from": schemas.FLAG_RATE_FROM_VALIDATION}
  with_test = metadata.replace(flagging=flagging)
  assert flag_rates.expected(with_test, False, False, False)[LOW] == {
      "share": 0.5, "images": 100, "from": schemas.FLAG_RATE_FROM_TEST}
  with_cv = with_test.replace(cross_validation=md.CrossValidationSummary(
      pooled={"count": 600, "flagged_share": 0.7}))
  assert flag_rates.expected(with_cv, False, False, False)[LOW] == {
      "share": 0.7, "images": 600,
      "from": schemas.FLAG_RATE_FROM_CROSS_VALIDATION}
  # A threshold chosen on the out-of-fold predictions: each fold at the
  # threshold the other folds chose, not at its validation threshold.
  on_cv = with_cv.replace(flagging=md.Flagging(
      val=_stats(90, 0.6), chosen_on=schemas.THRESHOLD_ON_CV,
      out_of_fold=md.OutOfFoldFlagging(pooled=_stats(600, 0.55))))
  assert flag_rates.expected(on_cv, False, False, False)[LOW] == {
      "share": 0.55, "images": 600,
      "from": schemas.FLAG_RATE_FROM_CROSS_VALIDATION}
  # A fold model that predicted one class: the cross-validated share is
  # partly a constant answer's; the final model's test split speaks.
  # The entry names the source it passed over, and why.
  for cv_block in (with_cv, on_cv):
    warned = cv_block.replace(
        cross_validation=cv_block.cross_validation.replace(
            warnings=("Fold 0: the model predicts malignant for all ...",)))
    entry = flag_rates.expected(warned, False, False, False)[LOW]
    assert entry["from"] == (
        schemas.FLAG_RATE_FROM_TEST if cv_block is with_cv else
        schemas.FLAG_RATE_FROM_VALIDATION)
    assert list(entry["passed_over"]) == ["cross_validation"]
    assert "fold model that predicted one class" in (
        entry["passed_over"]["cross_validation"])
    assert flag_rates.expected_source(entry).endswith(
        " split (not its held-out cross-validation folds: cv warned of a fold"
        " model there)")
    # With no split of its own recorded either: nothing to check against,
    # and the entry does not say the artifact recorded no share at all.
    alone = flag_rates.expected(warned.replace(flagging=None),
                                False, False, False)[LOW]
    assert alone["share"] is None and "passed over" in alone["why"]
    assert "fold model that predicted one class" in alone["why"]
    assert list(alone["passed_over"]) == ["cross_validation"]
    # Checks that found nothing, or an artifact from before the checks.
    for nothing in ((), None):
      none_found = cv_block.replace(
          cross_validation=cv_block.cross_validation.replace(
              warnings=nothing))
      assert "passed_over" not in flag_rates.expected(
          none_found, False, False, False)[LOW]
      assert flag_rates.expected(none_found, False, False, False)[LOW][
          "from"] == schemas.FLAG_RATE_FROM_CROSS_VALIDATION
  # A warned cross-validation that recorded no share passes nothing over:
  # the threshold chosen on cv (the loop's last `warned`) without its
  # pooled out-of-fold figures, and a block without pooled figures.
  for no_share in (
      warned.replace(flagging=warned.flagging.replace(
          out_of_fold=md.OutOfFoldFlagging())),
      with_test.replace(cross_validation=md.CrossValidationSummary(
          warnings=("Fold 0: ...",)))):
    entry = flag_rates.expected(no_share, False, False, False)[LOW]
    assert "passed_over" not in entry and entry["from"] in (
        schemas.FLAG_RATE_FROM_TEST, schemas.FLAG_RATE_FROM_VALIDATION)
  # A recalibrated artifact keeps its parent's blocks; only its site
  # sample speaks for its new threshold.
  fit_only = with_cv.replace(recalibration=md.Recalibration(
      threshold=md.RecalibratedThreshold(fit=_stats(80, 0.3))))
  assert flag_rates.expected(fit_only, False, False, False)[LOW] == {
      "share": 0.3, "images": 80,
      "from": schemas.FLAG_RATE_FROM_RECALIBRATION}
  checked = with_cv.replace(recalibration=md.Recalibration(
      threshold=md.RecalibratedThreshold(fit=_stats(80, 0.3)),
      check=md.RecalibrationCheck(after=md.SiteFigures(
          count=40, flagged=10, flagged_share=0.25))))
  assert flag_rates.expected(checked, False, False, False)[LOW] == {
      "share": 0.25, "images": 40, "in_sample": False,
      "from": schemas.FLAG_RATE_FROM_RECALIBRATION}
  bare = with_cv.replace(recalibration=md.Recalibration())
  assert flag_rates.expected(bare, False, False, False)[LOW]["share"] is None
  # --threshold makes every recorded share beside the point.
  given = flag_rates.expected(with_cv, True, False, False)[LOW]
  assert given["share"] is None and "--threshold" in given["why"]


def test_expected_ood_share_is_the_design_rate(metadata):
  ood = metadata.replace(ood=md.OodDetector(target_pass_rate=0.99))
  assert flag_rates.expected(ood, False, False, True)[OOD] == {
      "share": 0.01, "from": schemas.FLAG_RATE_FROM_OOD_PASS_RATE}
  overridden = flag_rates.expected(ood, False, True, True)[OOD]
  assert overridden["share"] is None and "--ood_threshold" in (
      overridden["why"])


def test_check_needs_both_the_margin_and_the_p_value():
  exact = {LOW: {"share": 0.5, "from": "validation"}}  # no held-out size
  def raised(flagged, images, expected=exact):
    return flag_rates.check(expected, {"predictions": images,
                                       LOW: flagged})[LOW]["raised"]
  assert raised(700, 1000)  # +0.2, p ~ 1e-37
  assert not raised(560, 1000)  # p = 1e-4 but only +0.06
  assert not raised(5, 5)  # +0.5 but p = 0.03
  assert raised(14, 14)  # p = 6e-5
  entry = flag_rates.check(exact, {"predictions": 20, LOW: 20})[LOW]
  assert entry["observed"] == 1.0 and entry["flagged"] == 20
  assert entry["p_value"] == pytest.approx(0.5**20)
  # Exactly ten points above (0.3 - 0.2 is 0.0999... in floats), p 2.5e-5.
  at_margin = {LOW: {"share": 0.2, "from": "validation"}}
  assert raised(90, 300, at_margin) and not raised(89, 300, at_margin)
  # The same run against a share measured on 94 images: p 0.03, as
  # likely as not noise in the share itself.
  measured = {LOW: {"share": 0.2, "from": "validation", "images": 94}}
  entry = flag_rates.check(measured, {"predictions": 300, LOW: 90})[LOW]
  assert entry["p_value"] == pytest.approx(0.0291, abs=1e-4)
  assert not entry["raised"]
  # Nothing scored, or no expectation: recorded, never raised.
  assert not flag_rates.check(exact, {"predictions": 0,
                                      LOW: 0})[LOW]["raised"]
  nothing = flag_rates.check({LOW: {"share": None, "why": "x"}},
                             {"predictions": 9, LOW: 9})[LOW]
  assert not nothing["raised"] and nothing["observed"] == 1.0
  assert flag_rates.warnings(flag_rates.check(exact, {
      "predictions": 14, LOW: 14}))[0].startswith(
          "100% of the 14 images scored are low-confidence; the model flags"
          " 50% of its validation split (one-sided p = 6.1e-05).")


def test_warnings_survive_edited_manifests():
  """Readers get manifests a person may have edited: odd entries are
  skipped, never a crash."""
  for rates in (None, [], [1], {"x": 1},
                {LOW: {"raised": True}},
                {LOW: {"raised": True, "observed": "a", "share": 0.1,
                       "p_value": 0.0, "images_scored": 3}},
                {LOW: {"raised": "yes", "observed": 1.0, "share": 0.1,
                       "p_value": 0.0, "images_scored": 3}}):
    assert flag_rates.warnings(rates) == []
  line, = flag_rates.warnings({LOW: {
      "raised": True, "observed": 0.5, "share": 0.0004, "p_value": 0.0,
      "images_scored": 10, "from": ["odd"], "in_sample": True}})
  assert line.startswith("50% of the 10 images scored are low-confidence;"
                         " the model flags 0.04% of its own data (measured"
                         " in sample) (one-sided p < 1e-300).")
  for odd in ("x", ["cross_validation"], None):
    assert flag_rates.passed_over({"passed_over": odd}) == []


# --- Through the pipeline ---------------------------------------------------


def _png(image: np.ndarray) -> bytes:
  ok, data = cv2.imencode(".png", image)
  assert ok
  return data.tobytes()


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  """A tiny artifact with an OOD detector fitted on phantoms, and a
  cross-validated low-confidence share of 20 % written into its metadata."""
  path = str(tmp_path_factory.mktemp("flag_model"))
  rng = np.random.default_rng(0)
  images = np.stack([
      imaging.decode_and_resize(_png(phantoms.render_phantom(
          schemas.LABELS[i % 3], rng, 160)[0]), SIZE).pixels
      for i in range(100)])
  meta = testing.make_test_artifact(path, image_size=SIZE, ood_images=images)
  meta = meta.replace(cross_validation=md.CrossValidationSummary(
      pooled={"count": 600, "flagged_share": 0.2}))
  with open(os.path.join(path, schemas.METADATA_FILE), "w",
            encoding="utf-8") as f:
    json.dump(meta.to_json(), f)
  return path


def _archive(path, phantom_count, noise_count):
  rng = np.random.default_rng(3)
  with zipfile.ZipFile(path, "w") as zf:
    for i in range(phantom_count):
      label = schemas.LABELS[i % 3]
      zf.writestr(f"{label}/{label} ({i}).png", _png(
          phantoms.render_phantom(label, rng, 160)[0]))
    for i in range(noise_count):
      zf.writestr(f"other/noise{i}.png", _png(
          rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)))
  return path


def test_run_raises_the_check_and_the_summary_warns(tmp_path, model_dir):
  """Noise images: all low-confidence (an untrained model) where 20 % is
  expected, and out of distribution where 1 % is: both raised, both in the
  summary."""
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  archive = _archive(str(tmp_path / "noise.zip"), 0, 12)
  manifest = pipeline.run(["run", "--input", archive, "--model", model_dir,
                           "--output", str(tmp_path / "out")])
  rates = manifest[schemas.MANIFEST_FLAG_RATES]
  counts = manifest["counts"]
  assert counts["predictions"] == 12
  assert rates[LOW]["flagged"] == counts[LOW] == 12
  assert rates[LOW]["from"] == schemas.FLAG_RATE_FROM_CROSS_VALIDATION
  assert rates[LOW]["raised"] and rates[LOW]["p_value"] == pytest.approx(
      _exact_beta_binomial_tail(12, 12, 0.2, 600), rel=1e-9)
  assert rates[OOD]["flagged"] == counts[OOD] == 12
  assert rates[OOD]["raised"] and rates[OOD]["share"] == pytest.approx(0.01)
  on_disk = assert_manifest_spelled_in_schemas(str(tmp_path / "out"))
  assert on_disk[schemas.MANIFEST_FLAG_RATES] == rates
  summary = cli.format_summary(manifest)
  warnings = [line for line in summary.splitlines() if "WARNING" in line]
  assert len(warnings) == 2
  assert "100% of the 12 images scored are low-confidence" in warnings[0]
  assert "recalibrate" in warnings[0]
  assert "out of distribution" in warnings[1]


@pytest.mark.slow
def test_given_thresholds_are_not_checked_unless_they_are_the_models(
    tmp_path, model_dir):
  """The noise run above with both thresholds given checks neither; with
  flags that repeat the artifact's own thresholds, both are raised."""
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  archive = _archive(str(tmp_path / "noise.zip"), 0, 12)
  given = pipeline.run(["run", "--input", archive, "--model", model_dir,
                        "--output", str(tmp_path / "given"), "--threshold",
                        "0.5", "--ood_threshold", "1e9"])
  rates = given[schemas.MANIFEST_FLAG_RATES]
  assert not rates[LOW]["raised"] and "--threshold" in rates[LOW]["why"]
  assert not rates[OOD]["raised"] and "--ood_threshold" in rates[OOD]["why"]
  assert "WARNING" not in cli.format_summary(given)
  # Flags that repeat the artifact's own thresholds change nothing.
  own = artifact.read_artifact_info(model_dir).metadata
  same = pipeline.run(["run", "--input", archive, "--model", model_dir,
                       "--output", str(tmp_path / "same"), "--threshold",
                       repr(own.threshold), "--ood_threshold",
                       repr(own.ood.threshold)])
  assert same[schemas.MANIFEST_FLAG_RATES][LOW]["raised"]
  assert same[schemas.MANIFEST_FLAG_RATES][OOD]["raised"]


@pytest.mark.slow
def test_score_checks_only_the_images_it_scored(tmp_path, model_dir):
  """`score` of the TFRecords checks like `run`; with --skip_scored naming
  the run that scored them all, nothing is scored and nothing raised."""
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  archive = _archive(str(tmp_path / "noise.zip"), 0, 12)
  first = str(tmp_path / "first")
  pipeline.run(["run", "--input", archive, "--model", model_dir,
                "--output", first])
  shards = f"{first}/{schemas.TFRECORD_DIR}/*.tfrecord.gz"
  scored = pipeline.run(["score", "--input", shards, "--model", model_dir,
                         "--output", str(tmp_path / "scored")])
  rates = scored[schemas.MANIFEST_FLAG_RATES]
  assert rates[LOW]["images_scored"] == 12 and rates[LOW]["raised"]
  assert rates[OOD]["raised"]
  # Half of them scored before: only the other half is checked.
  half = str(tmp_path / "half")
  pipeline.run(["run", "--input", _archive(str(tmp_path / "six.zip"), 0, 6),
                "--model", model_dir, "--output", half])
  rest = pipeline.run(["score", "--input", shards, "--model", model_dir,
                       "--output", str(tmp_path / "rest"),
                       "--skip_scored", half])
  assert rest["counts"][schemas.COUNT_ALREADY_SCORED] == 6
  entry = rest[schemas.MANIFEST_FLAG_RATES][LOW]
  assert (entry["images_scored"], entry["flagged"]) == (6, 6)
  assert entry["p_value"] == pytest.approx(
      _exact_beta_binomial_tail(6, 6, 0.2, 600), rel=1e-9)
  skipped = pipeline.run(["score", "--input", shards, "--model", model_dir,
                          "--output", str(tmp_path / "skipped"),
                          "--skip_scored", first])
  assert skipped["counts"]["predictions"] == 0
  assert skipped["counts"][schemas.COUNT_ALREADY_SCORED] == 12
  for entry in skipped[schemas.MANIFEST_FLAG_RATES].values():
    assert entry["images_scored"] == 0 and entry["observed"] is None
    assert entry["p_value"] is None and not entry["raised"]
    assert entry["why"] == "no images scored"
  assert "WARNING" not in cli.format_summary(skipped)


def test_in_distribution_run_raises_nothing(tmp_path, model_dir):
  """Phantoms like the detector's: at most one out of distribution, not
  raised; and with the untrained model's low confidence expected (a 100 %
  held-out share), that is not raised either."""
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  with open(os.path.join(model_dir, schemas.METADATA_FILE),
            encoding="utf-8") as f:
    meta = md.ArtifactMetadata.from_json(json.load(f))
  expected_all = str(tmp_path / "model")
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(model_dir, expected_all)
  with open(os.path.join(expected_all, schemas.METADATA_FILE), "w",
            encoding="utf-8") as f:
    json.dump(meta.replace(cross_validation=md.CrossValidationSummary(
        pooled={"count": 600, "flagged_share": 1.0})).to_json(), f)
  archive = _archive(str(tmp_path / "phantoms.zip"), 12, 0)
  manifest = pipeline.run(["run", "--input", archive, "--model",
                           expected_all, "--output", str(tmp_path / "out")])
  rates = manifest[schemas.MANIFEST_FLAG_RATES]
  assert manifest["counts"]["predictions"] == 12
  assert rates[OOD]["flagged"] <= 1 and not rates[OOD]["raised"]
  assert rates[LOW]["share"] == 1.0 and not rates[LOW]["raised"]
  assert "WARNING" not in cli.format_summary(manifest)


def test_preprocess_has_no_check(tmp_path):
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  archive = _archive(str(tmp_path / "a.zip"), 3, 0)
  manifest = pipeline.run(["preprocess", "--input", archive, "--output",
                           str(tmp_path / "out")])
  assert schemas.MANIFEST_FLAG_RATES not in manifest
