"""Every matched input path ends as members or one error row: odd names,
links, folders, special files and inputs that vanish after launch."""

import os
import signal

import numpy as np
import pytest

from beam_pipeline import cli, inputs, pipeline
from busi_core import archives
from tests import archive_factory as af
from tests.pipeline_helpers import read_errors, read_records

SIZE = 8


def _png(value: int = 9) -> bytes:
  return af.png(np.full((6, 6), value, np.uint8))


def _preprocess(glob, out, *extra):
  return pipeline.run(["preprocess", "--input", glob, "--output", out,
                       "--image_size", str(SIZE), *extra])


class _HangGuard:
  """Fails a test that would otherwise block forever (a FIFO opened)."""

  def __enter__(self):
    def hung(signum, frame):
      raise TimeoutError("the run hung on an input")
    self._previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)

  def __exit__(self, *exc):
    signal.alarm(0)
    signal.signal(signal.SIGALRM, self._previous)


def test_local_names_that_are_not_utf8_are_escaped_not_fatal(tmp_path):
  folder = os.fsencode(str(tmp_path / "in"))
  os.makedirs(os.path.join(folder, b"benign"))
  with open(os.path.join(folder, b"benign", b"caf\xe9.png"), "wb") as f:
    f.write(_png())
  af.write_zip(os.fsdecode(os.path.join(folder, b"\xff.zip")),
               af.busi_entries(1))
  with open(os.path.join(folder, b"bad\xfe.png"), "wb") as f:
    f.write(b"not an image")
  out = str(tmp_path / "out")
  pattern = os.fsdecode(folder) + "/**"
  assert cli.main(["preprocess", "--input", pattern, "--output", out,
                   "--image_size", str(SIZE)]) == cli.EXIT_OK
  sources = {r.source: r for r in read_records(out)}
  plain = os.fsdecode(folder) + "/benign/caf\\xe9.png"
  assert sources[plain].label == "benign"
  assert sum(s.startswith(os.fsdecode(folder) + "/\\xff.zip!/")
             for s in sources) == 3
  (error,) = read_errors(out)
  assert error["source"] == os.fsdecode(folder) + "/bad\\xfe.png"
  assert error["error_type"] == "NotAnImage"


@pytest.mark.slow
def test_links_folders_and_special_files_each_become_one_row(tmp_path):
  folder = tmp_path / "in"
  folder.mkdir()
  (folder / "real.png").write_bytes(_png())
  os.symlink(str(folder / "gone.png"), str(folder / "dangling.png"))
  os.symlink(str(folder / "loop_b.png"), str(folder / "loop_a.png"))
  os.symlink(str(folder / "loop_a.png"), str(folder / "loop_b.png"))
  (folder / "x.zip").mkdir()  # a folder named like an archive
  (folder / "x.zip" / "inner.png").write_bytes(_png())
  target = tmp_path / "elsewhere"
  target.mkdir()
  os.symlink(str(target), str(folder / "linked"))
  os.mkfifo(str(folder / "pipe.png"))
  os.symlink(str(folder / "real.png"), str(folder / "alias.png"))
  expected = {"dangling.png": "BrokenLink", "loop_a.png": "BrokenLink",
              "loop_b.png": "BrokenLink", "x.zip": "NotARegularFile",
              "linked": "NotARegularFile", "pipe.png": "NotARegularFile"}
  out = str(tmp_path / "out")
  with _HangGuard():
    manifest = _preprocess(str(folder / "*"), out)
  errors = {os.path.basename(e["source"]): e for e in read_errors(out)}
  assert {k: e["error_type"] for k, e in errors.items()} == expected
  assert "dangling symlink" in errors["dangling.png"]["message"]
  assert "loop" in errors["loop_a.png"]["message"]
  assert "symlink to a folder" in errors["linked"]["message"]
  # A symlink to a file is read as the file it names.
  assert {os.path.basename(r.source) for r in read_records(out)} == {
      "real.png", "alias.png"}
  counts = manifest["counts"]
  assert counts["members_seen"] == 8 and counts["errors"] == 6
  assert manifest["invariant"]["holds"] and manifest["complete"]
  assert manifest["inputs_matched"] == 8

  # Passed by name, each gets the same row (the folder no BadArchive).
  for name, kind in expected.items():
    named = str(tmp_path / f"out_{name}")
    with _HangGuard():
      _preprocess(str(folder / name), named)
    (error,) = read_errors(named)
    assert error["error_type"] == kind, name


def test_recursive_globs_walk_folders_without_reporting_them(tmp_path):
  root = tmp_path / "busi"
  for cls in ("benign", "normal"):
    (root / cls).mkdir(parents=True)
    (root / cls / f"{cls} (1).png").write_bytes(_png())
  (root / "empty").mkdir()
  (root / "nested.zip").mkdir()
  found = inputs.match_pattern(str(root / "**"))
  assert found == sorted([str(root / "benign" / "benign (1).png"),
                          str(root / "normal" / "normal (1).png"),
                          str(root / "nested.zip")])
  # Without `**`, a matched folder is reported: it was named, not read.
  assert inputs.match_pattern(str(root / "*")) == sorted(
      str(root / name) for name in ("benign", "empty", "nested.zip", "normal"))
  assert inputs.match_pattern(str(root / "*" / "*.png")) == [
      str(root / "benign" / "benign (1).png"),
      str(root / "normal" / "normal (1).png")]


