"""Training-time augmentation for ultrasound: the fixed views of
`training.recipe.view_images`, drawn once per run.

Geometry only, as the original recipe's ImageDataGenerator: rotation ±15°,
width and height shift ±10 %, shear 0.01°, zoom ±10 % (x and y drawn
separately), horizontal flip, reflected borders. No colour or brightness
jitter: echo intensity carries the diagnosis.

All five are composed into one affine matrix per image and applied with a
single bilinear resample (`ImageProjectiveTransformV3`). Chaining Keras'
RandomRotation/RandomTranslation/RandomShear/RandomZoom would resample the
image four times, and each resample blurs the speckle the model sees at
scoring time unblurred. Augmentation is never part of the saved model.

Scanner degradations (`degrade`) are added to some of the random views
(`training.recipe.degraded_view`): blur, lower resolution, multiplicative
speckle and JPEG compression, each with probability 0.5, drawn per image.
They mimic what differs between scanners, presets and exports; none shifts
the image's brightness (speckle has mean 1). What they bought on the dev
set, under test-time shifts too: training/README.md, "Scanner
degradations".

Synthetic burned-in annotations (`annotate`: caliper pairs, dotted
measurement lines, text) go on about half of each random view of every
class (`training.recipe.view_images`), so that BUSI's real marks, drawn
on lesions, stop telling the classes apart: training/README.md, "Burned-in
annotations".

Note: "shear 0.01" is ImageDataGenerator's `shear_range`, in degrees, so it
moves a 224-pixel image by under 0.04 pixel; it is kept for fidelity to the
recipe and costs nothing, being folded into the same matrix.
"""

import math
from typing import NamedTuple, Tuple

import cv2
import numpy as np
import tensorflow as tf

from training import config as config_lib


class AugmentConfig(NamedTuple):
  rotation_degrees: float = 15.0
  width_shift: float = 0.1  # fraction of the width
  height_shift: float = 0.1
  shear_degrees: float = 0.01
  zoom: float = 0.1  # scale drawn from [1 - zoom, 1 + zoom] per axis
  horizontal_flip: bool = True


DEFAULT = AugmentConfig()


def random_transforms(batch_size, height, width, seed,
                      config: AugmentConfig = DEFAULT) -> tf.Tensor:
  """Random output→input affine maps, as [batch, 8] projective transforms.

  Args:
    batch_size: number of matrices.
    height: image height (pixels).
    width: image width (pixels).
    seed: a stateless seed, int32/int64 [2].
    config: the parameter ranges.

  Returns:
    float32 [batch, 8] rows (a0, a1, a2, b0, b1, b2, 0, 0) mapping an output
    pixel (x, y) to the input point (a0 x + a1 y + a2, b0 x + b1 y + b2).
  """
  seeds = tf.random.experimental.stateless_split(seed, num=6)
  shape = [batch_size]

  def uniform(i, low, high):
    return tf.random.stateless_uniform(shape, seeds[i], low, high)

  theta = uniform(0, -1.0, 1.0) * (config.rotation_degrees * math.pi / 180)
  shear = uniform(1, -1.0, 1.0) * (config.shear_degrees * math.pi / 180)
  zoom_x = uniform(2, 1 - config.zoom, 1 + config.zoom)
  zoom_y = uniform(3, 1 - config.zoom, 1 + config.zoom)
  shifts = tf.random.stateless_uniform([batch_size, 2], seeds[4], -1.0, 1.0)
  width_f = tf.cast(width, tf.float32)
  height_f = tf.cast(height, tf.float32)
  shift_x = shifts[:, 0] * config.width_shift * width_f
  shift_y = shifts[:, 1] * config.height_shift * height_f
  if config.horizontal_flip:
    flip = tf.where(uniform(5, 0.0, 1.0) < 0.5, -1.0, 1.0)
  else:
    flip = tf.ones(shape)

  # About the image centre: input = c + shift + R(θ)·Shear·Zoom·Flip·(out - c)
  cos, sin = tf.cos(theta), tf.sin(theta)
  # Shear as ImageDataGenerator: [[1, -sin s], [0, cos s]].
  sh01, sh11 = -tf.sin(shear), tf.cos(shear)
  # R · Shear
  m00 = cos
  m01 = cos * sh01 - sin * sh11
  m10 = sin
  m11 = sin * sh01 + cos * sh11
  # · Zoom · Flip (flip mirrors x about the centre)
  m00, m10 = m00 * zoom_x * flip, m10 * zoom_x * flip
  m01, m11 = m01 * zoom_y, m11 * zoom_y
  cx = (width_f - 1) / 2
  cy = (height_f - 1) / 2
  a2 = cx + shift_x - m00 * cx - m01 * cy
  b2 = cy + shift_y - m10 * cx - m11 * cy
  zeros = tf.zeros(shape)
  return tf.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1)


