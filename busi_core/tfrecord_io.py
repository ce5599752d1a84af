"""TFRecord files, written and read: the one module that knows their framing.

Preprocessing writes, and scoring and training read, through it (the
payloads are `schemas.records` Examples).

A TFRecord file is a sequence of frames: the data's length (uint64, little
endian), the masked CRC32C of those 8 bytes, the data, the masked CRC32C of
the data. A `.tfrecord.gz` file is one gzip stream (of one or more members)
of such frames.

Writing: `WriteGzipTFRecords`, a Beam file sink that deflates with ISA-L (Beam's
WriteToTFRecord uses zlib level 6, about 10 ms per 224×224×3 image on one
core, three times the decode itself; ISA-L level 2 takes ~0.3 ms and makes a
smaller file) and starts a new shard every `max_records_per_shard` records,
so that one corrupt file costs one shard. `write_file` writes one file the
same way. The files read with
`tf.data.TFRecordDataset(..., compression_type="GZIP")` and Beam's
ReadFromTFRecord.

Reading: `read_file` streams a file (never the whole of it in memory),
inflating in small pieces, and fails small where TensorFlow's and Beam's
readers stop at the first fault:
- a frame whose data fails its CRC is one `BadRecord`; reading goes on with
  the next frame (its length was checked);
- a length that fails its CRC (or declares more than MAX_RECORD_BYTES) is
  resynchronised on: reading resumes at the next offset where a frame
  header checks out. When the skipped bytes are exactly one frame (its data
  CRC holds), that is one `BadRecord`; otherwise one `BadTFRecordRegion`, an
  unknown number of records lost;
- a gzip stream that breaks, or a file cut short, keeps every record decoded
  before the break, then one `BadTFRecordFile`: the rest is unread.
A gzip member whose trailer check fails after its deflate data ended normally
loses nothing beyond the frames already found bad: each record carries its
own CRC. Reading goes on with the next member, if any.
"""

import itertools
import logging
import struct
import zlib
from typing import Iterable, Iterator, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
import google_crc32c
import numpy as np
from apache_beam.coders import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

try:
  from isal import isal_zlib as _deflate
  # Level 2: on speckled ultrasound frames both faster and smaller than 1.
  _LEVEL = 2
except ImportError:  # pragma: no cover - isal is a declared dependency
  _deflate = zlib
  _LEVEL = 1

_LOG = logging.getLogger(__name__)

# error_type of the reader's error rows.
BAD_RECORD = "BadRecord"  # one record lost, its index known
BAD_REGION = "BadTFRecordRegion"  # bytes skipped: an unknown number of records
BAD_FILE = "BadTFRecordFile"  # the rest of the file is unread

# The longest record the reader accepts (below 4 GiB, which the search for
# the next frame relies on). The largest this project writes is a
# 4096×4096 RGB image (the largest --image_size) with its Example fields,
# about 48 MiB; a longer declared length is framing corruption, never an
# allocation.
MAX_RECORD_BYTES = 64 << 20

_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<QI")  # length, masked CRC32C of the length
_CRC = struct.Struct("<I")
_HEADER_BYTES = _HEADER.size
_FRAME_BYTES = _HEADER.size + _CRC.size  # a frame's bytes besides its data
_MASK_DELTA = 0xa282ead8
_GZIP_WBITS = 31  # deflate with a gzip header and trailer
_GZIP_MAGIC = b"\x1f\x8b"
_READ_BYTES = 64 << 10  # bytes read from the file at a time
# Most bytes one inflate call may return: bounds memory whatever the ratio.
_INFLATE_BYTES = 256 << 10
_SCAN_BYTES = 1 << 20  # bytes searched for a frame header per numpy pass


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC32C, rotated right by 15 bits plus a constant."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xffffffff


# --- writing ----------------------------------------------------------------


