"""Geometric augmentation in the tf.data pipeline."""

import numpy as np
import tensorflow as tf

from training import augment

NONE = augment.AugmentConfig(0.0, 0.0, 0.0, 0.0, 0.0, False)


def _images(n=4, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                              dtype=np.uint8)


def _seeds(first, n):
  """One stateless seed an image: [first, 0], [first, 1], ..."""
  return tf.constant([[first, i] for i in range(n)], tf.int64)


def test_identity_transform_keeps_pixels():
  images = _images()
  out = augment.augment_each(images, _seeds(1, 4), NONE).numpy()
  np.testing.assert_array_equal(out, images)


def test_flip_only_mirrors_exactly():
  images = _images(n=16)
  config = NONE._replace(horizontal_flip=True)
  out = augment.augment_each(images, _seeds(5, 16), config).numpy()
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def test_no_intensity_change():
  # Reflect fill and geometry only: a flat image stays exactly flat.
  flat = np.full((8, 24, 24, 3), 97, np.uint8)
  out = augment.augment_each(flat, _seeds(3, 8)).numpy()
  assert out.dtype == np.uint8 and out.shape == flat.shape
  assert np.all(out == 97)


def test_seeded_and_varied():
  images = _images(n=8)
  a = augment.augment_each(images, _seeds(1, 8)).numpy()
  b = augment.augment_each(images, _seeds(1, 8)).numpy()
  c = augment.augment_each(images, _seeds(2, 8)).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, images)


def test_parameters_within_ranges():
  size = 100
  transforms = augment.random_transforms(
      2000, size, size, tf.constant([0, 9]),
      augment.DEFAULT._replace(horizontal_flip=False)).numpy()
  m = transforms[:, [0, 1, 3, 4]].reshape(-1, 2, 2)
  # Rotation angle: atan2(m10, m00) with zoom > 0 and ~no shear.
  angles = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0]))
  assert np.abs(angles).max() <= 15.0 + 1e-3 and np.abs(angles).max() > 14
  scale_x = np.hypot(m[:, 0, 0], m[:, 1, 0])
  assert 0.9 - 1e-4 <= scale_x.min() and scale_x.max() <= 1.1 + 1e-4
  # Where the centre goes: the shift, at most 10 % of the size per axis.
  centre = (size - 1) / 2
  cx = transforms[:, 0] * centre + transforms[:, 1] * centre + transforms[:, 2]
  assert np.abs(cx - centre).max() <= 0.1 * size + 1e-3
  assert transforms[:, 6:].max() == 0.0


def test_augment_each_draws_from_each_images_own_seed():
  images = _images(n=6)
  seeds = tf.constant([[4, i] for i in range(6)], tf.int64)
  together = augment.augment_each(images, seeds).numpy()
  for i in (0, 3, 5):
    alone = augment.augment_each(images[i:i + 1], seeds[i:i + 1]).numpy()
    np.testing.assert_array_equal(alone[0], together[i])
  # Each image its own draw: the same image under the six seeds is viewed
  # six ways.
  same = np.repeat(images[:1], 6, axis=0)
  views = augment.augment_each(same, seeds).numpy()
  assert len({v.tobytes() for v in views}) == 6
  # Geometry only.
  flat = np.full((3, 24, 24, 3), 97, np.uint8)
  assert np.all(augment.augment_each(flat, seeds[:3]).numpy() == 97)


def test_degrade_is_seeded_and_keeps_the_brightness():
  image = _images(n=1, size=64)[0]
  a = augment.degrade(image, np.random.default_rng([0, 3, 7]))
  b = augment.degrade(image, np.random.default_rng([0, 3, 7]))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == image.shape
  # All four at once change the pixels, never the mean level: a flat image
  # stays flat under blur, resolution and JPEG, and speckle (gain of mean 1)
  # leaves its mean where it was.
  flat = np.full((64, 64, 3), 97, np.uint8)
  only = augment.DegradeConfig(probability=1.0)
  out = augment.degrade(flat, np.random.default_rng(1), only)
  assert not np.array_equal(out, flat)
  assert abs(float(out.mean()) - 97) < 2
  # Speckle gains are the same in every channel: grey stays grey.
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  none = augment.DegradeConfig(probability=0.0)
  np.testing.assert_array_equal(
      augment.degrade(image, np.random.default_rng(1), none), image)