def apply_transforms(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
  """Resamples uint8 [batch, H, W, C] once; returns uint8 of the same shape."""
  shape = tf.shape(images)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(images, tf.float32), transforms=transforms,
      output_shape=shape[1:3], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="REFLECT")
  # Back to what the model takes (and scoring feeds): rounded uint8 pixels.
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def augment_each(images: tf.Tensor, seeds: tf.Tensor,
                 config: AugmentConfig = DEFAULT) -> tf.Tensor:
  """One random geometric augmentation per image, each drawn from its own
  seed: an image's augmentation does not depend on the batch it is in.

  Args:
    images: uint8 [batch, H, W, 3].
    seeds: int64 [batch, 2], one stateless seed an image.
    config: the parameter ranges.
  """
  shape = tf.shape(images)

  @tf.autograph.experimental.do_not_convert  # plain TF ops: nothing to convert
  def one(seed):
    return random_transforms(1, shape[1], shape[2], seed, config)[0]

  transforms = tf.map_fn(one, tf.cast(seeds, tf.int64),
                         fn_output_signature=tf.float32)
  return apply_transforms(images, transforms)


class DegradeConfig(NamedTuple):
  """Ranges of the scanner degradations; each is applied with `probability`,
  independently, in this order."""
  probability: float = 0.5
  blur_sigma: Tuple[float, float] = (0.5, 1.5)  # Gaussian, pixels
  resolution: Tuple[float, float] = (0.5, 0.9)  # scale down, then back up
  # Gamma-distributed gain per pixel with mean 1 and shape k (sd 1/sqrt(k)).
  speckle_shape: Tuple[float, float] = (4.0, 16.0)
  jpeg_quality: Tuple[int, int] = (30, 80)  # upper bound exclusive


DEGRADE = DegradeConfig()


def degrade(image: np.ndarray, rng: np.random.Generator,
            config: DegradeConfig = DEGRADE) -> np.ndarray:
  """One random draw of the scanner degradations of a uint8 [H, W, C] image.

  Blur (Gaussian sigma), resolution (area down-scale by a factor, bilinear
  back up), speckle (per-pixel gamma gain of mean 1, the same for every
  channel) and JPEG compression, each applied with `config.probability`.
  The same generator state gives the same output.
  """
  out = image.astype(np.float32)
  height, width = out.shape[:2]
  if rng.random() < config.probability:
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(*config.blur_sigma))
  if rng.random() < config.probability:
    factor = rng.uniform(*config.resolution)
    small = cv2.resize(out, (max(8, int(width * factor)),
                             max(8, int(height * factor))),
                       interpolation=cv2.INTER_AREA)
    out = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
  if out.ndim == 2:
    out = out[..., None]
  if rng.random() < config.probability:
    shape = rng.uniform(*config.speckle_shape)
    out = out * rng.gamma(shape, 1.0 / shape, size=(height, width))[..., None]
  out = np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(image.shape)
  if rng.random() < config.probability:
    out = jpeg(out, int(rng.integers(*config.jpeg_quality)))
  return out


class DepthConfig(NamedTuple):
  """A deeper depth setting (`deepen`): the same tissue shown smaller,
  hanging from the transducer face at the top, black around it."""
  probability: float = config_lib.DEPTH_PROBABILITY  # per view and image
  scale: Tuple[float, float] = config_lib.DEPTH_SCALE


DEPTH = DepthConfig()


def deepen(image: np.ndarray, rng: np.random.Generator,
           config: DepthConfig = DEPTH) -> np.ndarray:
  """A uint8 [H, W, C] image as a deeper depth setting would frame it:
  scaled by a factor drawn from `config.scale` (area resize), its top edge
  kept at the top (where the transducer is), centred across, on black. What
  lies below the scan's own depth is unknown, so it stays black."""
  height, width = image.shape[:2]
  factor = rng.uniform(*config.scale)
  new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
  small = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
  out = np.zeros_like(image)
  left = (width - new_w) // 2
  out[:new_h, left:left + new_w] = small.reshape(
      (new_h, new_w) + image.shape[2:])
  return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """A uint8 [H, W, C] RGB (or grey) image after JPEG compression at
  `quality` and decoding."""
  colour = image.ndim == 3 and image.shape[2] == 3
  # OpenCV's codecs take and give colour pixels in BGR order.
  ok, encoded = cv2.imencode(
      ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if colour else image,
      [cv2.IMWRITE_JPEG_QUALITY, quality])
  if not ok:
    raise ValueError("JPEG encoding failed")
  decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
  if colour:
    decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
  return decoded.reshape(image.shape)