def write_record(handle, payload: bytes) -> None:
  """Writes one frame to a file-like `handle`.

  The header, data and checksum go in three writes: joining them first would
  copy the image once more, which costs as much as hashing it.
  """
  length = _LENGTH.pack(len(payload))
  handle.write(length + _CRC.pack(masked_crc32c(length)))
  handle.write(payload)
  handle.write(_CRC.pack(masked_crc32c(payload)))


class _GzipWriter:
  """File-like writer that gzips into an underlying Beam file handle."""

  def __init__(self, raw):
    self._raw = raw
    self._compressor = _deflate.compressobj(_LEVEL, _deflate.DEFLATED,
                                            _GZIP_WBITS)

  def write(self, data: bytes) -> None:
    out = self._compressor.compress(data)
    if out:
      self._raw.write(out)

  def finish(self) -> None:
    """Ends the gzip stream; the underlying file stays open."""
    self._raw.write(self._compressor.flush())

  def close(self) -> None:
    self.finish()
    self._raw.close()


def write_records(f, payloads: Iterable[bytes], gzip: bool = True) -> None:
  """Writes records to a binary file object, gzipped as the pipeline's sink
  writes them, or plain; the file stays open."""
  handle = _GzipWriter(f) if gzip else f
  for payload in payloads:
    write_record(handle, payload)
  if gzip:
    handle.finish()


def write_file(uri: str, payloads: Iterable[bytes], gzip: bool = True) -> str:
  """Writes records as one local or gs:// TFRecord file, gzipped as the
  pipeline's sink writes them, or plain; returns `uri`."""
  with FileSystems.create(uri, "application/octet-stream",
                          CompressionTypes.UNCOMPRESSED) as f:
    write_records(f, payloads, gzip)
  return uri


class _FastGzipTFRecordSink(filebasedsink.FileBasedSink):
  """FileBasedSink writing gzip TFRecord shards with a fast deflate."""

  def __init__(self, file_path_prefix: str, file_name_suffix: str,
               num_shards: int, max_records_per_shard: Optional[int]):
    super().__init__(
        file_path_prefix=file_path_prefix,
        coder=coders.BytesCoder(),
        file_name_suffix=file_name_suffix,
        num_shards=num_shards,
        shard_name_template=None,
        mime_type="application/octet-stream",
        compression_type=CompressionTypes.UNCOMPRESSED,
        max_records_per_shard=max_records_per_shard)

  def open(self, temp_path):
    return _GzipWriter(FileSystems.create(
        temp_path, self.mime_type, CompressionTypes.UNCOMPRESSED))

  def write_encoded_record(self, file_handle, encoded_value):
    write_record(file_handle, encoded_value)

  def close(self, file_handle):
    file_handle.close()


class WriteGzipTFRecords(beam.PTransform):
  """Writes serialized Examples as `PREFIX-SSSSS-of-NNNNN.tfrecord.gz` shards.

  Args:
    file_path_prefix: e.g. `DIR/tfrecords/part`.
    file_name_suffix: e.g. `.tfrecord.gz`.
    num_shards: a fixed number of shards; 0 lets the runner choose.
    max_records_per_shard: a shard is closed and a new one started after
      this many records (None: no limit).

  Returns the PCollection of written file names, as beam.io.Write does.
  """

  def __init__(self, file_path_prefix: str, file_name_suffix: str,
               num_shards: int = 0,
               max_records_per_shard: Optional[int] = None):
    super().__init__()
    self._sink = _FastGzipTFRecordSink(file_path_prefix, file_name_suffix,
                                       num_shards, max_records_per_shard)

  def expand(self, pcoll):
    return pcoll | beam.io.Write(self._sink)


# --- reading ----------------------------------------------------------------


class Record(NamedTuple):
  """One intact record and its index in the file."""
  index: int
  payload: bytes


class Damage(NamedTuple):
  """One fault found while reading a file: one error row.

  Attributes:
    index: the record index it stands for. Indices count frames; a region
      of unknown contents counts as one, so after one the indices are the
      reader's, not the writer's.
    error_type: BAD_RECORD, BAD_REGION or BAD_FILE.
    message: what was lost and where (offsets count decoded bytes).
    unread: an unknown number of records went with it, so the file was not
      read whole (the manifest's `shards_unread`).
  """
  index: int
  error_type: str
  message: str
  unread: bool


