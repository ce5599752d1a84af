"""`python -m training recalibrate` through `cli.main(argv)`.

The parent is a tiny untrained artifact whose temperature is set far below
the one its own logits want on a "site" sample (over-confident), and the
sample's labels are made from those logits: right for the most confident
half, mostly wrong for the rest, so that a finite temperature and a
threshold in the middle fit it.
"""

import hashlib
import io
import json
import os
import shutil
from typing import NamedTuple

import numpy as np
import pytest

import schemas
from training import calibration, cli, evaluate, model_card
from busi_core import artifact
from training import saving
from training import model as model_lib, split, testing
from busi_core.layers import TemperatureScaling
from tests.test_training_cli import assert_aucs_of_rows
from tests.test_training_model_card import sparse_metadata

SIZE = 32
IMAGES = 90
TARGET = 0.95  # the default --target_accuracy
PARENT_THRESHOLD = 0.9
# What the parent's training found (train's one-class check): the same
# weights, so the recalibrated artifact keeps it.
PARENT_WARNING = "the model predicts benign for all 9 test images"


class Site(NamedTuple):
  parent: str  # the parent artifact
  data: str  # glob of the sample's TFRecords
  image_ids: list  # of the sample, in the order of logits and labels
  logits: np.ndarray  # the parent's logits of the sample
  labels: np.ndarray
  parent_temperature: float
  best_temperature: float  # fitted directly on the whole sample
  # chosen on the whole sample at best_temperature, on observed accuracy
  best_threshold: float


