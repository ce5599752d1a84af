"""`compare --old RUN --new RUN`: two small synthetic runs whose agreement
is known row by row."""

import datetime
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from beam_pipeline import cli
from reporting import compare, run_files

LABELS = tuple(schemas.LABELS)
THRESHOLD = 0.7
# image → (predicted_class, confidence, needs_review beyond low confidence,
# out_of_distribution); "a" twice in the old run (the same bytes under two
# names), "a" only old, "f" and "g" only new.
OLD = {"a": ("benign", 0.9, False, False), "b": ("benign", 0.9, False, False),
       "c": ("benign", 0.6, False, False), "d": ("malignant", 0.8, False, None),
       "e": ("normal", 0.7, True, True)}
NEW = {"b": ("benign", 0.95, False, True), "c": ("malignant", 0.85, False,
                                                 False),
       "d": ("benign", 0.45, False, False), "e": ("normal", 0.7, True, False),
       "f": ("normal", 0.99, False, False), "g": ("benign", 0.5, False, False)}


def _row(name, source, cls, confidence, quality_review, ood, version):
  others = (1.0 - confidence) / 2
  row = {"image_id": name * 64, "source": source, "label": None,
         "predicted_class": cls}
  row.update({schemas.probability_column(label):
              confidence if label == cls else others for label in LABELS})
  low = confidence < THRESHOLD
  row.update({
      "confidence": confidence, "low_confidence": low,
      "threshold": THRESHOLD, "model_version": version, "run_id": version,
      "scored_at": datetime.datetime(2026, 1, 1,
                                     tzinfo=datetime.timezone.utc),
      "gradcam_uri": None, "ood_score": None if ood is None else 1.0,
      "out_of_distribution": ood, "quality_flags": "",
      "needs_review": low or quality_review or bool(ood)})
  return row


def _write_run(path, images, version, extra_rows=()):
  rows = [_row(name, f"x.zip!/{name}.png", *values, version)
          for name, values in images.items()]
  rows += [_row(name, source, *images[name], version)
           for name, source in extra_rows]
  os.makedirs(os.path.join(path, schemas.PREDICTIONS_DIR))
  table = pa.Table.from_pylist(rows,
                               schema=schemas.predictions_schema(LABELS))
  pq.write_table(table, os.path.join(path, schemas.PREDICTIONS_DIR,
                                     "part-00000.parquet"))
  with open(os.path.join(path, schemas.MANIFEST_FILE), "w",
            encoding="utf-8") as f:
    json.dump({"run_id": version, "command": "run", "model_version": version,
               "labels": list(LABELS)}, f)
  return path


@pytest.fixture
def runs(tmp_path):
  old = _write_run(str(tmp_path / "old"), OLD, "m1",
                   extra_rows=[("a", "y.zip!/copy-of-a.png")])
  new = _write_run(str(tmp_path / "new"), NEW, "m2")
  return old, new


def test_compare_counts_flips_confidence_and_flags(runs):
  c = compare.compare(*runs)
  assert (c.old.model_version, c.new.model_version) == ("m1", "m2")
  assert (c.old.images, c.new.images) == (5, 6)  # "a" counted once
  assert c.overlap == compare.Overlap(both=4, only_old=1, only_new=2)
  assert c.classes == LABELS
  assert {(f.old, f.new): f.images for f in c.flips} == {
      ("benign", "benign"): 1, ("benign", "malignant"): 1,
      ("malignant", "benign"): 1, ("normal", "normal"): 1}
  assert c.changed == 2

  k = c.confidence  # b +0.05, c +0.25, d -0.35, e 0
  assert k.images == 4
  assert k.mean == pytest.approx(-0.0125)
  assert k.mean_abs == pytest.approx(0.1625)
  assert (k.minimum, k.maximum) == (pytest.approx(-0.35),
                                    pytest.approx(0.25))
  assert k.median == pytest.approx(0.025)
  assert (k.increased, k.decreased) == (2, 1)
  assert len(k.histogram) == 20 and sum(b.images for b in k.histogram) == 4
  assert {(b.low, b.high): b.images for b in k.histogram if b.images} == {
      (-0.4, -0.3): 1, (0.0, 0.1): 2, (0.2, 0.3): 1}

  flags = {f.flag: f for f in c.flags}
  low = flags["low_confidence"]  # c unflagged, d newly flagged
  assert (low.compared, low.old_flagged, low.new_flagged, low.newly_flagged,
          low.unflagged) == (4, 1, 1, 1, 1)
  review = flags["needs_review"]  # old: c, e; new: b (OOD), d, e
  assert (review.old_flagged, review.new_flagged, review.newly_flagged,
          review.unflagged) == (2, 3, 2, 1)
  ood = flags["out_of_distribution"]  # d has no old score: not compared
  assert (ood.compared, ood.newly_flagged, ood.unflagged) == (3, 1, 1)
  assert [(e.source, e.old_class, e.new_class) for e in c.examples] == [
      ("x.zip!/d.png", "malignant", "benign"),
      ("x.zip!/c.png", "benign", "malignant")]