class _StreamBroken(Exception):
  """The byte stream cannot go on; `salvaged` is what it decoded before."""

  def __init__(self, message: str, salvaged: bytes = b""):
    super().__init__(message)
    self.message = message
    self.salvaged = salvaged


def _raw_chunks(f) -> Iterator[bytes]:
  """The file's bytes in pieces; a failed read breaks the stream."""
  while True:
    try:
      chunk = f.read(_READ_BYTES)
    except Exception as e:  # pylint: disable=broad-except
      # Any filesystem's read error (OSError locally, HTTP errors on gs://).
      raise _StreamBroken(f"read failed: {type(e).__name__}: {e}") from e
    if not chunk:
      return
    yield chunk


def _salvage(inflater, data: bytes) -> Tuple[bytes, int]:
  """Replays `data` one byte at a time into `inflater` (a copy taken before
  the call that failed): the bytes decoded before the error, and the index
  of the byte whose arrival raised it."""
  out = []
  for i in range(len(data)):
    try:
      out.append(inflater.decompress(data[i:i + 1]))
    except zlib.error:
      return b"".join(out), i
  return b"".join(out), len(data)


def _gunzip(raw: Iterator[bytes]) -> Iterator[bytes]:
  """The decoded bytes of a gzip stream of one or more members, in pieces.

  zlib, not ISA-L: only zlib's decompressor can be copied, and the copy taken
  before each call is what lets a broken stream give up every byte decoded
  before the break.

  Raises:
    _StreamBroken: a corrupt deflate stream or gzip header, a file cut short;
      with the bytes decoded before it.
  """
  inflater = None  # None between members
  members = 0
  skip = 0  # trailer bytes of a member whose check failed, still to drop
  for pending in raw:
    while pending:
      if skip:
        dropped = min(skip, len(pending))
        pending, skip = pending[dropped:], skip - dropped
        continue
      if inflater is None:
        pending = pending.lstrip(b"\0")  # padding between members, as gzip
        if not pending:
          break
        inflater = zlib.decompressobj(_GZIP_WBITS)
        members += 1
      before = inflater.copy()
      try:
        out = inflater.decompress(pending, _INFLATE_BYTES)
      except zlib.error as e:
        salvaged, at = _salvage(before, pending)
        if "incorrect data check" in str(e):
          trailer_left = 4  # the 4-byte length follows the CRC
        elif "incorrect length check" in str(e):
          trailer_left = 0
        else:
          raise _StreamBroken(f"gzip stream broken ({e})", salvaged) from e
        # The member's deflate data ended normally: all of it is decoded,
        # and its records carry their own CRCs. Go on with the next member.
        _LOG.warning("gzip member %d failed its trailer check (%s); its"
                     " records are checked one by one", members, e)
        if salvaged:
          yield salvaged
        inflater = None
        rest = at + 1 + trailer_left
        pending, skip = pending[rest:], max(0, rest - len(pending))
        continue
      if out:
        yield out
      if inflater.eof:
        pending, inflater = inflater.unused_data, None
      else:
        pending = inflater.unconsumed_tail
  if inflater is not None:
    try:
      out = inflater.flush()
    except zlib.error as e:
      raise _StreamBroken(f"gzip stream broken ({e})") from e
    if out:
      yield out
    if not inflater.eof:
      raise _StreamBroken("gzip stream cut short")
  elif not members:
    raise _StreamBroken("empty file, not a gzip stream")


