"""Reading image archives (zip, tar, tar.gz) and plain files through Beam FileSystems.

Archives are streamed, never loaded whole or extracted to disk. A zip is split
into ranges of members using its central directory, so that the ranges can be
spread over workers and each worker seeks straight to its members; a tar has no
index, so it is read sequentially and its members are handed on one at a time.
"""

import collections
import posixpath
import struct
import tarfile
import zipfile
from typing import Dict, Iterator, NamedTuple, Optional

try:
  # ISA-L's inflate and CRC-32: 2-3× zlib's on the same bytes.
  from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
  import zlib as _zlib

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from busi_core import imaging
from busi_core.errors import MemberError

ZIP = "zip"
TAR = "tar"
FILE = "file"

# Safe defaults: a 500×500 ultrasound PNG is ~0.2 MB, a large DICOM-derived
# frame a few MB. Limits are enforced on the bytes actually inflated.
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_COMPRESSION_RATIO = 100.0
DEFAULT_MAX_MEMBERS = 1_000_000
DEFAULT_ZIP_CHUNK = 16
# Below this many inflated bytes the ratio is not checked: tiny members (a
# blank mask, say) compress far better than 100:1 and are harmless.
_RATIO_FLOOR_BYTES = 1024 * 1024

_READ_BLOCK = 1 << 20


# error_type of an input matched when the run started and gone when read.
VANISHED = "InputVanished"


def vanished() -> MemberError:
  return MemberError(
      VANISHED, "matched when the run started, gone when it was read")


def is_gone(uri: str) -> bool:
  """True if the input no longer exists (False when that cannot be told)."""
  try:
    return not FileSystems.exists(uri)
  except Exception:  # pylint: disable=broad-except
    return False


def read_failure(uri: str, error: MemberError) -> MemberError:
  """`error`, or InputVanished if the input no longer exists."""
  return vanished() if is_gone(uri) else error


class Limits(NamedTuple):
  """Per-member and per-archive limits, each a command-line flag."""
  max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
  max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO
  max_members: int = DEFAULT_MAX_MEMBERS


class ZipRange(NamedTuple):
  """Members [start, stop) of one zip, in central-directory order."""
  uri: str
  start: int
  stop: int


class Member(NamedTuple):
  """One archive member (or plain file) as it leaves the reader.

  Exactly one of `data` or `error` is set for regular entries; masks and
  directories carry neither, since preprocessing never needs their bytes
  (a reader called with `masks_only` gives masks their bytes or error).
  """
  source: str
  path: str  # path inside the archive, or the file's URI
  kind: str  # "file", "dir", "mask" or "error"
  data: Optional[bytes] = None
  error: Optional[MemberError] = None


# Longest member name kept in `source`; longer names are cut and marked.
MAX_NAME_CHARS = 1024
# Largest tar extended header (GNU long name, PAX record) we read: tarfile
# would otherwise load any size into memory before --max_member_bytes applies.
MAX_TAR_HEADER_BYTES = 64 * 1024


def clean_name(name: str) -> str:
  """A member name as valid UTF-8 text of bounded length.

  tarfile hands undecodable bytes over as surrogates; they become visible
  escapes here (`\\xe9`) instead of failing the Parquet and TFRecord writes.
  """
  text = name.encode("utf-8", "surrogateescape").decode("utf-8",
                                                        "backslashreplace")
  if len(text) > MAX_NAME_CHARS:
    text = text[:MAX_NAME_CHARS] + f"...[{len(text)} chars]"
  return text


def display_uri(uri: str) -> str:
  """A URI or local path as valid UTF-8 text for `source` columns.

  Local names may hold bytes that are not UTF-8 (Python hands them over as
  surrogates); they become visible escapes (`\xe9`), as in `clean_name`,
  instead of failing the Parquet and TFRecord writes.
  """
  return uri.encode("utf-8", "surrogateescape").decode("utf-8",
                                                       "backslashreplace")


