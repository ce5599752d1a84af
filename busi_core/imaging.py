"""Per-element image functions: classify members, decode, resize.

Plain functions with no Beam in them, so they are unit-tested without a runner
and shared by preprocessing, scoring and training. The Example codec is
`schemas.records`.
"""

import hashlib
import io
import posixpath
import re
import struct
from typing import NamedTuple, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

import schemas
from busi_core.errors import MemberError

# OpenCV must not spawn its own thread pool inside Beam's worker threads.
cv2.setNumThreads(1)
# We enforce our own pixel limit before decoding (see check_header); Pillow is
# only used to read headers.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 50_000_000

_MASK_STEM = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)

# Magic numbers of the formats we decode. Bytes decide, never the extension.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class DecodedImage(NamedTuple):
  """Resized pixels of one image and the size it had before resizing."""
  pixels: np.ndarray  # uint8 [size, size, 3] RGB, or [size, size] if grey
  original_height: int
  original_width: int


def is_mask(member_path: str) -> bool:
  """True for BUSI segmentation masks: `x_mask.png`, `x_mask_1.png`, ..."""
  stem, _ = posixpath.splitext(posixpath.basename(member_path))
  return bool(_MASK_STEM.search(stem))


def mask_owner(member_path: str) -> Optional[str]:
  """For a BUSI mask, the path of its image less the extension, else None.

  `d/x (1)_mask_1.png` → `d/x (1)`, which `d/x (1).png` also gives less its
  extension: how `python -m training evaluate --masks` pairs them.
  """
  stem, _ = posixpath.splitext(member_path)
  match = _MASK_STEM.search(posixpath.basename(stem))
  return stem[:len(stem) - len(match.group(0))] if match else None


def label_from_path(member_path: str) -> str:
  """The class named by the deepest folder of the path, or "" if none is."""
  folders = member_path.replace("\\", "/").split("/")[:-1]
  for folder in reversed(folders):
    if folder.strip().lower() in schemas.LABELS:
      return folder.strip().lower()
  return ""


def image_id(data: bytes) -> str:
  """Content id of a member: sha256 hex of its bytes."""
  return hashlib.sha256(data).hexdigest()


def sniff_format(data: bytes) -> Optional[str]:
  """Image format from the leading bytes, or None if not one we decode."""
  for magic, name in _SIGNATURES:
    if data.startswith(magic):
      return name
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  return None