class _Window:
  """The decoded bytes of a stream, from a kept offset to what was pulled.

  Offsets count from the start of the decoded stream; bytes before the kept
  offset are dropped as more are pulled, so memory stays about one frame.
  """

  def __init__(self, chunks: Iterator[bytes]):
    self._chunks = chunks
    self._buf = bytearray()
    self._base = 0  # offset of _buf[0]
    self._keep = 0
    self.ended = False
    self.broken = None  # why the stream stopped early, if it did

  @property
  def end(self) -> int:
    return self._base + len(self._buf)

  def keep_from(self, offset: int) -> None:
    self._keep = offset

  def holds(self, offset: int) -> bool:
    return self._base <= offset

  def ensure(self, end: int) -> bool:
    """Pulls bytes until offset `end`; False when the stream stops first."""
    if end <= self.end:
      return True
    drop = self._keep - self._base
    if drop > 0:
      del self._buf[:drop]  # bytearray drops a prefix without moving the rest
      self._base = self._keep
    while self.end < end and not self.ended:
      try:
        self._buf += next(self._chunks)
      except StopIteration:
        self.ended = True
      except _StreamBroken as e:
        self._buf += e.salvaged
        self.broken = e.message
        self.ended = True
    return self.end >= end

  def grow(self) -> bool:
    return self.ensure(self.end + 1)

  def take(self, start: int, end: int) -> bytes:
    with memoryview(self._buf) as view:
      return bytes(view[start - self._base:end - self._base])


def _frame_length(header: bytes, max_record_bytes: int) -> Optional[int]:
  """The data length a 12-byte header declares, or None if it fails its CRC
  or declares more than `max_record_bytes`."""
  length, crc = _HEADER.unpack(header)
  if crc != masked_crc32c(header[:8]) or length > max_record_bytes:
    return None
  return length


def _byte_tables() -> Tuple[np.uint32, np.ndarray]:
  """CRC32C is affine in its input: the CRC of 8 bytes is the CRC of 8 zero
  bytes XOR, for each position k, table[k][byte k]."""
  zero = google_crc32c.value(bytes(8))
  tables = np.zeros((8, 256), np.uint32)
  for k in range(8):
    for value in range(256):
      probe = bytearray(8)
      probe[k] = value
      tables[k, value] = google_crc32c.value(bytes(probe)) ^ zero
  return np.uint32(zero), tables


_ZERO_CRC, _BYTE_CRC = _byte_tables()


def _header_offsets(data: bytes) -> np.ndarray:
  """Every offset i at which data[i:i + 12] is a header declaring at most
  4 GiB whose length CRC holds, computed for all offsets at once."""
  a = np.frombuffer(data, np.uint8)
  n = len(a) - _HEADER_BYTES + 1
  if n <= 0:
    return np.zeros(0, np.int64)
  # Cheap tests rule out nearly every offset before any CRC is computed: a
  # length below 2**32 has four zero high bytes, and twelve zero bytes are
  # no header (the masked CRC of a zero length is not zero), so zeroed
  # sectors are passed over at the speed of random bytes.
  high = a[4:4 + n] | a[5:5 + n] | a[6:6 + n] | a[7:7 + n]
  low = a[0:n] | a[1:1 + n] | a[2:2 + n] | a[3:3 + n]
  for k in range(8, 12):
    low |= a[k:k + n]
  at = np.flatnonzero((high == 0) & (low != 0))
  crc = np.full(len(at), _ZERO_CRC, np.uint32)
  for k in range(4):  # zero bytes add nothing (table[k][0] is 0)
    crc ^= _BYTE_CRC[k][a[at + k]]
  masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(
      _MASK_DELTA)
  stored = a[at + 8].astype(np.uint32)
  for k in range(1, 4):
    stored |= a[at + 8 + k].astype(np.uint32) << np.uint32(8 * k)
  return at[masked == stored]


def _whole_frame_at(window: _Window, at: int, max_record_bytes: int) -> bool:
  """Whether a header whose length CRC holds is at `at`, and the stream holds
  the whole frame it declares."""
  length = _frame_length(window.take(at, at + _HEADER_BYTES),
                         max_record_bytes)
  return length is not None and window.ensure(at + length + _FRAME_BYTES)