class AnnotateConfig(NamedTuple):
  """Ranges of the synthetic burned-in annotations (`annotate`), as shares
  of the image's width (BUSI's frames are ~500-600 px wide, so a 224-pixel
  view shows their calipers at about these sizes)."""
  # Measurements: a pair of caliper marks, "+" or "x", often joined by a
  # dotted line; each image gets 1 or 2 pairs (the second at right angles
  # more often than not, as a lesion's two axes are measured).
  probability: float = 0.5  # of a random view carrying them (view_images)
  pairs: Tuple[int, int] = (1, 3)  # upper bound exclusive
  arm: Tuple[float, float] = (0.012, 0.025)  # mark arm, share of the width
  span: Tuple[float, float] = (0.1, 0.5)  # distance of a pair, share
  dotted_line: float = 0.6  # probability that a pair is joined
  # Text: short strings of capitals, digits and punctuation (side, clock
  # position, a measurement) at the frame's edges or over the tissue.
  text: float = 0.5  # probability of text
  text_scale: Tuple[float, float] = (0.0011, 0.0019)  # font scale per px
  grey: Tuple[int, int] = (170, 256)  # the marks' grey level


ANNOTATE = AnnotateConfig()
_TEXT_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:/-"


def annotate(image: np.ndarray, rng: np.random.Generator,
             config: AnnotateConfig = ANNOTATE) -> np.ndarray:
  """A uint8 [H, W, C] image with synthetic burned-in annotations drawn in.

  BUSI's lesion frames often carry calipers, dotted measurement lines and
  text, its normal frames seldom do, so a model can learn "marked, so a
  lesion" from them, a cue another site's exports need not share. Drawn on
  training views of every class, the marks stop telling the classes apart.
  They are drawn at twice the size and area-resized, so their edges are as
  soft as those of a frame resized by preprocessing, and blended in at a
  random grey; nothing else in the image changes. The same generator state
  gives the same output.
  """
  height, width = image.shape[:2]
  scale = 2  # drawing resolution, for anti-aliased thin marks
  canvas = np.zeros((height * scale, width * scale), np.uint8)

  def point(margin):
    return np.array([rng.uniform(margin, 1 - margin) * width * scale,
                     rng.uniform(margin, 1 - margin) * height * scale])

  # Calipers mark something in the frame: both ends stay inside it.
  inside = np.array([width, height]) * scale * np.array([[0.03], [0.97]])
  first_angle = rng.uniform(0, np.pi)
  for pair in range(int(rng.integers(*config.pairs))):
    span = rng.uniform(*config.span) * width * scale
    centre = point(0.15)
    if pair == 0:
      angle = first_angle
    elif rng.random() < 0.7:  # the lesion's other axis
      angle = first_angle + np.pi / 2
    else:
      angle = rng.uniform(0, np.pi)
    offset = span / 2 * np.array([np.cos(angle), np.sin(angle)])
    ends = [np.clip(centre - offset, inside[0], inside[1]),
            np.clip(centre + offset, inside[0], inside[1])]
    arm = rng.uniform(*config.arm) * width * scale
    thickness = int(rng.integers(1, 4))
    cross = rng.random() < 0.5  # "x" marks, else "+"
    for end in ends:
      for direction in ((1, 1), (1, -1)) if cross else ((1, 0), (0, 1)):
        step = arm * np.array(direction, np.float64)
        cv2.line(canvas, _pixel(end - step), _pixel(end + step), 255,
                 thickness, cv2.LINE_AA)
    if rng.random() < config.dotted_line:
      dots = max(2, int(span / (rng.uniform(3, 6) * scale)))
      for t in np.linspace(0.08, 0.92, dots):
        cv2.circle(canvas, _pixel(ends[0] + t * (ends[1] - ends[0])),
                   max(1, thickness // 2), 255, -1, cv2.LINE_AA)
  if rng.random() < config.text:
    for _ in range(int(rng.integers(1, 3))):
      length = int(rng.integers(2, 11))
      text = "".join(rng.choice(list(_TEXT_CHARACTERS), length)).strip()
      font_scale = rng.uniform(*config.text_scale) * width * scale
      origin = point(0.05)
      if rng.random() < 0.6:  # most text sits near the top or bottom edge
        origin[1] = (rng.uniform(0.03, 0.12) if rng.random() < 0.5 else
                     rng.uniform(0.9, 0.97)) * height * scale
      origin[0] = min(origin[0], width * scale * 0.7)
      cv2.putText(canvas, text or "R", _pixel(origin),
                  cv2.FONT_HERSHEY_SIMPLEX, font_scale, 255,
                  max(1, int(round(font_scale * 1.5))), cv2.LINE_AA)
  alpha = cv2.resize(canvas, (width, height),
                     interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
  if image.ndim == 3:
    alpha = alpha[..., None]
  grey = float(rng.integers(*config.grey))
  out = image.astype(np.float32) * (1 - alpha) + grey * alpha
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _pixel(xy) -> Tuple[int, int]:
  return int(round(float(xy[0]))), int(round(float(xy[1])))
