"""Image-quality flags on the decoded pixels: colour overlays, blank or
low-contrast frames, tiny or oddly shaped originals.

Plain numpy/OpenCV on the resized pixels that `imaging.decode_and_resize`
gives, plus the original's height and width, so a check costs a small part
of the decode it follows (`bench/quality_bench.py`). The flag names, their
order and the thresholds' defaults are `schemas.quality`.
"""

from typing import NamedTuple, Sequence, Tuple

import cv2
import numpy as np

import schemas


class QualityThresholds(NamedTuple):
  """Where each flag fires; the defaults are `schemas.quality`'s."""
  # Channels further apart than this (grey levels) make a colour pixel.
  colour_tolerance: int = schemas.DEFAULT_QUALITY_COLOUR_TOLERANCE
  # FLAG_COLOUR fires above this share (0-1) of colour pixels.
  colour_share: float = schemas.DEFAULT_QUALITY_COLOUR_SHARE
  # FLAG_BLANK fires below this grey standard deviation.
  blank_std: float = schemas.DEFAULT_QUALITY_BLANK_STD
  # FLAG_LOW_CONTRAST fires below this 99th - 1st grey percentile.
  min_contrast: int = schemas.DEFAULT_QUALITY_MIN_CONTRAST
  # FLAG_TINY fires when the original's shorter side is below this.
  min_side: int = schemas.DEFAULT_QUALITY_MIN_SIDE
  # FLAG_ASPECT_RATIO fires when longer / shorter side is above this.
  max_aspect_ratio: float = schemas.DEFAULT_QUALITY_MAX_ASPECT_RATIO


class QualityStats(NamedTuple):
  """The statistics the flags compare with their thresholds."""
  colour_share: float  # share of pixels whose channels differ (0 if grey)
  grey_std: float  # standard deviation of the grey levels
  contrast: int  # 99th - 1st percentile of the grey levels
  min_side: int  # the original's shorter side
  aspect_ratio: float  # the original's longer side / shorter side


def _grey_and_colour(pixels: np.ndarray, tolerance: int
                    ) -> Tuple[np.ndarray, float]:
  """Grey levels and the share of pixels whose channels differ by more than
  `tolerance`; uint8 [H, W], [H, W, 1] or [H, W, 3] RGB pixels."""
  if pixels.dtype != np.uint8 or pixels.size == 0 or not (
      pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 3))):
    raise ValueError(f"pixels {pixels.dtype} {pixels.shape}: expected"
                     " non-empty uint8 [H, W], [H, W, 1] or [H, W, 3]")
  if pixels.ndim == 2 or pixels.shape[2] == 1:
    return pixels.reshape(pixels.shape[:2]), 0.0
  red, green, blue = cv2.split(pixels)
  # max - min over the channels, without widening to int16.
  spread = cv2.max(cv2.max(cv2.absdiff(red, green), cv2.absdiff(green, blue)),
                   cv2.absdiff(red, blue))
  coloured = cv2.countNonZero(cv2.compare(spread, tolerance, cv2.CMP_GT))
  return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), coloured / spread.size


def measure(pixels: np.ndarray, original_height: int, original_width: int,
            colour_tolerance: int = schemas.DEFAULT_QUALITY_COLOUR_TOLERANCE
           ) -> QualityStats:
  """The quality statistics of one image.

  Args:
    pixels: the resized image, uint8 [H, W] grey or [H, W, 3] RGB.
    original_height: height before resizing.
    original_width: width before resizing.
    colour_tolerance: channels further apart than this make a colour pixel.

  Returns:
    The statistics.

  Raises:
    ValueError: the pixels are not a non-empty uint8 grey or RGB image.
  """
  grey, colour_share = _grey_and_colour(np.asarray(pixels), colour_tolerance)
  _, std = cv2.meanStdDev(grey)
  # Percentiles from the 256-bin histogram: no sort. OpenCV's histogram
  # costs a third of np.bincount's.
  counts = np.cumsum(
      cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel())
  low, high = np.searchsorted(counts, (0.01 * counts[-1], 0.99 * counts[-1]))
  short, long = sorted((int(original_height), int(original_width)))
  return QualityStats(
      colour_share=float(colour_share),
      grey_std=float(std[0, 0]),
      contrast=int(high - low),
      min_side=short,
      aspect_ratio=long / max(short, 1))


def flags(stats: QualityStats,
          thresholds: QualityThresholds = QualityThresholds(),
          burned_in_annotation: bool = False) -> Tuple[str, ...]:
  """The names of the flags that `stats` (and a DICOM header's Burned In
  Annotation) fire, in `schemas.QUALITY_FLAGS` order."""
  fired = {
      schemas.FLAG_BURNED_IN_ANNOTATION: burned_in_annotation,
      schemas.FLAG_COLOUR: stats.colour_share > thresholds.colour_share,
      schemas.FLAG_BLANK: stats.grey_std < thresholds.blank_std,
      schemas.FLAG_LOW_CONTRAST: stats.contrast < thresholds.min_contrast,
      schemas.FLAG_TINY: stats.min_side < thresholds.min_side,
      schemas.FLAG_ASPECT_RATIO: (
          stats.aspect_ratio > thresholds.max_aspect_ratio),
  }
  return tuple(name for name in schemas.QUALITY_FLAGS if fired[name])


def check(pixels: np.ndarray, original_height: int, original_width: int,
          thresholds: QualityThresholds = QualityThresholds(),
          burned_in_annotation: bool = False) -> Tuple[str, ...]:
  """The quality flags one image fires.

  Args:
    pixels: the resized image, uint8 [H, W] grey or [H, W, 3] RGB, as
      `imaging.decode_and_resize` gives it.
    original_height: height before resizing.
    original_width: width before resizing.
    thresholds: where each flag fires.
    burned_in_annotation: the image is a DICOM whose header says text is
      burned into its pixels.

  Returns:
    The names of the flags that fire, in `schemas.QUALITY_FLAGS` order; empty
    for an ordinary scan.

  Raises:
    ValueError: the pixels are not a non-empty uint8 grey or RGB image.
  """
  return flags(measure(pixels, original_height, original_width,
                       thresholds.colour_tolerance), thresholds,
               burned_in_annotation)


def join(names: Sequence[str]) -> str:
  """Flag names as the `quality_flags` feature stores them ("" for none)."""
  return schemas.QUALITY_FLAG_SEPARATOR.join(names)