def member_source(archive_uri: str, member_path: str) -> str:
  """The `source` of an archive member: archive URI + '!/' + member path."""
  return f"{display_uri(archive_uri)}!/{clean_name(member_path).lstrip('/')}"


class _BoundedTarInfo(tarfile.TarInfo):
  """TarInfo that refuses oversized GNU long-name and PAX headers."""

  def _check_header_size(self):
    if self.size > MAX_TAR_HEADER_BYTES:
      raise tarfile.HeaderError(
          f"extended tar header of {self.size} bytes (over"
          f" {MAX_TAR_HEADER_BYTES}): refused")

  def _proc_gnulong(self, tarfile_):
    self._check_header_size()
    return super()._proc_gnulong(tarfile_)

  def _proc_pax(self, tarfile_):
    self._check_header_size()
    return super()._proc_pax(tarfile_)


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


class _SizeBudget:
  """Counts bytes as they are produced and refuses too many.

  The limits are enforced on the bytes actually produced, block by block, so
  headers that lie about sizes cannot get a bigger member past them and a
  zip bomb is stopped after at most one block past the limit.
  """

  def __init__(self, limit: int, what: str,
               compressed_size: Optional[int] = None,
               max_ratio: Optional[float] = None):
    self.limit = limit
    self.total = 0
    self._what = what
    self._compressed_size = compressed_size
    self._max_ratio = max_ratio
    self._ratio_cap = None
    if compressed_size is not None and max_ratio:
      self._ratio_cap = max(_RATIO_FLOOR_BYTES,
                            max_ratio * max(compressed_size, 1))

  def add(self, count: int) -> None:
    self.total += count
    if self.total > self.limit:
      raise MemberError(
          "MemberTooLarge",
          f"{self._what} inflates to more than {self.limit} bytes"
          " (--max_member_bytes)")
    if self._ratio_cap is not None and self.total > self._ratio_cap:
      raise MemberError(
          "CompressionRatioExceeded",
          f"{self._what} inflates past {self._max_ratio:g}x its compressed"
          f" size of {self._compressed_size} bytes (--max_compression_ratio):"
          " a zip bomb?")


def read_limited(stream, limit: int, what: str,
                 compressed_size: Optional[int] = None,
                 max_ratio: Optional[float] = None) -> bytes:
  """Reads a stream to its end, refusing more than `limit` bytes.

  Args:
    stream: file-like to read.
    limit: most bytes accepted.
    what: names the thing in the error message.
    compressed_size: bytes the member takes in the archive, for the ratio.
    max_ratio: most inflated bytes per compressed byte (checked past 1 MiB).

  Raises:
    MemberError: MemberTooLarge or CompressionRatioExceeded.
  """
  budget = _SizeBudget(limit, what, compressed_size, max_ratio)
  chunks = []
  while True:
    block = stream.read(min(_READ_BLOCK, limit + 1 - budget.total))
    if not block:
      return b"".join(chunks)
    budget.add(len(block))
    chunks.append(block)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # magic, ..., name and extra length
# Flags zipfile refuses itself (compressed patched data, strong encryption).
_UNSUPPORTED_FLAGS = 0x20 | 0x40


