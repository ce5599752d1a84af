"""How runs end when the output cannot take them: one line, its own status.

The faults are made here: a tmpfs mounted small (disk full) or read-only
(root only; skipped with the reason otherwise, since chmod does not stop
root), monkeypatched writes for a full disk without root, and a real
`python -m beam_pipeline` sent SIGINT or SIGTERM part-way through its writes.
"""

import contextlib
import errno
import glob
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

import schemas
from beam_pipeline import cli, failures, outputs, pipeline
from tests import archive_factory as af
from tests.pipeline_helpers import read_records, sql

SIZE = 16
N_IMAGES = 120
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def big_zip(tmp_path_factory):
  """Enough images for a run that writes for a few seconds."""
  rng = np.random.default_rng(3)
  path = str(tmp_path_factory.mktemp("in") / "big.zip")
  af.write_zip(path, [af.Entry(f"benign/{i}.png",
                               af.png(af.speckle(rng, 200, 200)), "image",
                               "benign") for i in range(N_IMAGES)])
  return path


@contextlib.contextmanager
def tmpfs(path, options: str):
  """A tmpfs mounted at `path` for the test; skips where mount is refused."""
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                         str(path)], capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN):"
                f" {done.stderr.strip()}")
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path, options: str) -> None:
  subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def launch(args) -> subprocess.Popen:
  """`python -m beam_pipeline ARGS` in its own process group, as a terminal
  would run it (SIGINT not ignored, even if this test's shell ignores it)."""
  return subprocess.Popen(
      [sys.executable, "-m", "beam_pipeline"] + list(args), cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def console_lines(stderr: str):
  """stderr without TensorFlow's C++ start-up lines, which Python cannot
  silence (they come before absl's logging is set up)."""
  return [line for line in stderr.splitlines() if line.strip() and not (
      line[:1] in "IWEF" and line[1:5].isdigit() or "absl::" in line)]


def assert_one_line(stderr: str, prefix: str) -> str:
  """A single meaningful line, last, and no traceback or Beam error log."""
  lines = console_lines(stderr)
  assert "Traceback" not in stderr, stderr[-3000:]
  assert not [line for line in lines if line.startswith("ERROR")], lines
  said = [line for line in lines
          if line.startswith(("error:", "interrupted:"))]
  assert len(said) == 1 and lines[-1] == said[0], lines
  assert said[0].startswith(prefix), said
  return said[0]


def beam_temp_leftovers(out):
  return glob.glob(os.path.join(out, "**", "beam-temp-*"), recursive=True)


def kill_mid_run(proc, out, sig) -> None:
  """Sends `sig` to the run's process group while Beam is writing (its
  temporary folders exist) and asserts the run had not finished."""
  deadline = time.time() + 240
  while not beam_temp_leftovers(out):
    assert proc.poll() is None, ("the run ended before it began writing",
                                 proc.communicate()[1][-3000:])
    assert time.time() < deadline, "the run never began writing"
    time.sleep(0.02)
  os.killpg(proc.pid, sig)
  try:
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the run outlived {sig!r} by a minute")
  assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE)), (
      "the run finished before the signal: nothing was tested")


def assert_complete_without_leftovers(out, manifest) -> None:
  assert manifest["complete"] and manifest["counts"]["predictions"] == N_IMAGES
  assert beam_temp_leftovers(out) == []
  assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE + ".tmp"))
  rows = sql(f"SELECT count(*), count(DISTINCT source), count(DISTINCT run_id)"
             f" FROM read_parquet('{out}/predictions/*.parquet')")
  assert rows == [(N_IMAGES, N_IMAGES, 1)]


# --- Ctrl-C and SIGTERM ---

@pytest.mark.slow
def test_ctrl_c_mid_run_is_one_line_and_exit_130(tmp_path, model_dir,
                                                 big_zip):
  out = str(tmp_path / "out")
  argv = ["run", "--input", big_zip, "--model", model_dir, "--output", out]
  proc = launch(argv + ["--direct_num_workers", "2",
                        "--direct_running_mode", "multi_threading"])
  kill_mid_run(proc, out, signal.SIGINT)
  _, stderr = proc.communicate()
  assert proc.returncode == cli.EXIT_INTERRUPTED, stderr[-3000:]
  line = assert_one_line(stderr, "interrupted:")
  assert "rerun the same command" in line
  assert beam_temp_leftovers(out)  # what the rerun must remove
  assert_complete_without_leftovers(out, pipeline.run(argv))


