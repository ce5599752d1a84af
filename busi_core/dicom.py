"""DICOM members: sniff, read the header, decode frames one at a time to uint8.

Plain functions with no Beam in them, like `busi_core.imaging`. pydicom does
the parsing and decoding (its decoder plugins: Pillow, pylibjpeg-openjpeg,
pyjpegls, python-gdcm); this module adds the pixel rules of the pipeline:
the full stored range (through rescale, or the VOI window when there is one)
mapped linearly onto 0..255, MONOCHROME1 inverted, colour to RGB, and the
ultrasound tissue region cropped.

Headers carry patient data. No message raised here holds a header value
other than the transfer syntax and numeric pixel-module values; pydicom's
own warnings and log lines, which may quote values, are silenced, and its
exception texts are never passed on (only their type names).
"""

import io
import logging
import math
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import (apply_color_lut, apply_modality_lut,
                            apply_voi_lut, as_pixel_options, get_decoder)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from busi_core.errors import MemberError

# pydicom's validation warnings and log lines quote element values (names,
# IDs, dates): keep them out of worker logs.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
# Also kept out of stderr: warnings from pydicom, or raised by it on our
# behalf. Each read also ignores them in a `catch_warnings` block; this
# filter covers threads that race on the process-wide filter list there.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
warnings.filterwarnings("ignore", module=r"busi_core\.dicom$")
_PYDICOM_LOGGER = logging.getLogger("pydicom")
_PYDICOM_LOGGER.setLevel(logging.CRITICAL)
_PYDICOM_LOGGER.propagate = False

# Elements bigger than this stay in `data` instead of being copied while the
# header is parsed: the pixel data of a cine is sliced, never duplicated.
_DEFER_BYTES = 4096

# A deflated dataset is inflated whole by pydicom; refuse bigger ones.
_MAX_INFLATED = 1 << 30

_PREAMBLE = 128
_MAGIC = b"DICM"
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST"
    b" SV TM UC UI UL UN UR US UT UV".split())
# Explicit VRs with a reserved 2 bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
# Groups a dataset may open with: file meta, then identification.
_FIRST_GROUPS = (0x0002, 0x0008)

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PALETTE = "PALETTE COLOR"
_DEFINED_PHOTOMETRICS = frozenset((
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL",
    "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT",
    "YBR_RCT", "HSV", "ARGB", "CMYK", "XYB"))
# Three-sample interpretations that come out of pydicom's decoders as RGB.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

_GPL_LIBJPEG = "pylibjpeg-libjpeg (GPL-3.0, not installed by design)"
# What would read the syntaxes pydicom has a decoder for, when none of its
# plugins is importable.
_PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.50": f"Pillow, python-gdcm or {_GPL_LIBJPEG}",
    "1.2.840.10008.1.2.4.51": f"Pillow, python-gdcm or {_GPL_LIBJPEG}",
    "1.2.840.10008.1.2.4.57": f"python-gdcm or {_GPL_LIBJPEG}",
    "1.2.840.10008.1.2.4.70": f"python-gdcm or {_GPL_LIBJPEG}",
    "1.2.840.10008.1.2.4.80": f"pyjpegls, python-gdcm or {_GPL_LIBJPEG}",
    "1.2.840.10008.1.2.4.81": f"pyjpegls, python-gdcm or {_GPL_LIBJPEG}",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg, Pillow or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg, Pillow or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "NumPy (pydicom's own RLE decoder)",
}
_VIDEO = ("no pydicom decoder exists ({}): export the frames as images"
          " (or as a non-video transfer syntax) first")
_NO_DECODER = {
    **{f"1.2.840.10008.1.2.4.{n}": _VIDEO.format("MPEG-2 video")
       for n in (100, 101)},
    **{f"1.2.840.10008.1.2.4.{n}": _VIDEO.format("MPEG-4/H.264 video")
       for n in (102, 103, 104, 105, 106)},
    **{f"1.2.840.10008.1.2.4.{n}": _VIDEO.format("HEVC/H.265 video")
       for n in (107, 108)},
    **{f"1.2.840.10008.1.2.4.{n}": (
        "the pixel data is not in the file but on a JPIP server")
       for n in (94, 95, 204, 205)},
    **{f"1.2.840.10008.1.2.4.{n}": (
        "no pydicom decoder exists (JPEG 2000 Part 2 multi-component):"
        " convert to JPEG 2000 Part 1 or uncompressed first")
       for n in (92, 93)},
    **{f"1.2.840.10008.1.2.4.{n}": (
        "no pydicom decoder exists (JPEG XL): convert first")
       for n in (110, 111, 112)},
    **{f"1.2.840.10008.1.2.4.{n}": (
        "no pydicom decoder exists (retired JPEG process): convert first")
       for n in list(range(52, 57)) + list(range(58, 70)) if n != 57},
    **{f"1.2.840.10008.1.2.7.{n}": (
        "an SMPTE ST 2110 stream holds no stored frames")
       for n in (1, 2, 3)},
    "1.2.840.10008.1.2.8.1": (
        "no pydicom 3.0 decoder exists (Deflated Image Frame Compression):"
        " convert first"),
}

