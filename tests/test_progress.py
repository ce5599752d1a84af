"""Progress a person sees: Beam counters of a run, the progress line of a
local run, and the score job's spreading of records after reading."""

import collections
import io
import os
import re
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import schemas
from beam_pipeline import cli, pipeline, progress
from schemas import records
from tests import archive_factory as af
from tests.pipeline_helpers import make_test_pipeline, read_errors
from training import testing as training_testing

LINE = re.compile(r"^(scored|preprocessed) \d+ images \(\d+\.\d img/s\),"
                  r" \d+ errors, ETA (n/a|\d+:\d\d:\d\d)$")


def _zip(path: str) -> str:
  entries = af.busi_entries(3, shape=(40, 48), second_mask=False)
  entries.append(af.Entry("Dataset_BUSI_with_GT/notes.txt", b"n/a", "error",
                          error_type="NotAnImage"))
  af.write_zip(path, entries)
  return path


def test_status_rate_and_eta():
  counts = {schemas.COUNTER_PREDICTIONS: 30, schemas.COUNTER_MASKS_SKIPPED: 8,
            schemas.errors_counter(schemas.Stage.DECODE): 2,
            # Overlays that failed are not member outcomes.
            schemas.errors_counter(schemas.Stage.GRADCAM): 5,
            progress.EXPECTED: 100}
  state = progress.status(counts, schemas.COUNTER_PREDICTIONS, 10.0)
  # 30 images in the 10 s since the first: the 60 members left take 20 s.
  assert state == progress.Status(images=30, errors=2, rate=3.0, eta_s=20.0)
  assert progress.format_line("scored", state) == (
      "scored 30 images (3.0 img/s), 2 errors, ETA 0:00:20")


def test_eta_is_na_when_the_rest_is_unknown():
  counts = {schemas.COUNTER_IMAGES_DECODED: 7}
  unknown = progress.status(counts, schemas.COUNTER_IMAGES_DECODED, 2.0)
  assert unknown.eta_s is None and unknown.rate == 3.5
  assert progress.format_line("preprocessed", unknown) == (
      "preprocessed 7 images (3.5 img/s), 0 errors, ETA n/a")
  # Before the first outcome: no rate, no ETA.
  assert progress.status({progress.EXPECTED: 9}, schemas.COUNTER_PREDICTIONS,
                         None) == progress.Status(0, 0, 0.0, None)
  # More outcomes than expected (a guess that fell short): no ETA.
  short = {schemas.COUNTER_PREDICTIONS: 5, progress.EXPECTED: 3}
  assert progress.status(short, schemas.COUNTER_PREDICTIONS,
                         1.0).eta_s is None
  assert progress.format_line("scored", progress.Status(
      1875, 0, 12.25, 3725.4)) == (
          "scored 1875 images (12.2 img/s), 0 errors, ETA 1:02:05")


def test_eta_waits_for_the_first_image():
  """Masks and error rows come before the model scores anything: they do
  not start the clock, so the ETA does not grow while the model loads."""
  now = [0.0]
  tally = progress.Tally(clock=lambda: now[0])
  reporter = progress.Reporter(io.StringIO(), "scored",
                               schemas.COUNTER_PREDICTIONS, every_s=60,
                               tally=tally, clock=lambda: now[0])
  tally.add(progress.EXPECTED, 20)
  tally.add(schemas.COUNTER_MASKS_SKIPPED, 8)
  tally.add(schemas.errors_counter(schemas.Stage.DECODE), 2)
  now[0] = 30.0
  assert reporter.line() == "scored 0 images (0.0 img/s), 2 errors, ETA n/a"
  tally.add(schemas.COUNTER_PREDICTIONS, 1)  # at 30 s
  now[0] = 35.0
  tally.add(schemas.COUNTER_PREDICTIONS, 4)
  # 5 images in the 5 s since the first; 5 members left.
  assert reporter.line() == (
      "scored 5 images (1.0 img/s), 2 errors, ETA 0:00:05")