def _sample_labels(logits: np.ndarray) -> np.ndarray:
  """The prediction for the more confident half; cycling classes (right a
  third of the time) for the rest."""
  ordered = np.sort(logits, axis=1)
  order = np.argsort(-(ordered[:, -1] - ordered[:, -2]), kind="stable")
  labels = logits.argmax(axis=1)
  for k, i in enumerate(order[len(order) // 2:]):
    labels[i] = k % logits.shape[1]
  return labels


def _files(directory):
  """name → sha256 of every file in a directory."""
  result = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      result[name] = hashlib.sha256(f.read()).hexdigest()
  return result


@pytest.fixture(name="site", scope="module")
def fixture_site(tmp_path_factory):
  root = tmp_path_factory.mktemp("site")
  base = str(root / "base")
  testing.make_test_artifact(base, image_size=SIZE, seed=0)
  loaded = artifact.load_artifact(base)
  rng = np.random.default_rng(0)
  # Speckle of random brightness: logits (and margins) spread out.
  images = (rng.integers(0, 256, (IMAGES, SIZE, SIZE, 3)) *
            rng.uniform(0.05, 1.0, (IMAGES, 1, 1, 1))).astype(np.uint8)
  logits = model_lib.predict_logits(loaded.model, images)
  labels = _sample_labels(logits)
  best = calibration.fit_temperature(logits, labels)
  assert not best.at_bound
  probabilities = calibration.softmax(logits, best.temperature)
  # Observed accuracy: this sample's confident half is always right, which
  # its temperature-scaled confidences (at most ~0.75) cannot show.
  best_threshold = calibration.choose_threshold(
      probabilities.max(axis=1), probabilities.argmax(axis=1) == labels,
      TARGET, schemas.THRESHOLD_RULE_OBSERVED)
  assert best_threshold.reached

  # The parent: the same weights, far too sharp for this site.
  parent = str(root / "parent")
  parent_temperature = best.temperature / 20
  model_lib.set_temperature(loaded.model, parent_temperature)
  fields = {k: v for k, v in loaded.metadata.as_kwargs().items() if k not in (
      "model_version", "created_at", schemas.METADATA_MODEL_SHA256,
      "temperature")}
  fields.update(name="parent", threshold=PARENT_THRESHOLD,
                temperature=parent_temperature, warnings=(PARENT_WARNING,))
  saving.save_artifact(loaded.model, parent, loaded.labels, **fields)
  with open(os.path.join(parent, schemas.SPLIT_FILE), "w") as f:
    json.dump({"train": ["a"], "val": [], "test": []}, f)

  records = [testing.make_record(pixels, schemas.LABELS[label])
             for pixels, label in zip(images, labels)]
  unlabelled = testing.make_record(images[0][::-1], "")
  data = testing.write_tfrecords(
      str(root / "tfrecords" / "part-00000-of-00001.tfrecord.gz"),
      records + [unlabelled])
  return Site(parent, data, [r.image_id for r in records], logits, labels,
              parent_temperature, best.temperature, best_threshold.threshold)


def _run(site, output, *flags):
  return cli.main(["recalibrate", "--model", site.parent, "--data", site.data,
                   "--output", str(output), *flags])


def _metadata(directory):
  return artifact.read_artifact_info(str(directory)).metadata


def _weights(model):
  return {layer.name: layer.get_weights() for layer in model.layers
          if not isinstance(layer, TemperatureScaling)}


def test_recalibrate_refits_temperature_and_threshold(site, tmp_path, capsys):
  parent_files = _files(site.parent)
  output = tmp_path / "recal"
  assert _run(site, output, "--threshold_rule", "observed") == 0
  out = capsys.readouterr().out
  assert "held-out images" in out and f"written to {output}" in out
  assert f"(target accuracy {TARGET:g}, observed on the fit part)" in out
  assert "1 unlabelled skipped" in out
  assert _files(site.parent) == parent_files  # only read

  parent = artifact.load_artifact(site.parent)
  new = artifact.load_artifact(str(output))
  metadata = new.metadata
  with open(output / schemas.METADATA_FILE) as f:
    assert metadata.to_json() == json.load(f)  # typed, and nothing lost
  block = metadata.recalibration

  # Temperature and threshold move toward what the whole sample wants.
  temperature = metadata.temperature
  assert block.temperature.fitted
  assert new.model.get_layer("temperature").value == pytest.approx(
      temperature)
  assert (abs(np.log(temperature / site.best_temperature)) <
          abs(np.log(site.parent_temperature / site.best_temperature)) / 4)
  assert (abs(metadata.threshold - site.best_threshold) <
          abs(PARENT_THRESHOLD - site.best_threshold))
  assert metadata.threshold_source == schemas.THRESHOLD_TARGET_ACCURACY
  assert metadata.target_accuracy == TARGET

  assert block.threshold.rule == schemas.THRESHOLD_RULE_OBSERVED
  assert block.threshold.target_reached is True

  # Every weight but the temperature is the parent's.
  before, after = _weights(parent.model), _weights(new.model)
  assert before.keys() == after.keys()
  for name, weights in before.items():
    assert len(weights) == len(after[name]), name
    for a, b in zip(weights, after[name]):
      np.testing.assert_array_equal(a, b, err_msg=name)
  pixels = testing.class_images(1, 4, SIZE, np.random.default_rng(3))
  np.testing.assert_allclose(
      new.model.predict(pixels, verbose=0),
      calibration.softmax(model_lib.predict_logits(parent.model, pixels),
                          temperature), atol=1e-5)

  # A new artifact that names its parent and keeps its other metadata.
  assert metadata.model_version != parent.metadata.model_version
  assert metadata.model_version.startswith("parent-")  # the parent's name
  assert metadata.parent_model_version == parent.metadata.model_version
  assert metadata.parent_model_sha256 == parent.model_sha256
  for field in schemas.METADATA_REQUIRED_FIELDS:
    assert field in metadata.to_json(), field
  assert metadata.test_metrics == parent.metadata.test_metrics
  assert metadata.class_counts == parent.metadata.class_counts
  assert metadata.data_fingerprint == parent.metadata.data_fingerprint
  assert metadata.weights_source == parent.metadata.weights_source
  assert metadata.backbone == parent.metadata.backbone
  assert metadata.training == parent.metadata.training
  assert metadata.warnings == parent.metadata.warnings == (PARENT_WARNING,)
  with open(output / schemas.MODEL_CARD_FILE) as f:
    assert f"**WARNING (from training):** {PARENT_WARNING}" in f.read()
  assert out.rstrip().endswith(
      f"\nWARNING: The model {metadata.model_version} carries a warning from"
      f" the training of its weights: {PARENT_WARNING}")
  assert os.path.exists(output / schemas.SPLIT_FILE)  # the parent's
  with open(output / schemas.RECALIBRATION_SPLIT_FILE) as f:
    sample_split = json.load(f)

  # Honest figures: the held-out part, parent vs new.
  check = block.check
  fit_count = block.temperature.fit_count
  assert not check.in_sample and check.part == "holdout"
  assert fit_count + check.count == IMAGES == block.images
  assert block.examples_read == IMAGES + 1
  assert 0.2 < check.count / IMAGES < 0.4
  assert len(sample_split["holdout"]) == check.count
  assert not set(sample_split["fit"]) & set(sample_split["holdout"])
  assert block.data_fingerprint["overall"] == split.fingerprint(
      site.image_ids)
  old, now = check.before, check.after
  assert old.temperature == pytest.approx(site.parent_temperature)
  assert old.threshold == PARENT_THRESHOLD
  assert now.threshold == metadata.threshold
  assert old.accuracy == now.accuracy  # a temperature moves no argmax
  assert now.ece < old.ece and now.nll < old.nll
  # Recomputed by hand on the held-out images.
  rows = [site.image_ids.index(i) for i in sample_split["holdout"]]
  held_logits, held_labels = site.logits[rows], site.labels[rows]
  probabilities = calibration.softmax(held_logits, temperature)
  expected = calibration.flag_stats(
      probabilities.max(axis=1), probabilities.argmax(axis=1) == held_labels,
      metadata.threshold)
  for key, value in expected.items():
    assert getattr(now, key) == pytest.approx(value), key
  assert now.nll == pytest.approx(
      calibration.nll(held_logits, held_labels, temperature), abs=1e-5)

  card = (output / schemas.MODEL_CARD_FILE).read_text()
  for text in ("## Recalibration for a new site",
               parent.metadata.model_version, "parent (before)",
               "recalibrated (after)", f"| ECE (15 bins) | {old.ece:.3f} |"
               f" {now.ece:.3f} |", f"{metadata.threshold:.4f}",
               block.data_fingerprint["overall"],
               "python -m training recalibrate --model DIR",
               f"`{schemas.COLUMN_IN_RECALIBRATION_FIT}` column"):
    assert text in card, text
  assert "In-sample" not in card


def test_recalibrate_keeps_what_the_site_sample_shows(site, tmp_path,
                                                     capsys, caplog):
  """The site's untrained parent calls every sample image malignant: no
  temperature or threshold fixes that, and recalibrate says so (logged,
  printed, kept in the block, on the card); the never-predicted and
  nothing-found cases of `evaluate.site_warnings` are tested through
  `evaluate` in test_training_cli."""
  assert set(site.logits.argmax(axis=1)) == {2}
  assert len(set(site.labels)) == 3
  output = tmp_path / "recal"
  assert _run(site, output) == 0
  metadata = _metadata(output)
  block = metadata.recalibration
  # Every sample image, fit and held-out part, with the sample's labels.
  warning, = block.warnings
  assert warning == (
      f"The model predicts malignant for all {IMAGES} site sample images,"
      " which hold 3 classes: on these images it tells nothing apart, and"
      " its figures on them are those of a constant answer. This"
      " recalibration cannot fix that: it refitted only the temperature and"
      " the threshold, which change no predicted class; retrain, or"
      " fine-tune on images like these.")
  # (Its parent's training warning is not "found nothing": no claim that
  # its own validation images were told apart.)
  assert warning in caplog.text
  assert f"WARNING: {warning}" in capsys.readouterr().out
  assert (f"> **WARNING (from recalibration, on the site sample):**"
          f" {warning}") in model_card.render(metadata)


def test_default_rule_holds_the_expected_accuracy(site, tmp_path, capsys):
  # The default rule: the lowest threshold at which the fit part's mean
  # calibrated confidence (the accuracy the model expects) reaches the
  # target. Its confidences stay below ~0.75, so ask 0.7.
  output = tmp_path / "recal"
  assert _run(site, output, "--target_accuracy", "0.7") == 0
  assert ("(target accuracy 0.7, expected by the calibrated model (mean"
          " confidence))") in capsys.readouterr().out
  metadata = _metadata(output)
  block = metadata.recalibration
  assert block.threshold.rule == schemas.THRESHOLD_RULE_EXPECTED
  assert block.threshold.target_reached is True
  with open(output / schemas.RECALIBRATION_SPLIT_FILE) as f:
    rows = [site.image_ids.index(i) for i in json.load(f)["fit"]]
  probabilities = calibration.softmax(site.logits[rows], metadata.temperature)
  confidence = probabilities.max(axis=1)
  choice = calibration.choose_threshold(
      confidence, probabilities.argmax(axis=1) == site.labels[rows], 0.7,
      schemas.THRESHOLD_RULE_EXPECTED)
  assert metadata.threshold == pytest.approx(choice.threshold, abs=1e-6)
  assert confidence[confidence >= metadata.threshold - 1e-6].mean() >= 0.7
  assert "the accuracy the calibrated model expects" in (
      output / schemas.MODEL_CARD_FILE).read_text()
  # A rule with a fixed threshold contradicts it.
  assert _run(site, tmp_path / "fixed", "--threshold", "0.8",
              "--threshold_rule", "observed") == 2
  assert "--threshold_rule observed chooses a threshold" in (
      capsys.readouterr().err)


def test_fixed_threshold_in_sample(site, tmp_path):
  output = tmp_path / "recal"
  assert _run(site, output, "--threshold", "0.8", "--holdout_fraction", "0",
              "--name", "site-b") == 0
  metadata = _metadata(output)
  block = metadata.recalibration
  assert metadata.threshold == 0.8
  assert metadata.threshold_source == schemas.THRESHOLD_FIXED
  assert metadata.target_accuracy is None
  assert metadata.model_version.startswith("site-b-")
  assert block.check.in_sample and block.check.count == IMAGES
  assert block.temperature.fit_count == IMAGES
  # The site check counts each sample image once (fit part = held-out).
  warning, = block.warnings
  assert f"for all {IMAGES} site sample images" in warning
  # Fitted on all of it: exactly the temperature fitted on the sample.
  assert metadata.temperature == pytest.approx(site.best_temperature,
                                               rel=1e-4)
  card = (output / schemas.MODEL_CARD_FILE).read_text()
  assert "**In-sample figures**" in card and "fixed (`--threshold`)" in card


def test_what_recalibrate_found_travels_with_the_artifact(site, tmp_path,
                                                          caplog):
  """A scoring run, `evaluate` and `doctor` of the recalibrated artifact
  repeat its site sample's warning after its training's, as they repeat
  the training's: logged at launch, in the manifest
  (MANIFEST_MODEL_RECALIBRATION_WARNINGS) and its end-of-run summary; a
  run of the parent records null (not recalibrated)."""
  from beam_pipeline import cli as beam_cli, doctor, pipeline  # pylint: disable=import-outside-toplevel
  output = tmp_path / "recal"
  assert _run(site, output) == 0
  metadata = _metadata(output)
  warning, = metadata.recalibration.warnings
  version = metadata.model_version
  said = [f"The model {version} carries a warning from the training of its"
          f" weights: {PARENT_WARNING}",
          f"The model {version} carries a warning from its recalibration, on"
          f" the site sample: {warning}"]
  assert artifact.model_warning_lines(metadata) == said

  caplog.clear()
  manifest = pipeline.run(["score", "--input", site.data, "--model",
                           str(output), "--output", str(tmp_path / "run")])
  assert manifest[schemas.MANIFEST_MODEL_WARNINGS] == [PARENT_WARNING]
  assert manifest[schemas.MANIFEST_MODEL_RECALIBRATION_WARNINGS] == [warning]
  assert all(line in caplog.text for line in said)
  summary = beam_cli.format_summary(manifest)
  assert "".join(f"  WARNING: {line}\n" for line in said) in summary
  parent_run = pipeline.run(["score", "--input", site.data, "--model",
                             site.parent, "--output", str(tmp_path / "p")])
  assert parent_run[schemas.MANIFEST_MODEL_RECALIBRATION_WARNINGS] is None
  parent_version = _metadata(site.parent).model_version
  assert artifact.run_warning_lines(parent_run) == [
      f"The model {parent_version} carries a warning from the training of"
      f" its weights: {PARENT_WARNING}"]

  report, _ = _evaluate(output, site.data, tmp_path / "evaluated")
  assert report["warnings"][:2] == said
  out = io.StringIO()
  assert doctor.main(["--model", str(output), "--batch_size", "2"],
                     out=out) == 0
  assert "".join(f"WARNING: {line}\n" for line in said) in out.getvalue()


def test_a_sample_the_weights_were_trained_on_is_named(site, tmp_path,
                                                      capsys):
  # As `evaluate` warns of images the model was trained or validated on;
  # here the warning travels with the new artifact.
  parent = tmp_path / "parent"
  shutil.copytree(site.parent, parent)
  with open(parent / schemas.SPLIT_FILE, "w") as f:
    json.dump({"train": site.image_ids[:4], "val": site.image_ids[4:6],
               "test": site.image_ids[6:9]}, f)
  output = tmp_path / "recal"
  assert cli.main(["recalibrate", "--model", str(parent), "--data",
                   site.data, "--output", str(output)]) == 0
  warning = (f"6 of the {IMAGES} site-sample images are images (or"
             " near-duplicates of images) its weights were trained or"
             " validated on: the model is surer of them than of new scans,"
             " so the temperature and threshold fitted here flag too few."
             " Recalibrate on labelled images the model has never seen.")
  assert warning in _metadata(output).recalibration.warnings
  assert f"WARNING: {warning}" in capsys.readouterr().out


def test_recalibrating_a_recalibrated_artifact_replaces_its_block(
    site, tmp_path):
  """A second site's recalibration of a recalibrated artifact: its block,
  warnings included, is the second site's alone (the first site's
  one-class warning does not follow the artifact to site B, whose sample
  is labelled with the model's own predictions), and its parent is the
  first recalibration; the training's warning stays."""
  first = tmp_path / "site-a"
  assert _run(site, first, "--name", "site-a") == 0
  first_metadata = _metadata(first)
  assert len(first_metadata.recalibration.warnings) == 1
  # Site B: labelled with what the model predicts, so no class it holds
  # goes unpredicted and nothing is found.
  loaded = artifact.load_artifact(str(first))
  rng = np.random.default_rng(7)
  images = (rng.integers(0, 256, (30, SIZE, SIZE, 3)) *
            rng.uniform(0.05, 1.0, (30, 1, 1, 1))).astype(np.uint8)
  predicted = model_lib.predict_logits(loaded.model, images).argmax(axis=1)
  data = testing.write_tfrecords(
      str(tmp_path / "b" / "part-00000-of-00001.tfrecord.gz"),
      [testing.make_record(pixels, schemas.LABELS[label])
       for pixels, label in zip(images, predicted)])
  second = tmp_path / "site-b"
  assert cli.main(["recalibrate", "--model", str(first), "--data", data,
                   "--output", str(second), "--name", "site-b",
                   "--holdout_fraction", "0"]) == 0
  metadata = _metadata(second)
  block = metadata.recalibration
  assert block.warnings == ()
  assert block.images == 30 and block.data == (data,)
  assert block.parent.model_version == first_metadata.model_version
  assert metadata.parent_model_version == first_metadata.model_version
  assert metadata.model_version.startswith("site-b-")
  assert metadata.warnings == (PARENT_WARNING,)
  assert artifact.model_warning_lines(metadata) == [
      f"The model {metadata.model_version} carries a warning from the"
      f" training of its weights: {PARENT_WARNING}"]
  assert "from recalibration" not in model_card.render(metadata)
  # Its recalibration_split.json is site B's, not site A's.
  with open(second / schemas.RECALIBRATION_SPLIT_FILE) as f:
    parts = json.load(f)
  ids = {i for part in parts.values() if isinstance(part, list)
         for i in part}
  assert ids and ids <= {testing.make_record(p, "").image_id
                         for p in images}


def _evaluate(model_dir, data, output, rows_out=None):
  """`evaluate`'s report and its rows' in_recalibration_fit by image_id
  (and every row appended to `rows_out`)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from schemas import evaluation as evaluation_schema  # pylint: disable=import-outside-toplevel
  assert cli.main(["evaluate", "--model", str(model_dir), "--data", data,
                   "--output", str(output)]) == 0
  with open(output / "metrics.json") as f:
    report = json.load(f)
  rows = pq.read_table(str(output / evaluation_schema.PREDICTIONS_FILE)
                      ).to_pylist()
  if rows_out is not None:
    rows_out.extend(rows)
  return report, {r["image_id"]: r[schemas.COLUMN_IN_RECALIBRATION_FIT]
                  for r in rows}


def test_evaluate_marks_the_sample_the_calibration_was_fitted_on(
    site, tmp_path, capsys, caplog):
  output = tmp_path / "recal"
  # The observed rule: a threshold that flags some held-out images, not all.
  assert _run(site, output, "--threshold_rule", "observed") == 0
  with open(output / schemas.RECALIBRATION_SPLIT_FILE) as f:
    parts = json.load(f)
  fit, holdout = set(parts["fit"]), set(parts["holdout"])
  assert fit and holdout
  capsys.readouterr()

  # The whole sample: the fit part is marked, the held-out part is not.
  caplog.clear()
  rows = []
  report, marked = _evaluate(output, site.data, tmp_path / "all", rows)
  assert marked == {i: i in fit for i in site.image_ids}
  assert report[schemas.COLUMN_IN_RECALIBRATION_FIT] == len(fit)
  out = capsys.readouterr().out
  assert (f"In-sample calibration: {len(fit)} of these images"
          in out)
  assert (f"{len(fit)} of the {IMAGES} images (or near-duplicates of them)"
          " are in the sample `recalibrate` fitted") in caplog.text
  # The figures over the rest are the held-out check recalibrate made: the
  # same images, temperature and threshold.
  rest = report["not_fitted_on"]
  after = _metadata(output).recalibration.check.after
  assert (rest["count"], rest["excluded"]) == (len(holdout), len(fit))
  # The parent's split.json has no dHashes: near-duplicates of its training
  # images are unknown, and counted as not fitted on.
  assert rest["status_unknown"] is True
  assert "counted as not fitted on)" in out
  assert rest["accuracy"] == pytest.approx(after.accuracy)
  assert rest["ece"] == pytest.approx(after.ece, abs=1e-5)
  assert 0 < after.flagged < after.count
  assert rest["flagging"]["threshold"] == pytest.approx(after.threshold)
  for key in ("count", "flagged", "accuracy_confident", "accuracy_flagged"):
    assert rest["flagging"][key] == pytest.approx(getattr(after, key)), key
  # Its AUCs are the held-out rows' own, by counting pairs.
  assert_aucs_of_rows(rest, [
      r for r in rows if not r[schemas.COLUMN_IN_RECALIBRATION_FIT]])
  assert rest["auc_malignant"] != report["auc_malignant"]
  assert evaluate.auc_line(rest) in out

  # A near-duplicate of a fitted image (one pixel changed: another
  # image_id, the same dHash) is marked too; a held-out image is not.
  from training import data as data_lib  # pylint: disable=import-outside-toplevel
  records = {r.image_id: r for r in data_lib.read_records(
      data_lib.list_files([site.data]))}
  copy = records[sorted(fit)[0]]
  changed = copy.pixels.copy()
  changed[0, 0] ^= 1
  near = testing.make_record(changed, copy.label)
  held = records[sorted(holdout)[0]]
  data = testing.write_tfrecords(
      str(tmp_path / "near" / "part.tfrecord.gz"), [near, held])
  report, marked = _evaluate(output, data, tmp_path / "near_report")
  assert marked == {near.image_id: True, held.image_id: False}
  assert report[schemas.COLUMN_IN_RECALIBRATION_FIT] == 1
  capsys.readouterr()

  # Never recalibrated: nothing is marked, whatever file lies beside it.
  report, marked = _evaluate(site.parent, site.data, tmp_path / "parent")
  assert set(marked.values()) == {False}
  assert report[schemas.COLUMN_IN_RECALIBRATION_FIT] == 0
  assert "In-sample calibration" not in capsys.readouterr().out
  stray = tmp_path / "stray"
  shutil.copytree(site.parent, stray)
  shutil.copy(output / schemas.RECALIBRATION_SPLIT_FILE, stray)
  report, marked = _evaluate(stray, site.data, tmp_path / "stray_report")
  assert set(marked.values()) == {False}

  # Recalibrated, but its file is gone, unreadable or not its own: unknown
  # (null), and the log says why.
  fingerprint = "does not match the metadata's fingerprint"
  unreadable = "cannot be read as recalibrate writes it"
  no_hashes = {k: v for k, v in parts.items() if k != schemas.SPLIT_DHASH_KEY}
  for damage, text, why in (
      ("missing", None, "is missing"),
      ("corrupt", "{", unreadable),
      ("no_dhashes", json.dumps(no_hashes), unreadable),
      ("other", json.dumps({**parts, "fit": parts["fit"][1:]}), fingerprint),
      ("unrecorded", json.dumps(parts), fingerprint)):
    broken = tmp_path / damage
    shutil.copytree(output, broken)
    split_file = broken / schemas.RECALIBRATION_SPLIT_FILE
    if text is None:
      split_file.unlink()
    else:
      split_file.write_text(text)
    if damage == "unrecorded":  # the metadata keeps no fit fingerprint
      metadata_file = broken / schemas.METADATA_FILE
      metadata = json.loads(metadata_file.read_text())
      del metadata["recalibration"]["data_fingerprint"]["fit"]
      metadata_file.write_text(json.dumps(metadata))
    caplog.clear()
    report, marked = _evaluate(broken, site.data, tmp_path / f"{damage}_r")
    assert set(marked.values()) == {None}, damage
    assert report[schemas.COLUMN_IN_RECALIBRATION_FIT] is None
    assert why in caplog.text, damage
    assert "which of these images its calibration was fitted on is unknown" \
        in capsys.readouterr().out, damage


def test_existing_output_needs_overwrite(site, tmp_path, capsys):
  output = tmp_path / "recal"
  testing.make_test_artifact(str(output), image_size=SIZE)
  # A companion of that other artifact that the parent does not have.
  (output / schemas.artifact.TRAINING_CURVES_FILE).write_bytes(b"old")
  (output / schemas.CV_PREDICTIONS_FILE).write_bytes(b"old")
  assert _run(site, output) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert _metadata(output).training.untrained_test_artifact
  assert _run(site, output, "--overwrite") == 0
  assert _metadata(output).parent_model_version
  assert not (output / schemas.artifact.TRAINING_CURVES_FILE).exists()
  assert not (output / schemas.CV_PREDICTIONS_FILE).exists()


def test_output_must_not_be_the_parent(site, tmp_path, capsys):
  parent_files = _files(site.parent)
  link = tmp_path / "link"
  link.symlink_to(site.parent)
  for output in (site.parent, site.parent + "/", str(link)):
    assert _run(site, output, "--overwrite") == 2
    assert "never modifies the parent" in capsys.readouterr().err
  assert _files(site.parent) == parent_files


@pytest.mark.parametrize("flags,message", [
    (["--holdout_fraction", "1"], "--holdout_fraction"),
    (["--holdout_fraction", "-0.1"], "--holdout_fraction"),
    (["--target_accuracy", "1.5"], "--target_accuracy"),
    (["--threshold", "2"], "--threshold"),
    (["--name", "a/b"], "--name"),
    (["--data", "/nonexistent/*.tfrecord.gz"], "matches no file"),
    (["--model", "/nonexistent/model"], "model.keras"),
])
def test_bad_flags_exit_2(site, tmp_path, capsys, flags, message):
  argv = ["recalibrate", "--model", site.parent, "--data", site.data,
          "--output", str(tmp_path / "m")]
  for flag, value in zip(flags[::2], flags[1::2]):
    if flag in argv:  # replace instead of repeating
      argv[argv.index(flag) + 1] = value
      flags = []
  assert cli.main(argv + flags) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "m").exists()


def test_threshold_and_target_exclude_each_other(site, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    _run(site, tmp_path / "m", "--threshold", "0.8", "--target_accuracy",
         "0.9")
  assert exit_info.value.code == 2


def test_wrong_image_size_exits_2(site, tmp_path, capsys):
  records = testing.synthetic_records(per_class=2, image_size=40)
  data = testing.write_tfrecords(str(tmp_path / "d" / "p.tfrecord.gz"),
                                 records)
  assert cli.main(["recalibrate", "--model", site.parent, "--data", data,
                   "--output", str(tmp_path / "m")]) == 2
  assert "40x40" in capsys.readouterr().err


def test_too_small_a_sample_exits_2(site, tmp_path, capsys):
  records = testing.synthetic_records(per_class=1, image_size=SIZE)[:1]
  data = testing.write_tfrecords(str(tmp_path / "d" / "p.tfrecord.gz"),
                                 records)
  assert cli.main(["recalibrate", "--model", site.parent, "--data", data,
                   "--output", str(tmp_path / "m")]) == 2
  assert "--holdout_fraction 0" in capsys.readouterr().err


# Slow only alone: a process's first gs:// access waits ~20 s in Beam's
# credential lookup before going anonymous (paid once; test_gcs.py pays it too).
@pytest.mark.slow
def test_gs_output(site, gcs_client):
  from tests.conftest import BUCKET  # pylint: disable=import-outside-toplevel
  output = f"gs://{BUCKET}/models/recal"
  assert _run(site, output) == 0
  info = artifact.read_artifact_info(output)
  assert info.metadata.parent_model_version
  names = {blob.name for blob in gcs_client.list_blobs(
      BUCKET, prefix="models/recal/")}
  for name in (schemas.MODEL_FILE, schemas.MODEL_CARD_FILE, schemas.SPLIT_FILE,
               schemas.RECALIBRATION_SPLIT_FILE):
    assert f"models/recal/{name}" in names, name
  artifact.load_artifact(output)


def test_every_card_says_how_to_check_and_recalibrate():
  card = model_card.render(sparse_metadata(model_version="x", threshold=0.9))
  assert "holds only for data like" in card
  assert ("python -m training evaluate --model DIR --data LOCAL_GLOB"
          " --output REPORT") in card
  assert "python -m training recalibrate --model DIR --data LOCAL_GLOB" in card
  assert "manifest's `flag_rates`" in card  # scoring runs warn
  assert "Recalibration for a new site" not in card


@pytest.mark.parametrize("rule", ["observd", "", "EXPECTED"])
def test_train_and_recalibrate_refuse_a_threshold_rule_alike(rule):
  from training import recalibrate  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  message = (f"--threshold_rule {rule!r} is not one of"
             f" {schemas.THRESHOLD_RULES}")
  for config in (TrainConfig(data=("x",), output="x", threshold_rule=rule),
                 recalibrate.RecalibrateConfig(model="m", data=("x",),
                                               output="x",
                                               threshold_rule=rule)):
    with pytest.raises(ValueError) as raised:
      config.validate()
    assert str(raised.value) == message
  for rule in schemas.THRESHOLD_RULES:
    TrainConfig(data=("x",), output="x", threshold_rule=rule).validate()
    recalibrate.RecalibrateConfig(model="m", data=("x",), output="x",
                                  threshold_rule=rule).validate()