@pytest.mark.slow
def test_rerun_after_sigterm_keeps_no_beam_temp_folders(tmp_path, model_dir,
                                                         big_zip):
  out = str(tmp_path / "out")
  argv = ["run", "--input", big_zip, "--model", model_dir, "--output", out]
  proc = launch(argv)
  kill_mid_run(proc, out, signal.SIGTERM)
  proc.communicate()
  assert proc.returncode == -signal.SIGTERM  # 143 in a shell
  assert beam_temp_leftovers(out)
  # An interrupted write of the manifest, and a Beam folder at the top.
  open(os.path.join(out, schemas.MANIFEST_FILE + ".tmp"), "w").close()
  os.makedirs(os.path.join(out, "beam-temp-part-0123"))
  assert_complete_without_leftovers(out, pipeline.run(argv))
  assert sorted(os.listdir(out)) == sorted(
      [schemas.ERRORS_DIR, schemas.MANIFEST_FILE, schemas.PREDICTIONS_DIR,
       schemas.TFRECORD_DIR])


# --- disk full ---

@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_exit_4(tmp_path, model_dir,
                                                  big_zip):
  with tmpfs(tmp_path / "mnt", "size=12k") as mnt:
    out = os.path.join(mnt, "out")
    argv = ["run", "--input", big_zip, "--model", model_dir, "--output", out]
    # Threaded workers: each prints its failed bundle's traceback unless
    # the launcher keeps them off the console.
    proc = launch(argv + ["--direct_num_workers", "2",
                          "--direct_running_mode", "multi_threading"])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == cli.EXIT_IO, stderr[-3000:]
    line = assert_one_line(stderr, "error:")
    assert "No space left on device" in line and "--output" in line
    assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
    # Room made: the same command completes, with nothing left of the first.
    remount(mnt, "size=16m")
    assert_complete_without_leftovers(out, pipeline.run(argv))


def test_disk_full_without_root_through_a_failing_write(tmp_path, model_dir,
                                                        monkeypatch, capsys):
  from apache_beam.io import parquetio

  def full(*unused_args, **unused_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(parquetio._ParquetSink, "write_record", full)  # pylint: disable=protected-access
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = str(tmp_path / "out")
  status = cli.main(["run", "--input", archive, "--model", model_dir,
                     "--output", out])
  assert status == cli.EXIT_IO
  err = capsys.readouterr().err
  assert_one_line(err, "error: the run stopped writing to")
  assert "No space left on device — free space" in err


def test_full_disk_found_by_the_probe_deletes_nothing(tmp_path, model_dir,
                                                      monkeypatch, capsys):
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  out = str(tmp_path / "out")
  argv = ["preprocess", "--input", archive, "--output", out, "--image_size",
          str(SIZE)]
  assert cli.main(argv) == 0
  real_create = FileSystems.create

  class FullFile:
    """Takes the bytes and fails as a full disk does: at flush/close."""

    def __init__(self, handle):
      self._handle = handle

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._handle.close()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, data):
      return self._handle.write(data)

  def create(path, *args, **kwargs):
    return FullFile(real_create(path, *args, **kwargs))

  monkeypatch.setattr(FileSystems, "create", staticmethod(create))
  capsys.readouterr()
  assert cli.main(argv + ["--overwrite"]) == cli.EXIT_IO
  line = assert_one_line(capsys.readouterr().err, "error:")
  assert line == (f"error: cannot write to {out}: No space left on device —"
                  " free space or choose another --output")
  # The completed run is untouched: the probe came before any deletion.
  assert os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
  assert len(read_records(out)) == 3


# --- read-only output ---

