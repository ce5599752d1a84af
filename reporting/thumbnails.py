"""Thumbnails of scored images, read back from the run's TFRecords.

A run keeps no picture of each image (only Grad-CAM overlays, for some), but
the pixels it scored are in TFRecords: `DIR/tfrecords/` for a `run`, the
input globs in the manifest for a `score` run. The scan goes through Beam's
FileSystems (local or gs://) and stops as soon as every wanted image is
found: the report wants a handful of images, not a pass over the run.
"""

import contextlib
import os
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

import cv2
import numpy as np
from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import tfrecord_io
from schemas import records

# Longest side of a thumbnail: a few of them keep the page small, and a
# 224-pixel image (the default size) still shows its structure.
MAX_THUMBNAIL_SIDE = 160


class Thumbnail(NamedTuple):
  """One image's PNG thumbnail, or why there is none."""
  png: Optional[bytes]
  problem: Optional[str]


class TFRecordFiles(NamedTuple):
  """The TFRecord files that hold a run's pixels.

  Attributes:
    uris: the files, sorted; empty when none was found.
    looked_in: the globs searched, for a message when an image is missing.
    problem: why listing failed, if it did.
  """
  uris: Sequence[str]
  looked_in: Sequence[str]
  problem: Optional[str] = None


def _match(pattern: str) -> List[str]:
  [result] = FileSystems.match([pattern])
  return sorted(m.path for m in result.metadata_list)


def tfrecord_files(run_dir: str, manifest: Optional[dict]) -> TFRecordFiles:
  """The run's own `tfrecords/` shards, else a `score` run's input globs.

  Args:
    run_dir: the run's output directory.
    manifest: its manifest.json, or None.

  Returns:
    The files found (none is not an error here: every image then says so).
  """
  own = os.path.join(run_dir, schemas.TFRECORD_DIR,
                     "*" + schemas.TFRECORD_SUFFIX)
  patterns = [own]
  # A `run` manifest's inputs are archives, not TFRecords.
  if (manifest or {}).get(schemas.MANIFEST_COMMAND) == schemas.COMMAND_SCORE:
    patterns += [str(p) for p in manifest.get(schemas.MANIFEST_INPUTS) or ()]
  uris: List[str] = []
  for i, pattern in enumerate(patterns):
    try:
      uris = _match(pattern)
    except Exception as e:  # pylint: disable=broad-except
      # BeamIOError locally, HTTP errors on gs://: the report still renders.
      return TFRecordFiles((), tuple(patterns[:i + 1]),
                           f"cannot list {pattern}: {type(e).__name__}: {e}")
    if uris:
      # The run's own shards are what it scored; the inputs only stand in.
      return TFRecordFiles(tuple(uris), tuple(patterns[:i + 1]))
  return TFRecordFiles((), tuple(patterns))


def thumbnail_png(pixels: np.ndarray,
                  max_side: int = MAX_THUMBNAIL_SIDE) -> bytes:
  """uint8 RGB [H, W, 3] pixels as PNG bytes, shrunk to `max_side` at most.

  Raises:
    ValueError: OpenCV could not encode the image.
  """
  height, width = pixels.shape[:2]
  scale = max_side / max(height, width)
  if scale < 1:
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
  ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError(f"cannot encode a {pixels.shape} image as PNG")
  return encoded.tobytes()


def _thumbnail(pixels: np.ndarray, max_side: int) -> Thumbnail:
  try:
    return Thumbnail(thumbnail_png(pixels, max_side), None)
  except (ValueError, cv2.error) as e:
    return Thumbnail(None, f"{type(e).__name__}: {e}")


def read_thumbnails(image_ids: Iterable[str], files: TFRecordFiles,
                    max_side: int = MAX_THUMBNAIL_SIDE
                   ) -> Dict[str, Thumbnail]:
  """Finds each image in the TFRecords and makes its thumbnail.

  Args:
    image_ids: the images wanted.
    files: from `tfrecord_files`.
    max_side: longest side of a thumbnail.

  Returns:
    A Thumbnail for every wanted id: its PNG, or the reason there is none
    (no TFRecords, not in them, unreadable), so no image silently vanishes.
  """
  ids = list(image_ids)
  wanted = set(ids)
  found: Dict[str, Thumbnail] = {}
  damaged = 0
  for uri in files.uris:
    if len(found) == len(wanted):
      break
    # closing(): stopping early must still close the file.
    with contextlib.closing(tfrecord_io.read_file(uri)) as items:
      for item in items:
        if isinstance(item, tfrecord_io.Damage):
          damaged += 1
          continue
        try:
          record = records.from_example(item.payload)
        except ValueError:
          damaged += 1
          continue
        if record.image_id in wanted and record.image_id not in found:
          found[record.image_id] = _thumbnail(record.pixels, max_side)
          if len(found) == len(wanted):
            break
  if files.problem:
    missing = files.problem
  elif not files.uris:
    missing = f"no TFRecords found (looked in {', '.join(files.looked_in)})"
  else:
    missing = (f"not in the {len(files.uris)} TFRecord file"
               f"{'s' if len(files.uris) != 1 else ''} read")
    if damaged:
      missing += f" ({damaged} damaged records or regions skipped)"
  return {image_id: found.get(image_id, Thumbnail(None, missing))
          for image_id in ids}