# JPEG and JPEG-LS start-of-frame markers (not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = frozenset(
    (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
     0xCF, 0xF7))
# JPEG Extended at 12 bits: neither Pillow nor GDCM decode it.
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"

# What `_monochrome` reads: a frame's view of the dataset holds these.
_PIXEL_VALUE_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "VOILUTSequence")
# Decoder plugins by preference (see `_plugins`).
_PLUGIN_ORDER = ("pydicom", "pylibjpeg", "pyjpegls", "pillow", "gdcm")

_UID_CHARS = re.compile(r"[0-9.]{1,64}")


class DicomHeader(NamedTuple):
  """What `read_header` learns about a DICOM member before decoding it."""
  transfer_syntax: str  # the UID's name, e.g. "JPEG Baseline (Process 1)"
  frames: int  # NumberOfFrames, 1 when absent
  multi_frame: bool  # frames > 1: each frame is its own image with a number
  study_uid: Optional[str]  # only for keyed hashing, never output
  series_uid: Optional[str]
  burned_in_annotation: bool  # (0028,0301) BurnedInAnnotation is YES
  region: Optional[Tuple[int, int, int, int]]  # (top, bottom, left, right)


class Frame(NamedTuple):
  """One decoded frame of a DICOM member."""
  number: Optional[int]  # 1-based for multi-frame members, None otherwise
  pixels: np.ndarray  # uint8 [H, W] grey or [H, W, 3] RGB, region cropped
  region_cropped: bool


def _plausible_element(data: bytes, offset: int, little: bool,
                       explicit: bool) -> Optional[Tuple[int, int]]:
  """(tag, offset of the next element) if an element can start here."""
  end = "<" if little else ">"
  if len(data) < offset + 8:
    return None
  group, element = struct.unpack_from(end + "HH", data, offset)
  tag = group << 16 | element
  if explicit:
    vr = data[offset + 4:offset + 6]
    if vr not in _VRS:
      return None
    if vr in _LONG_VRS:
      if len(data) < offset + 12 or data[offset + 6:offset + 8] != b"\0\0":
        return None
      (length,) = struct.unpack_from(end + "L", data, offset + 8)
      start = offset + 12
      if length == _UNDEFINED:
        return (tag, -1) if vr in (b"SQ", b"UN", b"OB", b"OW") else None
    else:
      (length,) = struct.unpack_from(end + "H", data, offset + 6)
      start = offset + 8
  else:
    (length,) = struct.unpack_from(end + "L", data, offset + 4)
    start = offset + 8
    if length == _UNDEFINED:
      return tag, -1
    # An implicit length is a whole 32-bit word; text or binary formats
    # read as one give sizes far beyond the member.
  if length > len(data) - start and length > 1 << 24:
    return None
  return tag, start + length


def _is_bare_dataset(data: bytes) -> bool:
  """True when the bytes open with a group 0002/0008 element, no preamble."""
  for little, explicit in ((True, True), (True, False), (False, True)):
    first = _plausible_element(data, 0, little, explicit)
    if first is None or first[0] >> 16 not in _FIRST_GROUPS:
      continue
    tag, following = first
    if following < 0 or following >= len(data):
      return True  # a lone element, or a sequence we do not walk
    second = _plausible_element(data, following, little, explicit)
    if second is not None and tag < second[0]:
      return True
  return False


def is_dicom(data: bytes) -> bool:
  """True when the bytes are a DICOM file or a bare DICOM dataset.

  A DICOM file has a 128-byte preamble then `DICM`. A bare dataset (no
  preamble, no file meta, e.g. written by old modalities) must open with a
  well-formed element of group 0002 or 0008, in little-endian implicit or
  explicit VR or big-endian explicit VR, followed by a second element with a
  larger tag. Cheap: at most two element headers are read. PNG, JPEG, zip,
  gzip and text all fail the element test.

  Args:
    data: the member's bytes.

  Returns:
    Whether the DICOM reader should take the member.
  """
  if data[_PREAMBLE:_PREAMBLE + 4] == _MAGIC:
    return True
  return _is_bare_dataset(data)


def _transfer_syntax(ds: Dataset) -> UID:
  """The dataset's transfer syntax, inferred from its encoding if unstated."""
  meta = getattr(ds, "file_meta", None)
  uid = meta.get("TransferSyntaxUID") if meta is not None else None
  if uid:
    return UID(str(uid).strip("\0 "))
  implicit, little = ds.original_encoding
  if implicit:
    return UID(_IMPLICIT_LE)
  return UID(_EXPLICIT_LE if little in (True, None) else _EXPLICIT_BE)