def test_read_only_output_is_refused_before_anything_is_deleted(
    tmp_path, capsys):
  archive = str(tmp_path / "a.zip")
  af.write_zip(archive, af.busi_entries(1))
  with tmpfs(tmp_path / "mnt", "size=4m") as mnt:
    out = os.path.join(mnt, "out")
    argv = ["preprocess", "--input", archive, "--output", out,
            "--image_size", str(SIZE)]
    assert cli.main(argv) == 0
    # A leftover beside the completed run, then the file system goes ro.
    os.makedirs(os.path.join(out, schemas.TFRECORD_DIR, "beam-temp-part-x"))
    remount(mnt, "ro")
    before = sorted(os.listdir(os.path.join(out, schemas.TFRECORD_DIR)))
    capsys.readouterr()
    assert cli.main(argv + ["--overwrite"]) == cli.EXIT_IO
    line = assert_one_line(capsys.readouterr().err, "error:")
    assert line == (f"error: cannot write to {out}: Read-only file system —"
                    " choose a writable --output")
    assert sorted(os.listdir(os.path.join(out, schemas.TFRECORD_DIR))) == (
        before)
    assert os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
    # A new output folder on the read-only file system: the same line.
    fresh = os.path.join(mnt, "new")
    assert cli.main(["preprocess", "--input", archive, "--output",
                     fresh]) == cli.EXIT_IO
    assert "Read-only file system" in capsys.readouterr().err


# --- inputs and outputs apart, whatever the spelling ---

