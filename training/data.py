"""Reading the preprocessing stage's TFRecords into labelled arrays.

Files are read with `busi_core.tfrecord_io` and Examples parsed with
`schemas.records.from_example`, the reader and codec the pipeline writes and
scores with (grey frames come back replicated to RGB), so the two cannot
disagree about the format. BUSI is small (780 images, ~120 MB at 224²), so the labelled set is held in memory
as one uint8 array; features and augmentation are computed from that.
"""

import collections
import logging
from typing import (Callable, Dict, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple)

import numpy as np
from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import tfrecord_io
from schemas import records

_LOG = logging.getLogger(__name__)


class LabelledData(NamedTuple):
  """Labelled images sorted by image_id (one entry per distinct image)."""
  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int64 [N], indices into the label list
  image_ids: List[str]
  sources: List[str]


class ReadStats(NamedTuple):
  """What happened to every example read."""
  examples: int  # all examples in the files
  unlabelled: int  # label "" (skipped)
  unknown_label: int  # a label not in the model's labels (skipped)
  duplicates: int  # same image_id and label as an earlier one (skipped)
  conflicting: int  # same image_id under different labels (all skipped)
  used: int


def expand_globs(patterns: Sequence[str],
                 no_match: Callable[[str], str]) -> List[str]:
  """Expands globs (local or gs://) into a sorted list of distinct files.

  Args:
    patterns: the globs.
    no_match: the error message for a pattern that matches nothing.

  Raises:
    ValueError: a pattern matches no file.
  """
  files = set()
  for pattern, result in zip(patterns, FileSystems.match(list(patterns))):
    if not result.metadata_list:
      raise ValueError(no_match(pattern))
    files.update(m.path for m in result.metadata_list)
  return sorted(files)


def list_files(patterns: Sequence[str]) -> List[str]:
  """The TFRecord files of `--data` globs (see `expand_globs`)."""
  return expand_globs(patterns, lambda pattern: (
      f"--data {pattern!r} matches no file. Pass the TFRecords written by"
      " `python -m beam_pipeline preprocess`, e.g."
      f" 'OUT/{schemas.TFRECORD_DIR}/*{schemas.TFRECORD_SUFFIX}'."))


def read_records(files: Sequence[str]) -> Iterator[records.ImageRecord]:
  """Every example of the TFRecord files, parsed, file by file in order.

  Raises:
    ValueError: a file is damaged (training takes every record or none, as
      it did with tf.data) or holds a malformed Example; the message names
      the file and the record.
  """
  for path in files:
    for item in tfrecord_io.read_file(path):
      if isinstance(item, tfrecord_io.Damage):
        raise ValueError(f"{path}: {item.error_type}: {item.message}")
      try:
        yield records.from_example(item.payload)
      except ValueError as e:
        raise ValueError(f"{path}#{item.index}: {e}") from e


def load_labelled(patterns: Sequence[str],
                  labels: Sequence[str] = schemas.LABELS,
                  image_size: Optional[int] = None,
                  model_size: bool = False
                 ) -> Tuple[LabelledData, ReadStats]:
  """Reads the labelled examples of the TFRecords matched by `patterns`.

  Args:
    patterns: globs of `*.tfrecord.gz` files.
    labels: class names; an example's label becomes its index here.
    image_size: the size every image must have; None accepts the size of the
      first labelled image (all must still agree).
    model_size: `image_size` is a trained model's (evaluate, recalibrate),
      not an --image_size flag: a mismatch is worded so.

  Returns:
    The data (sorted by image_id) and the read counts.

  Raises:
    ValueError: no file matches, no labelled image is found, or images differ
      in size from each other or from `image_size`.
  """
  index = {label: i for i, label in enumerate(labels)}
  counts = collections.Counter()
  by_id: Dict[str, List[records.ImageRecord]] = collections.defaultdict(list)
  sizes = collections.Counter()
  for record in read_records(list_files(patterns)):
    counts["examples"] += 1
    if not record.label:
      counts["unlabelled"] += 1
      continue
    if record.label not in index:
      counts["unknown_label"] += 1
      continue
    sizes[record.pixels.shape[:2]] += 1
    by_id[record.image_id].append(record)
  if not by_id:
    raise ValueError(
        f"no labelled image in {list(patterns)} ({counts['examples']} examples,"
        f" {counts['unlabelled']} unlabelled). An image's label is the"
        " folder it sits in: put the images under folders named after a"
        f" class ({', '.join(labels)}) and preprocess them again.")
  if len(sizes) > 1:
    raise ValueError(
        f"the TFRecords hold images of several sizes {dict(sizes)}; preprocess"
        " all inputs with the same --image_size")
  (height, width), = sizes
  if height != width:
    raise ValueError(f"images are {height}x{width}; the model needs squares")
  if image_size is not None and height != image_size:
    raise ValueError(
        f"the model takes {image_size}x{image_size} images but the TFRecords"
        f" hold {height}x{width}; preprocess the images again with"
        f" `python -m beam_pipeline preprocess --image_size {image_size}`"
        if model_size else
        f"--image_size {image_size} but the TFRecords hold {height}x{width}"
        f" images; rerun `python -m beam_pipeline preprocess --image_size"
        f" {image_size}` or leave --image_size out")

  kept: List[records.ImageRecord] = []
  for image_id in sorted(by_id):
    copies = sorted(by_id[image_id], key=lambda r: r.source)
    if len({r.label for r in copies}) > 1:
      # The same bytes filed under two classes: no way to know which is right.
      counts["conflicting"] += len(copies)
      _LOG.warning("image %s is labelled %s in %s; skipped", image_id,
                   sorted({r.label for r in copies}),
                   [r.source for r in copies])
      continue
    counts["duplicates"] += len(copies) - 1
    kept.append(copies[0])
  if not kept:
    raise ValueError("every labelled image has conflicting labels")
  data = LabelledData(
      images=np.stack([r.pixels for r in kept]),
      labels=np.asarray([index[r.label] for r in kept], dtype=np.int64),
      image_ids=[r.image_id for r in kept],
      sources=[r.source for r in kept])
  stats = ReadStats(counts["examples"], counts["unlabelled"],
                    counts["unknown_label"], counts["duplicates"],
                    counts["conflicting"], len(kept))
  return data, stats


def subset(data: LabelledData, indices: Sequence[int]) -> LabelledData:
  """The rows `indices` of `data`."""
  indices = np.asarray(indices, dtype=np.int64)
  return LabelledData(data.images[indices], data.labels[indices],
                      [data.image_ids[i] for i in indices],
                      [data.sources[i] for i in indices])