def _syntax_words(uid: UID) -> str:
  """The syntax's name and UID for a message; never an arbitrary string."""
  if not _UID_CHARS.fullmatch(str(uid)):
    return "a malformed transfer syntax UID"
  if uid.name != str(uid):
    return f"{uid.name} ({uid})"
  return f"unknown transfer syntax {uid}"


def _deflated_body(data: bytes) -> Optional[int]:
  """Offset of the dataset after the file meta when it is deflated."""
  if data[_PREAMBLE:_PREAMBLE + 4] != _MAGIC or _DEFLATED.encode() not in (
      data[:4096]):
    return None
  offset = _PREAMBLE + 4
  while True:
    element = _plausible_element(data, offset, True, True)
    if element is None or element[0] >> 16 != 0x0002 or element[1] < 0:
      return offset
    offset = element[1]


def _check_inflated_size(data: bytes) -> None:
  """Refuses a deflated dataset that inflates past `_MAX_INFLATED` bytes.

  pydicom inflates the whole dataset in memory before reading a single
  element, so a deflate bomb must be caught first; the output is counted
  in chunks and dropped.
  """
  body = _deflated_body(data)
  if body is None:
    return
  inflater = zlib.decompressobj(-zlib.MAX_WBITS)
  total = 0
  pending = data[body:]
  while pending:
    try:
      chunk = inflater.decompress(pending, 1 << 24)
    except zlib.error:
      return  # let pydicom report the broken stream
    total += len(chunk)
    if total > _MAX_INFLATED:
      raise MemberError(
          "CorruptImage",
          f"deflated DICOM dataset inflates to more than {_MAX_INFLATED}"
          " bytes")
    pending = inflater.unconsumed_tail
    if not chunk and not pending:
      break


def _read(data: bytes) -> Dataset:
  """Parses the member; big elements are left in `data`, not copied."""
  _check_inflated_size(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds = pydicom.dcmread(io.BytesIO(data), force=True,
                           defer_size=_DEFER_BYTES)
      if _transfer_syntax(ds) == _DEFLATED:
        # The deflated body is inflated into a new buffer; offsets into
        # `data` mean nothing, so its values are read, not deferred.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
  except MemberError:
    raise
  # pydicom raises many types on broken bytes.
  except Exception as e:  # pylint: disable=broad-except
    raise MemberError(
        "CorruptImage",
        f"unreadable DICOM dataset ({type(e).__name__})") from None
  return ds


def _int(ds: Dataset, keyword: str) -> Optional[int]:
  """An integer element's value, None when absent or not a number."""
  value = ds.get(keyword)
  if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
    value = value[0] if value else None
  try:
    return int(value) if value is not None and value != "" else None
  except (TypeError, ValueError):
    return None


def _photometric(ds: Dataset) -> str:
  """PhotometricInterpretation, "" when absent, "unrecognised" when odd.

  Only the standard's defined terms come back: the value is quoted in
  messages, and a free-text value there could be anything.
  """
  value = ds.get("PhotometricInterpretation")
  if not value:
    return ""
  value = str(value).strip().upper()
  return value if value in _DEFINED_PHOTOMETRICS else "unrecognised"


def _number_of_frames(ds: Dataset) -> int:
  frames = _int(ds, "NumberOfFrames")
  return frames if frames and frames > 0 else 1


def _region(ds: Dataset, rows: int, columns: int
            ) -> Optional[Tuple[int, int, int, int]]:
  """The crop box of the largest 2D tissue region, clipped to the image.

  Among items of SequenceOfUltrasoundRegions with RegionSpatialFormat 1
  (2D), those with RegionDataType 1 (tissue) win over others; then the
  largest area. DICOM's Min/Max coordinates are inclusive.
  """
  boxes = []
  for item in ds.get("SequenceOfUltrasoundRegions") or ():
    if _int(item, "RegionSpatialFormat") != 1:
      continue
    corners = [_int(item, k) for k in ("RegionLocationMinY0",
                                       "RegionLocationMaxY1",
                                       "RegionLocationMinX0",
                                       "RegionLocationMaxX1")]
    if None in corners:
      continue
    min_y, max_y, min_x, max_x = corners
    top, bottom = max(min_y, 0), min(max_y + 1, rows)
    left, right = max(min_x, 0), min(max_x + 1, columns)
    if bottom <= top or right <= left:
      continue
    tissue = _int(item, "RegionDataType") == 1
    area = (bottom - top) * (right - left)
    boxes.append(((tissue, area), (top, bottom, left, right)))
  if not boxes:
    return None
  return max(boxes, key=lambda box: box[0])[1]


class _PixelValue(NamedTuple):
  """Where the PixelData value is: in `value`, or at `tell` in the bytes."""
  value: Optional[bytes]  # None while deferred (still only in the bytes)
  tell: int  # offset of the value in the member's bytes
  length: int  # 0xFFFFFFFF for an encapsulated (undefined length) value
  vr: Optional[str]
  raw: bool  # `tell` is where the value starts (in the parsed stream)


def _pixel_element(ds: Dataset) -> Optional[_PixelValue]:
  """The PixelData value, left unread when pydicom deferred it; or None."""
  if _PIXEL_DATA not in ds:
    return None
  element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
  if isinstance(element, pydicom.dataelem.RawDataElement):
    return _PixelValue(element.value, element.value_tell, element.length,
                       element.VR, True)
  length = _UNDEFINED if element.is_undefined_length else len(
      element.value or b"")
  return _PixelValue(element.value or b"", 0, length, element.VR, False)


def _sop_class(ds: Dataset) -> Optional[str]:
  """The standard name of the dataset's SOP class, None if not standard."""
  meta = getattr(ds, "file_meta", None) or {}
  uid = UID(str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
                or ""))
  if _UID_CHARS.fullmatch(str(uid)) and uid.name != str(uid):
    return uid.name
  return None