def member_extents(zf: zipfile.ZipFile) -> Dict[int, int]:
  """Where each member's bytes must end: header_offset → end offset.

  A member ends where the next member's local header (in file order) or the
  central directory begins. An offset shared by two directory entries maps
  to -1: overlapping entries are how zip bombs multiply one compressed
  payload (read_zip_member refuses them).
  """
  counts = collections.Counter(info.header_offset for info in zf.infolist())
  offsets = sorted(counts)
  return {offset: -1 if counts[offset] > 1 else
          (offsets[i + 1] if i + 1 < len(offsets) else zf.start_dir)
          for i, offset in enumerate(offsets)}


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                    limits: Limits, extents: Dict[int, int]) -> bytes:
  """The bytes of one zip member, checked.

  Reads the member's local header and data straight from the archive and
  inflates with ISA-L (stored and deflated members; bzip2 and lzma go
  through zipfile), under the same limits as `read_limited`. As zipfile
  does, the local header's name must match the central directory's, the data
  must end before the next member (`extents`, from member_extents) and the
  size and CRC-32 must match; members sharing bytes with another are refused.

  Not thread-safe: it seeks the ZipFile's file (one per OpenZipCache, one
  cache per DoFn instance, and Beam runs each instance on one thread).

  Raises:
    MemberError: MemberTooLarge, CompressionRatioExceeded, or BadMember (an
      overlapping member, a missing or mismatched local header, data cut
      short or running into the next member, a wrong size or CRC).
    Exception: zipfile's own errors for methods it cannot read (deflate64).
  """
  end = extents.get(info.header_offset, -1)
  if end < 0:
    raise MemberError(
        "BadMember", "member overlaps another member's bytes (a zip bomb"
        " construction): refused")
  fp = zf.fp
  fp.seek(info.header_offset)
  header = fp.read(_LOCAL_HEADER.size)
  if len(header) != _LOCAL_HEADER.size:
    raise MemberError("BadMember", "local file header cut short")
  magic, name_len, extra_len = _LOCAL_HEADER.unpack(header)
  if magic != b"PK\x03\x04":
    raise MemberError("BadMember", "bad magic number for the local header")
  name = fp.read(name_len).decode(
      "utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
  if name != info.orig_filename:
    raise MemberError(
        "BadMember", "the local header names another file than the central"
        " directory")
  data_offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
  if data_offset + info.compress_size > end:
    raise MemberError(
        "BadMember", f"member data ({info.compress_size} bytes) runs past"
        " the next member or the central directory")
  if (info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or
      info.flag_bits & _UNSUPPORTED_FLAGS):
    with zf.open(info) as stream:
      return read_limited(stream, limits.max_member_bytes, "member",
                          info.compress_size, limits.max_compression_ratio)
  budget = _SizeBudget(limits.max_member_bytes, "member", info.compress_size,
                       limits.max_compression_ratio)
  fp.seek(data_offset)
  if info.compress_type == zipfile.ZIP_STORED:
    budget.add(info.compress_size)
    data = fp.read(info.compress_size)
    if len(data) != info.compress_size:
      raise MemberError("BadMember", "member data cut short")
  elif info.compress_size == 0:
    data = b""  # zipfile reads this as empty; size and CRC decide below
  else:
    try:
      data = _inflate(fp, info.compress_size, budget)
    except _zlib.error as e:
      raise MemberError("BadMember", f"corrupt deflate data: {e}") from e
  if len(data) != info.file_size:
    raise MemberError(
        "BadMember", f"member holds {len(data)} bytes, the central directory"
        f" says {info.file_size}")
  if _zlib.crc32(data) & 0xFFFFFFFF != info.CRC:
    raise MemberError("BadMember", "Bad CRC-32: the member is corrupt")
  return data


def _inflate(fp, compressed_size: int, budget: _SizeBudget) -> bytes:
  """Inflates `compressed_size` raw-deflate bytes from fp, within budget."""
  inflater = _zlib.decompressobj(-15)
  chunks = []
  remaining = compressed_size
  while remaining > 0 and not inflater.eof:
    pending = fp.read(min(_READ_BLOCK, remaining))
    if not pending:
      raise MemberError("BadMember", "member data cut short")
    remaining -= len(pending)
    # Output is taken a block at a time, so a bomb never inflates more than
    # one block past the budget.
    while pending and not inflater.eof:
      block = inflater.decompress(pending, _READ_BLOCK)
      pending = inflater.unconsumed_tail
      budget.add(len(block))
      chunks.append(block)
  while not inflater.eof:  # output still held back by the block size
    block = inflater.decompress(b"", _READ_BLOCK)
    if not block:
      raise MemberError("BadMember", "deflate stream cut short")
    budget.add(len(block))
    chunks.append(block)
  return b"".join(chunks)


def _classify(path: str, is_dir: bool) -> Optional[str]:
  if is_dir:
    return "dir"
  if imaging.is_mask(path):
    return "mask"
  return None


def count_zip_members(uri: str, max_members: int = DEFAULT_MAX_MEMBERS) -> int:
  """Number of entries in a zip's central directory.

  Raises:
    MemberError: the file is not a readable zip (a zip cut short has no
      central directory), is empty, or has more than max_members entries.
  """
  try:
    with open_raw(uri) as f, zipfile.ZipFile(f) as zf:
      count = len(zf.infolist())
  except UnicodeDecodeError as e:
    raise MemberError(
        "BadMemberName",
        f"a member name is flagged UTF-8 but is not ({e}); Python's zipfile"
        " cannot list this archive: re-create it with valid names") from e
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
          OSError, NotImplementedError) as e:
    # NotImplementedError: zipfile refuses "version needed to extract" it
    # does not know (e.g. 6.4) while listing.
    raise MemberError(
        "BadArchive",
        f"not a readable zip ({type(e).__name__}: {e}); a zip cut short has"
        " no central directory — re-upload or re-create it") from e
  if count == 0:
    raise MemberError("EmptyArchive", "the zip has no members")
  if count > max_members:
    raise MemberError(
        "TooManyMembers",
        f"the zip has {count} members, over {max_members}"
        " (--max_members_per_archive)")
  return count