def test_compare_command_prints_and_writes_json_and_html(runs, tmp_path,
                                                         capsys):
  out = str(tmp_path / "cmp")
  assert cli.main(["compare", "--old", runs[0], "--new", runs[1],
                   "--output", out]) == cli.EXIT_OK
  printed = capsys.readouterr().out
  assert "2 of 4 changed" in printed
  assert os.path.join(out, compare.JSON_FILE) in printed
  with open(os.path.join(out, compare.JSON_FILE), encoding="utf-8") as f:
    data = json.load(f)
  assert data["overlap"] == {"both": 4, "only_old": 1, "only_new": 2}
  assert data["changed"] == 2
  assert {"old": "benign", "new": "malignant", "images": 1} in data["flips"]
  with open(os.path.join(out, compare.HTML_FILE), encoding="utf-8") as f:
    page = f.read()
  assert 'id="flip-matrix"' in page and "m1 → m2" in page


def test_compare_names_a_run_whose_model_carries_warnings(runs, tmp_path,
                                                          capsys):
  """A model train warned about (e.g. one class for every validation
  image), in either run: the text, the JSON and the page open with it."""
  old, new = runs
  warning = "the model predicts <benign> for all 9 validation images"
  path = os.path.join(new, schemas.MANIFEST_FILE)
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  for warnings in (None, []):  # a model from before the checks, none found
    manifest[schemas.MANIFEST_MODEL_WARNINGS] = warnings
    with open(path, "w", encoding="utf-8") as f:
      json.dump(manifest, f)
    c = compare.compare(old, new)
    assert c.old.model_warnings == c.new.model_warnings == ()
    assert "WARNING" not in compare.format_text(c)
    assert "model-warning" not in compare.render_html(c)
  manifest[schemas.MANIFEST_MODEL_WARNINGS] = [warning]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  out = str(tmp_path / "cmp")
  assert cli.main(["compare", "--old", old, "--new", new,
                   "--output", out]) == cli.EXIT_OK
  sentence = ("The model m2 carries a warning from the training of its"
              f" weights: {warning}")
  assert capsys.readouterr().out.startswith(
      f"WARNING (new run): {sentence}\n")
  with open(os.path.join(out, compare.JSON_FILE), encoding="utf-8") as f:
    data = json.load(f)
  assert data["new"]["model_warnings"] == [sentence]
  assert data["old"]["model_warnings"] == []
  with open(os.path.join(out, compare.HTML_FILE), encoding="utf-8") as f:
    page = f.read()
  assert ('<section id="runs"><h2>Runs</h2><p class="warning"'
          ' id="model-warning-0">WARNING (new run): The model m2 carries a'
          " warning from the training of its weights: the model predicts"
          " &lt;benign&gt; for all 9 validation images</p><table") in page


def test_old_runs_without_review_columns_say_so(tmp_path):
  old = _write_run(str(tmp_path / "old"), OLD, "m1")
  path = os.path.join(old, schemas.PREDICTIONS_DIR, "part-00000.parquet")
  pq.write_table(pq.read_table(path).drop(["needs_review",
                                           "out_of_distribution"]), path)
  new = _write_run(str(tmp_path / "new"), NEW, "m2")
  flags = {f.flag: f for f in compare.compare(old, new).flags}
  assert flags["low_confidence"].recorded
  assert not flags["needs_review"].recorded
  assert "old run" in flags["needs_review"].note