def _next_frame(window: _Window, start: int,
                max_record_bytes: int) -> Optional[int]:
  """The first offset after `start` where a frame header holds (and the
  stream holds its whole frame), or None.

  The data's CRC is left to the reading that resumes there: a frame whose
  data fails too is one more BadRecord, not part of the skipped bytes, and
  the search costs one pass over the bytes whatever they hold.
  """
  scan = start + 1
  while True:
    limit = window.end
    while scan < limit - _HEADER_BYTES + 1:
      stop = min(limit, scan + _SCAN_BYTES + _HEADER_BYTES - 1)
      for i in _header_offsets(window.take(scan, stop)):
        if _whole_frame_at(window, scan + int(i), max_record_bytes):
          return scan + int(i)
      scan = stop - _HEADER_BYTES + 1
    if scan - start > max_record_bytes + _FRAME_BYTES:
      # The skipped bytes can no longer be one frame: stop keeping them.
      window.keep_from(scan)
    if window.end == limit and not window.grow():
      return None


def _skipped(window: _Window, index: int, start: int,
             resume: Optional[int], max_record_bytes: int) -> Damage:
  """The Damage for the bytes from `start` to `resume` (None: to the end)."""
  stop = window.end if resume is None else resume
  span = stop - start
  if resume is None and window.broken:
    return Damage(index, BAD_FILE, (
        f"{window.broken}; {index} records read before offset {start}, then"
        f" {span} bytes that are not intact records; the rest of the file is"
        " unread"), True)
  if (_FRAME_BYTES <= span <= max_record_bytes + _FRAME_BYTES and
      window.holds(start) and
      _CRC.unpack(window.take(stop - _CRC.size, stop))[0] == masked_crc32c(
          window.take(start + _HEADER_BYTES, stop - _CRC.size))):
    return Damage(index, BAD_RECORD, (
        f"record {index} ({span - _FRAME_BYTES} bytes at offset {start}):"
        " length field corrupt (CRC32C mismatch); skipped"), False)
  where = ("to the end of the file" if resume is None else
           f"(reading resumed at offset {resume})")
  return Damage(index, BAD_REGION, (
      f"{span} bytes from offset {start} are not intact records {where}:"
      " an unknown number of records lost"), True)


# Enough leading bytes to tell an archive, an image or a DICOM ("DICM" at 128,
# "ustar" at 257).
_SNIFF_BYTES = 512


def _not_tfrecords(head: bytes) -> str:
  """What a file that is no TFRecord from its first byte is instead, when
  its leading bytes say (an archive, an image, a DICOM: `preprocess`'s
  inputs, passed where its outputs go), as a leading sentence; else ""."""
  if not head:
    return ""
  from busi_core import dicom, imaging  # pylint: disable=import-outside-toplevel
  archive, image = imaging.sniff_archive(head), imaging.sniff_format(head)
  if archive and archive not in imaging.PREPROCESS_ARCHIVES:
    return (f"the file is {archive}-compressed, not TFRecords: they are read"
            " plain or gzip; decompress it (an archive inside: extract it and"
            " preprocess what it holds); ")
  if archive:
    what = f"a {archive} archive"
  elif dicom.is_dicom(head):
    what = "a DICOM file"
  elif image and image != "bmp":  # "BM" could open a damaged record too
    what = f"a {image.upper()} image"
  else:
    return ""
  return (f"the file is {what}, not TFRecords: preprocess it first"
          " (`python -m beam_pipeline preprocess`, or `run` to preprocess and"
          " score in one job) and pass its DIR/tfrecords/*.tfrecord.gz; ")


def _stopped(window: _Window, index: int, at: int) -> Damage:
  """The Damage for a stream that stopped inside the frame at `at`."""
  if window.broken:
    why = window.broken
  else:
    why = f"file cut short ({window.end - at} bytes of a frame at its end)"
  return Damage(index, BAD_FILE, (
      f"{why}; {index} records read before offset {at}; the rest of the"
      " file is unread"), True)


