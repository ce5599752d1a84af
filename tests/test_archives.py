"""The zip member reader (ISA-L inflate) against Python's zipfile."""

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest

from busi_core import archives
from busi_core.errors import MemberError

LIMITS = archives.Limits()


def _members(data: bytes, limits: archives.Limits = LIMITS):
  """(name, bytes or ArchiveError kind) of every member, by our reader."""
  out = []
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    extents = archives.member_extents(zf)
    for info in zf.infolist():
      try:
        out.append((info.filename,
                    archives.read_zip_member(zf, info, limits, extents)))
      except MemberError as e:
        out.append((info.filename, e.kind))
  return out


def _payloads():
  rng = np.random.default_rng(0)
  return {
      "empty.bin": b"",
      "one.bin": b"x",
      "random.bin": rng.integers(0, 256, 300_000, np.uint8).tobytes(),
      # Inflates to several output blocks (about 5:1): the block loop.
      "repeats.bin": np.repeat(rng.integers(0, 256, 700_000, np.uint8),
                               5).tobytes(),
      "text.txt": b"ultrasound " * 50_000,
  }


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                    zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_same_bytes_as_zipfile(method):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", method) as zf:
    for name, payload in _payloads().items():
      zf.writestr(name, payload)
    # Streamed members have a data descriptor and zeros in the local header.
    with zf.open("streamed.bin", "w", force_zip64=True) as member:
      member.write(b"streamed" * 10_000)
  expected = dict(_payloads(), **{"streamed.bin": b"streamed" * 10_000})
  assert dict(_members(buf.getvalue())) == expected


def _one_member_zip(payload: bytes, method=zipfile.ZIP_DEFLATED) -> bytearray:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", method) as zf:
    zf.writestr("benign/a.png", payload)
  return bytearray(buf.getvalue())


def _data_offset(data: bytes) -> int:
  name_len, extra_len = struct.unpack("<HH", data[26:30])
  return 30 + name_len + extra_len


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_data_fails_the_crc(method):
  data = _one_member_zip(b"speckle " * 1000, method)
  data[_data_offset(data) + 3] ^= 0x40
  result = _members(bytes(data))
  assert result == [("benign/a.png", "BadMember")]


def test_wrong_local_header_is_refused():
  data = _one_member_zip(b"speckle " * 1000)
  data[0:4] = b"PK\x09\x09"
  assert _members(bytes(data)) == [("benign/a.png", "BadMember")]


def test_directory_lying_about_sizes_is_refused():
  data = _one_member_zip(b"speckle " * 1000)
  central = data.find(b"PK\x01\x02")
  # Central directory: compressed size at +20, uncompressed size at +24.
  size = struct.unpack("<I", data[central + 24:central + 28])[0]
  data[central + 24:central + 28] = struct.pack("<I", size - 1)
  assert _members(bytes(data)) == [("benign/a.png", "BadMember")]
  data = _one_member_zip(b"speckle " * 1000)
  central = data.find(b"PK\x01\x02")
  compressed = struct.unpack("<I", data[central + 20:central + 24])[0]
  data[central + 20:central + 24] = struct.pack("<I", compressed // 2)
  assert _members(bytes(data)) == [("benign/a.png", "BadMember")]


def test_limits_hold_whatever_the_directory_says():
  bomb = _one_member_zip(bytes(20_000_000))
  limits = archives.Limits(max_member_bytes=5_000_000,
                           max_compression_ratio=1e9)
  assert _members(bytes(bomb), limits) == [("benign/a.png", "MemberTooLarge")]
  assert _members(bytes(bomb)) == [("benign/a.png",
                                    "CompressionRatioExceeded")]
  stored = _one_member_zip(bytes(6_000_000), zipfile.ZIP_STORED)
  assert _members(bytes(stored), limits) == [("benign/a.png",
                                              "MemberTooLarge")]


# Hand-built zips: what zipfile cannot be made to write.
def _local(name: bytes, method: int, crc: int, csize: int, usize: int):
  return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21,
                     crc, csize, usize, len(name), 0) + name


def _central(name: bytes, method: int, crc: int, csize: int, usize: int,
             offset: int):
  return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method,
                     0, 0x21, crc, csize, usize, len(name), 0, 0, 0, 0, 0,
                     offset) + name


def _zip(body: bytes, centrals) -> bytes:
  directory = b"".join(centrals)
  return body + directory + struct.pack(
      "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(centrals), len(centrals),
      len(directory), len(body), 0)


def _kernel(size: int):
  payload = bytes(size)
  deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
  return deflate.compress(payload) + deflate.flush(), zlib.crc32(payload)


def test_overlapping_members_are_refused():
  # Many directory entries, one local header and payload: the overlap bomb.
  kernel, crc = _kernel(2_000_000)
  body = _local(b"k.png", 8, crc, len(kernel), 2_000_000) + kernel
  data = _zip(body, [_central(b"k.png", 8, crc, len(kernel), 2_000_000, 0)
                     for _ in range(20)])
  limits = archives.Limits(max_compression_ratio=1e9)
  assert _members(data, limits) == [("k.png", "BadMember")] * 20


def test_compressed_size_running_past_the_member_is_refused():
  # A directory that inflates compress_size would also inflate the ratio cap.
  kernel, crc = _kernel(2_000_000)
  body = _local(b"k.png", 8, crc, len(kernel), 2_000_000) + kernel
  for csize in (len(kernel) + 1, 0xFFFFFFF0):
    data = _zip(body, [_central(b"k.png", 8, crc, csize, 2_000_000, 0)])
    assert _members(data) == [("k.png", "BadMember")]
  # The honest directory: refused by the ratio, as a bomb.
  data = _zip(body, [_central(b"k.png", 8, crc, len(kernel), 2_000_000, 0)])
  assert _members(data) == [("k.png", "CompressionRatioExceeded")]


def test_local_header_naming_another_file_is_refused():
  payload = b"speckle" * 100
  body = _local(b"evil.exe", 0, zlib.crc32(payload), len(payload),
                len(payload)) + payload
  data = _zip(body, [_central(b"a.png", 0, zlib.crc32(payload), len(payload),
                              len(payload), 0)])
  assert _members(data) == [("a.png", "BadMember")]
  honest = _zip(_local(b"a.png", 0, zlib.crc32(payload), len(payload),
                       len(payload)) + payload,
                [_central(b"a.png", 0, zlib.crc32(payload), len(payload),
                          len(payload), 0)])
  assert _members(honest) == [("a.png", payload)]


def test_empty_deflated_member_with_no_data():
  body = _local(b"e.png", 8, 0, 0, 0)
  assert _members(_zip(body, [_central(b"e.png", 8, 0, 0, 0, 0)])) == [
      ("e.png", b"")]
