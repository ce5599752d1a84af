"""Input globs → the paths a run promises to account for, matched once at launch.

Every path matched here ends in the run's outputs as members or as one error
row: the list is fixed when the job is built, so an input that vanishes before
it is read is an error row (`InputVanished`), never a silently smaller run.

Local globs are matched here rather than by Beam's LocalFileSystem, which
drops what it cannot stat (dangling or looping symlinks) and never lists
folders or symlinks to folders: those must become error rows too. The glob
syntax is Beam's (`*` within a folder, `**` across folders). Local names that
are not valid UTF-8 travel as bytes, since Beam's string coder refuses them.
"""

import errno
import os
import re
import stat
from typing import Iterable, List, Optional

import apache_beam as beam
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import archives
from busi_core.errors import MemberError

BROKEN_LINK = "BrokenLink"
NOT_A_REGULAR_FILE = "NotARegularFile"

_GLOB_CHARS = re.compile(r"^[^[*?]*")
# Names that say "an input" even on a folder (reported under `**` globs).
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def is_remote(path: str) -> bool:
  return "://" in path


def _looks_like_input(name: str) -> bool:
  return (archives.archive_kind(name) != archives.FILE or
          name.lower().endswith(_IMAGE_SUFFIXES))


def _match_local(pattern: str) -> List[str]:
  """Every entry a local glob names: files, folders, links, FIFOs, ...

  Folders are listed when the pattern does not recurse (`**`): a folder
  matched by `data/*` was named and is not read, so it gets an error row.
  Under `**` folders are what the glob walks through, and only those named
  like an input (`x.zip/`) or reached through a symlink are listed.
  """
  if pattern.endswith("/"):
    pattern += "*"
  prefix = _GLOB_CHARS.match(pattern).group(0)
  if prefix == pattern:
    return [pattern] if os.path.lexists(pattern) else []
  recursive = "**" in pattern
  root = os.path.dirname(prefix)
  regex = re.compile(FileSystem.translate_pattern(pattern))
  depth = pattern.count("/")
  found = []
  for dirpath, dirnames, filenames in os.walk(root or os.curdir):
    if not root:  # a bare `*.zip` is relative to the current folder
      dirpath = dirpath[len(os.curdir) + 1:]
    for name in filenames:
      path = os.path.join(dirpath, name) if dirpath else name
      if regex.match(path):
        found.append(path)
    for name in dirnames:
      path = os.path.join(dirpath, name) if dirpath else name
      if regex.match(path) and (not recursive or _looks_like_input(name) or
                                os.path.islink(path)):
        found.append(path)
    if not recursive:
      # Nothing deeper can match a pattern without `**`.
      dirnames[:] = [d for d in dirnames
                     if os.path.join(dirpath, d).count("/") < depth]
  return found


def match_pattern(pattern: str) -> List[str]:
  """The paths one input glob names now, sorted."""
  if is_remote(pattern):
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
  return sorted(_match_local(pattern))


def _same_place(path: str) -> str:
  if is_remote(path):
    return path
  return os.path.normpath(os.path.abspath(path))


def match_inputs(patterns: Iterable[str]) -> List[str]:
  """Expands every input glob once; overlapping globs give each path once.

  Raises:
    ValueError: a glob that matches nothing (a typo, or the wrong folder).
  """
  paths, seen = [], set()
  for pattern in patterns:
    matched = match_pattern(pattern)
    if not matched:
      raise ValueError(f"--input {archives.display_uri(pattern)!r} matches no file")
    for path in matched:
      key = _same_place(path)
      if key not in seen:
        seen.add(key)
        paths.append(path)
  return paths


def encode(path: str) -> bytes:
  """A path as a pipeline element (bytes: Beam's str coder refuses the
  surrogates that stand for undecodable bytes in local names)."""
  return os.fsencode(path)


def decode(element: bytes) -> str:
  return os.fsdecode(element)


def unreadable(path: str) -> Optional[MemberError]:
  """Why a matched local path cannot be read as a file, or None.

  Opening a FIFO blocks until something writes to it (forever, in a batch
  job); devices, sockets and folders are not images either; a dangling or
  looping symlink names nothing. Each becomes one error row instead of a
  hang or a silent loss. Remote objects are always plain bytes (a vanished
  one is found when it is read: see `archives.read_failure`).
  """
  if is_remote(path):
    return None
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    if os.path.islink(path):
      if e.errno == errno.ELOOP:
        return MemberError(BROKEN_LINK, "a symlink loop")
      target = archives.display_uri(os.readlink(path))
      return MemberError(BROKEN_LINK, f"a dangling symlink (to {target!r})")
    if e.errno == errno.ENOENT:
      return archives.vanished()
    return MemberError(
        "ReadFailed", f"{type(e).__name__}: {e.strerror or e}")
  if stat.S_ISREG(mode):
    return None
  what = ("a FIFO" if stat.S_ISFIFO(mode) else
          "a folder" if stat.S_ISDIR(mode) else
          "a socket" if stat.S_ISSOCK(mode) else "a device file")
  if os.path.islink(path):
    what = f"a symlink to {what}"
  return MemberError(
      NOT_A_REGULAR_FILE,
      f"{what}, not a file: only regular files are read"
      + (" (use a glob that reaches the files inside, e.g. DIR/**)"
         if stat.S_ISDIR(mode) else ""))


def _is_vanished(error_row) -> bool:
  return error_row[schemas.COLUMN_ERROR_TYPE] == archives.VANISHED


def count_vanished(errors: beam.PCollection) -> beam.PCollection:
  """Singleton count of the InputVanished rows among error rows."""
  return (errors
          | "Vanished" >> beam.Filter(_is_vanished)
          | "CountVanished" >> beam.combiners.Count.Globally())
