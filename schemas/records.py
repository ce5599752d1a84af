"""The record codec: one image as a `tf.train.Example`, and back.

The one place where the TFRecord payload is written and read, beside the
feature names it spells (`schemas.features`); preprocessing, scoring,
training, the tests and the benchmarks all go through `to_example` and
`from_example`. Framing (the TFRecord file itself) is `busi_core.tfrecord_io`.

Format 2 stores a grey image as one channel (`channels` = 1: a third of the
bytes to compress, write and read) and `from_example` replicates it to RGB;
format 1 records have no `channels` feature and hold RGB.

The messages are the generated classes of `schemas._example_pb2` (TensorFlow's
Example under the proto package `busi.tfexample`), so this needs protobuf and
numpy, never TensorFlow. They replaced a hand-written wire encoder after
`bench/codec_bench.py` (one core, 224×224) measured both: encoding costs the
same within 0.02 ms per image (about 0.11 ms grey, 0.19 ms RGB), at most
0.2 % of the preprocessing stage's 5-10 ms of work per image, and parsing is
as fast as TensorFlow's own class (the same protobuf runtime).
"""

import re
from typing import NamedTuple, Optional

import numpy as np

from schemas import _example_pb2
from schemas import features as _features
from schemas import quality as _quality

# The id names Grad-CAM files and joins tables: only a sha256 hex digest is
# accepted on reading, so a crafted record cannot steer a path.
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
# Quality flag names (snake_case) joined by QUALITY_FLAG_SEPARATOR, or "".
# Names outside schemas.QUALITY_FLAGS pass (a newer writer may add flags);
# anything else is refused, so what scoring copies into a table is names.
_QUALITY_FLAGS = re.compile(
    r"(?:[a-z0-9_]{1,64}(?:%s[a-z0-9_]{1,64}){0,31})?"
    % re.escape(_quality.QUALITY_FLAG_SEPARATOR))


class ImageRecord(NamedTuple):
  """One Example's content, as read back from a TFRecord."""
  image_id: str
  source: str
  label: str
  # uint8 [height, width, 3] RGB; to_example also takes grey [height, width].
  pixels: np.ndarray
  original_height: int
  original_width: int
  # Names of the quality flags that fired (schemas.quality), joined by
  # QUALITY_FLAG_SEPARATOR; "" when none did; None when not checked (records
  # written before the checks existed).
  quality_flags: Optional[str] = None
  # DICOM only (schemas.features): None for other images.
  frame: Optional[int] = None  # 1-based frame of a multi-frame DICOM
  study_key: Optional[str] = None  # keyed hash hex of StudyInstanceUID
  series_key: Optional[str] = None  # keyed hash hex of SeriesInstanceUID
  region_cropped: Optional[bool] = None  # cropped to the US B-mode region


# A study/series key is an HMAC-SHA256 hex digest: nothing else (no UID, no
# free text) can pass through these features.
_KEY = _IMAGE_ID


def _check_dicom_fields(frame, study_key, series_key) -> None:
  if frame is not None and frame < 1:
    raise ValueError(f"frame {frame}: frames are numbered from 1")
  for name, value in (("study_key", study_key), ("series_key", series_key)):
    if value is not None and not _KEY.fullmatch(value):
      raise ValueError(f"{name} {value[:80]!r} is not an HMAC-SHA256 hex"
                       " digest")


def to_example(record: ImageRecord) -> bytes:
  """Serialises one image as a tf.train.Example (the TFRecord payload).

  Grey pixels ([H, W] or [H, W, 1]) are stored as one channel; `from_example`
  gives them back as RGB. quality_flags is stored when it is not None ("" too).
  Map entries are written sorted by key (deterministic serialisation), so
  the same record is always the same bytes.

  Args:
    record: the image and its fields; pixels uint8 [H, W], [H, W, 1] or
      [H, W, 3].

  Returns:
    The serialized Example.

  Raises:
    ValueError: the pixels have another shape, or quality_flags is not flag
      names joined by commas (from_example would refuse it).
  """
  pixels = np.ascontiguousarray(record.pixels, dtype=np.uint8)
  height, width = pixels.shape[:2]
  channels = 1 if pixels.ndim == 2 else pixels.shape[2]
  if pixels.ndim not in (2, 3) or channels not in (1, 3):
    raise ValueError(f"pixels of shape {pixels.shape}: expected [H, W],"
                     " [H, W, 1] or [H, W, 3]")
  if (record.quality_flags is not None and
      not _QUALITY_FLAGS.fullmatch(record.quality_flags)):
    raise ValueError(f"quality_flags {record.quality_flags[:80]!r} are not"
                     " flag names joined by commas")
  example = _example_pb2.Example()
  feature = example.features.feature
  for key, value in (
      (_features.FEATURE_IMAGE, pixels.tobytes()),
      (_features.FEATURE_IMAGE_ID, record.image_id.encode()),
      (_features.FEATURE_SOURCE, record.source.encode("utf-8")),
      (_features.FEATURE_LABEL, record.label.encode()),
  ):
    feature[key].bytes_list.value.append(value)
  if record.quality_flags is not None:
    feature[_features.FEATURE_QUALITY_FLAGS].bytes_list.value.append(
        record.quality_flags.encode())
  _check_dicom_fields(record.frame, record.study_key, record.series_key)
  for key, value in ((_features.FEATURE_STUDY_KEY, record.study_key),
                     (_features.FEATURE_SERIES_KEY, record.series_key)):
    if value is not None:
      feature[key].bytes_list.value.append(value.encode())
  for key, value in ((_features.FEATURE_FRAME, record.frame),
                     (_features.FEATURE_REGION_CROPPED, record.region_cropped)):
    if value is not None:
      feature[key].int64_list.value.append(int(value))
  for key, value in (
      (_features.FEATURE_CHANNELS, channels),
      (_features.FEATURE_HEIGHT, height),
      (_features.FEATURE_WIDTH, width),
      (_features.FEATURE_ORIGINAL_HEIGHT, record.original_height),
      (_features.FEATURE_ORIGINAL_WIDTH, record.original_width),
  ):
    feature[key].int64_list.value.append(value)
  return example.SerializeToString(deterministic=True)


