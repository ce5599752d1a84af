"""Image-quality flags (busi_core.quality): each fires on an image made to
fire it, and none on phantom scans."""

import cv2
import numpy as np
import pytest

import schemas
from busi_core import imaging, quality
from tests import archive_factory as af

SIZE = 224


def _decoded(img: np.ndarray, encode=af.png) -> imaging.DecodedImage:
  """The pixels preprocessing would check: encoded, decoded and resized."""
  return imaging.decode_and_resize(encode(img), SIZE, keep_grey=True)


def _check(img: np.ndarray, encode=af.png, **thresholds):
  decoded = _decoded(img, encode)
  return quality.check(decoded.pixels, decoded.original_height,
                       decoded.original_width,
                       quality.QualityThresholds(**thresholds))


@pytest.mark.parametrize("seed,size,label", [
    (0, 500, "benign"), (1, 500, "malignant"), (2, 500, "normal"),
    (3, 300, "benign"), (4, 700, "malignant"), (5, 224, "normal")])
def test_no_flag_fires_on_phantoms(seed, size, label):
  image = af.phantom(seed, size, label)
  assert _check(image) == ()
  # Saved as RGB, and as an RGB JPEG with its chroma noise: still grey.
  bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
  assert _check(bgr) == ()
  assert _check(bgr, encode=af.jpeg) == ()


def test_colour_fires_on_a_doppler_blob():
  assert _check(af.doppler()) == (schemas.FLAG_COLOUR,)
  # JPEG keeps the overlay's colour.
  assert _check(af.doppler(), encode=af.jpeg) == (schemas.FLAG_COLOUR,)
  # Thresholds decide: a share above the blob's, or a tolerance above its
  # colours' spread, keeps it quiet.
  assert _check(af.doppler(), colour_share=0.05) == ()
  assert _check(af.doppler(), colour_tolerance=254) == ()


def test_colour_ignores_a_few_coloured_pixels():
  bgr = cv2.cvtColor(af.phantom(0), cv2.COLOR_GRAY2BGR)
  cv2.circle(bgr, (400, 400), 3, (0, 255, 255), -1)  # a caliper's cross
  assert _check(bgr) == ()


def test_colour_share_is_measured_exactly():
  pixels = np.full((10, 10, 3), 100, np.uint8)
  pixels[0, :5] = (100, 125, 100)  # spread 25: colour
  pixels[1, :5] = (100, 124, 100)  # spread 24: not above the tolerance
  stats = quality.measure(pixels, 10, 10, colour_tolerance=24)
  assert stats.colour_share == pytest.approx(0.05)
  assert quality.measure(pixels[..., 0], 10, 10).colour_share == 0.0


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_fires_on_a_constant_frame(value):
  flags = _check(np.full((480, 560), value, np.uint8))
  # A constant frame has no contrast either.
  assert flags == (schemas.FLAG_BLANK, schemas.FLAG_LOW_CONTRAST)


def test_blank_fires_on_a_near_constant_frame_with_faint_noise():
  rng = np.random.default_rng(0)
  noisy = (60 + rng.normal(0, 1.5, (480, 560))).clip(0, 255).astype(np.uint8)
  assert schemas.FLAG_BLANK in _check(noisy)
  assert schemas.FLAG_BLANK not in _check(noisy, blank_std=0.5)


def test_low_contrast_fires_on_a_faint_ramp():
  ramp = np.tile(np.linspace(100, 140, 560), (480, 1)).astype(np.uint8)
  assert _check(ramp) == (schemas.FLAG_LOW_CONTRAST,)
  # A phantom squeezed into 40 grey levels: speckle, but washed out.
  faint = (100 + af.phantom(1).astype(np.float32) * 40 / 255).astype(np.uint8)
  assert _check(faint) == (schemas.FLAG_LOW_CONTRAST,)
  assert _check(faint, min_contrast=8) == ()


def test_tiny_fires_on_a_small_original():
  assert _check(af.phantom(0, size=40)) == (schemas.FLAG_TINY,)
  assert _check(af.phantom(0, size=40), min_side=40) == ()
  assert _check(af.phantom(0, size=128)) == ()


@pytest.mark.parametrize("height,width", [(300, 1200), (1200, 300)])
def test_aspect_ratio_fires_on_an_extreme_shape(height, width):
  image = cv2.resize(af.phantom(0), (width, height), interpolation=cv2.INTER_AREA)
  assert _check(image) == (schemas.FLAG_ASPECT_RATIO,)
  assert _check(image, max_aspect_ratio=4.0) == ()
  # 1000×100 is a strip: too thin as well.
  strip = cv2.resize(image, (1000, 100), interpolation=cv2.INTER_AREA)
  assert _check(strip) == (schemas.FLAG_TINY, schemas.FLAG_ASPECT_RATIO)


def test_flags_come_in_schema_order():
  # Tiny, wide and blank at once.
  flags = _check(np.zeros((30, 200), np.uint8))
  assert flags == (schemas.FLAG_BLANK, schemas.FLAG_LOW_CONTRAST,
                   schemas.FLAG_TINY, schemas.FLAG_ASPECT_RATIO)
  assert list(flags) == [f for f in schemas.QUALITY_FLAGS if f in flags]
  assert quality.join(flags) == "blank,low_contrast,tiny,aspect_ratio"
  assert quality.join(()) == ""


def test_statistics_of_a_known_image():
  pixels = np.repeat(np.arange(100, dtype=np.uint8), 10).reshape(20, 50)
  stats = quality.measure(pixels, 300, 900)
  # Ten pixels of each level 0..99: the 1st percentile (10th pixel) is 0,
  # the 99th (990th) is 98.
  assert stats.contrast == 98 - 0
  assert stats.grey_std == pytest.approx(np.arange(100).std(), rel=1e-6)
  assert (stats.min_side, stats.aspect_ratio) == (300, 3.0)


@pytest.mark.parametrize("pixels", [
    np.zeros((0, 4), np.uint8), np.zeros((4, 4), np.float32),
    np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 4), np.uint8)])
def test_other_arrays_are_refused(pixels):
  with pytest.raises(ValueError, match="expected"):
    quality.check(pixels, 4, 4)


def test_defaults_are_the_schemas():
  defaults = quality.QualityThresholds()
  assert defaults == (
      schemas.DEFAULT_QUALITY_COLOUR_TOLERANCE,
      schemas.DEFAULT_QUALITY_COLOUR_SHARE, schemas.DEFAULT_QUALITY_BLANK_STD,
      schemas.DEFAULT_QUALITY_MIN_CONTRAST, schemas.DEFAULT_QUALITY_MIN_SIDE,
      schemas.DEFAULT_QUALITY_MAX_ASPECT_RATIO)


def test_the_factory_cases_fire_what_they_name():
  for case in af.quality_cases():
    decoded = imaging.decode_and_resize(case.entry.data, SIZE,
                                        keep_grey=True)
    assert quality.join(quality.check(
        decoded.pixels, decoded.original_height,
        decoded.original_width)) == case.flags, case.entry.path