def split_zip(uri: str, count: int, chunk: int = DEFAULT_ZIP_CHUNK
             ) -> Iterator[ZipRange]:
  """Splits a zip of `count` members into ranges of at most `chunk`."""
  for start in range(0, count, chunk):
    yield ZipRange(uri, start, min(start + chunk, count))


class OpenZipCache:
  """Keeps the most recently used zip open, with its member extents.

  One per DoFn instance (Beam runs an instance on one thread at a time):
  read_zip_member seeks the shared file handle.
  """

  def __init__(self):
    self._uri = None
    self._file = None
    self._zip = None
    self.extents: Dict[int, int] = {}

  def get(self, uri: str) -> zipfile.ZipFile:
    if uri != self._uri:
      self.close()
      f = open_raw(uri)
      try:
        self._zip = zipfile.ZipFile(f)
        self.extents = member_extents(self._zip)
      except Exception:
        self._zip = None
        f.close()
        raise
      self._file, self._uri = f, uri
    return self._zip

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
      self._file.close()
    self._uri = self._file = self._zip = None
    self.extents = {}


def read_zip_range(zip_range: ZipRange, limits: Limits,
                   cache: Optional[OpenZipCache] = None, *,
                   masks_only: bool = False) -> Iterator[Member]:
  """Yields the members of one range of a zip, one at a time.

  Every member in the range yields exactly one Member, an error one if it
  cannot be read; if the archive itself cannot be opened, every member of the
  range gets that error.

  Args:
    zip_range: which members to read.
    limits: member size and compression-ratio limits.
    cache: keeps the archive open for the next range; without one the archive
      is opened and closed here.
    masks_only: yield only the masks, as kind "mask" with their bytes (or
      error), under the same checks; other members are passed over unread.
      For `python -m training evaluate --masks`.
  """
  uri, start, stop = zip_range
  own = cache is None
  cache = cache or OpenZipCache()
  try:
    zf = cache.get(uri)
  except Exception as e:  # pylint: disable=broad-except
    error = MemberError("BadArchive", f"cannot reopen zip: {e}")
    for index in range(start, stop):
      yield _unnamed_error(uri, index, error)
    return
  try:
    infos = zf.infolist()
    for index in range(start, stop):
      info = infos[index]
      if not info.filename:
        # zipfile's is_dir() indexes the name: a nameless entry (a damaged
        # central directory) would raise there.
        yield _unnamed_error(uri, index, MemberError(
            "BadMember", "member has an empty name"))
        continue
      source = member_source(uri, info.filename)
      kind = _classify(info.filename, info.is_dir())
      if masks_only:
        if kind != "mask":
          continue
      elif kind:
        yield Member(source, info.filename, kind)
        continue
      if info.flag_bits & 0x1:
        yield Member(source, info.filename, "error", error=MemberError(
            "EncryptedMember", "member is encrypted; decrypt the archive first"))
        continue
      try:
        data = read_zip_member(zf, info, limits, cache.extents)
        yield Member(source, info.filename, kind or "file", data=data)
      except MemberError as e:
        yield Member(source, info.filename, "error", error=e)
      except Exception as e:  # pylint: disable=broad-except
        # zlib.error, BadZipFile (CRC), NotImplementedError (compression), ...
        yield Member(source, info.filename, "error", error=MemberError(
            "BadMember", f"{type(e).__name__}: {e}"))
  finally:
    if own:
      cache.close()