def from_example(serialized: bytes) -> ImageRecord:
  """Parses an Example written by to_example (format 1 or 2) back.

  Args:
    serialized: one TFRecord payload.

  Returns:
    The record, with pixels always [height, width, 3] RGB: a one-channel
    image is replicated. Records without a `channels` feature (format 1)
    hold three. quality_flags is None when the record has no
    `quality_flags` feature (written before the checks existed).

  Raises:
    ValueError: the bytes are not an Example, a feature is missing, the
      image_id is not a sha256 hex digest, quality_flags is not flag names
      joined by commas, or the pixel bytes do not match
      the stored height × width × channels.
  """
  try:
    feature = _example_pb2.Example.FromString(serialized).features.feature
  except Exception as e:  # protobuf's DecodeError and friends
    raise ValueError(
        f"not a tf.train.Example: {type(e).__name__}: {e}") from e

  def one(key, kind):
    if key not in feature:
      raise ValueError(f"feature {key!r} missing")
    values = getattr(feature[key], kind).value
    if len(values) != 1:
      raise ValueError(f"feature {key!r} has {len(values)} values, expected 1")
    return values[0]

  height = one(_features.FEATURE_HEIGHT, "int64_list")
  width = one(_features.FEATURE_WIDTH, "int64_list")
  raw = one(_features.FEATURE_IMAGE, "bytes_list")
  channels = (one(_features.FEATURE_CHANNELS, "int64_list")
              if _features.FEATURE_CHANNELS in feature else 3)
  if channels not in (1, 3):
    raise ValueError(f"image has {channels} channels, expected 1 or 3")
  if height <= 0 or width <= 0 or len(raw) != height * width * channels:
    raise ValueError(f"image has {len(raw)} bytes, expected"
                     f" {height}x{width}x{channels}")
  pixels = np.frombuffer(raw, np.uint8).reshape(height, width, channels)
  if channels == 1:
    pixels = np.repeat(pixels, 3, axis=2)
  label = (one(_features.FEATURE_LABEL, "bytes_list")
           if _features.FEATURE_LABEL in feature else b"")
  image_id = one(_features.FEATURE_IMAGE_ID, "bytes_list").decode(
      "ascii", "replace")
  if not _IMAGE_ID.fullmatch(image_id):
    raise ValueError(f"image_id {image_id[:80]!r} is not a sha256 hex digest")
  quality_flags = None
  if _features.FEATURE_QUALITY_FLAGS in feature:
    quality_flags = one(_features.FEATURE_QUALITY_FLAGS, "bytes_list").decode(
        "ascii", "replace")
    if not _QUALITY_FLAGS.fullmatch(quality_flags):
      raise ValueError(f"quality_flags {quality_flags[:80]!r} are not flag"
                       " names joined by commas")

  def optional(key, kind):
    return one(key, kind) if key in feature else None

  frame = optional(_features.FEATURE_FRAME, "int64_list")
  keys = [optional(key, "bytes_list") for key in (
      _features.FEATURE_STUDY_KEY, _features.FEATURE_SERIES_KEY)]
  study_key, series_key = [None if value is None else
                           value.decode("ascii", "replace") for value in keys]
  _check_dicom_fields(frame, study_key, series_key)
  cropped = optional(_features.FEATURE_REGION_CROPPED, "int64_list")
  return ImageRecord(
      image_id=image_id,
      source=one(_features.FEATURE_SOURCE, "bytes_list").decode("utf-8"),
      label=label.decode(),
      pixels=pixels,
      original_height=one(_features.FEATURE_ORIGINAL_HEIGHT, "int64_list"),
      original_width=one(_features.FEATURE_ORIGINAL_WIDTH, "int64_list"),
      quality_flags=quality_flags,
      frame=frame,
      study_key=study_key,
      series_key=series_key,
      region_cropped=None if cropped is None else bool(cropped),
  )