def test_overlapping_globs_and_spellings_read_each_file_once(tmp_path,
                                                            monkeypatch):
  af.write_zip(str(tmp_path / "a.zip"), af.busi_entries(1))
  monkeypatch.chdir(tmp_path)
  assert inputs.match_inputs(["*.zip", "./a.zip", str(tmp_path / "a.zip"),
                              "a.zip"]) == ["a.zip"]
  with pytest.raises(ValueError, match="matches no file"):
    inputs.match_inputs(["a.zip", "nothing/*.zip"])


def test_inputs_that_vanish_after_launch_are_counted_and_incomplete(tmp_path):
  folder = tmp_path / "in"
  folder.mkdir()
  af.write_zip(str(folder / "a.zip"), af.busi_entries(1))
  af.write_zip(str(folder / "b.zip"), af.busi_entries(1))
  (folder / "c.png").write_bytes(_png())
  out = str(tmp_path / "out")
  job = pipeline.create(["preprocess", "--input", str(folder / "*"),
                         "--output", out, "--image_size", str(SIZE)])
  os.remove(folder / "b.zip")  # gone between launch and read
  os.remove(folder / "c.png")
  job.pipeline.run().wait_until_finish()
  from beam_pipeline import outputs  # pylint: disable=import-outside-toplevel
  manifest = outputs.read_json(os.path.join(out, "manifest.json"))
  errors = {os.path.basename(e["source"]): e["error_type"]
            for e in read_errors(out)}
  assert errors == {"b.zip": archives.VANISHED, "c.png": archives.VANISHED}
  assert manifest["counts"]["inputs_vanished"] == 2
  assert manifest["invariant"]["holds"] and not manifest["complete"]
  assert manifest["incomplete_because"] == {"inputs_vanished": 2}
  assert cli.exit_status(manifest) == cli.EXIT_INCOMPLETE
  assert len(read_records(out)) == 3  # a.zip still made it


def test_a_run_whose_every_input_vanished_is_not_complete(tmp_path):
  archive = tmp_path / "a.zip"
  af.write_zip(str(archive), af.busi_entries(1))
  out = str(tmp_path / "out")
  job = pipeline.create(["preprocess", "--input", str(tmp_path / "*.zip"),
                         "--output", out, "--image_size", str(SIZE)])
  os.remove(archive)
  job.pipeline.run().wait_until_finish()
  from beam_pipeline import outputs  # pylint: disable=import-outside-toplevel
  manifest = outputs.read_json(os.path.join(out, "manifest.json"))
  assert manifest["counts"]["images_written"] == 0
  assert cli.exit_status(manifest) == cli.EXIT_INCOMPLETE


@pytest.mark.slow
def test_score_accounts_for_every_matched_shard_path(tmp_path, fake_model):
  from training import testing as training_testing  # pylint: disable=import-outside-toplevel
  model = str(tmp_path / "model")
  training_testing.make_test_artifact(model, image_size=SIZE)
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  pre = str(tmp_path / "pre")
  _preprocess(archive, pre)
  shards = tmp_path / "shards"
  shards.mkdir()
  (shard,) = (tmp_path / "pre" / "tfrecords").iterdir()
  odd = os.path.join(os.fsencode(str(shards)), b"caf\xe9.tfrecord.gz")
  with open(odd, "wb") as f:
    f.write(shard.read_bytes())
  (shards / "doomed.tfrecord.gz").write_bytes(shard.read_bytes())
  os.mkfifo(str(shards / "pipe.tfrecord.gz"))
  os.symlink(str(shards / "gone"), str(shards / "dangling.tfrecord.gz"))
  out = str(tmp_path / "out")
  job = pipeline.create(["score", "--input", str(shards / "*"),
                         "--model", model, "--output", out])
  os.remove(shards / "doomed.tfrecord.gz")
  with _HangGuard():
    job.pipeline.run().wait_until_finish()
  from beam_pipeline import outputs  # pylint: disable=import-outside-toplevel
  manifest = outputs.read_json(os.path.join(out, "manifest.json"))
  errors = {os.path.basename(e["source"]): e["error_type"]
            for e in read_errors(out)}
  assert errors == {"doomed.tfrecord.gz": archives.VANISHED,
                    "pipe.tfrecord.gz": "NotARegularFile",
                    "dangling.tfrecord.gz": "BrokenLink"}
  counts = manifest["counts"]
  assert counts["predictions"] == 3 and counts["members_seen"] == 6
  assert counts["inputs_vanished"] == 1 and not manifest["complete"]
  import duckdb  # pylint: disable=import-outside-toplevel
  sources = [s for (s,) in duckdb.sql(
      f"SELECT source FROM read_parquet('{out}/predictions/*.parquet')"
  ).fetchall()]
  assert len(sources) == 3


def test_an_output_name_that_is_not_utf8_is_refused_up_front(tmp_path,
                                                             capsys):
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"o\xe9"))
  assert cli.main(["preprocess", "--input", archive, "--output", out,
                   "--image_size", str(SIZE)]) == cli.EXIT_USAGE
  assert "is not valid UTF-8" in capsys.readouterr().err
  assert not os.path.lexists(out)
