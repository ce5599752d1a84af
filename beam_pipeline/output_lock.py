"""One run per output directory: the lock a run claims before touching it.

A run creates `DIR/.busi-run.lock` (schemas.RUN_LOCK_FILE) only where none
exists — `O_EXCL` locally, an if-generation-match=0 write on gs:// — before
it deletes or writes anything in DIR, and removes it right after writing the
manifest (or, from the launcher, when the run fails or is interrupted). A
second run finds the lock and is refused, naming the holder; it never deletes
what a live run is writing. A lock is stale, and taken over, when its
process is gone (same host, local output) or when it is older than
`--lock_stale_after_s` (another host, or any lock on gs://, where the job may
run on workers the launcher cannot see).
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import time
import uuid
from typing import NamedTuple, Optional, Set, Tuple

from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import gcs

_LOG = logging.getLogger(__name__)

# A claim writes its few bytes at once; a lock still unreadable after this
# long is what a claimer that died mid-write left.
_UNREADABLE_GRACE_S = 60.0
# Claims made by this process, released on Ctrl-C: (output, run_id).
_HELD: Set[Tuple[str, str]] = set()


class RunLock(NamedTuple):
  """The lock's content: who holds the output directory."""
  run_id: str
  host: str
  pid: int
  started_at: str  # UTC, ISO 8601

  def describe(self) -> str:
    return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started"
            f" {self.started_at})")


class OutputLocked(ValueError):
  """Another live run holds the output directory."""


def lock_uri(output: str) -> str:
  return FileSystems.join(output.rstrip("/"), schemas.RUN_LOCK_FILE)


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def _age_s(lock: RunLock) -> float:
  try:
    started = datetime.datetime.fromisoformat(lock.started_at)
  except (TypeError, ValueError):
    return float("inf")
  if started.tzinfo is None:
    started = started.replace(tzinfo=datetime.timezone.utc)
  return (_now() - started).total_seconds()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process, alive
  except (OverflowError, ValueError):
    return False
  return True


def is_stale(lock: RunLock, on_gcs: bool, stale_after_s: float,
             host: Optional[str] = None) -> bool:
  """Whether `lock` was left by a run that is gone.

  Args:
    lock: the lock found.
    on_gcs: the output is on gs:// (only the age counts there: the job may be
      running on Dataflow workers after its launcher is gone).
    stale_after_s: the age from which a lock counts as abandoned.
    host: this host's name (default: socket.gethostname()).
  """
  if not on_gcs and lock.host == (host or socket.gethostname()):
    return not _pid_alive(lock.pid)
  return _age_s(lock) > stale_after_s


def _parse(data: bytes) -> Optional[RunLock]:
  try:
    fields = json.loads(data.decode("utf-8"))
    return RunLock(str(fields["run_id"]), str(fields["host"]),
                   int(fields["pid"]), str(fields["started_at"]))
  except (ValueError, KeyError, TypeError, AttributeError):
    return None


class _Found(NamedTuple):
  """A lock as read: its content (None if unreadable), raw bytes, and its
  version (gs:// generation; local: None)."""
  lock: Optional[RunLock]
  data: bytes
  generation: Optional[int]
  age_s: float  # of the file or object itself


# --- local: O_EXCL ---

def _local_create(path: str, data: bytes) -> bool:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, data)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    with contextlib.suppress(OSError):
      os.unlink(path)
    raise
  os.close(fd)
  return True


def _local_read(path: str) -> Optional[_Found]:
  try:
    with open(path, "rb") as f:
      data = f.read()
    age = time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return None
  return _Found(_parse(data), data, None, age)


def _local_take_over(path: str, found: _Found) -> bool:
  """Moves the stale lock aside (atomic); False if it changed meanwhile."""
  aside = f"{path}.stale-{uuid.uuid4().hex}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return True  # another run removed it; compete for a fresh claim
  with open(aside, "rb") as f:
    moved = f.read()
  if moved != found.data:
    # A fresh claim came between reading and moving: put it back.
    with contextlib.suppress(OSError):
      os.link(aside, path)
    os.unlink(aside)
    return False
  os.unlink(aside)
  return True


# --- gs://: if-generation-match ---