def _sop_class_words(ds: Dataset) -> str:
  """" (a Basic Text SR Storage)" for a standard SOP class, else ""."""
  name = _sop_class(ds)
  return f" (a {name})" if name else ""


def _is_image_object(ds: Dataset) -> bool:
  """An image SOP class, or an Image Pixel module: pixel data is due.

  Reports, plans, structure sets, waveforms and DICOMDIRs have neither; an
  image without pixel data was cut short (the file meta, which names the
  class, comes first) or stripped.
  """
  name = _sop_class(ds) or ""
  return ("Image Storage" in name or "Volume Storage" in name or
          "Rows" in ds)


def _check_decoder(uid: UID) -> None:
  """Raises UnsupportedTransferSyntax when nothing here can decode `uid`."""
  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    hint = _NO_DECODER.get(str(uid), "no pydicom decoder exists for it")
    raise MemberError(
        "UnsupportedTransferSyntax",
        f"pixel data in {_syntax_words(uid)}: {hint}") from None
  if not decoder.is_available:
    hint = _PLUGIN_HINTS.get(str(uid), "a pydicom decoder plugin")
    raise MemberError(
        "UnsupportedTransferSyntax",
        f"pixel data in {_syntax_words(uid)} needs {hint}; none of these is"
        " installed")


def _stored_length(data: bytes, element: _PixelValue) -> int:
  """Bytes of a defined-length pixel value actually present in `data`."""
  if element.value is not None:
    return len(element.value)
  return max(0, min(element.length, len(data) - element.tell))