# Compressed files and archives the pipeline does not open, by signature.
_OTHER_ARCHIVES = ((b"\xfd7zXZ\x00", "xz"),
                   (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"),
                   (b"\x28\xb5\x2f\xfd", "zstd"))


def sniff_archive(data: bytes) -> Optional[str]:
  """"zip", "gzip", "tar" (or "bzip2", "xz", "7z", "rar", "zstd", which
  only get an error) when the bytes are an archive, else None."""
  if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    return "zip"
  if data[:2] == b"\x1f\x8b":
    return "gzip"
  if data[257:262] == b"ustar":
    return "tar"
  for magic, name in _OTHER_ARCHIVES:
    if data.startswith(magic):
      return name
  if data[:3] == b"BZh" and data[3:10] in (  # its block size, a block
      b"%d1AY&SY" % level for level in range(1, 10)):
    return "bzip2"
  return None


# The archives preprocess and run open as --input (a gzip one: tar.gz); the
# other kinds `sniff_archive` names only get an error.
PREPROCESS_ARCHIVES = ("zip", "gzip", "tar")


def _lead(data: bytes) -> str:
  """What the first bytes look like, for an error message.

  A binary signature is shown in hex; anything that may be text is not
  quoted, in any encoding, since a stray report or export in a hospital
  archive may start with a patient's name.
  """
  head = data[:8]
  if _may_be_text(head):
    return f"starts with {len(head)} bytes of text"
  return f"starts with bytes {head.hex(' ')}"


# Byte-order marks: UTF-8, UTF-16 LE (and UTF-32 LE), UTF-16 BE, UTF-32 BE.
_TEXT_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
# Control bytes that no 8-bit text encoding uses for text (tab, line feed,
# form feed, carriage return and escape, which ISO-2022 uses, are left out):
# every common binary signature has one in its first 8 bytes.
_BINARY_BYTES = frozenset([*range(0x00, 0x09), *range(0x0e, 0x1b),
                           *range(0x1c, 0x20), 0x7f])


def _may_be_text(head: bytes) -> bool:
  """Whether the leading bytes may be text: a byte-order mark; no control
  byte that text never holds (ASCII, UTF-8, Latin-1, Shift-JIS, ISO-2022,
  ...); or UTF-16 (one script) or UTF-32 without a mark, printable."""
  if head.startswith(_TEXT_BOMS) or not _BINARY_BYTES.intersection(head):
    return True
  for encoding, width in (("utf-16-le", 2), ("utf-16-be", 2),
                          ("utf-32-le", 4), ("utf-32-be", 4)):
    whole = head[:len(head) - len(head) % width]
    if len(whole) < 2 * width:
      continue
    # UTF-16 text in one script keeps one high byte (00 for Latin-1, 04 for
    # Cyrillic); UTF-32 decodes only below U+110000: either way, binary
    # signatures fail.
    if width == 2:
      high = whole[1::2] if encoding.endswith("le") else whole[0::2]
      if len(set(high)) > 1:
        continue
    try:
      text = whole.decode(encoding)
    except UnicodeDecodeError:
      continue
    if all(c.isprintable() or c in "\t\r\n" for c in text):
      return True
  return False


def check_header(data: bytes, max_pixels: int) -> Tuple[str, int, int]:
  """Validates the bytes as an image before any pixel is decoded.

  Args:
    data: the member's bytes.
    max_pixels: refuse images whose header declares more pixels than this.

  Returns:
    (format, height, width) as declared by the header.

  Raises:
    MemberError: empty, not an image, unreadable header, or too many pixels.
  """
  if not data:
    raise MemberError("EmptyFile", "zero-byte file")
  fmt = sniff_format(data)
  nested = sniff_archive(data) if fmt is None else None
  if nested:
    raise MemberError(
        "NestedArchive",
        f"a {nested} file, not an image: zip, tar and tar.gz (.tgz) files"
        " given as --input are opened, not archives inside them nor other"
        " compressed files; extract it (a zip or tar can be its own"
        " --input)")
  if fmt is None:
    raise MemberError(
        "NotAnImage",
        f"bytes are not PNG, JPEG, BMP, TIFF, WebP or DICOM ({_lead(data)})")
  try:
    if fmt == "png" and data[12:16] == b"IHDR" and len(data) >= 24:
      # The PNG header is fixed: read it directly (Pillow costs ~0.1 ms).
      width, height = struct.unpack(">II", data[16:24])
    else:
      with Image.open(io.BytesIO(data)) as header:
        width, height = header.size
  except Exception as e:  # Pillow raises many types for broken headers.
    raise MemberError("CorruptImage",
                      f"unreadable {fmt} header: {type(e).__name__}: {e}") from e
  if width <= 0 or height <= 0:
    raise MemberError("CorruptImage", f"{fmt} header declares {width}x{height}")
  if width * height > max_pixels:
    raise MemberError(
        "TooManyPixels",
        f"{fmt} header declares {width}x{height} = {width * height} pixels,"
        f" over the limit of {max_pixels} (--max_pixels)")
  return fmt, height, width


def _to_8bit(img: np.ndarray) -> np.ndarray:
  """OpenCV's decoded array (any depth, 1-4 channels) → uint8 grey or BGR.

  Grey stays 2-D so that resizing touches one channel, not three; alpha is
  dropped.
  """
  if img.dtype == np.uint16:
    img = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
  elif img.dtype != np.uint8:
    raise MemberError("UnsupportedPixelType", f"pixel type {img.dtype}")
  if img.ndim == 2:
    return img
  channels = img.shape[2]
  if channels in (1, 2):  # grey, grey + alpha
    return np.ascontiguousarray(img[:, :, 0])
  if channels == 3:
    return img
  if channels == 4:
    return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
  raise MemberError("UnsupportedChannels", f"{channels} channels")


def _is_grey(bgr: np.ndarray) -> bool:
  """True when all three channels are equal (a grey frame saved as RGB)."""
  return (np.array_equal(bgr[..., 0], bgr[..., 1]) and
          np.array_equal(bgr[..., 1], bgr[..., 2]))


def decode_and_resize(data: bytes, image_size: int,
                      max_pixels: int = DEFAULT_MAX_PIXELS,
                      keep_grey: bool = False) -> DecodedImage:
  """Decodes image bytes with OpenCV into image_size² uint8 RGB.

  Grey images are replicated to three channels, alpha is dropped, 16-bit
  samples are scaled to 8 bits. EXIF orientation is not applied: ultrasound
  frames are stored as acquired, and rotating them would misalign the masks.

  Args:
    data: encoded image bytes (PNG, JPEG, BMP, TIFF, WebP).
    image_size: output height and width.
    max_pixels: pixel limit checked on the header before decoding.
    keep_grey: return a grey image (a grey file, or a colour file whose
      resized channels are all equal) as 2-D [size, size] instead of
      replicating it: what the TFRecords store (see
      `schemas.records.to_example`).

  Returns:
    The resized pixels and the original height and width.

  Raises:
    MemberError: the bytes are not a decodable image within the limits.
  """
  fmt, _, _ = check_header(data, max_pixels)
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if img is None or img.size == 0:
    raise MemberError("CorruptImage", f"OpenCV could not decode the {fmt} data")
  return _resize(_to_8bit(img), image_size, keep_grey, bgr=True)


def resize_pixels(pixels: np.ndarray, image_size: int,
                  keep_grey: bool = False) -> DecodedImage:
  """Resizes decoded uint8 pixels as `decode_and_resize` does.

  For pixels decoded elsewhere (DICOM frames), so that every image reaches
  the model through the same filter and grey handling.

  Args:
    pixels: uint8 [H, W] grey or [H, W, 3] RGB.
    image_size: output height and width.
    keep_grey: as for `decode_and_resize`.

  Returns:
    The resized pixels and the original height and width.

  Raises:
    MemberError: the pixels are not uint8 grey or RGB.
  """
  if (pixels.dtype != np.uint8 or pixels.size == 0 or
      not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3))):
    raise MemberError("UnsupportedPixelType",
                      f"pixels {pixels.dtype} {tuple(pixels.shape)}: expected"
                      " uint8 grey or RGB")
  return _resize(pixels, image_size, keep_grey, bgr=False)


def _resize(img: np.ndarray, image_size: int, keep_grey: bool,
            bgr: bool) -> DecodedImage:
  height, width = img.shape[:2]
  # INTER_AREA: the right filter for the usual downscale of ~500 px frames.
  # It filters each channel alike, so resizing before the channel swap (or
  # the grey test) gives the same pixels as after it, with less work.
  img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
  if img.ndim == 3 and keep_grey and _is_grey(img):
    img = np.ascontiguousarray(img[:, :, 0])
  if img.ndim == 2:
    if not keep_grey:
      img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
  elif bgr:
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  return DecodedImage(img, height, width)
