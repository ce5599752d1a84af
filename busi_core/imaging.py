"""Per-element image functions: classify members, decode, resize, to Example.

Plain functions with no Beam in them, so they are unit-tested without a runner
and shared by training (reading Examples back) and scoring.
"""

import functools
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
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")

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


class ImageRecord(NamedTuple):
  """One Example's content, as read back from a TFRecord."""
  image_id: str
  source: str
  label: str
  # uint8 [height, width, 3] RGB; to_example also takes grey [height, width].
  pixels: np.ndarray
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


def sniff_archive(data: bytes) -> Optional[str]:
  """"zip", "gzip" or "tar" when the bytes are an archive, else None."""
  if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    return "zip"
  if data[:2] == b"\x1f\x8b":
    return "gzip"
  if data[257:262] == b"ustar":
    return "tar"
  return None


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
        f"a {nested} archive inside an archive; only one level is read:"
        " extract it and pass it as its own --input")
  if fmt is None:
    raise MemberError(
        "NotAnImage",
        f"bytes are not PNG, JPEG, BMP, TIFF or WebP (starts with {data[:8]!r})")
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
      replicating it: what the TFRecords store (see `to_example`).

  Returns:
    The resized pixels and the original height and width.

  Raises:
    MemberError: the bytes are not a decodable image within the limits.
  """
  fmt, _, _ = check_header(data, max_pixels)
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if img is None or img.size == 0:
    raise MemberError("CorruptImage", f"OpenCV could not decode the {fmt} data")
  height, width = img.shape[:2]
  img = _to_8bit(img)
  # INTER_AREA: the right filter for the usual downscale of ~500 px frames.
  # It filters each channel alike, so resizing before the channel swap (or
  # the grey test) gives the same pixels as after it, with less work.
  img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
  if img.ndim == 3 and keep_grey and _is_grey(img):
    img = np.ascontiguousarray(img[:, :, 0])
  if img.ndim == 2:
    if not keep_grey:
      img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
  else:
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  return DecodedImage(img, height, width)


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # int64 as protobuf's two's-complement varint
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


@functools.lru_cache(maxsize=4096)
def _head(number: int, length: int) -> bytes:
  """Tag and length of a length-delimited protobuf field (cached: the same
  few lengths recur for every image)."""
  return _varint(number << 3 | 2) + _varint(length)


def _feature_parts(key: str, kind: int, payload) -> list:
  """One Features map entry as a list of byte strings (payload not copied).

  Nesting: map entry {key=1, value=2: Feature {kind: List {value=1}}}, where
  kind is 1 for BytesList and 3 for Int64List (packed varints).
  """
  size = len(payload)
  inner = _head(1, size)  # BytesList.value / Int64List.value (packed)
  feature = _head(kind, len(inner) + size)
  value_len = len(feature) + len(inner) + size
  key_field = _head(1, len(key)) + key.encode()
  entry = key_field + _head(2, value_len)
  return [_head(1, len(entry) + value_len), entry, feature, inner, payload]


def to_example(record: ImageRecord) -> bytes:
  """Serialises one image as a tf.train.Example (the TFRecord payload).

  The protobuf wire format is written directly: the same message that
  `tf.train.Example(...).SerializeToString()` encodes (a test parses it with
  TensorFlow), without importing TensorFlow into the preprocessing workers,
  and with the pixels copied once instead of once per nesting level.

  Grey pixels ([H, W] or [H, W, 1]) are stored as one channel: a third of
  the bytes to compress, write and read. `from_example` gives them back as
  RGB.
  """
  pixels = np.ascontiguousarray(record.pixels, dtype=np.uint8)
  height, width = pixels.shape[:2]
  channels = 1 if pixels.ndim == 2 else pixels.shape[2]
  if pixels.ndim not in (2, 3) or channels not in (1, 3):
    raise ValueError(f"pixels of shape {pixels.shape}: expected [H, W],"
                     " [H, W, 1] or [H, W, 3]")
  parts = []
  for key, kind, payload in (
      (schemas.FEATURE_IMAGE, 1, memoryview(pixels).cast("B")),
      (schemas.FEATURE_CHANNELS, 3, _varint(channels)),
      (schemas.FEATURE_IMAGE_ID, 1, record.image_id.encode()),
      (schemas.FEATURE_SOURCE, 1, record.source.encode("utf-8")),
      (schemas.FEATURE_LABEL, 1, record.label.encode()),
      (schemas.FEATURE_HEIGHT, 3, _varint(height)),
      (schemas.FEATURE_WIDTH, 3, _varint(width)),
      (schemas.FEATURE_ORIGINAL_HEIGHT, 3, _varint(record.original_height)),
      (schemas.FEATURE_ORIGINAL_WIDTH, 3, _varint(record.original_width)),
  ):
    parts += _feature_parts(key, kind, payload)
  features_len = sum(len(p) for p in parts)
  # Example.features (1) → Features.feature (1) entries.
  return b"".join([_head(1, features_len)] + parts)


def from_example(serialized: bytes) -> ImageRecord:
  """Parses an Example written by to_example back into pixels and fields.

  Raises:
    ValueError: a feature is missing or the pixel bytes do not match the
      stored height × width × channels.

  Returns:
    The record, with pixels always [height, width, 3] RGB: a one-channel
    image is replicated. Records without a `channels` feature (format 1)
    hold three.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  feature = tf.train.Example.FromString(serialized).features.feature

  def one(key, kind):
    if key not in feature:
      raise ValueError(f"feature {key!r} missing")
    values = getattr(feature[key], kind).value
    if len(values) != 1:
      raise ValueError(f"feature {key!r} has {len(values)} values, expected 1")
    return values[0]

  height = one(schemas.FEATURE_HEIGHT, "int64_list")
  width = one(schemas.FEATURE_WIDTH, "int64_list")
  raw = one(schemas.FEATURE_IMAGE, "bytes_list")
  channels = (one(schemas.FEATURE_CHANNELS, "int64_list")
              if schemas.FEATURE_CHANNELS in feature else 3)
  if channels not in (1, 3):
    raise ValueError(f"image has {channels} channels, expected 1 or 3")
  if height <= 0 or width <= 0 or len(raw) != height * width * channels:
    raise ValueError(f"image has {len(raw)} bytes, expected"
                     f" {height}x{width}x{channels}")
  pixels = np.frombuffer(raw, np.uint8).reshape(height, width, channels)
  if channels == 1:
    pixels = np.repeat(pixels, 3, axis=2)
  label = (one(schemas.FEATURE_LABEL, "bytes_list")
           if schemas.FEATURE_LABEL in feature else b"")
  # The id names Grad-CAM files and joins tables: only a sha256 hex digest
  # is accepted, so a crafted record cannot steer a path.
  image_id_value = one(schemas.FEATURE_IMAGE_ID, "bytes_list").decode(
      "ascii", "replace")
  if not _IMAGE_ID.fullmatch(image_id_value):
    raise ValueError(f"image_id {image_id_value[:80]!r} is not a sha256 hex"
                     " digest")
  return ImageRecord(
      image_id=image_id_value,
      source=one(schemas.FEATURE_SOURCE, "bytes_list").decode("utf-8"),
      label=label.decode(),
      pixels=pixels,
      original_height=one(schemas.FEATURE_ORIGINAL_HEIGHT, "int64_list"),
      original_width=one(schemas.FEATURE_ORIGINAL_WIDTH, "int64_list"),
  )