def read_header(data: bytes, max_pixels: int) -> DicomHeader:
  """Reads and checks a DICOM member's header before any pixel is decoded.

  Args:
    data: the member's bytes (`is_dicom(data)` should be True).
    max_pixels: refuse frames whose Rows × Columns exceed this.

  Returns:
    The header facts the pipeline needs, see `DicomHeader`.

  Raises:
    MemberError: `CorruptImage` (not DICOM, unparsable, pixel module missing
      or inconsistent, pixel data shorter than one frame), `NoPixelData`
      (reports, RT objects, presentation states, DICOMDIRs, waveforms),
      `UnsupportedPixelType` (float pixel data, odd photometric or bit
      depth), `UnsupportedTransferSyntax` (no decoder here; the message
      names what would read it), `TooManyPixels`.
  """
  if not is_dicom(data):
    raise MemberError("CorruptImage", "bytes are not a DICOM dataset")
  ds = _read(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return _header(ds, data, max_pixels)
  except MemberError:
    raise
  # A malformed value met while reading the header.
  except Exception as e:  # pylint: disable=broad-except
    raise MemberError(
        "CorruptImage",
        f"unreadable DICOM header ({type(e).__name__})") from None


def _header(ds: Dataset, data: bytes, max_pixels: int) -> DicomHeader:
  """`read_header` once the dataset is parsed."""
  uid = _transfer_syntax(ds)
  element = _pixel_element(ds)
  if element is None:
    if any(tag in ds for tag in _FLOAT_PIXEL_DATA):
      raise MemberError("UnsupportedPixelType",
                        "float or double float pixel data is not read")
    if _is_image_object(ds):
      raise MemberError(
          "CorruptImage",
          f"an image object{_sop_class_words(ds)} without pixel data: the"
          " file is truncated or its pixels were stripped")
    raise MemberError(
        "NoPixelData",
        f"DICOM object without pixel data{_sop_class_words(ds)}")
  _check_decoder(uid)

  rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
  bits_allocated = _int(ds, "BitsAllocated")
  bits_stored = _int(ds, "BitsStored") or bits_allocated
  samples = _int(ds, "SamplesPerPixel") or 1
  photometric = _photometric(ds)
  frames = _number_of_frames(ds)
  module = (f"Rows {rows}, Columns {columns}, BitsAllocated {bits_allocated},"
            f" BitsStored {bits_stored}, SamplesPerPixel {samples},"
            f" NumberOfFrames {frames}, PhotometricInterpretation"
            f" {photometric or 'absent'}")
  if not (rows and columns and rows > 0 and columns > 0 and bits_allocated
          and photometric):
    raise MemberError("CorruptImage", f"incomplete pixel module: {module}")
  if rows * columns > max_pixels:
    raise MemberError(
        "TooManyPixels",
        f"DICOM header declares {rows}x{columns} = {rows * columns} pixels"
        f" per frame, over the limit of {max_pixels} (--max_pixels)")
  if bits_allocated not in (1, 8, 16, 32) or not 0 < bits_stored <= (
      bits_allocated):
    raise MemberError("UnsupportedPixelType", f"bit depth not read: {module}")
  if str(uid) == _JPEG_EXTENDED and bits_stored > 8:
    raise MemberError(
        "UnsupportedTransferSyntax",
        f"pixel data in {_syntax_words(uid)} at {bits_stored} bits needs"
        f" {_GPL_LIBJPEG}; Pillow and python-gdcm read only 8 bits: {module}")
  wanted_samples = 1 if photometric in _MONOCHROME + (_PALETTE,) else 3
  if photometric not in _MONOCHROME + (_PALETTE,) + _COLOUR or (
      samples != wanted_samples):
    raise MemberError("UnsupportedPixelType",
                      f"photometric interpretation not read: {module}")

  if element.length == _UNDEFINED or uid.is_encapsulated:
    if element.value is not None and len(element.value) == 0:
      raise MemberError("CorruptImage", f"empty pixel data: {module}")
  else:
    try:
      expected = get_expected_length(ds, "bytes")
    # Inconsistent module values.
    except Exception as e:  # pylint: disable=broad-except
      raise MemberError(
          "CorruptImage",
          f"pixel module inconsistent ({type(e).__name__}): {module}"
      ) from None
    actual = _stored_length(data, element)
    if actual < math.ceil(expected / frames):
      raise MemberError(
          "CorruptImage",
          f"pixel data is {actual} bytes, shorter than one frame of the"
          f" {expected} bytes declared: {module}")

  burned_in = str(ds.get("BurnedInAnnotation", "") or "")
  return DicomHeader(
      transfer_syntax=(uid.name if _UID_CHARS.fullmatch(str(uid))
                       else "malformed"),
      frames=frames,
      multi_frame=frames > 1,
      study_uid=str(ds.StudyInstanceUID) if ds.get("StudyInstanceUID")
      else None,
      series_uid=str(ds.SeriesInstanceUID) if ds.get("SeriesInstanceUID")
      else None,
      burned_in_annotation=burned_in.strip().upper() == "YES",
      region=_region(ds, rows, columns))


# --- pixel rules ------------------------------------------------------------

def _stored_range(ds: Dataset) -> Tuple[float, float]:
  """The full range Bits Stored and Pixel Representation allow."""
  bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated") or 8
  if _int(ds, "PixelRepresentation") == 1:
    return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
  return 0.0, 2.0 ** bits - 1


def _lut_bits(item: Dataset) -> int:
  descriptor = item.get("LUTDescriptor") or (0, 0, 16)
  return int(descriptor[2])


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """Maps [low, high] linearly onto 0..255 (low may exceed high)."""
  if values.dtype == np.uint8 and (low, high) == (0.0, 255.0):
    return values
  if high == low:
    return np.zeros(values.shape, np.uint8)
  scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _frame_dataset(ds: Dataset, index: int) -> Dataset:
  """The pixel-value elements of frame `index`, with its own rescale/window.

  Enhanced multi-frame objects keep rescale and window in the shared and
  per-frame functional groups; a per-frame value overrides a shared one,
  and both override the top level. Other objects get `ds` itself.
  """
  groups = []
  for keyword, item_index in (("SharedFunctionalGroupsSequence", 0),
                              ("PerFrameFunctionalGroupsSequence", index)):
    sequence = ds.get(keyword)
    if sequence and len(sequence) > item_index:
      groups.append(sequence[item_index])
  if not groups:
    return ds
  view = Dataset()  # a new one: a shallow copy would share ds's elements
  for keyword in _PIXEL_VALUE_KEYWORDS:
    if keyword in ds:
      view.add(ds[keyword])
  meta = getattr(ds, "file_meta", None)
  if meta is not None and "TransferSyntaxUID" in meta:
    view.file_meta = meta
  else:
    view.set_original_encoding(*ds.original_encoding)
  for group in groups:
    for keyword in ("PixelValueTransformationSequence",
                    "FrameVOILUTSequence"):
      sequence = group.get(keyword)
      if not sequence:
        continue
      for element in sequence[0]:
        if element.keyword in _PIXEL_VALUE_KEYWORDS:
          view.add(element)
  return view


def _has_rescale(ds: Dataset) -> bool:
  slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
  if slope is None or intercept is None or slope == "" or intercept == "":
    return False
  return (float(slope), float(intercept)) != (1.0, 0.0)


def _monochrome(values: np.ndarray, ds: Dataset) -> np.ndarray:
  """Stored values → uint8 via the modality and VOI transforms in `ds`."""
  low, high = _stored_range(ds)
  modality_lut = ds.get("ModalityLUTSequence")
  if modality_lut:
    values = apply_modality_lut(values, ds)
    low, high = 0.0, 2.0 ** _lut_bits(modality_lut[0]) - 1
  elif _has_rescale(ds):
    slope = float(ds.RescaleSlope)
    intercept = float(ds.RescaleIntercept)
    values = values * slope + intercept
    # Unsorted: a negative slope swaps the ends, as pydicom's window does.
    low, high = low * slope + intercept, high * slope + intercept
  voi_lut = ds.get("VOILUTSequence")
  windowed = None
  if voi_lut:
    windowed = apply_voi_lut(values, ds, index=0)
    low, high = 0.0, 2.0 ** _lut_bits(voi_lut[0]) - 1
  elif ds.get("WindowCenter") is not None and ds.get(
      "WindowWidth") is not None:
    try:
      # Spans the modality output range: below the window gives `low`.
      windowed = apply_voi_lut(values, ds, index=0)
    except (ValueError, TypeError, IndexError, ZeroDivisionError):
      windowed = None  # a zero or malformed window: keep the full range
  if windowed is None:
    low, high = min(low, high), max(low, high)
  else:
    values = windowed
  grey = _to_uint8(values, low, high)
  if _photometric(ds) == "MONOCHROME1":
    grey = 255 - grey
  return grey


def _palette(values: np.ndarray, ds: Dataset) -> np.ndarray:
  """Palette indices → uint8 RGB; 16-bit entries keep their high byte.

  The high byte is exact for both ways 8-bit colours are widened to 16 bits
  (v·257 and v·256).
  """
  rgb = apply_color_lut(values, ds)
  if rgb.shape[-1] == 4:  # alpha palette
    rgb = rgb[..., :3]
  if rgb.dtype == np.uint16:
    rgb = (rgb >> 8).astype(np.uint8)
  return rgb.astype(np.uint8, copy=False)


def _colour(values: np.ndarray, ds: Dataset) -> np.ndarray:
  """RGB samples of any depth → uint8 RGB over the full stored range."""
  low, high = _stored_range(ds)
  return _to_uint8(values, low, high)


def _to_display(values: np.ndarray, ds: Dataset, photometric: str,
                index: int) -> np.ndarray:
  if photometric in _MONOCHROME:
    return _monochrome(values, _frame_dataset(ds, index))
  if photometric == _PALETTE:
    return _palette(values, ds)
  if values.ndim != 3 or values.shape[-1] != 3:
    raise MemberError("UnsupportedPixelType",
                      f"decoded colour frame has shape {values.shape}")
  return _colour(values, ds)


class _ChildError(Exception):
  """A decode that failed in the isolated process; `name` is its type."""

  def __init__(self, name: str):
    super().__init__(name)
    self.name = name


def _decode_frame_with_gdcm(uid: str, frame: bytes, opts: dict):
  """("ok", frame array) or ("error", exception type name)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      values, _ = get_decoder(UID(uid)).as_array(
          encapsulate([frame], has_bot=False), index=0, validate=True,
          decoding_plugin="gdcm", **opts)
    return "ok", values
  except Exception as e:  # pylint: disable=broad-except
    return "error", type(e).__name__


def serve_isolated_decodes() -> None:
  """Main loop of the isolated decoder process (see `_Isolated`).

  Reads pickled (uid, codestream, options) requests on stdin and writes
  one pickled reply per request on what was stdout; anything a library
  prints goes to stderr instead, so it cannot corrupt the replies.
  """
  replies = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  requests = sys.stdin.buffer
  while True:
    try:
      request = pickle.load(requests)
    except (EOFError, pickle.UnpicklingError):
      return
    pickle.dump(_decode_frame_with_gdcm(*request), replies,
                protocol=pickle.HIGHEST_PROTOCOL)
    replies.flush()


class _Isolated:
  """GDCM decodes in a child process, so that its aborts cost one frame.

  python-gdcm calls abort() on some corrupt JPEG codestreams (a C++
  exception nobody catches), which would end the Beam worker and fail the
  bundle over and over; here the child dies instead, the frame becomes
  CorruptImage and a new child starts for the next one. The child is a
  fresh interpreter (not a fork: the parent runs threads; not
  multiprocessing's spawn: it would re-run the parent's main module),
  started on first use, serving one frame at a time.
  """

  def __init__(self, timeout_s: float):
    self._timeout_s = timeout_s
    self._lock = threading.Lock()
    self._process = None

  def _start(self) -> None:
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c",
         "from busi_core import dicom; dicom.serve_isolated_decodes()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=env, close_fds=True)

  def _stop(self) -> Optional[int]:
    """Ends the child; its exit code."""
    process, self._process = self._process, None
    if process is None:
      return None
    for stream in (process.stdin, process.stdout):
      try:
        stream.close()
      except OSError:
        pass
    if process.poll() is None:
      process.kill()
    try:
      return process.wait(5)
    except subprocess.TimeoutExpired:
      return None

  def decode(self, uid: UID, frame: bytes, opts: dict) -> np.ndarray:
    with self._lock:
      if self._process is None or self._process.poll() is not None:
        self._stop()
        self._start()
      process = self._process
      try:
        pickle.dump((str(uid), frame, opts), process.stdin,
                    protocol=pickle.HIGHEST_PROTOCOL)
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [],
                                    self._timeout_s)
        if not ready:
          self._stop()
          raise _ChildError(f"DecoderTimeout({int(self._timeout_s)} s)")
        status, payload = pickle.load(process.stdout)
      except (EOFError, OSError, pickle.UnpicklingError):
        code = self._stop()
        raise _ChildError(f"DecoderProcessDied(exit code {code})") from None
    if status != "ok":
      raise _ChildError(payload)
    return payload


_GDCM = _Isolated(timeout_s=120)


def _plugins(decoder) -> Tuple[str, ...]:
  """The decoder's plugins to try, in order; GDCM only when alone.

  python-gdcm aborts the whole process (a C++ abort, not an exception) on
  some corrupt JPEG codestreams; it is kept for what only it reads here
  (JPEG Lossless), and run in a child process (see `_Isolated`).
  """
  available = [name for name in _PLUGIN_ORDER
               if name in decoder.available_plugins]
  available += sorted(set(decoder.available_plugins) - set(available))
  if len(available) > 1 and "gdcm" in available:
    available.remove("gdcm")
  return tuple(available)


def _codestream_size(frame: bytes) -> Optional[Tuple[int, int]]:
  """(height, width) a JPEG, JPEG-LS or JPEG 2000 codestream declares.

  None when the header is not found. Read before decoding: the decoder
  plugins trust the codestream, and Pillow's bomb limit is off in this
  process (see `busi_core.imaging`).
  """
  siz = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # J2K SOC + SIZ
  if siz >= 0 and len(frame) >= siz + 24:
    x, y, x0, y0 = struct.unpack_from(">LLLL", frame, siz + 8)
    return max(0, y - y0), max(0, x - x0)
  if not frame.startswith(b"\xff\xd8"):
    return None
  offset = 2
  while offset + 9 <= len(frame):
    if frame[offset] != 0xFF:
      return None
    marker = frame[offset + 1]
    if marker == 0xFF:  # fill byte
      offset += 1
      continue
    (length,) = struct.unpack_from(">H", frame, offset + 2)
    if marker in _SOF_MARKERS:
      height, width = struct.unpack_from(">HH", frame, offset + 5)
      return height, width
    offset += 2 + length
  return None


class _Frames:
  """Iterator over a member's frames, one decoded at a time.

  A frame that fails raises MemberError from `next()`; calling `next()`
  again goes on with the following frame. Encapsulated frames are cut from
  the fragments in one pass and each decoded on its own, so a frame the
  plugin refuses does not end the iteration; fragments that cannot be
  parsed any further do.
  """

  def __init__(self, data: bytes, header: DicomHeader,
               max_frames: Optional[int]):
    self._data = data
    self._header = header
    self._limit = header.frames if max_frames is None else min(
        header.frames, max(0, max_frames))
    self._index = 0  # index of the next frame to yield
    self._ready = False
    self._ended = False  # the member cannot give further frames
    self.last_number = None  # 1-based number of the frame last attempted

  def __iter__(self) -> "_Frames":
    return self

  def _setup(self) -> None:
    ds = _read(self._data)
    uid = _transfer_syntax(ds)
    _check_decoder(uid)
    element = _pixel_element(ds)
    if element is None:
      raise MemberError("NoPixelData", "DICOM object without pixel data")
    self._ds = ds
    self._uid = uid
    self._deflated = uid == _DEFLATED
    self._decoder = get_decoder(uid)
    self._photometric = _photometric(ds)
    opts = as_pixel_options(ds)
    opts["number_of_frames"] = self._header.frames
    opts["pixel_keyword"] = "PixelData"
    bits_allocated = _int(ds, "BitsAllocated") or 8
    opts["pixel_vr"] = element.vr if element.vr in ("OB", "OW") else (
        "OW" if bits_allocated > 8 else "OB")
    self._rows, self._columns = opts["rows"], opts["columns"]
    self._plugins = _plugins(self._decoder)
    if self._decoder.is_encapsulated:
      # A file-like, so the fragments are read one frame at a time; from
      # the member's bytes even when pydicom read the value, since its
      # search for the end of the value stops at a delimiter that happens
      # to sit inside a fragment, where item lengths do not.
      if element.value is not None and (self._deflated or not element.raw):
        source = io.BytesIO(element.value)
      else:
        source = io.BytesIO(self._data)
        source.seek(element.tell)
      self._encoded = generate_frames(
          source, number_of_frames=self._header.frames,
          extended_offsets=opts.pop("extended_offsets", None))
      opts["number_of_frames"] = 1
      self._validate = True
    else:
      if element.value is not None:
        self._source = element.value
      else:
        start = element.tell
        self._source = memoryview(self._data)[start:start + element.length]
      # A short native value: pydicom's whole-value check would refuse
      # every frame; it checks each frame's bounds instead, so the complete
      # frames still decode.
      self._validate = len(self._source) >= get_expected_length(ds, "bytes")
    self._opts = opts

  def _next_encoded(self, number: int) -> bytes:
    """The next frame's codestream; ends the iteration when there is none."""
    try:
      return next(self._encoded)
    # StopIteration or broken items.
    except Exception as e:  # pylint: disable=broad-except
      self._ended = True
      reason = ("has no more frames" if isinstance(e, StopIteration)
                else f"cannot be parsed further ({type(e).__name__})")
      raise MemberError(
          "CorruptImage",
          f"frame {number} of {self._header.frames}: the encapsulated pixel"
          f" data {reason}") from None

  def _decode(self, index: int) -> np.ndarray:
    """Decodes frame `index` (0-based), before any display transform."""
    if not self._decoder.is_encapsulated:
      values, _ = self._decoder.as_array(
          self._source, index=index, validate=self._validate, **self._opts)
      return values
    frame = self._next_encoded(index + 1)
    size = _codestream_size(frame)
    if size is not None and (size[0] > self._rows or
                             size[1] > self._columns):
      raise MemberError(
          "CorruptImage",
          f"frame {index + 1} of {self._header.frames}: the codestream"
          f" declares {size[0]}x{size[1]} pixels, more than the header's"
          f" Rows {self._rows}, Columns {self._columns}")
    single = encapsulate([frame], has_bot=False)
    failure = None
    for plugin in self._plugins:
      try:
        if plugin == "gdcm":
          return _GDCM.decode(self._uid, frame, self._opts)
        values, _ = self._decoder.as_array(
            single, index=0, validate=True, decoding_plugin=plugin,
            **self._opts)
        return values
      except Exception as e:  # pylint: disable=broad-except
        failure = e  # plugins raise many types; the next may succeed
    raise failure

  def __next__(self) -> Frame:
    if self._ended or self._index >= self._limit:
      raise StopIteration
    if not self._ready:
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          self._setup()
      except MemberError:
        self._ended = True
        raise
      # pydicom raises many types on broken bytes.
      except Exception as e:  # pylint: disable=broad-except
        self._ended = True
        raise MemberError(
            "CorruptImage",
            f"DICOM pixel data not readable ({type(e).__name__})") from None
      self._ready = True
    index = self._index
    self._index += 1
    number = index + 1
    self.last_number = number
    header = self._header
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = self._decode(index)
        pixels = _to_display(values, self._ds, self._photometric, index)
    except MemberError:
      raise
    # Decoder plugins raise many types.
    except Exception as e:  # pylint: disable=broad-except
      name = e.name if isinstance(e, _ChildError) else type(e).__name__
      raise MemberError(
          "CorruptImage",
          f"frame {number} of {header.frames} could not be decoded from"
          f" {_syntax_words(self._uid)} ({name})") from None
    if header.region is not None:
      top, bottom, left, right = header.region
      pixels = pixels[top:bottom, left:right]
    return Frame(number=number if header.multi_frame else None,
                 pixels=np.ascontiguousarray(pixels),
                 region_cropped=header.region is not None)


def iter_frames(data: bytes, header: DicomHeader,
                max_frames: Optional[int] = None) -> Iterator[Frame]:
  """Decodes a DICOM member's frames one at a time, each to uint8.

  Pixel rules: the full range of Bits Stored / Pixel Representation, taken
  through Rescale Slope/Intercept (or a Modality LUT) and, for monochrome
  images with one, the first VOI window or VOI LUT, is mapped linearly onto
  0..255; no per-image stretching, so 8-bit data without rescale or window
  comes out unchanged. MONOCHROME1 is inverted; YBR and JPEG colour come
  out RGB; PALETTE COLOR goes through its LUT. Frames are cropped to
  `header.region`.

  A frame that cannot be decoded raises MemberError (`CorruptImage`) from
  `next()`; calling `next()` again continues with the following frame, so
  one bad frame of a cine does not cost the others. Errors of the whole
  member (unreadable dataset) end the iteration after being raised once.

  Args:
    data: the member's bytes, as given to `read_header`.
    header: `read_header(data, ...)`.
    max_frames: decode at most this many frames (None: all).

  Returns:
    An iterator of `Frame`s, numbered 1..N for multi-frame members.
  """
  return _Frames(data, header, max_frames)