def _unnamed_error(uri: str, index: int, error: MemberError) -> Member:
  """The error record of a zip member known by its index alone."""
  return Member(f"{display_uri(uri)}!/#{index}", f"#{index}", "error",
                error=error)


def read_tar(uri: str, limits: Limits, *,
             masks_only: bool = False) -> Iterator[Member]:
  """Streams a tar or tar.gz, yielding each entry as one Member.

  If the archive breaks part-way (truncated upload), the members already read
  are kept and one error Member for the archive says where it stopped. An
  empty tar, or one past the member limit, also ends in one error Member.

  With `masks_only`, only the masks are yielded, as kind "mask" with their
  bytes (or error), under the same checks; other entries are passed over
  (the archive-level errors above still come).
  """
  max_member_bytes = limits.max_member_bytes
  index = 0
  try:
    with open_raw(uri) as f, tarfile.open(fileobj=f, mode="r|*",
                                          tarinfo=_BoundedTarInfo) as tf:
      for info in tf:
        index += 1
        if index > limits.max_members:
          yield Member(display_uri(uri), posixpath.basename(uri), "error",
                       error=MemberError(
                           "TooManyMembers",
                           f"stopped after {limits.max_members} members"
                           " (--max_members_per_archive)"))
          return
        source = member_source(uri, info.name)
        kind = _classify(info.name, info.isdir())
        if masks_only:
          if kind != "mask":
            continue
        elif kind:
          yield Member(source, info.name, kind)
          continue
        if not info.isfile():
          yield Member(source, info.name, "error", error=MemberError(
              "NotARegularFile",
              f"tar entry of type {info.type!r} (link or device) is not read"))
          continue
        if info.size > max_member_bytes:
          yield Member(source, info.name, "error", error=MemberError(
              "MemberTooLarge",
              f"member is {info.size} bytes, over {max_member_bytes}"
              " (--max_member_bytes)"))
          continue
        stream = tf.extractfile(info)
        try:
          data = read_limited(stream, max_member_bytes, "member")
        except MemberError as e:
          yield Member(source, info.name, "error", error=e)
          continue
        yield Member(source, info.name, kind or "file", data=data)
    if index == 0:
      yield Member(display_uri(uri), posixpath.basename(uri), "error",
                   error=MemberError("EmptyArchive", "the tar has no members"))
  except Exception as e:  # pylint: disable=broad-except
    # tarfile.ReadError, EOFError, zlib/gzip errors on truncated archives.
    what = ("not a readable tar" if index == 0 else
            f"archive breaks after {index} members")
    error = MemberError("BadArchive", f"{what}: {type(e).__name__}: {e}")
    if index == 0:
      error = read_failure(uri, error)
    yield Member(display_uri(uri), posixpath.basename(uri), "error",
                 error=error)


def read_file(uri: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
             ) -> Member:
  """Reads a plain (non-archive) input file as a single member."""
  kind = _classify(uri, False)
  source = display_uri(uri)
  if kind:
    return Member(source, uri, kind)
  try:
    with open_raw(uri) as f:
      return Member(source, uri, "file",
                    data=read_limited(f, max_member_bytes, "file"))
  except MemberError as e:
    return Member(source, uri, "error", error=e)
  except Exception as e:  # pylint: disable=broad-except
    return Member(source, uri, "error", error=read_failure(uri, MemberError(
        "ReadFailed", f"{type(e).__name__}: {e}")))
