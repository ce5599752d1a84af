"""A run's output directory as `summary` and `report` read it: checked, and
local.

DuckDB reads local files. A run on gs:// is copied first — its
`predictions/` and `errors/` Parquet and `manifest.json`, nothing else —
through Beam's FileSystems (the IO the pipeline wrote it with, emulator
included) into a temporary directory, and the same SQL runs there; DuckDB's
network extension is not needed.
"""

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Iterator, NamedTuple, Optional

from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import gcs

_PARQUET_DIRS = (schemas.PREDICTIONS_DIR, schemas.ERRORS_DIR)


class RunDirError(ValueError):
  """The path holds no run to read; the message says what to pass."""


class RunFiles(NamedTuple):
  """A run directory made readable by DuckDB.

  Attributes:
    run_dir: the directory as given (local or gs://).
    local: a local directory holding its manifest and Parquet (`run_dir`
      itself when local).
    manifest: manifest.json, or None: the run did not finish (crashed,
      stopped, or still running).
  """
  run_dir: str
  local: str
  manifest: Optional[dict]

  @property
  def has_predictions(self) -> bool:
    return bool(glob.glob(os.path.join(self.local, schemas.PREDICTIONS_DIR,
                                       "*.parquet")))

  @property
  def is_preprocess_run(self) -> bool:
    command = (self.manifest or {}).get(schemas.MANIFEST_COMMAND)
    return command == schemas.COMMAND_PREPROCESS

  def incomplete_note(self) -> Optional[str]:
    """One line saying the run is incomplete, or None when it finished."""
    if self.manifest is not None:
      return None
    return (f"Run incomplete: no {schemas.MANIFEST_FILE} in {self.run_dir}"
            " (the run crashed, was stopped, or is still running); what it"
            " has written so far:")


def _no_run(run_dir: str, flag: str, why: str) -> RunDirError:
  return RunDirError(f"{flag} {run_dir} {why}; pass the --output of a"
                     " preprocess, score or run")


# What a run leaves in its --output even when it crashed before its first
# Parquet (its lock goes with it): a folder with none of these, nor a
# manifest, Parquet or lock, holds no run (an empty folder, a model
# artifact, a typo's neighbour).
_RUN_FOLDERS = (schemas.TFRECORD_DIR, schemas.ERRORS_DIR,
                schemas.PREDICTIONS_DIR, schemas.GRADCAM_DIR)
_BEAM_TEMP = "beam-temp-"
_HOLDS_NO_RUN = (
    f"holds no run (no {schemas.MANIFEST_FILE} and nothing else a run"
    f" writes: no {', '.join(f'{d}/' for d in _RUN_FOLDERS)} or"
    f" {_BEAM_TEMP}* folder, nor a run in progress)")


def _run_files(base: str) -> list:
  """Patterns of what summary and report read: Parquet, manifest, lock."""
  return ([FileSystems.join(base, sub, "*.parquet") for sub in _PARQUET_DIRS]
          + [FileSystems.join(base, name) for name in (schemas.MANIFEST_FILE,
                                                       schemas.RUN_LOCK_FILE)])


def _holds_a_run(run_dir: str) -> bool:
  """Whether a local folder holds anything a run writes (see _RUN_FOLDERS)."""
  escaped = glob.escape(run_dir)
  return (any(glob.glob(pattern) for pattern in _run_files(escaped))
          or any(os.path.isdir(os.path.join(run_dir, sub))
                 for sub in _RUN_FOLDERS)
          or bool(glob.glob(os.path.join(escaped, _BEAM_TEMP + "*"))))


def _copy_from_storage(run_dir: str, flag: str, local: str) -> None:
  """Copies the run's Parquet and manifest (and lock) under `local`, same
  layout."""
  base = run_dir.rstrip("/")
  found = [m.path for result in FileSystems.match(_run_files(base))
           for m in result.metadata_list]
  if not found:
    # "**" crosses "/": objects at any depth under each folder's prefix.
    traces = [FileSystems.join(base, sub, "**") for sub in _RUN_FOLDERS]
    traces.append(FileSystems.join(base, _BEAM_TEMP + "**"))
    if not any(result.metadata_list for result in FileSystems.match(
        traces, limits=[1] * len(traces))):
      raise _no_run(run_dir, flag, _HOLDS_NO_RUN)
  for path in found:
    relative = path[len(base):].lstrip("/")
    target = os.path.join(local, *relative.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileSystems.open(path, compression_type="uncompressed") as src, \
        open(target, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 22)


def load_manifest(local: str) -> Optional[dict]:
  """A local run directory's manifest.json, or None when it is missing."""
  path = os.path.join(local, schemas.MANIFEST_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@contextlib.contextmanager
def opened(run_dir: str, flag: str = "--output") -> Iterator[RunFiles]:
  """The run in `run_dir`, readable locally for the time of the block.

  Args:
    run_dir: a run's output directory, local or gs://.
    flag: the flag that named it, for the messages.

  Yields:
    RunFiles; a gs:// run's files are in a temporary directory, removed
    after the block.

  Raises:
    RunDirError: no such directory, a file, or nothing of a run there
      (`_HOLDS_NO_RUN`).
  """
  if "://" not in run_dir:
    if not os.path.exists(run_dir):
      raise _no_run(run_dir, flag, "does not exist")
    if not os.path.isdir(run_dir):
      raise _no_run(run_dir, flag, "is a file, not a run's output directory")
    if not _holds_a_run(run_dir):
      raise _no_run(run_dir, flag, _HOLDS_NO_RUN)
    yield RunFiles(run_dir, run_dir, load_manifest(run_dir))
    return
  gcs.configure_for_emulator()
  with tempfile.TemporaryDirectory(prefix="busi-run-") as local:
    _copy_from_storage(run_dir, flag, local)
    yield RunFiles(run_dir, local, load_manifest(local))