def test_annotate_draws_thin_bright_marks_and_is_seeded():
  dark = np.full((224, 224, 3), 40, np.uint8)
  out = augment.annotate(dark, np.random.default_rng(3))
  np.testing.assert_array_equal(out, augment.annotate(
      dark, np.random.default_rng(3)))
  assert out.dtype == np.uint8 and out.shape == dark.shape
  changed = np.any(out != dark, axis=-1)
  # Marks, not a wash: a few per cent of the pixels at most, only brighter
  # (grey 170-255 blended over 40), and grey.
  assert 0 < changed.mean() < 0.08
  assert np.all(out >= dark)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert out.max() >= 120  # at least one mark covers a pixel well
  # Another draw puts other marks elsewhere.
  other = augment.annotate(dark, np.random.default_rng(4))
  assert not np.array_equal(other, out)
  # Grey images ([H, W]) too.
  grey = augment.annotate(dark[..., 0], np.random.default_rng(3))
  np.testing.assert_array_equal(grey, out[..., 0])


def test_annotate_draws_calipers_in_pairs():
  # With no text and no lines, what is drawn is the caliper marks: 2 or 4
  # separate blobs.
  import cv2  # pylint: disable=import-outside-toplevel
  config = augment.ANNOTATE._replace(text=0.0, dotted_line=0.0,
                                     span=(0.4, 0.5))
  counts = set()
  for seed in range(12):
    out = augment.annotate(np.zeros((224, 224), np.uint8),
                           np.random.default_rng(seed), config)
    found, _ = cv2.connectedComponents((out > 20).astype(np.uint8))
    counts.add(found - 1)  # label 0 is the background
  assert counts <= {2, 3, 4} and 2 in counts  # two pairs' marks may touch


def test_degrade_draws_each_degradation_half_the_time():
  image = _images(n=1, size=32)[0]
  changed = [not np.array_equal(
      augment.degrade(image, np.random.default_rng(seed)), image)
             for seed in range(64)]
  # Untouched only when none of the four is drawn: 1 in 16.
  assert 0 < changed.count(False) < 16


def test_jpeg_compresses_rgb_as_rgb():
  # OpenCV's codecs take BGR: fed RGB unconverted, the luma (which JPEG keeps
  # best) would weigh blue as red. Pillow's encoder takes RGB; a red-only
  # texture must come back as Pillow's does, not as the swapped encoding's.
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  image = np.zeros((64, 64, 3), np.uint8)
  image[..., 0] = rng.integers(0, 256, (64, 64))
  image[..., 1] = 60
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=50)
  pillow = np.asarray(Image.open(buffer).convert("RGB")).astype(float)
  ours = augment.jpeg(image, 50)
  assert ours.shape == image.shape and ours.dtype == np.uint8
  swapped = augment.jpeg(image[..., ::-1].copy(), 50)[..., ::-1]
  assert (np.abs(ours - pillow).mean()
          < 0.5 * np.abs(swapped.astype(float) - pillow).mean())
  grey = np.repeat(image[..., :1], 3, axis=2)
  out = augment.jpeg(grey, 50)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # One channel goes to the codec as it is, and comes back in its shape.
  single = augment.jpeg(image[..., :1].copy(), 50)
  assert single.shape == (64, 64, 1)
  np.testing.assert_array_equal(single[..., 0], out[..., 0])


def test_deepen_hangs_a_smaller_image_from_the_top_on_black():
  image = np.full((100, 80, 3), 150, np.uint8)
  for seed in range(20):
    out = augment.deepen(image, np.random.default_rng(seed))
    assert out.dtype == np.uint8 and out.shape == image.shape
    rows = np.flatnonzero(out.any(axis=(1, 2)))
    cols = np.flatnonzero(out.any(axis=(0, 2)))
    # The top edge stays at the top (the transducer face), centred across.
    assert rows[0] == 0 and rows[-1] < 99
    assert abs(cols[0] - (79 - cols[-1])) <= 1
    height, width = rows[-1] + 1, cols[-1] - cols[0] + 1
    low, high = augment.DEPTH.scale
    assert 100 * low - 1 <= height <= 100 * high + 1
    assert abs(height / 100 - width / 80) < 0.03  # one factor, both axes
    # The tissue keeps its grey level; outside it, black.
    assert np.all(out[:height, cols[0]:cols[-1] + 1] == 150)
    assert not out[height:].any()
  a = augment.deepen(image, np.random.default_rng([0, 2, 5, 2]))
  np.testing.assert_array_equal(
      a, augment.deepen(image, np.random.default_rng([0, 2, 5, 2])))
  grey = np.full((100, 80), 150, np.uint8)
  assert augment.deepen(grey, np.random.default_rng(0)).shape == grey.shape