def _blob(uri: str):
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  bucket, _, name = uri[len("gs://"):].partition("/")
  client = (storage.Client.create_anonymous_client() if gcs.using_emulator()
            else storage.Client())
  return client.bucket(bucket).blob(name)


def _gcs_create(uri: str, data: bytes) -> bool:
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  blob = _blob(uri)
  # Real Cloud Storage enforces the precondition; the local emulator ignores
  # it, so the existence check in `claim` is what it sees.
  try:
    blob.upload_from_string(data, content_type="application/json",
                            if_generation_match=0)
  except exceptions.PreconditionFailed:
    return False
  return True


def _gcs_read(uri: str) -> Optional[_Found]:
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  blob = _blob(uri)
  try:
    blob.reload()
    generation, created = blob.generation, blob.time_created
    data = blob.download_as_bytes(if_generation_match=generation)
  except (exceptions.NotFound, exceptions.PreconditionFailed):
    return None
  age = (_now() - created).total_seconds() if created else float("inf")
  return _Found(_parse(data), data, int(generation) if generation else None,
                age)


def _gcs_take_over(uri: str, found: _Found) -> bool:
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  try:
    _blob(uri).delete(if_generation_match=found.generation)
  except exceptions.NotFound:
    return True
  except exceptions.PreconditionFailed:
    return False
  return True


def _read(uri: str) -> Optional[_Found]:
  return _gcs_read(uri) if uri.startswith("gs://") else _local_read(uri)


def claim(output: str, run_id: str, stale_after_s: float,
          in_process: bool = True) -> RunLock:
  """Claims `output` for run `run_id`, taking over a stale lock.

  Args:
    output: the run's output directory (local or gs://).
    run_id: the run claiming it.
    stale_after_s: age from which a lock counts as abandoned (see
      `is_stale`).
    in_process: the run executes in this process (local runners), so Ctrl-C
      ends it and `release_held` may release its lock.

  Returns:
    The lock written.

  Raises:
    OutputLocked: a live run holds `output`; the message names it and what
      to do.
    OSError: the lock could not be written (read-only, full, ...).
  """
  uri = lock_uri(output)
  on_gcs = uri.startswith("gs://")
  create = _gcs_create if on_gcs else _local_create
  take_over = _gcs_take_over if on_gcs else _local_take_over
  lock = RunLock(run_id, socket.gethostname(), os.getpid(),
                 _now().isoformat(timespec="seconds"))
  data = json.dumps(lock._asdict(), indent=2).encode()
  for _ in range(5):
    found = _read(uri)
    if found is None:
      if create(uri, data):
        if in_process:
          _HELD.add((output, run_id))
        return lock
      continue  # another run claimed it just now: read whose it is
    if found.lock is None:
      stale = found.age_s > _UNREADABLE_GRACE_S
      holder = f"an unreadable lock {uri}"
    else:
      stale = is_stale(found.lock, on_gcs, stale_after_s)
      holder = found.lock.describe()
    if not stale:
      raise OutputLocked(
          f"--output {output} is in use by {holder}; wait for it to finish,"
          f" or remove {uri} if you are sure that run is dead")
    if take_over(uri, found):
      _LOG.warning("Taking over the stale lock of %s on %s", holder, output)
  raise OutputLocked(f"--output {output}: could not claim {uri} (other runs"
                     " keep claiming it); try again")


def release(output: str, run_id: str) -> None:
  """Removes the lock on `output` if run `run_id` holds it (a run taken
  over as stale must not remove its successor's lock). Never raises: a lock
  left behind is taken over by the next run once stale."""
  _HELD.discard((output, run_id))
  uri = lock_uri(output)
  try:
    found = _read(uri)
    if found is None or found.lock is None or found.lock.run_id != run_id:
      return
    if uri.startswith("gs://"):
      _gcs_take_over(uri, found)
    else:
      os.unlink(uri)
  except Exception:  # pylint: disable=broad-except
    _LOG.warning("Could not remove the lock %s; the next run takes it over"
                 " once stale", uri, exc_info=True)


def release_held() -> None:
  """Releases every lock this process claimed for an in-process run (on
  Ctrl-C, where the run dies with this process)."""
  for output, run_id in sorted(_HELD):
    release(output, run_id)
