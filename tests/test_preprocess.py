"""The preprocessing stage: archives → TFRecords, masks counted, errors kept."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

import schemas
from beam_pipeline import pipeline
from busi_core import imaging, quality
from schemas import records as records_lib
from beam_pipeline import options as opts_lib
from beam_pipeline.preprocess import PreprocessLimits, ReadImages
from tests import archive_factory as af
from tests.pipeline_helpers import (assert_manifest_spelled_in_schemas,
                                    pixel_digest, read_errors, read_records,
                                    make_test_pipeline)

SIZE = 24


def _expected(archive_uri, entries):
  groups = af.by_fate(entries)
  images = sorted((imaging.image_id(e.data), f"{archive_uri}!/{e.path}",
                   e.label) for e in groups["image"])
  masks = sorted(f"{archive_uri}!/{e.path}" for e in groups["mask"])
  errors = sorted((f"{archive_uri}!/{e.path}", e.error_type)
                  for e in groups["error"])
  return images, masks, errors


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_read_images_routes_every_member(tmp_path, kind):
  entries = af.mixed_entries()
  path = str(tmp_path / f"data.{kind}")
  if kind == "zip":
    af.write_zip(path, entries)
  else:
    af.write_tar(path, entries, gz=kind == "tar.gz")
  images, masks, errors = _expected(path, entries)

  with make_test_pipeline() as p:
    out = p | ReadImages([path], PreprocessLimits(SIZE, zip_chunk_size=3),
                         "run-1")
    assert_that(out["examples"] | "Keys" >> beam.Map(records_lib.from_example)
                | beam.Map(lambda r: (r.image_id, r.source, r.label)),
                equal_to(images),
                label="Images")
    assert_that(out["masks"], equal_to(masks), label="Masks")
    assert_that(out["errors"] | "ErrKeys" >> beam.Map(
        lambda e: (e["source"], e["error_type"])), equal_to(errors),
                label="Errors")
    assert_that(out["members_seen"], equal_to([len(entries)]), label="Seen")


def test_pixels_match_opencv(tmp_path):
  entries = af.mixed_entries()
  path = str(tmp_path / "data.zip")
  af.write_zip(path, entries)
  expected = {imaging.image_id(e.data): af.expected_pixels(e.data, SIZE)
              for e in entries if e.fate == "image"}

  def check(examples):
    assert len(examples) == len(expected)
    for r in map(records_lib.from_example, examples):
      np.testing.assert_array_equal(r.pixels, expected[r.image_id])

  with make_test_pipeline() as p:
    out = p | ReadImages([path], PreprocessLimits(SIZE), "run-1")
    assert_that(out["examples"], check)


def test_unreadable_archives_become_errors(tmp_path):
  fake_zip = tmp_path / "not_really.zip"
  fake_zip.write_bytes(b"this is not a zip file at all")
  empty_tar = tmp_path / "empty.tar.gz"
  empty_tar.write_bytes(b"")
  with make_test_pipeline() as p:
    out = p | ReadImages([str(fake_zip), str(empty_tar)],
                         PreprocessLimits(SIZE), "run-1")
    assert_that(out["errors"] | beam.Map(
        lambda e: (os.path.basename(e["source"]), e["stage"],
                   e["error_type"])),
                equal_to([("not_really.zip", "read", "BadArchive"),
                          ("empty.tar.gz", "read", "BadArchive")]))


def _busi_zip(tmp_path, n_per_class=3, directories=True, seed=0):
  entries = af.busi_entries(n_per_class, seed)
  path = str(tmp_path / "Dataset_BUSI_with_GT.zip")
  af.write_zip(path, entries, directories=directories)
  return path, entries


def test_busi_zip_end_to_end(tmp_path):
  path, entries = _busi_zip(tmp_path, directories=False)
  out = str(tmp_path / "out")
  manifest = pipeline.run(["preprocess", "--input", path, "--output", out,
                           "--image_size", str(SIZE)])
  records = read_records(out)
  images = [e for e in entries if e.fate == "image"]
  assert len(records) == len(images) == 9
  assert sorted((r.image_id, r.label) for r in records) == sorted(
      (imaging.image_id(e.data), e.label) for e in images)
  assert not any(imaging.is_mask(r.source) for r in records)
  for r in records:
    assert r.pixels.shape == (SIZE, SIZE, 3)
    assert (r.original_height, r.original_width) == (45, 55)
  counts = manifest["counts"]
  assert counts == {"members_seen": len(entries), "images_written": 9,
                    "masks_skipped": len(entries) - 9, "errors": 0,
                    "inputs_vanished": 0, "extra_frames": 0,
                    "frames_skipped": 0}
  assert manifest["invariant"]["holds"] is True
  assert read_errors(out) == []
  on_disk = assert_manifest_spelled_in_schemas(out)
  assert on_disk["run_id"] == manifest["run_id"]
  assert on_disk["image_size"] == SIZE
  assert on_disk["format_version"] == schemas.FORMAT_VERSION
  assert on_disk["package_version"] == schemas.PACKAGE_VERSION
  assert on_disk["wall_time_s"] > 0


def _quality_zip(tmp_path):
  cases = af.quality_cases()
  path = str(tmp_path / "quality.zip")
  af.write_zip(path, [case.entry for case in cases])
  return path, {f"{path}!/{case.entry.path}": case.flags for case in cases}


def test_quality_flags_are_stored_and_counted(tmp_path):
  path, expected = _quality_zip(tmp_path)
  p = make_test_pipeline()
  out = p | ReadImages([path], PreprocessLimits(224), "run-1")
  assert_that(out["examples"] | beam.Map(records_lib.from_example)
              | beam.Map(lambda r: (r.source, r.quality_flags)),
              equal_to(sorted(expected.items())))
  result = p.run()
  result.wait_until_finish()
  counters = {c.key.metric.name: c.committed for c in result.metrics().query(
      MetricsFilter().with_namespace("busi"))["counters"]}
  fired = [f for flags in expected.values() for f in flags.split(",") if f]
  for name in schemas.QUALITY_FLAGS:
    assert counters.get(f"quality_{name}", 0) == fired.count(name), name
  assert counters["images_decoded"] == len(expected)


def test_quality_thresholds_are_flags(tmp_path):
  path, expected = _quality_zip(tmp_path)
  out = str(tmp_path / "out")
  pipeline.run(["preprocess", "--input", path, "--output", out,
                "--quality_colour_share", "1", "--quality_min_side=0",
                "--quality_max_aspect_ratio", "5"])
  got = {r.source: r.quality_flags for r in read_records(out)}
  assert got == {**expected, **{
      source: "" for source, flags in expected.items()
      if flags in (schemas.FLAG_COLOUR, schemas.FLAG_TINY,
                   schemas.FLAG_ASPECT_RATIO)}}
  assert sum(flags == "" for flags in got.values()) == 4


@pytest.mark.parametrize("flag,value,message", [
    ("--quality_colour_share", "-0.1", "outside 0.0..1.0"),
    ("--quality_colour_share", "1.5", "outside 0.0..1.0"),
    ("--quality_colour_share", "nan", "outside 0.0..1.0"),
    ("--quality_colour_tolerance", "256", "outside 0..255"),
    ("--quality_blank_std", "-1", "outside 0.0..128.0"),
    ("--quality_min_contrast", "-5", "outside 0..256"),
    ("--quality_min_side", "-1", "outside at least 0"),
    ("--quality_max_aspect_ratio", "0.5", "outside at least 1.0"),
])
def test_bad_quality_thresholds_are_refused(tmp_path, capsys, flag, value,
                                            message):
  from beam_pipeline import cli
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = str(tmp_path / "o")
  assert cli.main(["preprocess", "--input", archive, "--output", out, flag,
                   value]) == cli.EXIT_USAGE
  assert message in capsys.readouterr().err
  assert not os.path.exists(out)
  # Not a number: one line naming the flag, status 2 too (as for
  # --image_size).
  assert cli.main(["preprocess", "--input", archive, "--output", out, flag,
                   "ten"]) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert err.startswith(f"error: argument {flag}: invalid") and (
      "'ten'" in err) and len(err.splitlines()) == 1, err
  assert not os.path.exists(out)


def test_quality_flags_belong_to_preprocess_and_run(tmp_path, capsys):
  from beam_pipeline import cli
  assert cli.main(["preprocess", "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  defaults = opts_lib.quality_thresholds(opts_lib.BusiOptions([]))
  assert defaults == quality.QualityThresholds()
  for field, value in defaults._asdict().items():
    assert f"--quality_{field}" in text
    assert f"(default: {value})" in text
  assert cli.main(["run", "--help"]) == 0
  assert "--quality_min_side" in capsys.readouterr().out
  assert cli.main(["score", "--input", "x", "--output", str(tmp_path / "o"),
                   "--model", "m", "--quality_min_side", "10"]) == 2
  assert "--quality_min_side does not apply to score" in (
      capsys.readouterr().err)


def test_directories_and_text_are_the_only_errors(tmp_path):
  path, entries = _busi_zip(tmp_path, n_per_class=2, directories=True)
  out = str(tmp_path / "out")
  manifest = pipeline.run(["preprocess", "--input", path, "--output", out,
                           "--image_size", str(SIZE)])
  errors = read_errors(out)
  assert {e["error_type"] for e in errors} == {"Directory"}
  assert all(e["source"].endswith("/") for e in errors)
  assert all(e["run_id"] == manifest["run_id"] for e in errors)
  counts = manifest["counts"]
  assert counts["images_written"] == 6
  assert counts["members_seen"] == (counts["images_written"] +
                                    counts["masks_skipped"] + counts["errors"])


@pytest.mark.slow
def test_rerun_gives_same_examples_and_refuses_completed_output(tmp_path):
  path, _ = _busi_zip(tmp_path)
  argv = ["preprocess", "--input", path, "--image_size", str(SIZE)]
  pipeline.run(argv + ["--output", str(tmp_path / "a")])
  pipeline.run(argv + ["--output", str(tmp_path / "b")])
  first = {(r.image_id, pixel_digest(r)) for r in read_records(
      str(tmp_path / "a"))}
  second = {(r.image_id, pixel_digest(r)) for r in read_records(
      str(tmp_path / "b"))}
  assert first == second and len(first) == 9
  with pytest.raises(ValueError, match="--overwrite"):
    pipeline.run(argv + ["--output", str(tmp_path / "a")])
  manifest = pipeline.run(argv + ["--output", str(tmp_path / "a"),
                                  "--overwrite"])
  assert manifest["counts"]["images_written"] == 9
  assert len(read_records(str(tmp_path / "a"))) == 9


def test_plain_files_and_globs(tmp_path):
  rng = np.random.default_rng(7)
  folder = tmp_path / "benign"
  folder.mkdir()
  for i in range(3):
    (folder / f"img{i}.png").write_bytes(af.png(af.speckle(rng, 30, 30)))
  (folder / "img0_mask.png").write_bytes(af.png(af.speckle(rng, 30, 30)))
  out = str(tmp_path / "out")
  manifest = pipeline.run(["preprocess", "--input", str(folder / "*.png"),
                           "--output", out, "--image_size", "16"])
  assert manifest["counts"] == {"members_seen": 4, "images_written": 3,
                                "masks_skipped": 1, "errors": 0,
                                "inputs_vanished": 0, "extra_frames": 0,
                                "frames_skipped": 0}
  assert {r.label for r in read_records(out)} == {"benign"}


def test_bad_flags_fail_with_clear_messages(tmp_path):
  with pytest.raises(ValueError, match="--input"):
    pipeline.run(["preprocess", "--output", str(tmp_path)])
  with pytest.raises(ValueError, match="matches no file"):
    pipeline.run(["preprocess", "--input", str(tmp_path / "nope.zip"),
                  "--output", str(tmp_path / "o")])
  with pytest.raises(ValueError, match="usage"):
    pipeline.run(["--input", "x"])


def test_cli_help_and_errors(tmp_path, capsys):
  from beam_pipeline import cli
  assert cli.main(["preprocess", "--help"]) == 0
  assert "--max_compression_ratio" in capsys.readouterr().out
  assert cli.main([]) == 2
  assert cli.main(["preprocess", "--input", str(tmp_path / "none.zip"),
                   "--output", str(tmp_path / "o")]) == 2
  assert "matches no file" in capsys.readouterr().err


def test_misspelt_or_unknown_flags_are_refused_before_anything_runs(
    tmp_path, capsys):
  from beam_pipeline import cli
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = str(tmp_path / "o")
  for flags, message in (
      (["--threshhold", "0.5"], "unknown flag --threshhold (did you mean"
       " --threshold?)"),
      (["--inference_acclerator=type:nvidia-l4"],
       "did you mean --inference_accelerator?"),
      (["--image_siz", "8"], "did you mean --image_size?"),  # no abbreviations
      (["stray"], "unexpected argument 'stray'")):
    assert cli.main(["preprocess", "--input", archive, "--output", out,
                     *flags]) == cli.EXIT_USAGE, flags
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)
  # Beam's and Dataflow's own flags still pass through.
  opts_lib.refuse_unknown_flags([
      "--runner", "DataflowRunner", "--project", "p", "--region", "r",
      "--temp_location", "gs://b/t", "--machine_type", "g2-standard-4",
      "--experiments", "x", "--direct_num_workers", "2", "--image_size", "8"])


def test_each_command_has_its_own_help_and_flags(tmp_path, capsys):
  from beam_pipeline import cli
  assert cli.main(["--version"]) == 0
  assert schemas.PACKAGE_VERSION in capsys.readouterr().out
  assert cli.main(["--help"]) == 0
  top = capsys.readouterr().out
  assert all(c in top for c in ("preprocess", "score", "run", "summary",
                                "report"))
  assert cli.main(["score", "--help"]) == 0
  score_help = capsys.readouterr().out
  assert "--threshold" in score_help and "--max_pixels" not in score_help
  assert "(default: None)" not in score_help
  assert "(default: 32)" in score_help  # --batch_size
  assert cli.main(["preprocess", "-h"]) == 0
  assert "--model" not in capsys.readouterr().out
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  assert cli.main(["preprocess", "--input", archive, "--output",
                   str(tmp_path / "o"), "--threshold", "0.5"]) == 2
  assert "--threshold does not apply to preprocess" in (
      capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "o")


def test_unknown_commands_and_bad_flag_values_get_one_line(tmp_path, capsys):
  from beam_pipeline import cli
  for argv, message in (
      (["sumary", "--output", "x"],
       "error: unknown command 'sumary' (did you mean summary?); the first"
       " argument is one of preprocess, score, run, summary, report,"
       " compare, doctor"),
      (["--input", "x"], "error: no command before --input;"),
      (["xyz"], "error: unknown command 'xyz'; the first argument")):
    assert cli.main(argv) == cli.EXIT_USAGE, argv
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1, err
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = str(tmp_path / "o")
  # Beam's parser would print its whole usage (150 lines) before these.
  for flags, message in (
      (["--image_size", "abc"],
       "error: argument --image_size: invalid int value: 'abc'"),
      (["--gradcam", "some"], "error: argument --gradcam: invalid choice:"
       " 'some'"),
      (["--direct_num_workers", "x"],
       "error: argument --direct_num_workers: invalid int value: 'x'"),
      (["--image_size"], "error: argument --image_size: expected one"
       " argument")):
    assert cli.main(["preprocess", "--input", archive, "--output", out,
                     *flags]) == cli.EXIT_USAGE, flags
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)


def test_the_end_of_run_summary_says_why_members_failed(tmp_path, capsys):
  """The console names the commonest error types with an example each, so
  `zip -r`'s folder entries explain themselves without a query."""
  from beam_pipeline import cli
  path, _ = _busi_zip(tmp_path, n_per_class=1, directories=True)
  out = str(tmp_path / "out")
  assert cli.main(["preprocess", "--input", path, "--output", out,
                   "--image_size", str(SIZE)]) == cli.EXIT_OK
  printed = capsys.readouterr().out
  directories = len(read_errors(out))
  assert directories >= 1
  # `summary` refuses a preprocess run: the pointer is its errors table.
  assert (f"  errors by type (all; the errors table, {out}/errors/*.parquet,"
          f" lists each):\n    extract Directory: {directories}, e.g."
          " directory entry, not an image\n") in printed
  # More types than shown: the commonest three, long examples cut.
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  many = tmp_path / "many runs"  # a space: the command quotes it
  (many / schemas.ERRORS_DIR).mkdir(parents=True)
  kinds = ["A"] * 4 + ["B"] * 3 + ["C"] * 2 + ["D"]
  pq.write_table(pa.table({
      schemas.COLUMN_STAGE: ["decode"] * len(kinds),
      schemas.COLUMN_ERROR_TYPE: kinds,
      schemas.COLUMN_MESSAGE: ["x " * 200] * len(kinds)}),
                 many / schemas.ERRORS_DIR / "part-0.parquet")
  lines = cli.error_lines({schemas.MANIFEST_OUTPUT: str(many),
                           schemas.MANIFEST_COMMAND: schemas.COMMAND_SCORE,
                           schemas.MANIFEST_COUNTS: {schemas.COUNT_ERRORS: 10}})
  assert lines[0] == (
      "  errors by type (the 3 commonest of 4; `python -m beam_pipeline"
      f" summary --output '{many}'` lists each):")
  assert [l.split(",")[0] for l in lines[1:]] == [
      "    decode A: 4", "    decode B: 3", "    decode C: 2"]
  assert all(l.endswith("x...") for l in lines[1:])
  assert len(lines[1].split("e.g. ")[1]) == cli.ERROR_EXAMPLE_CHARS
  # Nothing to say: no errors, or output in an object store.
  assert cli.error_lines({schemas.MANIFEST_OUTPUT: str(many),
                          schemas.MANIFEST_COUNTS: {schemas.COUNT_ERRORS: 0}
                          }) == []
  assert cli.error_lines({schemas.MANIFEST_OUTPUT: "gs://b/run",
                          schemas.MANIFEST_COUNTS: {schemas.COUNT_ERRORS: 3}
                          }) == []