def test_tally_counts_from_many_threads():
  tally = progress.Tally()

  def add():
    for _ in range(1000):
      tally.add("x")

  threads = [threading.Thread(target=add) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert tally.snapshot() == {"x": 4000}
  assert tally.first("x") is not None and tally.first("y") is None
  tally.reset()
  assert tally.snapshot() == {}


def test_reporter_prints_lines_while_open_and_stops():
  tally, stream = progress.Tally(), io.StringIO()
  with progress.Reporter(stream, "scored", schemas.COUNTER_PREDICTIONS,
                         every_s=0.01, tally=tally):
    tally.add(progress.EXPECTED, 10)
    tally.add(schemas.COUNTER_PREDICTIONS, 4)
    deadline = time.monotonic() + 10
    while "scored 4 images" not in stream.getvalue():
      assert time.monotonic() < deadline, stream.getvalue()
      time.sleep(0.01)
  printed = stream.getvalue()
  time.sleep(0.05)
  assert stream.getvalue() == printed  # the thread ended with the block
  lines = printed.splitlines()
  assert all(LINE.match(line) for line in lines), lines


def test_every_s_is_slower_off_a_terminal():
  assert progress.every_s(io.StringIO()) == progress.EVERY_IN_LOG_S


def test_run_commits_counters_of_every_row(tmp_path, model_dir, fake_model):
  archive = _zip(str(tmp_path / "busi.zip"))
  out = str(tmp_path / "out")
  manifest = pipeline.run(["run", "--input", archive, "--model", model_dir,
                           "--output", out, "--threshold", "0.99"])
  counters, counts = manifest[schemas.EXECUTE_COUNTERS], manifest["counts"]
  assert counts["predictions"] == 9
  for name in ("predictions", "low_confidence", "out_of_distribution",
               "needs_review", "members_seen", "masks_skipped"):
    assert counters.get(name, 0) == counts[name], name
  assert counters[schemas.COUNTER_LOW_CONFIDENCE] == 9  # all, at 0.99
  assert counters[schemas.COUNTER_IMAGES_DECODED] == 9
  assert {name: counters[schemas.predicted_counter(name)]
          for name in manifest["predicted_classes"]} == (
              manifest["predicted_classes"])
  by_stage = collections.Counter(e["stage"] for e in read_errors(out))
  assert by_stage == {"decode": 1}
  assert {stage.value: counters.get(schemas.errors_counter(stage), 0)
          for stage in schemas.Stage if counters.get(
              schemas.errors_counter(stage))} == by_stage
  # Shown in reading order, after the summary.
  assert list(counters) == sorted(counters, key=schemas.counter_rank)
  summary = cli.format_summary(manifest)
  assert "Beam counters (committed):" in summary
  assert re.search(r"^    predictions +9$", summary, re.M)


@pytest.mark.slow
def test_progress_line_during_a_run(tmp_path, model_dir, fake_model):
  archive = _zip(str(tmp_path / "busi.zip"))
  stream = io.StringIO()
  job = pipeline.create(["run", "--input", archive, "--model", model_dir,
                         "--output", str(tmp_path / "out")])
  manifest = pipeline.execute(job, progress_to=stream,
                              progress_every_s=0.02)
  assert manifest["invariant"]["holds"]
  lines = stream.getvalue().splitlines()
  assert lines and all(LINE.match(line) for line in lines), lines
  assert lines[-1].startswith("scored ")
  # Quiet without a stream (how tests and non-local runs execute).
  quiet = pipeline.create(["run", "--input", archive, "--model", model_dir,
                           "--output", str(tmp_path / "quiet")])
  assert schemas.EXECUTE_COUNTERS in pipeline.execute(quiet)


@pytest.mark.parametrize("runner", [
    "direct", "directrunner", "DIRECT", "SwitchingDirectRunner",
    "apache_beam.runners.direct.direct_runner.DirectRunner"])
def test_every_spelling_of_the_direct_runner_runs_in_process(tmp_path,
                                                             runner):
  # Beam reads --runner in any case, with or without 'Runner': each of these
  # is its DirectRunner, so each runs in-process (no Prism download) and
  # shows the progress line, as a run without --runner does.
  archive = _zip(str(tmp_path / "busi.zip"))
  job = pipeline.create(["preprocess", "--input", archive, "--output",
                         str(tmp_path / "out"), "--image_size", "32",
                         "--runner", runner])
  assert isinstance(job.pipeline.runner, FnApiRunner)
  stream = io.StringIO()
  manifest = pipeline.execute(job, progress_to=stream, progress_every_s=0.02)
  assert manifest["invariant"]["holds"]
  assert stream.getvalue().splitlines()[-1].startswith("preprocessed ")


def _producer(p: beam.Pipeline, full_label: str) -> str:
  """The full label of the step whose output `full_label` reads."""
  found = {}

  class Visitor(beam.pipeline.PipelineVisitor):

    def enter_composite_transform(self, node):
      found[node.full_label] = node

    def visit_transform(self, node):
      found[node.full_label] = node

  p.visit(Visitor())
  assert full_label in found, sorted(found)
  (pcoll,) = found[full_label].inputs
  return pcoll.producer.full_label


def test_score_spreads_records_after_reading(tmp_path, model_dir):
  image = records.ImageRecord("a" * 64, "x.png", "benign",
                              af.expected_pixels(af.png(af.phantom(0)), 16),
                              16, 16)
  shard = training_testing.write_tfrecords(
      os.path.join(str(tmp_path), "one.tfrecord.gz"), [image])
  p = make_test_pipeline()
  pipeline.create(["score", "--input", shard, "--model", model_dir,
                   "--output", str(tmp_path / "out")], test_pipeline=p)
  assert _producer(p, "ReadTFRecords/SpreadRecords").startswith(
      "ReadTFRecords/ReadRecords")
  assert _producer(p, "ReadTFRecords/ParseExamples").startswith(
      "ReadTFRecords/SpreadRecords")


def test_summary_values_share_one_column_however_long_a_name():
  manifest = {"run_id": "r", "command": "run", "wall_time_s": 1.0,
              "counts": {"predictions": 2, "errors": 0},
              "invariant": {"rule": "r", "holds": True}, "output": "o",
              schemas.EXECUTE_COUNTERS: {"predictions": 2,
                                  "quality_burned_in_annotation": 1,
                                  "errors_decode": 0}}
  summary = cli.format_summary(manifest)
  block = summary.split("Beam counters (committed):\n")[1].splitlines()
  assert len(block) == 3
  assert len({line.rindex(" ") for line in block}) == 1, block
  assert all(line.startswith("    ") for line in block)