def test_input_inside_the_output_is_refused_with_or_without_overwrite(
    tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  os.makedirs("o/nested")
  af.write_zip("o/nested/a.zip", af.busi_entries(1))
  os.symlink(str(tmp_path / "o"), "link")
  before = open("o/nested/a.zip", "rb").read()
  for spelling in ("o", "./o", "o//", str(tmp_path / "o"), "link",
                   "x/../o"):
    for inputs in (["o/nested/a.zip"], ["./o/nested/*.zip"],
                   [str(tmp_path / "link" / "nested" / "a.zip")]):
      for overwrite in ([], ["--overwrite"]):
        flags = ["--input"] + inputs + ["--output", spelling] + overwrite
        assert cli.main(["preprocess"] + flags) == cli.EXIT_USAGE, flags
        line = assert_one_line(capsys.readouterr().err, "error: --input")
        assert "lies in --output" in line
  assert open("o/nested/a.zip", "rb").read() == before
  assert sorted(os.listdir("o")) == ["nested"]


def test_output_inside_an_input_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("data/site")
  af.write_zip("data/site/a.zip", af.busi_entries(1))
  os.symlink(str(tmp_path / "data"), "alias")
  for output in ("data/site/out", "./data/site/out//", "alias/site/out",
                 str(tmp_path / "data" / "site")):
    for inputs in (["data"], ["./data/"], ["alias//site"], ["data/site/"]):
      for overwrite in (False, True):
        with pytest.raises(outputs.OutputDirInUse,
                           match="lies in --input|lies in --output"):
          outputs.prepare_output_dir(output, overwrite, inputs)
  assert sorted(os.listdir("data/site")) == ["a.zip"]


def test_output_beside_the_inputs_is_fine(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("data")
  af.write_zip("data/a.zip", af.busi_entries(1))
  outputs.prepare_output_dir("data-out", False, ["data/*.zip", "data"])
  outputs.prepare_output_dir("data/../out", False, ["data/a.zip"])
  assert sorted(os.listdir(tmp_path)) == ["data", "data-out", "out"]
  assert os.listdir("out") == []  # the probe came and went


@pytest.mark.slow
def test_leftovers_on_cloud_storage_are_removed(gcs_client):
  from busi_core import gcs
  from tests.conftest import BUCKET
  gcs.configure_for_emulator()
  bucket = gcs_client.bucket(BUCKET)
  names = ["o/predictions/beam-temp-part-1/x.parquet",
           "o/predictions/part-00000-of-00001.parquet",
           "o/tfrecords/beam-temp-part-2/y.tfrecord.gz",
           "o/beam-temp-part-3/z", "o/manifest.json.tmp",
           "o/.busi-write-probe-dead", "o/notes.txt", "in/a.zip"]
  for name in names:
    bucket.blob(f"exits/{name}").upload_from_string(b"x")
  root = f"gs://{BUCKET}/exits"
  with pytest.raises(outputs.OutputDirInUse, match="lies in --output"):
    outputs.prepare_output_dir(f"gs://{BUCKET}//exits/in/.", True,
                               [f"{root}/in/*.zip"])
  outputs.prepare_output_dir(f"{root}/o", False, [f"{root}/in/*.zip"])
  left = sorted(b.name for b in gcs_client.list_blobs(BUCKET,
                                                      prefix="exits/"))
  assert left == ["exits/in/a.zip", "exits/o/notes.txt"]


# --- recognising the causes ---

def test_a_missing_or_forbidden_bucket_is_named_with_its_status():
  from apache_beam.io.filesystem import BeamIOError
  from google.api_core import exceptions
  # As Beam wraps a failed match of gs://no-such/in/*.zip: twice over.
  missing = exceptions.NotFound(
      "GET http://127.0.0.1:1/storage/v1/b/no-such/o?prefix=in%2F: gone")
  listed = BeamIOError("List operation failed", {"gs://no-such/in/": missing})
  matched = BeamIOError("Match operation failed",
                        {"gs://no-such/in/*.zip": listed})
  assert failures.gcs_refusal(matched) == (
      404, "Cloud Storage: bucket no-such: not found (404); check the"
      " bucket's name and that it exists")
  forbidden = exceptions.Forbidden(
      "POST https://storage.googleapis.com/upload/storage/v1/b/theirs/o: no")
  assert failures.gcs_refusal(forbidden) == (
      403, "Cloud Storage: bucket theirs: access denied (403); grant this"
      " account access to the bucket or choose another")
  assert failures.gcs_refusal(RuntimeError("404")) is None
  # Another service's 404, or one that names no bucket, is not claimed.
  import urllib.error  # pylint: disable=import-outside-toplevel
  assert failures.gcs_refusal(urllib.error.HTTPError(
      "http://h/b/x/o", 404, "Not Found", {}, None)) is None
  assert failures.gcs_refusal(exceptions.NotFound("no bucket named")) is None
  assert failures.gcs_refusal(exceptions.NotFound(
      "GET https://storage.googleapis.com/storage/v1/b/mine/o/x.zip: No such"
      " object: mine/x.zip")) == (
          404, "Cloud Storage: an object in bucket mine: not found (404);"
          " check the path")


def test_io_causes_are_found_however_beam_wraps_them():
  from apache_beam.io.filesystem import BeamIOError
  # What Beam raises for a worker's full disk: the text, chained.
  chained = RuntimeError("OSError: [Errno 28] No space left on device"
                         " [while running 'WritePredictions/Write']")
  chained.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert failures.io_cause(chained).reason == "No space left on device"
  text_only = RuntimeError("Traceback ...\nOSError: [Errno 30] Read-only"
                           " file system: '/out/x' [while running 'W']")
  assert failures.io_cause(text_only).reason == "Read-only file system"
  beam = BeamIOError("Delete operation failed",
                     {"/o/x": PermissionError(errno.EACCES, "denied", "/o/x")})
  cause = failures.io_cause(beam)
  assert (cause.reason, cause.filename) == ("Permission denied", "/o/x")
  quota = RuntimeError("OSError: [Errno 122] Disk quota exceeded")
  assert failures.io_cause(quota).reason == "Disk quota exceeded"

  class Forbidden(Exception):
    code = 403

  assert failures.io_cause(Forbidden("no storage.objects.create")).reason == (
      "Permission denied")
  assert failures.io_cause(ValueError("bad pixels")) is None
  assert failures.io_cause(FileNotFoundError(errno.ENOENT, "gone")) is None
  assert failures.interrupted(RuntimeError(
      "KeyboardInterrupt [while running 'Decode']"))
  assert not failures.interrupted(RuntimeError("ValueError: x"))


def test_the_console_keeps_warnings_but_not_beams_false_resource_one():
  """Our INFO and other libraries' warnings reach the console; Beam 2.77's
  "Resource module is not available" (logged on every Linux worker without
  torch) does not."""
  from beam_pipeline import cli  # pylint: disable=import-outside-toplevel
  console = cli._ConsoleFilter()  # pylint: disable=protected-access

  def record(name, level, msg):
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)

  assert console.filter(record("beam_pipeline.pipeline", logging.INFO, "x"))
  assert console.filter(record("root", logging.WARNING, "disk is slow"))
  assert not console.filter(record("root", logging.INFO, "chatty"))
  assert not console.filter(record(
      "root", logging.WARNING, "Resource module is not available for current"
      " platform, memory usage cannot be fetched."))