def _frames(window: _Window,
            max_record_bytes: int) -> Iterator[Union[Record, Damage]]:
  """Records and Damages of a decoded stream, in order."""
  index = at = 0
  while True:
    window.keep_from(at)
    if not window.ensure(at + _HEADER_BYTES):
      if window.end > at or window.broken:
        yield _stopped(window, index, at)
      return
    length = _frame_length(window.take(at, at + _HEADER_BYTES),
                           max_record_bytes)
    if length is None:
      if at == 0:
        # A file that opens as an archive, an image or a DICOM is that, not
        # damaged TFRecords: say so without scanning it for records.
        window.ensure(_SNIFF_BYTES)
        known = _not_tfrecords(window.take(0, min(window.end, _SNIFF_BYTES)))
        if known:
          yield Damage(index, BAD_REGION, known + "nothing in it was read",
                       True)
          return
      resume = _next_frame(window, at, max_record_bytes)
      yield _skipped(window, index, at, resume, max_record_bytes)
      index += 1
      if resume is None:
        return
      at = resume
      continue
    end = at + length + _FRAME_BYTES
    if not window.ensure(end):
      yield _stopped(window, index, at)
      return
    payload = window.take(at + _HEADER_BYTES, end - _CRC.size)
    if _CRC.unpack(window.take(end - _CRC.size, end))[0] == masked_crc32c(
        payload):
      yield Record(index, payload)
    else:
      yield Damage(index, BAD_RECORD, (
          f"record {index} ({length} bytes at offset {at}): data CRC32C"
          " mismatch; skipped"), False)
    index += 1
    at = end


def _is_gzip(first: bytes, name: str) -> bool:
  """The bytes decide, then the name: a file that opens with a valid frame
  header is plain TFRecord whatever its name; one that opens with the gzip
  magic is gzip."""
  if (len(first) >= _HEADER_BYTES and
      _frame_length(first[:_HEADER_BYTES], MAX_RECORD_BYTES) is not None):
    return False
  return first.startswith(_GZIP_MAGIC) or name.endswith(".gz")


def read_records(f, name: str = "",
                 max_record_bytes: int = MAX_RECORD_BYTES
                 ) -> Iterator[Union[Record, Damage]]:
  """The records of a plain or gzip TFRecord file, and what was lost.

  Never raises for the file's contents and never holds more than about one
  record (at most twice MAX_RECORD_BYTES while resynchronising) in memory.

  Args:
    f: a binary file object, read from its current position.
    name: the file's name (a `.gz` name means gzip when the bytes do not
      say).
    max_record_bytes: longer declared lengths are treated as corruption.

  Yields:
    Record for each intact record; Damage for each fault (see the module
    docstring), in file order.

  Raises:
    ValueError: max_record_bytes is 4 GiB or more.
  """
  if not 0 <= max_record_bytes < 1 << 32:
    raise ValueError(f"max_record_bytes {max_record_bytes} is not below 4 GiB")
  raw = _raw_chunks(f)
  try:
    first = next(raw, b"")
  except _StreamBroken as e:
    yield Damage(0, BAD_FILE, f"{e.message}; the file is unread", True)
    return
  chunks = itertools.chain((first,) if first else (), raw)
  if _is_gzip(first, name):
    chunks = _gunzip(chunks)
  yield from _frames(_Window(chunks), max_record_bytes)


def read_file(uri: str, max_record_bytes: int = MAX_RECORD_BYTES
              ) -> Iterator[Union[Record, Damage]]:
  """`read_records` of a local or gs:// file; one that cannot be opened is
  one BAD_FILE Damage."""
  try:
    f = FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED)
  except Exception as e:  # pylint: disable=broad-except
    yield Damage(0, BAD_FILE,
                 f"cannot open: {type(e).__name__}: {e}; the file is unread",
                 True)
    return
  with f:
    yield from read_records(f, uri, max_record_bytes)
