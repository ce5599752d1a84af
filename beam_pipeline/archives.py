"""Reading image archives (zip, tar, tar.gz) and plain files through Beam FileSystems.

Archives are streamed, never loaded whole or extracted to disk. A zip is split
into ranges of members using its central directory, so that the ranges can be
spread over workers and each worker seeks straight to its members; a tar has no
index, so it is read sequentially and its members are handed on one at a time.
"""

import posixpath
import tarfile
import zipfile
from typing import Iterator, NamedTuple, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

ZIP = "zip"
TAR = "tar"
FILE = "file"

DEFAULT_MAX_MEMBER_BYTES = 512 * 1024 * 1024
DEFAULT_ZIP_CHUNK = 16

_READ_BLOCK = 1 << 20


class ArchiveError(Exception):
  """An archive or member that cannot be read; `kind` is its error_type."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind

  def __reduce__(self):  # picklable, so Members can cross a shuffle
    return (type(self), (self.kind, str(self)))


class ZipRange(NamedTuple):
  """Members [start, stop) of one zip, in central-directory order."""
  uri: str
  start: int
  stop: int


class Member(NamedTuple):
  """One archive member (or plain file) as it leaves the reader.

  Exactly one of `data` or `error` is set for regular entries; masks and
  directories carry neither, since their bytes are never needed.
  """
  source: str
  path: str  # path inside the archive, or the file's URI
  kind: str  # "file", "dir", "mask" or "error"
  data: Optional[bytes] = None
  error: Optional[ArchiveError] = None


def member_source(archive_uri: str, member_path: str) -> str:
  """The `source` of an archive member: archive URI + '!/' + member path."""
  return f"{archive_uri}!/{member_path.lstrip('/')}"


def archive_kind(uri: str) -> str:
  """ZIP, TAR or FILE from the name; the bytes are checked when opened."""
  lower = uri.lower()
  if lower.endswith(".zip"):
    return ZIP
  if lower.endswith((".tar", ".tar.gz", ".tgz")):
    return TAR
  return FILE


def open_raw(uri: str):
  """Opens a local or remote file for reading its bytes as stored.

  Compression is never guessed from the name here: a .tar.gz is handed to
  tarfile as it is.
  """
  return FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED)


def read_limited(stream, limit: int, what: str) -> bytes:
  """Reads a stream to its end, refusing more than `limit` bytes.

  The limit is enforced on the bytes actually produced, so lying headers
  cannot get a bigger member past it.
  """
  chunks = []
  total = 0
  while True:
    block = stream.read(min(_READ_BLOCK, limit + 1 - total))
    if not block:
      return b"".join(chunks)
    total += len(block)
    if total > limit:
      raise ArchiveError(
          "MemberTooLarge",
          f"{what} inflates to more than {limit} bytes (--max_member_bytes)")
    chunks.append(block)


def _classify(path: str, is_dir: bool) -> Optional[str]:
  from beam_pipeline import imaging  # pylint: disable=import-outside-toplevel
  if is_dir:
    return "dir"
  if imaging.is_mask(path):
    return "mask"
  return None


def count_zip_members(uri: str) -> int:
  """Number of entries in a zip's central directory.

  Raises:
    ArchiveError: the file is not a readable zip.
  """
  try:
    with open_raw(uri) as f, zipfile.ZipFile(f) as zf:
      return len(zf.infolist())
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
    raise ArchiveError("BadArchive", f"not a readable zip: {e}") from e


def split_zip(uri: str, count: int, chunk: int = DEFAULT_ZIP_CHUNK
             ) -> Iterator[ZipRange]:
  """Splits a zip of `count` members into ranges of at most `chunk`."""
  for start in range(0, count, chunk):
    yield ZipRange(uri, start, min(start + chunk, count))


class OpenZipCache:
  """Keeps the most recently used zip open (one file handle per worker)."""

  def __init__(self):
    self._uri = None
    self._file = None
    self._zip = None

  def get(self, uri: str) -> zipfile.ZipFile:
    if uri != self._uri:
      self.close()
      f = open_raw(uri)
      try:
        self._zip = zipfile.ZipFile(f)
      except Exception:
        f.close()
        raise
      self._file, self._uri = f, uri
    return self._zip

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
      self._file.close()
    self._uri = self._file = self._zip = None


def read_zip_range(zip_range: ZipRange, max_member_bytes: int,
                   cache: Optional[OpenZipCache] = None) -> Iterator[Member]:
  """Yields the members of one range of a zip, one at a time.

  Every member in the range yields exactly one Member, an error one if it
  cannot be read; if the archive itself cannot be opened, every member of the
  range gets that error.

  Args:
    zip_range: which members to read.
    max_member_bytes: refuse members that inflate to more than this.
    cache: keeps the archive open for the next range; without one the archive
      is opened and closed here.
  """
  uri, start, stop = zip_range
  own = cache is None
  cache = cache or OpenZipCache()
  try:
    zf = cache.get(uri)
  except Exception as e:  # pylint: disable=broad-except
    error = ArchiveError("BadArchive", f"cannot reopen zip: {e}")
    for index in range(start, stop):
      yield Member(f"{uri}!/#{index}", f"#{index}", "error", error=error)
    return
  try:
    infos = zf.infolist()
    for index in range(start, stop):
      info = infos[index]
      source = member_source(uri, info.filename)
      kind = _classify(info.filename, info.is_dir())
      if kind:
        yield Member(source, info.filename, kind)
        continue
      if info.flag_bits & 0x1:
        yield Member(source, info.filename, "error", error=ArchiveError(
            "EncryptedMember", "member is encrypted; decrypt the archive first"))
        continue
      try:
        with zf.open(info) as stream:
          data = read_limited(stream, max_member_bytes, "member")
        yield Member(source, info.filename, "file", data=data)
      except ArchiveError as e:
        yield Member(source, info.filename, "error", error=e)
      except Exception as e:  # pylint: disable=broad-except
        # zlib.error, BadZipFile (CRC), NotImplementedError (compression), ...
        yield Member(source, info.filename, "error", error=ArchiveError(
            "BadMember", f"{type(e).__name__}: {e}"))
  finally:
    if own:
      cache.close()


def read_tar(uri: str, max_member_bytes: int) -> Iterator[Member]:
  """Streams a tar or tar.gz, yielding each entry as one Member.

  If the archive breaks part-way (truncated upload), the members already read
  are kept and one error Member for the archive says where it stopped.
  """
  index = 0
  try:
    with open_raw(uri) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
      for info in tf:
        index += 1
        source = member_source(uri, info.name)
        kind = _classify(info.name, info.isdir())
        if kind:
          yield Member(source, info.name, kind)
          continue
        if not info.isfile():
          yield Member(source, info.name, "error", error=ArchiveError(
              "NotARegularFile",
              f"tar entry of type {info.type!r} (link or device) is not read"))
          continue
        if info.size > max_member_bytes:
          yield Member(source, info.name, "error", error=ArchiveError(
              "MemberTooLarge",
              f"member is {info.size} bytes, over {max_member_bytes}"
              " (--max_member_bytes)"))
          continue
        stream = tf.extractfile(info)
        try:
          data = read_limited(stream, max_member_bytes, "member")
        except ArchiveError as e:
          yield Member(source, info.name, "error", error=e)
          continue
        yield Member(source, info.name, "file", data=data)
  except Exception as e:  # pylint: disable=broad-except
    # tarfile.ReadError, EOFError, zlib/gzip errors on truncated archives.
    what = ("not a readable tar" if index == 0 else
            f"archive breaks after {index} members")
    yield Member(uri, posixpath.basename(uri), "error",
                 error=ArchiveError("BadArchive",
                                    f"{what}: {type(e).__name__}: {e}"))


def read_file(uri: str, max_member_bytes: int) -> Member:
  """Reads a plain (non-archive) input file as a single member."""
  kind = _classify(uri, False)
  if kind:
    return Member(uri, uri, kind)
  try:
    with open_raw(uri) as f:
      return Member(uri, uri, "file",
                    data=read_limited(f, max_member_bytes, "file"))
  except ArchiveError as e:
    return Member(uri, uri, "error", error=e)
  except Exception as e:  # pylint: disable=broad-except
    return Member(uri, uri, "error", error=ArchiveError(
        "ReadFailed", f"{type(e).__name__}: {e}"))