def test_missing_and_half_written_runs_are_one_line_exit_2(runs, tmp_path,
                                                           capsys):
  half = str(tmp_path / "half")
  _write_run(half, NEW, "m2")
  os.remove(os.path.join(half, schemas.MANIFEST_FILE))
  pre = tmp_path / "pre"
  pre.mkdir()
  (pre / schemas.MANIFEST_FILE).write_text('{"command": "preprocess"}')
  for old, new, message in (
      (str(tmp_path / "nope"), runs[1], "--old"),
      (runs[0], half, "is not a finished run"),
      (str(pre), runs[1], "holds no predictions")):
    status = cli.main(["compare", "--old", old, "--new", new, "--output",
                       str(tmp_path / "cmp")])
    err = capsys.readouterr().err.strip()
    assert status == cli.EXIT_USAGE, err
    assert err.startswith("error: ") and "\n" not in err and message in err
  with pytest.raises(run_files.RunDirError, match="no manifest"):
    compare.compare(half, runs[1])
  assert not os.path.exists(tmp_path / "cmp")


def test_a_run_that_scored_nothing_is_refused(runs, tmp_path, capsys):
  # Its predictions/ holds an empty shard: every image failed, or every
  # one was skipped by --skip_scored.
  empty = _write_run(str(tmp_path / "empty"), {}, "m2")
  path = os.path.join(empty, schemas.MANIFEST_FILE)
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  manifest[schemas.MANIFEST_COUNTS] = {schemas.COUNT_PREDICTIONS: 0}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  assert cli.main(["compare", "--old", runs[0], "--new", empty, "--output",
                   str(tmp_path / "cmp")]) == cli.EXIT_USAGE
  assert capsys.readouterr().err == (
      f"error: --new {empty} holds no predictions: 0 images were scored"
      " (see its summary for why: errors, or every image skipped by"
      " --skip_scored); compare runs that scored images\n")
  assert not os.path.exists(tmp_path / "cmp")


def test_runs_without_an_image_in_common_have_no_ood_note(tmp_path):
  old = _write_run(str(tmp_path / "old"), {"a": OLD["a"]}, "m1")
  new = _write_run(str(tmp_path / "new"), {"f": NEW["f"]}, "m2")
  flags = {f.flag: f for f in compare.compare(old, new).flags}
  ood = flags[schemas.COLUMN_OUT_OF_DISTRIBUTION]
  assert ood.note is None and ood.compared == 0
  # Null where both scored the image: the note, as before.
  old = _write_run(str(tmp_path / "old_d"), {"d": OLD["d"]}, "m1")
  new = _write_run(str(tmp_path / "new_d"), {"d": NEW["d"]}, "m2")
  ood = {f.flag: f for f in compare.compare(old, new).flags}[
      schemas.COLUMN_OUT_OF_DISTRIBUTION]
  assert ood.note.startswith("not compared: a run's model has no OOD")


def test_report_and_compare_refuse_an_output_that_is_a_file(tmp_path, capsys):
  """Before any run is read (these runs do not exist): one line, status 2."""
  afile = tmp_path / "p.zip"
  afile.write_bytes(b"PK")
  nothing = str(tmp_path / "none")
  for argv in (["report", "--predictions", nothing],
               ["compare", "--old", nothing, "--new", nothing]):
    assert cli.main(argv + ["--output", str(afile)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        f"error: --output {afile} is a file, not a directory; pass a"
        " directory (it is created if missing)\n")


@pytest.mark.parametrize("argv, message", [
    (["summary", "--ouptut", "RUN"],
     "unknown flag --ouptut (did you mean --output?)"),
    # An abbreviation is refused as the pipeline's own flags refuse it.
    (["report", "--prediction", "RUN", "--output", "R", "--gallery", "1"],
     "unknown flag --prediction (did you mean --predictions?)"),
    (["compare", "--old", "RUN", "--new", "RUN", "--output", "C",
      "--exmples", "3"],
     "unknown flag --exmples (did you mean --examples?)"),
    (["doctor", "--modle", "M"], "unknown flag --modle (did you mean"
     " --model?)")])
def test_reporting_and_doctor_name_the_flag_a_misspelt_one_meant(
    tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == cli.EXIT_USAGE
  err = capsys.readouterr().err.splitlines()
  assert err[-1] == f"python -m beam_pipeline {argv[0]}: error: {message}"
